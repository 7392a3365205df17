"""The evaluation store: what the backbone and the networks computed for the test photos of one
``geoswc evaluate`` run, kept in ``OUT/store/`` so that ``geoswc sweep`` re-runs the stages that follow
without the backbone.

It holds the backbone features (float16), every head's best fine cells, its own prediction and its prediction
density, and the retrieval embeddings (float32, the values the searches ran on), with the ground truth and the
model's partition fingerprint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import pandas as pd
import torch

from geoswc.data.files import read_json_object
from geoswc.eval.selective import DENSITY_SCALES_KM, prediction_density
from geoswc.folder_checks import naming

STORE_DIR = "store"
STORE_VERSION = 1
# Best fine cells kept per head and photo: enough for any top-n scope a sweep asks for.
STORE_TOP_CELLS = 32
# Photos per search call, as `geoswc.evaluation.run` has always located them (the searches' matrix shapes, and so
# their floating-point results, depend on it).
LOCATE_CHUNK = 1024


@dataclass
class HeadOutputs:
    """What one head said about the evaluated photos.

    Attributes:
        top_cells: ``(n, T)`` its best fine cells, best first.
        top_probs: ``(n, T)`` their probabilities.
        latlon_deg: ``(n, 2)`` its own prediction (cell centre, or the MvMF mean).
        density: ``(n, S)`` prediction density at `DENSITY_SCALES_KM`.
    """

    top_cells: np.ndarray
    top_probs: np.ndarray
    latlon_deg: np.ndarray
    density: np.ndarray


@dataclass
class EvalStore:
    """The evaluation store of one ``geoswc evaluate`` run (``OUT/store``).

    Attributes:
        ids: every ground-truth photo, in metadata order; ``truth_deg`` ``(N, 2)`` their positions.
        evaluated: ``(N,)`` bool, the photos that could be read (the rows of the arrays below).
        features: ``(n, D)`` float16 backbone features; ``embeddings`` ``(n, E)`` float32 retrieval embeddings
            (None without a retrieval module).
        heads: ``{kind: HeadOutputs}``.
        meta: ``fingerprint``, ``model``, ``settings`` (the Search within Cell settings evaluate used),
            ``density_scales_km``, ``preferred_head``, ``format_version``.
    """

    ids: List[str]
    truth_deg: np.ndarray
    evaluated: np.ndarray
    features: Optional[np.ndarray]
    embeddings: Optional[np.ndarray]
    heads: Dict[str, HeadOutputs]
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def evaluated_ids(self) -> List[str]:
        return [i for i, ok in zip(self.ids, self.evaluated) if ok]

    def truth_frame(self) -> pd.DataFrame:
        """The ground truth as ``IMG_ID, LAT, LON``."""
        return pd.DataFrame({"IMG_ID": self.ids, "LAT": self.truth_deg[:, 0], "LON": self.truth_deg[:, 1]})

    def save(self, folder: Union[str, Path]) -> Path:
        """Write the store into ``folder`` (created)."""
        folder = Path(folder)
        (folder / "heads").mkdir(parents=True, exist_ok=True)
        (folder / "ids.txt").write_text("".join(f"{i}\n" for i in self.ids))
        np.save(folder / "truth_latlon.npy", np.asarray(self.truth_deg, dtype=np.float64))
        np.save(folder / "evaluated.npy", np.asarray(self.evaluated, dtype=bool))
        if self.features is not None:
            np.save(folder / "features.npy", np.asarray(self.features, dtype=np.float16))
        if self.embeddings is not None:
            np.save(folder / "embeddings.npy", np.asarray(self.embeddings, dtype=np.float32))
        for kind, head in self.heads.items():
            np.save(folder / "heads" / f"{kind}_top_cells.npy", head.top_cells.astype(np.int32))
            np.save(folder / "heads" / f"{kind}_top_probs.npy", head.top_probs.astype(np.float32))
            np.save(folder / "heads" / f"{kind}_latlon.npy", head.latlon_deg.astype(np.float64))
            np.save(folder / "heads" / f"{kind}_density.npy", head.density.astype(np.float64))
        meta = dict(self.meta, format_version=STORE_VERSION, heads=list(self.heads))
        (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: Union[str, Path]) -> "EvalStore":
        """Read a store written by `save`; ``folder`` may also be the evaluation folder holding ``store/``.

        Raises:
            FileNotFoundError: no store there.
            ValueError: a file disagrees with the others or with ``meta.json``.
        """
        folder = Path(folder)
        if not (folder / "meta.json").is_file() and (folder / STORE_DIR / "meta.json").is_file():
            folder = folder / STORE_DIR
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"no evaluation store at {folder} (missing meta.json); run geoswc evaluate -o DIR first and "
                "give DIR"
            )
        meta = read_json_object(meta_path)
        if meta.get("format_version", 0) > STORE_VERSION:
            raise ValueError(
                f"{meta_path}: format_version {meta['format_version']} is newer than this geoswc reads "
                f"({STORE_VERSION})"
            )
        ids = (folder / "ids.txt").read_text().split("\n")
        if ids and ids[-1] == "":
            ids.pop()
        with naming(folder / "truth_latlon.npy"):
            truth = np.load(folder / "truth_latlon.npy")
        with naming(folder / "evaluated.npy"):
            evaluated = np.load(folder / "evaluated.npy")
        if truth.shape != (len(ids), 2) or evaluated.shape != (len(ids),):
            raise ValueError(
                f"{folder}: {len(ids)} ids, but truth_latlon.npy is {truth.shape} and evaluated.npy "
                f"{evaluated.shape}"
            )
        n = int(evaluated.sum())

        def optional(name: str, mmap: bool = False) -> Optional[np.ndarray]:
            path = folder / name
            if not path.is_file():
                return None
            with naming(path):
                array = np.load(path, mmap_mode="r" if mmap else None)
            if len(array) != n:
                raise ValueError(f"{path}: {len(array)} rows, but {n} photos were evaluated")
            return array

        heads = {}
        for kind in meta.get("heads", []):
            parts = [
                optional(f"heads/{kind}_{name}.npy")
                for name in ("top_cells", "top_probs", "latlon", "density")
            ]
            if any(p is None for p in parts):
                raise FileNotFoundError(f"{folder / 'heads'}: the outputs of head {kind!r} are incomplete")
            heads[kind] = HeadOutputs(parts[0].astype(np.int64), *parts[1:])
        embeddings = optional("embeddings.npy")
        return cls(
            ids=ids,
            truth_deg=truth,
            evaluated=evaluated,
            features=optional("features.npy", mmap=True),
            embeddings=None if embeddings is None else np.asarray(embeddings, dtype=np.float32),
            heads=heads,
            meta=meta,
        )


def head_cells(model, kind: str):
    """The partition whose cells head ``kind`` predicts (the finest for a model of one partition)."""
    own = getattr(model, "head_partition", None)
    return own(kind) if own is not None else model.geocells.fine


def search_partition(model, kind: str) -> Optional[str]:
    """The partition to name when searching the index within head ``kind``'s cells: None when the index rows
    are sorted by that partition (the only case for a model of one partition)."""
    own = head_cells(model, kind).name
    index_own = getattr(model.index, "partition", None) or model.geocells.fine.name
    return None if own == index_own else own


def head_outputs(
    model, features: torch.Tensor, kind: str, *, top_cells: int = STORE_TOP_CELLS
) -> HeadOutputs:
    """A head's best cells, own prediction and prediction density for backbone features.

    The best cells and the prediction are those `Geolocator.locate` gives (its ``cell`` mode); the density is
    taken over all fine cells (`geoswc.eval.selective.prediction_density`).
    """
    cells = head_cells(model, kind)
    n_top = min(top_cells, len(cells))
    parts = []
    head = model.heads[kind]
    centers = np.asarray(cells.centers_deg, dtype=np.float64)
    for start in range(0, len(features), LOCATE_CHUNK):
        chunk = features[start : start + LOCATE_CHUNK]
        pred = model.locate(chunk, head=kind, mode="cell", top_k=n_top)
        with torch.inference_mode():
            log_probs = head.fine_log_probs(head(chunk.to(model.device))).float()
            probs = torch.softmax(log_probs, dim=1).cpu().numpy()
        density = prediction_density(probs, centers, best=pred.top_cells[:, 0])
        parts.append((pred.top_cells, pred.top_probs, pred.latlon_deg, density))
    if not parts:
        return HeadOutputs(
            np.zeros((0, n_top), np.int64),
            np.zeros((0, n_top)),
            np.zeros((0, 2)),
            np.zeros((0, len(DENSITY_SCALES_KM))),
        )
    return HeadOutputs(*(np.concatenate(arrays) for arrays in zip(*parts)))
