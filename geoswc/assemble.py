"""A model folder from existing stage outputs (``geoswc assemble``; the ``model`` stage of ``geoswc fit``).

The parts of a model folder (docs/architecture.md) are made by separate stages: the cells, the backbone, the
heads, the retrieval module and the background index. `assemble_model` loads them, checks that they fit
together (one partition, one feature width, the backbone the retrieval module was trained on) and writes the
folder with `Geolocator.save_pretrained`; ``geoswc fit`` ends with it. `assemble_from` takes its parts from an
existing run and replaces some of them, so a variant of the paper's retrieval ablations (section 5.2) costs
only its retrieval stage and its index::

    geoswc train retrieval --cells RUN/work/cells --features RUN/work/features --set retrieval.loss=triplet --out R2
    geoswc index build --cells RUN/work/cells --features RUN/work/features --head RUN/work/heads/heads/ce.safetensors \\
        --retrieval R2/retrieval.safetensors --set retrieval.loss=triplet -o I2
    geoswc assemble --from RUN --retrieval R2 --index I2 -o MODEL2

The backbone files are copied as they are (safetensors does not write its metadata in a fixed order, so
saving the same weights twice can give different bytes): every model assembled from one backbone stage holds
the same ``backbone.safetensors``, byte for byte.

The assembled model's configuration is the run's, with the ``retrieval`` section as the retrieval module was
trained (recorded in its weights file) and the background selection as the index was built (recorded in the
index), then ``--config`` and ``--set``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Union

from geoswc.data.files import read_json_object
from geoswc.classifiers import load_backbone, load_head
from geoswc.classifiers.aggregation import (
    RETRIEVAL_POOL_FILE,
    aggregation_dim,
    load_retrieval_pool,
    pool_name,
)
from geoswc.classifiers.backbone import BACKBONE_JSON_FILE, BACKBONE_WEIGHTS_FILE
from geoswc.config import Config, read_config_file
from geoswc.data.files import write_text_atomic
from geoswc.geocells import Geocells
from geoswc.geolocator import META_FILE, Geolocator
from geoswc.retrieval.index import BackgroundIndex
from geoswc.retrieval.model import load_retrieval, read_metadata

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]

RETRIEVAL_FILE = "retrieval.safetensors"
# The file `BackgroundIndex.save` writes last, naming the others: a folder with it holds a complete index.
INDEX_META_FILE = "index.json"
# Written beside the assembled parts by `assemble_from`: where each part came from.
ASSEMBLY_FILE = "assembly.json"
# Settings of the ``retrieval`` section that belong to the index build (the background selection), not to
# the training of the retrieval module.
INDEX_SETTINGS = ("background", "placeable_head", "index_dtype")


@dataclass
class ModelParts:
    """Where each part of a model folder is read from.

    Attributes:
        cells: the `Geocells` folder.
        backbone: the folder with ``backbone.safetensors`` and ``backbone.json``.
        heads: the folder of ``<kind>.safetensors`` heads.
        retrieval: the retrieval weights file (None: a model without retrieval).
        index: the background index folder (None: a model without index).
        config: the configuration file (None: the defaults).
        retrieval_pool: the GeM/NetVLAD layer whose descriptors the retrieval module embeds (None: the
            backbone's average-pooled features).
    """

    cells: Path
    backbone: Path
    heads: Path
    retrieval: Optional[Path] = None
    index: Optional[Path] = None
    config: Optional[Path] = None
    retrieval_pool: Optional[Path] = None

    def as_dict(self) -> Dict[str, Optional[str]]:
        return {
            f.name: None if getattr(self, f.name) is None else str(getattr(self, f.name))
            for f in fields(self)
        }


def parts_of(source: PathLike) -> ModelParts:
    """The parts of an existing run: a ``geoswc fit`` folder (its stage folders under ``work/``), a fit
    ``work/`` folder itself, or a model folder.

    Raises:
        FileNotFoundError: ``source`` is none of these (what was looked for named).
    """
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"--from {source}: no such folder (a geoswc fit folder or a model folder)")
    work = source / "work" if (source / "work" / "backbone").is_dir() else source
    if (work / "backbone").is_dir() and (work / "cells").is_dir():
        retrieval = work / "retrieval" / RETRIEVAL_FILE
        index = work / "index"
        pool = work / "features" / "retrieval" / RETRIEVAL_POOL_FILE
        return ModelParts(
            cells=work / "cells",
            backbone=work / "backbone",
            heads=work / "heads" / "heads",
            retrieval=retrieval if retrieval.is_file() else None,
            index=index if (index / INDEX_META_FILE).is_file() else None,
            config=work / "config.yaml" if (work / "config.yaml").is_file() else None,
            retrieval_pool=pool if pool.is_file() and retrieval.is_file() else None,
        )
    if (source / "geolocator.json").is_file():
        return ModelParts(
            cells=source / "cells",
            backbone=source,
            heads=source / "heads",
            retrieval=source / RETRIEVAL_FILE if (source / RETRIEVAL_FILE).is_file() else None,
            index=source / "index" if (source / "index").is_dir() else None,
            config=source / "config.yaml" if (source / "config.yaml").is_file() else None,
            retrieval_pool=source / RETRIEVAL_POOL_FILE if (source / RETRIEVAL_POOL_FILE).is_file() else None,
        )
    raise FileNotFoundError(
        f"--from {source}: neither a geoswc fit folder (work/backbone and work/cells) nor a model folder "
        "(geolocator.json)"
    )


def _retrieval_file(path: PathLike) -> Path:
    """A retrieval weights file, or the stage folder of ``geoswc train retrieval`` that holds one."""
    path = Path(path)
    if path.is_dir():
        path = path / RETRIEVAL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"retrieval module weights not found: {path}")
    return path


def _heads_folder(path: PathLike) -> Path:
    """A folder of heads, or the stage folder of ``geoswc train heads`` (its ``heads/``)."""
    path = Path(path)
    if (path / "heads").is_dir() and not any(path.glob("*.safetensors")):
        path = path / "heads"
    if not path.is_dir():
        raise FileNotFoundError(f"heads folder not found: {path}")
    return path


def assemble_model(
    out: PathLike,
    *,
    cells: Union[Geocells, PathLike],
    backbone: PathLike,
    heads: PathLike,
    retrieval: Optional[PathLike] = None,
    index: Optional[PathLike] = None,
    config: Optional[Config] = None,
    retrieval_pool: Optional[PathLike] = None,
) -> Dict[str, Any]:
    """Compose the parts into the model folder ``out`` (`Geolocator.save_pretrained`).

    Args:
        out: the model folder to write.
        cells: the `Geocells` every part was made with, or its folder.
        backbone: the folder with ``backbone.safetensors`` (a backbone stage or a model folder).
        heads: the folder of ``<kind>.safetensors`` heads (every head in it is included).
        retrieval: the retrieval weights (a trained module or the identity embedding of ``retrieval.loss=none``).
        index: the background index folder; needs ``retrieval``.
        config: the model's configuration (default: the defaults).
        retrieval_pool: the GeM/NetVLAD layer (``retrieval_pool.safetensors``) whose descriptors the retrieval
            module was trained on (``backbone.pool``); needs ``retrieval``.

    Returns:
        ``{"model_dir", "backbone", "heads", "retrieval" (None, "residual" or "identity"), "index",
        "index_photos"}``.

    Raises:
        FileNotFoundError: a part is missing.
        ValueError: a part was made on another partition, for another feature width or from another backbone
            than ``backbone`` (both named), or an index without a retrieval module.
    """
    geocells = cells if isinstance(cells, Geocells) else Geocells.load(cells)
    fingerprint = str(geocells.fingerprint)
    backbone_model, info = load_backbone(backbone, expected_fingerprint=fingerprint)
    width = int(info["num_features"])
    head_files = sorted(Path(heads).glob("*.safetensors"))
    head_modules = {path.stem: load_head(path, geocells=geocells) for path in head_files}
    for path in head_files:
        if head_modules[path.stem].in_features != width:
            raise ValueError(
                f"{path}: the head takes {head_modules[path.stem].in_features} features, but the backbone "
                f"({Path(backbone) / BACKBONE_WEIGHTS_FILE}) gives {width}"
            )
    module = pool = None
    retrieval_width, given = width, f"the backbone ({Path(backbone) / BACKBONE_WEIGHTS_FILE})"
    if retrieval_pool is not None:
        if retrieval is None:
            raise ValueError(f"the retrieval pool {retrieval_pool} needs a retrieval module; give one")
        pool = load_retrieval_pool(retrieval_pool, channels=width)
        retrieval_width, given = aggregation_dim(pool, width), f"the retrieval pool ({retrieval_pool})"
    if retrieval is not None:
        module = load_retrieval(retrieval, fingerprint=fingerprint)
        if module.dim != retrieval_width:
            raise ValueError(
                f"{retrieval}: the retrieval module takes features of dim {module.dim}, but {given} gives "
                f"{retrieval_width}"
            )
        trained_pool = read_metadata(retrieval).get("pool", "avg")
        given_pool = "avg" if pool is None else pool_name(pool)
        if trained_pool != given_pool:
            raise ValueError(
                f"{retrieval} was trained on {trained_pool}-pooled features, but the model pools them by "
                f"{given_pool} ({retrieval_pool or 'no retrieval_pool.safetensors: the backbone average'})"
            )
        trained_on = read_metadata(retrieval).get("backbone")
        if trained_on and trained_on != info["model"]:
            raise ValueError(
                f"{retrieval} was trained on features of the backbone {trained_on!r}, but "
                f"{Path(backbone) / BACKBONE_WEIGHTS_FILE} is a {info['model']!r}"
            )
    background = None
    if index is not None:
        if module is None:
            raise ValueError(f"the index {index} needs a retrieval module to embed the queries; give one")
        background = BackgroundIndex.load(index, mmap=False, fingerprint=fingerprint)
        if background.dim != module.dim:
            raise ValueError(
                f"{Path(index) / 'embeddings.npy'}: embeddings of dim {background.dim}, but the retrieval module "
                f"({retrieval}) gives dim {module.dim}"
            )
    model = Geolocator.from_parts(
        backbone=backbone_model,
        geocells=geocells,
        heads=head_modules,
        retrieval=module,
        index=background,
        config=config,
        backbone_name=info["model"],
        data_config=info.get("data_config"),
        sources={
            "backbone": Path(backbone) / BACKBONE_WEIGHTS_FILE,
            "retrieval": retrieval or "",
            "index": index,
        },
        retrieval_pool=pool,
    )
    model.save_pretrained(out)
    _copy_verbatim(Path(backbone), Path(out), (BACKBONE_WEIGHTS_FILE, BACKBONE_JSON_FILE))
    return {
        "model_dir": str(out),
        "backbone": info["model"],
        "heads": list(head_modules),
        "retrieval": None if module is None else ("identity" if module.identity else "residual"),
        "index": background is not None,
        "index_photos": 0 if background is None else len(background),
        "retrieval_pool": None if pool is None else pool_name(pool),
    }


def _copy_verbatim(source: Path, out: Path, names: Sequence[str]) -> None:
    """Replace the files ``names`` that `Geolocator.save_pretrained` wrote to ``out`` by the source's own bytes
    (the same weights, loaded from there) and record their SHA-256 in the model's ``geolocator.json``."""
    if source.resolve() == out.resolve():
        return
    meta_path = out / META_FILE
    meta = read_json_object(meta_path)
    for name in names:
        shutil.copyfile(source / name, out / name)
        digest = hashlib.sha256()
        with open(out / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        meta["sha256"][name] = digest.hexdigest()
    write_text_atomic(meta_path, json.dumps(meta, indent=2) + "\n")


def _recorded_config(section: Any, source: str) -> Dict[str, Any]:
    if not isinstance(section, dict):
        raise ValueError(f"{source}: the recorded retrieval settings must be a mapping, got {section!r}")
    return section


def assembled_config(
    parts: ModelParts, *, config_file: Optional[PathLike] = None, overrides: Sequence[str] = ()
) -> Config:
    """The configuration of an assembled model: the run's, the ``retrieval`` section as the retrieval module
    was trained and the background selection as the index was built (each as recorded with it), then
    ``config_file`` and ``overrides`` (``section.key=value``)."""
    config = Config.load(parts.config) if parts.config is not None else Config()
    if parts.retrieval is not None:
        recorded = read_metadata(parts.retrieval).get("config")
        if recorded:
            try:
                section = json.loads(recorded).get("retrieval") or {}
            except (json.JSONDecodeError, AttributeError):
                raise ValueError(f"{parts.retrieval}: the recorded config is not a JSON object") from None
            section = _recorded_config(section, str(parts.retrieval))
            trained = {k: v for k, v in section.items() if k not in INDEX_SETTINGS}
            config = config.merge({"retrieval": trained}, source=str(parts.retrieval))
    if parts.index is not None:
        index_config = parts.index / "config.yaml"
        if index_config.is_file():
            section = read_config_file(index_config).get("retrieval") or {}
            section = _recorded_config(section, str(index_config))
            selection = {k: v for k, v in section.items() if k in INDEX_SETTINGS}
            config = config.merge({"retrieval": selection}, source=str(index_config))
    if config_file is not None:
        config = config.merge(read_config_file(config_file), source=str(config_file))
    return config.override(list(overrides))


def assemble_from(
    out: PathLike,
    *,
    source: Optional[PathLike] = None,
    cells: Optional[PathLike] = None,
    backbone: Optional[PathLike] = None,
    heads: Optional[PathLike] = None,
    retrieval: Optional[PathLike] = None,
    index: Optional[PathLike] = None,
    config_file: Optional[PathLike] = None,
    overrides: Sequence[str] = (),
    no_retrieval: bool = False,
    overwrite: bool = False,
    echo: Callable[[str], None] = logger.info,
) -> Dict[str, Any]:
    """``geoswc assemble``: a model folder from the parts of ``source`` (`parts_of`), each replaceable.

    Args:
        out: the model folder to write; it must not exist or be empty, unless ``overwrite``.
        source: a ``geoswc fit`` folder, its ``work/`` folder or a model folder giving the default parts.
        cells, backbone, heads, retrieval, index: parts replacing ``source``'s (``retrieval`` may be the
            folder of ``geoswc train retrieval``, ``heads`` that of ``geoswc train heads``).
        config_file: a configuration applied after the recorded ones; ``overrides``: ``section.key=value``.
        no_retrieval: leave the retrieval module and the index out (a classification-only model).
        overwrite: replace the model in a non-empty ``out``.
        echo: where the one-line report goes.

    Returns:
        What `assemble_model` returns, plus ``parts`` (the path of each part), also written to
        ``out/assembly.json``.

    Raises:
        FileNotFoundError: a part is missing (named).
        ValueError: no ``source`` and a part not given, ``out`` not empty, ``out`` one of the parts' folders, or
            parts that do not fit together (see `assemble_model`).
    """
    base = parts_of(source) if source is not None else None
    chosen: Dict[str, Optional[Path]] = {}
    for name, given in (("cells", cells), ("backbone", backbone), ("heads", heads)):
        if given is None and base is None:
            raise ValueError(f"give --{name} or --from RUN (a geoswc fit folder or a model folder)")
        chosen[name] = Path(given) if given is not None else getattr(base, name)
    chosen["heads"] = _heads_folder(chosen["heads"])
    chosen["retrieval"] = (
        _retrieval_file(retrieval) if retrieval is not None else getattr(base, "retrieval", None)
    )
    chosen["index"] = Path(index) if index is not None else getattr(base, "index", None)
    # The source's retrieval pool goes with a retrieval module trained on that pool's descriptors.
    chosen["retrieval_pool"] = getattr(base, "retrieval_pool", None)
    if chosen["retrieval_pool"] is not None and chosen["retrieval"] is not None:
        trained_pool = read_metadata(chosen["retrieval"]).get("pool", "avg")
        if trained_pool != pool_name(load_retrieval_pool(chosen["retrieval_pool"])):
            chosen["retrieval_pool"] = None
    if no_retrieval:
        chosen["retrieval"] = chosen["index"] = chosen["retrieval_pool"] = None
    parts = ModelParts(**chosen, config=getattr(base, "config", None))
    if chosen["index"] is not None and not chosen["index"].is_dir():
        raise FileNotFoundError(f"index folder not found: {chosen['index']}")

    out = Path(out)
    resolved = out.resolve()
    for name, path in parts.as_dict().items():
        if path is not None and (
            resolved == Path(path).resolve() or resolved in Path(path).resolve().parents
        ):
            raise ValueError(f"-o {out} holds the {name} part being read ({path}); write the model elsewhere")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"-o {out} exists and is not empty; choose a new folder or pass --overwrite")

    config = assembled_config(parts, config_file=config_file, overrides=overrides)
    summary = assemble_model(
        out,
        cells=parts.cells,
        backbone=parts.backbone,
        heads=parts.heads,
        retrieval=parts.retrieval,
        index=parts.index,
        config=config,
        retrieval_pool=parts.retrieval_pool,
    )
    summary["parts"] = {k: None if v is None else str(Path(v).resolve()) for k, v in parts.as_dict().items()}
    write_text_atomic(out / ASSEMBLY_FILE, json.dumps(summary, indent=2) + "\n")
    echo(describe(summary))
    return summary


def describe(summary: Dict[str, Any]) -> str:
    """One line about an assembled model folder."""
    retrieval = {None: "no retrieval module", "identity": "identity embedding (retrieval.loss=none)"}.get(
        summary.get("retrieval"), "retrieval module"
    )
    index = f"background index of {summary['index_photos']} photos" if summary.get("index") else "no index"
    return (
        f"model folder {summary['model_dir']}: backbone {summary['backbone']}, heads "
        f"{', '.join(summary['heads']) or 'none'}, {retrieval}, {index}"
    )


def record_precision(
    folder: PathLike,
    photos: Sequence[str],
    *,
    echo: Callable[[str], None] = logger.info,
    strict: bool = True,
    **options: Any,
) -> Optional[Dict[str, Any]]:
    """The agreement record of the model folder ``folder`` (`geoswc.engines.agreement.record_folder`) measured
    on ``photos`` of its background, written into the folder; None, with one line saying why, when ``photos``
    is empty or (not ``strict``: a step of a longer command) the measurement failed. ``options`` as
    `geoswc.engines.agreement.measure_precisions`."""
    from geoswc.engines import agreement

    if not photos:
        echo(
            f"  no agreement record for int8/bf16 (no photos given): geoswc precision check {folder} --photos DIR"
        )
        return None
    model = Geolocator.from_pretrained(
        folder, device="cpu", precision_mode="fp32", compile="off", runtime="torch"
    )
    try:
        record = agreement.record_folder(model, folder, photos, **options)
    except Exception as err:  # noqa: BLE001 - without a record the model runs in float32, as before
        if strict:
            raise
        echo(f"  no agreement record for int8/bf16 ({type(err).__name__}: {err}); the model runs in float32")
        return None
    decisions = agreement.decide(record, model.backbone)
    echo("  " + agreement.format_record(record, decisions).replace("\n", "\n  "))
    return record
