"""Adaptive S2 partitions of the Earth into geographic cells (paper section 3.1): the splitting rules.

`S2Partitioner` fits the partitions of a `Geocells` to photo positions with one of two rules over the S2
hierarchy (the GeoEstimation rule, one partition per ``max_images`` value, or the PlaNet rule, split the most
populated cell until ``target_cells`` exist; see `geoswc.geocells.partition`). Everything works on the sorted
leaf ids of the photos: a cell is a contiguous range of leaf ids, so counting the photos of any candidate cell
is two binary searches, and its centre the difference of two prefix sums of unit vectors.
"""

from __future__ import annotations

import heapq
import logging
from typing import Sequence, Tuple, Union

import numpy as np

from geoswc.data.validation import check_choice
from geoswc.geocells import s2 as gs2
from geoswc.geocells.partition import Geocells, Partition, xyz_to_latlng_deg

logger = logging.getLogger(__name__)


class S2Partitioner:
    """Builds adaptive S2 partitions from photo positions (scikit-learn style).

    Args:
        min_images: Cells with ``<= min_images`` photos are deleted (their photos get no label).
        max_images: One partition per value by the GeoEstimation rule: cells with more photos are split.
            May be empty when ``target_cells`` is given.
        start_level: S2 level of the initial cells.
        target_cells: If set, add one partition per value by the PlaNet rule (split the most populated cell
            until at least this many cells exist; each split adds up to three cells, so the result has at most
            ``target + 2`` cells). Named ``cells_<min>_n<target>``.
        fallback: Hierarchy rule for fine cells without a containing coarse cell, see `Geocells`.

    All partitions are ordered coarse -> fine by their number of cells; the finest one defines the fine
    classes. The usual combinations are ``max_images=(5000, 2000, 1000)`` (hierarchical heads) and
    ``max_images=(), target_cells=32000`` (one partition for the CE or MvMF head); mixing both puts the
    target partition wherever its cell count falls, with the hierarchy found by containment.

    Attributes:
        geocells_: The fitted `Geocells`.
        n_images_: Number of photos `fit` was given.
    """

    def __init__(
        self,
        min_images: int = 50,
        max_images: Sequence[int] = (5000, 2000, 1000),
        start_level: int = 2,
        target_cells: Union[None, int, Sequence[int]] = None,
        fallback: str = "none",
    ):
        self.min_images = min_images
        self.max_images = max_images
        self.start_level = start_level
        self.target_cells = target_cells
        self.fallback = fallback

    def _validated(self) -> Tuple[int, Tuple[int, ...], int, Tuple[int, ...]]:
        min_images = int(self.min_images)
        if min_images < 0:
            raise ValueError(f"min_images must be >= 0, got {self.min_images!r}")
        max_values = (
            ()
            if self.max_images is None
            else ((self.max_images,) if np.isscalar(self.max_images) else tuple(self.max_images))
        )
        max_values = tuple(int(m) for m in max_values)
        for m in max_values:
            if m <= min_images:
                raise ValueError(f"max_images {m} must be larger than min_images {min_images}")
        targets = (
            ()
            if self.target_cells is None
            else ((self.target_cells,) if np.isscalar(self.target_cells) else tuple(self.target_cells))
        )
        targets = tuple(int(t) for t in targets)
        for t in targets:
            if t < 1:
                raise ValueError(f"target_cells must be >= 1, got {t}")
        if not max_values and not targets:
            raise ValueError("give at least one max_images value or a target_cells value")
        if len(set(max_values)) != len(max_values) or len(set(targets)) != len(targets):
            raise ValueError(f"duplicate granularity in max_images={max_values} / target_cells={targets}")
        if not 0 <= int(self.start_level) <= gs2.MAX_LEVEL:
            raise ValueError(f"start_level {self.start_level!r} is outside [0, {gs2.MAX_LEVEL}]")
        check_choice("hierarchy fallback", self.fallback, Geocells.FALLBACKS)
        return min_images, max_values, int(self.start_level), targets

    def fit(self, lat, lon) -> "S2Partitioner":
        """Partition the Earth for photos at ``lat``/``lon`` (degrees); sets ``geocells_``."""
        min_images, max_values, start_level, targets = self._validated()
        lat = np.asarray(lat, dtype=np.float64).reshape(-1)
        lon = np.asarray(lon, dtype=np.float64).reshape(-1)
        if lat.size == 0:
            raise ValueError("no coordinates to partition")
        leaves, xyz = gs2.latlng_to_cell_id_and_xyz(lat, lon)
        order = np.argsort(leaves)
        sorted_leaves = leaves[order]
        del leaves
        # Prefix sums of the unit vectors in leaf order: the vector sum of any cell (a contiguous range of
        # sorted leaves) is then one subtraction. The absolute error, about 1e-9 after millions of photos,
        # moves a centre of a 50-photo cell by well under a millimetre.
        prefix_xyz = np.zeros((lat.size + 1, 3), dtype=np.float64)
        for k in range(3):
            np.cumsum(np.take(xyz[:, k], order), out=prefix_xyz[1:, k])
        del xyz, order
        start = _unique_sorted(gs2.cell_id_parent(sorted_leaves, start_level))

        built = []
        for m in max_values:
            cells = _split_by_max(sorted_leaves, start, min_images=min_images, max_images=m)
            built.append((f"cells_{min_images}_{m}", cells))
        for t in targets:
            cells = _split_to_target(sorted_leaves, start, min_images=min_images, target_cells=t)
            built.append((f"cells_{min_images}_n{t}", cells))

        partitions = []
        for name, cells in built:
            if cells.size == 0:
                raise ValueError(
                    f"{name}: no cell holds more than min_images={min_images} of the {lat.size} photos"
                )
            partitions.append(
                _partition_from_cells(name, cells, sorted_leaves, prefix_xyz, num_images=lat.size)
            )
            logger.info(
                "%s: %d cells, %d of %d photos", name, len(cells), partitions[-1].counts.sum(), lat.size
            )
        partitions.sort(key=len)
        settings = {
            "min_images": min_images,
            "max_images": list(max_values),
            "start_level": start_level,
            "target_cells": list(targets) or None,
            "num_images": int(lat.size),
        }
        self.n_images_ = int(lat.size)
        self.geocells_ = Geocells(partitions, fallback=self.fallback, settings=settings)
        return self


def _unique_sorted(values: np.ndarray) -> np.ndarray:
    if values.size == 0:
        return values
    keep = np.empty(values.size, dtype=bool)
    keep[0] = True
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    return values[keep]


def _count(sorted_leaves: np.ndarray, cells: np.ndarray) -> np.ndarray:
    lo, hi = gs2.cell_id_range(cells)
    return np.searchsorted(sorted_leaves, hi, side="right") - np.searchsorted(sorted_leaves, lo, side="left")


def _split_by_max(
    sorted_leaves: np.ndarray, start: np.ndarray, *, min_images: int, max_images: int
) -> np.ndarray:
    """GeoEstimation rule, level by level. A cell with <= min_images is never split (min < max), so
    dropping small cells at every level equals dropping them before and after the splitting."""
    final = []
    cells = start
    level = int(gs2.cell_id_level(start[:1])[0]) if start.size else 0
    while cells.size:
        counts = _count(sorted_leaves, cells)
        keep = counts > min_images
        cells, counts = cells[keep], counts[keep]
        split = counts > max_images if level < gs2.MAX_LEVEL else np.zeros(len(cells), dtype=bool)
        final.append(cells[~split])
        cells = gs2.cell_id_children(cells[split]).reshape(-1)
        level += 1
    return np.sort(np.concatenate(final)) if final else np.empty(0, dtype=np.uint64)


def _split_to_target(
    sorted_leaves: np.ndarray, start: np.ndarray, *, min_images: int, target_cells: int
) -> np.ndarray:
    """PlaNet rule: split the most populated cell until ``target_cells`` cells exist.

    Children with <= min_images photos are deleted. A cell none of whose children would survive (or a leaf
    cell) is kept whole and not tried again. Ties in the count are broken by the smaller cell id.
    """
    counts = _count(sorted_leaves, start)
    keep = counts > min_images
    heap = [(-int(c), int(cid)) for cid, c in zip(start[keep].tolist(), counts[keep].tolist())]
    heapq.heapify(heap)
    done = []
    n_cells = len(heap)
    while n_cells < target_cells and heap:
        neg_count, cid = heapq.heappop(heap)
        lsb = cid & -cid
        if lsb == 1:
            done.append(cid)
            continue
        child_lsb = lsb >> 2
        children = [cid - lsb + child_lsb * (2 * k + 1) for k in range(4)]
        lo = np.array([c - child_lsb + 1 for c in children], dtype=np.uint64)
        hi = np.array([c + child_lsb - 1 for c in children], dtype=np.uint64)
        child_counts = np.searchsorted(sorted_leaves, hi, side="right") - np.searchsorted(sorted_leaves, lo)
        survivors = [(int(n), c) for n, c in zip(child_counts.tolist(), children) if n > min_images]
        if not survivors:
            done.append(cid)
            continue
        for n, c in survivors:
            heapq.heappush(heap, (-n, c))
        n_cells += len(survivors) - 1
    if n_cells < target_cells:
        logger.warning(
            "only %d cells can be made with min_images=%d (target %d)", n_cells, min_images, target_cells
        )
    cells = np.array([c for _, c in heap] + done, dtype=np.uint64)
    return np.sort(cells)


def _partition_from_cells(
    name: str, cells: np.ndarray, sorted_leaves: np.ndarray, prefix_xyz: np.ndarray, *, num_images: int
) -> Partition:
    """Counts and spherical-mean centres of sorted disjoint ``cells``."""
    lo, hi = gs2.cell_id_range(cells)
    first = np.searchsorted(sorted_leaves, lo, side="left")
    end = np.searchsorted(sorted_leaves, hi, side="right")
    sums = prefix_xyz[end] - prefix_xyz[first]
    return Partition(
        cells, counts=end - first, centers_deg=xyz_to_latlng_deg(sums), name=name, num_images=num_images
    )
