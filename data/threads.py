"""Photos decoded by a pool of threads in the main process, overlapping the forward pass.

On a CPU run the decoding worker processes of `geoswc.data.photos.photo_loader` take a core from the backbone
(on 2 cores a worker cost 16 % of the throughput), and decoding in the main process waits for each forward
pass. Threads do neither: libjpeg-turbo (through PIL and simplejpeg) and OpenCV's resize release the GIL, so
a thread decodes the next chunk while the engine computes the current one. The chunks are exactly those of
`photo_loader` (``batch_size`` indices in order, collated by `group_by_shape` or `group_with_gps`), so
`batch_by_shape` makes the same batches from them.
"""

from __future__ import annotations

import collections
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Optional, Sequence

from geoswc.data.photos import PhotoBatch, PhotoDataset, batch_by_shape, group_by_shape, group_with_gps


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


KEPT_SIZES = 256


class DecodeSizing:
    """How many threads decode ahead, sized by measurement while a run goes.

    Every chunk's decoding time (in its thread) and the consumer's time per chunk (the forward pass and the
    writing, between two requests for the next chunk) are averaged; decoding keeps up when
    ``ceil(decode / consume)`` threads work at once, at least 1 and at most ``limit``. Until both are measured
    one thread decodes ahead. ``chosen`` holds the last sizes used (at most `KEPT_SIZES`), for logs and tests.
    """

    def __init__(self, limit: int) -> None:
        self.limit = max(1, int(limit))
        self.decode_s = 0.0
        self.decoded = 0
        self.consume_s = 0.0
        self.consumed = 0
        self.chosen: collections.deque = collections.deque(maxlen=KEPT_SIZES)

    def record_decode(self, seconds: float) -> None:
        self.decode_s += seconds
        self.decoded += 1

    def record_consume(self, seconds: float) -> None:
        self.consume_s += seconds
        self.consumed += 1

    def threads(self) -> int:
        if not self.decoded or not self.consumed:
            size = 1
        else:
            decode, consume = self.decode_s / self.decoded, self.consume_s / self.consumed
            size = min(self.limit, max(1, math.ceil(decode / max(consume, 1e-9))))
        self.chosen.append(size)
        return size


def threaded_groups(
    dataset: PhotoDataset,
    *,
    batch_size: int,
    threads: Optional[int] = 1,
    indices: Optional[Sequence[int]] = None,
    ahead: Optional[int] = None,
    sizing: Optional[DecodeSizing] = None,
) -> Iterator:
    """The collated chunks `photo_loader` would yield, in the same order, decoded by ``threads`` threads with at
    most ``ahead`` chunks (default ``2 * threads``) decoded ahead of the consumer.

    ``threads=None`` sizes the pool by measurement (`DecodeSizing`, at most the usable CPUs): as many chunks are
    decoded at once as keep the consumer from waiting. A single chunk (a run of a few photos) is decoded in the
    calling thread, with no pool.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    order = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    collate = group_with_gps if getattr(dataset, "exif_gps", False) else group_by_shape
    chunks = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    if threads is None and sizing is None:
        sizing = DecodeSizing(available_cpus())

    def decode(chunk):
        start = time.perf_counter()
        group = collate([dataset[i] for i in chunk])
        if sizing is not None:
            sizing.record_decode(time.perf_counter() - start)
        return group

    if len(chunks) <= 1:
        for chunk in chunks:
            yield decode(chunk)
        return
    workers = sizing.limit if threads is None else threads

    def in_flight() -> int:
        if threads is None:
            return sizing.threads() + 1  # the chunks being decoded and the next one ready
        return 2 * threads if ahead is None else max(1, ahead)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="geoswc-decode") as pool:
        pending: collections.deque = collections.deque()
        following = iter(chunks)
        try:
            while True:
                while len(pending) < in_flight():
                    chunk = next(following, None)
                    if chunk is None:
                        break
                    pending.append(pool.submit(decode, chunk))
                if not pending:
                    break
                group = pending.popleft().result()
                handed = time.perf_counter()
                yield group
                if sizing is not None:
                    sizing.record_consume(time.perf_counter() - handed)
        finally:
            for future in pending:
                future.cancel()


def threaded_photo_batches(
    dataset: PhotoDataset,
    *,
    batch_size: int,
    threads: Optional[int] = 1,
    indices: Optional[Sequence[int]] = None,
    max_pending: Optional[int] = None,
    sizing: Optional[DecodeSizing] = None,
) -> Iterator[PhotoBatch]:
    """`geoswc.data.photos.photo_batches` with the decoding in ``threads`` threads (``None``: sized by
    measurement) instead of processes."""
    groups = threaded_groups(dataset, batch_size=batch_size, threads=threads, indices=indices, sizing=sizing)
    return batch_by_shape(groups, batch_size, max_pending=max_pending)
