"""Importing the ICMR 2021 authors' released model (github.com/mever-team/visloc-estimation) as a geoswc model.

Kordopatis-Zilos et al. published an EfficientNet-B4 backbone (``efficientnet_backbone.pt``, an
``efficientnet_pytorch`` state dict), the MvMF head over 31,145 components (``mvmf_head.pt``), the residual
retrieval module (``rrm_head.pt``), the RRM embeddings of their placeable background with the photos' positions
(``back_coll_features.hdf5``) and which background rows belong to which component (``cells_assignments.pkl``).
`import_visloc` turns these five files into a model folder (`Geolocator.save_pretrained`) that every geoswc
command uses as it is:

- the backbone becomes timm's ``tf_efficientnet_b4`` (the same architecture), tensor for tensor, with the
  paddings of its strided convolutions frozen at 380 px as efficientnet_pytorch's are, split as the version
  they pin (``efficientnet_pytorch==0.7.0``, which pads odd amounts on both sides) splits them
  (`geoswc.classifiers.padding`), so that it computes their features at every input size;
- the MvMF components become the cells of the model: one partition whose cell ``k`` is component ``k``, centred
  on the component's mean (named by the level-30 S2 leaf cell that contains it, so that the cells are disjoint
  and the partition has a stable fingerprint), with the component's concentration and its background rows;
- the retrieval module maps onto `ResidualRetrievalModule` (LayerNorm, residual feed-forward on the normalised
  input, LayerNorm, L2 normalisation: the same computation);
- their inference transform (shorter side resized to 300 px, no crop, ImageNet mean and std) is recorded in
  the model's configuration (``data.eval_resize: shortest``), so the model sees what theirs saw.

The ``.pt`` files are read with ``torch.load(weights_only=True)`` and the pickle with the restricted
unpickler of `geoswc.data.pickles`; no code from the files runs. Every input is checked against the others
before the model is built, and the model is built beside the target folder and swapped in only when complete
(`geoswc.importers.staging`). docs/visloc.md explains the mapping.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import timm
import torch
from tqdm.auto import tqdm

from geoswc.classifiers import create_head
from geoswc.classifiers.padding import EFFICIENTNET_PYTORCH_070, check_padding_rule, freeze_same_padding
from geoswc.config import Config
from geoswc.data.download import check_sha256
from geoswc.data.pickles import load_plain_pickle
from geoswc.geocells import Geocells, Partition, latlng_to_cell_id
from geoswc.geocells.partition import NEAREST_CENTER, POSITION_RULE_KEY
from geoswc.geolocator import Geolocator
from geoswc.importers.assignments import assignment_pairs
from geoswc.importers.background import BackgroundFile, RowsView
from geoswc.importers.sources import PathOrUrl as PathOrUrl  # still importable from here
from geoswc.importers.sources import read_torch_state
from geoswc.importers.sources import resolve_source as resolve_source
from geoswc.importers.staging import check_target, staged_model_folder
from geoswc.retrieval.index import BackgroundIndex
from geoswc.retrieval.model import ResidualRetrievalModule

logger = logging.getLogger(__name__)

TIMM_MODEL = "tf_efficientnet_b4"
# efficientnet_pytorch fixes the "same" paddings of B4 for this input size and keeps them for every input.
EFFICIENTNET_B4_SIZE = 380
# Their requirements.txt pins efficientnet_pytorch==0.7.0, the version the released weights were trained and
# evaluated with; its static padding differs from 0.7.1's (`geoswc.classifiers.padding`).
AUTHORS_PADDING_RULE = EFFICIENTNET_PYTORCH_070
# The files of the release: where the authors publish them (src/modules.py and README of their repository).
AUTHORS_URLS = {
    "backbone": "https://mever.iti.gr/visloc/efficientnet_backbone.pt",
    "mvmf": "https://mever.iti.gr/visloc/mvmf_head.pt",
    "rrm": "https://mever.iti.gr/visloc/rrm_head.pt",
    "background": "https://mever.iti.gr/visloc/back_coll_features.hdf5",
}
ROLES = ("backbone", "mvmf", "rrm", "background", "assignments")
# Their VectorizedMixtureVMF: kappa = exp(kappas + prekappa0), prekappa0 = 16 in every released configuration.
DEFAULT_PREKAPPA0 = 16.0
# Their Preprocessing("inference", backbone="efficientnet"): Resize(300) (shorter side), ToTensor, Normalize.
IMAGE_SIZE = 300
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DATA_CONFIG = {
    "input_size": (3, IMAGE_SIZE, IMAGE_SIZE),
    "interpolation": "bilinear",
    "mean": IMAGENET_MEAN,
    "std": IMAGENET_STD,
    "crop_pct": 1.0,
    "crop_mode": "center",
    # their inference transform on a PIL image: full-size Pillow decode, antialiased PIL bilinear resize
    "resize_backend": "pil",
}
PARTITION_NAME = "visloc_mvmf_components"
IMPORT_FILE = "import.json"

# efficientnet_pytorch block submodules -> timm's, for the blocks with an expansion (InvertedResidual) and for
# the first stage's blocks without one (DepthwiseSeparableConv).
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_STEM_AND_HEAD = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+?)\.(.+)")


def _require(state: Mapping[str, torch.Tensor], keys: Sequence[str], path: Path, what: str) -> None:
    missing = [k for k in keys if k not in state]
    extra = sorted(set(state) - set(keys))
    if missing or extra:
        raise ValueError(
            f"{path}: not the authors' {what}: missing {missing or 'nothing'}, unexpected {extra[:5] or 'nothing'}; "
            f"expected the tensors {', '.join(keys)}"
        )


# ---------------------------------------------------------------------------------------------- backbone
def efficientnet_to_timm(
    state: Mapping[str, torch.Tensor], model: torch.nn.Module
) -> Dict[str, torch.Tensor]:
    """An ``efficientnet_pytorch`` EfficientNet state dict renamed to the keys of the timm EfficientNet ``model``.

    Blocks are numbered consecutively in efficientnet_pytorch (``_blocks.17``) and by stage in timm
    (``blocks.4.3``); both list them in the same order. The classifier (``_fc``) is dropped.

    Raises:
        ValueError: a tensor has no place in ``model``, or its shape differs from the one it replaces, or a
            tensor of ``model`` is missing (each named).
    """
    flat = [(s, j) for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    target = model.state_dict()
    out: Dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.startswith("_fc."):
            continue
        match = _BLOCK_KEY.fullmatch(key)
        new = None
        if match:
            i, sub, rest = int(match.group(1)), match.group(2), match.group(3)
            if i < len(flat):
                stage, j = flat[i]
                table = _DEPTHWISE_SEPARABLE if stage == 0 else _INVERTED_RESIDUAL
                if sub in table:
                    new = f"blocks.{stage}.{j}.{table[sub]}.{rest}"
        else:
            module, _, rest = key.partition(".")
            if module in _STEM_AND_HEAD:
                new = f"{_STEM_AND_HEAD[module]}.{rest}"
        if new is None or new not in target:
            raise ValueError(f"tensor {key!r} has no counterpart in timm's {TIMM_MODEL}")
        if tuple(tensor.shape) != tuple(target[new].shape):
            raise ValueError(
                f"tensor {key!r} has shape {tuple(tensor.shape)}, but timm's {new!r} has {tuple(target[new].shape)}"
            )
        out[new] = tensor
    missing = [k for k in target if k not in out]
    if missing:
        raise ValueError(
            f"the EfficientNet state dict lacks {len(missing)} tensors of timm's {TIMM_MODEL}, e.g. {missing[:3]}"
        )
    return out


def convert_backbone(
    state: Mapping[str, torch.Tensor],
    *,
    source: str = "the backbone",
    padding_rule: str = AUTHORS_PADDING_RULE,
) -> torch.nn.Module:
    """timm's ``tf_efficientnet_b4`` (``num_classes=0``) holding the weights of an efficientnet_pytorch B4, with
    its strided convolutions padded as efficientnet_pytorch pads them (frozen at 380 px and split by
    ``padding_rule``, `geoswc.classifiers.padding`), so that it computes the same features at every input size.

    Args:
        state: the efficientnet_pytorch state dict.
        source: names the state dict in error messages.
        padding_rule: the padding of the efficientnet_pytorch version the weights were trained with:
            ``efficientnet_pytorch==0.7.0`` (the authors' pin) or ``tensorflow`` (0.7.1 and later).

    Raises:
        ValueError: the state dict is not an EfficientNet-B4's (the first misfit named, with ``source``), or
            an unknown ``padding_rule``.
    """
    check_padding_rule(padding_rule)
    model = timm.create_model(TIMM_MODEL, pretrained=False, num_classes=0)
    try:
        model.load_state_dict(efficientnet_to_timm(state, model))
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    size = (EFFICIENTNET_B4_SIZE, EFFICIENTNET_B4_SIZE)
    return freeze_same_padding(model, size, rule=padding_rule).eval()


# ---------------------------------------------------------------------------------------------- MvMF head
@dataclass
class MvMFWeights:
    """The authors' MvMF head: component means (degrees, normalised to the sphere), log concentrations and the
    mixture-weight layer."""

    centers_deg: np.ndarray
    log_kappa: np.ndarray
    weight: torch.Tensor
    bias: torch.Tensor


def read_mvmf(path: Union[str, os.PathLike], *, prekappa0: float = DEFAULT_PREKAPPA0) -> MvMFWeights:
    """Read ``mvmf_head.pt`` (their ``MVMFModule``: ``mvmf.mus`` (2, M) lat/lon in degrees, ``mvmf.kappas``
    (M,) with kappa = exp(kappas + prekappa0), ``mixture_weights.seq_model.0`` the linear layer).

    Trained means may leave [-90, 90] x [-180, 180]; they are mapped through the unit sphere, the point their
    code evaluates.

    Raises:
        FileNotFoundError, ValueError: a missing file, or tensors other than those of their head.
    """
    path = Path(path)
    state = read_torch_state(path, "MvMF head")
    keys = [
        "mvmf.mus",
        "mvmf.kappas",
        "mixture_weights.seq_model.0.weight",
        "mixture_weights.seq_model.0.bias",
    ]
    _require(state, keys, path, "MvMF head (src/modules.py MVMFModule)")
    mus = state["mvmf.mus"].double()
    kappas = state["mvmf.kappas"].double()
    weight, bias = state[keys[2]], state[keys[3]]
    if mus.ndim != 2 or mus.shape[0] != 2:
        raise ValueError(f"{path}: mvmf.mus must have shape (2, M), got {tuple(mus.shape)}")
    n = mus.shape[1]
    if kappas.shape != (n,) or weight.ndim != 2 or weight.shape[0] != n or bias.shape != (n,):
        raise ValueError(
            f"{path}: {n} component means but kappas {tuple(kappas.shape)}, mixture layer "
            f"{tuple(weight.shape)} and bias {tuple(bias.shape)}; expected ({n},), ({n}, D) and ({n},)"
        )
    if not (torch.isfinite(mus).all() and torch.isfinite(kappas).all()):
        raise ValueError(f"{path}: the component means or concentrations hold NaN or infinite values")
    lat_rad, lon_rad = torch.deg2rad(mus[0]), torch.deg2rad(mus[1])
    xyz = torch.stack(
        (
            torch.cos(lat_rad) * torch.cos(lon_rad),
            torch.cos(lat_rad) * torch.sin(lon_rad),
            torch.sin(lat_rad),
        ),
        1,
    )
    centers = np.stack(
        (
            np.degrees(np.arctan2(xyz[:, 2].numpy(), np.hypot(xyz[:, 0].numpy(), xyz[:, 1].numpy()))),
            np.degrees(np.arctan2(xyz[:, 1].numpy(), xyz[:, 0].numpy())),
        ),
        axis=1,
    )
    return MvMFWeights(
        centers_deg=centers,
        log_kappa=(kappas + float(prekappa0)).numpy(),
        weight=weight.float(),
        bias=bias.float(),
    )


def component_partition(
    centers_deg: np.ndarray, counts: np.ndarray, *, name: str = PARTITION_NAME
) -> Partition:
    """The partition whose cell ``k`` is MvMF component ``k``: named by the level-30 S2 leaf containing the
    component's mean, centred on the mean, counting the component's background photos.

    Raises:
        ValueError: two components share a leaf cell (means less than a centimetre apart), both named.
    """
    centers_deg = np.asarray(centers_deg, dtype=np.float64)
    leaves = latlng_to_cell_id(centers_deg[:, 0], centers_deg[:, 1])
    order = np.argsort(leaves, kind="stable")
    same = np.flatnonzero(leaves[order][1:] == leaves[order][:-1])
    if len(same):
        a, b = int(order[same[0]]), int(order[same[0] + 1])
        raise ValueError(
            f"MvMF components {a} and {b} have the same mean {centers_deg[a].tolist()} (to a centimetre); the "
            "components of an imported model must be distinct places"
        )
    return Partition(
        leaves, counts=counts, centers_deg=centers_deg, name=name, num_images=int(np.sum(counts))
    )


# ---------------------------------------------------------------------------------------------- RRM
def convert_rrm(path: Union[str, os.PathLike]) -> ResidualRetrievalModule:
    """`ResidualRetrievalModule` with the weights of ``rrm_head.pt`` (their ``RetrievalModule``: ``norm``,
    ``res.fc1``, ``res.fc2``, ``res.norm``).

    Raises:
        FileNotFoundError, ValueError: a missing file, or tensors other than those of their module.
    """
    path = Path(path)
    state = read_torch_state(path, "retrieval module")
    names = {
        "norm.weight": "norm_in.weight",
        "norm.bias": "norm_in.bias",
        "res.fc1.weight": "fc1.weight",
        "res.fc1.bias": "fc1.bias",
        "res.fc2.weight": "fc2.weight",
        "res.fc2.bias": "fc2.bias",
        "res.norm.weight": "norm_out.weight",
        "res.norm.bias": "norm_out.bias",
    }
    _require(state, list(names), path, "retrieval module (src/modules.py RetrievalModule)")
    hidden, dim = state["res.fc1.weight"].shape
    module = ResidualRetrievalModule(int(dim), int(hidden), residual_input="normalized")
    try:
        module.load_state_dict({ours: state[theirs].float() for theirs, ours in names.items()})
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        raise ValueError(
            f"{path}: the tensors do not fit a retrieval module of dim {dim}: {detail}"
        ) from None
    return module.eval()


# ---------------------------------------------------------------------------------------------- background
@dataclass
class _Background:
    """What the background and assignments files give the index: ``(component, row)`` pairs and the
    positions of the rows listed."""

    comps: np.ndarray
    rows: np.ndarray
    counts: np.ndarray
    latlon: np.ndarray
    n_rows: int
    unassigned: int


def _read_background(
    background: BackgroundFile, assignments: Path, *, n_components: int, dim: int
) -> _Background:
    """The background's rows checked against the retrieval module's width and the assignments' rows checked
    against the background, before any embedding is read."""
    if background.dim != dim:
        raise ValueError(
            f"{background.path}: embeddings of dim {background.dim}, but the retrieval module gives {dim}"
        )
    comps, rows = assignment_pairs(
        load_plain_pickle(assignments),
        n_components=n_components,
        n_rows=background.n_rows,
        source=str(assignments),
    )
    listed = np.unique(rows)
    unassigned = background.n_rows - len(listed)
    if unassigned:
        logger.warning(
            "%d of %d background photos belong to no component in %s; Search within Cell never reaches "
            "them (as in the authors' code), so they are left out of the index",
            unassigned,
            background.n_rows,
            assignments,
        )
    latlon = background.labels(listed)[np.searchsorted(listed, rows)]
    return _Background(
        comps=comps,
        rows=rows,
        counts=np.bincount(comps, minlength=n_components),
        latlon=latlon,
        n_rows=background.n_rows,
        unassigned=unassigned,
    )


# ---------------------------------------------------------------------------------------------- the import
@dataclass
class ImportResult:
    """What `import_visloc` wrote: the model folder and a summary of the import."""

    out: Path
    summary: Dict[str, Any] = field(default_factory=dict)


def imported_config(*, index_dtype: str) -> Config:
    """The configuration of an imported model: their inference transform, their Search within Cell settings
    (K = 10, eps = 1 km, one cell), the MvMF head."""
    return Config().merge(
        {
            "data": {"image_size": IMAGE_SIZE, "eval_resize": "shortest"},
            "backbone": {"model": TIMM_MODEL, "pretrained": False},
            "heads": {"kinds": ["mvmf"]},
            "retrieval": {"index_dtype": index_dtype},
            "swc": {"k": 10, "eps_km": 1.0, "min_samples": 1, "top_cells": 1},
        },
        source="geoswc import visloc",
    )


def _file_record(path: Path, url: Optional[str]) -> Dict[str, Any]:
    record = {"file": path.name, "bytes": path.stat().st_size, "sha256": check_sha256(path, None)}
    if url:
        record["url"] = url
    return record


def _input_paths(files: Mapping[str, Union[str, os.PathLike]]) -> Dict[str, Path]:
    paths = {role: Path(files[role]) for role in ROLES}
    for role, path in paths.items():
        if not path.is_file():
            raise FileNotFoundError(f"--{role} file not found: {path}")
    return paths


def _read_heads(paths: Mapping[str, Path], prekappa0: float) -> Tuple[MvMFWeights, ResidualRetrievalModule]:
    """The MvMF head and the retrieval module, checked to take features of the same width."""
    heads_state = read_mvmf(paths["mvmf"], prekappa0=prekappa0)
    retrieval = convert_rrm(paths["rrm"])
    dim = heads_state.weight.shape[1]
    if retrieval.dim != dim:
        raise ValueError(
            f"the parts do not fit together: the MvMF head ({paths['mvmf']}) takes {dim} features and the "
            f"retrieval module ({paths['rrm']}) {retrieval.dim}"
        )
    return heads_state, retrieval


def _read_backbone(path: Path, dim: int, *, padding_rule: str) -> torch.nn.Module:
    model = convert_backbone(read_torch_state(path, "backbone"), source=str(path), padding_rule=padding_rule)
    if model.num_features != dim:
        raise ValueError(
            f"the parts do not fit together: the backbone ({path}) gives {model.num_features} features, the "
            f"heads take {dim}"
        )
    return model


def _provenance(
    paths: Mapping[str, Path],
    urls: Mapping[str, str],
    prekappa0: float,
    bg: _Background,
    *,
    padding_rule: str,
    progress: bool,
) -> Dict[str, Any]:
    return {
        "source": "visloc-estimation: the ICMR 2021 authors' released model (Kordopatis-Zilos et al.)",
        "cells": "one cell per MvMF component, named by the level-30 S2 leaf containing its mean",
        "prekappa0": float(prekappa0),
        "backbone_padding": {"rule": padding_rule, "input_size": [EFFICIENTNET_B4_SIZE] * 2},
        "files": {
            role: _file_record(path, urls.get(role))
            for role, path in tqdm(paths.items(), desc="sha256", disable=not progress)
        },
        "background_rows": int(bg.n_rows),
        "index_rows": int(len(bg.rows)),
        "unassigned_rows": int(bg.unassigned),
        "components_with_background": int((bg.counts > 0).sum()),
    }


def _build_head(heads_state: MvMFWeights, geocells: Geocells, prekappa0: float) -> torch.nn.Module:
    n_components, dim = heads_state.weight.shape
    head = create_head("mvmf", in_features=int(dim), geocells=geocells, init_kappa=math.exp(prekappa0))
    with torch.no_grad():
        head.fc.weight.copy_(heads_state.weight)
        head.fc.bias.copy_(heads_state.bias)
        head.log_kappa.copy_(torch.as_tensor(heads_state.log_kappa, dtype=head.log_kappa.dtype))
    return head.eval()


def _build_index(
    background: BackgroundFile, bg: _Background, folder: Path, *, dtype: str, fingerprint: str, progress: bool
) -> BackgroundIndex:
    """The index of the listed rows, sorted by component, written to ``folder / "index"``."""
    listed = np.unique(bg.rows)
    staging = folder / ".visloc-background.npy"
    try:
        background.copy_rows(listed, staging, dtype, progress=progress)
        source = np.load(staging, mmap_mode="r")
        index = BackgroundIndex(dtype=dtype).build(
            RowsView(source, np.searchsorted(listed, bg.rows)),
            cell_idx=bg.comps,
            latlon=bg.latlon,
            ids=[str(r) for r in bg.rows],
            n_cells=len(bg.counts),
            fingerprint=fingerprint,
            directory=folder / "index",
            config={"import": {"ids": "row numbers of the background file", "dtype": str(background.dtype)}},
        )
        del source
    finally:
        staging.unlink(missing_ok=True)
    _warn_unnormalised(index)
    return index


def import_visloc(
    *,
    backbone: Union[str, os.PathLike],
    mvmf: Union[str, os.PathLike],
    rrm: Union[str, os.PathLike],
    background: Union[str, os.PathLike],
    assignments: Union[str, os.PathLike],
    out: Union[str, os.PathLike],
    prekappa0: float = DEFAULT_PREKAPPA0,
    index_dtype: Optional[str] = None,
    urls: Optional[Mapping[str, str]] = None,
    overwrite: bool = False,
    progress: bool = True,
    padding_rule: str = AUTHORS_PADDING_RULE,
) -> ImportResult:
    """Write a geoswc model folder from the authors' five files (local paths; see `resolve_source` for URLs).

    Every input is read and checked against the others first; the model is then built in a folder beside
    ``out``, loaded back with `Geolocator.from_pretrained` as a check, and only then swapped into ``out``
    (`geoswc.importers.staging`): a failure at any step leaves ``out`` as it was.

    Args:
        backbone: ``efficientnet_backbone.pt``.
        mvmf: ``mvmf_head.pt``.
        rrm: ``rrm_head.pt``.
        background: ``back_coll_features.hdf5`` (``features`` (N, D) RRM embeddings, ``labels`` (N, 2)).
        assignments: ``cells_assignments.pkl`` ({component: set of background rows}).
        out: the model folder to write (must not exist unless ``overwrite``).
        prekappa0: the offset of their concentrations (kappa = exp(kappas + prekappa0)).
        index_dtype: ``float16`` or ``float32``; default the background file's own precision.
        urls: where each file came from, by role, recorded in the provenance.
        overwrite: replace an existing ``out`` (only a model folder, or an empty folder).
        progress: show progress bars.
        padding_rule: the static padding of the efficientnet_pytorch version the backbone was trained with
            (`convert_backbone`); the authors' release pins ``efficientnet_pytorch==0.7.0``.

    Raises:
        FileNotFoundError: an input is missing.
        FileExistsError: ``out`` exists and ``overwrite`` is false, or it is not a model folder.
        ValueError: an input is not the file the role expects (the file and the problem named).
    """
    paths = _input_paths(
        {"backbone": backbone, "mvmf": mvmf, "rrm": rrm, "background": background, "assignments": assignments}
    )
    out = check_target(out, overwrite=overwrite)
    heads_state, retrieval = _read_heads(paths, prekappa0)
    n_components, dim = heads_state.weight.shape
    with BackgroundFile(paths["background"]) as bg_file:
        bg = _read_background(bg_file, paths["assignments"], n_components=n_components, dim=dim)
        if index_dtype is None:
            index_dtype = "float16" if bg_file.dtype == np.float16 else "float32"
        backbone_model = _read_backbone(paths["backbone"], dim, padding_rule=padding_rule)
        provenance = _provenance(
            paths, urls or {}, prekappa0, bg, padding_rule=padding_rule, progress=progress
        )
        # A position's component is the nearest mean (their find_label), not a containing cell.
        geocells = Geocells(
            [component_partition(heads_state.centers_deg, bg.counts)],
            settings={"import": provenance, POSITION_RULE_KEY: NEAREST_CENTER},
        )
        fingerprint = str(geocells.fingerprint)
        with staged_model_folder(out, overwrite=overwrite) as staging:
            index = _build_index(
                bg_file, bg, staging, dtype=index_dtype, fingerprint=fingerprint, progress=progress
            )
            retrieval.fingerprint = fingerprint
            Geolocator.from_parts(
                backbone=backbone_model,
                geocells=geocells,
                heads={"mvmf": _build_head(heads_state, geocells, prekappa0)},
                retrieval=retrieval,
                index=index,
                config=imported_config(index_dtype=index_dtype),
                backbone_name=TIMM_MODEL,
                data_config=dict(DATA_CONFIG),
            ).save_pretrained(staging)
            (staging / IMPORT_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
            Geolocator.from_pretrained(
                staging, device="cpu", precision_mode="fp32", compile="off", runtime="torch"
            )
    summary = {
        "components": int(n_components),
        "feature_dim": int(dim),
        "background_rows": int(bg.n_rows),
        "index_rows": int(len(bg.rows)),
        "components_with_background": provenance["components_with_background"],
        "unassigned_rows": int(bg.unassigned),
        "index_dtype": index_dtype,
        "fingerprint": fingerprint,
    }
    logger.info("imported the authors' model into %s: %s", out, summary)
    return ImportResult(out=out, summary=summary)


def _warn_unnormalised(index: BackgroundIndex) -> None:
    sample = np.asarray(index.embeddings[: min(len(index), 1000)], dtype=np.float32)
    if len(sample):
        norms = np.linalg.norm(sample, axis=1)
        if np.abs(norms - 1).max() > 1e-2:
            logger.warning(
                "background embeddings are not L2-normalised (norms %.3f..%.3f); the authors' file holds RRM "
                "outputs, which are",
                float(norms.min()),
                float(norms.max()),
            )
