"""Webdataset shard writer: MP16-style metadata + images (folder or GeoEstimation msgpack) -> tar shards.

Per sample a shard holds ``<key>.jpg`` (the JPEG, re-encoded only when resized or not a JPEG) and ``<key>.json``
``{"id", "author", "lat", "lon"}`` plus ``"labels"`` (cell_idx at every granularity, coarse -> fine) and
``"fingerprint"`` when a labeler is given. Paper 4.2's leakage rule (drop every photo by a user of an evaluation
set) is applied here through `Exclusions`.

The job is cut into *units* fixed by the inputs alone: ``samples_per_shard`` consecutive metadata rows (image
folder) or one msgpack file. A unit writes its shards under temporary names, renames them into place and then
records itself in ``_progress/``; a rerun skips recorded units and redoes the rest from scratch, so a killed job
finishes without duplicates or gaps. ``summary.json`` is rebuilt from the records at the end.

No single bad input stops the job: a photo that is missing, unreadable (permission denied, an I/O error) or
corrupt, a msgpack record that is malformed or repeats a photo, and a msgpack file that is truncated, damaged
or unreadable are each counted in the summary with a reason. A unit that met an unreadable photo or a
truncated, damaged or unreadable msgpack file is redone by the next rerun (the condition may have passed, the
file may have been replaced).
Msgpack units see only their own file, so photos held by several files are settled after all units: the
first copy written wins and later copies are dropped from their shards (idempotent, so reruns agree).
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
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .files import write_text_atomic
from .images import (
    ImageDecodeError,
    ImageMissingError,
    decode_image,
    encode_jpeg,
    read_bytes,
    resize_short_side,
)
from .metadata import Exclusions, MsgpackReader

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
            data = read_bytes(root / img_id)
        except ImageMissingError as err:
            skipped.append({"id": img_id, "reason": "missing", "detail": err.reason})
            continue
        except OSError as err:  # permission denied, an I/O error: skipped here, retried by a rerun
            skipped.append({"id": img_id, "reason": "unreadable", "detail": err.strerror or str(err)})
            continue
        try:
            jpeg = _encode_sample(data, job.resize, job.quality)
        except ImageDecodeError as err:
            skipped.append({"id": img_id, "reason": "corrupt", "detail": err.reason})
            continue
        sink.add(f"{row:010d}", jpeg, _meta(row, job))
    retry = any(s["reason"] == "unreadable" for s in skipped)
    return _finish_unit(job, unit, sink.commit(), skipped, {"retry": retry})


def _msgpack_unit(args: Tuple[_Job, int, str]) -> dict:
    """Write the photos of one msgpack file; every record lands in one outcome.

    Records that name no photo (malformed id) go to ``skipped``, those whose id is not in the metadata are
    counted as ``unlisted``, and every other one is listed as ``[position, row, outcome, detail]`` with outcome
    ``written``, ``excluded``, ``duplicate`` (the photo was written or excluded by an earlier record of this
    file), ``malformed`` (no image bytes) or ``corrupt``, for `_settle_msgpack` to settle across files.
    """
    job, index, path = args
    unit = f"m{index:05d}"
    sink = _ShardSink(job, unit)
    row_of: Dict[str, int] = _TABLE["row_of"]
    keep: np.ndarray = _TABLE["keep"]
    name = Path(path).name
    skipped: List[dict] = []
    listed: List[list] = []
    settled: Set[int] = set()
    unlisted = 0
    reader = MsgpackReader(path)
    for record in reader:
        if record.img_id is None:
            where = f"{name} record {record.position}: {record.problem}"
            skipped.append({"id": None, "reason": "malformed", "detail": where})
            continue
        row = row_of.get(record.img_id)
        if row is None:
            unlisted += 1
            continue
        outcome, detail = "written", None
        if row in settled:
            outcome = "duplicate"
        elif not keep[row]:
            outcome = "excluded"
        elif record.problem is not None:
            outcome, detail = "malformed", record.problem
        else:
            try:
                jpeg = _encode_sample(record.image, job.resize, job.quality)
            except ImageDecodeError as err:
                outcome, detail = "corrupt", err.reason
            else:
                sink.add(f"{index:05d}{record.position:07d}", jpeg, _meta(row, job))
        if outcome in ("written", "excluded"):
            settled.add(row)
        listed.append([record.position, int(row), outcome, detail])
    file_errors = [{"file": str(path), "reason": e.reason, "detail": e.detail} for e in reader.errors]
    extra = {
        "records": reader.records,
        "unlisted": unlisted,
        "listed": listed,
        "file_errors": file_errors,
        "retry": bool(file_errors),
    }
    return _finish_unit(job, unit, sink.commit(), skipped, extra)


def _drop_samples(path: Path, keys: Set[str]) -> None:
    """Rewrite the shard ``path`` without the samples ``keys``; a shard left empty is removed.

    A no-op when the shard holds none of them (a rerun after an earlier settlement).
    """
    if not path.exists():
        return
    with tarfile.open(path, "r:") as tar:
        names = tar.getnames()
    kept = [n for n in names if n.split(".", 1)[0] not in keys]
    if len(kept) == len(names):
        return
    if not kept:
        path.unlink()
        return
    tmp = path.with_suffix(".tar.tmp")
    with tarfile.open(path, "r:") as src, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as dst:
        for member in src:
            if member.isfile() and member.name.split(".", 1)[0] not in keys:
                _add(dst, member.name, src.extractfile(member).read())
    os.replace(tmp, path)


def _settle_msgpack(
    out: Path, job: _Job, paths: List[str], records: List[dict], by_author: np.ndarray
) -> dict:
    """Count every msgpack record once across files and drop copies of a photo another file already gave.

    In file order, the first record of a photo that is written or excluded settles it; every later record of
    it is a duplicate, and a later copy its unit wrote is dropped from its shard. Malformed and corrupt copies
    settle nothing, so a good copy after them is still written.

    Returns:
        The per-record counts, ``skipped`` entries, the final ``shards`` and the ``seen`` mask of metadata rows
        that some record names.
    """
    ids = _TABLE["ids"]
    n = len(ids)
    settled_file = np.full(n, -1, dtype=np.int64)
    settled_position = np.zeros(n, dtype=np.int64)
    seen = np.zeros(n, dtype=bool)
    kinds = (
        "written",
        "skipped_corrupt",
        "skipped_malformed",
        "skipped_duplicate",
        "excluded_author",
        "excluded_id",
    )
    counts = dict.fromkeys(kinds, 0)
    skipped: List[dict] = []
    shards: List[dict] = []
    for index, (path, record) in enumerate(zip(paths, records)):
        name = Path(path).name
        counts["skipped_malformed"] += len(record["skipped"])
        skipped += record["skipped"]
        drop: Dict[int, Set[str]] = {}
        n_written = 0
        for position, row, outcome, detail in record["listed"]:
            seen[row] = True
            where = f"{name} record {position}"
            if outcome == "written":
                shard = n_written // job.samples_per_shard
                n_written += 1
            if outcome != "duplicate" and settled_file[row] >= 0:
                if outcome == "written":
                    drop.setdefault(shard, set()).add(f"{index:05d}{position:07d}")
                outcome = "duplicate"
            if outcome == "duplicate":
                first = f"{Path(paths[settled_file[row]]).name} record {settled_position[row]}"
                skipped.append(
                    {"id": ids[row], "reason": "duplicate", "detail": f"{where}: already in {first}"}
                )
                counts["skipped_duplicate"] += 1
            elif outcome == "written":
                settled_file[row], settled_position[row] = index, position
                counts["written"] += 1
            elif outcome == "excluded":
                settled_file[row], settled_position[row] = index, position
                counts["excluded_author" if by_author[row] else "excluded_id"] += 1
            else:
                skipped.append({"id": ids[row], "reason": outcome, "detail": f"{where}: {detail}"})
                counts[f"skipped_{outcome}"] += 1
        for shard, entry in enumerate(record["shards"]):
            if shard in drop:
                _drop_samples(out / entry["name"], drop[shard])
            count = entry["count"] - len(drop.get(shard, ()))
            if count:
                shards.append({"name": entry["name"], "count": count})
    return {**counts, "skipped": skipped, "shards": shards, "seen": seen}


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
            ``metadata`` are counted as ``skipped_unlisted``, repeated photos as ``skipped_duplicate``, records
            without an id or image bytes as ``skipped_malformed``.
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
        The summary: ``written``, ``skipped_corrupt``, ``skipped_missing``, ``skipped_unreadable``,
        ``excluded_author``, ``excluded_id``; for msgpack input also ``records`` (read from the files, each in
        exactly one of ``written``, ``skipped_corrupt``, ``skipped_malformed``, ``skipped_duplicate``,
        ``skipped_unlisted``, ``excluded_author``, ``excluded_id``), ``truncated_files``, ``damaged_files``,
        ``unreadable_files`` and ``file_errors`` (file, reason, detail); then ``shards`` (name and count),
        ``skipped`` (id, reason, detail) and the settings. For a folder, ``written``, the ``skipped_*`` counts
        and the ``excluded_*`` counts add up to the metadata rows.
    """
    _check_write_arguments(images_root, msgpack_paths, labeler, fingerprint, samples_per_shard, resize)
    out = Path(out_dir)
    (out / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
    job = _Job(str(out), resize, samples_per_shard, quality, fingerprint)
    from_folder = images_root is not None

    by_author, by_id = _fill_table(metadata, images_root, labeler, exclusions)
    keep = _TABLE["keep"]
    settings = {
        "source": "folder" if from_folder else "msgpack",
        "rows": len(metadata),
        "samples_per_shard": samples_per_shard,
        "resize": resize,
        "quality": quality,
        "fingerprint": fingerprint,
        "excluded": int((~keep).sum()),
    }
    _check_settings(out, settings)

    paths = [str(p) for p in msgpack_paths] if not from_folder else []
    units, func, total = _plan_units(job, keep, paths, samples_per_shard, from_folder=from_folder)
    records, todo = _resume(out, units, from_folder=from_folder)
    _run_units(func, units, records, todo, total, from_folder=from_folder, workers=workers, progress=progress)

    ordered = [records[name] for name, _ in units]
    if from_folder:
        summary = _folder_summary(ordered, by_author, by_id)
    else:
        summary = _msgpack_summary(out, job, paths, ordered, by_author, keep)
    summary.update(settings=settings)
    write_text_atomic(out / SUMMARY, json.dumps(summary, indent=2))
    _TABLE.clear()
    return summary


def _check_write_arguments(
    images_root, msgpack_paths, labeler, fingerprint, samples_per_shard, resize
) -> None:
    """Raise ValueError / FileNotFoundError on arguments `write_shards` cannot work with."""
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


def _fill_table(
    metadata: pd.DataFrame,
    images_root: Optional[os.PathLike],
    labeler: Optional[Labeler],
    exclusions: Optional[Exclusions],
) -> Tuple[np.ndarray, np.ndarray]:
    """Fill `_TABLE`, the metadata the worker processes read (ids, authors, positions, which rows to keep,
    labels); returns the rows excluded by author and by id."""
    n = len(metadata)
    by_author, by_id = (exclusions or Exclusions()).masks(metadata)
    _TABLE.clear()
    _TABLE.update(
        ids=metadata["IMG_ID"].astype(str).tolist(),
        authors=(metadata["AUTHOR"].astype(str).tolist() if "AUTHOR" in metadata.columns else [""] * n),
        lat=metadata["LAT"].to_numpy(np.float64),
        lon=metadata["LON"].to_numpy(np.float64),
        keep=~(by_author | by_id),
        root=str(images_root) if images_root is not None else "",
    )
    if labeler is not None:
        labels = np.asarray(labeler(_TABLE["lat"], _TABLE["lon"]), dtype=np.int64)
        if labels.ndim != 2 or labels.shape[0] != n:
            raise ValueError(f"labeler returned shape {labels.shape}; expected ({n}, n_granularities)")
        _TABLE["labels"] = labels
    return by_author, by_id


def _plan_units(
    job: _Job, keep: np.ndarray, paths: List[str], samples_per_shard: int, *, from_folder: bool
) -> Tuple[List[Tuple[str, tuple]], Callable[[tuple], dict], int]:
    """The units of work, each ``(name, args of func)``, the function that writes one, and the progress total:
    one unit per shard of kept rows for a folder (total: photos), one per msgpack file (total: files)."""
    if from_folder:
        rows = np.flatnonzero(keep)
        units = [
            (f"{i:06d}", (job, i, rows[s : s + samples_per_shard]))
            for i, s in enumerate(range(0, len(rows), samples_per_shard))
        ]
        return units, _folder_unit, len(rows)
    _TABLE["row_of"] = {img_id: row for row, img_id in enumerate(_TABLE["ids"])}
    units = [(f"m{i:05d}", (job, i, p)) for i, p in enumerate(paths)]
    return units, _msgpack_unit, len(units)


def _resume(
    out: Path, units: List[Tuple[str, tuple]], *, from_folder: bool
) -> Tuple[Dict[str, dict], List[Tuple[str, tuple]]]:
    """The records of units a previous run finished, and the units left to do."""
    records: Dict[str, dict] = {}
    todo = []
    for name, args in units:
        marker = out / PROGRESS_DIR / f"{name}.json"
        record = json.loads(marker.read_text()) if marker.exists() else None
        # Redo a unit that met an unreadable or damaged file, or whose record predates per-record accounting.
        if record is not None and (record.get("retry") or (not from_folder and "listed" not in record)):
            logger.info("redoing unit %s (unreadable or damaged input last time)", name)
            marker.unlink()
            for shard in record["shards"]:
                (out / shard["name"]).unlink(missing_ok=True)
            record = None
        if record is not None:
            records[name] = record
        else:
            todo.append((name, args))
    if records:
        logger.info("resuming: %d of %d units already written", len(records), len(units))
    return records, todo


def _run_units(
    func: Callable[[tuple], dict],
    units: List[Tuple[str, tuple]],
    records: Dict[str, dict],
    todo: List[Tuple[str, tuple]],
    total: int,
    *,
    from_folder: bool,
    workers: int,
    progress: bool,
) -> None:
    """Write the units in ``todo`` (in ``workers`` forked processes when more than one), adding their records
    to ``records``, with a progress bar over ``total``."""

    def size(args) -> int:
        return len(args[2]) if from_folder else 1

    done_before = sum(size(args) for name, args in units if name in records)
    bar = tqdm(
        total=total,
        initial=done_before,
        desc="shards",
        unit="img" if from_folder else "file",
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


def _folder_summary(ordered: List[dict], by_author: np.ndarray, by_id: np.ndarray) -> dict:
    """The counts, shards and skipped photos of a run over an image folder."""
    skipped = [s for r in ordered for s in r["skipped"]]
    summary = {
        "written": sum(r["written"] for r in ordered),
        "skipped_corrupt": sum(s["reason"] == "corrupt" for s in skipped),
        "skipped_missing": sum(s["reason"] == "missing" for s in skipped),
        "skipped_unreadable": sum(s["reason"] == "unreadable" for s in skipped),
        "excluded_author": int(by_author.sum()),
        "excluded_id": int(by_id.sum()),
    }
    summary.update(shards=[s for r in ordered for s in r["shards"]], skipped=skipped)
    return summary


def _msgpack_summary(
    out: Path, job: _Job, paths: List[str], ordered: List[dict], by_author: np.ndarray, keep: np.ndarray
) -> dict:
    """The counts, shards and skipped photos of a run over msgpack files, once duplicates across files are
    settled (`_settle_msgpack`)."""
    settled = _settle_msgpack(out, job, paths, ordered, by_author)
    skipped, shards = settled["skipped"], settled["shards"]
    never = np.flatnonzero(~settled["seen"] & keep)
    file_errors = [e for r in ordered for e in r["file_errors"]]
    detail = "not in any msgpack shard"
    if file_errors:
        detail = f"not in any record read ({len(file_errors)} problems in msgpack files: see file_errors)"
    skipped += [{"id": _TABLE["ids"][row], "reason": "missing", "detail": detail} for row in never]

    def files_with(reason: str) -> int:
        return len({e["file"] for e in file_errors if e["reason"] == reason})

    summary = {
        "written": settled["written"],
        "skipped_corrupt": settled["skipped_corrupt"],
        "skipped_missing": len(never),
        "skipped_unreadable": 0,  # a record cannot be unreadable; its file can (unreadable_files)
        # Excluded photos count only when the shards actually hold them.
        "excluded_author": settled["excluded_author"],
        "excluded_id": settled["excluded_id"],
        "records": sum(r["records"] for r in ordered),
        "skipped_unlisted": sum(r["unlisted"] for r in ordered),
        "skipped_duplicate": settled["skipped_duplicate"],
        "skipped_malformed": settled["skipped_malformed"],
        "truncated_files": files_with("truncated"),
        "damaged_files": files_with("damaged"),
        "unreadable_files": files_with("unreadable"),
        "file_errors": file_errors,
    }
    summary.update(shards=shards, skipped=skipped)
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
