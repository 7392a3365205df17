"""What is served: ``GET /v1/model`` (backbone, heads, partitions, background size, fingerprint, limits) and
``GET /healthz``."""

from __future__ import annotations

import os
from typing import Any, Dict

from fastapi import APIRouter, Request

from geoswc import __version__
from geoswc.serve.errors import json_safe
from geoswc.serve.settings import TILE_ATTRIBUTION
from geoswc.serve.state import ServeState, serve_state

__all__ = ["model_description", "router"]

router = APIRouter()


def model_description(state: ServeState) -> Dict[str, Any]:
    """The body of ``GET /v1/model``."""
    model, settings, index = state.model, state.settings, state.model.index
    geocells = model.geocells
    names = [] if geocells is None else geocells.names  # a street model (geoswc vpr index) has no cells
    partitions = [{"name": name, "cells": len(geocells.partition(name))} for name in names]
    return json_safe(
        {
            "backbone": model.backbone_name,
            "heads": model.head_names,
            "default_head": model.resolve_head() if model.head_names else None,
            "head_partitions": {kind: model.head_partition(kind).name for kind in model.head_names},
            "modes": state.modes_available(),
            "partitions": partitions,
            "background_size": 0 if index is None or index.ids is None else int(len(index.ids)),
            "fingerprint": model.fingerprint,
            "image_size": int(getattr(model, "image_size", None) or model.config.data.image_size),
            "device": str(model.device),
            "geoswc_version": __version__,
            "limits": {
                "max_upload_mb": settings.max_upload_mb,
                "max_files": settings.max_files,
                "max_decode_mb": settings.max_decode_mb,
            },
            "thumbnails": settings.images is not None,
            "tags": None if settings.tags is None else {"file": os.path.basename(settings.tags)},
            "tile_url": settings.tile_url,
            "tile_attribution": TILE_ATTRIBUTION if settings.tile_url else None,
            "batching": {"max_batch": settings.max_batch, "wait_ms": settings.batch_wait_ms},
        }
    )


@router.get("/healthz", summary="Liveness: the model is loaded and the batcher runs")
async def healthz(request: Request):
    state = serve_state(request)
    return {
        "status": "ok" if state.batcher.running else "starting",
        "batching": state.batcher.stats.as_dict(),
    }


@router.get("/v1/model", summary="What is loaded: backbone, heads, partitions, background size, fingerprint")
async def get_model(request: Request):
    return model_description(serve_state(request))
