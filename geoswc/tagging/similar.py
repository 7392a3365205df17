"""``geoswc similar``: the photos of a tagged archive most similar to query photos, from the embeddings the tag
run kept beside its output (`geoswc.tagging.journal`), with no second pass over the archive (the archive use
case of ``004_…`` in ../shared/papers: find a postcard's other scans and views among millions).

The kept embeddings (`geoswc.tagging.journal`) and near-duplicate groups (`geoswc.tagging.duplicates`) lived
here first; their names stay importable from this module.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np

from geoswc.data.files import atomic_path
from geoswc.tagging.duplicates import (
    DUPLICATE_METHODS,
    DUPLICATE_NPROBE,
    DUPLICATE_THRESHOLD,
    EXACT_DUPLICATES_MAX,
    _blocks,
    duplicate_groups,
)
from geoswc.tagging.files import os_errors
from geoswc.tagging.output import escape_cell
from geoswc.tagging.journal import (
    EMBEDDINGS_VERSION,
    ArchiveEmbeddings,
    EmbeddingJournal,
    all_embedding_journals,
    check_finite,
    embed_pixels,
    embedding_files,
    embedding_fingerprint,
    embedding_journal_paths,
    embeddings_meta_path,
    embeddings_path,
    finalize_embeddings,
    load_embeddings,
)

__all__ = [
    "DUPLICATE_METHODS",
    "DUPLICATE_NPROBE",
    "DUPLICATE_THRESHOLD",
    "EMBEDDINGS_VERSION",
    "EXACT_DUPLICATES_MAX",
    "SIMILAR_COLUMNS",
    "ArchiveEmbeddings",
    "EmbeddingJournal",
    "all_embedding_journals",
    "duplicate_groups",
    "embed_pixels",
    "embedding_files",
    "embedding_fingerprint",
    "embedding_journal_paths",
    "embeddings_meta_path",
    "embeddings_path",
    "finalize_embeddings",
    "find_similar",
    "load_embeddings",
    "search",
    "write_similar",
]

logger = logging.getLogger(__name__)


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
    check_finite(stored, embeddings_path(archive))
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


def write_similar(path: str, results: Sequence[dict], *, raw: bool = False) -> None:
    """Write `find_similar`'s rows as CSV (header `SIMILAR_COLUMNS`), atomically; text cells escaped against
    formula injection unless ``raw`` (`geoswc.tagging.output.escape_cell`)."""
    import csv

    with os_errors("write", path), atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(SIMILAR_COLUMNS)
            for row in results:
                cells = ["" if row.get(key) is None else row[key] for key in SIMILAR_COLUMNS]
                if not raw:
                    cells = [escape_cell(cell) if isinstance(cell, str) else cell for cell in cells]
                writer.writerow(cells)
