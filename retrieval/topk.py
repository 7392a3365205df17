"""Global top-k search over a whole background: exact (numpy, streamed in chunks), binary sign codes
(Hamming distance by popcount) and FAISS indexes (flat, IVF, SQ8, PQ), with the faiss import guard.

The numpy paths are the fallback when faiss is not installed and the brute-force reference the approximate
modes are measured against (`recall_at_k`).
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from geoswc.data.validation import choice_error

logger = logging.getLogger(__name__)

SEARCH_MODES = ("flat", "ivf", "sq8", "pq", "binary")
FAISS_INSTALL = 'pip install "geoswc[faiss]"  (or: pip install faiss-cpu)'
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def faiss_missing(purpose: str = "this search mode") -> ImportError:
    """The error for ``purpose`` needing faiss where it is not installed, with the install command."""
    return ImportError(f"{purpose} needs faiss, which is not installed; run: {FAISS_INSTALL}")


def import_faiss(purpose: str = "this search mode"):
    """Import faiss or raise `faiss_missing` (``"<purpose> needs faiss, …; run: pip install …"``)."""
    try:
        import faiss
    except ImportError as err:
        raise faiss_missing(purpose) from err
    return faiss


def faiss_available() -> bool:
    """Whether faiss can be imported."""
    try:
        import_faiss()
    except ImportError:
        return False
    return True


def is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def default_pq_m(dim: int) -> int:
    """Largest divisor of ``dim`` giving sub-vectors of at least 16 dimensions (at most dim / 16 sub-quantisers:
    80 bytes a row for 1280-d embeddings, half the 1-bit codes), the usual faiss trade-off."""
    for m in range(max(1, dim // 16), 0, -1):
        if dim % m == 0:
            return m
    return 1


def merge_topk(sims, rows, k):
    """Top-k of each row of candidate lists (Q, C) -> (Q, k), best first; works on numpy and torch."""
    if is_torch(sims):
        top_sims, pos = torch.topk(sims, k, dim=1)
        return top_sims, torch.gather(rows, 1, pos)
    pos = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, pos, axis=1), np.take_along_axis(rows, pos, axis=1)


def brute_force_topk(embeddings, queries, k, chunk_size):
    """Exact top-k inner product over all rows, streaming the rows in chunks (numpy)."""
    q = len(queries)
    best_sims = np.full((q, k), -np.inf, dtype=np.float32)
    best_rows = np.full((q, k), -1, dtype=np.int64)
    for start in range(0, len(embeddings), chunk_size):
        block = np.asarray(embeddings[start : start + chunk_size], dtype=np.float32)
        scores = queries @ block.T
        cand_sims = np.concatenate([best_sims, scores], axis=1)
        cand_rows = np.concatenate(
            [best_rows, np.broadcast_to(start + np.arange(len(block)), scores.shape)], axis=1
        )
        kk = min(k, cand_sims.shape[1])
        part = np.argpartition(-cand_sims, kk - 1, axis=1)[:, :kk]
        best_sims = np.take_along_axis(cand_sims, part, axis=1)
        best_rows = np.take_along_axis(cand_rows, part, axis=1)
    order = np.argsort(-best_sims, axis=1, kind="stable")
    return np.take_along_axis(best_sims, order, axis=1), np.take_along_axis(best_rows, order, axis=1)


def sign_codes(x: np.ndarray) -> np.ndarray:
    """1 bit per dimension (positive -> 1), packed into bytes; the padding bits of D % 8 are zero."""
    return np.packbits(np.asarray(x) > 0, axis=1)


def binary_topk(codes, query_codes, k, dim):
    """Exact Hamming top-k with numpy popcount; sims = 1 - 2 * hamming / dim."""
    q = len(query_codes)
    kk = min(k, len(codes))
    sims = np.full((q, k), -np.inf, dtype=np.float32)
    rows = np.full((q, k), -1, dtype=np.int64)
    if kk == 0:
        return sims, rows
    for i in range(q):
        dist = _POPCOUNT[np.bitwise_xor(codes, query_codes[i])].sum(axis=1, dtype=np.int64)
        top = np.argpartition(dist, kk - 1)[:kk]
        top = top[np.lexsort((top, dist[top]))]
        rows[i, :kk] = top
        sims[i, :kk] = 1.0 - 2.0 * dist[top] / dim
    return sims, rows


def recall_at_k(approx_rows: np.ndarray, exact_rows: np.ndarray) -> float:
    """Mean fraction of the exact top-k rows that the approximate top-k also returns."""
    hits = [
        len(set(a[a >= 0]) & set(e[e >= 0])) / max(1, (e >= 0).sum()) for a, e in zip(approx_rows, exact_rows)
    ]
    return float(np.mean(hits)) if hits else 0.0


def faiss_factory(
    mode: str, n: int, dim: int, *, nlist: Optional[int], pq_m: Optional[int], pq_bits: int, train_size: int
) -> str:
    """The ``faiss.index_factory`` string of a float search mode (``flat``, ``ivf``, ``sq8``, ``pq``) for ``n``
    rows of ``dim`` dimensions.

    Raises:
        ValueError: ``pq_m`` does not divide ``dim``, or an unknown mode.
    """
    if mode == "flat":
        return "Flat"
    if mode == "ivf":
        nlist = int(nlist or max(1, min(65536, int(4 * np.sqrt(max(n, 1))))))
        return f"IVF{nlist},Flat"
    if mode == "sq8":
        return "SQ8"
    if mode == "pq":
        m = int(pq_m or default_pq_m(dim))
        if dim % m:
            raise ValueError(f"pq_m={m} must divide the dimension {dim}")
        bits = int(pq_bits)
        if min(n, train_size) < 2**bits:
            # k-means cannot fit more centroids than training rows: fewer bits for a small background.
            bits = max(1, int(np.log2(max(min(n, train_size), 2))))
            logger.warning(
                "pq: %d training rows, %d-bit codes instead of %d", min(n, train_size), bits, pq_bits
            )
        # "np": no polysemous training, which only serves Hamming-filtered search and costs minutes.
        return f"PQ{m}x{bits}np"
    raise choice_error("search mode", mode, SEARCH_MODES)


def build_faiss_index(embeddings, factory: str, *, chunk_size: int, train_size: int, seed: int, desc: str):
    """A faiss inner-product index of ``factory``, trained on a seeded sample of at most ``train_size`` rows
    when it needs training, holding all rows of ``embeddings`` (added ``chunk_size`` at a time)."""
    faiss = import_faiss()
    n, dim = embeddings.shape
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=min(n, train_size), replace=False))
        index.train(np.ascontiguousarray(embeddings[sample], dtype=np.float32))
    for start in tqdm(range(0, n, chunk_size), desc=desc, disable=n < 4 * chunk_size):
        index.add(np.ascontiguousarray(embeddings[start : start + chunk_size], dtype=np.float32))
    return index
