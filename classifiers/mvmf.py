"""Mixture of von Mises-Fisher distributions over the sphere (paper 3.2.3, after Izbicki et al. 2019).

Each fine cell is one vMF component whose mean is the cell centre and whose concentration kappa is learned;
the mixture weights are a softmax of a linear layer over the backbone features (initialised from the trained
CE layer, paper 4.2). Training minimises the negative log-likelihood of the photo's true position; the
prediction is the mean of the component with the highest weight.

Numerics: with ``1 - mu.x = |mu - x|^2 / 2`` the vMF log-density is

    log vMF(x | mu, k) = log k - log(2 pi) - log1p(-exp(-2k)) - k |mu - x|^2 / 2,

which never evaluates sinh and stays exact for kappa up to e^20 and beyond (the chord avoids the
cancellation of ``mu.x - 1`` near the mean). For tiny kappa the normaliser uses its series.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
from torch import nn

from geoswc.classifiers.base import GeoHead, latlon_to_unit, unit_to_latlon

LOG_4PI = math.log(4 * math.pi)
_SMALL_KAPPA = 1e-3
MAX_LOG_KAPPA = 20.0


def _log_normalizer_plus_kappa(log_kappa: torch.Tensor) -> torch.Tensor:
    """log C(k) + k, computed without forming either large term: log k - log(2 pi) - log1p(-e^{-2k})."""
    kappa = log_kappa.exp()
    small = kappa < _SMALL_KAPPA
    k_big = torch.where(small, torch.ones_like(kappa), kappa)
    big_value = log_kappa - math.log(2 * math.pi) - torch.log1p(-torch.exp(-2 * k_big))
    # log(sinh k / k) = k^2/6 - k^4/180 + ... for tiny k, where log1p(-e^{-2k}) loses precision.
    k2 = kappa * kappa
    small_value = -LOG_4PI - k2 / 6 + k2 * k2 / 180 + kappa
    return torch.where(small, small_value, big_value)


def vmf_log_normalizer(log_kappa: torch.Tensor) -> torch.Tensor:
    """log C(k) = log k - log(4 pi) - log sinh k from log k, without evaluating sinh (stable for all k > 0)."""
    return _log_normalizer_plus_kappa(log_kappa) - log_kappa.exp()


def vmf_log_density(x: torch.Tensor, mu: torch.Tensor, log_kappa: torch.Tensor) -> torch.Tensor:
    """Log-density of each point under each component on the unit sphere S^2.

    Args:
        x: (B, 3) unit vectors.
        mu: (N, 3) unit mean directions.
        log_kappa: (N,) log concentrations.

    Returns:
        (B, N) log vMF(x_b | mu_n, kappa_n) per steradian.
    """
    chord2 = (x[:, None, :] - mu[None, :, :]).pow(2).sum(-1)
    # log C(k) + k mu.x = (log C(k) + k) - k |mu - x|^2 / 2
    return _log_normalizer_plus_kappa(log_kappa)[None, :] - 0.5 * log_kappa.exp()[None, :] * chord2


def nearest_neighbour_kappa(centers_deg: np.ndarray, *, chunk: int = 2048) -> np.ndarray:
    """A concentration per centre from its spacing: kappa = 1 / d^2 with d the angle (radians) to the nearest
    other centre, so a component spreads about as far as its cell. Clipped to [1, e^20]."""
    xyz = latlon_to_unit(torch.as_tensor(np.asarray(centers_deg, dtype=np.float64)))
    n = xyz.shape[0]
    if n < 2:
        return np.ones(n)
    best = torch.empty(n, dtype=torch.float64)
    for start in range(0, n, chunk):
        cos = xyz[start : start + chunk] @ xyz.T
        rows = torch.arange(cos.shape[0])
        cos[rows, rows + start] = -2.0
        best[start : start + chunk] = cos.max(dim=1).values
    angle_rad = torch.arccos(best.clamp(-1.0, 1.0)).clamp(min=1e-9)
    return np.clip(1.0 / angle_rad.numpy() ** 2, 1.0, math.exp(MAX_LOG_KAPPA))


class MvMFHead(GeoHead):
    """Mixture of vMF components, one per fine cell (paper 3.2.3).

    Args:
        in_features: width of the backbone features.
        geocells: the ``Geocells``; component means are the fine cell centres (of ``partitions``).
        train_means: learn the means (normalised to the sphere) instead of keeping them fixed.
        init_kappa: initial concentration of every component; ``None`` derives one per component from the
            spacing of the centres (``nearest_neighbour_kappa``).
        partitions: the partitions it uses (its fine cells are those of the finest); ``None``: all.
    """

    kind = "mvmf"

    def __init__(
        self,
        in_features: int,
        geocells: Any,
        *,
        train_means: bool = False,
        init_kappa: Optional[float] = None,
        partitions: Optional[Sequence[str]] = None,
    ):
        super().__init__(in_features, geocells, partitions=partitions)
        if init_kappa is not None and not init_kappa > 0:
            raise ValueError(f"init_kappa must be > 0, got {init_kappa!r}")
        self.options.update({"train_means": bool(train_means), "init_kappa": init_kappa})
        self.fc = nn.Linear(self.in_features, self.n_fine)
        means = latlon_to_unit(self.centers_deg).float()
        if train_means:
            self.means = nn.Parameter(means)
        else:
            self.register_buffer("means", means)
        if init_kappa is None:
            kappa = nearest_neighbour_kappa(self.centers_deg.numpy())
        else:
            kappa = np.full(self.n_fine, float(init_kappa))
        self.log_kappa = nn.Parameter(torch.as_tensor(np.log(kappa), dtype=torch.float32))

    @torch.no_grad()
    def init_from_classifier(self, classifier: nn.Module) -> "MvMFHead":
        """Copy a trained CE layer (a ``CEHead`` or an ``nn.Linear`` over the fine cells) into the mixture
        layer (paper 4.2)."""
        theirs = getattr(classifier, "partition", None)
        if theirs is not None and theirs != self.partition:
            raise ValueError(
                f"the classifier predicts over partition {theirs!r} but this mixture over {self.partition!r}; "
                "initialise from a CE layer of the same partition"
            )
        linear = classifier.fc if hasattr(classifier, "fc") else classifier
        if tuple(linear.weight.shape) != tuple(self.fc.weight.shape):
            raise ValueError(
                f"classifier weight has shape {tuple(linear.weight.shape)}; the mixture layer needs "
                f"{tuple(self.fc.weight.shape)}"
            )
        self.fc.weight.copy_(linear.weight)
        self.fc.bias.copy_(linear.bias)
        return self

    def unit_means(self) -> torch.Tensor:
        return nn.functional.normalize(self.means, dim=1)

    def forward(self, features: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"logits": self.fc(features)}

    def log_likelihood(self, outputs: Dict[str, torch.Tensor], latlon: torch.Tensor) -> torch.Tensor:
        """(B,) log MvMF(x | I) of each photo's true position, per steradian."""
        log_w = torch.log_softmax(outputs["logits"].float(), dim=1)
        x = latlon_to_unit(latlon.to(log_w.device, torch.float64)).float()
        log_kappa = self.log_kappa.float().clamp(max=MAX_LOG_KAPPA)
        return torch.logsumexp(log_w + vmf_log_density(x, self.unit_means().float(), log_kappa), dim=1)

    def loss(self, outputs, labels, latlon):
        return -self.log_likelihood(outputs, latlon).mean()

    def fine_log_probs(self, outputs):
        return torch.log_softmax(outputs["logits"].float(), dim=1)

    def predict_latlon(self, outputs):
        best = self.predict_cell(outputs)
        if self.options["train_means"]:
            return unit_to_latlon(self.unit_means().detach().double()[best])
        return self.centers_deg[best]
