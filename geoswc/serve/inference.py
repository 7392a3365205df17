"""The model's side of serving: one batch of photos, from any number of requests, through the backbone, the
heads and the search (`run_batch`, called by the `DynamicBatcher`'s single thread, the model's only caller)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from geoswc.geolocator import Geolocator
from geoswc.street.predictor import StreetGeolocator
from geoswc.tagging.run import with_cell_centres

__all__ = ["LocateJob", "LocateOptions", "batch_bucket", "batch_runner"]


@dataclass(frozen=True)
class LocateOptions:
    """The options of one request; photos with equal options are located together."""

    head: Optional[str]
    mode: str
    top_k: int
    area: Optional[Tuple[float, float, float, float]]
    # A street-scale model's clustering of the first k matches (None: its defaults, the first match).
    k: Optional[int] = None
    eps_m: Optional[float] = None

    def kwargs(self) -> Dict[str, Any]:
        out = {"head": self.head, "mode": self.mode, "top_k": self.top_k, "area": self.area}
        out.update(
            {name: value for name, value in (("k", self.k), ("eps_m", self.eps_m)) if value is not None}
        )
        return out


@dataclass
class LocateJob:
    """One photo's model input and its request's options."""

    pixels: torch.Tensor
    options: LocateOptions


def batch_bucket(n: int, max_batch: int) -> int:
    """The batch size ``n`` photos are padded to: the next power of two, at most ``max_batch`` (and never
    below ``n``)."""
    size = 1
    while size < n:
        size *= 2
    return max(n, min(size, max_batch))


def _features(model: Geolocator, jobs: List[LocateJob], pad_to: Optional[int]) -> List[torch.Tensor]:
    """Backbone features of every job: one forward pass per input shape."""
    features: List[Optional[torch.Tensor]] = [None] * len(jobs)
    by_shape: Dict[tuple, List[int]] = defaultdict(list)
    for i, job in enumerate(jobs):
        by_shape[tuple(job.pixels.shape)].append(i)
    for members in by_shape.values():
        pixels = torch.stack([jobs[i].pixels for i in members])
        if pad_to is not None:
            # On a GPU every new batch size costs a one-time kernel selection (seconds for a large
            # backbone): batches are padded to a power of two so that only a handful of sizes occur.
            size = batch_bucket(len(members), pad_to)
            pixels = torch.cat([pixels, pixels.new_zeros((size - len(members), *pixels.shape[1:]))])
        feats = model.features(pixels)
        for row, i in enumerate(members):
            features[i] = feats[row]
    return features  # type: ignore[return-value]


def batch_runner(model: Geolocator, max_batch: int) -> Callable[[List[LocateJob]], List[Any]]:
    """The function a `DynamicBatcher` calls with a batch of jobs: one record (or exception) per job."""
    pad_to = max_batch if model.device.type == "cuda" else None

    def run_batch(jobs: List[LocateJob]) -> List[Any]:
        results: List[Any] = [None] * len(jobs)
        features = _features(model, jobs, pad_to)
        by_options: Dict[LocateOptions, List[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            by_options[job.options].append(i)
        for options, members in by_options.items():
            try:
                stacked = torch.stack([features[i] for i in members])
                if isinstance(model, StreetGeolocator):
                    records = model.predict_from_features(stacked, **options.kwargs())
                else:
                    records = with_cell_centres(
                        model, model.locate(stacked, **options.kwargs()).to_records(model)
                    )
                for i, record in zip(members, records):
                    results[i] = record
            except Exception as err:  # these photos' options failed; the rest of the batch stands
                for i in members:
                    results[i] = err
        return results

    return run_batch
