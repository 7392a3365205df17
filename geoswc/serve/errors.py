"""Refusals as one-line JSON answers, and JSON that never carries NaN."""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import numpy as np
from fastapi.responses import JSONResponse

__all__ = ["RequestError", "error_response", "json_safe"]


class RequestError(Exception):
    """A request the server refuses: HTTP ``status``, a message naming the problem, and extra headers
    (``Retry-After`` for a 503)."""

    def __init__(self, status: int, message: str, *, headers: Optional[Dict[str, str]] = None, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.headers, self.extra = status, message, headers or {}, extra


def json_safe(value: Any) -> Any:
    """JSON cannot carry NaN: non-finite floats become null, numpy scalars Python numbers, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (np.floating,)):
        return json_safe(float(value))
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def error_response(err: RequestError) -> JSONResponse:
    return JSONResponse(
        {"detail": err.message, **json_safe(err.extra)}, status_code=err.status, headers=err.headers
    )
