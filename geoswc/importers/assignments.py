"""Which background rows belong to which component: ``{component: set of row numbers}``, as the ICMR 2021
authors' ``cells_assignments.pkl`` holds it, checked and flattened to ``(component, row)`` pairs.

A component and a row are integers in range; a float, text, ``None`` or a number too large is refused, never
truncated or wrapped, and so is a file that assigns no row at all.
"""

from __future__ import annotations

from typing import Any, Tuple

import numpy as np


def _row_numbers(members: Any, comp: Any, source: str, n_rows: int) -> np.ndarray:
    """The row numbers a component lists, each an integer in ``0..n_rows - 1`` (a float, text, None or a
    number too large is refused, not truncated or wrapped)."""
    if not isinstance(members, (set, frozenset, list, tuple)):
        raise ValueError(f"{source}: component {comp}: expected a set of rows, got {type(members).__name__}")
    for r in members:
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)):
            raise ValueError(
                f"{source}: component {comp} lists {_plain(r)!r} ({type(r).__name__}); rows are integer row numbers "
                "of the background file"
            )
        if not 0 <= int(r) < n_rows:
            raise ValueError(
                f"{source}: component {comp} lists row {int(r)}; the background has rows 0..{n_rows - 1}"
            )
    return np.sort(np.fromiter((int(r) for r in members), dtype=np.int64, count=len(members)))


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def assignment_pairs(
    assignments: Any, *, n_components: int, n_rows: int, source: str
) -> Tuple[np.ndarray, np.ndarray]:
    """``(component, row)`` pairs of ``{component: set of background rows}``, sorted by component then row.

    Raises:
        ValueError: not such a dict, no rows at all, or a component or row that is not an index in range (each
            named with ``source``).
    """
    if not isinstance(assignments, dict):
        raise ValueError(
            f"{source}: expected a dict {{component: set of rows}}, got {type(assignments).__name__}"
        )
    comps, rows = [], []
    for comp, members in assignments.items():
        if (
            isinstance(comp, bool)
            or not isinstance(comp, (int, np.integer))
            or not 0 <= int(comp) < n_components
        ):
            raise ValueError(
                f"{source}: component {comp!r} is not an index of the MvMF head's {n_components} components"
            )
        members = _row_numbers(members, comp, source, n_rows)
        comps.append(np.full(len(members), int(comp), dtype=np.int64))
        rows.append(members)
    comp_arr = np.concatenate(comps) if comps else np.zeros(0, np.int64)
    row_arr = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    if not len(row_arr):
        raise ValueError(
            f"{source}: assigns no background row to any component; a model needs at least one background "
            "photo in a component (the authors' file assigns most of theirs)"
        )
    order = np.lexsort((row_arr, comp_arr))
    return comp_arr[order], row_arr[order]
