"""Training stages of the classification module (paper 3.2, 4.2), one loop for 1 or N processes.

    geoswc train backbone   CE over the finest partition, end to end on images (SGD 0.01, x0.5 / 5 epochs)
    geoswc train features   pooled backbone features of a photo set -> feature cache (resumable, multi-process)
    geoswc train heads      CE / HC / MvMF heads on the frozen backbone, from cached features by default
                            (AdamW 1e-5, cosine, 5 epochs; the MvMF mixture layer starts from the CE layer)
    geoswc train retrieval  the retrieval module (``geoswc.train_retrieval``), when installed

``accelerate launch -m geoswc.train <stage> ...`` runs the same code on N processes: each rank reads its own
rows, gradients are averaged by DDP, metrics are gathered, and the run records whether all ranks ended with
identical weights.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import time
import zipfile
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from geoswc.config import Config, resolve_config

logger = logging.getLogger(__name__)

RADII_KM = (1, 25, 200, 750, 2500)
BACKBONE_FILE = "backbone.safetensors"


# ----------------------------------------------------------------------------------------------- inputs
def load_cells(path: str):
    """``Geocells`` saved by ``geoswc cells build``."""
    from geoswc.geocells import Geocells

    if not Path(path).is_dir():
        raise FileNotFoundError(f"cells folder not found: {path} (build one with: geoswc cells build)")
    return Geocells.load(path)


class PhotoTable(torch.utils.data.Dataset):
    """Photos of a metadata CSV (``IMG_ID, AUTHOR, LAT, LON``) under an image root, with their cell labels.

    Items are ``{"image": (3, H, W), "row": int}``; coordinates, labels and ids stay in arrays indexed by row.
    ``longest`` says that the transform is the longest-side evaluation resize, whose output shape varies with
    the photo (see `output_sizes`).
    """

    def __init__(self, csv_path: str, image_root: str, geocells: Any, transform: Callable, *, size: int,
                 longest: bool = False):
        from geoswc.data.metadata import read_metadata

        frame = read_metadata(csv_path)
        self.root = Path(image_root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {image_root}")
        self.ids = frame["IMG_ID"].astype(str).tolist()
        self.authors = frame["AUTHOR"].astype(str).tolist() if "AUTHOR" in frame else [""] * len(self.ids)
        self.latlon = frame[["LAT", "LON"]].to_numpy(np.float64)
        self.labels = np.asarray(geocells.assign(self.latlon[:, 0], self.latlon[:, 1]), dtype=np.int64)
        self.transform = transform
        self.size = size
        self.longest = longest

    def __len__(self) -> int:
        return len(self.ids)

    def output_sizes(self) -> np.ndarray:
        """``(N, 2)`` transformed ``(h, w)`` of every photo, from the file headers (no decoding).

        With the longest-side resize the shape follows the photo's aspect ratio; otherwise every photo has the
        same ``size x size`` shape. A photo whose header cannot be read gets ``(0, 0)``.
        """
        if not self.longest:
            return np.full((len(self.ids), 2), self.size, dtype=np.int64)
        from PIL import Image

        sizes = np.zeros((len(self.ids), 2), dtype=np.int64)
        for row, img_id in enumerate(self.ids):
            try:
                with Image.open(self.root / img_id) as image:
                    width, height = image.size
                    if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF rotations by 90 degrees
                        width, height = height, width
            except (OSError, SyntaxError, ValueError):
                continue
            scale = self.size / max(width, height)
            sizes[row] = (max(1, round(height * scale)), max(1, round(width * scale)))
        return sizes

    def __getitem__(self, row: int) -> Dict[str, Any]:
        from geoswc.data.images import decode_array

        side = getattr(self.transform, "decode_side", "short")
        image = decode_array(self.root / self.ids[row], target=self.size, target_side=side)
        return {"image": self.transform(image), "row": int(row)}


def build_image_transform(backbone: nn.Module, data_cfg: Any, *, train: bool) -> Callable:
    """The input transform from the backbone's own data config (mean/std), at ``data.image_size``."""
    from timm.data import resolve_model_data_config

    from geoswc.data.transforms import build_transform

    return build_transform(
        resolve_model_data_config(backbone), train=train, size=data_cfg.image_size,
        eval_resize=data_cfg.eval_resize, crop_scale=tuple(data_cfg.crop_scale),
        crop_ratio=tuple(data_cfg.crop_ratio), hflip=data_cfg.hflip,
    )


def photo_table(csv_path: str, image_root: str, geocells: Any, backbone: nn.Module, data_cfg: Any, *,
                train: bool) -> PhotoTable:
    """A `PhotoTable` with the backbone's training or evaluation transform at ``data.image_size``."""
    return PhotoTable(csv_path, image_root, geocells, build_image_transform(backbone, data_cfg, train=train),
                      size=data_cfg.image_size, longest=not train and data_cfg.eval_resize == "longest")


def bucket_by_size(rows: np.ndarray, sizes: np.ndarray, batch_size: int) -> List[np.ndarray]:
    """Batches of ``rows`` whose photos share one transformed ``(h, w)`` (``sizes`` indexed by row), so
    variable-shape images stack without padding, which would change the pooled features. Buckets are taken in
    order of their first row and rows keep their order inside a bucket."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        return []
    keys = sizes[rows, 0] * (1 << 32) + sizes[rows, 1]
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    batches = []
    for bucket in np.argsort(first, kind="stable"):
        members = rows[inverse.reshape(-1) == bucket]
        batches.extend(members[i : i + batch_size] for i in range(0, len(members), batch_size))
    return batches


def _collate_by_shape(items: List[Dict[str, Any]]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``(rows, images)`` per distinct image shape of a batch: exact batching even where a header-predicted
    size was off (a stacked batch needs one shape, and padding would change the pooled features)."""
    groups: Dict[Tuple[int, ...], List[Dict[str, Any]]] = {}
    for item in items:
        groups.setdefault(tuple(item["image"].shape), []).append(item)
    return [(torch.tensor([i["row"] for i in group], dtype=torch.long), torch.stack([i["image"] for i in group]))
            for group in groups.values()]


class FeatureCache:
    """The feature cache of docs/architecture.md, memory-mapped."""

    def __init__(self, folder: str):
        self.folder = Path(folder)
        if not (self.folder / "meta.json").is_file():
            raise FileNotFoundError(f"no feature cache in {folder} (write one with: geoswc train features)")
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self.features = np.load(self.folder / "features.npy", mmap_mode="r")
        self.latlon = np.load(self.folder / "latlon.npy")
        self.labels = np.load(self.folder / "labels.npy")

    def __len__(self) -> int:
        return len(self.latlon)

    def check(self, geocells: Any) -> "FeatureCache":
        if self.meta.get("fingerprint") != str(geocells.fingerprint):
            raise ValueError(
                f"feature cache {self.folder} was labelled with partition {self.meta.get('fingerprint')!r} but "
                f"the given cells have fingerprint {geocells.fingerprint!r}; use the same cells"
            )
        return self


# ------------------------------------------------------------------------------------------- the loop
def accuracy_at(pred_deg: np.ndarray, true_deg: np.ndarray) -> Dict[str, float]:
    """Share of photos within 1 / 25 / 200 / 750 / 2500 km, plus the median error."""
    from geoswc.eval import haversine_km

    pred, true = np.asarray(pred_deg, np.float64), np.asarray(true_deg, np.float64)
    dist = haversine_km(pred[:, 0], pred[:, 1], true[:, 0], true[:, 1])
    out = {f"acc_{r}km": float(np.mean(dist <= r)) for r in RADII_KM}
    out["median_km"] = float(np.median(dist))
    return out


def _head_of(accelerator, model: nn.Module):
    model = accelerator.unwrap_model(model)
    model = getattr(model, "_orig_mod", model)
    return model.head if hasattr(model, "head") and hasattr(model, "backbone") else model


class Batches:
    """Reads one rank's batches, as ``(rows, inputs, labels, latlon)`` on the device, from a feature cache or a
    ``PhotoTable`` (decoded by DataLoader workers)."""

    def __init__(self, source: Any, *, num_workers: int = 0, channels_last: bool = False):
        self.source = source
        self.num_workers = num_workers
        self.channels_last = channels_last

    def __len__(self) -> int:
        return len(self.source)

    def iterate(self, batches: Sequence[np.ndarray], device) -> Iterator[Tuple]:
        src = self.source
        if isinstance(src, FeatureCache):
            for idx in batches:
                idx_sorted = np.sort(idx)
                feats = torch.from_numpy(np.asarray(src.features[idx_sorted], dtype=np.float32))
                yield (torch.from_numpy(idx_sorted), feats.to(device), torch.from_numpy(src.labels[idx_sorted]).to(device),
                       torch.from_numpy(src.latlon[idx_sorted]).to(device))
            return
        loader = torch.utils.data.DataLoader(
            src, batch_sampler=[list(map(int, b)) for b in batches], num_workers=self.num_workers,
            persistent_workers=False, pin_memory=device.type == "cuda", collate_fn=_collate_by_shape,
        )
        for groups in loader:
            for row, images in groups:
                rows = row.numpy()
                images = images.to(device, non_blocking=True)
                if self.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                yield (row, images, torch.from_numpy(src.labels[rows]).to(device),
                       torch.from_numpy(src.latlon[rows]).to(device))

    def eval_batches(self, rows: np.ndarray, batch_size: int) -> List[np.ndarray]:
        """Batches of ``rows`` for evaluation: in order, or bucketed by transformed size for photos whose
        shapes vary (longest-side resize)."""
        rows = np.asarray(rows, dtype=np.int64)
        if isinstance(self.source, PhotoTable) and self.source.longest:
            if getattr(self, "_sizes", None) is None:
                self._sizes = self.source.output_sizes()
            return bucket_by_size(rows, self._sizes, batch_size)
        return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]


def _first_shard_meta(url: str) -> Optional[Dict[str, Any]]:
    """The JSON of a shard's first sample (None for an empty shard), read without touching the rest."""
    import tarfile

    with tarfile.open(url, "r|") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".json"):
                return json.loads(tar.extractfile(member).read())
    return None


class ShardBatches:
    """One rank's batches from webdataset shards (``geoswc data shards --cells``), labels from the shards.

    Training reads a resampled stream of ``len // (batch_size * ranks)`` batches per rank (every rank takes the
    same number of DDP steps); evaluation reads each sample exactly once (`geoswc.data.loading.shard_loader`).
    Every shard's first sample must carry the fingerprint of ``geocells``, unless ``relabel``: then every
    sample's labels are assigned from its coordinates by ``geocells`` and the stored ones are ignored.
    """

    def __init__(self, shards: str, geocells: Any, transform: Callable, *, size: int, shuffle_buffer: int = 0,
                 num_workers: int = 0, channels_last: bool = False, relabel: bool = False):
        from geoswc.data.loading import expand_urls, shard_sample_count

        self.urls = expand_urls(shards)
        if not self.urls:
            raise FileNotFoundError(f"no shards (*.tar) found for {shards!r}")
        absent = [u for u in self.urls if not Path(u).is_file()]
        if absent:
            raise FileNotFoundError(f"shard not found: {absent[0]} ({len(absent)} of {len(self.urls)} missing)")
        self.counts = [shard_sample_count(u) for u in self.urls]
        self.relabel_with = geocells if relabel else None
        expected = str(geocells.fingerprint)
        if not relabel:
            for url in self.urls:
                meta = _first_shard_meta(url)
                if meta is None:
                    continue
                if "labels" not in meta:
                    raise ValueError(f"shard {url} has no cell labels; write the shards with: geoswc data shards "
                                     "--cells CELLS_DIR")
                if str(meta.get("fingerprint")) != expected:
                    raise ValueError(f"shard {url} was labelled with partition {meta.get('fingerprint')!r} but "
                                     f"the given cells have fingerprint {expected!r}; rewrite the shards with these "
                                     "cells, pass the cells they were written with, or --relabel")
        self.transform, self.size = transform, size
        self.shuffle_buffer, self.num_workers, self.channels_last = shuffle_buffer, num_workers, channels_last

    def __len__(self) -> int:
        return int(sum(self.counts))

    def batches_per_rank(self, batch_size: int, num_processes: int) -> int:
        return max(1, len(self) // (batch_size * num_processes))

    def loader(self, *, batch_size: int, accelerator, seed: int = 0, epoch: int = 0, train: bool = True,
               urls: Optional[Sequence[str]] = None, whole: bool = False):
        """The DataLoader of this rank (``whole``: of all of ``urls``, for per-shard extraction)."""
        from geoswc.data.loading import shard_loader

        loader = shard_loader(
            list(urls or self.urls), transform=self.transform, batch_size=batch_size,
            num_workers=self.num_workers, rank=0 if whole else accelerator.process_index,
            world_size=1 if whole else accelerator.num_processes,
            epoch_length=self.batches_per_rank(batch_size, accelerator.num_processes) if train else None,
            shuffle_buffer=self.shuffle_buffer if train else 0, seed=seed, epoch=epoch, decode_target=self.size,
            pin_memory=accelerator.device.type == "cuda",
        )
        return loader if self.relabel_with is None else self._relabelled(loader)

    def _relabelled(self, loader) -> Iterator[Dict[str, Any]]:
        for batch in loader:
            latlon = batch["latlon"].numpy()
            labels = self.relabel_with.assign(latlon[:, 0], latlon[:, 1])
            batch["labels"] = torch.from_numpy(np.asarray(labels, dtype=np.int64).reshape(len(latlon), -1))
            yield batch

    @staticmethod
    def by_shape(batch: Dict[str, Any]) -> Iterator[Tuple[np.ndarray, Dict[str, Any]]]:
        """Split an evaluation batch into sub-batches of one true image shape, each image cropped back from
        the padded canvas (longest-side images differ in shape; padding would change the pooled features)."""
        sizes = batch["image_size"].numpy()
        for size in np.unique(sizes, axis=0):
            idx = np.flatnonzero((sizes == size).all(axis=1))
            h, w = int(size[0]), int(size[1])
            yield idx, {"image": batch["image"][idx, :, :h, :w], "labels": batch["labels"][idx],
                        "latlon": batch["latlon"][idx]}

    def to_device(self, batch: Dict[str, Any], device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images = batch["image"].to(device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, batch["labels"].to(device), batch["latlon"].to(device)


@torch.no_grad()
def predict(accelerator, model: nn.Module, batches: Batches, batch_size: int) -> Dict[str, np.ndarray]:
    """Predicted coordinates for every row, computed by rank and gathered (returned on every rank)."""
    from geoswc.engine import gather_by_row, rank_batches

    model.eval()
    head = _head_of(accelerator, model)
    if isinstance(batches, ShardBatches):
        # Rows only need to be distinct across ranks: rank r numbers its samples from r * len.
        def stream():
            seen = accelerator.process_index * len(batches)
            for batch in batches.loader(batch_size=batch_size, accelerator=accelerator, train=False):
                for idx, group in batches.by_shape(batch):
                    images, labels, latlon = batches.to_device(group, accelerator.device)
                    yield torch.from_numpy(seen + idx), images, labels, latlon
                seen += len(batch["id"])
        items = stream()
    else:
        mine = rank_batches(len(batches), batch_size, epoch=0, seed=0, num_processes=accelerator.num_processes,
                            process_index=accelerator.process_index, shuffle=False, drop_last=False)
        rows_mine = np.concatenate(mine) if mine else np.zeros(0, np.int64)
        items = batches.iterate(batches.eval_batches(rows_mine, batch_size), accelerator.device)
    rows, preds = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, 4, dtype=torch.float64)]
    for row, inputs, _, latlon in items:
        with accelerator.autocast():
            outputs = model(inputs)
        rows.append(row.long())
        preds.append(torch.cat([head.predict_latlon(outputs).double().cpu(), latlon.double().cpu()], dim=1))
    rows_all, preds_all = gather_by_row(accelerator, torch.cat(rows), torch.cat(preds))
    model.train()
    values = preds_all.cpu().numpy()
    return {"rows": rows_all.cpu().numpy(), "latlon": values[:, :2], "true_latlon": values[:, 2:]}


def validate(accelerator, model, batches, batch_size: int) -> Dict[str, float]:
    if batches is None:
        return {}
    out = predict(accelerator, model, batches, batch_size)
    return accuracy_at(out["latlon"], out["true_latlon"])


def _shard_epoch(train: ShardBatches, accelerator, *, batch_size: int, seed: int, epoch: int, skip: int):
    """One epoch of shard batches on the device, the first ``skip`` (done before a resume) read and dropped.

    The sample order of an epoch depends only on ``(seed, epoch, rank, worker)``, so a resumed run sees the
    same remaining samples; the dropped batches are still decoded (the stream has no random access).
    """
    for i, batch in enumerate(train.loader(batch_size=batch_size, accelerator=accelerator, seed=seed, epoch=epoch)):
        if i < skip:
            continue
        yield (batch["id"], *train.to_device(batch, accelerator.device))


def fit(
    accelerator,
    model: nn.Module,
    optimizer,
    scheduler,
    *,
    train: Batches,
    batch_size: int,
    epochs: int,
    seed: int,
    out_dir: Path,
    name: str,
    schedule_per: str,
    val: Optional[Batches] = None,
    resume: bool = False,
    max_steps: Optional[int] = None,
    checkpoint_every: int = 0,
    meta: Optional[Dict[str, Any]] = None,
) -> Optional[Dict[str, Any]]:
    """Train ``model`` (already ``prepare``d) with the loss of its head; ``None`` when stopped by ``max_steps``.

    Returns:
        A summary: per-epoch loss, validation accuracy and images/s, and whether all ranks agree on the weights.
    """
    from geoswc.engine import (
        Checkpointer, EpochProgress, TrainPosition, current_lr, rank_batches, ranks_agree, sync_buffers,
    )

    ckpt = Checkpointer(accelerator, out_dir / "checkpoints" / name, every_steps=checkpoint_every, meta=meta)
    position = ckpt.restore() if resume and ckpt.exists() else TrainPosition()
    if resume and position.global_step:
        logger.info("resuming %s at epoch %d step %d", name, position.epoch, position.step)
    head = _head_of(accelerator, model)
    history: List[Dict[str, float]] = []
    history_file = out_dir / f"history_{name}.json"
    if resume and history_file.is_file():
        history = json.loads(history_file.read_text())
    model.train()
    for epoch in range(position.epoch, epochs):
        if isinstance(train, ShardBatches):
            n_batches = train.batches_per_rank(batch_size, accelerator.num_processes)
            items = _shard_epoch(train, accelerator, batch_size=batch_size, seed=seed, epoch=epoch,
                                 skip=position.step)
        else:
            batches = rank_batches(len(train), batch_size, epoch=epoch, seed=seed,
                                   num_processes=accelerator.num_processes, process_index=accelerator.process_index)
            n_batches = len(batches)
            items = train.iterate(batches[position.step:], accelerator.device)
        bar = EpochProgress(accelerator, n_batches, epoch=epoch, epochs=epochs, desc=name)
        bar.bar.update(position.step)
        loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
        seen = 0
        for _, inputs, labels, latlon in items:
            with accelerator.autocast():
                outputs = model(inputs)
            loss = head.loss(outputs, labels, latlon)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if schedule_per == "step":
                scheduler.step()
            position.advance()
            loss_sum += loss.detach().double()
            seen += 1
            bar.update(len(labels), loss=loss.item(), lr=current_lr(optimizer))
            if ckpt.due(position):
                ckpt.save(position)
            if max_steps is not None and position.global_step >= max_steps:
                bar.close()
                ckpt.save(position)
                return None
        bar.close()
        if schedule_per == "epoch":
            scheduler.step()
        mean_loss = float(accelerator.reduce(loss_sum / max(seen, 1), reduction="mean")) if seen else float("nan")
        record = {"epoch": epoch + 1, "loss": mean_loss, "lr": current_lr(optimizer), "images_per_s": bar.images_per_s}
        sync_buffers(accelerator, model)
        record.update(validate(accelerator, model, val, batch_size))
        history.append(record)
        accelerator.log({k: v for k, v in record.items() if k != "epoch"}, step=epoch + 1)
        if accelerator.is_main_process:
            bar.bar.write(f"{name} epoch {epoch + 1}/{epochs}: " + ", ".join(
                f"{k}={v:.4g}" for k, v in record.items() if k != "epoch"))
            history_file.write_text(json.dumps(history, indent=2) + "\n")
        position.next_epoch()
        ckpt.save(position)
    return {"history": history, "ranks_identical": ranks_agree(accelerator, model),
            "num_processes": accelerator.num_processes}


# ------------------------------------------------------------------------------------------- stages
def _setup(args, stage: str):
    from geoswc.engine import build_accelerator, seed_everything

    cfg = resolve_config(args.preset, args.config, args.set or [])
    out = Path(args.out)
    accelerator = build_accelerator(cfg.train, cpu=args.cpu, out_dir=out, log_with=args.log_with or (),
                                    run_name=stage)
    seed_everything(cfg.train.seed)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.yaml")
    return cfg, out, accelerator


def _write_summary(accelerator, out: Path, stage: str, summary: Dict[str, Any]) -> None:
    if accelerator.is_main_process:
        (out / f"train_{stage}.json").write_text(json.dumps(summary, indent=2) + "\n")
        if not summary.get("ranks_identical", True):
            logger.error("ranks ended with different weights")


def _backbone_from_model_dir(model_dir: Path):
    from geoswc.classifiers import create_backbone, load_backbone_weights

    spec_file = model_dir / "backbone.json"
    if not spec_file.is_file():
        raise FileNotFoundError(f"no backbone.json in {model_dir} (train one with: geoswc train backbone)")
    spec = json.loads(spec_file.read_text())
    backbone = create_backbone(spec["model"], pretrained=False)
    load_backbone_weights(backbone, model_dir / BACKBONE_FILE)
    return backbone


def _save_backbone(backbone: nn.Module, out: Path, *, name: str, fingerprint: str, cfg: Config) -> None:
    from timm.data import resolve_model_data_config

    from geoswc.engine import save_weights

    save_weights(backbone, out / BACKBONE_FILE, fingerprint=fingerprint, config=cfg, metadata={"model": name})
    spec = {"model": name, "num_features": int(backbone.num_features),
            "data_config": {k: list(v) if isinstance(v, tuple) else v
                            for k, v in resolve_model_data_config(backbone).items()}}
    (out / "backbone.json").write_text(json.dumps(spec, indent=2) + "\n")


def _image_sources(args, cells, backbone: nn.Module, cfg: Config):
    """Training and validation photos: webdataset shards (``--shards``/``--val-shards``) or metadata CSV +
    image folder (``--train-csv``/``--val-csv`` with ``--images``)."""
    dc, workers, cl = cfg.data, cfg.data.num_workers, cfg.train.channels_last
    if bool(args.shards) == bool(args.train_csv):
        raise ValueError("give the training photos either as --shards or as --train-csv with --images")
    if args.train_csv and not args.images:
        raise ValueError("--train-csv needs --images (the image root the IMG_IDs are relative to)")
    if args.shards:
        train = ShardBatches(args.shards, cells, build_image_transform(backbone, dc, train=True),
                             size=dc.image_size, shuffle_buffer=dc.shuffle_buffer, num_workers=workers,
                             channels_last=cl, relabel=args.relabel)
    else:
        train = Batches(photo_table(args.train_csv, args.images, cells, backbone, dc, train=True),
                        num_workers=workers, channels_last=cl)
    val = None
    if getattr(args, "val_shards", None):
        val = ShardBatches(args.val_shards, cells, build_image_transform(backbone, dc, train=False),
                           size=dc.image_size, num_workers=workers, channels_last=cl, relabel=args.relabel)
    elif args.val_csv:
        if not (args.val_images or args.images):
            raise ValueError("--val-csv needs --val-images or --images")
        val = Batches(photo_table(args.val_csv, args.val_images or args.images, cells, backbone, dc, train=False),
                      num_workers=workers, channels_last=cl)
    return train, val


def run_backbone(args) -> int:
    """Stage 1: backbone + CE head over the finest partition, end to end on images (paper 4.2)."""
    from geoswc.classifiers import CellClassifier, create_backbone, create_head, save_head
    from geoswc.engine import prepare_for_speed

    cfg, out, accelerator = _setup(args, "backbone")
    cells = load_cells(args.cells)
    bc = cfg.backbone
    weights = args.backbone_weights or bc.weights
    backbone = create_backbone(bc.model, pretrained=bc.pretrained and weights is None, weights=weights)
    model = CellClassifier(backbone, create_head("ce", in_features=backbone.num_features, geocells=cells))
    train, val = _image_sources(args, cells, backbone, cfg)
    model = prepare_for_speed(model, cfg.train, accelerator)
    optimizer = torch.optim.SGD(model.parameters(), lr=bc.lr, momentum=bc.momentum, weight_decay=bc.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=bc.lr_step_epochs, gamma=bc.lr_gamma)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    summary = fit(accelerator, model, optimizer, scheduler, train=train, val=val, batch_size=bc.batch_size,
                  epochs=bc.epochs, seed=cfg.train.seed, out_dir=out, name="backbone", schedule_per="epoch",
                  resume=args.resume, max_steps=args.max_steps, checkpoint_every=args.checkpoint_every,
                  meta={"fingerprint": cells.fingerprint, "model": bc.model})
    if summary is None:
        return 0
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        trained = accelerator.unwrap_model(model)
        trained = getattr(trained, "_orig_mod", trained)
        _save_backbone(trained.backbone, out, name=bc.model, fingerprint=cells.fingerprint, cfg=cfg)
        save_head(trained.head, out / "heads" / "ce.safetensors", config=cfg)
        cells.save(out / "cells")
    _write_summary(accelerator, out, "backbone", summary)
    from geoswc.engine import finish_trackers

    finish_trackers(accelerator)
    return 0


def run_features(args) -> int:
    """Stage 2: pooled backbone features of a photo set, written as the feature cache (resumable by part)."""
    from geoswc.classifiers import create_backbone

    cfg, out, accelerator = _setup(args, "features")
    cells = load_cells(args.cells)
    if args.model:
        backbone = _backbone_from_model_dir(Path(args.model))
        model_name = json.loads((Path(args.model) / "backbone.json").read_text())["model"]
    else:
        model_name = cfg.backbone.model
        weights = args.backbone_weights or cfg.backbone.weights
        backbone = create_backbone(model_name, pretrained=cfg.backbone.pretrained and weights is None,
                                   weights=weights)
    batch_size = args.batch_size or cfg.heads.batch_size
    if bool(args.shards) == bool(args.csv):
        raise ValueError("give the photos either as --shards or as --csv with --images")
    if args.shards:
        shards = ShardBatches(args.shards, cells, build_image_transform(backbone, cfg.data, train=False),
                              size=cfg.data.image_size, num_workers=cfg.data.num_workers,
                              channels_last=cfg.train.channels_last, relabel=args.relabel)
        summary = extract_shard_features(accelerator, backbone, shards, out, cfg=cfg, model_name=model_name,
                                         fingerprint=cells.fingerprint, batch_size=batch_size)
    else:
        if not args.images:
            raise ValueError("--csv needs --images (the image root the IMG_IDs are relative to)")
        table = photo_table(args.csv, args.images, cells, backbone, cfg.data, train=False)
        summary = extract_features(accelerator, backbone, table, out, cfg=cfg, model_name=model_name,
                                   fingerprint=cells.fingerprint, part_size=args.part_size, batch_size=batch_size)
    _write_summary(accelerator, out, "features", summary)
    return 0


def extract_features(accelerator, backbone: nn.Module, table: PhotoTable, out: Path, *, cfg: Config,
                     model_name: str, fingerprint: str, part_size: int, batch_size: int) -> Dict[str, Any]:
    """Each rank embeds its parts of ``part_size`` rows into ``out/parts/``; rank 0 merges them. Parts already
    on disk are skipped, so an interrupted extraction resumes where it stopped."""
    from geoswc.engine import prepare_for_speed

    key = {"photos": _digest(table.ids, table.latlon), "images": str(table.root), "backbone": model_name,
           "weights": _weights_digest(backbone), "image_size": cfg.data.image_size,
           "eval_resize": cfg.data.eval_resize, "part_size": part_size}
    model = prepare_for_speed(backbone, cfg.train, accelerator).eval()
    parts_dir = out / "parts"
    _claim_parts(accelerator, parts_dir, key)
    n = len(table)
    n_parts = max(1, math.ceil(n / part_size))
    reader = Batches(table, num_workers=cfg.data.num_workers, channels_last=cfg.train.channels_last)
    start, images = time.perf_counter(), 0
    from tqdm.auto import tqdm

    mine = list(range(accelerator.process_index, n_parts, accelerator.num_processes))
    for part in tqdm(mine, desc="features", disable=not accelerator.is_main_process):
        target = parts_dir / f"part_{part:05d}.npy"
        if target.is_file():
            continue
        rows = np.arange(part * part_size, min(n, (part + 1) * part_size))
        block = np.zeros((len(rows), int(backbone.num_features)), dtype=np.float16)
        with torch.no_grad():
            for row, inputs, _, _ in reader.iterate(reader.eval_batches(rows, batch_size), accelerator.device):
                with accelerator.autocast():
                    block[row.numpy() - rows[0]] = model(inputs).float().cpu().numpy().astype(np.float16)
                images += len(inputs)
        tmp = parts_dir / f"part_{part:05d}.tmp.npy"
        np.save(tmp, block)
        tmp.rename(target)
    elapsed = time.perf_counter() - start
    accelerator.wait_for_everyone()
    dim = int(backbone.num_features)
    if accelerator.is_main_process:
        merge_image_parts(parts_dir, out, latlon=table.latlon, labels=table.labels, ids=table.ids,
                          authors=table.authors, part_size=part_size, dim=dim)
        _write_meta(out, {"fingerprint": str(fingerprint), "backbone": model_name, "dim": dim, "count": n,
                          "image_size": cfg.data.image_size})
        shutil.rmtree(parts_dir)
    accelerator.wait_for_everyone()
    return {"count": n, "dim": dim, "images_per_s_rank0": images / max(elapsed, 1e-9),
            "num_processes": accelerator.num_processes}


def extract_shard_features(accelerator, backbone: nn.Module, shards: ShardBatches, out: Path, *, cfg: Config,
                           model_name: str, fingerprint: str, batch_size: int) -> Dict[str, Any]:
    """Features of a shard set: one resumable part per shard (ranks take shards in turn), each holding the
    shard's features, ids, coordinates, labels and authors; rank 0 merges them in shard order."""
    from tqdm.auto import tqdm

    from geoswc.engine import prepare_for_speed

    key = {"shards": [[url, _file_size(url)] for url in shards.urls], "relabel": shards.relabel_with is not None,
           "cells": str(fingerprint), "backbone": model_name, "weights": _weights_digest(backbone),
           "image_size": cfg.data.image_size, "eval_resize": cfg.data.eval_resize}
    model = prepare_for_speed(backbone, cfg.train, accelerator).eval()
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
        loader = shards.loader(batch_size=batch_size, accelerator=accelerator, train=False,
                               urls=[shards.urls[part]], whole=True)
        with torch.no_grad():
            for batch in loader:
                block = np.zeros((len(batch["id"]), dim), dtype=np.float16)
                for idx, group in shards.by_shape(batch):
                    with accelerator.autocast():
                        block[idx] = model(shards.to_device(group, accelerator.device)[0]).float().cpu().numpy()
                feats.append(block)
                _, batch_labels, batch_latlon = batch["image"], batch["labels"], batch["latlon"]
                ids += batch["id"]
                authors += batch["author"]
                latlon.append(batch_latlon.numpy())
                labels.append(batch_labels.numpy())
                images += len(block)
        n_gran = labels[0].shape[1] if labels else 0
        tmp = parts_dir / f"part_{part:05d}.tmp.npz"
        with open(tmp, "wb") as f:
            np.savez(f, features=np.concatenate(feats), ids=np.asarray(ids, dtype=str),
                     authors=np.asarray(authors, dtype=str),
                     latlon=np.concatenate(latlon) if latlon else np.zeros((0, 2)),
                     labels=np.concatenate(labels) if labels else np.zeros((0, n_gran), np.int64))
        tmp.rename(target)
    elapsed = time.perf_counter() - start
    accelerator.wait_for_everyone()
    n = 0
    if accelerator.is_main_process:
        n = merge_shard_parts(parts_dir, out, n_parts=len(shards.urls), dim=dim)
        _write_meta(out, {"fingerprint": str(fingerprint), "backbone": model_name, "dim": dim, "count": n,
                          "image_size": cfg.data.image_size})
        shutil.rmtree(parts_dir)
    accelerator.wait_for_everyone()
    return {"count": n or len(shards), "dim": dim, "images_per_s_rank0": images / max(elapsed, 1e-9),
            "num_processes": accelerator.num_processes}


def _digest(*arrays: Any) -> str:
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    for array in arrays:
        if isinstance(array, np.ndarray) and array.dtype != object:
            digest.update(np.ascontiguousarray(array).tobytes())
        else:
            digest.update("\n".join(map(str, array)).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _weights_digest(module: nn.Module) -> str:
    """A digest of a module's weights (about 0.1 s for EfficientNet-B4)."""
    return _digest(*(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
                     for t in module.state_dict().values()))


def _file_size(path: str) -> int:
    return os.path.getsize(path) if os.path.exists(path) else -1


def _claim_parts(accelerator, parts_dir: Path, key: Dict[str, Any]) -> None:
    """Make ``parts_dir`` hold only parts made with ``key`` (inputs, weights, sizes): parts left by a run with
    other inputs or another backbone would otherwise be merged into this cache as if they were its own."""
    if accelerator.is_main_process:
        key_file = parts_dir / "key.json"
        if parts_dir.is_dir() and any(parts_dir.iterdir()):
            previous = json.loads(key_file.read_text()) if key_file.is_file() else None
            if previous != key:
                changed = sorted(k for k in key if previous is None or previous.get(k) != key[k])
                logger.warning("%s holds parts of a run with other %s: starting the features over", parts_dir,
                               ", ".join(changed) or "settings")
                shutil.rmtree(parts_dir)
        parts_dir.mkdir(parents=True, exist_ok=True)
        if not key_file.is_file():
            tmp = parts_dir / "key.tmp.json"
            tmp.write_text(json.dumps(key, indent=2) + "\n")
            os.replace(tmp, key_file)
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------- merging the parts
# The cache is written in parts (one process each, resumable) and merged by rank 0. The merge streams: at MP16
# scale the features alone are ~17 GB. A folder's meta.json marks a complete cache: the merge removes it first
# and writes every file under a temporary name, renamed into place once complete; the caller writes meta.json
# last. A merge killed midway leaves no meta.json and the parts in place, so the next run merges again.
CACHE_ARRAYS = {"features": np.float16, "latlon": np.float64, "labels": np.int64}
CACHE_LINES = ("ids", "authors")


def merge_image_parts(parts_dir: Path, out: Path, *, latlon: np.ndarray, labels: np.ndarray,
                      ids: Sequence[str], authors: Sequence[str], part_size: int, dim: int) -> None:
    """Writes the cache files of ``out`` from the parts of `extract_features` (``part_NNNNN.npy``, features of
    ``part_size`` consecutive rows) and the photo table's coordinates, labels, ids and authors. The table's
    arrays are in memory already and are saved as they are: the coordinates come from pandas in Fortran order,
    and their file keeps it."""
    n = len(latlon)
    n_parts = max(1, math.ceil(n / part_size))

    def blocks() -> Iterator[dict[str, Any]]:
        for part in range(n_parts):
            path = parts_dir / f"part_{part:05d}.npy"
            rows = slice(part * part_size, min(n, (part + 1) * part_size))
            features = np.load(path, mmap_mode="r")
            if features.shape != (rows.stop - rows.start, dim):
                raise ValueError(
                    f"{path} holds features of shape {features.shape}, not rows {rows.start}-{rows.stop} "
                    f"of {dim} features (--part-size {part_size}): a run with other settings left it; "
                    f"remove {parts_dir} and run again"
                )
            yield {"features": features, "ids": ids[rows], "authors": authors[rows]}

    _write_cache(out, blocks(), count=n, dim=dim, label_shape=labels.shape[1:],
                 whole={"latlon": latlon, "labels": labels})


def merge_shard_parts(parts_dir: Path, out: Path, *, n_parts: int, dim: int) -> int:
    """Writes the cache files of ``out`` from the parts of `extract_shard_features` (``part_NNNNN.npz``, one
    per shard, each holding its features, ids, authors, coordinates and labels) in shard order; returns the
    number of rows. Sizes come from the arrays' headers, so only one part at a time is read."""
    paths = [parts_dir / f"part_{part:05d}.npz" for part in range(n_parts)]
    shapes = [_npz_shapes(path) for path in paths]
    rows = [shape["latlon"][0] for shape in shapes]
    # an empty shard's labels are (0, 0): the first non-empty part gives the number of granularities
    label_shape = next(((math.prod(shape["labels"]) // k,) for shape, k in zip(shapes, rows) if k), (0,))

    def blocks() -> Iterator[dict[str, Any]]:
        for path, k in zip(paths, rows):
            if k:
                with np.load(path) as part:
                    yield {"features": part["features"], "latlon": part["latlon"],
                           "labels": part["labels"].reshape(k, -1), "ids": part["ids"],
                           "authors": part["authors"]}

    _write_cache(out, blocks(), count=sum(rows), dim=dim, label_shape=label_shape)
    return sum(rows)


def _npz_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Shapes of the arrays of an uncompressed or compressed ``.npz``, from their headers."""
    shapes = {}
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            with archive.open(member) as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shapes[member.removesuffix(".npy")] = read_header(f)[0]
    return shapes


@contextlib.contextmanager
def _npy_writer(path: Path, dtype: Any, shape: tuple[int, ...]) -> Iterator[IO[bytes]]:
    """A binary file positioned at the data of a new ``.npy`` of ``shape``, preallocated with the header
    np.save writes. Rows are written through the file, not the map: copied pages then sit in the page cache
    instead of this process's resident memory."""
    offset = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape).offset
    with open(path, "r+b") as f:
        f.seek(offset)
        yield f


def _write_cache(out: Path, blocks: Iterable[dict[str, Any]], *, count: int, dim: int,
                 label_shape: tuple[int, ...], whole: dict[str, np.ndarray] | None = None) -> None:
    """Streams ``blocks`` (dicts of consecutive rows of the cache files) into ``features.npy``,
    ``latlon.npy``, ``labels.npy``, ``ids.txt`` and ``authors.txt`` of ``out``: the same files an in-memory
    concatenation would give. Arrays in ``whole`` are complete already: they are saved as they are and left
    out of the blocks. See the note above on meta.json and the temporary names."""
    whole = whole or {}
    (out / "meta.json").unlink(missing_ok=True)
    shapes = {"features": (count, dim), "latlon": (count, 2), "labels": (count, *label_shape)}
    streamed = {name: dtype for name, dtype in CACHE_ARRAYS.items() if name not in whole}
    for name, array in whole.items():
        assert array.shape == shapes[name], (name, array.shape, shapes[name])
        np.save(out / f"{name}.tmp.npy", np.asarray(array, dtype=CACHE_ARRAYS[name]))
    written = 0
    with contextlib.ExitStack() as stack:
        files: dict[str, IO] = {
            name: stack.enter_context(_npy_writer(out / f"{name}.tmp.npy", dtype, shapes[name]))
            for name, dtype in streamed.items()
        }
        files.update({name: stack.enter_context(open(out / f"{name}.tmp.txt", "w")) for name in CACHE_LINES})
        for block in blocks:
            k = len(block["ids"])
            for name, dtype in streamed.items():
                rows = np.ascontiguousarray(block[name], dtype=dtype)
                assert rows.shape == (k, *shapes[name][1:]), (name, rows.shape, shapes[name])
                files[name].write(memoryview(rows))
            for name in CACHE_LINES:
                assert len(block[name]) == k, (name, len(block[name]), k)
                files[name].writelines(f"{value}\n" for value in block[name])
            written += k
    assert written == count, (written, count)
    for name in CACHE_ARRAYS:
        os.replace(out / f"{name}.tmp.npy", out / f"{name}.npy")
    for name in CACHE_LINES:
        os.replace(out / f"{name}.tmp.txt", out / f"{name}.txt")


def _write_meta(out: Path, meta: dict[str, Any]) -> None:
    """Writes ``meta.json``, the mark of a complete cache, atomically."""
    tmp = out / "meta.tmp.json"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out / "meta.json")


def run_heads(args) -> int:
    """Stage 3: heads on the frozen backbone (paper 4.2: AdamW, cosine, 5 epochs), MvMF initialised from CE."""
    from geoswc.classifiers import CellClassifier, create_head, load_head, save_head
    from geoswc.engine import prepare_for_speed

    cfg, out, accelerator = _setup(args, "heads")
    cells = load_cells(args.cells)
    hc = cfg.heads
    kinds = list(args.kinds or hc.kinds)
    from geoswc.classifiers import HEADS

    for kind in kinds:
        if kind not in HEADS:
            raise ValueError(f"unknown head {kind!r}; choose one of: {', '.join(HEADS)}")
    if "mvmf" in kinds and "ce" in kinds:
        kinds = ["ce"] + [k for k in kinds if k != "ce"]  # the MvMF layer starts from the trained CE layer
    from_features = hc.from_features and not args.on_images
    backbone = None
    if from_features:
        if not args.features:
            raise ValueError("heads from cached features need --features (or --on-images with --train-csv)")
        train = Batches(FeatureCache(args.features).check(cells))
        val = Batches(FeatureCache(args.val_features).check(cells)) if args.val_features else None
        in_features = int(train.source.meta["dim"])
    else:
        if not (args.model and (args.shards or (args.train_csv and args.images))):
            raise ValueError("heads on images need --model (a backbone stage folder) and --shards or "
                             "--train-csv with --images")
        backbone = _backbone_from_model_dir(Path(args.model))
        in_features = int(backbone.num_features)
        train, val = _image_sources(args, cells, backbone, cfg)
    summaries: Dict[str, Any] = {}
    ce_head = None
    reuse = Path(args.model) / "heads" / "ce.safetensors" if args.model else None
    for kind in kinds:
        if kind == "ce" and reuse is not None and reuse.is_file() and not args.train_ce:
            ce_head = load_head(reuse, geocells=cells)
            if accelerator.is_main_process:
                save_head(ce_head, out / "heads" / "ce.safetensors", config=cfg)
            summaries["ce"] = {"reused": str(reuse), **({"val": validate_head(accelerator, ce_head, backbone, val,
                                                                               hc.batch_size)} if val else {})}
            continue
        head = create_head(kind, in_features=in_features, geocells=cells)
        if kind == "ce" and reuse is not None and reuse.is_file():
            head = load_head(reuse, geocells=cells)  # fine-tune the backbone's CE layer
        if kind == "mvmf" and ce_head is not None:
            head.init_from_classifier(ce_head)
        model = head if backbone is None else CellClassifier(backbone, head, freeze_backbone=True)
        model = prepare_for_speed(model, cfg.train, accelerator) if backbone is not None else model.to(accelerator.device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=hc.lr, weight_decay=hc.weight_decay)
        steps = hc.epochs * max(1, len(train) // (hc.batch_size * accelerator.num_processes))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        summary = fit(accelerator, model, optimizer, scheduler, train=train, val=val, batch_size=hc.batch_size,
                      epochs=hc.epochs, seed=cfg.train.seed, out_dir=out, name=kind, schedule_per="step",
                      resume=args.resume, max_steps=args.max_steps, checkpoint_every=args.checkpoint_every,
                      meta={"fingerprint": cells.fingerprint, "kind": kind})
        if summary is None:
            return 0
        trained = _head_of(accelerator, model)
        if kind == "ce":
            ce_head = trained
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_head(trained, out / "heads" / f"{kind}.safetensors", config=cfg)
        summaries[kind] = summary
    if accelerator.is_main_process:
        cells.save(out / "cells")
    _write_summary(accelerator, out, "heads", {
        "heads": summaries, "ranks_identical": all(s.get("ranks_identical", True) for s in summaries.values())})
    from geoswc.engine import finish_trackers

    finish_trackers(accelerator)
    return 0


def validate_head(accelerator, head: nn.Module, backbone: Optional[nn.Module], val: Batches, batch_size: int):
    from geoswc.classifiers import CellClassifier

    model = head if backbone is None else CellClassifier(backbone, head, freeze_backbone=True)
    return validate(accelerator, model.to(accelerator.device), val, batch_size)


# ---------------------------------------------------------------------------------------------- CLI
def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cells", required=True, help="Geocells folder (geoswc cells build)")
    parser.add_argument("--out", required=True, help="output folder (weights, config, checkpoints, logs)")
    parser.add_argument("--preset", help="configuration preset: paper (default values) or tiny")
    parser.add_argument("--config", help="YAML/JSON configuration file applied after the preset")
    parser.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override one setting")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is available")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    parser.add_argument("--log-with", nargs="+", choices=("tensorboard", "csv"), help="metric trackers")
    parser.add_argument("--max-steps", type=int, help="stop (with a checkpoint) after this many optimizer steps")
    parser.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                        help="also checkpoint every STEPS optimizer steps (default: at epoch ends)")


def _images(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", metavar="DIR_OR_PATTERN",
                        help="training shards (geoswc data shards --cells): a folder of *.tar or a brace pattern; "
                             "instead of --train-csv/--images")
    parser.add_argument("--val-shards", metavar="DIR_OR_PATTERN", help="validation shards (instead of --val-csv)")
    _relabel(parser)
    parser.add_argument("--train-csv", help="training metadata (IMG_ID, AUTHOR, LAT, LON)")
    parser.add_argument("--images", help="image root the IMG_IDs are relative to")
    parser.add_argument("--val-csv", help="validation metadata: accuracy at 1/25/200/750/2500 km each epoch")
    parser.add_argument("--val-images", help="image root of --val-csv (default: --images)")


def _relabel(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--relabel", action="store_true",
                        help="label shard samples from their lat/lon with --cells, ignoring the labels stored in "
                             "the shards (shards written without --cells or with another partition)")


def add_stage_parsers(stages) -> None:
    p = stages.add_parser("backbone", help="train the backbone with CE over the finest partition")
    _common(p)
    _images(p)
    p.add_argument("--backbone-weights", help="local ImageNet weights (.safetensors/.pth) to start from")
    p.set_defaults(func=run_backbone)

    p = stages.add_parser("features", help="extract pooled backbone features into a feature cache")
    _common(p)
    p.add_argument("--csv", help="metadata of the photos to embed")
    p.add_argument("--images", help="image root the IMG_IDs are relative to")
    p.add_argument("--shards", metavar="DIR_OR_PATTERN",
                   help="shards to embed (geoswc data shards --cells) instead of --csv/--images")
    _relabel(p)
    p.add_argument("--model", help="backbone stage output folder (default: the configured timm backbone)")
    p.add_argument("--backbone-weights", help="local ImageNet weights when --model is not given")
    p.add_argument("--part-size", type=int, default=4096, help="rows per resumable part")
    p.add_argument("--batch-size", type=int, help="images per forward pass")
    p.set_defaults(func=run_features)

    p = stages.add_parser("heads", help="train CE/HC/MvMF heads on the frozen backbone")
    _common(p)
    p.add_argument("--features", help="feature cache of the training photos (geoswc train features)")
    p.add_argument("--val-features", help="feature cache of validation photos")
    p.add_argument("--kinds", nargs="+", help="heads to train (default: heads.kinds)")
    p.add_argument("--model", help="backbone stage folder: its CE layer is reused as the ce head")
    p.add_argument("--train-ce", action="store_true", help="fine-tune the reused CE layer instead of copying it")
    p.add_argument("--on-images", action="store_true", help="train end to end on augmented images")
    _images(p)
    p.set_defaults(func=run_heads)

    if importlib.util.find_spec("geoswc.train_retrieval") is not None:
        retrieval = importlib.import_module("geoswc.train_retrieval")
        p = stages.add_parser("retrieval", help="train the residual retrieval module")
        retrieval.add_arguments(p)
        p.set_defaults(func=retrieval.run)


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train backbone, features, heads (and retrieval)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stages = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    add_stage_parsers(stages)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``accelerate launch -m geoswc.train STAGE ...``: the same stages as ``geoswc train``."""
    parser = argparse.ArgumentParser(prog="geoswc.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="count", default=0)
    stages = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    add_stage_parsers(stages)
    args = parser.parse_args(argv)
    args.command = "train"
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"geoswc train {args.stage}: error: {err}", file=sys.stderr)
        return 2
    finally:
        from geoswc.cli import close_process_group

        close_process_group()


if __name__ == "__main__":
    sys.exit(main())
