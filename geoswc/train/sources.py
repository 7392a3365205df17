"""Where the training stages read their inputs: photo files listed in a metadata CSV, webdataset shards, or
a feature cache; each yields one process's batches as ``(rows, inputs, labels, latlon)`` on the device.

Photos go through the one photo path of `geoswc.data.photos`: training batches (fixed-size crops) stack as
they are, evaluation batches (the paper's longest-side resize) are grouped by shape.
"""

from __future__ import annotations

import json
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from accelerate import Accelerator
from timm.data import resolve_model_data_config
from torch import nn
from torch.utils.data import DataLoader

from geoswc.data.features import FeatureCache
from geoswc.data.images import image_path
from geoswc.data.loading import expand_urls, shard_loader, shard_sample_count
from geoswc.data.metadata import read_metadata
from geoswc.data.photos import PhotoBatch, PhotoDataset, group_by_shape, photo_batches
from geoswc.data.transforms import build_transform
from geoswc.eval import accuracy_at
from geoswc.train.distributed import gather_by_row, rank_batches

logger = logging.getLogger(__name__)

# One batch of a process: dataset rows, model inputs (images or features), labels (B, n_gran), latlon (B, 2).
Batch = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Photos:
    """Where a stage reads photos: a metadata CSV (``IMG_ID, AUTHOR, LAT, LON``) under an image root, or
    webdataset shards (``geoswc data shards``; ``relabel``: label every sample from its coordinates instead of
    the labels stored in the shards)."""

    csv: Optional[Path] = None
    images: Optional[Path] = None
    shards: Optional[str] = None
    relabel: bool = False

    def __post_init__(self):
        if (self.csv is None) == (self.shards is None):
            raise ValueError("give the photos either as a metadata CSV with an image folder or as shards")
        if self.csv is not None and self.images is None:
            raise ValueError(f"{self.csv} needs an image folder (the root its IMG_IDs are relative to)")

    @classmethod
    def from_csv(cls, csv: Union[str, Path], images: Union[str, Path]) -> "Photos":
        return cls(csv=Path(csv), images=Path(images))

    @classmethod
    def from_shards(cls, shards: str, *, relabel: bool = False) -> "Photos":
        return cls(shards=str(shards), relabel=relabel)


def build_image_transform(backbone: nn.Module, data_cfg: Any, *, train: bool) -> Callable:
    """The input transform from the backbone's own data config (mean/std), at ``data.image_size``."""
    return build_transform(
        resolve_model_data_config(backbone),
        train=train,
        size=data_cfg.image_size,
        eval_resize=data_cfg.eval_resize,
        crop_scale=tuple(data_cfg.crop_scale),
        crop_ratio=tuple(data_cfg.crop_ratio),
        hflip=data_cfg.hflip,
    )


class PhotoTable:
    """Photos of a metadata CSV under an image root, with their cell labels.

    Coordinates, labels and ids stay in arrays indexed by row; the photos are read by a `PhotoDataset`.
    """

    def __init__(
        self, csv_path: Union[str, Path], image_root: Union[str, Path], geocells: Any, transform: Callable
    ):
        frame = read_metadata(csv_path)
        self.root = Path(image_root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {image_root}")
        self.ids = frame["IMG_ID"].astype(str).tolist()
        self.authors = frame["AUTHOR"].astype(str).tolist() if "AUTHOR" in frame else [""] * len(self.ids)
        self.latlon = frame[["LAT", "LON"]].to_numpy(np.float64)
        self.labels = np.asarray(geocells.assign(self.latlon[:, 0], self.latlon[:, 1]), dtype=np.int64)
        self.photos = PhotoDataset([image_path(self.root, i) for i in self.ids], transform)

    def __len__(self) -> int:
        return len(self.ids)


def _checked(dataset: PhotoDataset, errors: Dict[int, str]) -> None:
    """Training reads only photos the data stage found; one that cannot be read stops the run, named."""
    if errors:
        index = min(errors)
        raise ValueError(
            f"cannot read training photo {dataset.describe(index)}: {errors[index]} "
            f"({len(errors)} unreadable in this batch)"
        )


class Batches:
    """One process's batches, as ``(rows, inputs, labels, latlon)`` on the device, from a feature cache or a
    `PhotoTable` (decoded by DataLoader workers)."""

    def __init__(
        self, source: Union[FeatureCache, PhotoTable], *, num_workers: int = 0, channels_last: bool = False
    ):
        self.source = source
        self.num_workers = num_workers
        self.channels_last = channels_last

    def __len__(self) -> int:
        return len(self.source)

    def _images(self, rows: np.ndarray, images: torch.Tensor, device) -> Batch:
        images = images.to(device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        src = self.source
        return (
            torch.from_numpy(rows),
            images,
            torch.from_numpy(src.labels[rows]).to(device),
            torch.from_numpy(src.latlon[rows]).to(device),
        )

    def _features(self, rows: np.ndarray, device) -> Batch:
        src = self.source
        rows = np.sort(rows)  # reads a memory-mapped cache in file order
        features = torch.from_numpy(np.asarray(src.features[rows], dtype=np.float32))
        return (
            torch.from_numpy(rows),
            features.to(device),
            torch.from_numpy(src.labels[rows]).to(device),
            torch.from_numpy(src.latlon[rows]).to(device),
        )

    def iterate(self, batches: Sequence[np.ndarray], device) -> Iterator[Batch]:
        """Training batches: each of ``batches`` (rows) as one batch (training crops share one shape)."""
        if isinstance(self.source, FeatureCache):
            for rows in batches:
                yield self._features(rows, device)
            return
        photos = self.source.photos
        loader = DataLoader(
            photos,
            batch_sampler=[list(map(int, b)) for b in batches],
            num_workers=self.num_workers,
            persistent_workers=False,
            pin_memory=device.type == "cuda",
            collate_fn=group_by_shape,
        )
        for groups, errors in loader:
            _checked(photos, errors)
            for rows, images in groups:
                yield self._images(rows, images, device)

    def iterate_eval(self, rows: np.ndarray, batch_size: int, device) -> Iterator[Batch]:
        """Every row of ``rows`` once, in batches of at most ``batch_size`` photos of one shape."""
        rows = np.asarray(rows, dtype=np.int64)
        if isinstance(self.source, FeatureCache):
            for start in range(0, len(rows), batch_size):
                yield self._features(rows[start : start + batch_size], device)
            return
        photos = self.source.photos
        batch: PhotoBatch
        for batch in photo_batches(
            photos,
            batch_size=batch_size,
            workers=self.num_workers,
            indices=rows,
            pin_memory=device.type == "cuda",
        ):
            _checked(photos, batch.errors)
            if len(batch):
                yield self._images(batch.indices, batch.pixels, device)


def _first_shard_meta(url: str) -> Optional[Dict[str, Any]]:
    """The JSON of a shard's first sample (None for an empty shard), read without touching the rest."""
    with tarfile.open(url, "r|") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".json"):
                return json.loads(tar.extractfile(member).read())
    return None


def shard_files(pattern: str, what: str = "shards") -> List[str]:
    """The shard files of a folder, brace or glob ``pattern``, which must all exist.

    Raises:
        FileNotFoundError: no shard matches, or one is missing (``what`` names the input in the message).
    """
    urls = expand_urls(pattern)
    if not urls:
        raise FileNotFoundError(f"{what} {pattern!r}: no shards (*.tar) found")
    absent = [u for u in urls if not Path(u).is_file()]
    if absent:
        raise FileNotFoundError(
            f"{what} {pattern!r}: shard not found: {absent[0]} ({len(absent)} of {len(urls)} missing)"
        )
    return urls


class ShardBatches:
    """One process's batches from webdataset shards (``geoswc data shards --cells``), labels from the shards.

    Training reads a resampled stream of ``len // (batch_size * ranks)`` batches per rank (every rank takes the
    same number of DDP steps); evaluation reads each sample exactly once (`geoswc.data.loading.shard_loader`).
    Every shard's first sample must carry the fingerprint of ``geocells``, unless ``relabel``: then every
    sample's labels are assigned from its coordinates by ``geocells`` and the stored ones are ignored.
    """

    def __init__(
        self,
        shards: str,
        geocells: Any,
        transform: Callable,
        *,
        size: int,
        shuffle_buffer: int = 0,
        num_workers: int = 0,
        channels_last: bool = False,
        relabel: bool = False,
    ):
        self.urls = shard_files(shards)
        self.counts = [shard_sample_count(u) for u in self.urls]
        self.relabel_with = geocells if relabel else None
        expected = str(geocells.fingerprint)
        if not relabel:
            for url in self.urls:
                meta = _first_shard_meta(url)
                if meta is None:
                    continue
                if "labels" not in meta:
                    raise ValueError(
                        f"shard {url} has no cell labels; write the shards with: geoswc data shards "
                        "--cells CELLS_DIR"
                    )
                if str(meta.get("fingerprint")) != expected:
                    raise ValueError(
                        f"shard {url} was labelled with partition {meta.get('fingerprint')!r} but "
                        f"the given cells have fingerprint {expected!r}; rewrite the shards with these "
                        "cells, pass the cells they were written with, or --relabel"
                    )
        self.transform, self.size = transform, size
        self.shuffle_buffer, self.num_workers, self.channels_last = shuffle_buffer, num_workers, channels_last

    def __len__(self) -> int:
        return int(sum(self.counts))

    def batches_per_rank(self, batch_size: int, num_processes: int) -> int:
        return max(1, len(self) // (batch_size * num_processes))

    def loader(
        self,
        *,
        batch_size: int,
        accelerator: Accelerator,
        seed: int = 0,
        epoch: int = 0,
        train: bool = True,
        urls: Optional[Sequence[str]] = None,
        whole: bool = False,
    ):
        """The DataLoader of this rank (``whole``: of all of ``urls``, for per-shard extraction)."""
        loader = shard_loader(
            list(urls or self.urls),
            transform=self.transform,
            batch_size=batch_size,
            num_workers=self.num_workers,
            rank=0 if whole else accelerator.process_index,
            world_size=1 if whole else accelerator.num_processes,
            epoch_length=self.batches_per_rank(batch_size, accelerator.num_processes) if train else None,
            shuffle_buffer=self.shuffle_buffer if train else 0,
            seed=seed,
            epoch=epoch,
            decode_target=self.size,
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
            yield (
                idx,
                {
                    "image": batch["image"][idx, :, :h, :w],
                    "labels": batch["labels"][idx],
                    "latlon": batch["latlon"][idx],
                },
            )

    def to_device(self, batch: Dict[str, Any], device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images = batch["image"].to(device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, batch["labels"].to(device), batch["latlon"].to(device)

    def epoch(
        self, accelerator: Accelerator, *, batch_size: int, seed: int, epoch: int, skip: int
    ) -> Iterator[Batch]:
        """One training epoch of batches on the device, the first ``skip`` (done before a resume) read and
        dropped. The sample order depends only on ``(seed, epoch, rank, worker)``, so a resumed run sees the
        same remaining samples; the dropped batches are still decoded (the stream has no random access)."""
        loader = self.loader(batch_size=batch_size, accelerator=accelerator, seed=seed, epoch=epoch)
        for i, batch in enumerate(loader):
            if i >= skip:
                images, labels, latlon = self.to_device(batch, accelerator.device)
                yield torch.zeros(0, dtype=torch.long), images, labels, latlon

    def eval_stream(self, accelerator: Accelerator, batch_size: int) -> Iterator[Batch]:
        """This rank's share of the samples once, in batches of one shape; rows are numbered from
        ``rank * len`` so that they are distinct across ranks."""
        seen = accelerator.process_index * len(self)
        for batch in self.loader(batch_size=batch_size, accelerator=accelerator, train=False):
            for idx, group in self.by_shape(batch):
                images, labels, latlon = self.to_device(group, accelerator.device)
                yield torch.from_numpy(seen + idx), images, labels, latlon
            seen += len(batch["id"])


Source = Union[Batches, ShardBatches]


def epoch_batches(train: Source, accelerator: Accelerator, *, batch_size: int, seed: int):
    """The ``batches(epoch, skip)`` of `geoswc.train.engine.train_loop` over a training source."""

    def batches(epoch: int, skip: int):
        if isinstance(train, ShardBatches):
            return (
                train.batches_per_rank(batch_size, accelerator.num_processes),
                train.epoch(accelerator, batch_size=batch_size, seed=seed, epoch=epoch, skip=skip),
            )
        mine = rank_batches(
            len(train),
            batch_size,
            epoch=epoch,
            seed=seed,
            num_processes=accelerator.num_processes,
            process_index=accelerator.process_index,
        )
        return len(mine), train.iterate(mine[skip:], accelerator.device)

    return batches


def head_of(accelerator: Accelerator, model: nn.Module) -> nn.Module:
    """The classification head of a prepared model (a head alone, or a `CellClassifier`)."""
    model = accelerator.unwrap_model(model)
    model = getattr(model, "_orig_mod", model)
    return model.head if hasattr(model, "head") and hasattr(model, "backbone") else model


@torch.no_grad()
def predict(
    accelerator: Accelerator, model: nn.Module, source: Source, batch_size: int
) -> Dict[str, np.ndarray]:
    """Predicted coordinates of every row, computed by rank and gathered (returned on every rank)."""
    head = head_of(accelerator, model)
    was_training = model.training
    model.eval()
    if isinstance(source, ShardBatches):
        items = source.eval_stream(accelerator, batch_size)
    else:
        mine = rank_batches(
            len(source),
            batch_size,
            epoch=0,
            seed=0,
            num_processes=accelerator.num_processes,
            process_index=accelerator.process_index,
            shuffle=False,
            drop_last=False,
        )
        rows_mine = np.concatenate(mine) if mine else np.zeros(0, np.int64)
        items = source.iterate_eval(rows_mine, batch_size, accelerator.device)
    rows, preds = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, 4, dtype=torch.float64)]
    for row, inputs, _, latlon in items:
        with accelerator.autocast():
            outputs = model(inputs)
        rows.append(row.long())
        preds.append(torch.cat([head.predict_latlon(outputs).double().cpu(), latlon.double().cpu()], dim=1))
    rows_all, preds_all = gather_by_row(accelerator, torch.cat(rows), torch.cat(preds))
    model.train(was_training)
    values = preds_all.cpu().numpy()
    return {"rows": rows_all.cpu().numpy(), "latlon": values[:, :2], "true_latlon": values[:, 2:]}


def validate(
    accelerator: Accelerator, model: nn.Module, source: Optional[Source], batch_size: int
) -> Dict[str, float]:
    """Accuracy at the validation radii and the median error over ``source`` (empty without one)."""
    if source is None:
        return {}
    out = predict(accelerator, model, source, batch_size)
    return accuracy_at(out["latlon"], out["true_latlon"])


def open_photos(photos: Photos, geocells: Any, backbone: nn.Module, cfg: Any, *, train: bool) -> Source:
    """A `Batches` over a metadata CSV or a `ShardBatches` over shards, with the backbone's training or
    evaluation transform."""
    transform = build_image_transform(backbone, cfg.data, train=train)
    workers, channels_last = cfg.data.num_workers, cfg.train.channels_last
    if photos.shards is not None:
        return ShardBatches(
            photos.shards,
            geocells,
            transform,
            size=cfg.data.image_size,
            shuffle_buffer=cfg.data.shuffle_buffer if train else 0,
            num_workers=workers,
            channels_last=channels_last,
            relabel=photos.relabel,
        )
    return Batches(
        PhotoTable(photos.csv, photos.images, geocells, transform),
        num_workers=workers,
        channels_last=channels_last,
    )
