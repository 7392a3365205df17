"""The row of one photo, as ``geoswc tag``, `tag_rows` and the web server write it (docs/tagging.md).

`prediction_row` is `geoswc.tagging.output.make_row` plus what a reviewer acts on (`review_fields`, chosen by
`ReviewOptions`): the best alternative cells and the background photos behind a position, the nearest place's
name (`geoswc.data.places`), an ``abstain`` status below a confidence, the photo's own EXIF GPS and its distance
to the prediction. `tag_rows` gives the rows of photos in memory (no output file).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from geoswc.data.validation import check_choice
from geoswc.data import places
from geoswc.data.exif import gps_from_exif, read_gps
from geoswc.data.photos import PhotoDataset, photo_batches
from geoswc.data.sphere import haversine_km
from geoswc.geolocator import Geolocator
from geoswc.tagging.duplicates import DUPLICATE_THRESHOLD
from geoswc.tagging.exif_copies import PRECISION_DECIMALS, round_latlon
from geoswc.tagging.output import make_row

logger = logging.getLogger(__name__)


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
    check_choice("precision", precision, PRECISION_DECIMALS)
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
