"""Classification heads over geocells (paper 3.2): CE (PlaNet, 3.2.1) and hierarchical classification (3.2.2).

``create_head`` builds any registered head (``ce``, ``hc``, ``mvmf``); ``save_head``/``load_head`` store a
head as safetensors whose metadata records its kind, options and the partition fingerprint, so a head is never
used with cells other than those it was trained on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from safetensors.torch import save_file
from torch import nn

from geoswc.classifiers.base import GeoHead, masked_cross_entropy
from geoswc.data.files import load_safetensors_weights, read_safetensors_metadata
from geoswc.classifiers.mvmf import MvMFHead
from geoswc.data.validation import check_choice


class CEHead(GeoHead):
    """One linear layer over the finest partition, trained with cross-entropy (PlaNet; paper 3.2.1)."""

    kind = "ce"

    def __init__(self, in_features: int, geocells: Any, *, partitions: Optional[Sequence[str]] = None):
        super().__init__(in_features, geocells, partitions=partitions)
        self.fc = nn.Linear(self.in_features, self.n_fine)

    def forward(self, features: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"logits": self.fc(features)}

    def loss(self, outputs, labels, latlon):
        return masked_cross_entropy(outputs["logits"], self.fine_labels(labels))

    def fine_log_probs(self, outputs):
        return torch.log_softmax(outputs["logits"].float(), dim=1)


class HCHead(GeoHead):
    """One linear layer per granularity (paper 3.2.2, after Müller-Budack et al. 2018).

    The loss is the mean of the granularities' cross-entropies. At inference a fine cell scores the product of
    its own probability and its parents' (a sum of log-probabilities). A fine cell with no parent at some
    granularity (``hierarchy`` = -1: the coarser partition dropped that region for having too few photos) has
    no term for it, i.e. the factor is 1: the coarse classifier has no class for that region, so it can
    neither support nor veto it.
    """

    kind = "hc"

    def __init__(self, in_features: int, geocells: Any, *, partitions: Optional[Sequence[str]] = None):
        super().__init__(in_features, geocells, partitions=partitions)
        hierarchy = torch.as_tensor(self.cells.hierarchy, dtype=torch.long)
        if hierarchy.shape != (self.n_fine, len(self.sizes)):
            raise ValueError(
                f"hierarchy has shape {tuple(hierarchy.shape)}; expected ({self.n_fine}, {len(self.sizes)})"
            )
        self.register_buffer("hierarchy", hierarchy, persistent=False)
        self.fcs = nn.ModuleList(nn.Linear(self.in_features, n) for n in self.sizes)

    def forward(self, features: torch.Tensor) -> Dict[str, torch.Tensor]:
        # One tensor (B, sum of cells) so that outputs gather across ranks like any other head's.
        return {"logits": torch.cat([fc(features) for fc in self.fcs], dim=1)}

    def split_logits(self, outputs):
        return torch.split(outputs["logits"], self.sizes, dim=1)

    def loss(self, outputs, labels, latlon):
        losses = [
            masked_cross_entropy(lg, labels[:, self.label_columns[g]])
            for g, lg in enumerate(self.split_logits(outputs))
        ]
        return torch.stack(losses).mean()

    def fine_log_probs(self, outputs):
        total = None
        for g, logits in enumerate(self.split_logits(outputs)):
            log_p = torch.log_softmax(logits.float(), dim=1)
            parent = self.hierarchy[:, g]
            term = log_p[:, parent.clamp(min=0)] * (parent >= 0).to(log_p.dtype)
            total = term if total is None else total + term
        return total


HEADS: Dict[str, Callable[..., GeoHead]] = {"ce": CEHead, "hc": HCHead, "mvmf": MvMFHead}
# Heads (and the backbone's CE layer, ``"backbone"``) that use the PlaNet-rule partition when there is one.
SINGLE_PARTITION_HEADS = ("backbone", "ce", "mvmf")


def default_partitions(kind: str, geocells: Any) -> Optional[List[str]]:
    """The partitions a head uses by the paper's assignment (sections 4.1-4.2).

    When the cells hold a partition of the PlaNet rule (``target_cells``: split the most populated cell until
    the target count) beside the GeoEstimation-rule ones (``max_images``), the backbone's CE layer, CE and
    MvMF use the finest PlaNet-rule partition and HC the GeoEstimation-rule ones, coarse -> fine. Otherwise
    ``None``: every head uses all the partitions (CE and MvMF the finest).

    Args:
        kind: ``backbone``, ``ce``, ``hc`` or ``mvmf``.
        geocells: the model's `Geocells`.
    """
    check_choice("head", kind, ("backbone", *HEADS))
    by_rule = geocells.partitions_by_rule() if hasattr(geocells, "partitions_by_rule") else {}
    target, hierarchy = by_rule.get("target_cells") or [], by_rule.get("max_images") or []
    if not target or not hierarchy:
        return None
    return [target[-1]] if kind in SINGLE_PARTITION_HEADS else list(hierarchy)


def create_head(kind: str, *, in_features: int, geocells: Any, **options: Any) -> GeoHead:
    """Build a head by name.

    Args:
        kind: one of ``ce``, ``hc``, ``mvmf``.
        in_features: width of the pooled backbone features.
        geocells: the ``Geocells`` (partitions coarse -> fine, hierarchy, fingerprint).
        **options: head-specific options (MvMF: ``train_means``, ``init_kappa``).
    """
    check_choice("head", kind, HEADS)
    return HEADS[kind](in_features, geocells, **options)


def save_head(head: GeoHead, path: Union[str, Path], *, config: Any = None) -> Path:
    """Write the head's weights as safetensors; metadata holds kind, options, fingerprint and config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if config is not None and hasattr(config, "to_dict"):
        config = config.to_dict()
    metadata = {
        "kind": head.kind,
        "fingerprint": head.fingerprint,
        "in_features": str(head.in_features),
        "options": json.dumps(head.options),
        "config": json.dumps(config),
    }
    state = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    save_file(state, str(path), metadata=metadata)
    return path


def read_head_metadata(path: Union[str, Path]) -> Dict[str, str]:
    """The metadata of a head file (``kind``, ``fingerprint``, ``options``; see `read_safetensors_metadata`)."""
    return read_safetensors_metadata(path, what="head weights file")


def load_head(path: Union[str, Path], *, geocells: Any) -> GeoHead:
    """Rebuild a head saved by ``save_head`` for ``geocells``.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the head was trained on a partition with another fingerprint, its metadata is malformed,
            or its tensors do not fit the head its metadata describes for ``geocells`` (file and tensor named).
    """
    path = Path(path)
    meta = read_head_metadata(path)
    if "kind" not in meta or "fingerprint" not in meta:
        raise ValueError(f"{path} is not a geoswc head file (no kind/fingerprint metadata)")
    if meta["fingerprint"] != str(geocells.fingerprint):
        raise ValueError(
            f"head {path} was trained on partition {meta['fingerprint']!r} but the given geocells have "
            f"fingerprint {geocells.fingerprint!r}; load the cells it was trained with"
        )
    try:
        in_features = int(meta.get("in_features", ""))
    except ValueError:
        in_features = 0
    if in_features <= 0:
        raise ValueError(
            f"{path}: metadata in_features must be a positive integer, got {meta.get('in_features')!r}"
        )
    try:
        options = json.loads(meta.get("options") or "{}")
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: metadata options is not valid JSON ({err})") from None
    if not isinstance(options, dict):
        raise ValueError(f"{path}: metadata options must be a JSON object, got {options!r}")
    try:
        head = create_head(meta["kind"], in_features=in_features, geocells=geocells, **options)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: {err}") from None
    load_safetensors_weights(
        head, path, describe=f"a {meta['kind']!r} head of {in_features} features on these geocells"
    )
    return head
