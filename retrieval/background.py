"""The "placeable" background collection, ICMR 2021 section 3.3.3 and 4.2.

The background is built from training photos that the classification head places in their true fine cell
(top-1), minus photos by authors (or with ids) of the evaluation sets; the survivors are embedded with the
retrieval module and written as a `BackgroundIndex`. The paper keeps 700K of 4.7M MP16 photos this way.
Everything streams over the memory-mapped feature cache, so the training set never has to fit in memory.

``background="all"`` keeps every labelled training photo instead (still minus the evaluation sets' authors and
ids): the "all train set" row of the paper's Table 4. The retrieval part may be the `IdentityEmbedding`
(``retrieval.loss=none``), whose index holds the L2-normalised backbone features.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from geoswc.classifiers import load_head
from geoswc.data.features import FeatureCache, cache_pool, pooled_cache
from geoswc.data.metadata import Exclusions
from geoswc.data.validation import check_choice
from geoswc.geocells import Geocells
from geoswc.retrieval.index import INDEX_DTYPES, BackgroundIndex
from geoswc.retrieval.model import load_retrieval, read_metadata

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]

# ``retrieval.background``: which training photos make up the background collection.
BACKGROUNDS = ("placeable", "all")


def excluded_rows(ids: np.ndarray, authors: np.ndarray, exclude: Sequence[PathLike]):
    """Masks ``(by_author, by_id)`` of rows whose author or photo id appears in the evaluation CSVs."""
    if not exclude:
        return np.zeros(len(ids), bool), np.zeros(len(ids), bool)
    frame = pd.DataFrame({"IMG_ID": ids.astype(str), "AUTHOR": authors.astype(str)})
    return Exclusions.from_files(list(exclude)).masks(frame)


@torch.no_grad()
def build_background(
    features_dir: PathLike,
    *,
    head_path: Optional[PathLike],
    retrieval_path: PathLike,
    cells: Union[Geocells, PathLike],
    out_dir: PathLike,
    exclude: Sequence[PathLike] = (),
    dtype: str = "float16",
    batch_size: int = 8192,
    device: Optional[str] = None,
    config: Optional[Dict[str, Any]] = None,
    background: str = "placeable",
    embed_features_dir: Optional[PathLike] = None,
) -> Dict[str, Any]:
    """Select the background photos of a feature cache, embed them and write the index to ``out_dir``.

    ``cells`` is the `Geocells` the cache, the head and the retrieval module were made with, or its folder.
    ``background`` is ``placeable`` (the photos ``head_path``'s top-1 fine cell places right, the paper) or
    ``all`` (every labelled photo; ``head_path`` is then not read and may be None). The retrieval module embeds
    the features it was trained on (the ``pool`` its weights record): for a GeM/NetVLAD module a second cache
    of the same photos in the same order, ``embed_features_dir`` (default: the ``retrieval/`` cache of
    ``features_dir``), while the head reads ``features_dir``.

    Returns:
        A report: ``total``, ``kept``, the dropped counts ``no_label``, ``excluded_author``, ``excluded_id`` and
        ``wrong_cell``, the background kind, the head kind and the index folder (also written as
        ``out_dir/build_report.json``).

    Raises:
        ValueError: an unknown ``dtype`` or ``background``, no head for ``placeable``, or parts that do not fit
            the cache (named).
    """
    check_choice("index dtype", dtype, INDEX_DTYPES)
    check_choice("background", background, BACKGROUNDS)
    if background == "placeable" and head_path is None:
        raise ValueError(
            "the placeable background needs a head (its top-1 cell decides); or use background 'all'"
        )
    out_dir = Path(out_dir)
    cells = cells if isinstance(cells, Geocells) else Geocells.load(cells)
    fingerprint = str(cells.fingerprint)
    cache = FeatureCache(features_dir).check(cells)
    features = cache.features
    n, dim = features.shape
    # The features the retrieval module was trained on: average-pooled, or a GeM/NetVLAD layer's descriptors.
    pool = read_metadata(retrieval_path).get("pool", "avg")
    embed_source = features
    if embed_features_dir is not None or pool != cache_pool(features_dir):
        embed_dir = pooled_cache(embed_features_dir or features_dir, pool)
        embed_source = _same_photos(FeatureCache(embed_dir).check(cells), cache).features
    latlon = cache.latlon
    ids = cache.lines("ids")
    authors = cache.lines("authors")

    head = load_head(head_path, geocells=cells) if background == "placeable" else None
    # The rows are sorted by the cells of the head's own partition (the finest without a head); every other
    # partition gets a table, so Search within Cell works with any head's cells.
    column = head.label_columns[-1] if head is not None else len(cells.partitions) - 1
    fine = cache.labels[:, column]
    module = load_retrieval(retrieval_path, fingerprint=fingerprint)
    _check_feature_width(head, module, dim, int(embed_source.shape[1]))
    dim = int(embed_source.shape[1])
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if head is not None:
        head.to(device).eval()
    module.to(device).eval()

    no_label = fine < 0
    by_author, by_id = excluded_rows(ids, authors, exclude)
    by_author = by_author & ~no_label
    by_id = by_id & ~no_label
    candidates = np.flatnonzero(~(no_label | by_author | by_id))

    out_dir.mkdir(parents=True, exist_ok=True)
    staging_path = out_dir / "staging_embeddings.npy"
    staging = np.lib.format.open_memmap(
        staging_path, mode="w+", dtype=dtype, shape=(max(len(candidates), 1), dim)
    )
    kept = _embed_placed(
        features,
        embed_source,
        candidates,
        fine,
        staging,
        head=head,
        module=module,
        device=device,
        batch_size=batch_size,
        desc=background,
    )
    count = len(kept)
    staging.flush()

    index = BackgroundIndex(dtype=dtype).build(
        np.load(staging_path, mmap_mode="r")[:count],
        cell_idx=fine[kept],
        latlon=latlon[kept],
        ids=ids[kept].astype(str),
        n_cells=len(cells.partitions[column]),
        fingerprint=fingerprint,
        directory=out_dir,
        config=config,
        partition=cells.partitions[column].name,
    )
    for g, part in enumerate(cells.partitions):
        if g != column:
            index.add_partition(part.name, cache.labels[kept[index.source_rows], g], len(part))
    if len(cells.partitions) > 1:
        index.save(out_dir)
    del staging
    staging_path.unlink()
    report = {
        "total": int(n),
        "kept": int(count),
        "no_label": int(no_label.sum()),
        "excluded_author": int(by_author.sum()),
        "excluded_id": int(by_id.sum()),
        "wrong_cell": int(len(candidates) - count),
        "background": background,
        "head": None if head is None else getattr(head, "kind", str(head_path)),
        "cells_with_background": int((index.cell_sizes() > 0).sum()),
        "n_cells": index.n_cells,
        "index": str(out_dir),
    }
    (out_dir / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    logger.info("background: kept %d of %d photos", count, n)
    return report


def _same_photos(other: FeatureCache, cache: FeatureCache) -> FeatureCache:
    """``other``, checked to hold the photos of ``cache`` in the same order."""
    if len(other.features) != len(cache.features) or not np.array_equal(
        other.lines("ids"), cache.lines("ids")
    ):
        raise ValueError(
            f"the retrieval descriptors' cache {other.folder} does not hold the photos of {cache.folder} in the "
            "same order; extract both with the same features stage"
        )
    return other


def _check_feature_width(head, module, dim: int, embed_dim: Optional[int] = None) -> None:
    """Raise ValueError when the head or the retrieval module expects features of another width."""
    parts = [("retrieval module", module.dim, dim if embed_dim is None else embed_dim)]
    if head is not None:
        parts.insert(0, ("head", int(head.in_features), dim))
    for name, size, dim in parts:
        if size != dim:
            raise ValueError(
                f"the {name} expects {size}-dimensional features but the cache holds {dim}-dimensional"
            )


@torch.no_grad()
def _embed_placed(
    features,
    embed_source,
    candidates: np.ndarray,
    fine: np.ndarray,
    staging: np.ndarray,
    *,
    head,
    module,
    device,
    batch_size: int,
    desc: str,
) -> np.ndarray:
    """Embed the ``candidates`` rows the head places in their own fine cell (all of them without a head) into
    ``staging``, in order; returns the rows kept. The head reads ``features``, the module ``embed_source``
    (the same array unless the retrieval descriptors are pooled otherwise)."""
    kept_rows = []
    count = 0
    for start in tqdm(range(0, len(candidates), batch_size), desc=desc, unit="batch"):
        rows = candidates[start : start + batch_size]
        x = torch.from_numpy(np.asarray(features[rows], dtype=np.float32)).to(device)
        if head is None:
            placed = np.ones(len(rows), bool)
        else:
            top1 = head.fine_log_probs(head(x)).argmax(dim=1).cpu().numpy()
            placed = top1 == fine[rows]
        if placed.any():
            if embed_source is not features:
                x = torch.from_numpy(np.asarray(embed_source[rows], dtype=np.float32)).to(device)
            emb = module(x[torch.from_numpy(placed).to(device)]).cpu().numpy()
            staging[count : count + len(emb)] = emb
            count += len(emb)
            kept_rows.append(rows[placed])
    return np.concatenate(kept_rows) if kept_rows else np.zeros(0, np.int64)
