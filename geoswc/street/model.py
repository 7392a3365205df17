"""Place-recognition models: a backbone with an aggregation layer, from a model folder or off the shelf.

A folder that holds a trained place-recognition model is a backbone folder (`geoswc.classifiers.backbone`) plus
``vpr.json`` (``{"pool", "clusters", "pca_dim", "whiten", "resize"}``), ``aggregation.safetensors`` (the layer's
weights: GeM's ``p``, NetVLAD's centroids and assignment) and, with PCA, ``pca.safetensors``. A model folder
without ``vpr.json`` is pooled as its ``backbone.pool`` setting says (``avg`` by default, the paper's), with the
layer of its ``retrieval_pool.safetensors`` when it has one (``geoswc fit`` with ``backbone.pool`` gem|netvlad).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

from safetensors.torch import load_file, save_file

from geoswc.classifiers.aggregation import (
    DEFAULT_CLUSTERS,
    POOLS,
    RETRIEVAL_POOL_FILE,
    DescriptorPCA,
    NetVLAD,
    VPRNet,
    load_retrieval_pool,
    pool_name,
)
from geoswc.classifiers.backbone import PretrainedWeightsUnavailable, create_backbone, load_backbone
from geoswc.config import load_preset
from geoswc.data.validation import check_choice

logger = logging.getLogger(__name__)

VPR_JSON = "vpr.json"
AGGREGATION_FILE = "aggregation.safetensors"
PCA_FILE = "pca.safetensors"
PRESETS = ("tiny",)


@dataclass
class VPRSpec:
    """How a place-recognition model was built (saved as ``vpr.json`` and in ``results.json``)."""

    backbone: str
    pool: str
    clusters: int = DEFAULT_CLUSTERS
    pca_dim: Optional[int] = None
    whiten: bool = False
    source: str = ""
    trained_aggregation: bool = False

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedVPR:
    """A model ready to embed: the network, its input normalisation and optional PCA."""

    net: VPRNet
    data_config: Dict[str, Any]
    spec: VPRSpec
    pca: Optional[DescriptorPCA] = None


def _check_pool(pool: str) -> str:
    check_choice("pool", pool, POOLS)
    return pool


def off_the_shelf(
    *,
    backbone: Optional[str] = None,
    preset: Optional[str] = None,
    pool: str = "gem",
    clusters: int = DEFAULT_CLUSTERS,
    weights: Optional[Union[str, Path]] = None,
) -> LoadedVPR:
    """ImageNet weights with an untrained aggregation layer (NetVLAD still needs `init_netvlad`).

    Args:
        backbone: a timm model name (timm's pretrained weights: the hub or its cache, or ``weights``).
        preset: ``tiny``: the tiny preset's backbone with the weights shipped in a package (offline).
        pool: one of `POOLS`.
        clusters: NetVLAD clusters.
        weights: with ``backbone``: a local ``.safetensors``/``.pth`` file of its weights (timm's or another
            implementation's with the same tensors, `geoswc.classifiers.backbone.load_backbone_weights`).

    Raises:
        FileNotFoundError: ``backbone`` without ``weights`` whose weights are neither in the Hugging Face
            cache nor reachable (the message says to pass ``--weights``), or a missing weights file.
    """
    _check_pool(pool)
    if (backbone is None) == (preset is None):
        raise ValueError("give exactly one of a backbone name (--backbone NAME) or a preset (--preset tiny)")
    if preset is not None:
        check_choice("preset", preset, PRESETS)
        cfg = load_preset(preset).backbone
        model = create_backbone(cfg.model, pretrained=cfg.pretrained and not cfg.weights, weights=cfg.weights)
        name, source = cfg.model, f"preset {preset} ({cfg.weights or 'timm pretrained'})"
    elif weights is not None:
        model = create_backbone(backbone, weights=weights)
        name, source = backbone, f"weights file {weights}"
    else:
        try:
            model = create_backbone(backbone, pretrained=True)
        except PretrainedWeightsUnavailable:
            raise PretrainedWeightsUnavailable(
                f"--backbone {backbone}: timm's ImageNet weights are not in the Hugging Face cache and cannot "
                "be downloaded (no network, or HF_HUB_OFFLINE is set); pass a local weights file with "
                "--weights FILE (.safetensors or .pth)"
            ) from None
        name, source = backbone, "timm pretrained (ImageNet)"
    import timm

    data_config = dict(timm.data.resolve_model_data_config(model))
    net = VPRNet(model, pool, clusters=clusters).eval()
    spec = VPRSpec(backbone=name, pool=pool, clusters=int(clusters), source=source)
    return LoadedVPR(net, data_config, spec)


def from_folder(
    folder: Union[str, Path], *, pool: Optional[str] = None, clusters: int = DEFAULT_CLUSTERS
) -> LoadedVPR:
    """The place-recognition model of a model (or backbone) folder.

    A folder with ``vpr.json`` brings its trained aggregation and PCA; ``pool`` must then agree with it. Any
    other folder gets ``pool`` (default: its configuration's ``backbone.pool``, else ``avg``) on its backbone.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    backbone, info = load_backbone(folder)
    data_config = dict(info.get("data_config") or {})
    if not data_config:
        import timm

        data_config = dict(timm.data.resolve_model_data_config(backbone))
    meta_path = folder / VPR_JSON
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            spec = VPRSpec(**{k: meta[k] for k in VPRSpec.__dataclass_fields__ if k in meta})
        except (json.JSONDecodeError, TypeError, KeyError, UnicodeDecodeError) as err:
            raise ValueError(f"{meta_path}: not a place-recognition description ({err})") from None
        _check_pool(spec.pool)
        if pool is not None and pool != spec.pool:
            raise ValueError(
                f"{folder} holds a trained {spec.pool!r} aggregation; --pool {pool} does not fit it"
            )
        net = VPRNet(backbone, spec.pool, clusters=spec.clusters)
        state_path = folder / AGGREGATION_FILE
        if any(True for _ in net.aggregation.parameters()):
            if not state_path.is_file():
                raise FileNotFoundError(f"{folder} has {VPR_JSON} but no {AGGREGATION_FILE}")
            try:
                net.aggregation.load_state_dict(load_file(str(state_path)))
            except RuntimeError as err:
                raise ValueError(
                    f"{state_path} does not fit a {spec.pool} layer: {' '.join(str(err).split())}"
                ) from None
        pca = DescriptorPCA.load(folder / PCA_FILE) if spec.pca_dim else None
        return LoadedVPR(net.eval(), data_config, spec, pca)
    config = info.get("config") or {}
    configured = (config.get("backbone") or {}).get("pool") if isinstance(config, dict) else None
    # A geoswc fit folder with backbone.pool gem|netvlad keeps the layer its retrieval module embeds.
    pool_file = folder / RETRIEVAL_POOL_FILE
    stored = load_retrieval_pool(pool_file, channels=backbone.num_features) if pool_file.is_file() else None
    pool = _check_pool(pool or (pool_name(stored) if stored is not None else configured) or "avg")
    kept = stored is not None and pool_name(stored) == pool
    if kept and isinstance(stored, NetVLAD):
        clusters = stored.clusters
    net = VPRNet(backbone, pool, clusters=clusters).eval()
    if kept:
        net.aggregation = stored
    spec = VPRSpec(
        backbone=info["model"],
        pool=pool,
        clusters=int(clusters),
        source=str(pool_file if kept else folder),
        trained_aggregation=kept,
    )
    return LoadedVPR(net, data_config, spec)


def save_vpr_parts(folder: Union[str, Path], loaded: LoadedVPR) -> Tuple[Path, ...]:
    """Write ``vpr.json``, ``aggregation.safetensors`` and (with PCA) ``pca.safetensors`` into ``folder``."""
    folder = Path(folder)
    written = [folder / VPR_JSON]
    state = {k: v.detach().contiguous().cpu() for k, v in loaded.net.aggregation.state_dict().items()}
    if state:
        save_file(state, str(folder / AGGREGATION_FILE))
        written.append(folder / AGGREGATION_FILE)
    if loaded.pca is not None:
        written.append(loaded.pca.save(folder / PCA_FILE))
    (folder / VPR_JSON).write_text(json.dumps(loaded.spec.to_dict(), indent=2) + "\n")
    return tuple(written)
