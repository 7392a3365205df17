"""Near-duplicate groups of a tagged archive (``geoswc tag --duplicates``): photos whose retrieval embeddings'
cosine similarity reaches a threshold are linked, and the connected components (union-find) with two or more
photos are the groups.

Up to `EXACT_DUPLICATES_MAX` photos the pairs come from a blocked brute-force range search (exact, quadratic in
the number of photos); beyond it from an inverted file (faiss k-means over ``4 sqrt(N)`` lists, each photo
compared with the photos stored in its `DUPLICATE_NPROBE` nearest lists, list by list as matrix products: about
``N^1.5``, approximate; it found the exact groups of 200,000 x 1280 vectors with planted duplicates 12x faster,
docs/performance.md).
"""

from __future__ import annotations

import logging
import time
from typing import Iterable, Optional, Tuple

import numpy as np

from geoswc.data.validation import check_choice
from geoswc.retrieval.topk import import_faiss

logger = logging.getLogger(__name__)


# Cosine similarity from which two archive photos count as near-duplicates (`duplicate_groups`).
DUPLICATE_THRESHOLD = 0.95


DUPLICATE_METHODS = ("auto", "exact", "ivf")


# Archives up to this many photos are compared exactly (every pair); larger ones through inverted lists.
EXACT_DUPLICATES_MAX = 200_000


# Inverted lists each photo is compared with (`duplicate_groups`' ivf method).
DUPLICATE_NPROBE = 16


_BLOCK = 8192


_TRAIN_PER_LIST = 20


_KMEANS_ITERATIONS = 10


_TILE = 4096


_PROBES_PER_PASS = 1 << 24


def _roots(parent: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """The root of each node's set; compresses the nodes' paths on the way."""
    roots = parent[nodes]
    while True:
        up = parent[roots]
        if np.array_equal(up, roots):
            parent[nodes] = roots
            return roots
        roots = up


def _link(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Merge the sets of each pair ``(a[k], b[k])`` of a union-find forest, vectorised.

    ``parent[x] <= x`` throughout, so a set's root is its smallest member (its first photo).
    """
    while len(a):
        ra, rb = _roots(parent, a), _roots(parent, b)
        differ = ra != rb
        if not differ.any():
            return
        low, high = np.minimum(ra[differ], rb[differ]), np.maximum(ra[differ], rb[differ])
        # Several pairs may hook the same root: it takes the smallest; the next round joins the others.
        np.minimum.at(parent, high, low)
        hooked = np.unique(np.concatenate([low, high]))
        while True:  # pointer jumping over the roots just hooked: the new trees become stars
            up = parent[parent[hooked]]
            if np.array_equal(up, parent[hooked]):
                break
            parent[hooked] = up
        a, b = low, high


def _number_groups(parent: np.ndarray) -> np.ndarray:
    """Group ids 1, 2, ... of a union-find forest's sets of two or more, in order of their smallest member."""
    while True:
        up = parent[parent]
        if np.array_equal(up, parent):
            break
        parent = up
    sizes = np.bincount(parent, minlength=len(parent))
    grouped = sizes[parent] >= 2
    groups = np.zeros(len(parent), dtype=np.int64)
    first = np.flatnonzero(grouped & (parent == np.arange(len(parent))))
    groups[grouped] = np.searchsorted(first, parent[grouped]) + 1
    return groups


def _blocks(n: int, block: int) -> Iterable[Tuple[int, int]]:
    for start in range(0, n, block):
        yield start, min(n, start + block)


def _rows(vectors: np.ndarray, rows: np.ndarray | slice) -> np.ndarray:
    """Rows of a (memory-mapped) array as contiguous float32, read in ascending order."""
    return np.ascontiguousarray(vectors[rows], dtype=np.float32)


def _exact_links(vectors: np.ndarray, parent: np.ndarray, cut: float, block: int, progress: bool) -> None:
    """Link every pair at or above ``cut``: all pairs of blocks, compared by matrix product."""
    spans = list(_blocks(len(vectors), block))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(spans) * (len(spans) + 1) // 2, desc="duplicates", unit="block")
    for bi, (a0, a1) in enumerate(spans):
        a = np.asarray(vectors[a0:a1], dtype=np.float32)
        for b0, b1 in spans[bi:]:
            b = a if b0 == a0 else np.asarray(vectors[b0:b1], dtype=np.float32)
            ii, jj = np.nonzero(a @ b.T >= cut)
            if b0 == a0:  # each pair once, no self-pairs
                ii, jj = ii[ii < jj], jj[ii < jj]
            _link(parent, ii + a0, jj + b0)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()


def _ivf_links(
    vectors: np.ndarray,
    parent: np.ndarray,
    cut: float,
    *,
    block: int,
    nlist: Optional[int],
    nprobe: int,
    seed: int,
    progress: bool,
) -> None:
    """Link the pairs at or above ``cut`` that share an inverted list (approximate).

    Spherical k-means (faiss) on a sample gives ``nlist`` centroids; each photo is stored in the list of its
    nearest centroid and probes the lists of its ``nprobe`` nearest, and each list's stored photos are
    compared with every photo probing it by one matrix product. A pair is compared when either photo probes
    the other's list, so both have to fall far from each other's centroids for it to be missed. Memory holds
    the k-means sample (20 rows per list) while it trains, then the centroids, ``N x nprobe`` list numbers and
    one list's rows at a time, never the archive.
    """
    started = time.perf_counter()
    n = len(vectors)
    nlist = min(n, int(nlist) if nlist else max(1, round(4 * np.sqrt(n))))
    nprobe = min(nprobe, nlist)
    quantizer = _train_lists(vectors, nlist, seed)
    trained = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=2 * n, desc="duplicates", unit="photo")
    probes = _probes(vectors, quantizer, nprobe, block, bar)
    assigned = time.perf_counter()
    _link_list_pairs(vectors, parent, cut, probes, nlist, bar)
    if bar is not None:
        bar.close()
    logger.info(
        "near-duplicates of %d photos over %d inverted lists (nprobe %d): k-means %.1f s, assignment %.1f s, "
        "comparison %.1f s",
        n,
        nlist,
        nprobe,
        trained - started,
        assigned - trained,
        time.perf_counter() - assigned,
    )


def _train_lists(vectors: np.ndarray, nlist: int, seed: int):
    """A faiss inner-product index over ``nlist`` spherical k-means centroids of a sample of ``vectors``."""
    faiss = import_faiss("near-duplicate search over large archives")
    n, dim = vectors.shape
    rng = np.random.default_rng(seed)
    sample = _rows(vectors, np.sort(rng.choice(n, size=min(n, _TRAIN_PER_LIST * nlist), replace=False)))
    kmeans = faiss.Kmeans(
        dim,
        nlist,
        niter=_KMEANS_ITERATIONS,
        spherical=True,
        seed=seed,
        min_points_per_centroid=1,
        max_points_per_centroid=len(sample),
    )
    kmeans.train(sample)
    del sample
    quantizer = faiss.IndexFlatIP(dim)
    quantizer.add(kmeans.centroids)
    return quantizer


def _probes(vectors: np.ndarray, quantizer, nprobe: int, block: int, bar) -> np.ndarray:
    """``(N, nprobe)`` int32: the lists each photo probes, nearest first; ``probes[i, 0]`` is the list photo
    ``i`` is stored in."""
    n = len(vectors)
    probes = np.empty((n, nprobe), dtype=np.int32)
    for start, end in _blocks(n, block):
        _, lists = quantizer.search(_rows(vectors, slice(start, end)), nprobe)
        probes[start:end] = np.maximum(lists, 0)  # -1 only for a NaN row, which matches nothing anyway
        if bar is not None:
            bar.update(end - start)
    return probes


def _link_list_pairs(
    vectors: np.ndarray, parent: np.ndarray, cut: float, probes: np.ndarray, nlist: int, bar
) -> None:
    """Compare each list's stored photos with the photos probing it, and link the pairs at or above ``cut``."""
    n = len(vectors)
    stored = probes[:, 0]
    # Lists are visited in ranges whose probes fit ~2^24 entries, so no N x nprobe index array is built.
    counts = np.bincount(probes.ravel(), minlength=nlist)
    range_starts = [0]
    total = 0
    for lst, count in enumerate(counts.tolist()):
        if total and total + count > _PROBES_PER_PASS:
            range_starts.append(lst)
            total = 0
        total += count
    range_starts.append(nlist)
    for lo, hi in zip(range_starts[:-1], range_starts[1:]):
        rows_parts, lists_parts = [], []
        for r0, r1 in _blocks(n, 1 << 20):
            chunk = probes[r0:r1]
            chunk_rows, chunk_cols = np.nonzero((chunk >= lo) & (chunk < hi))
            rows_parts.append(chunk_rows + r0)
            lists_parts.append(chunk[chunk_rows, chunk_cols])
        rows, probe_lists = np.concatenate(rows_parts), np.concatenate(lists_parts)
        order = np.argsort(probe_lists, kind="stable")  # by list, rows ascending within a list
        rows, probe_lists = rows[order], probe_lists[order]
        probe_bounds = np.searchsorted(probe_lists, np.arange(lo, hi + 1))
        members = np.flatnonzero((stored >= lo) & (stored < hi))
        member_lists = stored[members]
        order = np.argsort(member_lists, kind="stable")
        members, member_lists = members[order], member_lists[order]
        member_bounds = np.searchsorted(member_lists, np.arange(lo, hi + 1))
        for k in range(hi - lo):
            listed = members[member_bounds[k] : member_bounds[k + 1]]
            probing = rows[probe_bounds[k] : probe_bounds[k + 1]]
            _link_block_pairs(vectors, parent, cut, listed, probing)
            if bar is not None:
                bar.update(len(listed))


def _link_block_pairs(
    vectors: np.ndarray, parent: np.ndarray, cut: float, listed: np.ndarray, probing: np.ndarray
) -> None:
    """Link every pair (a photo of ``probing``, a photo of ``listed``) at or above ``cut``, tile by tile."""
    for m0, m1 in _blocks(len(listed), _TILE):
        m = listed[m0:m1]
        xm = _rows(vectors, m)
        for p0, p1 in _blocks(len(probing), _TILE):
            p = probing[p0:p1]
            ii, jj = np.nonzero(_rows(vectors, p) @ xm.T >= cut)
            a, b = p[ii], m[jj]
            other = a != b
            _link(parent, a[other], b[other])


def duplicate_groups(
    vectors: np.ndarray,
    *,
    threshold: float = DUPLICATE_THRESHOLD,
    method: str = "auto",
    block: int = _BLOCK,
    nlist: Optional[int] = None,
    nprobe: int = DUPLICATE_NPROBE,
    seed: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """Near-duplicate group of each of ``N`` L2-normalised vectors.

    Two photos are linked when their cosine similarity is at least ``threshold``; a group is a connected
    component of two or more photos (so a chain of near-duplicates is one group).

    Args:
        vectors: ``(N, D)`` L2-normalised (float16 or float32; a memory map is read block by block).
        threshold: cosine similarity from which two photos are linked, in (0, 1].
        method: ``"exact"`` compares every pair (quadratic in ``N``); ``"ivf"`` compares the pairs that share
            an inverted list (faiss k-means; about ``N^1.5``, approximate); ``"auto"`` is exact up to
            `EXACT_DUPLICATES_MAX` photos, ivf beyond.
        block: rows per block read from ``vectors``.
        nlist: inverted lists of the ivf method (default ``4 sqrt(N)``).
        nprobe: lists each photo is compared with by the ivf method (more: fewer missed pairs, slower).
        seed: the ivf method's k-means sample and initialisation.
        progress: show a progress bar.

    Returns:
        ``(N,)`` int64: group ids 1, 2, ... numbered in the order of each group's first photo; 0 for a photo
        in no group.

    Raises:
        ValueError: ``threshold`` outside (0, 1], an unknown ``method``, or ``nprobe``/``nlist``/``block``
            below 1.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"duplicate threshold must lie in (0, 1], got {threshold}")
    check_choice("duplicate method", method, DUPLICATE_METHODS)
    for name, value in (("nprobe", nprobe), ("block", block), ("nlist", 1 if nlist is None else nlist)):
        if int(value) < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    n = len(vectors)
    parent = np.arange(n)
    # Float16 rounding can put a vector's similarity with an exact copy of itself a hair under 1.
    cut = threshold - 1e-3 if threshold >= 1.0 else threshold
    if method == "auto":
        method = "exact" if n <= EXACT_DUPLICATES_MAX else "ivf"
    if method == "exact":
        _exact_links(vectors, parent, cut, int(block), progress)
    elif n >= 2:
        _ivf_links(
            vectors,
            parent,
            cut,
            block=int(block),
            nlist=nlist,
            nprobe=int(nprobe),
            seed=seed,
            progress=progress,
        )
    return _number_groups(parent)
