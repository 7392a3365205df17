"""Loading: a webdataset shard stream for training (photo files are read by `geoswc.data.photos`).

**Splitting (exactly once per epoch).** Every rank and every DataLoader worker of the stream is a *consumer*.
The shards (in an order shuffled by ``seed`` and ``epoch``, the same on every consumer) form one sequence of N
samples; it is cut into ``world_size`` contiguous ranges of equal size (differing by at most one), and each
rank's range again into ``num_workers`` ranges. A consumer reads only the shards that overlap its range (at
most two of them partially), so every sample is read once in total, whatever the shard count and sizes: shard
counts need not divide by ranks x workers, and no sample is padded or duplicated. Per-shard sample counts come
from the folder's ``summary.json`` or, without one, from a scan of the tar headers.

Rank sizes differ by at most one sample, so ranks can differ by one batch; distributed training that needs
identical step counts uses ``epoch_length`` (a *resampled* stream: every consumer cycles through its share,
reshuffled on each pass, and each rank yields exactly ``epoch_length`` batches).

**Shuffling.** Shard order per epoch, then a shuffle buffer of ``shuffle_buffer`` samples per consumer; all
randomness derives from ``(seed, epoch, rank, worker)``, so a run is reproducible.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import tarfile
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import braceexpand
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .images import ImageDecodeError, decode_array
from .shards import SUMMARY
from .transforms import pad_collate

logger = logging.getLogger(__name__)


def expand_urls(urls: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]) -> List[str]:
    """Shard paths from a shard folder (its ``summary.json`` order), a brace pattern ``a-{000..009}.tar``, a glob
    pattern ``shards/*.tar`` (matches in sorted order), or a list of paths."""
    if isinstance(urls, (str, os.PathLike)):
        path = Path(urls)
        if path.is_dir():
            summary = path / SUMMARY
            if summary.is_file():
                return [str(path / s["name"]) for s in json.loads(summary.read_text())["shards"]]
            return sorted(str(p) for p in path.glob("*.tar"))
        expanded = []
        for pattern in braceexpand.braceexpand(str(urls)):
            is_glob = any(ch in pattern for ch in "*?[")
            expanded.extend(sorted(glob.glob(pattern)) if is_glob else [pattern])
        return expanded
    return [str(u) for u in urls]


def _count_from_summary(url: str) -> Optional[int]:
    summary = Path(url).parent / SUMMARY
    if not summary.is_file():
        return None
    counts = {s["name"]: s["count"] for s in json.loads(summary.read_text())["shards"]}
    return counts.get(Path(url).name)


def shard_sample_count(url: str) -> int:
    """Samples in one shard: from ``summary.json`` beside it, else by reading the tar headers."""
    count = _count_from_summary(url)
    if count is not None:
        return count
    keys = set()
    with tarfile.open(url, "r") as tar:
        for member in tar:
            if member.isfile():
                keys.add(member.name.split(".", 1)[0])
    return len(keys)


def _iter_shard(url: str, start: int, stop: int) -> Iterator[Tuple[str, Dict[str, bytes]]]:
    """Samples ``start <= i < stop`` of one shard as ``(key, {ext: bytes})``; members of one key are adjacent."""
    index, key, parts = -1, None, {}
    with tarfile.open(url, "r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            member_key, _, ext = member.name.partition(".")
            if member_key != key:
                if key is not None and start <= index < stop:
                    yield key, parts
                index += 1
                key, parts = member_key, {}
                if index >= stop:
                    return
            if start <= index < stop:
                parts[ext] = tar.extractfile(member).read()
        if key is not None and start <= index < stop:
            yield key, parts


def _split(total: int, parts: int, index: int) -> Tuple[int, int]:
    """The ``index``-th of ``parts`` contiguous ranges covering ``[0, total)``, sizes differing by <= 1."""
    return total * index // parts, total * (index + 1) // parts


class ShardStream(IterableDataset):
    """Iterable over batches of a webdataset shard set; see the module docstring for the split."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        transform: Callable,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        epoch_length: Optional[int] = None,
        shuffle_buffer: int = 0,
        seed: int = 0,
        epoch: int = 0,
        decode_target: Optional[int] = None,
        canvas: Optional[int] = None,
        shuffle_shards: Optional[bool] = None,
    ):
        if not urls:
            raise ValueError("no shards given")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if epoch_length is not None and epoch_length < 1:
            raise ValueError(
                f"epoch_length must be a positive number of batches per rank, got {epoch_length}"
            )
        self.urls = list(urls)
        self.counts = [shard_sample_count(u) for u in self.urls]
        self.transform, self.batch_size = transform, batch_size
        self.rank, self.world_size = rank, world_size
        self.epoch_length, self.shuffle_buffer = epoch_length, shuffle_buffer
        self.seed, self.epoch = seed, epoch
        self.decode_target, self.canvas = decode_target, canvas
        self.shuffle_shards = shuffle_buffer > 0 if shuffle_shards is None else shuffle_shards

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        return int(sum(self.counts))

    def _assignment(self, worker: int, workers: int, pass_: int) -> List[Tuple[str, int, int]]:
        """The (shard, start, stop) pieces of this consumer for one pass over the data."""
        order = np.arange(len(self.urls))
        if self.shuffle_shards:
            order = np.random.default_rng([self.seed, self.epoch, pass_, 7]).permutation(order)
        counts = np.asarray(self.counts)[order]
        offsets = np.concatenate([[0], np.cumsum(counts)])
        rank_lo, rank_hi = _split(int(offsets[-1]), self.world_size, self.rank)
        lo, hi = _split(rank_hi - rank_lo, workers, worker)
        lo, hi = rank_lo + lo, rank_lo + hi
        pieces = []
        for position, shard in enumerate(order):
            start, stop = max(lo, offsets[position]), min(hi, offsets[position + 1])
            if start < stop:
                pieces.append(
                    (self.urls[shard], int(start - offsets[position]), int(stop - offsets[position]))
                )
        return pieces

    def _samples(self, worker: int, workers: int, pass_: int) -> Iterator[Dict]:
        rng = np.random.default_rng([self.seed, self.epoch, pass_, self.rank, worker])
        buffer: List[Tuple[str, Dict[str, bytes]]] = []
        for url, start, stop in self._assignment(worker, workers, pass_):
            for item in _iter_shard(url, start, stop):
                if self.shuffle_buffer > 1:
                    if len(buffer) < self.shuffle_buffer:
                        buffer.append(item)
                        continue
                    j = int(rng.integers(len(buffer)))
                    item, buffer[j] = buffer[j], item
                sample = self._decode(url, *item)
                if sample is not None:
                    yield sample
        rng.shuffle(buffer)
        for item in buffer:
            sample = self._decode("buffer", *item)
            if sample is not None:
                yield sample

    def _decode(self, url: str, key: str, parts: Dict[str, bytes]) -> Optional[Dict]:
        try:
            meta = json.loads(parts["json"])
            side = getattr(self.transform, "decode_side", "short")
            image = decode_array(parts["jpg"], target=self.decode_target, target_side=side)
        except (KeyError, ValueError, ImageDecodeError) as err:
            logger.warning("%s: skipping sample %s (%s)", url, key, err)
            return None
        return {
            "image": self.transform(image),
            "id": str(meta["id"]),
            "author": str(meta.get("author", "")),
            "latlon": (float(meta["lat"]), float(meta["lon"])),
            "labels": list(meta.get("labels", [])),
        }

    def _batches(self, samples: Iterator[Dict]) -> Iterator[Dict]:
        batch: List[Dict] = []
        for sample in samples:
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield self._collate(batch)
                batch = []
        if batch:
            yield self._collate(batch)

    def _collate(self, batch: List[Dict]) -> Dict:
        n_gran = len(batch[0]["labels"])
        labels = [s.pop("labels") for s in batch]
        out = pad_collate(batch, canvas=self.canvas)
        out["labels"] = torch.tensor(labels, dtype=torch.int64).reshape(len(batch), n_gran)
        return out

    def __iter__(self) -> Iterator[Dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.epoch_length is None:
            yield from self._batches(self._samples(worker, workers, 0))
            return
        quota = self.epoch_length // workers + (worker < self.epoch_length % workers)
        if quota == 0:
            return
        if not any(start < stop for _, start, stop in self._assignment(worker, workers, 0)):
            raise ValueError(
                f"rank {self.rank} worker {worker} has no samples ({self.num_samples} in all); use fewer workers"
            )
        produced, pass_, batch = 0, 0, []
        while True:
            # Each pass reshuffles shard order and buffer; a batch may span two passes.
            for sample in self._samples(worker, workers, pass_):
                batch.append(sample)
                if len(batch) == self.batch_size:
                    yield self._collate(batch)
                    batch = []
                    produced += 1
                    if produced == quota:
                        return
            pass_ += 1


def shard_loader(
    urls: Union[str, os.PathLike, Sequence[str]],
    *,
    transform: Callable,
    batch_size: int,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    epoch_length: Optional[int] = None,
    shuffle_buffer: int = 0,
    seed: int = 0,
    epoch: int = 0,
    decode_target: Optional[int] = None,
    canvas: Optional[int] = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over webdataset shards yielding batches
    ``{"image": (B, 3, H, W) float, "image_size": (B, 2), "id": list[str], "latlon": (B, 2) float64,
    "labels": (B, n_gran) int64}`` (``n_gran`` = 0 for shards written without cells).

    Args:
        urls: a shard folder, a brace pattern or a list of tar paths.
        transform: PIL image -> tensor (`build_transform`).
        batch_size: samples per batch (the last batch of each worker may be smaller in exact mode).
        num_workers: DataLoader worker processes; each reads its own share.
        rank, world_size: this process's place among the training processes.
        epoch_length: batches per rank per epoch for a resampled stream; None = one exact pass.
        shuffle_buffer: per-consumer shuffle buffer in samples (0 = keep shard order, no shard shuffle).
        seed, epoch: all randomness follows from these (`ShardStream.set_epoch` changes the epoch).
        decode_target: short side to decode JPEGs at (reduced-size decoding); usually the input size.
        canvas: pad variable-size images to ``canvas x canvas`` (longest-side evaluation).
        pin_memory: passed to the DataLoader.
    """
    stream = ShardStream(
        expand_urls(urls),
        transform=transform,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        epoch_length=epoch_length,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        epoch=epoch,
        decode_target=decode_target,
        canvas=canvas,
    )
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory)
