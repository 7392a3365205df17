"""Searching a tagged archive by picture: the embeddings a tag run keeps, near-duplicate groups, and
``geoswc similar`` (the archive use case of ``004_…`` in ../shared/papers: find a postcard's other scans and
views among millions).

A ``geoswc tag`` run over a model with a retrieval module keeps each photo's retrieval embedding (the
L2-normalised vector Search within Cell compares, paper section 3.3) beside its output ``OUT``:

* ``OUT.embeddings.npy``: ``(N, D)`` float16, opened memory-mapped, so a search reads no more than it needs;
* ``OUT.embeddings.json``: the path of each row (as the output names the photo), ``D``, ``N`` and the
  fingerprint of the weights that made them (`embedding_fingerprint`).

While a run goes on, each rank appends to its own journal (``OUT.embeddings-<rank>.f16``: raw float16 rows;
``OUT.embeddings-<rank>.paths``: one JSON string per line), written before the photo's output row, so every
row on disk has its embedding. At the end rank 0 writes the two final files from the earlier final files
and all journals in the output's row order (`finalize_embeddings`), then deletes the journals; a killed run
leaves its journals, and ``--resume`` folds them in. Float16 keeps cosine similarities to ~1e-3.

Near-duplicates (`duplicate_groups`): photos whose cosine similarity reaches a threshold are linked, and the
connected components (union-find) with two or more photos are the groups. Up to `EXACT_DUPLICATES_MAX` photos
the pairs come from a blocked brute-force range search (exact, quadratic in the number of photos); beyond it
from an inverted file (faiss k-means over ``4 sqrt(N)`` lists, each photo compared with the photos stored in its
`DUPLICATE_NPROBE` nearest lists, list by list as matrix products: about ``N^1.5``, approximate; it found the
exact groups of 200,000 x 1280 vectors with planted duplicates 12x faster, docs/performance.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from geoswc.data.files import atomic_path
from geoswc.tagging.output import os_errors

logger = logging.getLogger(__name__)

EMBEDDINGS_VERSION = 1
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


def embeddings_path(output: str) -> str:
    return f"{output}.embeddings.npy"


def embeddings_meta_path(output: str) -> str:
    return f"{output}.embeddings.json"


def embedding_journal_paths(output: str, rank: int) -> Tuple[str, str]:
    """The vectors and paths journal of one rank."""
    return f"{output}.embeddings-{rank:05d}.f16", f"{output}.embeddings-{rank:05d}.paths"


def all_embedding_journals(output: str) -> List[Tuple[str, str]]:
    import glob

    pattern = glob.escape(output) + ".embeddings-[0-9][0-9][0-9][0-9][0-9].f16"
    return [(path, path[: -len(".f16")] + ".paths") for path in sorted(glob.glob(pattern))]


def embedding_files(output: str) -> List[str]:
    """Every embedding file of ``output`` that exists (final files and journals)."""
    files = [embeddings_path(output), embeddings_meta_path(output)]
    for vectors, paths in all_embedding_journals(output):
        files += [vectors, paths]
    return [path for path in files if os.path.exists(path)]


def embedding_fingerprint(model) -> str:
    """SHA-256 of the weights that make a `Geolocator`'s retrieval embeddings (backbone and retrieval module).

    Two models with the same fingerprint embed every photo alike, wherever their folders lie.
    """
    digest = hashlib.sha256()
    for part in (model.backbone, model.retrieval):
        if part is None:
            continue
        for name, tensor in sorted(part.state_dict().items()):
            digest.update(name.encode())
            data = tensor.detach().cpu()
            if data.dtype.is_floating_point:
                data = data.float()
            digest.update(str(tuple(data.shape)).encode())
            digest.update(data.contiguous().numpy().tobytes())
    return digest.hexdigest()


def embed_pixels(model, pixels) -> np.ndarray:
    """``(B, D)`` float32 retrieval embeddings of a batch of transformed photos."""
    return model.embed(model.features(pixels)).float().cpu().numpy()


class EmbeddingJournal:
    """Appends one rank's embeddings and their paths; flushed per batch, before the batch's rows."""

    def __init__(self, output: str, rank: int, dim: int):
        self.dim = dim
        self.vectors_path, self.paths_path = embedding_journal_paths(output, rank)
        _repair_journal(self.vectors_path, self.paths_path, dim)
        with os_errors("write", self.vectors_path):
            self._vectors = open(self.vectors_path, "ab")
        with os_errors("write", self.paths_path):
            self._paths = open(self.paths_path, "a", encoding="utf-8")

    def write(self, paths: Sequence[str], vectors: np.ndarray) -> None:
        if not len(paths):
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float16)
        assert vectors.shape == (len(paths), self.dim), (vectors.shape, len(paths), self.dim)
        with os_errors("write", self.vectors_path):
            self._vectors.write(vectors.tobytes())
            self._vectors.flush()
        with os_errors("write", self.paths_path):
            # JSON strings keep any file name (newlines, non-UTF-8 bytes as escapes) on one line.
            self._paths.write("".join(json.dumps(p) + "\n" for p in paths))
            self._paths.flush()

    def close(self) -> None:
        self._vectors.close()
        self._paths.close()


def _read_journal_paths(path: str) -> List[str]:
    with os_errors("read", path), open(path, encoding="utf-8", errors="surrogateescape") as f:
        text = f.read()
    lines = text.split("\n")[:-1]  # a torn last line (no newline) is left out
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def _journal_count(vectors_path: str, paths_path: str, dim: int) -> int:
    n_vectors = os.path.getsize(vectors_path) // (2 * dim) if os.path.exists(vectors_path) else 0
    n_paths = len(_read_journal_paths(paths_path)) if os.path.exists(paths_path) else 0
    return min(n_vectors, n_paths)


def _repair_journal(vectors_path: str, paths_path: str, dim: int) -> None:
    """Cut both files of a journal to the entries whole in both (a kill can tear either)."""
    if not (os.path.exists(vectors_path) or os.path.exists(paths_path)):
        return
    n = _journal_count(vectors_path, paths_path, dim)
    with os_errors("repair", vectors_path), open(vectors_path, "ab") as f:
        f.truncate(n * 2 * dim)
    paths = _read_journal_paths(paths_path) if os.path.exists(paths_path) else []
    with os_errors("repair", paths_path), open(paths_path, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(p) + "\n" for p in paths[:n]))


@dataclass
class ArchiveEmbeddings:
    """The embeddings a tag run kept (`load_embeddings`): ``vectors`` memory-mapped float16 ``(N, D)``,
    ``paths`` the output's name of each row's photo, ``fingerprint`` of the weights that made them."""

    vectors: np.ndarray
    paths: List[str]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.paths)


def load_embeddings(output: str) -> ArchiveEmbeddings:
    """The embeddings kept beside a tag run's output ``output``.

    Raises:
        FileNotFoundError: the run kept none (a model without a retrieval module, ``--no-embeddings``, or an
            unfinished run: ``geoswc tag --resume`` completes them).
        ValueError: the two files disagree.
    """
    meta_path, npy_path = embeddings_meta_path(output), embeddings_path(output)
    if not (os.path.exists(meta_path) and os.path.exists(npy_path)):
        unfinished = (
            " (an unfinished run: complete it with geoswc tag --resume)"
            if all_embedding_journals(output)
            else ""
        )
        raise FileNotFoundError(
            f"no archive embeddings beside {output} ({npy_path} and {meta_path}){unfinished}; tag the archive "
            "with a model that has a retrieval module"
        )
    with os_errors("read", meta_path), open(meta_path, encoding="utf-8", errors="surrogateescape") as f:
        meta = json.load(f)
    vectors = np.load(npy_path, mmap_mode="r")
    if meta.get("version") != EMBEDDINGS_VERSION or vectors.ndim != 2 or len(vectors) != len(meta["paths"]):
        raise ValueError(
            f"{npy_path} ({vectors.shape}) and {meta_path} ({len(meta.get('paths', []))} paths, version "
            f"{meta.get('version')!r}) do not match; rerun geoswc tag --resume on {output}"
        )
    return ArchiveEmbeddings(vectors=vectors, paths=list(meta["paths"]), fingerprint=str(meta["fingerprint"]))


def finalize_embeddings(
    output: str,
    order: Sequence[str],
    *,
    fingerprint: str,
    dim: int,
    key: Optional[Callable[[str], str]] = None,
) -> Optional[ArchiveEmbeddings]:
    """Write ``OUT.embeddings.npy`` and ``.json`` for the photos ``order`` (the output's rows that have an
    embedding, in row order) from the earlier final files and every rank's journal, then delete the journals.

    A photo embedded twice (a resumed run re-embeds the photos whose rows a kill lost) keeps its latest
    embedding. Photos of ``order`` without one are left out (and logged).

    Returns:
        The final embeddings, or None when there are none at all.
    """
    key = key or (lambda path: path)
    sources: List[np.ndarray] = []
    where: Dict[str, Tuple[int, int]] = {}
    if os.path.exists(embeddings_path(output)) and os.path.exists(embeddings_meta_path(output)):
        earlier = load_embeddings(output)
        sources.append(earlier.vectors)
        for row, path in enumerate(earlier.paths):
            where[key(path)] = (0, row)
    journals = all_embedding_journals(output)
    for vectors_path, paths_path in journals:
        n = _journal_count(vectors_path, paths_path, dim)
        if n == 0:
            continue
        vectors = np.memmap(vectors_path, dtype=np.float16, mode="r", shape=(n, dim))
        sources.append(vectors)
        for row, path in enumerate(_read_journal_paths(paths_path)[:n]):
            where[key(path)] = (len(sources) - 1, row)
    kept = [(path, where[key(path)]) for path in order if key(path) in where]
    if len(kept) < len(order):
        logger.warning("%d photos of %s have no kept embedding", len(order) - len(kept), output)
    if not sources and not kept:
        return None
    npy_path, meta_path = embeddings_path(output), embeddings_meta_path(output)
    with os_errors("write", npy_path), atomic_path(npy_path) as tmp:
        with open(tmp, "wb") as f:  # open_memmap wants a name ending in .npy; write the header ourselves
            np.lib.format.write_array_header_1_0(
                f,
                {
                    "descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)),
                    "fortran_order": False,
                    "shape": (len(kept), dim),
                },
            )
            offset = f.tell()
        out = np.memmap(tmp, dtype=np.float16, mode="r+", offset=offset, shape=(len(kept), dim))
        for start in range(0, len(kept), _BLOCK):
            block = kept[start : start + _BLOCK]
            for i, (_, (source, row)) in enumerate(block):
                out[start + i] = sources[source][row]
        out.flush()
        del out
    meta = {
        "version": EMBEDDINGS_VERSION,
        "fingerprint": fingerprint,
        "dim": dim,
        "count": len(kept),
        "paths": [path for path, _ in kept],
    }
    with os_errors("write", meta_path), atomic_path(meta_path) as tmp:
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
            json.dump(meta, f)
    for vectors_path, paths_path in journals:
        for path in (vectors_path, paths_path):
            with os_errors("remove", path), contextlib.suppress(FileNotFoundError):
                os.remove(path)
    return load_embeddings(output)


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
    try:
        import faiss
    except ImportError as err:
        from geoswc.retrieval.index import FAISS_INSTALL

        raise ImportError(
            f"near-duplicate search over large archives needs faiss, which is not installed; run: {FAISS_INSTALL}"
        ) from err
    started = time.perf_counter()
    n, dim = vectors.shape
    nlist = min(n, int(nlist) if nlist else max(1, round(4 * np.sqrt(n))))
    nprobe = min(nprobe, nlist)
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
    trained = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=2 * n, desc="duplicates", unit="photo")
    # probes[i, 0] is the list photo i is stored in.
    probes = np.empty((n, nprobe), dtype=np.int32)
    for start, end in _blocks(n, block):
        _, lists = quantizer.search(_rows(vectors, slice(start, end)), nprobe)
        probes[start:end] = np.maximum(lists, 0)  # -1 only for a NaN row, which matches nothing anyway
        if bar is not None:
            bar.update(end - start)
    stored = probes[:, 0]
    assigned = time.perf_counter()
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
            for m0, m1 in _blocks(len(listed), _TILE):
                m = listed[m0:m1]
                xm = _rows(vectors, m)
                for p0, p1 in _blocks(len(probing), _TILE):
                    p = probing[p0:p1]
                    ii, jj = np.nonzero(_rows(vectors, p) @ xm.T >= cut)
                    a, b = p[ii], m[jj]
                    other = a != b
                    _link(parent, a[other], b[other])
            if bar is not None:
                bar.update(len(listed))
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
    if method not in DUPLICATE_METHODS:
        raise ValueError(
            f"unknown duplicate method {method!r}; choose one of: {', '.join(DUPLICATE_METHODS)}"
        )
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


def search(
    queries: np.ndarray, vectors: np.ndarray, *, top: int = 10, block: int = 65536
) -> Tuple[np.ndarray, np.ndarray]:
    """The ``top`` rows of ``vectors`` most similar (cosine) to each query, best first.

    Exact brute force over blocks of the (memory-mapped) archive, so memory stays bounded.

    Args:
        queries: ``(Q, D)`` L2-normalised.
        vectors: ``(N, D)`` L2-normalised (float16 or float32; a memory map is read block by block).
        top: how many per query (at most N).

    Returns:
        ``(Q, k)`` row indices and ``(Q, k)`` similarities, ``k = min(top, N)``, most similar first (ties:
        lower row first).
    """
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    queries = np.asarray(queries, dtype=np.float32)
    k = min(top, len(vectors))
    best_sims = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_rows = np.zeros((len(queries), 0), dtype=np.int64)
    for start, end in _blocks(len(vectors), block):
        sims = queries @ np.asarray(vectors[start:end], dtype=np.float32).T
        all_sims = np.concatenate([best_sims, sims], axis=1)
        all_rows = np.concatenate([best_rows, np.broadcast_to(np.arange(start, end), sims.shape)], axis=1)
        # Sort by similarity, then by row, and keep the first k.
        order = np.lexsort((all_rows, -all_sims), axis=1)[:, :k]
        best_sims = np.take_along_axis(all_sims, order, axis=1)
        best_rows = np.take_along_axis(all_rows, order, axis=1)
    return best_rows, best_sims


SIMILAR_COLUMNS = ("query", "rank", "similarity", "path", "lat", "lon", "place", "country", "error")


def find_similar(
    queries: Sequence[str],
    *,
    model,
    archive: str,
    top: int = 10,
    batch_size: int = 32,
    workers: int = 0,
) -> List[dict]:
    """The archive photos most similar to each query photo, best first (``geoswc similar``).

    Args:
        queries: photo files, folders, globs or ``@list.txt`` files (`geoswc.data.images.discover`).
        model: the model folder (or `Geolocator`) the archive was tagged with.
        archive: the tag run's output file; its embeddings lie beside it (``OUT.embeddings.npy``).
        top: photos listed per query.
        batch_size, workers: as ``geoswc tag``.

    Returns:
        One dict per (query, match) with `SIMILAR_COLUMNS`; a query that cannot be read gets one row with
        its ``error``. ``lat``/``lon``/``place``/``country`` are the archive row's (empty for an abstention).

    Raises:
        FileNotFoundError: no embeddings beside ``archive`` or no model folder.
        ValueError: the archive was tagged with another model (its embedding fingerprint differs).
    """
    from geoswc.data.images import discover
    from geoswc.data.photos import PhotoDataset, photo_batches
    from geoswc.geolocator import Geolocator
    from geoswc.tagging.output import output_format, read_rows

    if top < 1:
        raise ValueError(f"--top must be at least 1, got {top}")
    stored = load_embeddings(archive)  # before the model: a wrong archive fails fast
    found = discover(queries)
    if isinstance(model, (str, os.PathLike)):
        if not os.path.isdir(model):
            raise FileNotFoundError(f"model folder {os.fspath(model)!r} does not exist")
        model = Geolocator.from_pretrained(model)
    if getattr(model, "retrieval", None) is None:
        raise ValueError("this model has no retrieval module, so it has no embeddings to compare")
    fingerprint = embedding_fingerprint(model)
    if fingerprint != stored.fingerprint:
        raise ValueError(
            f"{archive} was tagged with another model (embedding fingerprint {stored.fingerprint[:12]}…, this "
            f"model's is {fingerprint[:12]}…); pass the model the archive was tagged with"
        )
    rows_by_path = {row["path"]: row for row in read_rows(archive, output_format(archive))}
    paths = [photo.path for photo in found.photos]
    dataset = PhotoDataset(paths, model.transform)
    vectors: Dict[int, np.ndarray] = {}
    errors: Dict[int, str] = {}
    import torch

    for batch in photo_batches(dataset, batch_size=batch_size, workers=workers):
        errors.update(batch.errors)
        if len(batch):
            with torch.inference_mode():
                emb = embed_pixels(model, batch.pixels)
            vectors.update(zip(batch.indices.tolist(), emb))
    order = sorted(vectors)
    results: List[dict] = []
    found_rows, found_sims = (
        search(np.stack([vectors[i] for i in order]), stored.vectors, top=top) if order else (None, None)
    )
    matches = {i: (found_rows[n], found_sims[n]) for n, i in enumerate(order)}
    for i, query in enumerate(paths):
        if i in errors:
            results.append({**dict.fromkeys(SIMILAR_COLUMNS), "query": query, "error": errors[i]})
            continue
        for rank, (row, sim) in enumerate(zip(*matches[i]), 1):
            path = stored.paths[int(row)]
            tagged = rows_by_path.get(path, {})
            results.append(
                {
                    "query": query,
                    "rank": rank,
                    "similarity": round(float(sim), 6),
                    "path": path,
                    "lat": tagged.get("lat"),
                    "lon": tagged.get("lon"),
                    "place": tagged.get("place"),
                    "country": tagged.get("country"),
                    "error": None,
                }
            )
    return results


def write_similar(path: str, results: Sequence[dict]) -> None:
    """Write `find_similar`'s rows as CSV (header `SIMILAR_COLUMNS`), atomically."""
    import csv

    with os_errors("write", path), atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(SIMILAR_COLUMNS)
            for row in results:
                writer.writerow(["" if row.get(key) is None else row[key] for key in SIMILAR_COLUMNS])
