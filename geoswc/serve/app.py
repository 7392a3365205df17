"""The web app and HTTP API of ``geoswc serve`` (thesis 4.2.10.4: upload a photo, browse where it was taken
and the database photos that support it).

`create_app` composes a FastAPI application around a loaded `Geolocator` from routers that read the shared
`ServeState` on ``app.state.serve``:

- `geoswc.serve.pages`: ``GET /`` the page (``static/index.html``: upload photos, see the prediction, the
  head's top cells as S2 polygons, the Search within Cell neighbours, switch head and mode, draw an area; a
  second view shows a tag run on the map), its static files, the offline basemap and ``/docs``. Leaflet and
  the Natural Earth basemap ship with the package, so it works offline.
- `geoswc.serve.locate`: ``POST /v1/locate``, multipart, one or more ``file`` fields and the options
  ``head``, ``mode``, ``top_k``, ``area``, ``min_confidence``; one JSON row per file: the columns of a
  ``geoswc tag`` row plus the top cells with their outlines and the neighbours.
- `geoswc.serve.model_info`: ``GET /v1/model``, ``GET /healthz``; `geoswc.serve.thumbnails` and
  `geoswc.serve.tags`: the thumbnails and the ``--tags`` run.

Photos from concurrent requests share forward passes (`geoswc.serve.batching.DynamicBatcher`,
`geoswc.serve.inference`). Limits (`geoswc.serve.uploads`, `geoswc.serve.decoding`): the body is counted while
it streams in and refused with 413 past ``max_upload_mb``; uploads are parsed in memory and never written to
disk unless ``keep_uploads`` names a folder; the bytes and decoded pixels in flight are bounded by
``max_decode_mb`` (503 with Retry-After beyond); photos are decoded with `geoswc.data.images.decode_photo`
(decompression bombs refused before decoding); a bad photo is an error row, never a failed batch. Other sites
are kept out by `geoswc.serve.security` (trusted hosts, same-origin POSTs, a Content-Security-Policy).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Optional

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from geoswc import __version__
from geoswc.geolocator import Geolocator
from geoswc.serve import locate, model_info, pages, tags, thumbnails
from geoswc.serve.decoding import decode_upload, upload_gps
from geoswc.serve.errors import RequestError
from geoswc.serve.inference import LocateOptions, batch_bucket
from geoswc.serve.locate import MAX_TOP_K, confidence_words, parse_area, parse_min_confidence
from geoswc.serve.security import protect
from geoswc.serve.settings import DEFAULT_TILE_URL, TILE_ATTRIBUTION, ServeSettings
from geoswc.serve.state import ServeState

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TILE_URL",
    "LocateOptions",
    "MAX_TOP_K",
    "RequestError",
    "ServeSettings",
    "TILE_ATTRIBUTION",
    "batch_bucket",
    "confidence_words",
    "create_app",
    "decode_upload",
    "parse_area",
    "parse_min_confidence",
    "upload_gps",
]


def create_app(model: Geolocator, settings: Optional[ServeSettings] = None):
    """The FastAPI application serving ``model``.

    Args:
        model: a loaded `Geolocator` (``Geolocator.from_pretrained``).
        settings: limits and options (`ServeSettings`); defaults when omitted.

    Returns:
        A ``fastapi.FastAPI``; run it with uvicorn (``geoswc serve`` does). ``app.state.serve`` is the shared
        `ServeState`; ``app.state.batcher`` the `DynamicBatcher` (its ``stats`` count the forward passes).
    """
    settings = settings or ServeSettings()
    state = ServeState.build(model, settings)

    @asynccontextmanager
    async def lifespan(app):
        await state.batcher.start()
        try:
            yield
        finally:
            await state.batcher.stop()

    app = FastAPI(
        title="geoswc",
        version=__version__,
        description="Global-scale image geolocation with Search within Cell: upload photos, get positions, "
        "the head's top cells and the background photos that support them. See docs/serving.md.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.serve = state
    app.state.model = model
    app.state.settings = settings
    app.state.batcher = state.batcher
    app.state.budget = state.budget
    for router in (pages.router, model_info.router, locate.router, thumbnails.router, tags.router):
        app.include_router(router)
    pages.mount_static(app)
    protect(app, settings)

    @app.exception_handler(Exception)
    async def unexpected(request, err):  # the server answers, whatever went wrong
        logger.error("unexpected error on %s", request.url.path, exc_info=err)
        return JSONResponse({"detail": f"internal error ({type(err).__name__})"}, status_code=500)

    return app
