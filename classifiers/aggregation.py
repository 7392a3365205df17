"""Aggregation layers: a backbone's last feature map ``(B, C, H, W)`` -> one global descriptor ``(B, D)``.

- ``avg``: global average pooling, what the classification heads of the ICMR 2021 paper pool with.
- ``gem``: generalised-mean pooling (Radenović et al., TPAMI 2018), ``(mean x^p)^(1/p)`` per channel with a
  learnable exponent ``p`` (initialised to 3); the local descriptors are L2-normalised before pooling, the
  place-recognition benchmark's default (Berton et al., CVPR 2022, ``--l2 before_pool``).
- ``netvlad``: NetVLAD (Arandjelović et al., CVPR 2016, section 3): soft assignment of every local descriptor
  to K clusters, the sum of assignment-weighted residuals to each centroid, intra-normalisation per cluster and
  a final L2 normalisation (K x C dimensions). Centroids start from k-means on local descriptors of training
  photos, with the assignment sharpness ``alpha`` chosen so that the first and second nearest centroids differ
  by a factor 100 in assignment on average (`NetVLAD.init_from_descriptors`).

`DescriptorPCA` reduces (and optionally whitens) descriptors to D dimensions, fitted on training descriptors
(the thesis 002's PCA for scale; NetVLAD section 5's PCA + whitening to 4096-D).

`VPRNet` composes a timm backbone (``forward_features``) with one of the layers and returns L2-normalised
descriptors, so inner product and L2 distance rank the database identically.

`TwoPoolBackbone` runs a backbone once and returns both its average-pooled features (what the classification
heads take) and the L2-normalised descriptor of a GeM or NetVLAD layer over the same feature map (what the
residual retrieval module of a ``geoswc fit`` model with ``backbone.pool: gem|netvlad`` embeds), side by side.
`save_retrieval_pool` / `load_retrieval_pool` keep that layer in a model folder (``retrieval_pool.safetensors``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file as load_numpy_file
from safetensors.numpy import save_file as save_numpy_file
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

POOLS = ("avg", "gem", "netvlad")
DEFAULT_CLUSTERS = 64
GEM_P = 3.0


class AvgPool(nn.Module):
    """Global average pooling ``(B, C, H, W) -> (B, C)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1))


class GeM(nn.Module):
    """Generalised-mean pooling ``(B, C, H, W) -> (B, C)``.

    Args:
        p: initial exponent (learnable); 1 is average pooling, large values approach max pooling.
        eps: activations are clamped to at least ``eps`` so that the fractional power is defined.
        normalize_input: L2-normalise every local descriptor (over C) before pooling.
    """

    def __init__(self, p: float = GEM_P, eps: float = 1e-6, *, normalize_input: bool = True) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * float(p))
        self.eps = float(eps)
        self.normalize_input = bool(normalize_input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize_input:
            x = F.normalize(x, p=2, dim=1)
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)

    def extra_repr(self) -> str:
        return f"p={float(self.p.detach()[0]):.4f}, eps={self.eps}"


class NetVLAD(nn.Module):
    """The NetVLAD layer ``(B, C, H, W) -> (B, K * C)``.

    Args:
        clusters: number of clusters K.
        dim: channels C of the feature map.
        normalize_input: L2-normalise every local descriptor before assignment (the paper's setting).
    """

    def __init__(
        self, clusters: int = DEFAULT_CLUSTERS, dim: int = 128, *, normalize_input: bool = True
    ) -> None:
        super().__init__()
        if int(clusters) < 1 or int(dim) < 1:
            raise ValueError(f"NetVLAD needs clusters >= 1 and dim >= 1, got {clusters} and {dim}")
        self.clusters, self.dim = int(clusters), int(dim)
        self.normalize_input = bool(normalize_input)
        self.assign = nn.Conv2d(self.dim, self.clusters, kernel_size=1, bias=False)
        self.centroids = nn.Parameter(torch.rand(self.clusters, self.dim))

    @property
    def out_dim(self) -> int:
        return self.clusters * self.dim

    def init_from_descriptors(self, centroids: np.ndarray, descriptors: np.ndarray) -> "NetVLAD":
        """Set the centroids (from k-means) and the assignment weights ``alpha * unit(centroid)``.

        ``alpha = -ln(0.01) / mean(d1 - d2)``, with ``d1 >= d2`` the two largest cosine similarities of each
        descriptor to the centroids: on average the nearest centroid gets 100 times the assignment of the
        second.
        """
        centroids = np.asarray(centroids, dtype=np.float32)
        descriptors = np.asarray(descriptors, dtype=np.float32)
        if (
            centroids.shape != (self.clusters, self.dim)
            or descriptors.ndim != 2
            or descriptors.shape[1] != self.dim
        ):
            raise ValueError(
                f"expected centroids ({self.clusters}, {self.dim}) and descriptors (N, {self.dim}); got "
                f"{centroids.shape} and {descriptors.shape}"
            )
        unit = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
        dots = -np.sort(-(unit @ descriptors.T), axis=0)
        gap = float(np.mean(dots[0] - dots[1])) if self.clusters > 1 else 1.0
        alpha = -math.log(0.01) / gap
        with torch.no_grad():
            self.centroids.copy_(torch.from_numpy(centroids))
            self.assign.weight.copy_(torch.from_numpy(alpha * unit)[:, :, None, None])
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        if self.normalize_input:
            x = F.normalize(x, p=2, dim=1)
        soft = F.softmax(self.assign(x).flatten(2), dim=1)  # (B, K, HW)
        local = x.flatten(2)  # (B, C, HW)
        # sum_i a_k(x_i) (x_i - c_k) = sum_i a_k(x_i) x_i - c_k sum_i a_k(x_i)
        vlad = torch.bmm(soft, local.transpose(1, 2)) - soft.sum(dim=2, keepdim=True) * self.centroids[None]
        vlad = F.normalize(vlad, p=2, dim=2)
        return F.normalize(vlad.reshape(n, -1), p=2, dim=1)


def kmeans_centroids(
    descriptors: np.ndarray, clusters: int, *, niter: int = 100, seed: int = 0
) -> np.ndarray:
    """k-means centroids ``(clusters, C)`` of local descriptors (faiss, as NetVLAD's initialisation)."""
    try:
        import faiss
    except ImportError as err:
        raise ImportError("NetVLAD's k-means initialisation needs faiss; run: pip install faiss-cpu") from err
    descriptors = np.ascontiguousarray(descriptors, dtype=np.float32)
    if len(descriptors) < clusters:
        raise ValueError(
            f"NetVLAD with {clusters} clusters needs at least {clusters} local descriptors to initialise, got "
            f"{len(descriptors)}; use fewer clusters (--clusters) or more training photos"
        )
    kmeans = faiss.Kmeans(
        descriptors.shape[1], int(clusters), niter=int(niter), seed=int(seed), verbose=False
    )
    kmeans.train(descriptors)
    return np.asarray(kmeans.centroids, dtype=np.float32)


def create_aggregation(
    kind: str, *, dim: int, clusters: int = DEFAULT_CLUSTERS, gem_p: float = GEM_P
) -> nn.Module:
    """The aggregation layer ``kind`` (one of `POOLS`) over a ``dim``-channel feature map."""
    if kind == "avg":
        return AvgPool()
    if kind == "gem":
        return GeM(gem_p)
    if kind == "netvlad":
        return NetVLAD(clusters, dim)
    raise ValueError(f"unknown pool {kind!r}; choose one of: {', '.join(POOLS)}")


def aggregation_dim(layer: nn.Module, channels: int) -> int:
    """Dimension of the descriptors ``layer`` makes from a ``channels``-channel feature map."""
    return layer.out_dim if isinstance(layer, NetVLAD) else int(channels)


class VPRNet(nn.Module):
    """Backbone feature map -> aggregation -> L2-normalised global descriptor.

    Args:
        backbone: a timm model (its ``forward_features`` gives the ``(B, C, H, W)`` map).
        pool: one of `POOLS`.
        clusters: NetVLAD clusters.
    """

    def __init__(self, backbone: nn.Module, pool: str = "gem", *, clusters: int = DEFAULT_CLUSTERS) -> None:
        super().__init__()
        self.backbone = backbone
        self.pool = str(pool)
        self.channels = int(backbone.num_features)
        self.aggregation = create_aggregation(self.pool, dim=self.channels, clusters=clusters)
        self.out_dim = aggregation_dim(self.aggregation, self.channels)

    @property
    def num_features(self) -> int:
        """The descriptor width (the name the feature extraction reads off a backbone)."""
        return self.out_dim

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.aggregation(self.feature_map(images)), p=2, dim=1)


class TwoPoolBackbone(nn.Module):
    """One backbone pass, two poolings: ``(B, C + D)`` = the backbone's own pooled features ``(B, C)`` (timm's
    ``forward_head``, what ``backbone(images)`` returns) then the L2-normalised descriptor ``(B, D)`` of
    ``aggregation`` over the same feature map.

    Args:
        backbone: a ``num_classes=0`` timm model.
        aggregation: a GeM or NetVLAD layer over its ``C``-channel feature map.
    """

    def __init__(self, backbone: nn.Module, aggregation: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.aggregation = aggregation
        self.head_dim = int(backbone.num_features)
        self.retrieval_dim = aggregation_dim(aggregation, self.head_dim)
        self.num_features = self.head_dim + self.retrieval_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feature_map = self.backbone.forward_features(images)
        pooled = self.backbone.forward_head(feature_map)
        descriptor = F.normalize(self.aggregation(feature_map).float(), p=2, dim=1).to(pooled.dtype)
        return torch.cat([pooled, descriptor], dim=1)


RETRIEVAL_POOL_FILE = "retrieval_pool.safetensors"


def pool_name(layer: nn.Module) -> str:
    """``gem`` or ``netvlad`` (``avg`` for anything else) for an aggregation layer."""
    return "netvlad" if isinstance(layer, NetVLAD) else "gem" if isinstance(layer, GeM) else "avg"


def save_retrieval_pool(path: Union[str, Path], layer: nn.Module, *, channels: int) -> Path:
    """Write a GeM or NetVLAD layer (its tensors; metadata ``kind``, ``pool``, ``clusters``, ``channels``)."""
    pool = pool_name(layer)
    if pool == "avg":
        raise ValueError("only a gem or netvlad layer is saved as a retrieval pool; avg has no state")
    metadata = {"kind": "retrieval_pool", "pool": pool, "channels": str(int(channels))}
    if isinstance(layer, NetVLAD):
        metadata["clusters"] = str(layer.clusters)
    state = {k: v.detach().contiguous().cpu() for k, v in layer.state_dict().items()}
    save_file(state, str(path), metadata=metadata)
    return Path(path)


def load_retrieval_pool(path: Union[str, Path], *, channels: Optional[int] = None) -> nn.Module:
    """The layer `save_retrieval_pool` wrote; ``channels``: the backbone's, checked when given.

    Raises:
        ValueError: the file is not a retrieval pool, or it pools another number of channels (both named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"retrieval pool not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for a malformed header
        raise ValueError(f"{path} is not a safetensors file: {err}") from None
    if meta.get("kind") != "retrieval_pool" or meta.get("pool") not in ("gem", "netvlad"):
        raise ValueError(f"{path} does not hold a retrieval pool (kind {meta.get('kind')!r})")
    stored = int(meta.get("channels", 0))
    if channels is not None and stored != int(channels):
        raise ValueError(
            f"{path} pools {stored}-channel feature maps, but the backbone gives {int(channels)} channels"
        )
    layer = create_aggregation(meta["pool"], dim=stored, clusters=int(meta.get("clusters", DEFAULT_CLUSTERS)))
    try:
        layer.load_state_dict(load_file(str(path)))
    except RuntimeError as err:
        raise ValueError(
            f"{path} does not fit a {meta['pool']} layer: {' '.join(str(err).split())}"
        ) from None
    return layer.eval()


def sample_local_descriptors(
    feature_map: torch.Tensor, per_image: int, rng: np.random.Generator
) -> np.ndarray:
    """``per_image`` L2-normalised local descriptors drawn without replacement from every map of a batch."""
    local = F.normalize(feature_map.float(), p=2, dim=1).flatten(2).transpose(1, 2).cpu().numpy()
    take = min(per_image, local.shape[1])
    return np.concatenate([image[rng.choice(local.shape[1], take, replace=False)] for image in local])


class DescriptorPCA:
    """PCA to ``dim`` dimensions (optionally whitened), then L2 normalisation; scikit-learn style.

    Args:
        dim: output dimensions.
        whiten: divide every component by the square root of its variance.
    """

    def __init__(self, dim: int, *, whiten: bool = False) -> None:
        if int(dim) < 1:
            raise ValueError(f"PCA dimension must be >= 1, got {dim}")
        self.dim = int(dim)
        self.whiten = bool(whiten)

    def fit(self, descriptors: np.ndarray) -> "DescriptorPCA":
        x = np.asarray(descriptors, dtype=np.float64)
        if x.ndim != 2 or min(x.shape) < self.dim:
            raise ValueError(
                f"PCA to {self.dim} dimensions needs at least {self.dim} training descriptors of at least "
                f"{self.dim} dimensions, got {x.shape}; lower --pca-dim"
            )
        self.mean_ = x.mean(axis=0)
        _, s, vt = np.linalg.svd(x - self.mean_, full_matrices=False)
        self.components_ = vt[: self.dim]
        self.explained_variance_ = (s[: self.dim] ** 2) / max(len(x) - 1, 1)
        return self

    def transform(self, descriptors: np.ndarray) -> np.ndarray:
        out = (np.asarray(descriptors, dtype=np.float64) - self.mean_) @ self.components_.T
        if self.whiten:
            out = out / np.sqrt(np.maximum(self.explained_variance_, 1e-12))
        norm = np.linalg.norm(out, axis=1, keepdims=True)
        return (out / np.maximum(norm, 1e-12)).astype(np.float32)

    def state(self) -> Dict[str, np.ndarray]:
        return {
            "mean": self.mean_.astype(np.float32),
            "components": self.components_.astype(np.float32),
            "explained_variance": self.explained_variance_.astype(np.float32),
            "whiten": np.array([int(self.whiten)], dtype=np.int8),
        }

    def save(self, path: Union[str, Path]) -> Path:
        save_numpy_file(self.state(), str(path))
        return Path(path)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "DescriptorPCA":
        tensors = load_numpy_file(str(path))
        missing = {"mean", "components", "explained_variance", "whiten"} - set(tensors)
        if missing:
            raise ValueError(f"{path} is not a PCA file: missing {sorted(missing)}")
        pca = cls(len(tensors["components"]), whiten=bool(tensors["whiten"][0]))
        pca.mean_ = tensors["mean"].astype(np.float64)
        pca.components_ = tensors["components"].astype(np.float64)
        pca.explained_variance_ = tensors["explained_variance"].astype(np.float64)
        return pca


def optional_pca(path: Optional[Union[str, Path]]) -> Optional[DescriptorPCA]:
    """The PCA saved at ``path``, or None when there is none."""
    return DescriptorPCA.load(path) if path is not None and Path(path).is_file() else None
