"""The tag-run view's data: ``GET /v1/tags`` (the rows of the run given with ``--tags``) and
``GET /v1/tags/photo`` (the thumbnail of a row's photo)."""

from __future__ import annotations

import os

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from geoswc.serve.errors import json_safe
from geoswc.serve.state import serve_state
from geoswc.serve.thumbnails import thumbnail_response

__all__ = ["router"]

router = APIRouter()


@router.get("/v1/tags", summary="The rows of the tag run given with --tags")
async def tags(request: Request):
    state = serve_state(request)
    if state.tags_rows is None:
        return JSONResponse({"detail": "no tag run: start geoswc serve with --tags FILE"}, status_code=404)
    rows = [{"index": i, **json_safe(dict(row))} for i, row in enumerate(state.tags_rows)]
    return {"file": os.path.basename(str(state.settings.tags)), "rows": rows}


@router.get("/v1/tags/photo", summary="Thumbnail of the photo of row i of the --tags run")
async def tags_photo(request: Request, i: int = Query(..., ge=0)):
    state = serve_state(request)
    if state.tags_rows is None or i >= len(state.tags_rows):
        return JSONResponse({"detail": f"no row {i} in the tag run"}, status_code=404)
    return await thumbnail_response(state, f"tag:{i}", str(state.tags_rows[i]["path"]))
