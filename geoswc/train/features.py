"""Stage 2: pooled backbone features of a photo set, written as the feature cache (`geoswc.data.features`).

Each process embeds its parts (``part_size`` rows of a metadata CSV, or one shard each) into ``out/parts/``
and rank 0 merges them. Parts already on disk are skipped, so an interrupted extraction resumes where it
stopped; ``parts/key.json`` records what made them (inputs, weights, sizes), and parts of another run are
discarded instead of being merged as if they were this one's.

With ``backbone.pool`` ``gem`` or ``netvlad`` a second cache, ``out/retrieval/``, holds the L2-normalised
descriptors of that layer over the same photos (what the retrieval module trains on and the background index
embeds; the heads keep the average-pooled cache), and ``out/retrieval/retrieval_pool.safetensors`` the layer:
GeM with its initial exponent, NetVLAD initialised by k-means on local descriptors of (up to 500) of the
photos, as ``geoswc vpr`` initialises it (`geoswc.street.embed.init_netvlad`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from geoswc.classifiers import create_backbone, load_backbone
from geoswc.classifiers.aggregation import (
    POOLS,
    RETRIEVAL_POOL_FILE,
    NetVLAD,
    VPRNet,
    kmeans_centroids,
    load_retrieval_pool,
    sample_local_descriptors,
    save_retrieval_pool,
)
from geoswc.config import Config
from geoswc.data.features import RETRIEVAL_CACHE, merge_image_parts, merge_shard_parts, write_meta
from geoswc.data.files import atomic_path, write_text_atomic
from geoswc.data.validation import check_choice
from geoswc.street.embed import NETVLAD_DESCRIPTORS, NETVLAD_PER_IMAGE
from geoswc.train.accelerator import prepare_for_speed
from geoswc.train.common import PathLike, StageResult, finish_stage, start_stage
from geoswc.train.distributed import weights_digest
from geoswc.train.sources import Batches, Photos, PhotoTable, ShardBatches, open_photos

logger = logging.getLogger(__name__)


def extract_features(
    config: Config,
    *,
    cells: Any,
    photos: Photos,
    out: PathLike,
    backbone: Optional[PathLike] = None,
    weights: Optional[str] = None,
    part_size: int = 4096,
    batch_size: Optional[int] = None,
    cpu: bool = False,
    log_with: Sequence[str] = (),
) -> StageResult:
    """Pooled backbone features of ``photos`` with their coordinates, labels, ids and authors.

    Args:
        config: the resolved configuration (``data``, ``train``; ``backbone`` without a backbone folder).
        cells: the `Geocells` that label the photos.
        photos: the photos to embed.
        out: the feature cache folder.
        backbone: a backbone stage folder (default: the configured timm backbone with ``weights``).
        weights: local ImageNet weights when no backbone folder is given.
        part_size: rows per resumable part (metadata CSV; shards are one part each).
        batch_size: images per forward pass (default ``heads.batch_size``).
        cpu, log_with: as `geoswc.train.train_backbone`.
    """
    out = Path(out)
    if part_size < 1:
        raise ValueError(f"part_size must be at least 1, got {part_size}")
    accelerator = start_stage(config, out, stage="features", cpu=cpu, log_with=log_with)
    if backbone is not None:
        model, info = load_backbone(backbone)
        model_name = info["model"]
    else:
        model_name = config.backbone.model
        weights = weights or config.backbone.weights
        model = create_backbone(
            model_name, pretrained=config.backbone.pretrained and weights is None, weights=weights
        )
    batch_size = batch_size or config.heads.batch_size
    check_choice("backbone.pool", config.backbone.pool, POOLS)
    source = open_photos(photos, cells, model, config, train=False)
    options = dict(
        config=config, model_name=model_name, fingerprint=str(cells.fingerprint), batch_size=batch_size
    )
    summary = _cache(accelerator, model, source, out, part_size=part_size, **options)
    if config.backbone.pool != "avg":
        net = _retrieval_net(
            accelerator, model, source, out / RETRIEVAL_CACHE, config=config, batch_size=batch_size
        )
        pooled = _cache(
            accelerator, net, source, out / RETRIEVAL_CACHE, part_size=part_size, pool=net.pool, **options
        )
        summary["retrieval"] = {"pool": net.pool, "dim": pooled["dim"]}
    finish_stage(accelerator, out, "features", summary)
    return StageResult("features", out, {"features": out}, summary)


def _cache(accelerator: Accelerator, model: nn.Module, source: Any, out: Path, *, part_size: int, **options):
    """One feature cache of ``model``'s outputs in ``out`` (shards: one part per shard)."""
    if isinstance(source, ShardBatches):
        return _shard_features(accelerator, model, source, out, **options)
    return _table_features(accelerator, model, source, out, part_size=part_size, **options)


def _retrieval_net(
    accelerator: Accelerator, backbone: nn.Module, source: Any, out: Path, *, config: Config, batch_size: int
) -> VPRNet:
    """The backbone with the ``backbone.pool`` layer, its state written to ``out/retrieval_pool.safetensors``
    by the main process (NetVLAD initialised from the photos first) and read back by every process."""
    net = VPRNet(backbone, config.backbone.pool, clusters=config.backbone.clusters).eval()
    path = out / RETRIEVAL_POOL_FILE
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if isinstance(net.aggregation, NetVLAD):
            net.to(accelerator.device)
            local = _local_descriptors(
                accelerator, net, source, batch_size=batch_size, seed=config.train.seed
            )
            centroids = kmeans_centroids(local, net.aggregation.clusters, seed=config.train.seed)
            net.aggregation.init_from_descriptors(centroids, local)
        with atomic_path(path) as tmp:
            save_retrieval_pool(tmp, net.aggregation, channels=net.channels)
    accelerator.wait_for_everyone()
    net.aggregation = load_retrieval_pool(path, channels=net.channels)
    return net.eval()


@torch.no_grad()
def _local_descriptors(
    accelerator: Accelerator, net: VPRNet, source: Any, *, batch_size: int, seed: int
) -> np.ndarray:
    """``NETVLAD_PER_IMAGE`` L2-normalised local descriptors of each of (up to) 500 photos: a seeded sample of
    the rows of a photo table, the first photos of the first shards."""
    rng = np.random.default_rng(seed)
    n_photos = -(-NETVLAD_DESCRIPTORS // NETVLAD_PER_IMAGE)
    out: list = []
    if isinstance(source, ShardBatches):
        loader = source.loader(batch_size=batch_size, accelerator=accelerator, train=False, whole=True)
        seen = 0
        for batch in loader:
            for _, group in source.by_shape(batch):
                images = source.to_device(group, accelerator.device)[0]
                out.append(sample_local_descriptors(net.feature_map(images), NETVLAD_PER_IMAGE, rng))
            seen += len(batch["image"])
            if seen >= n_photos:
                break
    else:
        n = len(source.source)
        rows = np.sort(rng.choice(n, min(n, n_photos), replace=False))
        for _, inputs, _, _ in source.iterate_eval(rows, batch_size, accelerator.device):
            out.append(sample_local_descriptors(net.feature_map(inputs), NETVLAD_PER_IMAGE, rng))
    return np.concatenate(out)


def _table_features(
    accelerator: Accelerator,
    backbone: nn.Module,
    source: Batches,
    out: Path,
    *,
    config: Config,
    model_name: str,
    fingerprint: str,
    part_size: int,
    batch_size: int,
    pool: Optional[str] = None,
) -> Dict[str, Any]:
    table: PhotoTable = source.source
    key = {
        "photos": _digest(table.ids, table.latlon),
        "images": str(table.root),
        "backbone": model_name,
        "weights": weights_digest(backbone),
        "image_size": config.data.image_size,
        "eval_resize": config.data.eval_resize,
        "part_size": part_size,
        **({"pool": pool} if pool else {}),
    }
    model = prepare_for_speed(backbone, config.train, accelerator).eval()
    parts_dir = out / "parts"
    _claim_parts(accelerator, parts_dir, key)
    n = len(table)
    n_parts = max(1, math.ceil(n / part_size))
    dim = int(backbone.num_features)
    start, images = time.perf_counter(), 0
    mine = list(range(accelerator.process_index, n_parts, accelerator.num_processes))
    for part in tqdm(mine, desc="features", disable=not accelerator.is_main_process):
        target = parts_dir / f"part_{part:05d}.npy"
        if target.is_file():
            continue
        rows = np.arange(part * part_size, min(n, (part + 1) * part_size))
        block = np.zeros((len(rows), dim), dtype=np.float16)
        with torch.no_grad():
            for row, inputs, _, _ in source.iterate_eval(rows, batch_size, accelerator.device):
                with accelerator.autocast():
                    block[row.numpy() - rows[0]] = model(inputs).float().cpu().numpy().astype(np.float16)
                images += len(inputs)
        with atomic_path(target) as tmp, open(tmp, "wb") as f:
            np.save(f, block)

    def merge() -> int:
        merge_image_parts(
            parts_dir,
            out,
            latlon=table.latlon,
            labels=table.labels,
            ids=table.ids,
            authors=table.authors,
            part_size=part_size,
            dim=dim,
        )
        return n

    return _finish_cache(
        accelerator,
        out,
        parts_dir,
        merge,
        config=config,
        model_name=model_name,
        fingerprint=fingerprint,
        dim=dim,
        images=images,
        start=start,
        count=n,
        pool=pool,
    )


def _shard_features(
    accelerator: Accelerator,
    backbone: nn.Module,
    shards: ShardBatches,
    out: Path,
    *,
    config: Config,
    model_name: str,
    fingerprint: str,
    batch_size: int,
    pool: Optional[str] = None,
) -> Dict[str, Any]:
    """One resumable part per shard (ranks take shards in turn), each holding the shard's features, ids,
    coordinates, labels and authors; rank 0 merges them in shard order."""
    key = {
        "shards": [[url, _file_size(url)] for url in shards.urls],
        "relabel": shards.relabel_with is not None,
        "cells": fingerprint,
        "backbone": model_name,
        "weights": weights_digest(backbone),
        "image_size": config.data.image_size,
        "eval_resize": config.data.eval_resize,
        **({"pool": pool} if pool else {}),
    }
    model = prepare_for_speed(backbone, config.train, accelerator).eval()
    parts_dir = out / "parts"
    _claim_parts(accelerator, parts_dir, key)
    dim = int(backbone.num_features)
    start, images = time.perf_counter(), 0
    mine = list(range(accelerator.process_index, len(shards.urls), accelerator.num_processes))
    for part in tqdm(mine, desc="features", disable=not accelerator.is_main_process):
        target = parts_dir / f"part_{part:05d}.npz"
        if target.is_file():
            continue
        feats, ids, authors, latlon, labels = [np.zeros((0, dim), np.float16)], [], [], [], []
        loader = shards.loader(
            batch_size=batch_size, accelerator=accelerator, train=False, urls=[shards.urls[part]], whole=True
        )
        with torch.no_grad():
            for batch in loader:
                block = np.zeros((len(batch["id"]), dim), dtype=np.float16)
                for idx, group in shards.by_shape(batch):
                    with accelerator.autocast():
                        block[idx] = (
                            model(shards.to_device(group, accelerator.device)[0]).float().cpu().numpy()
                        )
                feats.append(block)
                ids += batch["id"]
                authors += batch["author"]
                latlon.append(batch["latlon"].numpy())
                labels.append(batch["labels"].numpy())
                images += len(block)
        n_gran = labels[0].shape[1] if labels else 0
        with atomic_path(target) as tmp, open(tmp, "wb") as f:
            np.savez(
                f,
                features=np.concatenate(feats),
                ids=np.asarray(ids, dtype=str),
                authors=np.asarray(authors, dtype=str),
                latlon=np.concatenate(latlon) if latlon else np.zeros((0, 2)),
                labels=np.concatenate(labels) if labels else np.zeros((0, n_gran), np.int64),
            )
    return _finish_cache(
        accelerator,
        out,
        parts_dir,
        lambda: merge_shard_parts(parts_dir, out, n_parts=len(shards.urls), dim=dim),
        config=config,
        model_name=model_name,
        fingerprint=fingerprint,
        dim=dim,
        images=images,
        start=start,
        count=len(shards),
        pool=pool,
    )


def _finish_cache(
    accelerator: Accelerator,
    out: Path,
    parts_dir: Path,
    merge: Callable[[], int],
    *,
    config: Config,
    model_name: str,
    fingerprint: str,
    dim: int,
    images: int,
    start: float,
    count: int,
    pool: Optional[str] = None,
) -> Dict[str, Any]:
    """Once every rank has written its parts, rank 0 merges them (``merge()`` -> the rows merged), writes the
    cache's meta.json and removes the parts; the summary (``count``: the rows where rank 0 merged none)."""
    elapsed = time.perf_counter() - start
    accelerator.wait_for_everyone()
    n = 0
    if accelerator.is_main_process:
        n = merge()
        write_meta(
            out,
            {
                "fingerprint": fingerprint,
                "backbone": model_name,
                "dim": dim,
                "count": n,
                "image_size": config.data.image_size,
                **({"pool": pool} if pool else {}),
            },
        )
        shutil.rmtree(parts_dir)
    accelerator.wait_for_everyone()
    return {
        "count": n or count,
        "dim": dim,
        "images_per_s_rank0": images / max(elapsed, 1e-9),
        "num_processes": accelerator.num_processes,
    }


def _digest(ids: Sequence[str], latlon: np.ndarray) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update("\n".join(map(str, ids)).encode())
    digest.update(b"\0")
    digest.update(np.ascontiguousarray(latlon).tobytes())
    return digest.hexdigest()


def _file_size(path: str) -> int:
    return os.path.getsize(path) if os.path.exists(path) else -1


def _claim_parts(accelerator: Accelerator, parts_dir: Path, key: Dict[str, Any]) -> None:
    """Make ``parts_dir`` hold only parts made with ``key`` (inputs, weights, sizes): parts left by a run with
    other inputs or another backbone would otherwise be merged into this cache as if they were its own."""
    if accelerator.is_main_process:
        key_file = parts_dir / "key.json"
        if parts_dir.is_dir() and any(parts_dir.iterdir()):
            previous = json.loads(key_file.read_text()) if key_file.is_file() else None
            if previous != key:
                changed = sorted(k for k in key if previous is None or previous.get(k) != key[k])
                logger.warning(
                    "%s holds parts of a run with other %s: starting the features over",
                    parts_dir,
                    ", ".join(changed) or "settings",
                )
                shutil.rmtree(parts_dir)
        parts_dir.mkdir(parents=True, exist_ok=True)
        if not key_file.is_file():
            write_text_atomic(key_file, json.dumps(key, indent=2) + "\n")
    accelerator.wait_for_everyone()
