"""A hand-made three-granularity cell set with the documented ``Geocells`` attributes, for head tests whose
expected values are computed by hand."""

from dataclasses import dataclass

import numpy as np


@dataclass
class HandPartition:
    centers_deg: np.ndarray


class HandCells:
    """2 coarse, 3 middle and 5 fine cells; fine cell 4 has no coarse parent (-1)."""

    def __init__(self, fingerprint="hand-v1"):
        self.partitions = [
            HandPartition(np.array([[10.0, 10.0], [-20.0, 100.0]])),
            HandPartition(np.array([[10.0, 5.0], [10.0, 15.0], [-20.0, 100.0]])),
            HandPartition(np.array([[10.0, 4.0], [10.0, 6.0], [10.0, 15.0], [-20.0, 100.0], [60.0, -150.0]])),
        ]
        self.fine = self.partitions[-1]
        self.hierarchy = np.array([[0, 0, 0], [0, 0, 1], [0, 1, 2], [1, 2, 3], [-1, 2, 4]], dtype=np.int64)
        self.fingerprint = fingerprint
