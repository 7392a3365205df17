"""``POST /v1/locate``: read the photos and options of a request, decode the photos within the memory
budget, locate them through the shared batcher, and answer one row per file (the columns of a ``geoswc tag``
row, `geoswc.tagging.run.prediction_row`, then the map's extras: the top cells' outlines and the
neighbours)."""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import quote

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from geoswc.data.images import PhotoError
from geoswc.eval.metrics import haversine_km
from geoswc.geocells.polygons import cell_polygon
from geoswc.geolocator import MODES, cells_in_area
from geoswc.data.validation import choice_error
from geoswc.serve.batching import Overloaded
from geoswc.serve.budget import Reservation
from geoswc.serve.decoding import decode_cost_bytes, decode_uploads
from geoswc.serve.errors import RequestError, error_response, json_safe
from geoswc.serve.inference import LocateJob, LocateOptions
from geoswc.serve.state import ServeState, serve_state
from geoswc.serve.uploads import Upload, busy, keep_upload, read_multipart, safe_name
from geoswc.street.predictor import StreetGeolocator, check_cluster_settings
from geoswc.tagging.output import make_row
from geoswc.tagging.run import ReviewOptions, prediction_row

logger = logging.getLogger(__name__)

__all__ = ["MAX_TOP_K", "confidence_words", "parse_area", "parse_min_confidence", "router"]

MAX_TOP_K = 50

router = APIRouter()


# ---------------------------------------------------------------------------------------------- options
def parse_area(text: Optional[str]) -> Optional[Tuple[float, float, float, float]]:
    """``"south,west,north,east"`` degrees as a tuple; None or blank: no area.

    Raises:
        ValueError: not four comma-separated numbers.
    """
    if text is None or not str(text).strip():
        return None
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"area must be 'south,west,north,east' in degrees, got {text!r}")
    return values  # type: ignore[return-value]


def parse_min_confidence(text: Optional[str]) -> Optional[float]:
    """The ``min_confidence`` option (``geoswc tag --min-confidence``) as a float; None or blank: none.

    Raises:
        ValueError: not a number from 0 to 1.
    """
    if text is None or not str(text).strip():
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"min_confidence must be a number from 0 to 1, got {text!r}")
    return value


def _parse_top_k(text: Optional[str]) -> int:
    text = text or "5"
    try:
        top_k = int(text)
    except ValueError:
        top_k = -1
    if not 1 <= top_k <= MAX_TOP_K:
        raise RequestError(422, f"top_k must be an integer from 1 to {MAX_TOP_K}, got {text!r}")
    return top_k


def options_from(state: ServeState, form: Dict[str, str]) -> LocateOptions:
    """A request's form fields as `LocateOptions`, each checked against what the model serves.

    Raises:
        RequestError: 422 naming the bad option and the valid choices.
    """
    model = state.model
    head = form.get("head") or None
    mode = form.get("mode") or "swc"
    if mode not in MODES:
        raise RequestError(422, str(choice_error("mode", mode, MODES)))
    available = state.modes_available()
    if mode not in available:
        raise RequestError(
            422, f"mode {mode!r} needs a background index; this model serves: {', '.join(available)}"
        )
    try:
        if head is not None or mode != "rrm":
            head = model.resolve_head(head)
    except ValueError as err:
        raise RequestError(422, str(err)) from None
    top_k = _parse_top_k(form.get("top_k"))
    try:
        area = parse_area(form.get("area"))
        if area is not None and isinstance(model, StreetGeolocator):
            model.check_area(area)
        elif area is not None:
            if head is None:
                raise ValueError("area needs a classification head; name one with 'head'")
            centers = np.asarray(model.head_partition(head).centers_deg, dtype=np.float64)
            cells_in_area(centers, area)
    except ValueError as err:
        raise RequestError(422, str(err)) from None
    k, eps_m = _cluster_options(model, form)
    return LocateOptions(head=head, mode=mode, top_k=top_k, area=area, k=k, eps_m=eps_m)


def _cluster_options(model: Any, form: Dict[str, str]) -> Tuple[Optional[int], Optional[float]]:
    """``k`` and ``eps_m``: a street-scale model places a photo at the largest cluster of its first k matches
    (`StreetGeolocator.predict_from_features`); absent, the first match.

    Raises:
        RequestError: 422 for a value out of range, or for a model that is not a street-scale one.
    """
    given = {name: form.get(name) or None for name in ("k", "eps_m")}
    if all(value is None for value in given.values()):
        return None, None
    if not isinstance(model, StreetGeolocator):
        raise RequestError(
            422,
            "k and eps_m cluster the matches of a street-scale model (geoswc vpr index); this model "
            "clusters with its own swc settings",
        )
    try:
        return check_cluster_settings(given["k"], given["eps_m"])
    except ValueError as err:
        raise RequestError(422, str(err)) from None


# ---------------------------------------------------------------------------------------------- rows
def confidence_words(confidence: Optional[float]) -> str:
    """The prediction density in words: high (>= 0.5), medium (>= 0.2), low, or unknown (no head)."""
    if confidence is None or not math.isfinite(confidence):
        return "unknown"
    if confidence >= 0.5:
        return "high"
    if confidence >= 0.2:
        return "medium"
    return "low"


def _thumbnail_url(state: ServeState, background_id: str) -> Optional[str]:
    if state.settings.images is None:
        return None
    return f"/v1/thumbnail?id={quote(background_id, safe='')}"


def make_result(
    state: ServeState,
    name: str,
    record: Dict[str, Any],
    options: LocateOptions,
    *,
    min_confidence: Optional[float],
    exif_latlon: Optional[Tuple[float, float]],
) -> Dict[str, Any]:
    """The row of `geoswc tag` (its columns, status ok or abstain, place names, alternatives, evidence, the
    photo's EXIF GPS), then the map's extras."""
    review = ReviewOptions(
        top_k=options.top_k, evidence=len(record.get("neighbours") or []), min_confidence=min_confidence
    )
    row = prediction_row(name, record, review=review, exif_latlon=exif_latlon)
    row.update(
        {
            "head": record.get("head"),
            "mode": options.mode,
            "area": list(options.area) if options.area is not None else None,
            "confidence_words": confidence_words(record.get("confidence")),
            "cells": [
                {
                    "token": cell["token"],
                    "cell_idx": cell["cell_idx"],
                    "probability": cell["prob"],
                    "lat": cell.get("lat"),
                    "lon": cell.get("lon"),
                    "polygon": [list(p) for p in cell_polygon(cell["token"])],
                }
                for cell in record.get("top_cells", [])
            ],
            "neighbours": [
                {
                    **n,
                    "distance_km": float(haversine_km(record["lat"], record["lon"], n["lat"], n["lon"])),
                    "thumbnail": _thumbnail_url(state, n["id"]),
                }
                for n in record.get("neighbours", [])
            ],
        }
    )
    return json_safe(row)


# ---------------------------------------------------------------------------------------------- steps
async def _read_request(
    request: Request, state: ServeState, reservation: Reservation
) -> Tuple[List[Upload], LocateOptions, Optional[float]]:
    """The photos and the options of a request, or the `RequestError` that refuses it."""
    settings = state.settings
    parts = await read_multipart(request, settings, reservation)
    form = {p.name: p.data.decode("utf-8", "replace").strip() for p in parts if p.filename is None}
    for key, value in request.query_params.items():
        form.setdefault(key, value)
    uploads = [p for p in parts if p.filename is not None and p.name == "file"]
    if not uploads:
        raise RequestError(422, "no photo: send one or more multipart fields named 'file'")
    if len(uploads) > settings.max_files:
        raise RequestError(413, f"{len(uploads)} files in one request; the limit is {settings.max_files}")
    options = options_from(state, form)
    try:
        min_confidence = parse_min_confidence(form.get("min_confidence"))
    except ValueError as err:
        raise RequestError(422, str(err)) from None
    return uploads, options, min_confidence


def _reserve_decoding(state: ServeState, uploads: List[Upload], reservation: Reservation) -> List[Any]:
    """Reserve the memory of decoding the request's largest photo (they are decoded one at a time); a photo
    that could never fit in the budget becomes its error.

    Raises:
        RequestError: 503 with Retry-After when the budget is spent by other requests now.
    """
    limit = state.budget.limit_bytes
    items: List[Any] = []
    largest = 0
    for upload in uploads:
        cost = decode_cost_bytes(upload.data, state.model.transform)
        if cost > limit:
            items.append(
                PhotoError(
                    f"decoding it needs about {cost / 2**20:.0f} MiB, over the server's memory budget "
                    f"(--max-decode-mb {state.settings.max_decode_mb:g})"
                )
            )
        else:
            items.append(upload)
            largest = max(largest, cost)
    if not reservation.try_take(largest):
        raise busy("decoding these photos", state.settings)
    return items


async def _locate_all(state: ServeState, decoded: List[Any], options: LocateOptions) -> List[Any]:
    """Each decoded photo's record from the batcher (or the exception that stopped it)."""

    async def one(pixels) -> Any:
        if isinstance(pixels, PhotoError):
            return pixels
        try:
            return await state.batcher.submit(LocateJob(pixels=pixels, options=options))
        except Exception as err:
            return err

    if not state.batcher.running:  # served without the lifespan events (e.g. a bare ASGI transport)
        await state.batcher.start()
    return list(await asyncio.gather(*(one(p) for p in decoded)))


def _answer(
    state: ServeState,
    names: List[str],
    outcomes: List[Any],
    exif_positions: List[Optional[Tuple[float, float]]],
    options: LocateOptions,
    min_confidence: Optional[float],
):
    """The response: 200 when any photo was located, else 503 (busy), 415 (no image) or 422."""
    rows: List[Dict[str, Any]] = []
    overloaded = False
    for name, outcome, exif_latlon in zip(names, outcomes, exif_positions):
        overloaded = overloaded or isinstance(outcome, Overloaded)
        if isinstance(outcome, BaseException):
            if not isinstance(outcome, (PhotoError, ValueError, Overloaded)):
                logger.error("locating %s failed", name, exc_info=outcome)
            rows.append(json_safe(make_row(name, error=str(outcome) or type(outcome).__name__)))
        else:
            rows.append(
                make_result(
                    state, name, outcome, options, min_confidence=min_confidence, exif_latlon=exif_latlon
                )
            )
    body = {"head": options.head, "mode": options.mode, "results": rows}
    if any(r["status"] in ("ok", "abstain") for r in rows):
        return body
    if overloaded:
        return JSONResponse({"detail": "the server is busy; retry", **body}, status_code=503)
    not_image = all(
        isinstance(o, PhotoError) and str(o).startswith(("not a recognised image", "empty file"))
        for o in outcomes
    )
    detail = "; ".join(f"{r['path']}: {r['error']}" for r in rows)
    return JSONResponse(
        {"detail": f"no photo could be located: {detail}", **body}, status_code=415 if not_image else 422
    )


# ---------------------------------------------------------------------------------------------- the route
LOCATE_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {
                    "file": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "description": "one or more photos (JPEG, PNG, WebP, BMP, TIFF, GIF, HEIC)",
                    },
                    "head": {"type": "string", "description": "ce, hc or mvmf (default: the model's best)"},
                    "mode": {"type": "string", "enum": list(MODES), "default": "swc"},
                    "top_k": {"type": "integer", "minimum": 1, "maximum": MAX_TOP_K, "default": 5},
                    "area": {
                        "type": "string",
                        "description": "south,west,north,east in degrees: only cells whose centres lie "
                        "inside compete (west > east crosses the antimeridian)",
                    },
                    "min_confidence": {
                        "type": "number",
                        "minimum": 0,
                        "maximum": 1,
                        "description": "rows whose confidence (prediction density) is below it, or "
                        "unknown, get status 'abstain': lat/lon null, the best guess in guess_lat/guess_lon "
                        "(geoswc tag --min-confidence); default: none",
                    },
                },
            }
        }
    },
}


@router.post(
    "/v1/locate",
    summary="Locate photos: one row per file (the columns of a geoswc tag row, top cells, neighbours)",
    description="One row per file, in order. A row has the columns of a geoswc tag row (docs/tagging.md): "
    "status ok (or abstain below min_confidence, the position then in guess_lat/guess_lon), place names, "
    "the top_cells alternatives, the evidence, and the upload's own EXIF GPS in exif_lat/exif_lon with its "
    "distance to the prediction in exif_distance_km; then the map's extras (cells with their outlines, "
    "neighbours with distances and thumbnails).",
    openapi_extra={"requestBody": LOCATE_BODY},
    responses={
        400: {"description": "malformed multipart body"},
        403: {"description": "a cross-site request (its Origin is not this server)"},
        413: {"description": "body over --max-upload-mb, or too many files"},
        415: {"description": "not multipart, or no file is an image"},
        422: {
            "description": "bad option (head, mode, top_k, area, min_confidence), no file, or no photo "
            "decodable"
        },
        503: {"description": "the queue is full or the memory budget is spent; retry after Retry-After"},
    },
)
async def locate(request: Request):
    state = serve_state(request)
    with state.budget.reservation() as reservation:
        try:
            uploads, options, min_confidence = await _read_request(request, state, reservation)
            items = await asyncio.to_thread(_reserve_decoding, state, uploads, reservation)
        except RequestError as err:
            return error_response(err)
        names = [safe_name(u.filename, i) for i, u in enumerate(uploads)]
        if state.settings.keep_uploads:
            for upload, name in zip(uploads, names):
                await asyncio.to_thread(keep_upload, state.settings.keep_uploads, upload, name)
        del uploads
        decoded, exif_positions = await asyncio.to_thread(
            decode_uploads, items, state.model.transform, reservation
        )
        del items
    outcomes = await _locate_all(state, decoded, options)
    del decoded
    return _answer(state, names, outcomes, exif_positions, options, min_confidence)
