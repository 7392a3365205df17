"""Geotagging photo archives in batch (`tag_photos`, ``geoswc tag``; the model is the paper's Search within
Cell, section 3.4).

Every photo gets exactly one row (``ok`` with its position, or ``error`` with the reason). Photos are decoded
at reduced size in DataLoader worker processes (`geoswc.data.photos`, batched by shape) while the main process
runs the model on the previous batch; rows are flushed after every batch, and ``resume`` completes an
interrupted run. Under ``accelerate launch -m geoswc tag ...`` the photos are split by rank and rank 0 merges
one output.

A run reads, in order (`tag_photos`):

1. the inputs (`geoswc.data.images.discover`) and the EXIF folder's checks (`geoswc.tagging.exif_copies`);
2. the model (`load_predictor`);
3. the output's lock and run record, checked against an earlier run when resuming (`geoswc.tagging.records`);
4. the photos the output lacks, batch by batch: rows (`geoswc.tagging.rows`) appended to the output or to a
   journal (`geoswc.tagging.output`), embeddings to their journal (`geoswc.tagging.journal`), EXIF copies;
5. on rank 0: the merged output, the kept embeddings, near-duplicate groups (`geoswc.tagging.duplicates`) and
   the review page (`geoswc.tagging.report`); the counts (`geoswc.tagging.summary`).

`tag_photos` takes a model folder, a `Geolocator`, or any predictor with ``transform`` (image -> (3, H, W)
tensor) and ``predict_batch(pixels) -> list of dicts`` (``lat``, ``lon``, ``method``, ``cell_token``,
``cell_probability``, ``confidence``).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torchvision import transforms as T
from tqdm.auto import tqdm

from geoswc.data.validation import check_choice
from geoswc.data.images import Discovery, discover
from geoswc.data.photos import PhotoDataset, photo_batches
from geoswc.data.threads import threaded_photo_batches
from geoswc.geolocator import Geolocator
from geoswc.precision import default_batch_size, default_workers
from geoswc.street.predictor import StreetGeolocator, check_cluster_settings
from geoswc.runtime import few_photos_settings
from geoswc.tagging.duplicates import duplicate_groups
from geoswc.tagging.exif_copies import (
    PRECISION_DECIMALS,
    ExifCopies,
    check_exif_folder,
    check_writable,
    protected_folders,
)
from geoswc.tagging.journal import EmbeddingJournal, embedding_fingerprint, finalize_embeddings
from geoswc.tagging.output import (
    RowWriter,
    journal_path,
    journal_paths,
    make_row,
    merge,
    output_format,
    pyarrow_parquet,
    read_appendable,
    read_rows,
    write_rows,
)
from geoswc.tagging.records import RUN_RECORD_VERSION, RealPaths, prepare_output, run_identity
from geoswc.tagging.report import html_path, write_html_report
from geoswc.tagging.rows import (
    ReviewOptions,
    batch_places,
    prediction_row,
    review_fields,
    skipped_row,
    tag_rows,
    with_cell_centres,
)
from geoswc.tagging.summary import Tally, TagSummary, summary_lines

# Names of this module's first version that live in the modules above now, importable from here as before.
__all__ = [
    "BATCH_DELAY_ENV",
    "RUN_RECORD_VERSION",
    "Ranks",
    "ReviewOptions",
    "TagSummary",
    "batch_places",
    "html_path",
    "load_predictor",
    "prediction_row",
    "resize_target",
    "review_fields",
    "run_identity",
    "skipped_row",
    "summary_lines",
    "tag_photos",
    "tag_rows",
    "with_cell_centres",
]

logger = logging.getLogger(__name__)

# Test hook: seconds to sleep after each batch, so a test can kill a run part-way through.
BATCH_DELAY_ENV = "GEOSWC_TAG_BATCH_DELAY_S"


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
            # Imported here: accelerate (and the rich it loads) costs a one-process run a tenth of a second.
            from accelerate import PartialState

            # Without GPUs the ranks are CPU processes talking over gloo.
            self.state = PartialState(cpu=not torch.cuda.is_available())
        self.rank = self.state.process_index if self.state else 0
        self.world = self.state.num_processes if self.state else 1

    def barrier(self):
        if self.state is not None:
            self.state.wait_for_everyone()

    def share(self, value):
        """Rank 0's ``value`` (anything picklable), on every rank."""
        if self.state is None:
            return value
        from accelerate.utils import broadcast_object_list

        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]

    @property
    def device(self):
        return self.state.device if self.state else None


def load_predictor(
    model: Union[str, Path, Any],
    *,
    head: Optional[str] = None,
    device=None,
    precision_mode: Optional[str] = None,
    compile: Union[str, bool, None] = "auto",
    runtime: str = "auto",
):
    """The predictor of a model folder (a `Geolocator`, its head checked), or ``model`` itself when it is one.

    ``precision_mode``, ``compile`` and ``runtime`` (`Geolocator.optimize`) apply to a model folder
    (``precision_mode`` None: ``auto``) and to a `Geolocator` given with a ``precision_mode``; a `Geolocator`
    given without one keeps its own settings.

    Raises:
        FileNotFoundError: the model folder does not exist.
        ValueError: ``head`` is not one of the model's heads, or an unknown precision mode, compile mode or
            runtime.
    """
    if not isinstance(model, (str, os.PathLike)):
        if isinstance(model, Geolocator):
            model.resolve_head(head)
            if precision_mode is not None:
                model.optimize(precision_mode=precision_mode, compile=compile, runtime=runtime)
        return model
    if not os.path.isdir(model):
        raise FileNotFoundError(f"model folder {os.fspath(model)!r} does not exist")
    geolocator = Geolocator.from_pretrained(
        model, device=device, precision_mode=precision_mode or "auto", compile=compile, runtime=runtime
    )
    geolocator.resolve_head(head)  # an unknown head fails before any photo is read
    return geolocator


def _wants_embeddings(predictor, review: ReviewOptions) -> bool:
    return (
        (review.keep_embeddings or review.duplicates)
        and isinstance(predictor, Geolocator)
        and predictor.retrieval is not None
    )


def _predict(predictor, pixels, options: dict, *, embeddings: bool):
    """The predictions of a batch and, when asked, its retrieval embeddings (one backbone pass for both).

    A `Geolocator`'s ``top_cells`` get their cells' centres (``lat``, ``lon``)."""
    if not isinstance(predictor, Geolocator):
        return predictor.predict_batch(pixels, **options), None
    vectors = None
    if embeddings:
        features = predictor.features(pixels)
        emb = predictor.embed(features)
        records = predictor.predict_from_features(features, embeddings=emb, **options)
        vectors = emb.float().cpu().numpy()
    else:
        records = predictor.predict_batch(pixels, **options)
    with_cell_centres(predictor, records)
    return records, vectors


def _embedding_dim(predictor) -> int:
    """Width of a `Geolocator`'s retrieval embeddings."""
    if predictor.index is not None:
        return int(predictor.index.dim)
    width = int(getattr(predictor, "feature_width", predictor.backbone.num_features))
    with torch.inference_mode():
        return int(predictor.embed(torch.zeros(1, width)).shape[1])


def tag_photos(
    paths: Sequence[str],
    *,
    model: Union[str, Path, Any],
    out: Union[str, Path],
    batch_size: Optional[int] = None,
    workers: Optional[int] = None,
    decode_threads: Optional[int] = None,
    resume: bool = False,
    overwrite: bool = False,
    write_exif: Optional[str] = None,
    precision: str = "exact",
    head: Optional[str] = None,
    target: Optional[int] = None,
    progress: bool = False,
    predict_options: Optional[dict] = None,
    ranks: Optional[Ranks] = None,
    review: Optional[ReviewOptions] = None,
    precision_mode: Optional[str] = None,
    compile: Union[str, bool, None] = "auto",
    runtime: str = "auto",
    raw_csv: bool = False,
) -> dict:
    """Geotag every photo under ``paths`` into ``out``, one row per photo.

    Args:
        paths: files, folders, globs and ``@list.txt`` files (see `geoswc.data.images.discover`).
        model: a model folder, a `Geolocator`, or any predictor with ``transform`` and ``predict_batch``.
        out: ``.csv``, ``.jsonl``, ``.geojson`` or ``.parquet`` file.
        batch_size: photos per model call (photos of one transformed shape each); default: 8 on a CPU, 64 on
            a GPU (`geoswc.precision.default_batch_size`).
        workers: decoding processes (0 decodes in the main process); default on a GPU: the usable CPUs minus
            one, at most 32; on a CPU one per 8 CPUs (`geoswc.precision.default_workers`); none when the
            photos fit in one batch.
        decode_threads: with no decoding processes, threads that decode the next batches while the model
            runs (libjpeg-turbo releases the GIL); default: sized by measurement during the run
            (`geoswc.data.threads.DecodeSizing`); 0 decodes in the calling thread between batches.
        resume: complete an existing output, skipping the photos it already holds (matched by real path). The
            output must have been started with the same model, precision, head, ``write_exif``, ``target`` and
            ``predict_options`` (recorded in ``OUT.run.json``).
        overwrite: replace an existing output (and its run record), and existing files in ``write_exif``.
        write_exif: folder for JPEG copies with the GPS position in their EXIF, laid out like the inputs; it
            may not be, contain or lie inside an input folder or the folder of an input file. An existing
            copy is kept (counted in ``exif_skipped`` and ``exif_existing``) unless ``overwrite``.
        precision: ``exact``, ``city`` (2 decimals), ``region`` (1) or ``country`` (0); applies to the output
            and the EXIF copies.
        head: the classification head (default: the model's own).
        target: short side the transform resizes to; JPEGs are decoded at reduced size down to it (default:
            what the transform says).
        progress: show a progress bar (images/s) on stderr.
        predict_options: more keyword arguments of every ``predict_batch`` call (e.g. ``mode``).
        ranks: the process group under accelerate; default: found from the environment.
        precision_mode: the backbone's precision, ``auto`` (default for a model folder: float16 on CUDA,
            float32 on CPU), ``fp32`` (the exact path), ``bf16`` or ``fp16``; see `geoswc.precision`. Not part of the run record: a run may be resumed in another mode.
        compile: ``torch.compile`` the backbone: ``auto`` (on CUDA), ``on`` or ``off``.
        runtime: what executes the backbone: ``auto`` (ONNX Runtime for float32 on a CPU when installed,
            else PyTorch), ``torch`` or ``onnx``; see `geoswc.runtime`. Not part of the run record either.
            For fewer than `geoswc.runtime.FEW_PHOTOS` photos, ``auto`` (runtime and compile) is plain
            PyTorch (`geoswc.runtime.few_photos_settings`).
        raw_csv: write CSV text cells as they are; by default a cell a spreadsheet would run as a formula
            (starting with ``=``, ``+``, ``-``, ``@``) gets a leading ``'`` (`geoswc.tagging.output.escape_cell`),
            which reading the output takes off. Not part of the run record.
        review: what rows hold beyond the position (alternatives, evidence, place names, abstentions,
            EXIF GPS, near-duplicate groups), the embeddings kept and the review page (`ReviewOptions`;
            default: place names, EXIF GPS, embeddings and ``OUT.html``).

    Returns:
        The run summary (`TagSummary` as a dict): the counts of rows by status of the whole output
        (on rank 0 after the merge; other ranks count their own share), photos tagged by this run and resumed
        from an earlier one, EXIF copies, entries skipped while walking folders, and seconds.

    Raises:
        ValueError: bad format, precision or batch size, an unknown head, a ``write_exif`` folder among the
            inputs, a resume with other settings than the output was started with, or a damaged output
            (naming its file and line).
        FileExistsError: ``out`` exists and neither ``resume`` nor ``overwrite`` is set, or another run is
            writing it.
        FileNotFoundError: the model folder, an input or the output's folder does not exist.
        OutputError: the system refused to write the output or an EXIF copy (disk full, permission denied);
            an `OSError` and a `ValueError` whose message names the file.
    """
    start = time.perf_counter()
    output = os.fspath(out)
    fmt = output_format(output)
    _check_arguments(fmt, precision=precision, batch_size=batch_size, resume=resume, overwrite=overwrite)
    review = (review or ReviewOptions()).check()
    ranks = ranks or Ranks()
    if decode_threads is not None and decode_threads < 0:
        raise ValueError(f"decode_threads must be 0 or more, got {decode_threads}")
    # The inputs first: a mistyped path fails before a large model is loaded.
    found: Discovery = discover(paths)
    copies = _exif_copies(paths, found, write_exif, precision=precision, overwrite=overwrite)
    # A run of a few photos pays no engine measurement, export or compilation that it could not earn back.
    runtime, compile = few_photos_settings(len(found.photos), runtime=runtime, compile=compile)
    predictor = load_predictor(
        model, head=head, device=ranks.device, precision_mode=precision_mode, compile=compile, runtime=runtime
    )
    options = _predict_options(predictor, head=head, predict_options=predict_options, review=review)
    device = getattr(predictor, "device", None) or ranks.device
    batch_size = default_batch_size(device) if batch_size is None else batch_size
    run = _Run(
        predictor=predictor,
        output=output,
        fmt=fmt,
        options=options,
        copies=copies,
        precision=precision,
        batch_size=batch_size,
        workers=_default_workers(device, len(found.photos), batch_size) if workers is None else workers,
        decode_threads=decode_threads,
        target=target,
        progress=progress,
        ranks=ranks,
        review=review,
        raw_csv=raw_csv,
        summary=TagSummary(
            output=output,
            skipped_not_photo=found.skipped_not_photo,
            skipped_hidden=found.skipped_hidden,
            unreadable_folders=len(found.unreadable_folders),
        ),
    )
    identity = run_identity(
        model,
        predictor,
        head=head,
        precision=precision,
        write_exif=write_exif,
        target=target,
        predict_options=options,
        review=review,
    )
    relative_inputs = any(not os.path.isabs(photo.path) for photo in found.photos)
    lock, base = prepare_output(
        output,
        ranks=ranks,
        resume=resume,
        overwrite=overwrite,
        identity=identity,
        relative_inputs=relative_inputs,
    )
    try:
        ranks.barrier()
        run.key = RealPaths(base)
        _tag(run, found.photos)
    finally:
        if lock is not None:
            lock.release()
    run.summary.seconds = time.perf_counter() - start
    return dataclasses.asdict(run.summary)


def _default_workers(device, photos: int, batch_size: int) -> int:
    """`geoswc.precision.default_workers`, or none when the photos fit in one batch: decoding can only overlap
    the model's work on another batch, and starting a process costs more than decoding a batch."""
    return default_workers(device) if photos > batch_size else 0


def _exif_copies(paths, found: Discovery, write_exif: Optional[str], *, precision: str, overwrite: bool):
    """The writer of the run's EXIF copies (None without ``write_exif``), its folder checked first: outside
    every input, and writable (so an unwritable folder fails before the model loads, not at the first copy).
    """
    if not write_exif:
        return None
    protected = protected_folders(paths, found.photos)
    check_exif_folder(write_exif, protected)
    check_writable(write_exif)
    return ExifCopies(write_exif, protected=protected, precision=precision, overwrite=overwrite)


def _check_arguments(fmt: str, *, precision: str, batch_size, resume: bool, overwrite: bool) -> None:
    check_choice("precision", precision, PRECISION_DECIMALS)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if fmt == "parquet":
        pyarrow_parquet()


def _check_street_options(predictor, options: dict) -> None:
    """``k`` / ``eps_m`` (``--street-k`` / ``--street-eps-m``) go to a street-scale model only, in range.

    Raises:
        ValueError: a value out of range, or a model that is not a street-scale one.
    """
    if "k" not in options and "eps_m" not in options:
        return
    if not isinstance(predictor, StreetGeolocator):
        raise ValueError(
            "--street-k and --street-eps-m cluster the matches of a street-scale model (geoswc vpr index); "
            "this model places photos with its own swc settings"
        )
    k, eps_m = check_cluster_settings(options.get("k"), options.get("eps_m"))
    options.update({name: v for name, v in (("k", k), ("eps_m", eps_m)) if v is not None})


def _predict_options(predictor, *, head: Optional[str], predict_options: Optional[dict], review) -> dict:
    """The keyword arguments of every ``predict_batch`` call.

    Raises:
        ValueError: ``--duplicates`` with a model that has no retrieval embeddings.
    """
    options = dict(predict_options or {})
    if head is not None:
        options["head"] = head
    _check_street_options(predictor, options)
    if review.duplicates and not _wants_embeddings(predictor, review):
        raise ValueError(
            "--duplicates compares retrieval embeddings; this model has none (a Geolocator with a retrieval "
            "module is needed)"
        )
    if isinstance(predictor, Geolocator) and review.top_k > 5:
        options["top_k"] = review.top_k  # a Geolocator lists 5 alternatives unless asked for more
    return options


@dataclasses.dataclass
class _Run:
    """What the steps of one run share once its arguments are checked and its model is loaded."""

    predictor: Any
    output: str
    fmt: str
    options: dict
    copies: Optional[ExifCopies]
    precision: str
    batch_size: int
    workers: int
    decode_threads: Optional[int]
    target: Optional[int]
    progress: bool
    ranks: Ranks
    review: ReviewOptions
    raw_csv: bool
    summary: TagSummary
    # What identifies a photo (its real path, relative paths taken from where the output was started).
    key: Optional[RealPaths] = None


def _tag(run: _Run, found: Sequence) -> None:
    """The run itself, once the output is locked and checked: tag the photos the output lacks, then (with
    journals) merge the final file, then the review steps (embeddings, duplicate groups, review page); the
    counts go to ``run.summary``."""
    ranks = run.ranks
    photos, keys = _unique_photos(found, run.key)
    # Appending to the output itself works for one process writing CSV/JSONL; everything else goes through
    # per-rank journals merged at the end (also any output whose earlier run left journals behind).
    direct = ranks.world == 1 and run.fmt in ("csv", "jsonl") and not journal_paths(run.output)
    sink, sink_fmt = (run.output, run.fmt) if direct else (journal_path(run.output, ranks.rank), "jsonl")
    done = _done_photos(run, sink, sink_fmt, direct=direct)
    run.summary.resumed = len(done)
    pending = [photo for photo, photo_key in zip(photos, keys) if photo_key not in done]
    share = pending[ranks.rank :: ranks.world]
    logger.info(
        "%d photos found, %d already done, rank %d/%d tags %d",
        len(photos),
        len(done),
        ranks.rank,
        ranks.world,
        len(share),
    )
    own = _tag_share(run, share, sink, sink_fmt)
    ranks.barrier()
    if ranks.rank == 0:
        if direct:
            rows = read_rows(run.output, run.fmt)
        else:
            order = [photo.path for photo in photos]
            rows = merge(run.output, run.fmt, order, include_existing=True, key=run.key, raw=run.raw_csv)
        Tally().add(rows).into(run.summary)
        _finish(run, rows)
    else:  # the other ranks count their own share
        own.into(run.summary)
    ranks.barrier()


def _unique_photos(found: Sequence, key) -> Tuple[list, List[str]]:
    """One entry per photo: a photo reached by two spellings (a symlink to it) is tagged once."""
    photos, keys, seen = [], [], set()
    for photo in found:
        photo_key = key(photo.path)
        if photo_key not in seen:
            seen.add(photo_key)
            photos.append(photo)
            keys.append(photo_key)
    if len(photos) < len(found):
        logger.info("%d photos reached twice (through symlinks) are tagged once", len(found) - len(photos))
    return photos, keys


def _done_photos(run: _Run, sink: str, sink_fmt: str, *, direct: bool) -> set:
    """The keys of the photos an earlier run already wrote rows for; a row torn by a kill is cut off ``sink``."""
    ranks = run.ranks
    done_rows = read_appendable(sink, sink_fmt, repair=True) if os.path.exists(sink) else []
    ranks.barrier()  # every rank has repaired its own journal before any rank reads the others
    if not direct:
        done_rows = []
        if os.path.exists(run.output):
            done_rows.extend(read_rows(run.output, run.fmt))
        for journal in journal_paths(run.output):
            done_rows.extend(read_appendable(journal, "jsonl", repair=False))
    ranks.barrier()  # nobody appends before every rank has read what is done
    return {run.key(row["path"]) for row in done_rows}


def _tag_share(run: _Run, share: Sequence, sink: str, sink_fmt: str) -> Tally:
    """Tag this rank's photos, appending rows to ``sink`` (and embeddings to this rank's journal) after every
    batch; returns the counts of the rows written."""
    ranks, review = run.ranks, run.review
    wants_embeddings = _wants_embeddings(run.predictor, review)
    journal = None
    if wants_embeddings:
        journal = EmbeddingJournal(run.output, ranks.rank, _embedding_dim(run.predictor))
    # The decode workers read each photo's EXIF GPS from the bytes they decode (the main process never opens
    # a photo); with --skip-geotagged a photo with EXIF GPS is not decoded and never reaches the model.
    dataset = PhotoDataset(
        [photo.path for photo in share],
        run.predictor.transform,
        target=run.target or resize_target(run.predictor.transform),
        exif_gps=True,
        skip_geotagged=review.skip_geotagged,
    )
    delay = float(os.environ.get(BATCH_DELAY_ENV, "0") or 0)
    bar = None
    if run.progress and ranks.rank == 0:
        bar = tqdm(total=len(share), unit="img", desc="tag", dynamic_ncols=True, smoothing=0.1)
    writer = RowWriter(sink, sink_fmt, raw=run.raw_csv)
    own = Tally()
    # Batches come by shape, not in order; rows are written in the photos' order as soon as all the rows
    # before them are there, so every output lists the photos as they were found.
    ready: Dict[int, dict] = {}
    written = 0
    try:
        if run.workers == 0 and run.decode_threads != 0:
            batches = threaded_photo_batches(dataset, batch_size=run.batch_size, threads=run.decode_threads)
        else:
            batches = photo_batches(
                dataset, batch_size=run.batch_size, workers=run.workers, pin_memory=torch.cuda.is_available()
            )
        for batch in batches:
            ready.update(_batch_rows(run, batch, share, journal, embeddings=wants_embeddings))
            rows = []
            while written in ready:
                rows.append(ready.pop(written))
                written += 1
            writer.write(rows)
            own.add(rows)
            run.summary.tagged += len(rows)
            if bar is not None:
                bar.update(len(rows) * ranks.world)
            if delay:
                time.sleep(delay)
    finally:
        try:
            writer.close()
            if journal is not None:
                journal.close()
        finally:
            if bar is not None:
                bar.close()
    return own


def _batch_rows(run: _Run, batch, share: Sequence, journal, *, embeddings: bool) -> Dict[int, dict]:
    """The rows of one decoded batch by index in ``share``: predictions (their embeddings journaled first, and
    their EXIF copies written), decoding errors and photos skipped as already geotagged."""
    predictions = {}
    if len(batch):
        device = run.ranks.device
        pixels = batch.pixels if device is None else batch.pixels.to(device, non_blocking=True)
        with torch.inference_mode():
            records, vectors = _predict(run.predictor, pixels, run.options, embeddings=embeddings)
            predictions = dict(zip(batch.indices.tolist(), records))
        if journal is not None:
            # Before the rows: every row on disk has its embedding.
            journal.write([share[i].path for i in batch.indices.tolist()], vectors)
    rows = {}
    for index, error in batch.errors.items():
        rows[index] = make_row(share[index].path, error=error)
    for index in batch.skipped:
        rows[index] = skipped_row(share[index].path, batch.gps[index], precision=run.precision)
    named = (
        batch_places(list(predictions.values()), precision=run.precision) if run.review.place_names else []
    )
    for (index, prediction), place in itertools.zip_longest(predictions.items(), named):
        photo = share[index]
        row = prediction_row(
            photo.path,
            prediction,
            precision=run.precision,
            review=run.review,
            exif_latlon=batch.gps.get(index),
            place=place,
        )
        # The EXIF copy of an ok row is written before the row, so a row on disk means its copy is complete.
        if run.copies is not None and row["status"] == "ok":
            run.copies.write(photo, row["lat"], row["lon"], run.summary)
        rows[index] = row
    return rows


def _finish(run: _Run, rows: List[dict]) -> None:
    """Rank 0, once the output holds every row: the archive's embeddings, near-duplicate groups (the output
    rewritten with them) and the review page."""
    archive, summary, review = None, run.summary, run.review
    if _wants_embeddings(run.predictor, review):
        order = [row["path"] for row in rows if row["status"] in ("ok", "abstain")]
        archive = finalize_embeddings(
            run.output,
            order,
            fingerprint=embedding_fingerprint(run.predictor),
            dim=_embedding_dim(run.predictor),
            key=run.key,
        )
        if archive is not None:
            summary.embeddings = f"{run.output}.embeddings.npy"
    if review.duplicates and archive is not None:
        groups = duplicate_groups(
            archive.vectors, threshold=review.duplicate_threshold, progress=run.progress
        )
        group_of = {run.key(path): int(g) for path, g in zip(archive.paths, groups.tolist())}
        changed = False
        for row in rows:
            group = group_of.get(run.key(row["path"])) or None
            if row.get("duplicate_group") != group:
                row["duplicate_group"], changed = group, True
        if changed:
            write_rows(run.output, run.fmt, rows, raw=run.raw_csv)
        summary.duplicate_groups = len(set(groups.tolist()) - {0})
        summary.duplicates = int(np.count_nonzero(groups))
    if review.html:
        page = html_path(run.output)
        try:
            write_html_report(page, rows, dataclasses.asdict(summary), min_confidence=review.min_confidence)
        except Exception as err:  # the rows are complete; a missing page must not fail the run
            logger.warning("no review page %s: %s", page, err)
        else:
            summary.html = page
