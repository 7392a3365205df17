"""Descriptors of place-recognition photos, with the test-time methods of the field.

Database photos are always resized to the evaluation size (``hard_resize``); queries follow ``test_method``
(the benchmark of Berton et al., CVPR 2022, ``datasets_ws.py`` and ``test.py``; five-crop voting is the thesis
002's multi-crop voting):

- ``hard_resize``: resize to ``(H, W)``;
- ``central_crop``: scale so the photo covers ``(H, W)``, keeping its aspect, and cut the centre;
- ``five_crops``: short side to ``min(H, W)``, the four corner and the central squares of that side; the query
  descriptor is the mean of the five;
- ``nearest_crop`` / ``maj_voting``: the same five crops, each searched on its own (`geoswc.vpr.search`).

NetVLAD's centroids are initialised from the split's training photos (`init_netvlad`), PCA is fitted on
training descriptors (`fit_pca`), as the benchmark does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from geoswc.classifiers.aggregation import (
    DescriptorPCA,
    NetVLAD,
    kmeans_centroids,
    sample_local_descriptors,
)
from geoswc.data.images import decode_array
from geoswc.data.transforms import ToNormalizedTensor
from geoswc.data.validation import check_choice
from geoswc.street.model import LoadedVPR

logger = logging.getLogger(__name__)

TEST_METHODS = ("hard_resize", "central_crop", "five_crops", "nearest_crop", "maj_voting")
CROP_METHODS = ("five_crops", "nearest_crop", "maj_voting")
NETVLAD_DESCRIPTORS = 50_000
NETVLAD_PER_IMAGE = 100
PCA_MAX_PHOTOS = 2**14


def check_test_method(method: str) -> str:
    check_choice("test method", method, TEST_METHODS)
    return method


def photo_size(path: Path) -> Tuple[int, int]:
    """``(H, W)`` of a photo (the evaluation size when ``--resize`` is not given)."""
    height, width = decode_array(path).shape[:2]  # upright, as the embedder sees it; errors name the file
    return height, width


def _resize(array: np.ndarray, height: int, width: int) -> np.ndarray:
    if array.shape[:2] == (height, width):
        return array
    return np.asarray(Image.fromarray(array).resize((width, height), Image.BILINEAR))


def views(array: np.ndarray, method: str, size: Tuple[int, int]) -> List[np.ndarray]:
    """The input(s) the network sees for a photo ``(h, w, 3)`` under ``method`` at evaluation ``size``."""
    height, width = size
    h, w = array.shape[:2]
    if method == "hard_resize":
        return [_resize(array, height, width)]
    if method == "central_crop":
        scale = max(height / h, width / w)
        big = _resize(array, max(height, round(h * scale)), max(width, round(w * scale)))
        top, left = (big.shape[0] - height) // 2, (big.shape[1] - width) // 2
        return [big[top : top + height, left : left + width]]
    side = min(height, width)
    if h <= w:
        big = _resize(array, side, max(side, round(w * side / h)))
    else:
        big = _resize(array, max(side, round(h * side / w)), side)
    bh, bw = big.shape[:2]
    corners = [(0, 0), (0, bw - side), (bh - side, 0), (bh - side, bw - side)]
    corners.append(((bh - side) // 2, (bw - side) // 2))
    return [big[t : t + side, left : left + side] for t, left in corners]


class Embedder:
    """Descriptors of photo files for a loaded model.

    Args:
        loaded: the model (`geoswc.street.model`).
        size: evaluation ``(H, W)``.
        batch_size: photos per forward pass.
        device: torch device.
        progress: show progress bars.
    """

    def __init__(
        self,
        loaded: LoadedVPR,
        *,
        size: Tuple[int, int],
        batch_size: int = 16,
        device: str = "cpu",
        progress: bool = True,
    ) -> None:
        self.loaded = loaded
        self.size = (int(size[0]), int(size[1]))
        self.batch_size = max(1, int(batch_size))
        self.device = torch.device(device)
        self.progress = progress
        self.normalize = ToNormalizedTensor(loaded.data_config["mean"], loaded.data_config["std"])
        loaded.net.to(self.device).eval()

    def _batches(self, paths: Sequence[Path], method: str, desc: str) -> Iterable[torch.Tensor]:
        for start in tqdm(
            range(0, len(paths), self.batch_size), desc=desc, unit="batch", disable=not self.progress
        ):
            crops = []
            for path in paths[start : start + self.batch_size]:
                crops += views(decode_array(path), method, self.size)
            yield torch.stack([self.normalize(c) for c in crops]).to(self.device)

    @torch.no_grad()
    def descriptors(
        self, paths: Sequence[Path], method: str = "hard_resize", *, desc: str = "embed"
    ) -> np.ndarray:
        """``(N, D)`` descriptors, or ``(N, 5, D)`` for ``nearest_crop``/``maj_voting`` (``five_crops``: the
        mean of the five)."""
        check_test_method(method)
        out = []
        for pixels in self._batches(paths, method, desc):
            feats = self.loaded.net(pixels).float().cpu().numpy()
            if method in CROP_METHODS:
                feats = feats.reshape(-1, 5, feats.shape[-1])
                if method == "five_crops":
                    feats = feats.mean(axis=1)
            out.append(feats)
        dim = self.loaded.net.out_dim
        empty = np.zeros((0, 5, dim) if method in ("nearest_crop", "maj_voting") else (0, dim), np.float32)
        feats = np.concatenate(out) if out else empty
        return self.apply_pca(feats)

    def apply_pca(self, feats: np.ndarray) -> np.ndarray:
        pca = self.loaded.pca
        if pca is None:
            return feats.astype(np.float32)
        flat = pca.transform(feats.reshape(-1, feats.shape[-1]))
        return flat.reshape(feats.shape[:-1] + (flat.shape[-1],))

    @torch.no_grad()
    def local_descriptors(
        self, paths: Sequence[Path], *, total: int = NETVLAD_DESCRIPTORS, seed: int = 0
    ) -> np.ndarray:
        """L2-normalised local descriptors of the feature maps, ``NETVLAD_PER_IMAGE`` per photo."""
        rng = np.random.default_rng(seed)
        n_images = min(len(paths), -(-int(total) // NETVLAD_PER_IMAGE))
        chosen = [paths[i] for i in np.sort(rng.choice(len(paths), n_images, replace=False))]
        out = []
        for pixels in self._batches(chosen, "hard_resize", "netvlad init"):
            out.append(sample_local_descriptors(self.loaded.net.feature_map(pixels), NETVLAD_PER_IMAGE, rng))
        return np.concatenate(out)


def init_netvlad(embedder: Embedder, train_paths: Sequence[Path], *, seed: int = 0) -> None:
    """Centroids by k-means on local descriptors of ``train_paths`` (the benchmark's initialisation)."""
    layer = embedder.loaded.net.aggregation
    if not isinstance(layer, NetVLAD):
        return
    if not train_paths:
        raise ValueError(
            "an untrained NetVLAD layer is initialised from training photos, but the dataset has no "
            "images/train folder with photos; give a model folder with a trained NetVLAD or add the train split"
        )
    local = embedder.local_descriptors(train_paths, seed=seed)
    layer.init_from_descriptors(kmeans_centroids(local, layer.clusters, seed=seed), local)
    embedder.loaded.net.to(embedder.device)


def fit_pca(
    embedder: Embedder, train_paths: Sequence[Path], dim: int, *, whiten: bool = False, seed: int = 0
) -> DescriptorPCA:
    """PCA of the descriptors of (at most 16,384 of) ``train_paths``; sets it on the embedder's model."""
    if not train_paths:
        raise ValueError("--pca-dim fits PCA on training photos, but the dataset has no images/train photos")
    rng = np.random.default_rng(seed)
    chosen = [
        train_paths[i]
        for i in np.sort(rng.choice(len(train_paths), min(len(train_paths), PCA_MAX_PHOTOS), replace=False))
    ]
    embedder.loaded.pca = None
    feats = embedder.descriptors(chosen, "hard_resize", desc="pca")
    pca = DescriptorPCA(dim, whiten=whiten).fit(feats)
    embedder.loaded.pca = pca
    embedder.loaded.spec.pca_dim, embedder.loaded.spec.whiten = int(dim), bool(whiten)
    return pca


def train_photos(split_root: Optional[Path]) -> List[Path]:
    """All photos of ``ROOT/images/train`` (database and queries), sorted; empty when there is no train split."""
    if split_root is None or not split_root.is_dir():
        return []
    from geoswc.data.vpr import PHOTO_SUFFIXES

    return sorted(p for p in split_root.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES and p.is_file())
