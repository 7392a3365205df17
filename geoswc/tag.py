"""`geoswc tag`: geotag photo archives in batch (issue 6; the model is the paper's Search within Cell, 3.4).

    geoswc tag PATH... --model DIR -o OUT.csv|.jsonl|.geojson|.parquet

Every photo gets exactly one row (``ok`` with its position, or ``error`` with the reason). Photos are decoded
at reduced size in DataLoader worker processes while the main process runs the model on the previous batch;
rows are flushed after every batch, and ``--resume`` completes an interrupted run. Under
``accelerate launch -m geoswc.tag ...`` the photos are split by rank and rank 0 merges one output.

`tag_photos` is the library entry point; it takes any predictor with ``transform`` (PIL image -> (3, H, W)
tensor) and ``predict_batch(pixels) -> list of dicts`` (``lat``, ``lon``, ``method``, ``cell_token``,
``cell_probability``, ``confidence``), which the `Geolocator` provides.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from typing import Callable, Optional, Sequence

from geoswc.archive import PRECISION_DECIMALS, Discovery, PhotoError, discover, load_photo, round_latlon, write_gps_exif
from geoswc.tag_output import (
    RowWriter,
    journal_path,
    journal_paths,
    make_row,
    merge,
    output_format,
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


class _PhotoDataset:
    """Map-style dataset: index -> (index, pixels or None, error or None); decoding errors never raise."""

    def __init__(self, paths: Sequence[str], transform: Callable, target: Optional[int]):
        self.paths, self.transform, self.target = paths, transform, target
        # geoswc's own transforms take decoded arrays directly; any other (torchvision) transform gets PIL.
        self.as_array = bool(getattr(transform, "accepts_arrays", False))
        self.target_side = getattr(transform, "decode_side", "short")

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            image = load_photo(self.paths[index], target=self.target, target_side=self.target_side, as_array=self.as_array)
            return index, self.transform(image), None
        except PhotoError as err:
            return index, None, str(err)
        except Exception as err:  # a transform failing on an odd image is still one photo's problem
            logger.debug("unexpected failure on %s", self.paths[index], exc_info=True)
            return index, None, f"unexpected error ({type(err).__name__}: {err})"


def _collate(items):
    import torch

    indices = [index for index, _, _ in items]
    good = [(index, pixels) for index, pixels, _ in items if pixels is not None]
    errors = {index: error for index, _, error in items if error is not None}
    pixels = torch.stack([p for _, p in good]) if good else None
    return indices, [index for index, _ in good], pixels, errors


def _worker_init(_):
    import torch

    # Workers decode; one thread each keeps them from fighting the model's threads for the cores.
    torch.set_num_threads(1)


def resize_target(transform) -> Optional[int]:
    """The short side to decode photos at for this eval transform (reduced-size decoding), or None.

    geoswc's transforms say it (``decode_target``); for a torchvision one it is the size of its ``Resize``.
    """
    from torchvision import transforms as T

    if getattr(transform, "decode_target", None):
        return int(transform.decode_target)
    steps = getattr(transform, "transforms", [transform])
    for step in steps:
        if isinstance(step, T.Resize):
            size = step.size
            return int(size if isinstance(size, int) else min(size))
    return None


class _Ranks:
    """Rank, world size and barrier; a single process when not launched by accelerate."""

    def __init__(self):
        self.state = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch
            from accelerate import PartialState

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


def tag_photos(
    inputs: Sequence[str],
    predictor,
    output: str,
    *,
    batch_size: int = 32,
    workers: Optional[int] = None,
    resume: bool = False,
    overwrite: bool = False,
    write_exif: Optional[str] = None,
    precision: str = "exact",
    target: Optional[int] = None,
    progress: bool = False,
    predict_options: Optional[dict] = None,
    ranks: Optional[_Ranks] = None,
) -> TagSummary:
    """Geotag every photo under ``inputs`` into ``output``.

    Args:
        inputs: files, folders, globs and ``@list.txt`` files (see `geoswc.archive.discover`).
        predictor: has ``transform`` and ``predict_batch`` (a `Geolocator`).
        output: ``.csv``, ``.jsonl``, ``.geojson`` or ``.parquet`` file.
        batch_size: photos per model call.
        workers: decoding processes (0 decodes in the main process); default: the CPU count minus one, at most 8.
        resume: complete an existing output, skipping the photos it already holds.
        overwrite: replace an existing output.
        write_exif: folder for JPEG copies with the GPS position in their EXIF, laid out like the inputs.
        precision: ``exact``, ``city`` (2 decimals), ``region`` (1) or ``country`` (0); applies to the output
            and the EXIF copies.
        target: short side the transform resizes to; JPEGs are decoded at reduced size down to it.
        progress: show a progress bar (images/s) on stderr.
        predict_options: keyword arguments of every ``predictor.predict_batch`` call (e.g. ``head``).
        ranks: the process group under accelerate; None for one process.

    Returns:
        The counts of the output's rows, on rank 0 after the merge; other ranks count their own share.

    Raises:
        ValueError: bad format, precision or batch size.
        FileExistsError: ``output`` exists and neither ``resume`` nor ``overwrite`` is set.
    """
    import torch
    from torch.utils.data import DataLoader

    start = time.perf_counter()
    fmt = output_format(output)
    if precision not in PRECISION_DECIMALS:
        raise ValueError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISION_DECIMALS)}")
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if fmt == "parquet":
        from geoswc.tag_output import _pyarrow_parquet

        _pyarrow_parquet()
    ranks = ranks or _Ranks()
    if workers is None:
        workers = max(0, min(8, (os.cpu_count() or 1) - 1))

    found: Discovery = discover(inputs)
    summary = TagSummary(
        output=output,
        skipped_not_photo=found.skipped_not_photo,
        skipped_hidden=found.skipped_hidden,
        unreadable_folders=len(found.unreadable_folders),
    )
    photos = found.photos
    if write_exif and found.root and os.path.realpath(write_exif) == os.path.realpath(found.root):
        raise ValueError(f"--write-exif {write_exif} is the inputs' own folder; the copies would replace the originals")
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
        "%d photos found, %d already done, rank %d/%d tags %d", len(photos), len(done), ranks.rank,
        ranks.world, len(share),
    )

    counts = {"ok": 0, "error": 0}
    if direct:
        for row in done_rows:
            counts[row["status"]] += 1
    dataset = _PhotoDataset([photo.path for photo in share], predictor.transform, target)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )
    delay = float(os.environ.get(BATCH_DELAY_ENV, "0") or 0)
    device = ranks.device
    bar = None
    if progress and ranks.rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=len(share), unit="img", desc="tag", dynamic_ncols=True, smoothing=0.1)
    writer = RowWriter(sink, sink_fmt)
    try:
        for indices, good, pixels, errors in loader:
            predictions = {}
            if pixels is not None:
                if device is not None:
                    pixels = pixels.to(device, non_blocking=True)
                with torch.inference_mode():
                    predictions = dict(zip(good, predictor.predict_batch(pixels, **(predict_options or {}))))
            rows = []
            for index in indices:
                photo = share[index]
                if index in errors:
                    rows.append(make_row(photo.path, error=errors[index]))
                    continue
                prediction = dict(predictions[index])
                prediction["lat"], prediction["lon"] = round_latlon(prediction["lat"], prediction["lon"], precision)
                if write_exif:
                    # The copy is written before its row, so a row on disk means its copy is complete.
                    try:
                        write_gps_exif(
                            photo.path, os.path.join(write_exif, photo.rel), prediction["lat"],
                            prediction["lon"], precision=precision,
                        )
                        summary.exif_written += 1
                    except PhotoError as err:
                        logger.debug("no EXIF copy of %s: %s", photo.path, err)
                        summary.exif_skipped += 1
                rows.append(make_row(photo.path, prediction=prediction))
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
    return summary


# --------------------------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="photo files, folders, globs or @list.txt files")
    parser.add_argument("--model", required=True, metavar="DIR", help="model folder (Geolocator.save_pretrained)")
    parser.add_argument(
        "-o", "--output", required=True, metavar="OUT", help="result file: .csv, .jsonl, .geojson or .parquet"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="photos per model call (default 32)")
    parser.add_argument(
        "--workers", type=int, default=None, help="decoding processes (default: CPU count - 1, at most 8)"
    )
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true", help="complete an interrupted run's output")
    existing.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument(
        "--write-exif", metavar="DIR", help="write JPEG copies with GPS EXIF under DIR (originals are never touched)"
    )
    parser.add_argument(
        "--precision", choices=list(PRECISION_DECIMALS), default="exact",
        help="round published positions: city = 2 decimals (~1 km), region = 1 (~11 km), country = 0 (~111 km)",
    )
    parser.add_argument("--head", default=None, help="classification head to use (default: the model's own)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _load_predictor(model_dir: str, head: Optional[str], device):
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model folder {model_dir!r} does not exist")
    from geoswc.geolocator import Geolocator

    model = Geolocator.from_pretrained(model_dir, device=device)
    model.resolve_head(head)  # an unknown head fails before any photo is read
    return model


def run(args: argparse.Namespace) -> int:
    """Run `geoswc tag` from parsed arguments; prints the closing summary and returns the exit code."""
    ranks = _Ranks()
    output_format(args.output)  # a bad output name fails before the model loads
    predictor = _load_predictor(args.model, args.head, ranks.device)
    summary = tag_photos(
        args.paths,
        predictor,
        args.output,
        batch_size=args.batch_size,
        workers=args.workers,
        resume=args.resume,
        overwrite=args.overwrite,
        write_exif=args.write_exif,
        precision=args.precision,
        target=resize_target(predictor.transform),
        progress=not args.no_progress and (sys.stderr.isatty() or os.environ.get("GEOSWC_PROGRESS") == "1"),
        predict_options={"head": args.head} if args.head else None,
        ranks=ranks,
    )
    if ranks.rank == 0:
        _print_summary(summary)
    return 0


def _print_summary(summary: TagSummary) -> None:
    rate = summary.tagged / summary.seconds if summary.seconds else 0.0
    skipped = []
    if summary.skipped_not_photo:
        skipped.append(f"{summary.skipped_not_photo} non-photo files")
    if summary.skipped_hidden:
        skipped.append(f"{summary.skipped_hidden} hidden entries")
    if summary.unreadable_folders:
        skipped.append(f"{summary.unreadable_folders} unreadable folders")
    if skipped:
        print(f"skipped {', '.join(skipped)} found in folders")
    if summary.exif_written or summary.exif_skipped:
        print(f"wrote {summary.exif_written} EXIF copies ({summary.exif_skipped} non-JPEG photos have none)")
    resumed = f", {summary.resumed} from the earlier run" if summary.resumed else ""
    print(
        f"tagged {summary.tagged} photos in {summary.seconds:.1f} s ({rate:.1f} images/s){resumed}: "
        f"{summary.ok} ok, {summary.error} error rows in {summary.output}"
    )


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "tag",
        help="geotag photo archives (one row per photo; resumable)",
        description="Geotag photos into a CSV, JSONL, GeoJSON or Parquet file, one row per photo. "
        "Run under `accelerate launch -m geoswc.tag ...` to split the photos over several GPUs or nodes.",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``accelerate launch -m geoswc.tag ...`` (the same arguments as ``geoswc tag``)."""
    from geoswc.cli import main as cli_main

    return cli_main(["tag", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
