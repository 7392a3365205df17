"""Dynamic batching: requests that arrive together share one model call.

A web server gets photos one request at a time, but a network runs far faster on a batch than on the same
photos one by one (on a GPU, several times faster per photo). `DynamicBatcher` queues every item submitted by
the request handlers and a single worker takes them off the queue in batches: it waits for the first item,
then up to ``max_wait_ms`` more for others, up to ``max_batch`` items, and runs the whole batch in one call on
a dedicated thread (the event loop keeps accepting requests meanwhile). Under load the wait costs nothing (the
queue is full by the time a batch ends); alone, a request pays at most ``max_wait_ms``. ``max_batch=1`` is
one-request-at-a-time serving, the baseline ``benchmarks/bench_serve.py`` measures against.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Generic, List, Optional, Sequence, Tuple, TypeVar, Union

logger = logging.getLogger(__name__)

__all__ = ["BatcherStats", "DynamicBatcher", "Overloaded"]

T = TypeVar("T")
R = TypeVar("R")


class Overloaded(RuntimeError):
    """The queue holds ``max_queue`` items already; the caller should answer 503 and let the client retry."""


@dataclass
class BatcherStats:
    """What a `DynamicBatcher` has done: ``batches`` model calls for ``items`` items, the largest batch."""

    batches: int = 0
    items: int = 0
    largest: int = 0
    busy_s: float = 0.0

    def as_dict(self) -> dict:
        return {
            "batches": self.batches,
            "items": self.items,
            "largest_batch": self.largest,
            "mean_batch": self.items / self.batches if self.batches else 0.0,
            "busy_s": self.busy_s,
        }


class DynamicBatcher(Generic[T, R]):
    """Collects items from concurrent callers into batches for one function.

    Args:
        process: called with a list of items, returns one result per item, in order; a result that is an
            exception is raised to that item's caller only. An exception raised by ``process`` itself goes
            to every caller of the batch.
        max_batch: most items per call.
        max_wait_ms: how long the first item of a batch waits for others.
        max_queue: most items waiting; `submit` raises `Overloaded` beyond it.

    Use inside a running event loop: ``await batcher.start()``, ``await batcher.submit(item)``,
    ``await batcher.stop()``.
    """

    def __init__(
        self,
        process: Callable[[List[T]], Sequence[Union[R, BaseException]]],
        *,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 4096,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.process = process
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_ms) / 1000.0
        self.max_queue = int(max_queue)
        self.stats = BatcherStats()
        self._queue: Optional[asyncio.Queue] = None
        self._worker: Optional[asyncio.Task] = None
        # One thread: the model is called by one batch at a time, never concurrently.
        self._executor: Optional[ThreadPoolExecutor] = None

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._worker.done()

    async def start(self) -> None:
        """Start the worker on the running event loop (a no-op when it runs)."""
        if self.running:
            return
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="geoswc-batch")
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="geoswc-batcher")

    async def stop(self) -> None:
        """Stop the worker; items still queued get `asyncio.CancelledError`."""
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        if self._queue is not None:
            while not self._queue.empty():
                _, future = self._queue.get_nowait()
                if not future.done():
                    future.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def submit(self, item: T) -> R:
        """Queue ``item`` and wait for its result.

        Raises:
            Overloaded: the queue is full.
            RuntimeError: the batcher is not started.
            Exception: whatever ``process`` returned or raised for this item.
        """
        if not self.running or self._queue is None:
            raise RuntimeError("the batcher is not running; call start() first")
        if self._queue.qsize() >= self.max_queue:
            raise Overloaded(
                f"{self._queue.qsize()} items are waiting (max_queue {self.max_queue}); retry later"
            )
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        return await future

    async def _collect(self) -> List[Tuple[T, asyncio.Future]]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            # A caller that went away (client disconnected) needs no result.
            batch = [(item, future) for item, future in batch if not future.done()]
            if not batch:
                continue
            items = [item for item, _ in batch]
            started = time.perf_counter()
            try:
                results: Sequence[Any] = await loop.run_in_executor(self._executor, self.process, items)
                if len(results) != len(items):
                    raise RuntimeError(f"process returned {len(results)} results for {len(items)} items")
            except Exception as err:  # one failing call must not stop the worker
                logger.exception("batch of %d items failed", len(items))
                results = [err] * len(items)
            self.stats.busy_s += time.perf_counter() - started
            self.stats.batches += 1
            self.stats.items += len(items)
            self.stats.largest = max(self.stats.largest, len(items))
            for (_, future), result in zip(batch, results):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
