"""Configuration: dataclasses whose defaults are the paper's settings (ICMR 2021, section 4.2).

Precedence is defaults -> preset/file (YAML) -> command-line flags. The resolved configuration is saved
beside every checkpoint, index and report (``Config.save``), so any artefact says how it was made.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import yaml

from geoswc.data.validation import check_choice, choose_one_of

# What every saved config.yaml says first: how to read its batch sizes.
YAML_HEADER = (
    "# geoswc resolved configuration. Every batch_size is per process: under accelerate launch with N\n"
    "# processes a step trains on N x batch_size photos (pairs, for retrieval) and the learning rates are used\n"
    "# as written, not scaled. The paper's 64 per step on N GPUs is batch_size = 64 / N (docs/training.md).\n"
)


@dataclass
class CellsConfig:
    """Earth partitioning (paper 3.1; granularities of GeoEstimation's coarse/middle/fine cells)."""

    min_images: int = 50
    # One partition per value by GeoEstimation's rule (split every cell above the value): HC's coarse -> fine.
    max_images: Tuple[int, ...] = (5000, 2000, 1000)
    start_level: int = 2
    # When set, one more partition beside the max_images ones, by the PlaNet rule (split the most populated
    # cell until this many cells exist, paper 4.1); the backbone's CE layer, CE and MvMF then use it and HC
    # keeps the max_images partitions (`geoswc.classifiers.default_partitions`). The paper uses ~32K cells.
    target_cells: Optional[int] = None


@dataclass
class DataConfig:
    image_size: int = 300
    # Evaluation resize: "longest" (largest side = image_size, the paper) or "fixed" (image_size square).
    eval_resize: str = "longest"
    crop_scale: Tuple[float, float] = (0.7, 1.0)
    crop_ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    samples_per_shard: int = 10000
    shuffle_buffer: int = 5000
    num_workers: int = 4


@dataclass
class BackboneConfig:
    """Stage 1: the backbone trained with cross-entropy over the finest partition (PlaNet re-implementation)."""

    model: str = "efficientnet_b4"
    pretrained: bool = True
    weights: Optional[str] = None  # local .safetensors/.pth with ImageNet weights, for offline machines
    # How place recognition (geoswc vpr) pools the last feature map: avg, gem or netvlad
    # (docs/place-recognition.md). With gem or netvlad, the retrieval module and the background index of
    # geoswc fit embed that layer's descriptors too; the classification heads always take the average.
    pool: str = "avg"
    clusters: int = 64  # NetVLAD clusters of pool netvlad (descriptors of clusters x channels dimensions)
    epochs: int = 25
    # Photos per process and step (every batch_size in the config is per process): N processes train on
    # N x batch_size photos per step with the learning rates as written (docs/training.md, "Batch sizes").
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_step_epochs: int = 5
    lr_gamma: float = 0.5
    # Optimiser (a timm optimizer name: "momentum" is SGD with momentum, without Nesterov) and schedule ("step":
    # x lr_gamma every lr_step_epochs epochs; "cosine": to 0 over every update), see geoswc.train.optim.
    opt: str = "momentum"
    sched: str = "step"


@dataclass
class HeadsConfig:
    """Stage 3: HC and MvMF heads on the frozen backbone."""

    kinds: Tuple[str, ...] = ("ce", "hc", "mvmf")
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-5
    weight_decay: float = 1e-4
    opt: str = "adamw"
    sched: str = "cosine"
    # Train from cached backbone features (fast) or end to end on images with augmentation (the paper).
    from_features: bool = True


@dataclass
class RetrievalConfig:
    """Residual retrieval module and its contrastive training (paper 3.3, 4.2)."""

    hidden_dim: int = 4096
    temperature: float = 0.05
    memory_size: int = 4096
    epochs: int = 200
    batch_size: int = 64  # (query, positive) pairs
    lr: float = 1e-5
    weight_decay: float = 1e-4
    opt: str = "adamw"
    sched: str = "cosine"
    # Head whose top-1 cell decides which training photos are "placeable" background.
    placeable_head: str = "ce"
    index_dtype: str = "float16"
    # The ablations of paper 5.2 (docs/training.md, "Ablations"): "infonce" | "triplet" | "none" (the backbone
    # features, L2-normalised, are the embeddings; nothing is trained).
    loss: str = "infonce"
    margin: float = 0.01  # triplet margin on cosine similarity, with semi-hard negatives
    residual: bool = True  # the skip connection of the module (Table 3)
    symmetric: bool = True  # InfoNCE in both directions (query -> positive and positive -> query)
    mask_same_cell: bool = True  # keys from the anchor's own cell are never negatives
    background: str = (
        "placeable"  # "placeable" (the head's top-1 cell is right) | "all" training photos (Table 4)
    )


@dataclass
class SwcConfig:
    """Search within Cell (paper 3.4)."""

    k: int = 10
    eps_km: float = 1.0
    min_samples: int = 1
    top_cells: int = 1


@dataclass
class TrainConfig:
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"; accelerate's flag wins when launched with it
    channels_last: bool = True
    compile: bool = False
    seed: int = 0
    log_every: int = 50


@dataclass
class Config:
    cells: CellsConfig = field(default_factory=CellsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    swc: SwcConfig = field(default_factory=SwcConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Union[str, Path]) -> None:
        """Write the resolved configuration as YAML (``.yaml``/``.yml``, opening with `YAML_HEADER`) or JSON
        (anything else)."""
        path = Path(path)
        data = _plain(self.to_dict())
        if path.suffix in (".yaml", ".yml"):
            path.write_text(YAML_HEADER + yaml.safe_dump(data, sort_keys=False))
        else:
            path.write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Config":
        return cls().merge(data)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Config":
        return cls().merge(read_config_file(path))

    def merge(self, data: Optional[Dict[str, Any]], *, source: str = "config") -> "Config":
        """Return a copy with ``data`` (nested dict, e.g. ``{"backbone": {"lr": 0.1}}``) applied."""
        out = dataclasses.replace(self)
        for section, values in (data or {}).items():
            if not hasattr(out, section) or not dataclasses.is_dataclass(getattr(out, section)):
                raise ValueError(
                    f"unknown config section {section!r} in {source}; {choose_one_of(_sections())}"
                )
            current = getattr(out, section)
            if not isinstance(values, dict):
                raise ValueError(f"config section {section!r} in {source} must be a mapping, got {values!r}")
            names = {f.name: f for f in dataclasses.fields(current)}
            updates = {}
            for key, value in values.items():
                if key not in names:
                    raise ValueError(f"unknown setting {section}.{key} in {source}; {choose_one_of(names)}")
                if isinstance(value, list):
                    value = tuple(value)
                updates[key] = value
            setattr(out, section, dataclasses.replace(current, **updates))
        return out

    def override(self, assignments: Sequence[str]) -> "Config":
        """Apply ``section.key=value`` strings (values parsed as YAML), as given with ``--set`` on the CLI."""
        data: Dict[str, Dict[str, Any]] = {}
        for item in assignments:
            key, sep, raw = item.partition("=")
            section, dot, name = key.partition(".")
            if not sep or not dot:
                raise ValueError(f"--set expects section.key=value, got {item!r}")
            data.setdefault(section, {})[name] = yaml.safe_load(raw)
        return self.merge(data, source="--set")


def _sections() -> List[str]:
    return [f.name for f in dataclasses.fields(Config)]


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def read_config_file(path: Union[str, Path]) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of sections")
    return data


def available_presets() -> List[str]:
    files = resources.files("geoswc").joinpath("presets").iterdir()
    return sorted(p.name[: -len(".yaml")] for p in files if p.name.endswith(".yaml"))


def load_preset(name: str) -> Config:
    """The configuration of a named preset shipped with the package (``paper``, ``tiny``)."""
    check_choice("preset", name, available_presets())
    text = resources.files("geoswc").joinpath("presets", f"{name}.yaml").read_text()
    return Config().merge(yaml.safe_load(text) or {}, source=f"preset {name}")


def resolve_config(
    preset: Optional[str] = None, config_file: Optional[Union[str, Path]] = None, sets: Sequence[str] = ()
) -> Config:
    """defaults -> preset -> file -> ``--set`` flags."""
    cfg = load_preset(preset) if preset else Config()
    if config_file:
        cfg = cfg.merge(read_config_file(config_file), source=str(config_file))
    return cfg.override(sets)
