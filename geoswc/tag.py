"""Geotagging photo archives in batch (`tag_photos`, ``geoswc tag``; the model is the paper's Search within
Cell, section 3.4).

Every photo gets exactly one row (``ok`` with its position, or ``error`` with the reason). Photos are decoded
at reduced size in DataLoader worker processes (`geoswc.data.photos`, batched by shape) while the main process
runs the model on the previous batch; rows are flushed after every batch, and ``resume`` completes an
interrupted run. Under ``accelerate launch -m geoswc.tag ...`` the photos are split by rank and rank 0 merges
one output.

`tag_photos` takes a model folder, a `Geolocator`, or any predictor with ``transform`` (image -> (3, H, W)
tensor) and ``predict_batch(pixels) -> list of dicts`` (``lat``, ``lon``, ``method``, ``cell_token``,
``cell_probability``, ``confidence``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from accelerate import PartialState
from torchvision import transforms as T
from tqdm.auto import tqdm

from geoswc.archive import PRECISION_DECIMALS, round_latlon, write_gps_exif
from geoswc.data.images import Discovery, PhotoError, discover
from geoswc.data.photos import PhotoDataset, photo_batches
from geoswc.cli import main as cli_main
from geoswc.geolocator import Geolocator
from geoswc.tag_output import (
    RowWriter,
    journal_path,
    journal_paths,
    make_row,
    merge,
    output_format,
    pyarrow_parquet,
    read_appendable,
    read_rows,
)

logger = logging.getLogger(__name__)

# Test hook: seconds to sleep after each batch, so a test can kill a run part-way through.
BATCH_DELAY_ENV = "GEOSWC_TAG_BATCH_DELAY_S"


@dataclasses.dataclass
class TagSummary:
    """What a `tag_photos` call did; the counts cover the whole output, this run and earlier ones."""

    output: str
    ok: int = 0
    error: int = 0
    resumed: int = 0
    tagged: int = 0
    exif_written: int = 0
    exif_skipped: int = 0
    skipped_not_photo: int = 0
    skipped_hidden: int = 0
    unreadable_folders: int = 0
    seconds: float = 0.0


def resize_target(transform) -> Optional[int]:
    """The short side to decode photos at for this eval transform (reduced-size decoding), or None.

    geoswc's transforms say it (``decode_target``); for a torchvision one it is the size of its ``Resize``.
    """
    if getattr(transform, "decode_target", None):
        return int(transform.decode_target)
    steps = getattr(transform, "transforms", [transform])
    for step in steps:
        if isinstance(step, T.Resize):
            size = step.size
            return int(size if isinstance(size, int) else min(size))
    return None


class Ranks:
    """Rank, world size and barrier; a single process when not launched by accelerate."""

    def __init__(self):
        self.state = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Without GPUs the ranks are CPU processes talking over gloo.
            self.state = PartialState(cpu=not torch.cuda.is_available())
        self.rank = self.state.process_index if self.state else 0
        self.world = self.state.num_processes if self.state else 1

    def barrier(self):
        if self.state is not None:
            self.state.wait_for_everyone()

    @property
    def device(self):
        return self.state.device if self.state else None


def _check_output(output: str, fmt: str, *, resume: bool, overwrite: bool, rank: int) -> None:
    existing = [path for path in [output, *journal_paths(output)] if os.path.exists(path)]
    if not existing:
        return
    if overwrite:
        if rank == 0:
            for path in existing:
                os.remove(path)
        return
    if not resume:
        what = "output" if existing[0] == output else "unfinished run's journal"
        raise FileExistsError(
            f"{what} {existing[0]} already exists; pass --resume to complete it or --overwrite to replace it"
        )


def load_predictor(model: Union[str, Path, Any], *, head: Optional[str] = None, device=None):
    """The predictor of a model folder (a `Geolocator`, its head checked), or ``model`` itself when it is one.

    Raises:
        FileNotFoundError: the model folder does not exist.
        ValueError: ``head`` is not one of the model's heads.
    """
    if not isinstance(model, (str, os.PathLike)):
        if isinstance(model, Geolocator):
            model.resolve_head(head)
        return model
    if not os.path.isdir(model):
        raise FileNotFoundError(f"model folder {os.fspath(model)!r} does not exist")
    geolocator = Geolocator.from_pretrained(model, device=device)
    geolocator.resolve_head(head)  # an unknown head fails before any photo is read
    return geolocator


def _ok_row(
    photo, prediction: dict, *, precision: str, write_exif: Optional[str], summary: TagSummary
) -> dict:
    """The row of a placed photo, its position rounded to ``precision``; with ``write_exif`` its EXIF copy is
    written first, so a row on disk means its copy is complete."""
    prediction = dict(prediction)
    prediction["lat"], prediction["lon"] = round_latlon(prediction["lat"], prediction["lon"], precision)
    if write_exif:
        try:
            write_gps_exif(
                photo.path,
                os.path.join(write_exif, photo.rel),
                prediction["lat"],
                prediction["lon"],
                precision=precision,
            )
            summary.exif_written += 1
        except PhotoError as err:
            logger.debug("no EXIF copy of %s: %s", photo.path, err)
            summary.exif_skipped += 1
    return make_row(photo.path, prediction=prediction)


def tag_photos(
    paths: Sequence[str],
    *,
    model: Union[str, Path, Any],
    out: Union[str, Path],
    batch_size: int = 32,
    workers: Optional[int] = None,
    resume: bool = False,
    overwrite: bool = False,
    write_exif: Optional[str] = None,
    precision: str = "exact",
    head: Optional[str] = None,
    target: Optional[int] = None,
    progress: bool = False,
    predict_options: Optional[dict] = None,
    ranks: Optional[Ranks] = None,
) -> dict:
    """Geotag every photo under ``paths`` into ``out``, one row per photo.

    Args:
        paths: files, folders, globs and ``@list.txt`` files (see `geoswc.data.images.discover`).
        model: a model folder, a `Geolocator`, or any predictor with ``transform`` and ``predict_batch``.
        out: ``.csv``, ``.jsonl``, ``.geojson`` or ``.parquet`` file.
        batch_size: photos per model call (photos of one transformed shape each).
        workers: decoding processes (0 decodes in the main process); default: the CPU count minus one, at most 8.
        resume: complete an existing output, skipping the photos it already holds.
        overwrite: replace an existing output.
        write_exif: folder for JPEG copies with the GPS position in their EXIF, laid out like the inputs.
        precision: ``exact``, ``city`` (2 decimals), ``region`` (1) or ``country`` (0); applies to the output
            and the EXIF copies.
        head: the classification head (default: the model's own).
        target: short side the transform resizes to; JPEGs are decoded at reduced size down to it (default:
            what the transform says).
        progress: show a progress bar (images/s) on stderr.
        predict_options: more keyword arguments of every ``predict_batch`` call (e.g. ``mode``).
        ranks: the process group under accelerate; default: found from the environment.

    Returns:
        The run summary (`TagSummary` as a dict): the counts of ``ok`` and ``error`` rows of the whole output
        (on rank 0 after the merge; other ranks count their own share), photos tagged by this run and resumed
        from an earlier one, EXIF copies, entries skipped while walking folders, and seconds.

    Raises:
        ValueError: bad format, precision or batch size, or an unknown head.
        FileExistsError: ``out`` exists and neither ``resume`` nor ``overwrite`` is set.
        FileNotFoundError: the model folder or an input does not exist.
    """
    start = time.perf_counter()
    output = os.fspath(out)
    fmt = output_format(output)
    if precision not in PRECISION_DECIMALS:
        raise ValueError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISION_DECIMALS)}")
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if fmt == "parquet":
        pyarrow_parquet()
    ranks = ranks or Ranks()
    predictor = load_predictor(model, head=head, device=ranks.device)
    options = dict(predict_options or {})
    if head is not None:
        options["head"] = head
    if workers is None:
        workers = max(0, min(8, (os.cpu_count() or 1) - 1))

    found: Discovery = discover(paths)
    summary = TagSummary(
        output=output,
        skipped_not_photo=found.skipped_not_photo,
        skipped_hidden=found.skipped_hidden,
        unreadable_folders=len(found.unreadable_folders),
    )
    photos = found.photos
    if write_exif and found.root and os.path.realpath(write_exif) == os.path.realpath(found.root):
        raise ValueError(
            f"--write-exif {write_exif} is the inputs' own folder; the copies would replace the originals"
        )
    _check_output(output, fmt, resume=resume, overwrite=overwrite, rank=ranks.rank)
    ranks.barrier()

    # Appending to the output itself works for one process writing CSV/JSONL; everything else goes through
    # per-rank journals merged at the end (also any output whose earlier run left journals behind).
    direct = ranks.world == 1 and fmt in ("csv", "jsonl") and not journal_paths(output)
    sink = output if direct else journal_path(output, ranks.rank)
    sink_fmt = fmt if direct else "jsonl"
    done_rows = read_appendable(sink, sink_fmt, repair=True) if os.path.exists(sink) else []
    ranks.barrier()  # every rank has repaired its own journal before any rank reads the others
    if not direct:
        done_rows = []
        if os.path.exists(output):
            done_rows.extend(read_rows(output, fmt))
        for journal in journal_paths(output):
            done_rows.extend(read_appendable(journal, "jsonl", repair=False))
    ranks.barrier()  # nobody appends before every rank has read what is done
    done = {row["path"] for row in done_rows}
    summary.resumed = len(done)
    pending = [photo for photo in photos if photo.path not in done]
    share = pending[ranks.rank :: ranks.world]
    logger.info(
        "%d photos found, %d already done, rank %d/%d tags %d",
        len(photos),
        len(done),
        ranks.rank,
        ranks.world,
        len(share),
    )

    counts = {"ok": 0, "error": 0}
    if direct:
        for row in done_rows:
            counts[row["status"]] += 1
    dataset = PhotoDataset(
        [photo.path for photo in share],
        predictor.transform,
        target=target or resize_target(predictor.transform),
    )
    delay = float(os.environ.get(BATCH_DELAY_ENV, "0") or 0)
    device = ranks.device
    bar = None
    if progress and ranks.rank == 0:
        bar = tqdm(total=len(share), unit="img", desc="tag", dynamic_ncols=True, smoothing=0.1)
    writer = RowWriter(sink, sink_fmt)
    # Batches come by shape, not in order; rows are written in the photos' order as soon as all the rows
    # before them are there, so every output lists the photos as they were found.
    ready: dict = {}
    written = 0
    try:
        for batch in photo_batches(
            dataset, batch_size=batch_size, workers=workers, pin_memory=torch.cuda.is_available()
        ):
            predictions = {}
            if len(batch):
                pixels = batch.pixels if device is None else batch.pixels.to(device, non_blocking=True)
                with torch.inference_mode():
                    predictions = dict(
                        zip(batch.indices.tolist(), predictor.predict_batch(pixels, **options))
                    )
            for index, error in batch.errors.items():
                ready[index] = make_row(share[index].path, error=error)
            for index, prediction in predictions.items():
                ready[index] = _ok_row(
                    share[index], prediction, precision=precision, write_exif=write_exif, summary=summary
                )
            rows = []
            while written in ready:
                rows.append(ready.pop(written))
                written += 1
            writer.write(rows)
            for row in rows:
                counts[row["status"]] += 1
            summary.tagged += len(rows)
            if bar is not None:
                bar.update(len(rows) * ranks.world)
            if delay:
                time.sleep(delay)
    finally:
        writer.close()
        if bar is not None:
            bar.close()

    ranks.barrier()
    if not direct and ranks.rank == 0:
        rows = merge(output, fmt, [photo.path for photo in photos], include_existing=True)
        counts = {"ok": 0, "error": 0}
        for row in rows:
            counts[row["status"]] += 1
    ranks.barrier()
    summary.ok, summary.error = counts["ok"], counts["error"]
    summary.seconds = time.perf_counter() - start
    return dataclasses.asdict(summary)


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
        lines.append(
            f"wrote {summary['exif_written']} EXIF copies ({summary['exif_skipped']} non-JPEG photos "
            "have none)"
        )
    resumed = f", {summary['resumed']} from the earlier run" if summary["resumed"] else ""
    lines.append(
        f"tagged {summary['tagged']} photos in {summary['seconds']:.1f} s ({rate:.1f} images/s){resumed}: "
        f"{summary['ok']} ok, {summary['error']} error rows in {summary['output']}"
    )
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``accelerate launch -m geoswc.tag ...`` (the same arguments as ``geoswc tag``)."""
    return cli_main(["tag", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
