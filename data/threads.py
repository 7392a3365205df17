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
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Optional, Sequence

from geoswc.data.photos import PhotoBatch, PhotoDataset, batch_by_shape, group_by_shape, group_with_gps


def threaded_groups(
    dataset: PhotoDataset,
    *,
    batch_size: int,
    threads: int = 1,
    indices: Optional[Sequence[int]] = None,
    ahead: Optional[int] = None,
) -> Iterator:
    """The collated chunks `photo_loader` would yield, in the same order, decoded by ``threads`` threads with at
    most ``ahead`` chunks (default ``2 * threads``) decoded ahead of the consumer."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    order = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    collate = group_with_gps if getattr(dataset, "exif_gps", False) else group_by_shape
    chunks = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    ahead = 2 * threads if ahead is None else max(1, ahead)

    def decode(chunk):
        return collate([dataset[i] for i in chunk])

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="geoswc-decode") as pool:
        pending: collections.deque = collections.deque()
        following = iter(chunks)
        try:
            for chunk in following:
                pending.append(pool.submit(decode, chunk))
                if len(pending) >= ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def threaded_photo_batches(
    dataset: PhotoDataset,
    *,
    batch_size: int,
    threads: int = 1,
    indices: Optional[Sequence[int]] = None,
    max_pending: Optional[int] = None,
) -> Iterator[PhotoBatch]:
    """`geoswc.data.photos.photo_batches` with the decoding in ``threads`` threads instead of processes."""
    groups = threaded_groups(dataset, batch_size=batch_size, threads=threads, indices=indices)
    return batch_by_shape(groups, batch_size, max_pending=max_pending)
