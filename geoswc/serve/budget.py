"""A memory budget for the uploads and decoded pixels of the requests in flight.

A small file can decode to a large image: a 143 KB PNG of 7000x7000 pixels is under the pixel limits and
takes about half a gigabyte while it is decoded. Each request reserves what it holds (its body as it streams
in, then the pixels of the photo it decodes) from one `MemoryBudget`; a request that does not fit is
answered 503 with Retry-After instead of growing the process.
"""

from __future__ import annotations

import threading

__all__ = ["MemoryBudget", "Reservation"]


class MemoryBudget:
    """At most ``limit_bytes`` reserved at once, across threads. ``peak_bytes`` is the most ever reserved."""

    def __init__(self, limit_bytes: int):
        if limit_bytes <= 0:
            raise ValueError(f"the memory budget must be positive, got {limit_bytes} bytes")
        self.limit_bytes = int(limit_bytes)
        self.in_use_bytes = 0
        self.peak_bytes = 0
        self.refused = 0
        self._lock = threading.Lock()

    def try_take(self, n_bytes: int) -> bool:
        """Reserve ``n_bytes`` if they fit; False (nothing reserved) when they do not."""
        with self._lock:
            if self.in_use_bytes + n_bytes > self.limit_bytes:
                self.refused += 1
                return False
            self.in_use_bytes += n_bytes
            self.peak_bytes = max(self.peak_bytes, self.in_use_bytes)
            return True

    def give_back(self, n_bytes: int) -> None:
        with self._lock:
            self.in_use_bytes -= n_bytes
            assert self.in_use_bytes >= 0, "more bytes given back than taken"

    def reservation(self) -> "Reservation":
        return Reservation(self)

    def as_dict(self) -> dict:
        return {
            "limit_bytes": self.limit_bytes,
            "in_use_bytes": self.in_use_bytes,
            "peak_bytes": self.peak_bytes,
            "refused": self.refused,
        }


class Reservation:
    """What one request holds of a `MemoryBudget`; everything still held is given back on ``close``."""

    def __init__(self, budget: MemoryBudget):
        self.budget = budget
        self.held_bytes = 0
        self._lock = threading.Lock()

    def try_take(self, n_bytes: int) -> bool:
        if n_bytes <= 0:
            return True
        if not self.budget.try_take(n_bytes):
            return False
        with self._lock:
            self.held_bytes += n_bytes
        return True

    def give_back(self, n_bytes: int) -> None:
        with self._lock:
            n_bytes = min(n_bytes, self.held_bytes)
            self.held_bytes -= n_bytes
        if n_bytes > 0:
            self.budget.give_back(n_bytes)

    def close(self) -> None:
        self.give_back(self.held_bytes)

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
