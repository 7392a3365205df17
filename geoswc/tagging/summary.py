"""What a tag run did (`TagSummary`), counted from its rows, and the closing lines ``geoswc tag`` prints."""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence

import numpy as np

from geoswc.tagging.output import STATUSES


@dataclasses.dataclass
class TagSummary:
    """What a `tag_photos` call did; the counts cover the whole output, this run and earlier ones."""

    output: str
    ok: int = 0
    error: int = 0
    abstain: int = 0
    skipped: int = 0
    resumed: int = 0
    tagged: int = 0
    exif_written: int = 0
    # Photos without a copy: not JPEG, or a file was already there (``exif_existing`` of them).
    exif_skipped: int = 0
    exif_existing: int = 0
    skipped_not_photo: int = 0
    skipped_hidden: int = 0
    unreadable_folders: int = 0
    # Rows whose photo carries EXIF GPS, and the median distance between it and the prediction (ok and
    # abstain rows): a free accuracy check on a real archive.
    geotagged: int = 0
    exif_median_km: Optional[float] = None
    # Near-duplicate groups (--duplicates) and the photos in them.
    duplicate_groups: int = 0
    duplicates: int = 0
    embeddings: Optional[str] = None
    html: Optional[str] = None
    seconds: float = 0.0


class Tally:
    """Counts by status and the EXIF distances of rows."""

    def __init__(self):
        self.counts = dict.fromkeys(STATUSES, 0)
        self.geotagged = 0
        self.distances_km: List[float] = []

    def add(self, rows: Sequence[dict]) -> "Tally":
        for row in rows:
            self.counts[row["status"]] += 1
            if row.get("exif_lat") is not None:
                self.geotagged += 1
                if row.get("exif_distance_km") is not None:
                    self.distances_km.append(row["exif_distance_km"])
        return self

    def into(self, summary: TagSummary) -> None:
        summary.ok, summary.error = self.counts["ok"], self.counts["error"]
        summary.abstain, summary.skipped = self.counts["abstain"], self.counts["skipped"]
        summary.geotagged = self.geotagged
        summary.exif_median_km = float(np.median(self.distances_km)) if self.distances_km else None


def summary_lines(summary: dict) -> list:
    """The closing lines ``geoswc tag`` prints for a run summary."""
    lines = []
    rate = summary["tagged"] / summary["seconds"] if summary["seconds"] else 0.0
    skipped = []
    if summary["skipped_not_photo"]:
        skipped.append(f"{summary['skipped_not_photo']} non-photo files")
    if summary["skipped_hidden"]:
        skipped.append(f"{summary['skipped_hidden']} hidden entries")
    if summary["unreadable_folders"]:
        skipped.append(f"{summary['unreadable_folders']} unreadable folders")
    if skipped:
        lines.append(f"skipped {', '.join(skipped)} found in folders")
    if summary["exif_written"] or summary["exif_skipped"]:
        existing = summary.get("exif_existing", 0)
        reasons = []
        if summary["exif_skipped"] - existing:
            reasons.append(f"{summary['exif_skipped'] - existing} non-JPEG photos have none")
        if existing:
            reasons.append(f"{existing} existing copies kept; --overwrite replaces them")
        lines.append(
            f"wrote {summary['exif_written']} EXIF copies" + (f" ({'; '.join(reasons)})" if reasons else "")
        )
    resumed = f", {summary['resumed']} from the earlier run" if summary["resumed"] else ""
    statuses = [f"{summary['ok']} ok"]
    statuses += [f"{summary[s]} {s}" for s in ("abstain", "skipped") if summary.get(s)]
    statuses.append(f"{summary['error']} error")
    lines.append(
        f"tagged {summary['tagged']} photos in {summary['seconds']:.1f} s ({rate:.1f} images/s){resumed}: "
        f"{', '.join(statuses)} rows in {summary['output']}"
    )
    if summary.get("geotagged"):
        median = summary.get("exif_median_km")
        compared = f"; median distance to the prediction {median:.1f} km" if median is not None else ""
        lines.append(f"{summary['geotagged']} photos carry EXIF GPS{compared}")
    if summary.get("duplicates"):
        lines.append(f"{summary['duplicates']} photos in {summary['duplicate_groups']} near-duplicate groups")
    if summary.get("embeddings"):
        lines.append(f"embeddings for geoswc similar: {summary['embeddings']}")
    if summary.get("html"):
        lines.append(f"review page: {summary['html']}")
    return lines
