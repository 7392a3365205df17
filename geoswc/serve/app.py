"""The web app and HTTP API of ``geoswc serve`` (thesis 4.2.10.4: upload a photo, browse where it was taken
and the database photos that support it).

`create_app` builds a FastAPI application around a loaded `Geolocator`:

- ``GET /``: the page (``static/index.html``): upload photos, see the prediction, the head's top cells as S2
  polygons, the Search within Cell neighbours, switch head and mode, draw an area; a second view shows a tag
  run on the map. Leaflet and the Natural Earth basemap ship with the package, so it works offline.
- ``POST /v1/locate``: multipart, one or more ``file`` fields and the options ``head``, ``mode``, ``top_k``,
  ``area``, ``min_confidence``; one JSON row per file: the columns of a ``geoswc tag`` row
  (`geoswc.tagging.run.prediction_row`: status ``ok`` or ``abstain``, place names, alternatives, evidence, the
  upload's own EXIF GPS) plus the top cells with their outlines and the neighbours.
- ``GET /v1/model``, ``GET /healthz``, ``GET /docs`` (OpenAPI).

Photos from concurrent requests share forward passes (`geoswc.serve.batching.DynamicBatcher`). Limits: the
body is counted while it streams in and refused with 413 past ``max_upload_mb`` (at once when its
Content-Length says so); uploads are parsed in memory and never written to disk unless ``keep_uploads`` names
a folder; photos are decoded with the guards of `geoswc.data.images` (decompression bombs refused before
decoding); a bad photo is an error row, never a failed batch.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import time
import uuid
from collections import OrderedDict, defaultdict
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image

from geoswc import __version__
from geoswc.data import basemap
from geoswc.data.exif import gps_from_bytes
from geoswc.data.images import (
    MAX_TARGET_PIXELS,
    SNIFF_BYTES,
    ImageDecodeError,
    PhotoError,
    decode_array,
    encode_jpeg,
    image_path,
    load_photo,
    sniff,
)
from geoswc.eval.metrics import haversine_km
from geoswc.geolocator import MODES, Geolocator, cells_in_area
from geoswc.serve.batching import DynamicBatcher, Overloaded
from geoswc.geocells.polygons import cell_polygon
from geoswc.tagging.run import ReviewOptions, prediction_row, with_cell_centres
from geoswc.tagging.output import make_row, output_format, read_rows

logger = logging.getLogger(__name__)

__all__ = ["ServeSettings", "create_app", "decode_upload", "parse_area", "parse_min_confidence"]

DEFAULT_TILE_URL = "https://tile.openstreetmap.org/{z}/{x}/{y}.png"
TILE_ATTRIBUTION = "&copy; OpenStreetMap contributors"
MAX_TOP_K = 50
_CHUNK_LIMIT_PARTS = 64  # form fields beyond the files: head, mode, top_k, area, min_confidence, spares
_FORM_FIELD_BYTES = 1024
_THUMBNAIL_CACHE = 256


@dataclass
class ServeSettings:
    """What ``geoswc serve`` was started with.

    Attributes:
        max_upload_mb: largest request body, in MiB (413 beyond it).
        max_files: most photos in one request.
        keep_uploads: a folder to save every uploaded file in; None keeps uploads in memory only.
        images: root folder of the background photos (their index ids are paths under it): neighbours get
            thumbnails.
        tags: a ``geoswc tag`` output (.csv, .jsonl, .geojson, .parquet) shown by the tag-run view.
        max_batch: most photos per forward pass; 1 serves one photo at a time.
        batch_wait_ms: how long the first photo of a batch waits for others.
        tile_url: online map tiles the page may switch to when they are reachable; None: offline only.
        thumbnail_px: longest side of the thumbnails served.
    """

    max_upload_mb: float = 25.0
    max_files: int = 16
    keep_uploads: Optional[str] = None
    images: Optional[str] = None
    tags: Optional[str] = None
    max_batch: int = 32
    batch_wait_ms: float = 5.0
    tile_url: Optional[str] = DEFAULT_TILE_URL
    thumbnail_px: int = 192

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` and a message naming the problem."""

    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


@dataclass(frozen=True)
class LocateOptions:
    """The options of one request; photos with equal options are located together."""

    head: Optional[str]
    mode: str
    top_k: int
    area: Optional[Tuple[float, float, float, float]]

    def kwargs(self) -> Dict[str, Any]:
        return {"head": self.head, "mode": self.mode, "top_k": self.top_k, "area": self.area}


@dataclass
class _Job:
    pixels: torch.Tensor
    options: LocateOptions


@dataclass
class _Upload:
    name: str
    filename: Optional[str]
    content_type: Optional[str]
    data: bytearray


# ---------------------------------------------------------------------------------------------- decoding
def decode_upload(data: bytes, transform) -> torch.Tensor:
    """An uploaded photo's bytes through the model's evaluation transform, with `load_photo`'s checks.

    The format is sniffed from the content; the decoded size is bounded by
    `geoswc.data.images.MAX_TARGET_PIXELS` before any pixel is decoded (decompression bombs).

    Raises:
        PhotoError: with the reason the photo cannot be used.
    """
    if not data:
        raise PhotoError("empty file")
    kind = sniff(bytes(data[:SNIFF_BYTES]))
    if kind is None:
        raise PhotoError("not a recognised image (JPEG, PNG, WebP, BMP, TIFF, GIF, HEIC)")
    if kind == "HEIF":
        try:
            import pillow_heif
        except ImportError:
            raise PhotoError("HEIC/HEIF photo needs pillow-heif: pip install pillow-heif") from None
        pillow_heif.register_heif_opener()
    try:
        array = decode_array(
            bytes(data),
            target=getattr(transform, "decode_target", None),
            target_side=getattr(transform, "decode_side", "short"),
            max_target_pixels=MAX_TARGET_PIXELS,
        )
    except ImageDecodeError as err:
        raise PhotoError(f"{kind}: {err.reason}") from None
    try:
        image = array if getattr(transform, "accepts_arrays", False) else Image.fromarray(array, "RGB")
        return transform(image)
    except Exception as err:  # a transform failing on an odd image is this photo's problem only
        raise PhotoError(f"{kind}: cannot transform ({type(err).__name__}: {err})") from None


def batch_bucket(n: int, max_batch: int) -> int:
    """The batch size ``n`` photos are padded to: the next power of two, at most ``max_batch`` (and never
    below ``n``)."""
    size = 1
    while size < n:
        size *= 2
    return max(n, min(size, max_batch))


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


def _safe_name(filename: Optional[str], index: int) -> str:
    base = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = re.sub(r"[\x00-\x1f\x7f]", "", base).strip()[:200]
    return base or f"upload-{index + 1}"


def _finite(value: Any) -> Any:
    """JSON cannot carry NaN: non-finite floats become null, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (np.floating,)):
        return _finite(float(value))
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def confidence_words(confidence: Optional[float]) -> str:
    """The prediction density in words: high (>= 0.5), medium (>= 0.2), low, or unknown (no head)."""
    if confidence is None or not math.isfinite(confidence):
        return "unknown"
    if confidence >= 0.5:
        return "high"
    if confidence >= 0.2:
        return "medium"
    return "low"


# ---------------------------------------------------------------------------------------------- multipart
async def _read_multipart(request, settings: ServeSettings) -> List[_Upload]:
    """The parts of a multipart body, parsed while it streams in, in memory, refused past the limits."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    limit = settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_bytes = int(declared)
        except ValueError:
            raise RequestError(400, f"Content-Length is not a number: {declared!r}") from None
        if declared_bytes > limit:
            raise RequestError(
                413,
                f"request body of {declared_bytes} bytes exceeds --max-upload-mb {settings.max_upload_mb:g}",
            )
    content_type = request.headers.get("content-type", "")
    ctype, params = parse_options_header(content_type)
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise RequestError(
            415,
            f"send the photos as multipart/form-data with 'file' fields, got Content-Type {content_type!r}",
        )

    parts: List[_Upload] = []
    state: Dict[str, Any] = {"headers": {}, "field": b"", "value": b""}

    def on_part_begin() -> None:
        state["headers"] = {}

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["field"].decode("latin-1").lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_headers_finished() -> None:
        _, disposition = parse_options_header(state["headers"].get("content-disposition", b""))
        name = disposition.get(b"name", b"").decode("utf-8", "replace")
        filename = disposition.get(b"filename")
        ctype_part = state["headers"].get("content-type")
        if len(parts) >= settings.max_files + _CHUNK_LIMIT_PARTS:
            raise RequestError(413, f"too many form parts (more than {settings.max_files} files)")
        parts.append(
            _Upload(
                name=name,
                filename=None if filename is None else filename.decode("utf-8", "replace"),
                content_type=None if ctype_part is None else ctype_part.decode("latin-1"),
                data=bytearray(),
            )
        )

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part = parts[-1]
        part.data += data[start:end]
        if part.filename is None and len(part.data) > _FORM_FIELD_BYTES:
            raise RequestError(413, f"form field {part.name!r} is longer than {_FORM_FIELD_BYTES} bytes")

    parser = MultipartParser(
        params[b"boundary"],
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
        },
    )
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                # Stop reading: the rest of the body is never taken in.
                raise RequestError(
                    413, f"request body exceeds --max-upload-mb {settings.max_upload_mb:g} ({limit} bytes)"
                )
            parser.write(chunk)
        parser.finalize()
    except RequestError:
        raise
    except Exception as err:
        raise RequestError(400, f"malformed multipart body: {err}") from None
    return parts


# ---------------------------------------------------------------------------------------------- the app
def create_app(model: Geolocator, settings: Optional[ServeSettings] = None):
    """The FastAPI application serving ``model``.

    Args:
        model: a loaded `Geolocator` (``Geolocator.from_pretrained``).
        settings: limits and options (`ServeSettings`); defaults when omitted.

    Returns:
        A ``fastapi.FastAPI``; run it with uvicorn (``geoswc serve`` does). ``app.state.batcher`` is the
        `DynamicBatcher` (its ``stats`` count the forward passes).
    """
    settings = settings or ServeSettings()
    static_dir = Path(str(resources.files("geoswc.serve") / "static"))
    tags_rows: Optional[List[dict]] = None
    if settings.tags is not None:
        tags_rows = read_rows(settings.tags, output_format(settings.tags))
    index = model.index
    index_ids: Optional[Dict[str, int]] = None

    pad_to_buckets = model.device.type == "cuda"

    def process(jobs: List[_Job]) -> List[Any]:
        """One batch (on the batcher's single thread, the model's only caller): forward passes per input
        shape, then the heads and the search per set of options."""
        results: List[Any] = [None] * len(jobs)
        features: List[Optional[torch.Tensor]] = [None] * len(jobs)
        by_shape: Dict[tuple, List[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            by_shape[tuple(job.pixels.shape)].append(i)
        for members in by_shape.values():
            pixels = torch.stack([jobs[i].pixels for i in members])
            if pad_to_buckets:
                # On a GPU every new batch size costs a one-time kernel selection (seconds for a large
                # backbone): batches are padded to a power of two so that only a handful of sizes occur.
                size = batch_bucket(len(members), settings.max_batch)
                pixels = torch.cat([pixels, pixels.new_zeros((size - len(members), *pixels.shape[1:]))])
            feats = model.features(pixels)
            for row, i in enumerate(members):
                features[i] = feats[row]
        by_options: Dict[LocateOptions, List[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            by_options[job.options].append(i)
        for options, members in by_options.items():
            try:
                preds = model.locate(torch.stack([features[i] for i in members]), **options.kwargs())
                for i, record in zip(members, with_cell_centres(model, preds.to_records(model))):
                    results[i] = record
            except Exception as err:  # these photos' options failed; the rest of the batch stands
                for i in members:
                    results[i] = err
        return results

    batcher: DynamicBatcher = DynamicBatcher(
        process, max_batch=settings.max_batch, max_wait_ms=settings.batch_wait_ms
    )

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(
        title="geoswc",
        version=__version__,
        description="Global-scale image geolocation with Search within Cell: upload photos, get positions, "
        "the head's top cells and the background photos that support them. See docs/serving.md.",
        lifespan=lifespan,
    )
    app.state.model = model
    app.state.settings = settings
    app.state.batcher = batcher
    app.mount("/static", StaticFiles(directory=static_dir), name="static")

    def error_response(err: RequestError) -> JSONResponse:
        return JSONResponse({"detail": err.message, **_finite(err.extra)}, status_code=err.status)

    def modes_available() -> List[str]:
        searchable = model.index is not None and model.retrieval is not None
        return [m for m in MODES if m == "cell" or searchable]

    def model_info() -> Dict[str, Any]:
        geocells = model.geocells
        partitions = [{"name": name, "cells": len(geocells.partition(name))} for name in geocells.names]
        return _finite(
            {
                "backbone": model.backbone_name,
                "heads": model.head_names,
                "default_head": model.resolve_head() if model.head_names else None,
                "head_partitions": {kind: model.head_partition(kind).name for kind in model.head_names},
                "modes": modes_available(),
                "partitions": partitions,
                "background_size": 0 if index is None or index.ids is None else int(len(index.ids)),
                "fingerprint": model.fingerprint,
                "image_size": int(model.config.data.image_size),
                "device": str(model.device),
                "geoswc_version": __version__,
                "limits": {"max_upload_mb": settings.max_upload_mb, "max_files": settings.max_files},
                "thumbnails": settings.images is not None,
                "tags": None if settings.tags is None else {"file": os.path.basename(settings.tags)},
                "tile_url": settings.tile_url,
                "tile_attribution": TILE_ATTRIBUTION if settings.tile_url else None,
                "batching": {"max_batch": settings.max_batch, "wait_ms": settings.batch_wait_ms},
            }
        )

    def options_from(form: Dict[str, str]) -> LocateOptions:
        head = form.get("head") or None
        mode = form.get("mode") or "swc"
        if mode not in MODES:
            raise RequestError(422, f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
        if mode not in modes_available():
            raise RequestError(
                422,
                f"mode {mode!r} needs a background index; this model serves: {', '.join(modes_available())}",
            )
        try:
            if head is not None or mode != "rrm":
                head = model.resolve_head(head)
        except ValueError as err:
            raise RequestError(422, str(err)) from None
        top_k_text = form.get("top_k") or "5"
        try:
            top_k = int(top_k_text)
        except ValueError:
            top_k = -1
        if not 1 <= top_k <= MAX_TOP_K:
            raise RequestError(422, f"top_k must be an integer from 1 to {MAX_TOP_K}, got {top_k_text!r}")
        try:
            area = parse_area(form.get("area"))
            if area is not None:
                if head is None:
                    raise ValueError("area needs a classification head; name one with 'head'")
                centers = np.asarray(model.head_partition(head).centers_deg, dtype=np.float64)
                cells_in_area(centers, area)
        except ValueError as err:
            raise RequestError(422, str(err)) from None
        return LocateOptions(head=head, mode=mode, top_k=top_k, area=area)

    def thumbnail_url(background_id: str) -> Optional[str]:
        if settings.images is None:
            return None
        from urllib.parse import quote

        return f"/v1/thumbnail?id={quote(background_id, safe='')}"

    def make_result(
        name: str,
        record: Dict[str, Any],
        options: LocateOptions,
        *,
        min_confidence: Optional[float],
        exif_latlon: Optional[Tuple[float, float]],
    ) -> Dict[str, Any]:
        # The row of `geoswc tag` (its columns, status ok or abstain, place names, alternatives, evidence, the
        # photo's EXIF GPS), then the map's extras.
        review = ReviewOptions(
            top_k=options.top_k, evidence=len(record.get("neighbours") or []), min_confidence=min_confidence
        )
        row = prediction_row(name, record, review=review, exif_latlon=exif_latlon)
        tokens = [cell["token"] for cell in record.get("top_cells", [])]
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
                        "polygon": [list(p) for p in cell_polygon(token)],
                    }
                    for cell, token in zip(record.get("top_cells", []), tokens)
                ],
                "neighbours": [
                    {
                        **n,
                        "distance_km": float(haversine_km(record["lat"], record["lon"], n["lat"], n["lon"])),
                        "thumbnail": thumbnail_url(n["id"]),
                    }
                    for n in record.get("neighbours", [])
                ],
            }
        )
        return _finite(row)

    def keep(upload: _Upload, name: str) -> None:
        folder = Path(settings.keep_uploads)  # type: ignore[arg-type]
        folder.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        (folder / f"{stamp}-{uuid.uuid4().hex[:8]}-{name}").write_bytes(bytes(upload.data))

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(static_dir / "index.html", media_type="text/html")

    @app.get("/basemap/countries-50m.json", include_in_schema=False)
    async def basemap_json():
        return Response(
            basemap.topology_json(),
            media_type="application/json",
            headers={"Cache-Control": "public, max-age=86400"},
        )

    @app.get("/healthz", summary="Liveness: the model is loaded and the batcher runs")
    async def healthz():
        return {"status": "ok" if batcher.running else "starting", "batching": batcher.stats.as_dict()}

    @app.get("/v1/model", summary="What is loaded: backbone, heads, partitions, background size, fingerprint")
    async def get_model():
        return model_info()

    locate_body = {
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
                        "head": {
                            "type": "string",
                            "description": "ce, hc or mvmf (default: the model's best)",
                        },
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

    @app.post(
        "/v1/locate",
        summary="Locate photos: one row per file (the columns of a geoswc tag row, top cells, neighbours)",
        description="One row per file, in order. A row has the columns of a geoswc tag row (docs/tagging.md): "
        "status ok (or abstain below min_confidence, the position then in guess_lat/guess_lon), place names, "
        "the top_cells alternatives, the evidence, and the upload's own EXIF GPS in exif_lat/exif_lon with its "
        "distance to the prediction in exif_distance_km; then the map's extras (cells with their outlines, "
        "neighbours with distances and thumbnails).",
        openapi_extra={"requestBody": locate_body},
        responses={
            413: {"description": "body over --max-upload-mb, or too many files"},
            415: {"description": "not multipart, or no file is an image"},
            422: {
                "description": "bad option (head, mode, top_k, area, min_confidence), no file, or no photo "
                "decodable"
            },
            503: {"description": "the queue is full; retry"},
        },
    )
    async def locate(request: Request):
        try:
            parts = await _read_multipart(request, settings)
            form = {p.name: p.data.decode("utf-8", "replace").strip() for p in parts if p.filename is None}
            for key, value in request.query_params.items():
                form.setdefault(key, value)
            uploads = [p for p in parts if p.filename is not None and p.name == "file"]
            if not uploads:
                raise RequestError(422, "no photo: send one or more multipart fields named 'file'")
            if len(uploads) > settings.max_files:
                raise RequestError(
                    413, f"{len(uploads)} files in one request; the limit is {settings.max_files}"
                )
            options = options_from(form)
            try:
                min_confidence = parse_min_confidence(form.get("min_confidence"))
            except ValueError as err:
                raise RequestError(422, str(err)) from None
        except RequestError as err:
            return error_response(err)

        names = [_safe_name(u.filename, i) for i, u in enumerate(uploads)]
        if settings.keep_uploads:
            for upload, name in zip(uploads, names):
                await asyncio.to_thread(keep, upload, name)

        def decode_all(items: List[_Upload]) -> Tuple[List[Any], List[Optional[Tuple[float, float]]]]:
            out: List[Any] = []
            positions: List[Optional[Tuple[float, float]]] = []
            for upload in items:
                try:
                    out.append(decode_upload(upload.data, model.transform))
                except PhotoError as err:
                    out.append(err)
                    positions.append(None)
                else:  # after decoding: a HEIC's opener is registered, a bomb was refused
                    positions.append(gps_from_bytes(bytes(upload.data)))
            return out, positions

        decoded, exif_positions = await asyncio.to_thread(decode_all, uploads)
        del parts, uploads  # the bytes are no longer needed while the batch runs

        async def one(pixels) -> Any:
            if isinstance(pixels, PhotoError):
                return pixels
            try:
                return await batcher.submit(_Job(pixels=pixels, options=options))
            except Exception as err:
                return err

        if not batcher.running:  # served without the lifespan events (e.g. a bare ASGI transport)
            await batcher.start()
        outcomes = await asyncio.gather(*(one(p) for p in decoded))
        rows: List[Dict[str, Any]] = []
        overloaded = False
        for name, outcome, exif_latlon in zip(names, outcomes, exif_positions):
            if isinstance(outcome, Overloaded):
                overloaded = True
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, (PhotoError, ValueError, Overloaded)):
                    logger.error("locating %s failed", name, exc_info=outcome)
                rows.append(_finite(make_row(name, error=str(outcome) or type(outcome).__name__)))
            else:
                rows.append(
                    make_result(
                        name, outcome, options, min_confidence=min_confidence, exif_latlon=exif_latlon
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

    thumbnails: "OrderedDict[str, bytes]" = OrderedDict()

    def make_thumbnail(path: str) -> bytes:
        image = load_photo(path, target=settings.thumbnail_px)
        image.thumbnail((settings.thumbnail_px, settings.thumbnail_px))
        return encode_jpeg(image, quality=82)

    async def thumbnail_response(key: str, path: str):
        data = thumbnails.get(key)
        if data is None:
            try:
                data = await asyncio.to_thread(make_thumbnail, path)
            except PhotoError as err:
                return JSONResponse({"detail": f"{key}: {err}"}, status_code=404)
            thumbnails[key] = data
            while len(thumbnails) > _THUMBNAIL_CACHE:
                thumbnails.popitem(last=False)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=3600"})

    @app.get(
        "/v1/thumbnail",
        summary="Thumbnail of a background photo (needs --images); only ids of the background index",
        responses={404: {"description": "not a background id, or no --images"}},
    )
    async def thumbnail(id: str = Query(..., description="background photo id, as in a neighbour's 'id'")):
        nonlocal index_ids
        if settings.images is None or index is None or index.ids is None:
            return JSONResponse({"detail": "thumbnails need geoswc serve --images ROOT"}, status_code=404)
        if index_ids is None:
            index_ids = {str(v): i for i, v in enumerate(index.ids)}
        if id not in index_ids:
            return JSONResponse(
                {"detail": f"{id!r} is not a background photo of this model"}, status_code=404
            )
        root = os.path.realpath(settings.images)
        path = os.path.realpath(image_path(root, id))
        if os.path.commonpath([root, path]) != root:
            return JSONResponse({"detail": f"{id!r} leads outside --images"}, status_code=404)
        return await thumbnail_response(f"bg:{id}", path)

    @app.get("/v1/tags", summary="The rows of the tag run given with --tags")
    async def tags():
        if tags_rows is None:
            return JSONResponse(
                {"detail": "no tag run: start geoswc serve with --tags FILE"}, status_code=404
            )
        rows = [{"index": i, **_finite(dict(row))} for i, row in enumerate(tags_rows)]
        return {"file": os.path.basename(str(settings.tags)), "rows": rows}

    @app.get("/v1/tags/photo", summary="Thumbnail of the photo of row i of the --tags run")
    async def tags_photo(i: int = Query(..., ge=0)):
        if tags_rows is None or i >= len(tags_rows):
            return JSONResponse({"detail": f"no row {i} in the tag run"}, status_code=404)
        return await thumbnail_response(f"tag:{i}", str(tags_rows[i]["path"]))

    @app.exception_handler(Exception)
    async def unexpected(request, err):  # the server answers, whatever went wrong
        logger.error("unexpected error on %s", request.url.path, exc_info=err)
        return JSONResponse({"detail": f"internal error ({type(err).__name__})"}, status_code=500)

    return app
