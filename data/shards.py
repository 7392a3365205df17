"""Webdataset shard writer: MP16-style metadata + images (folder or GeoEstimation msgpack) -> tar shards.

Per sample a shard holds ``<key>.jpg`` (the JPEG, re-encoded only when resized or not a JPEG) and ``<key>.json``
``{"id", "author", "lat", "lon"}`` plus ``"labels"`` (cell_idx at every granularity, coarse -> fine) and
``"fingerprint"`` when a labeler is given. Paper 4.2's leakage rule (drop every photo by a user of an evaluation
set) is applied here through `Exclusions`.

The job is cut into *units* fixed by the inputs alone: ``samples_per_shard`` consecutive metadata rows (image
folder) or one msgpack file. A unit writes its shards under temporary names, renames them into place and then
records itself in ``_progress/``; a rerun skips recorded units and redoes the rest from scratch, so a killed job
finishes without duplicates or gaps. ``summary.json`` is rebuilt from the records at the end.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .images import (
    ImageDecodeError,
    ImageMissingError,
    decode_image,
    encode_jpeg,
    read_bytes,
    resize_short_side,
)
from .metadata import Exclusions, iter_msgpack_records

logger = logging.getLogger(__name__)

Labeler = Callable[[np.ndarray, np.ndarray], np.ndarray]
PROGRESS_DIR = "_progress"
SUMMARY = "summary.json"


@dataclass
class _Job:
    out_dir: str
    resize: Optional[int]
    samples_per_shard: int
    quality: int
    fingerprint: Optional[str]


# Per-process state shared with forked workers (the metadata table of a large job is not pickled per task).
_TABLE: Dict[str, object] = {}


def _encode_sample(data: bytes, resize: Optional[int], quality: int) -> bytes:
    """Validate (decode) a photo and return the JPEG to store; raises ImageDecodeError."""
    if resize:
        image = decode_image(data, target=resize)
        return encode_jpeg(resize_short_side(image, resize), quality=quality)
    if data[:2] == b"\xff\xd8":
        decode_image(data, target=16)  # cheapest full check: 1/8-scale decode of every block
        return data
    return encode_jpeg(decode_image(data), quality=quality)


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mode = 0o444
    tar.addfile(info, io.BytesIO(payload))  # mtime 0, uid 0: shards are byte-identical across reruns


class _ShardSink:
    """Writes samples into ``<prefix>-NNN.tar`` files of at most ``samples_per_shard`` samples, via .tmp names."""

    def __init__(self, job: _Job, prefix: str):
        self.job, self.prefix = job, prefix
        self.tar: Optional[tarfile.TarFile] = None
        self.pending: List[Tuple[Path, Path, int]] = []
        self.count = 0

    def add(self, key: str, jpeg: bytes, meta: dict) -> None:
        if self.tar is None or self.count == self.job.samples_per_shard:
            self._close()
            final = Path(self.job.out_dir) / f"{self.prefix}-{len(self.pending):03d}.tar"
            tmp = final.with_suffix(".tar.tmp")
            self.tar = tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT)
            self.pending.append((tmp, final, 0))
            self.count = 0
        _add(self.tar, f"{key}.jpg", jpeg)
        _add(self.tar, f"{key}.json", json.dumps(meta, separators=(",", ":")).encode())
        self.count += 1
        tmp, final, _ = self.pending[-1]
        self.pending[-1] = (tmp, final, self.count)

    def _close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None

    def commit(self) -> List[dict]:
        self._close()
        for tmp, final, _ in self.pending:
            os.replace(tmp, final)
        return [{"name": final.name, "count": count} for _, final, count in self.pending]


def _meta(row: int, job: _Job) -> dict:
    meta = {
        "id": _TABLE["ids"][row],
        "author": _TABLE["authors"][row],
        "lat": float(_TABLE["lat"][row]),
        "lon": float(_TABLE["lon"][row]),
    }
    labels = _TABLE.get("labels")
    if labels is not None:
        meta["labels"] = [int(v) for v in labels[row]]
        meta["fingerprint"] = job.fingerprint
    return meta


def _finish_unit(job: _Job, unit: str, shards: List[dict], skipped: List[dict], extra: dict) -> dict:
    record = {
        "unit": unit,
        "shards": shards,
        "written": sum(s["count"] for s in shards),
        "skipped": skipped,
        **extra,
    }
    marker = Path(job.out_dir) / PROGRESS_DIR / f"{unit}.json"
    tmp = marker.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, marker)
    return record


def _folder_unit(args: Tuple[_Job, int, np.ndarray]) -> dict:
    job, index, rows = args
    unit = f"{index:06d}"
    sink = _ShardSink(job, unit)
    skipped = []
    root = Path(_TABLE["root"])
    for row in rows:
        img_id = _TABLE["ids"][row]
        try:
            jpeg = _encode_sample(read_bytes(root / img_id), job.resize, job.quality)
        except ImageMissingError as err:
            skipped.append({"id": img_id, "reason": "missing", "detail": err.reason})
            continue
        except ImageDecodeError as err:
            skipped.append({"id": img_id, "reason": "corrupt", "detail": err.reason})
            continue
        sink.add(f"{row:010d}", jpeg, _meta(row, job))
    return _finish_unit(job, unit, sink.commit(), skipped, {})


def _msgpack_unit(args: Tuple[_Job, int, str]) -> dict:
    job, index, path = args
    unit = f"m{index:05d}"
    sink = _ShardSink(job, unit)
    skipped, seen, unlisted, excluded = [], [], 0, 0
    row_of: Dict[str, int] = _TABLE["row_of"]
    keep: np.ndarray = _TABLE["keep"]
    for position, (img_id, data) in enumerate(iter_msgpack_records([path])):
        row = row_of.get(img_id)
        if row is None:
            unlisted += 1
            continue
        seen.append(int(row))
        if not keep[row]:
            excluded += 1
            continue
        try:
            jpeg = _encode_sample(data, job.resize, job.quality)
        except ImageDecodeError as err:
            skipped.append({"id": img_id, "reason": "corrupt", "detail": err.reason})
            continue
        sink.add(f"{index:05d}{position:07d}", jpeg, _meta(row, job))
    return _finish_unit(job, unit, sink.commit(), skipped, {"seen_rows": seen, "unlisted": unlisted})


def _check_settings(out: Path, settings: dict) -> None:
    path = out / PROGRESS_DIR / "job.json"
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != settings:
            changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
            raise ValueError(
                f"{out} holds shards written with different settings ({', '.join(changed)}); use a new output "
                "folder or the same settings to resume"
            )
    else:
        path.write_text(json.dumps(settings, indent=2))


def write_shards(
    metadata: pd.DataFrame,
    out_dir: os.PathLike,
    *,
    images_root: Optional[os.PathLike] = None,
    msgpack_paths: Optional[Sequence[os.PathLike]] = None,
    labeler: Optional[Labeler] = None,
    fingerprint: Optional[str] = None,
    exclusions: Optional[Exclusions] = None,
    samples_per_shard: int = 10000,
    resize: Optional[int] = None,
    quality: int = 90,
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """Write webdataset shards and ``summary.json``; resumes a previous run into the same folder.

    Args:
        metadata: `read_metadata` output (``IMG_ID``, optional ``AUTHOR``, ``LAT``, ``LON``).
        out_dir: output folder (created).
        images_root: folder holding ``IMG_ID`` paths. Exactly one of this and ``msgpack_paths``.
        msgpack_paths: GeoEstimation msgpack shards, records ``{"image", "id"}``; records whose id is not in
            ``metadata`` are counted as ``skipped_unlisted``.
        labeler: ``(lat, lon) -> (N, n_granularities)`` int64 cell_idx labels, coarse -> fine (e.g.
            ``Geocells.assign``); stored with ``fingerprint`` in every sample's JSON.
        fingerprint: identifies the partition behind ``labeler``; required with it.
        exclusions: authors and photo ids to leave out (paper 4.2).
        samples_per_shard: maximum samples per tar file.
        resize: when set, photos are decoded and re-encoded with this short side (never enlarged).
        quality: JPEG quality of re-encoded photos.
        workers: processes encoding units in parallel.
        progress: show a progress bar.

    Returns:
        The summary: ``written``, ``skipped_corrupt``, ``skipped_missing``, ``excluded_author``,
        ``excluded_id`` (+ ``skipped_unlisted`` for msgpack input), ``shards`` (name and count), ``skipped``
        (id, reason, detail) and the settings.
    """
    if (images_root is None) == (msgpack_paths is None):
        raise ValueError("give exactly one image source: images_root (a folder) or msgpack_paths")
    if labeler is not None and not fingerprint:
        raise ValueError("a labeler needs the fingerprint of its partition")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if resize is not None and resize < 8:
        raise ValueError(f"resize must be a short side of at least 8 pixels, got {resize}")
    if images_root is not None and not Path(images_root).is_dir():
        raise FileNotFoundError(f"image folder not found: {images_root}")
    out = Path(out_dir)
    (out / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
    job = _Job(str(out), resize, samples_per_shard, quality, fingerprint)

    n = len(metadata)
    by_author, by_id = (exclusions or Exclusions()).masks(metadata)
    keep = ~(by_author | by_id)
    _TABLE.clear()
    _TABLE.update(
        ids=metadata["IMG_ID"].astype(str).tolist(),
        authors=(metadata["AUTHOR"].astype(str).tolist() if "AUTHOR" in metadata.columns else [""] * n),
        lat=metadata["LAT"].to_numpy(np.float64),
        lon=metadata["LON"].to_numpy(np.float64),
        keep=keep,
        root=str(images_root) if images_root is not None else "",
    )
    if labeler is not None:
        labels = np.asarray(labeler(_TABLE["lat"], _TABLE["lon"]), dtype=np.int64)
        if labels.ndim != 2 or labels.shape[0] != n:
            raise ValueError(f"labeler returned shape {labels.shape}; expected ({n}, n_granularities)")
        _TABLE["labels"] = labels
    settings = {
        "source": "folder" if images_root is not None else "msgpack",
        "rows": n,
        "samples_per_shard": samples_per_shard,
        "resize": resize,
        "quality": quality,
        "fingerprint": fingerprint,
        "excluded": int((~keep).sum()),
    }
    _check_settings(out, settings)

    if images_root is not None:
        rows = np.flatnonzero(keep)
        units = [
            (f"{i:06d}", (job, i, rows[s : s + samples_per_shard]))
            for i, s in enumerate(range(0, len(rows), samples_per_shard))
        ]
        func, total = _folder_unit, len(rows)
    else:
        paths = [str(p) for p in msgpack_paths]
        _TABLE["row_of"] = {img_id: row for row, img_id in enumerate(_TABLE["ids"])}
        units = [(f"m{i:05d}", (job, i, p)) for i, p in enumerate(paths)]
        func, total = _msgpack_unit, len(units)

    records: Dict[str, dict] = {}
    todo = []
    for name, args in units:
        marker = out / PROGRESS_DIR / f"{name}.json"
        if marker.exists():
            records[name] = json.loads(marker.read_text())
        else:
            todo.append((name, args))
    if records:
        logger.info("resuming: %d of %d units already written", len(records), len(units))

    def size(args) -> int:
        return len(args[2]) if images_root is not None else 1

    done_before = sum(size(args) for name, args in units if name in records)
    bar = tqdm(
        total=total,
        initial=done_before,
        desc="shards",
        unit="img" if images_root is not None else "file",
        disable=not progress,
    )
    if workers > 1 and len(todo) > 1:
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            for (name, args), record in zip(todo, pool.map(func, [a for _, a in todo])):
                records[name] = record
                bar.update(size(args))
    else:
        for name, args in todo:
            records[name] = func(args)
            bar.update(size(args))
    bar.close()

    ordered = [records[name] for name, _ in units]
    skipped = [s for r in ordered for s in r["skipped"]]
    summary = {
        "written": sum(r["written"] for r in ordered),
        "skipped_corrupt": sum(s["reason"] == "corrupt" for s in skipped),
        "skipped_missing": sum(s["reason"] == "missing" for s in skipped),
        "excluded_author": int(by_author.sum()),
        "excluded_id": int(by_id.sum()),
    }
    if msgpack_paths is not None:
        seen = np.zeros(n, dtype=bool)
        for r in ordered:
            seen[r["seen_rows"]] = True
        never = np.flatnonzero(~seen & keep)
        skipped += [
            {"id": _TABLE["ids"][row], "reason": "missing", "detail": "not in any msgpack shard"}
            for row in never
        ]
        summary["skipped_missing"] = len(never)
        summary["skipped_unlisted"] = sum(r["unlisted"] for r in ordered)
        # Excluded photos count only when the shards actually hold them.
        summary["excluded_author"] = int((by_author & seen).sum())
        summary["excluded_id"] = int((by_id & seen).sum())
    summary.update(
        shards=[s for r in ordered for s in r["shards"]],
        skipped=skipped,
        settings=settings,
    )
    tmp = out / (SUMMARY + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out / SUMMARY)
    _TABLE.clear()
    return summary


def shard_urls(shard_dir: os.PathLike) -> List[str]:
    """The shard files listed in ``summary.json`` of a shard folder, in order."""
    summary = read_summary(shard_dir)
    return [str(Path(shard_dir) / s["name"]) for s in summary["shards"]]


def read_summary(shard_dir: os.PathLike) -> dict:
    path = Path(shard_dir) / SUMMARY
    if not path.is_file():
        raise FileNotFoundError(f"no {SUMMARY} in {shard_dir}: not a finished shard folder")
    return json.loads(path.read_text())


def read_shard_metadata(urls: Sequence[os.PathLike], *, progress: bool = False) -> pd.DataFrame:
    """The metadata of every sample in ``urls``, in shard order, from the JSON members alone.

    The images are seeked over, not read, so a pass over MP16's shards reads a few hundred bytes per photo.

    Returns:
        A frame ``IMG_ID, AUTHOR, LAT, LON`` (`read_metadata`'s columns), one row per sample.

    Raises:
        ValueError: naming the shard and member of a sample whose JSON lacks ``id``, ``lat`` or ``lon``, or a
            file that is not a tar archive.
    """
    ids: List[str] = []
    authors: List[str] = []
    lat: List[float] = []
    lon: List[float] = []
    for url in tqdm(list(urls), desc="shard metadata", unit="shard", disable=not progress):
        try:
            with tarfile.open(url, "r:") as tar:
                for member in tar:
                    if not (member.isfile() and member.name.endswith(".json")):
                        continue
                    try:
                        meta = json.loads(tar.extractfile(member).read())
                        ids.append(str(meta["id"]))
                        lat.append(float(meta["lat"]))
                        lon.append(float(meta["lon"]))
                    except (KeyError, TypeError, ValueError) as err:
                        raise ValueError(
                            f"shard {url}: {member.name} is not a sample's metadata "
                            f"({{'id', 'lat', 'lon', ...}}): {err!r}"
                        ) from None
                    authors.append(str(meta.get("author", "")))
        except tarfile.ReadError as err:
            raise ValueError(f"shard {url} is not a tar archive ({err})") from None
    return pd.DataFrame(
        {
            "IMG_ID": ids,
            "AUTHOR": authors,
            "LAT": np.asarray(lat, np.float64),
            "LON": np.asarray(lon, np.float64),
        }
    )
