"""What a browser loads: the page (``/``), its static files, the offline Natural Earth basemap, and the API
documentation (``/docs``: a page of the server's own that renders ``/openapi.json``, with no file from
another host; FastAPI's Swagger UI and ReDoc pages load theirs from a CDN)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from geoswc.data import basemap

__all__ = ["STATIC_DIR", "mount_static", "router"]

STATIC_DIR = Path(str(resources.files("geoswc.serve") / "static"))

router = APIRouter(include_in_schema=False)


def mount_static(app) -> None:
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


@router.get("/")
async def page():
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


@router.get("/docs")
async def api_docs():
    return FileResponse(STATIC_DIR / "api-docs.html", media_type="text/html")


@router.get("/redoc")
async def redoc():
    return RedirectResponse("/docs")


@router.get("/basemap/countries-50m.json")
async def basemap_json():
    return Response(
        basemap.topology_json(),
        media_type="application/json",
        headers={"Cache-Control": "public, max-age=86400"},
    )
