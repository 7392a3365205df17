"""Reading ``POST /v1/locate``'s multipart body: in memory, while it streams in, within the limits.

The body is parsed by python-multipart's streaming parser (Starlette's form reader would spool files over
1 MB to a temporary file) and each chunk is reserved from the server's memory budget as it arrives. Past
``--max-upload-mb`` the answer is 413; a client that sends its whole body before reading the answer (urllib,
requests) would see its connection reset instead of the 413, so a body whose Content-Length is at most
`DRAIN_FACTOR` times the limit is read to its end and dropped before the refusal is sent.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Dict, List, Optional

from geoswc.serve.budget import Reservation
from geoswc.serve.errors import RequestError
from geoswc.serve.settings import ServeSettings

__all__ = ["DRAIN_FACTOR", "MAX_BOUNDARY_CHARS", "Upload", "keep_upload", "read_multipart", "safe_name"]

# A refused body is read to its end (and dropped) when its Content-Length is at most this many limits.
DRAIN_FACTOR = 2
# RFC 2046, section 5.1.1: a boundary is 1 to 70 characters.
MAX_BOUNDARY_CHARS = 70
EXTRA_PARTS = 64  # form fields beyond the files: head, mode, top_k, area, min_confidence, spares
FORM_FIELD_BYTES = 1024
RETRY_AFTER_S = 1


@dataclass
class Upload:
    """One part of the body: a form field (``filename`` None) or a file."""

    name: str
    filename: Optional[str]
    content_type: Optional[str]
    data: bytearray


def busy(what: str, settings: ServeSettings) -> RequestError:
    """The 503 for a request that does not fit in the memory budget now."""
    return RequestError(
        503,
        f"the server is busy: {what} would exceed its memory budget (--max-decode-mb "
        f"{settings.max_decode_mb:g}); retry in {RETRY_AFTER_S} s",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def safe_name(filename: Optional[str], index: int) -> str:
    """An upload's file name without folders or control characters (``upload-N`` when none is left)."""
    base = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = re.sub(r"[\x00-\x1f\x7f]", "", base).strip()[:200]
    return base or f"upload-{index + 1}"


def keep_upload(folder: str, upload: Upload, name: str) -> None:
    """Save an upload as ``folder/<time>-<random>-<name>`` (``--keep-uploads``)."""
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (target / f"{stamp}-{uuid.uuid4().hex[:8]}-{name}").write_bytes(bytes(upload.data))


async def _body_chunks(receive: Callable) -> AsyncIterator[bytes]:
    """The request body's chunks from the ASGI ``receive`` (one iterator that reading and draining share)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise RequestError(400, "the client disconnected before sending the whole body")
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


def _declared_length(request) -> Optional[int]:
    declared = request.headers.get("content-length")
    if declared is None:
        return None
    try:
        return int(declared)
    except ValueError:
        raise RequestError(400, f"Content-Length is not a number: {declared!r}") from None


def _boundary(request) -> bytes:
    from python_multipart.multipart import parse_options_header

    content_type = request.headers.get("content-type", "")
    ctype, params = parse_options_header(content_type)
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise RequestError(
            415,
            f"send the photos as multipart/form-data with 'file' fields, got Content-Type {content_type!r}",
        )
    boundary = params[b"boundary"]
    if not 1 <= len(boundary) <= MAX_BOUNDARY_CHARS:
        raise RequestError(
            400,
            f"multipart boundary of {len(boundary)} characters; it must be 1 to {MAX_BOUNDARY_CHARS} "
            "(RFC 2046)",
        )
    return boundary


class _PartCollector:
    """python-multipart's callbacks, collecting the parts in memory and refusing past the limits."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.parts: List[Upload] = []
        self.headers: Dict[str, bytes] = {}
        self.field, self.value = b"", b""

    def callbacks(self) -> Dict[str, Any]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
        }

    def on_part_begin(self) -> None:
        self.headers = {}

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.value += data[start:end]

    def on_header_end(self) -> None:
        self.headers[self.field.decode("latin-1").lower()] = self.value
        self.field, self.value = b"", b""

    def on_headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, disposition = parse_options_header(self.headers.get("content-disposition", b""))
        filename = disposition.get(b"filename")
        ctype = self.headers.get("content-type")
        if len(self.parts) >= self.settings.max_files + EXTRA_PARTS:
            raise RequestError(413, f"too many form parts (more than {self.settings.max_files} files)")
        self.parts.append(
            Upload(
                name=disposition.get(b"name", b"").decode("utf-8", "replace"),
                filename=None if filename is None else filename.decode("utf-8", "replace"),
                content_type=None if ctype is None else ctype.decode("latin-1"),
                data=bytearray(),
            )
        )

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self.parts[-1]
        part.data += data[start:end]
        if part.filename is None and len(part.data) > FORM_FIELD_BYTES:
            raise RequestError(413, f"form field {part.name!r} is longer than {FORM_FIELD_BYTES} bytes")


async def _drain(chunks: AsyncIterator[bytes], declared: Optional[int], limit: int) -> None:
    """Read the rest of a refused body and drop it, when its declared length is small enough that the
    client can be made to see the refusal instead of a reset connection."""
    if declared is None or declared > DRAIN_FACTOR * limit:
        return
    try:
        async for _ in chunks:
            pass
    except RequestError:
        pass


async def read_multipart(request, settings: ServeSettings, reservation: Reservation) -> List[Upload]:
    """The parts of a multipart body, parsed while it streams in, in memory, refused past the limits.

    Raises:
        RequestError: 413 (too large, too many parts), 415 (not multipart), 400 (malformed), 503 (the
            memory budget is spent).
    """
    from python_multipart.multipart import MultipartParser

    limit = settings.max_upload_bytes
    declared = _declared_length(request)
    chunks = _body_chunks(request.receive)
    try:
        if declared is not None and declared > limit:
            raise RequestError(
                413, f"request body of {declared} bytes exceeds --max-upload-mb {settings.max_upload_mb:g}"
            )
        collector = _PartCollector(settings)
        parser = MultipartParser(_boundary(request), collector.callbacks())
        await _parse(chunks, parser, settings, reservation)
    except RequestError:
        await _drain(chunks, declared, limit)
        raise
    return collector.parts


async def _parse(chunks: AsyncIterator[bytes], parser, settings: ServeSettings, reservation: Reservation):
    limit = settings.max_upload_bytes
    received = 0
    try:
        async for chunk in chunks:
            received += len(chunk)
            if received > limit:
                # A chunked body: reading stops here, the rest is never taken in.
                raise RequestError(
                    413, f"request body exceeds --max-upload-mb {settings.max_upload_mb:g} ({limit} bytes)"
                )
            if not reservation.try_take(len(chunk)):
                raise busy("this upload", settings)
            parser.write(chunk)
        parser.finalize()
    except RequestError:
        raise
    except Exception as err:
        message = " ".join(str(err).split())[:200]
        raise RequestError(400, f"malformed multipart body: {message}") from None
