"""Geotagging photo archives in batch (`tag_photos`, ``geoswc tag``; the model is the paper's Search within
Cell, section 3.4).

Every photo gets exactly one row (``ok`` with its position, or ``error`` with the reason). Photos are decoded
at reduced size in DataLoader worker processes (`geoswc.data.photos`, batched by shape) while the main process
runs the model on the previous batch; rows are flushed after every batch, and ``resume`` completes an
interrupted run. Under ``accelerate launch -m geoswc tag ...`` the photos are split by rank and rank 0 merges
one output.

A run holds a lock on its output (``OUT.lock``) and records what it was started with (``OUT.run.json``: the
model, precision, head, EXIF folder and predict options); ``resume`` refuses an output started otherwise, and
matches photos by their real path, so ``archive/`` and ``/home/me/archive/`` are the same photos. EXIF copies
never go into the inputs' folders and never replace an existing file unless ``overwrite``.

Rows also carry what a reviewer acts on (`ReviewOptions`, docs/tagging.md): the best alternative cells and
the background photos behind a position, the nearest place's name (`geoswc.data.places`), an ``abstain``
status below a confidence, the photo's own EXIF GPS and its distance to the prediction, and near-duplicate
groups. A run over a retrieval model keeps the archive's embeddings beside ``OUT`` (`geoswc.tagging.similar`) and
ends with a review page ``OUT.html``.

`tag_photos` takes a model folder, a `Geolocator`, or any predictor with ``transform`` (image -> (3, H, W)
tensor) and ``predict_batch(pixels) -> list of dicts`` (``lat``, ``lon``, ``method``, ``cell_token``,
``cell_probability``, ``confidence``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from torchvision import transforms as T
from tqdm.auto import tqdm

from geoswc import __version__
from geoswc.data import places
from geoswc.data.exif import gps_from_exif, read_gps
from geoswc.data.images import Discovery, PhotoError, discover
from geoswc.data.photos import PhotoDataset, photo_batches
from geoswc.eval import haversine_km
from geoswc.geolocator import FORMAT_VERSION, Geolocator
from geoswc.precision import default_batch_size, default_workers
from geoswc.tagging.exif_copies import PRECISION_DECIMALS, round_latlon, write_gps_exif
from geoswc.tagging.output import (
    STATUSES,
    OutputLock,
    RowWriter,
    journal_path,
    journal_paths,
    make_row,
    merge,
    os_errors,
    output_error,
    output_format,
    pyarrow_parquet,
    read_appendable,
    read_rows,
    read_run_record,
    run_record_path,
    write_html_report,
    write_rows,
    write_run_record,
)
from geoswc.tagging.similar import (
    DUPLICATE_THRESHOLD,
    EmbeddingJournal,
    duplicate_groups,
    embedding_files,
    embedding_fingerprint,
    finalize_embeddings,
)

logger = logging.getLogger(__name__)

# Test hook: seconds to sleep after each batch, so a test can kill a run part-way through.
BATCH_DELAY_ENV = "GEOSWC_TAG_BATCH_DELAY_S"
# Version of the run record OUT.run.json; a record of another version is refused by --resume.
# 2: the reviewable columns (docs/tagging.md) and the review options in the identity.
RUN_RECORD_VERSION = 2


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


@dataclasses.dataclass(frozen=True)
class ReviewOptions:
    """What a row holds beyond the position, for a reviewer (docs/tagging.md).

    Attributes:
        top_k: alternatives listed in ``top_cells`` (the head's best cells: token, centre, probability); 0: none.
        evidence: background photos listed in ``evidence`` (id, position, similarity, in the winning cluster);
            0: none.
        min_confidence: rows whose prediction density (``confidence``) is below it, or unknown, get status
            ``abstain``: ``lat``/``lon`` empty, the best guess in ``guess_lat``/``guess_lon``.
        place_names: fill the nearest place, regions and country (`geoswc.data.places`).
        skip_geotagged: photos with EXIF GPS get a ``skipped`` row (their EXIF position, no prediction).
        duplicates: number near-duplicate groups (``duplicate_group``) at the end of the run.
        duplicate_threshold: cosine similarity of retrieval embeddings from which photos are near-duplicates.
        keep_embeddings: keep the archive's embeddings beside the output for ``geoswc similar``.
        html: write the review page ``OUT.html`` at the end.
    """

    top_k: int = 0
    evidence: int = 0
    min_confidence: Optional[float] = None
    place_names: bool = True
    skip_geotagged: bool = False
    duplicates: bool = False
    duplicate_threshold: float = DUPLICATE_THRESHOLD
    keep_embeddings: bool = True
    html: bool = True

    def check(self) -> "ReviewOptions":
        """Raises ValueError naming a bad value."""
        if self.top_k < 0 or self.evidence < 0:
            raise ValueError(f"--top-k and --evidence must be >= 0, got {self.top_k} and {self.evidence}")
        if self.min_confidence is not None and not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError(f"--min-confidence must lie in [0, 1], got {self.min_confidence}")
        if not 0.0 < self.duplicate_threshold <= 1.0:
            raise ValueError(f"--duplicate-threshold must lie in (0, 1], got {self.duplicate_threshold}")
        return self

    def identity(self) -> dict:
        """The options the rows depend on (the run record; ``resume`` compares them)."""
        options = dataclasses.asdict(self)
        options.pop("html")
        return options


def _published(lat: float, lon: float, precision: str) -> Tuple[float, float]:
    return round_latlon(lat, lon, precision)


def _published_exif(lat: float, lon: float, precision: str) -> Tuple[float, float]:
    lat, lon = round_latlon(lat, lon, precision)
    # EXIF rationals decode with binary noise (2.2944999999999998); 7 decimals are ~1 cm.
    return round(lat, 7) + 0.0, round(lon, 7) + 0.0


def review_fields(
    prediction: dict,
    *,
    precision: str = "exact",
    review: ReviewOptions = ReviewOptions(),
    exif_latlon: Optional[Tuple[float, float]] = None,
    place: Optional[places.Place] = None,
) -> dict:
    """The reviewable columns of a placed photo's row (`geoswc.tagging.output.COLUMNS`), positions rounded to
    ``precision``; includes ``status`` (``ok`` or ``abstain``) and the published ``lat``/``lon``.

    Args:
        prediction: the predictor's dict (``lat``, ``lon``, ``confidence``; from a `Geolocator` also
            ``top_cells`` with ``lat``/``lon`` centres, and ``neighbours``).
        precision: publication precision (`geoswc.tagging.exif_copies.PRECISION_DECIMALS`).
        review: what to fill.
        exif_latlon: the photo's EXIF GPS position, if any.
        place: the place of the published position when already looked up (`batch_places`).
    """
    lat, lon = float(prediction["lat"]), float(prediction["lon"])
    pub_lat, pub_lon = _published(lat, lon, precision)
    fields: dict = {"status": "ok", "lat": pub_lat, "lon": pub_lon}
    confidence = prediction.get("confidence")
    if review.min_confidence is not None:
        # An unknown density (a model without heads) cannot vouch for a position either.
        sure = confidence is not None and math.isfinite(confidence) and confidence >= review.min_confidence
        if not sure:
            fields.update(status="abstain", lat=None, lon=None, guess_lat=pub_lat, guess_lon=pub_lon)
    if review.place_names and math.isfinite(lat) and math.isfinite(lon):
        if place is None:
            (place,) = places.reverse_geocode(np.array([[pub_lat, pub_lon]]), precision=precision)
        fields.update(
            place=place.name or None,
            admin1=place.admin1 or None,
            admin2=place.admin2 or None,
            country_code=place.country_code or None,
            country=place.country or None,
            place_distance_km=None if math.isnan(place.distance_km) else place.distance_km,
        )
    if exif_latlon is not None:
        fields["exif_lat"], fields["exif_lon"] = _published_exif(*exif_latlon, precision)
        fields["exif_distance_km"] = round(float(haversine_km(lat, lon, *exif_latlon)), 3)
    if review.top_k:
        alternatives = []
        for cell in list(prediction.get("top_cells") or [])[: review.top_k]:
            entry = {"token": cell.get("token"), "prob": cell.get("prob")}
            if cell.get("lat") is not None:
                entry["lat"], entry["lon"] = _published(cell["lat"], cell["lon"], precision)
            alternatives.append(entry)
        fields["top_cells"] = alternatives
    if review.evidence:
        evidence = []
        for photo in list(prediction.get("neighbours") or [])[: review.evidence]:
            n_lat, n_lon = _published(photo["lat"], photo["lon"], precision)
            evidence.append(
                {
                    "id": photo["id"],
                    "lat": n_lat,
                    "lon": n_lon,
                    "similarity": round(float(photo["similarity"]), 6),
                    "in_cluster": bool(photo["in_cluster"]),
                }
            )
        fields["evidence"] = evidence
    return fields


def batch_places(predictions: Sequence[dict], *, precision: str = "exact") -> List[Optional[places.Place]]:
    """The places of many predictions' published positions in one gazetteer query (a lookup per row costs
    more than the model on a GPU); None for a non-finite position."""
    latlon = np.array([[float(p["lat"]), float(p["lon"])] for p in predictions], dtype=np.float64).reshape(
        -1, 2
    )
    finite = np.all(np.isfinite(latlon), axis=1)
    published = [_published(lat, lon, precision) for lat, lon in latlon[finite]]
    found = iter(places.reverse_geocode(np.array(published).reshape(-1, 2), precision=precision))
    return [next(found) if ok else None for ok in finite.tolist()]


def prediction_row(
    path: str,
    prediction: dict,
    *,
    precision: str = "exact",
    review: ReviewOptions = ReviewOptions(),
    exif_latlon: Optional[Tuple[float, float]] = None,
    place: Optional[places.Place] = None,
) -> dict:
    """The output row of a placed photo (status ``ok`` or ``abstain``): `make_row` plus `review_fields`.

    The web server and `tag_photos` build their rows with it, so both hold the same fields.
    """
    row = make_row(path, prediction=prediction)
    row.update(
        review_fields(prediction, precision=precision, review=review, exif_latlon=exif_latlon, place=place)
    )
    return row


def skipped_row(path: str, exif_latlon: Tuple[float, float], *, precision: str = "exact") -> dict:
    """The row of a photo left out by ``--skip-geotagged``: status ``skipped`` and its EXIF position."""
    row = make_row(path, prediction={})
    row["status"] = "skipped"
    row["exif_lat"], row["exif_lon"] = _published_exif(*exif_latlon, precision)
    return row


def _photo_gps(photo: Any) -> Optional[Tuple[float, float]]:
    """The EXIF GPS of a photo given to `tag_rows`: read from a path, or from a PIL image's EXIF (an image
    opened from a file keeps it); None for an array or a photo without GPS."""
    if isinstance(photo, (str, os.PathLike)):
        return read_gps(photo)
    getexif = getattr(photo, "getexif", None)
    if getexif is None:
        return None
    try:
        return gps_from_exif(getexif())
    except Exception as err:  # damaged EXIF: no position, as read_gps answers for a file
        logger.debug("no EXIF GPS read from an image: %s", err)
        return None


def tag_rows(
    photos: Any,
    *,
    model: Union[str, Path, Geolocator],
    head: Optional[str] = None,
    mode: str = "swc",
    precision: str = "exact",
    review: Optional[ReviewOptions] = None,
    batch_size: int = 32,
    **options: Any,
) -> List[dict]:
    """The rows ``geoswc tag`` writes, for photos in memory: one dict per photo, in input order.

    A row has the columns of `geoswc.tagging.output.COLUMNS` and is built by `prediction_row`, as the rows of
    `tag_photos` and of the server's ``POST /v1/locate`` are: ``status`` ``ok``, ``abstain`` (below
    ``review.min_confidence``: ``lat``/``lon`` None, the best guess in ``guess_lat``/``guess_lon``),
    ``skipped`` (``review.skip_geotagged``) or ``error`` (the reason in ``error``); the place names, the
    ``top_cells`` alternatives and the ``evidence`` that ``review`` asks for; the photo's own EXIF GPS in
    ``exif_lat``/``exif_lon`` and its distance to the prediction in ``exif_distance_km``.

    Args:
        photos: paths, PIL images or ``(H, W, 3)`` uint8 arrays (one, or a sequence). EXIF GPS is read from
            paths and from PIL images opened from files; arrays have none. A path is the row's ``path``,
            other photos are named ``photo <i>``.
        model: a loaded `Geolocator`, or a model folder (loaded with `Geolocator.from_pretrained`).
        head, mode, **options: as `Geolocator.locate`.
        precision: publication precision of every position (`geoswc.tagging.exif_copies.PRECISION_DECIMALS`).
        review: what the rows hold (`ReviewOptions`; default: place names only). ``duplicates`` needs a run
            over an archive (`tag_photos`); ``keep_embeddings`` and ``html`` concern an output file and are
            not used here.
        batch_size: photos per forward pass.

    Returns:
        One row (dict) per photo.

    Raises:
        ValueError: an unknown precision, a bad review option, ``review.duplicates``, a bad head or mode.
        FileNotFoundError: the model folder does not exist.
    """
    if precision not in PRECISION_DECIMALS:
        raise ValueError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISION_DECIMALS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    review = (review or ReviewOptions()).check()
    if review.duplicates:
        raise ValueError(
            "duplicates are numbered over a whole run; use tag_photos(..., review=ReviewOptions(duplicates=True))"
        )
    if not isinstance(model, Geolocator):
        model = Geolocator.from_pretrained(model)
    if isinstance(photos, (str, os.PathLike, np.ndarray)) or hasattr(photos, "getexif"):
        photos = [photos]
    photos = list(photos)
    if review.top_k > 5:
        options.setdefault("top_k", review.top_k)  # a Geolocator lists 5 alternatives unless asked for more
    dataset = PhotoDataset(photos, model.transform)
    positions = [_photo_gps(photo) for photo in photos]
    rows: List[Optional[dict]] = [None] * len(photos)
    todo = list(range(len(photos)))
    if review.skip_geotagged:
        todo = [i for i in todo if positions[i] is None]
        for i in set(range(len(photos))) - set(todo):
            rows[i] = skipped_row(dataset.describe(i), positions[i], precision=precision)
    if todo:
        for batch in photo_batches(dataset, batch_size=batch_size, indices=todo):
            for i, error in batch.errors.items():
                rows[i] = make_row(dataset.describe(i), error=error)
            if not len(batch):
                continue
            with torch.inference_mode():
                records = model.predict_batch(batch.pixels, head=head, mode=mode, **options)
            with_cell_centres(model, records)
            named = batch_places(records, precision=precision) if review.place_names else []
            for i, record, place in itertools.zip_longest(batch.indices.tolist(), records, named):
                rows[i] = prediction_row(
                    dataset.describe(i),
                    record,
                    precision=precision,
                    review=review,
                    exif_latlon=positions[i],
                    place=place,
                )
    return rows  # type: ignore[return-value]


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

    def share(self, value):
        """Rank 0's ``value`` (anything picklable), on every rank."""
        if self.state is None:
            return value
        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]

    @property
    def device(self):
        return self.state.device if self.state else None


class _RealPaths:
    """The real path of a photo's path (symlinks resolved, relative paths taken from ``base``): what `resume`
    matches photos by. Folders are resolved once each, files with one ``lstat``."""

    def __init__(self, base: str):
        self.base = base
        self._folders: dict = {}

    def __call__(self, path: str) -> str:
        path = os.path.join(self.base, path)
        folder, name = os.path.split(path)
        real = self._folders.get(folder)
        if real is None:
            real = self._folders[folder] = os.path.realpath(folder or os.sep)
        full = os.path.join(real, name)
        return os.path.realpath(full) if os.path.islink(full) else full


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (both absolute and resolved)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _within(path: str, folders: set) -> Optional[str]:
    """The folder of ``folders`` that ``path`` is or lies inside (all absolute and resolved), or None."""
    while path not in folders:
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    return path


def _input_folders(paths: Sequence[str]) -> List[str]:
    """The folders the inputs name, as `geoswc.data.images.discover` reads them: a folder itself, the folder
    of a file, the fixed part of a glob; the lines of ``@list`` files the same way."""
    folders = []

    def add(item: str) -> None:
        if os.path.isdir(item):
            folders.append(item)
        elif any(ch in item for ch in "*?[") and not os.path.lexists(item):
            fixed = []
            for part in item.split(os.sep):
                if any(ch in part for ch in "*?["):
                    break
                fixed.append(part)
            folders.append(os.sep.join(fixed) or os.curdir)
        else:
            folders.append(os.path.dirname(item) or os.curdir)

    for item in paths:
        if item.startswith("@"):
            with open(item[1:], encoding="utf-8", errors="surrogateescape") as f:
                lines = [line.strip() for line in f.read().splitlines()]
            for line in lines:
                if line and not line.startswith("#"):
                    add(os.path.join(os.path.dirname(item[1:]), line))
        else:
            add(item)
    return folders


def _protected_folders(paths: Sequence[str], photos) -> set:
    """The real paths of the input folders and of every photo's folder: no EXIF copy may go into them."""
    folders = set(_input_folders(paths))
    folders.update(os.path.dirname(os.path.abspath(photo.path)) for photo in photos)
    return {os.path.realpath(folder) for folder in folders}


def _check_exif_folder(write_exif: str, protected: set) -> None:
    """Refuse an EXIF folder that is, contains or lies inside an input folder (after resolving symlinks).

    Raises:
        ValueError: naming the input folder.
    """
    real = os.path.realpath(write_exif)
    folder = _within(real, protected)
    relation = "is" if folder == real else "lies inside"
    if folder is None:
        folder, relation = next((f for f in sorted(protected) if _inside(f, real)), None), "contains"
    if folder is not None:
        raise ValueError(
            f"--write-exif {write_exif} {relation} the input folder {folder}; the copies could replace "
            "the originals: choose a folder outside every input"
        )


def _model_identity(model, predictor) -> dict:
    if not isinstance(predictor, Geolocator):
        return {"class": f"{type(predictor).__module__}.{type(predictor).__qualname__}"}
    folder, meta = None, {}
    if isinstance(model, (str, os.PathLike)):
        folder = os.path.realpath(model)
        try:
            with open(os.path.join(folder, "geolocator.json"), encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, ValueError):
            pass  # from_pretrained read it a moment ago
    meta = meta if isinstance(meta, dict) else {}
    # Folders that record the SHA-256 of their parts: one digest of them tells two models of one partition
    # apart, wherever the folder lies.
    parts = meta.get("sha256")
    return {
        "class": f"{Geolocator.__module__}.{Geolocator.__qualname__}",
        "folder": folder,
        "parts_sha256": hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
        if isinstance(parts, dict)
        else None,
        "format_version": meta.get("format_version", FORMAT_VERSION),
        "fingerprint": predictor.fingerprint,
        "backbone": predictor.backbone_name,
        "heads": sorted(predictor.head_names),
    }


def run_identity(
    model,
    predictor,
    *,
    head: Optional[str],
    precision: str,
    write_exif: Optional[str],
    target: Optional[int],
    predict_options: dict,
    review: Optional[ReviewOptions] = None,
) -> dict:
    """What a run's rows depend on, as recorded in ``OUT.run.json`` and compared by ``resume``."""
    if isinstance(predictor, Geolocator):
        try:
            head = predictor.resolve_head(head)  # the model's default head and naming it are one run
        except ValueError:
            pass  # a model without heads (retrieval only)
    options = {key: value for key, value in predict_options.items() if key != "head"}
    return {
        "model": _model_identity(model, predictor),
        "precision": precision,
        "head": head,
        "write_exif": os.path.realpath(write_exif) if write_exif else None,
        "target": target,
        # JSON, as it will be read back (tuples become lists; what JSON cannot hold, its repr).
        "predict_options": json.loads(json.dumps(options, sort_keys=True, default=repr)),
        "review": (review or ReviewOptions()).identity(),
    }


def _identity_differences(old: dict, new: dict) -> List[str]:
    differences = []
    for key in sorted(set(old) | set(new)):
        before, now = old.get(key), new.get(key)
        if key == "model" and isinstance(before, dict) and isinstance(now, dict):
            for part in sorted(set(before) | set(now)):
                # A Geolocator passed as an object has no folder (nor its parts' digest): the rest decides.
                if part in ("folder", "parts_sha256") and None in (before.get(part), now.get(part)):
                    continue
                if before.get(part) != now.get(part):
                    differences.append(f"model {part} {before.get(part)!r} (now {now.get(part)!r})")
        elif before != now:
            differences.append(f"{key.replace('_', ' ')} {before!r} (now {now!r})")
    return differences


def _start_output(
    output: str, *, resume: bool, overwrite: bool, identity: dict, relative_inputs: bool
) -> str:
    """Check (or clear) what an earlier run left at ``output`` and write this run's record.

    Returns:
        The folder the output's relative paths are relative to (where its first run was started).

    Raises:
        FileExistsError: ``output`` or a journal exists and neither ``resume`` nor ``overwrite`` is set.
        ValueError: resuming an output that was started with other settings, or from another folder with
            relative inputs.
    """
    cwd = os.path.realpath(os.getcwd())
    record_path = run_record_path(output)
    existing = [path for path in [output, *journal_paths(output)] if os.path.exists(path)]
    if overwrite:
        for path in [*existing, record_path]:
            if os.path.exists(path):
                with os_errors("remove", path):
                    os.remove(path)
        existing = []
    if not existing:
        # Embeddings and a review page of an output that is gone belong to no run: start them afresh.
        for path in [*embedding_files(output), html_path(output)]:
            if os.path.exists(path):
                with os_errors("remove", path):
                    os.remove(path)
    if existing and not resume:
        what = "output" if existing[0] == output else "unfinished run's journal"
        raise FileExistsError(
            f"{what} {existing[0]} already exists; pass --resume to complete it or --overwrite to replace it"
        )
    base = cwd
    if existing:
        record = read_run_record(output)
        if record is None:
            logger.warning(
                "%s has no run record (%s; written by an older geoswc): its settings cannot be checked",
                output,
                record_path,
            )
        else:
            if record.get("version") != RUN_RECORD_VERSION:
                raise ValueError(
                    f"{record_path} is a run record of version {record.get('version')!r}, this geoswc reads "
                    f"version {RUN_RECORD_VERSION}; finish the run with the geoswc that started it or pass "
                    "--overwrite"
                )
            differences = _identity_differences(record["identity"], identity)
            if differences:
                raise ValueError(
                    f"{output} was started with other settings: {'; '.join(differences)}; resume with the "
                    "settings it was started with, or pass --overwrite to start again"
                )
            base = record.get("cwd") or cwd
            if base != cwd and relative_inputs:
                raise ValueError(
                    f"{output} was started in {base} and this run names photos by relative paths; resume "
                    f"from {base} or name the inputs by absolute paths"
                )
            return base
    write_run_record(
        output,
        {"version": RUN_RECORD_VERSION, "geoswc_version": __version__, "cwd": cwd, "identity": identity},
    )
    return base


def _prepare_output(output: str, *, ranks: Ranks, **checks) -> Tuple[Optional[OutputLock], str]:
    """On rank 0: lock ``output``, then `_start_output`; every rank gets the outcome (or the same error).

    Returns:
        The lock (held by rank 0; None on the other ranks) and the folder of the output's relative paths.
    """
    lock, outcome = None, None
    if ranks.rank == 0:
        try:
            folder = os.path.dirname(output) or os.curdir
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"the output's folder {folder} does not exist")
            lock = OutputLock(output).acquire()
            outcome = ("ok", _start_output(output, **checks))
        except (OSError, ValueError) as err:
            if lock is not None:
                lock.release()
            if ranks.world == 1:
                raise
            kinds = (FileExistsError, FileNotFoundError)
            outcome = (next((k.__name__ for k in kinds if isinstance(err, k)), "ValueError"), str(err))
            ranks.share(outcome)
            raise
    outcome = ranks.share(outcome)
    if outcome[0] != "ok":
        raise {"FileExistsError": FileExistsError, "FileNotFoundError": FileNotFoundError}.get(
            outcome[0], ValueError
        )(outcome[1])
    return lock, outcome[1]


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


class _ExifCopies:
    """Writes the EXIF copies of a run under its folder, never into an input folder (a folder of the copies
    may be a symlink) and never over an existing file unless ``overwrite``."""

    def __init__(self, folder: str, *, protected: set, precision: str, overwrite: bool):
        self.folder, self.protected = folder, protected
        self.precision, self.overwrite = precision, overwrite
        self._checked: set = set()

    def _check_folder(self, dest: str) -> None:
        folder = os.path.dirname(dest)
        if folder in self._checked:
            return
        protected = _within(os.path.realpath(folder), self.protected)
        if protected is not None:
            raise ValueError(
                f"--write-exif: {folder} leads into the input folder {protected}; the copies could "
                "replace the originals"
            )
        self._checked.add(folder)

    def write(self, photo, lat: float, lon: float, summary: TagSummary) -> None:
        dest = os.path.join(self.folder, photo.rel)
        self._check_folder(dest)
        try:
            written = write_gps_exif(
                photo.path, dest, lat, lon, precision=self.precision, overwrite=self.overwrite
            )
        except PhotoError as err:
            logger.debug("no EXIF copy of %s: %s", photo.path, err)
            summary.exif_skipped += 1
            return
        except OSError as err:
            raise output_error("write the EXIF copy", err.filename or dest, err) from err
        if written:
            summary.exif_written += 1
        else:
            logger.info("kept the existing %s (--overwrite replaces it)", dest)
            summary.exif_skipped += 1
            summary.exif_existing += 1


def _ok_row(
    photo,
    prediction: dict,
    *,
    precision: str,
    copies: Optional[_ExifCopies],
    summary: TagSummary,
    review: ReviewOptions,
    exif_latlon: Optional[Tuple[float, float]],
    place: Optional[places.Place] = None,
) -> dict:
    """The row of a placed photo (`prediction_row`), its positions rounded to ``precision``; with ``copies``
    the EXIF copy of an ``ok`` row is written before the row, so a row on disk means its copy is complete."""
    row = prediction_row(
        photo.path, prediction, precision=precision, review=review, exif_latlon=exif_latlon, place=place
    )
    if copies is not None and row["status"] == "ok":
        copies.write(photo, row["lat"], row["lon"], summary)
    return row


def html_path(output: str) -> str:
    """The review page of a run: ``OUT.html`` beside ``OUT``."""
    return f"{output}.html"


def _wants_embeddings(predictor, review: ReviewOptions) -> bool:
    return (
        (review.keep_embeddings or review.duplicates)
        and isinstance(predictor, Geolocator)
        and predictor.retrieval is not None
    )


def with_cell_centres(geolocator: Geolocator, records: List[dict]) -> List[dict]:
    """Add each ``top_cells`` entry's cell centre (``lat``, ``lon``: the spherical mean of the cell's training
    photos) to a `Geolocator`'s prediction records, in place, for `review_fields`; returns ``records``."""
    for record in records:
        head = record.get("head")
        if not record.get("top_cells") or head is None:
            continue
        partition = (
            geolocator.head_partition(head)
            if hasattr(geolocator, "head_partition")
            else geolocator.geocells.fine
        )
        centres = np.asarray(partition.centers_deg, dtype=np.float64)
        for cell in record["top_cells"]:
            cell["lat"], cell["lon"] = (float(v) for v in centres[cell["cell_idx"]])
    return records


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


def tag_photos(
    paths: Sequence[str],
    *,
    model: Union[str, Path, Any],
    out: Union[str, Path],
    batch_size: Optional[int] = None,
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
    review: Optional[ReviewOptions] = None,
    precision_mode: Optional[str] = None,
    compile: Union[str, bool, None] = "auto",
    runtime: str = "auto",
) -> dict:
    """Geotag every photo under ``paths`` into ``out``, one row per photo.

    Args:
        paths: files, folders, globs and ``@list.txt`` files (see `geoswc.data.images.discover`).
        model: a model folder, a `Geolocator`, or any predictor with ``transform`` and ``predict_batch``.
        out: ``.csv``, ``.jsonl``, ``.geojson`` or ``.parquet`` file.
        batch_size: photos per model call (photos of one transformed shape each); default: 8 on a CPU, 64 on
            a GPU (`geoswc.precision.default_batch_size`).
        workers: decoding processes (0 decodes in the main process); default on a GPU: the usable CPUs minus
            one, at most 32; on a CPU one per 8 CPUs (`geoswc.precision.default_workers`).
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
    if precision not in PRECISION_DECIMALS:
        raise ValueError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISION_DECIMALS)}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if fmt == "parquet":
        pyarrow_parquet()
    review = (review or ReviewOptions()).check()
    ranks = ranks or Ranks()
    # The inputs first: a mistyped path fails before a large model is loaded.
    found: Discovery = discover(paths)
    predictor = load_predictor(
        model,
        head=head,
        device=ranks.device,
        precision_mode=precision_mode,
        compile=compile,
        runtime=runtime,
    )
    options = dict(predict_options or {})
    if head is not None:
        options["head"] = head
    if review.duplicates and not _wants_embeddings(predictor, review):
        raise ValueError(
            "--duplicates compares retrieval embeddings; this model has none (a Geolocator with a retrieval "
            "module is needed)"
        )
    if isinstance(predictor, Geolocator) and review.top_k > 5:
        options["top_k"] = review.top_k  # a Geolocator lists 5 alternatives unless asked for more
    device = getattr(predictor, "device", None) or ranks.device
    if workers is None:
        workers = default_workers(device)
    if batch_size is None:
        batch_size = default_batch_size(device)

    summary = TagSummary(
        output=output,
        skipped_not_photo=found.skipped_not_photo,
        skipped_hidden=found.skipped_hidden,
        unreadable_folders=len(found.unreadable_folders),
    )
    copies = None
    if write_exif:
        protected = _protected_folders(paths, found.photos)
        _check_exif_folder(write_exif, protected)
        copies = _ExifCopies(write_exif, protected=protected, precision=precision, overwrite=overwrite)
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
    lock, base = _prepare_output(
        output,
        ranks=ranks,
        resume=resume,
        overwrite=overwrite,
        identity=identity,
        relative_inputs=any(not os.path.isabs(photo.path) for photo in found.photos),
    )
    try:
        ranks.barrier()
        _tag(
            found.photos,
            predictor,
            output=output,
            fmt=fmt,
            key=_RealPaths(base),
            options=options,
            copies=copies,
            precision=precision,
            batch_size=batch_size,
            workers=workers,
            target=target,
            progress=progress,
            ranks=ranks,
            summary=summary,
            review=review,
        )
    finally:
        if lock is not None:
            lock.release()
    summary.seconds = time.perf_counter() - start
    return dataclasses.asdict(summary)


def _tag(
    found: Sequence,
    predictor,
    *,
    output: str,
    fmt: str,
    key: _RealPaths,
    options: dict,
    copies: Optional[_ExifCopies],
    precision: str,
    batch_size: int,
    workers: int,
    target: Optional[int],
    progress: bool,
    ranks: Ranks,
    summary: TagSummary,
    review: ReviewOptions,
) -> None:
    """The run itself, once the output is locked and checked: tag the photos the output lacks, then (with
    journals) merge the final file, then the review steps (embeddings, duplicate groups, review page); the
    counts go to ``summary``."""
    # One row per photo: a photo reached by two spellings (a symlink to it) is tagged once.
    photos, keys, seen = [], [], set()
    for photo in found:
        photo_key = key(photo.path)
        if photo_key not in seen:
            seen.add(photo_key)
            photos.append(photo)
            keys.append(photo_key)
    if len(photos) < len(found):
        logger.info("%d photos reached twice (through symlinks) are tagged once", len(found) - len(photos))

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
    done = {key(row["path"]) for row in done_rows}
    summary.resumed = len(done)
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

    # Batches come by shape, not in order; rows are written in the photos' order as soon as all the rows
    # before them are there, so every output lists the photos as they were found.
    ready: dict = {}

    wants_embeddings = _wants_embeddings(predictor, review)
    journal = None
    if wants_embeddings:
        journal = EmbeddingJournal(output, ranks.rank, _embedding_dim(predictor))
    # The decode workers read each photo's EXIF GPS from the bytes they decode (the main process never opens
    # a photo); with --skip-geotagged a photo with EXIF GPS is not decoded and never reaches the model.
    dataset = PhotoDataset(
        [photo.path for photo in share],
        predictor.transform,
        target=target or resize_target(predictor.transform),
        exif_gps=True,
        skip_geotagged=review.skip_geotagged,
    )
    delay = float(os.environ.get(BATCH_DELAY_ENV, "0") or 0)
    device = ranks.device
    bar = None
    if progress and ranks.rank == 0:
        bar = tqdm(total=len(share), unit="img", desc="tag", dynamic_ncols=True, smoothing=0.1)
    writer = RowWriter(sink, sink_fmt)
    own = _Tally()
    written = 0
    try:
        for batch in photo_batches(
            dataset, batch_size=batch_size, workers=workers, pin_memory=torch.cuda.is_available()
        ):
            predictions = {}
            if len(batch):
                pixels = batch.pixels if device is None else batch.pixels.to(device, non_blocking=True)
                with torch.inference_mode():
                    records, vectors = _predict(predictor, pixels, options, embeddings=wants_embeddings)
                    predictions = dict(zip(batch.indices.tolist(), records))
                if journal is not None:
                    # Before the rows: every row on disk has its embedding.
                    journal.write([share[i].path for i in batch.indices.tolist()], vectors)
            for index, error in batch.errors.items():
                ready[index] = make_row(share[index].path, error=error)
            for index in batch.skipped:
                ready[index] = skipped_row(share[index].path, batch.gps[index], precision=precision)
            named = (
                batch_places(list(predictions.values()), precision=precision) if review.place_names else []
            )
            for (index, prediction), place in itertools.zip_longest(predictions.items(), named):
                ready[index] = _ok_row(
                    share[index],
                    prediction,
                    precision=precision,
                    copies=copies,
                    summary=summary,
                    review=review,
                    exif_latlon=batch.gps.get(index),
                    place=place,
                )
            rows = []
            while written in ready:
                rows.append(ready.pop(written))
                written += 1
            writer.write(rows)
            own.add(rows)
            summary.tagged += len(rows)
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

    ranks.barrier()
    if ranks.rank == 0:
        if direct:
            rows = read_rows(output, fmt)
        else:
            rows = merge(output, fmt, [photo.path for photo in photos], include_existing=True, key=key)
        _Tally().add(rows).into(summary)
        _finish(output, fmt, rows, predictor, key=key, review=review, summary=summary, progress=progress)
    else:  # the other ranks count their own share
        own.into(summary)
    ranks.barrier()


class _Tally:
    """Counts by status and the EXIF distances of rows."""

    def __init__(self):
        self.counts = dict.fromkeys(STATUSES, 0)
        self.geotagged = 0
        self.distances_km: List[float] = []

    def add(self, rows: Sequence[dict]) -> "_Tally":
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


def _embedding_dim(predictor) -> int:
    """Width of a `Geolocator`'s retrieval embeddings."""
    if predictor.index is not None:
        return int(predictor.index.dim)
    width = int(predictor.backbone.num_features)
    with torch.inference_mode():
        return int(predictor.embed(torch.zeros(1, width)).shape[1])


def _finish(
    output: str,
    fmt: str,
    rows: List[dict],
    predictor,
    *,
    key,
    review: ReviewOptions,
    summary: TagSummary,
    progress: bool,
) -> None:
    """Rank 0, once the output holds every row: the archive's embeddings, near-duplicate groups (the output
    rewritten with them) and the review page."""
    archive = None
    if _wants_embeddings(predictor, review):
        order = [row["path"] for row in rows if row["status"] in ("ok", "abstain")]
        archive = finalize_embeddings(
            output,
            order,
            fingerprint=embedding_fingerprint(predictor),
            dim=_embedding_dim(predictor),
            key=key,
        )
        if archive is not None:
            summary.embeddings = f"{output}.embeddings.npy"
    if review.duplicates and archive is not None:
        groups = duplicate_groups(archive.vectors, threshold=review.duplicate_threshold, progress=progress)
        group_of = {key(path): int(g) for path, g in zip(archive.paths, groups.tolist())}
        changed = False
        for row in rows:
            group = group_of.get(key(row["path"])) or None
            if row.get("duplicate_group") != group:
                row["duplicate_group"], changed = group, True
        if changed:
            write_rows(output, fmt, rows)
        summary.duplicate_groups = len(set(groups.tolist()) - {0})
        summary.duplicates = int(np.count_nonzero(groups))
    if review.html:
        page = html_path(output)
        try:
            write_html_report(page, rows, dataclasses.asdict(summary), min_confidence=review.min_confidence)
        except Exception as err:  # the rows are complete; a missing page must not fail the run
            logger.warning("no review page %s: %s", page, err)
        else:
            summary.html = page


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
