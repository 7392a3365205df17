"""Refusals as one-line JSON answers, and JSON that never carries NaN."""

from __future__ import annotations

from typing import Any, Dict, Optional

from fastapi.responses import JSONResponse

from geoswc.data.files import json_safe

__all__ = ["RequestError", "error_response", "json_safe"]


class RequestError(Exception):
    """A request the server refuses: HTTP ``status``, a message naming the problem, and extra headers
    (``Retry-After`` for a 503)."""

    def __init__(self, status: int, message: str, *, headers: Optional[Dict[str, str]] = None, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.headers, self.extra = status, message, headers or {}, extra


def error_response(err: RequestError) -> JSONResponse:
    return JSONResponse(
        {"detail": err.message, **json_safe(err.extra)}, status_code=err.status, headers=err.headers
    )
