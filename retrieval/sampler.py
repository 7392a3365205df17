"""One (query, positive) pair per cell per epoch, ICMR 2021 section 3.3.2.

Drawing one pair from every cell with at least two photos keeps the populous cells (cities, landmarks) from
dominating training. The draw depends only on ``(seed, epoch)``, so every rank computes the same list and takes
its own shard; the list is padded (repeating its first pairs) so all ranks take the same number of steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Tuple

import numpy as np


class OnePairPerCellSampler:
    """Yields ``(query_row, positive_row)`` row indices into the feature array.

    Args:
        labels: Fine ``cell_idx`` of every photo (N,); rows with a negative label are never drawn.
        seed: Base seed; the pairs of an epoch depend on ``(seed, epoch)`` only.
        num_replicas: Number of ranks sharing the epoch.
        rank: This rank's index in ``[0, num_replicas)``.
        shuffle: Shuffle the order of the pairs within the epoch.
    """

    def __init__(
        self, labels, *, seed: int = 0, num_replicas: int = 1, rank: int = 0, shuffle: bool = True
    ) -> None:
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise ValueError(f"labels must be one fine cell_idx per photo (N,), got shape {labels.shape}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"rank must be in [0, {num_replicas}), got rank={rank}, num_replicas={num_replicas}"
            )
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        rows = np.flatnonzero(labels >= 0)
        order = rows[np.argsort(labels[rows], kind="stable")]
        cells, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
        keep = counts >= 2
        self._order = order
        self.cells_ = cells[keep]
        self._starts = starts[keep]
        self._counts = counts[keep]
        if len(self.cells_) == 0:
            raise ValueError("no cell holds two or more photos; contrastive pairs cannot be drawn")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def num_pairs(self) -> int:
        """Pairs per epoch over all ranks, before padding (= number of cells with >= 2 photos)."""
        return len(self.cells_)

    def __len__(self) -> int:
        return -(-self.num_pairs // self.num_replicas)

    def epoch_pairs(self, epoch: int) -> np.ndarray:
        """All pairs of ``epoch`` as rows (P, 2), before sharding and padding."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        n = self._counts
        first = (rng.random(len(n)) * n).astype(np.int64)
        second = (rng.random(len(n)) * (n - 1)).astype(np.int64)
        second += second >= first  # a different photo of the same cell
        pairs = np.stack([self._order[self._starts + first], self._order[self._starts + second]], axis=1)
        if self.shuffle:
            pairs = pairs[rng.permutation(len(pairs))]
        return pairs

    def shard(self, epoch: int) -> np.ndarray:
        """This rank's pairs (len(self), 2) of ``epoch``."""
        pairs = self.epoch_pairs(epoch)
        total = len(self) * self.num_replicas
        if total > len(pairs):
            pairs = np.concatenate([pairs, pairs[np.arange(total - len(pairs)) % len(pairs)]])
        return pairs[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        for query, positive in self.shard(self.epoch):
            yield int(query), int(positive)
