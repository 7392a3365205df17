"""Stage 5: the placeable background index (ICMR 2021 section 3.3.3): the training photos whose top-1 fine
cell by a head is their true cell, embedded by the retrieval module and sorted by cell
(`geoswc.retrieval.background.build_background`). With ``retrieval.background=all`` every labelled training
photo is kept instead (the paper's Table 4 ablation) and no head is needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from geoswc.config import Config
from geoswc.retrieval.background import build_background
from geoswc.train.common import PathLike, StageResult


def build_index(
    config: Config,
    *,
    cells: Any,
    features: PathLike,
    head: Optional[PathLike],
    retrieval: PathLike,
    out: PathLike,
    exclude: Sequence[PathLike] = (),
    dtype: Optional[str] = None,
    batch_size: int = 8192,
    device: Optional[str] = None,
    embed_features: Optional[PathLike] = None,
) -> StageResult:
    """Build the background index of a feature cache into ``out`` (with ``config.yaml`` beside it).

    Args:
        config: the resolved configuration (``retrieval.index_dtype``, ``retrieval.background``), saved with
            the index.
        cells: the `Geocells` (or its folder) the cache, head and retrieval module were made with.
        features: the training photos' feature cache.
        head: the head (``.safetensors``) that decides which photos are placeable; not read (may be None)
            with ``retrieval.background=all``.
        retrieval: the trained retrieval module (``.safetensors``; the identity embedding of
            ``retrieval.loss=none`` too).
        out: the index folder.
        exclude: evaluation sets whose authors and photo ids are left out (paper 4.2).
        dtype: storage dtype, ``float16`` or ``float32`` (default ``retrieval.index_dtype``).
        batch_size: rows per forward pass.
        device: torch device (default CUDA when available).
        embed_features: the cache of the photos' ``backbone.pool`` descriptors (same rows as ``features``),
            which the retrieval module embeds while the head reads ``features``; None: both read ``features``.

    Returns:
        The result; its summary is the build report (``total``, ``kept`` and the dropped counts).
    """
    out = Path(out)
    report = build_background(
        features,
        head_path=head if config.retrieval.background == "placeable" else None,
        retrieval_path=retrieval,
        cells=cells,
        out_dir=out,
        exclude=exclude,
        dtype=dtype or config.retrieval.index_dtype,
        batch_size=batch_size,
        device=device,
        config=config.to_dict(),
        background=config.retrieval.background,
        embed_features_dir=embed_features,
    )
    config.save(out / "config.yaml")
    return StageResult("index", out, {"index": out}, report)
