"""A street-scale model folder (``geoswc vpr index``) as a predictor of `geoswc tag` and `geoswc serve`.

`StreetGeolocator` has the Geolocator's surface these call: ``transform`` (a photo -> ``(3, H, W)``),
``features`` (descriptors of a batch), ``locate`` / ``predict_from_features`` / ``predict_batch`` / ``predict``
(one dict per photo). A photo is placed at its first database match (``method`` ``match``), or with ``k > 1`` at
the centre of the largest DBSCAN cluster of its first ``k`` matches, eps in metres (``method`` ``cluster``).
Its ``neighbours`` are the matched database photos (``id``: the photo's path below the database root, ``lat``,
``lon``, ``similarity``, ``in_cluster``); ``area`` (south, west, north, east) restricts the database. A
street model has no classification head and no cells: ``cell_token`` is None and ``confidence`` unknown.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from geoswc.data.photos import PhotoDataset, photo_batches
from geoswc.data.transforms import ToNormalizedTensor
from geoswc.street.embed import views
from geoswc.street.locator import PlaceLocator

# Modes a street model serves: ``swc`` clusters the first k matches (k 1: the first match), ``rrm`` is the
# first match.
STREET_MODES = ("swc", "rrm")
DEFAULT_EPS_M = 25.0
# Bounds of the clustering settings a caller may ask for (``geoswc tag --street-k``, ``POST /v1/locate``).
MAX_K = 100
MAX_EPS_M = 10_000.0


def check_cluster_settings(k: Any, eps_m: Any) -> Tuple[Optional[int], Optional[float]]:
    """``k`` (matches clustered, 1 to `MAX_K`) and ``eps_m`` (cluster radius in metres, over 0 and at most
    `MAX_EPS_M`) as numbers; None stays None (the default: the first match, 25 m).

    Raises:
        ValueError: a value that is not a number in its range (named with the range).
    """
    if k is not None:
        try:
            number = int(str(k).strip())
        except ValueError:
            number = 0
        if not 1 <= number <= MAX_K:
            raise ValueError(f"k must be an integer from 1 to {MAX_K}, got {k!r}")
        k = number
    if eps_m is not None:
        try:
            value = float(str(eps_m).strip())
        except ValueError:
            value = float("nan")
        if not 0.0 < value <= MAX_EPS_M:
            raise ValueError(
                f"eps_m must be a number of metres over 0 and at most {MAX_EPS_M:g}, got {eps_m!r}"
            )
        eps_m = value
    return k, eps_m


class StreetTransform:
    """A photo (PIL image or ``(H, W, 3)`` uint8 array) resized to the database's evaluation size and
    normalised: the pixels `geoswc vpr locate` embeds."""

    accepts_arrays = True
    decode_target = None

    def __init__(self, size: Tuple[int, int], mean: Sequence[float], std: Sequence[float]):
        self.size = (int(size[0]), int(size[1]))
        self.normalize = ToNormalizedTensor(mean, std)

    def __call__(self, image: Union[Image.Image, np.ndarray]) -> torch.Tensor:
        if isinstance(image, Image.Image):
            image = image.convert("RGB")
        return self.normalize(views(np.asarray(image), "hard_resize", self.size)[0])


class StreetGeolocator:
    """Places photos by the database of a model folder written by ``geoswc vpr index``."""

    def __init__(self, locator: PlaceLocator, folder: Optional[Path] = None):
        self.head_names: List[str] = []
        self.geocells = None  # no cells, no classification head, no retrieval module
        self.retrieval = None
        self.locator = locator
        self.folder = folder
        self.index = locator.index
        loaded = locator.loaded
        self.backbone_name = str(loaded.spec.backbone)
        self.fingerprint = "vpr"
        self.transform = StreetTransform(
            locator.meta["resize"], loaded.data_config["mean"], loaded.data_config["std"]
        )
        self.image_size = int(max(locator.meta["resize"]))

    @classmethod
    def from_pretrained(cls, folder: Union[str, Path], *, device: Any = None) -> "StreetGeolocator":
        """Load a folder written by ``geoswc vpr index`` (the network runs in float32 on ``device``, default
        CPU)."""
        locator = PlaceLocator.from_pretrained(folder)
        model = cls(locator, Path(folder))
        if device is not None:
            model.to(device)
        return model

    @property
    def device(self) -> torch.device:
        return self.locator.embedder.device

    def to(self, device: Union[str, torch.device]) -> "StreetGeolocator":
        self.locator.embedder.device = torch.device(device)
        self.locator.loaded.net.to(self.locator.embedder.device)
        return self

    def resolve_head(self, head: Optional[str] = None) -> Optional[str]:
        """None: a street model has no classification head; naming one is an error."""
        if head is not None:
            raise ValueError(f"unknown head {head!r}; a street-scale model (geoswc vpr index) has none")
        return None

    def check_area(self, area: Optional[Sequence[float]]) -> None:
        """Raises ValueError when ``area`` is malformed or holds no database photo."""
        self.locator._rows_in_area(area)

    def database_ids(self) -> Dict[str, int]:
        """The database photos' ids (paths below the database root) and their rows."""
        return {str(p): i for i, p in enumerate(self.locator.photos["path"])}

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Descriptors ``(B, D)`` float32 of a batch of transformed photos ``(B, 3, H, W)`` (after PCA when the
        model has one)."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must have shape (B, 3, H, W), got {tuple(pixels.shape)}")
        with torch.no_grad():
            feats = self.locator.loaded.net(pixels.to(self.device)).float().cpu().numpy()
        return torch.from_numpy(self.locator.embedder.apply_pca(feats))

    def predict_from_features(
        self,
        features: torch.Tensor,
        *,
        head: Optional[str] = None,
        mode: str = "swc",
        k: Optional[int] = None,
        eps_m: Optional[float] = None,
        eps_km: Optional[float] = None,
        area: Optional[Sequence[float]] = None,
        top_k: int = 5,
        **_: Any,
    ) -> List[Dict[str, Any]]:
        """One dict per photo from its descriptors. ``mode`` ``swc``: the largest cluster of the first ``k``
        matches (default 1: the first match), eps ``eps_m`` metres (or ``eps_km``; default 25 m); ``rrm``: the
        first match; ``top_k``: how many matches are listed in ``neighbours`` (at least ``k``)."""
        self.resolve_head(head)
        if mode not in STREET_MODES:
            raise ValueError(
                f"mode {mode!r} needs cells; a street-scale model serves: {', '.join(STREET_MODES)}"
            )
        k = 1 if mode == "rrm" or k is None else int(k)
        if eps_m is None:
            eps_m = DEFAULT_EPS_M if eps_km is None else float(eps_km) * 1000.0
        queries = features.detach().cpu().numpy().astype(np.float32)
        found = self.locator.locate_descriptors(
            queries, [""] * len(queries), k=k, eps_m=eps_m, area=area, matches=max(int(top_k), k)
        )
        return [self._record(r, k) for r in found]

    @staticmethod
    def _record(found: Dict[str, Any], k: int) -> Dict[str, Any]:
        return {
            "lat": found["lat"],
            "lon": found["lon"],
            "method": "cluster" if k > 1 else "match",
            "head": None,
            "cell_idx": -1,
            "cell_token": None,
            "cell_prob": None,
            "top_cells": [],
            "confidence": None,
            "neighbours": [
                {
                    "id": m["path"],
                    "similarity": m["similarity"],
                    "lat": m["lat"],
                    "lon": m["lon"],
                    "in_cluster": m["in_cluster"],
                }
                for m in found["matches"]
            ],
        }

    def predict_batch(self, pixels: torch.Tensor, **options: Any) -> List[Dict[str, Any]]:
        """One dict per photo from a batch of transformed photos; options as `predict_from_features`."""
        return self.predict_from_features(self.features(pixels), **options)

    def predict(
        self,
        images: Union[str, Path, Image.Image, np.ndarray, Sequence[Any]],
        *,
        batch_size: int = 32,
        workers: int = 0,
        progress: bool = False,
        **options: Any,
    ) -> List[Dict[str, Any]]:
        """Locate photos given as paths, PIL images or arrays; one dict per photo, in input order."""
        if isinstance(images, (str, Path, Image.Image, np.ndarray)) or not isinstance(images, Sequence):
            images = [images]
        for image in images:
            if isinstance(image, (str, Path)) and not Path(image).is_file():
                raise FileNotFoundError(f"image not found: {image}")
        dataset = PhotoDataset(list(images), self.transform)
        results: List[Optional[Dict[str, Any]]] = [None] * len(dataset)
        with tqdm(total=len(dataset), desc="predict", unit="img", disable=not progress) as bar:
            for batch in photo_batches(dataset, batch_size=batch_size, workers=workers):
                if batch.errors:
                    first = min(batch.errors)
                    raise ValueError(f"{dataset.describe(first)}: {batch.errors[first]}")
                for i, record in zip(batch.indices.tolist(), self.predict_batch(batch.pixels, **options)):
                    results[i] = record
                bar.update(len(batch))
        return results  # type: ignore[return-value]
