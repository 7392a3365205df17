"""Raw-pixel matching: the floor any learned place-recognition descriptor has to clear.

Every photo becomes a 32 x 24 grey thumbnail (Pillow's antialiased bilinear resize of the luminance), minus
its mean and divided by its norm; the inner product of two such vectors is the normalised cross-correlation
(Pearson correlation) of the thumbnails, and a query goes to the database photo it correlates with best.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from geoswc.data.images import ImageDecodeError
from geoswc.data.vpr import POSITIVE_RADIUS_M, read_split
from geoswc.eval.vpr import DEFAULT_RECALLS, recall_at

PIXEL_SIZE = (32, 24)  # (width, height)


def pixel_descriptors(paths: Sequence[Union[str, Path]], size: Tuple[int, int] = PIXEL_SIZE) -> np.ndarray:
    """``(N, width * height)`` zero-mean, unit-norm grey thumbnails of the photos at ``paths``."""
    out = np.zeros((len(paths), int(size[0]) * int(size[1])), np.float32)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                grey = image.convert("L").resize((int(size[0]), int(size[1])), Image.BILINEAR)
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageDecodeError(
                f"unreadable image ({type(err).__name__}: {err})", source=str(path)
            ) from None
        x = np.asarray(grey, dtype=np.float64).ravel()
        x = x - x.mean()
        out[i] = x / max(float(np.linalg.norm(x)), 1e-12)
    return out


def pixel_ranking(queries: np.ndarray, database: np.ndarray, k: int) -> np.ndarray:
    """``(Q, k)`` database rows by decreasing correlation (stable on ties)."""
    sims = queries.astype(np.float64) @ database.astype(np.float64).T
    return np.argsort(-sims, axis=1, kind="stable")[:, : min(int(k), database.shape[0])]


def pixel_recalls(
    root: Union[str, Path],
    split: str = "test",
    *,
    recalls: Sequence[int] = DEFAULT_RECALLS,
    radius_m: float = POSITIVE_RADIUS_M,
    size: Tuple[int, int] = PIXEL_SIZE,
) -> Dict[str, float]:
    """recall@N (percent) of raw-pixel matching on ``ROOT/images/SPLIT``, keys ``recall@N``."""
    data = read_split(root, split, radius_m=radius_m)
    database = pixel_descriptors([data.folder / p for p in data.database], size)
    queries = pixel_descriptors([data.folder / p for p in data.queries], size)
    ranking = pixel_ranking(queries, database, max(int(n) for n in recalls))
    found = recall_at(ranking, data.positives(radius_m), recalls)
    return {f"recall@{n}": value for n, value in found.items()}
