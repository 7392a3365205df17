"""Thumbnails: ``GET /v1/thumbnail`` for the background photos of the index (under ``--images`` only), and
the cache the tag-run view's photos share."""

from __future__ import annotations

import asyncio
import os

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from geoswc.data.images import PhotoError, encode_jpeg, image_path, load_photo
from geoswc.serve.state import ServeState, serve_state

__all__ = ["THUMBNAIL_CACHE", "router", "thumbnail_response"]

THUMBNAIL_CACHE = 256

router = APIRouter()


def _make_thumbnail(path: str, side: int) -> bytes:
    image = load_photo(path, target=side)
    image.thumbnail((side, side))
    return encode_jpeg(image, quality=82)


async def thumbnail_response(state: ServeState, key: str, path: str):
    """The JPEG thumbnail of the photo at ``path``, cached under ``key``; 404 naming the reason when the
    photo cannot be read."""
    data = state.thumbnails.get(key)
    if data is None:
        try:
            data = await asyncio.to_thread(_make_thumbnail, path, state.settings.thumbnail_px)
        except PhotoError as err:
            return JSONResponse({"detail": f"{key}: {err}"}, status_code=404)
        state.thumbnails[key] = data
        while len(state.thumbnails) > THUMBNAIL_CACHE:
            state.thumbnails.popitem(last=False)
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=3600"})


@router.get(
    "/v1/thumbnail",
    summary="Thumbnail of a background photo (needs --images); only ids of the background index",
    responses={404: {"description": "not a background id, or no --images"}},
)
async def thumbnail(
    request: Request, id: str = Query(..., description="background photo id, as in a neighbour's 'id'")
):
    state = serve_state(request)
    ids = state.background_ids()
    if state.settings.images is None or ids is None:
        return JSONResponse({"detail": "thumbnails need geoswc serve --images ROOT"}, status_code=404)
    if id not in ids:
        return JSONResponse({"detail": f"{id!r} is not a background photo of this model"}, status_code=404)
    root = os.path.realpath(state.settings.images)
    path = os.path.realpath(image_path(root, id))
    if os.path.commonpath([root, path]) != root:
        return JSONResponse({"detail": f"{id!r} leads outside --images"}, status_code=404)
    return await thumbnail_response(state, f"bg:{id}", path)
