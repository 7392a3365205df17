"""Downloading large files over HTTP(S): resumable, checksummed, with a progress bar, never silent.

`download` writes into ``<dest>.part`` and renames it to ``dest`` only when the whole file arrived and, when a
SHA-256 was given, matches it. An interrupted download resumes where it stopped with an HTTP ``Range`` request;
a server that ignores ranges sends the whole file again, and the partial file is started over.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Union

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

URL_SCHEMES = ("http://", "https://")
_CHUNK = 1 << 20
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def is_url(value: Union[str, os.PathLike]) -> bool:
    """True for an ``http://`` or ``https://`` address."""
    return str(value).lower().startswith(URL_SCHEMES)


def sha256_file(path: Union[str, os.PathLike], *, chunk: int = _CHUNK) -> str:
    """The hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path: Union[str, os.PathLike], expected: Optional[str]) -> str:
    """The file's SHA-256; raises ValueError naming both digests when ``expected`` is given and differs."""
    actual = sha256_file(path)
    if expected is not None:
        expected = expected.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", expected):
            raise ValueError(f"expected SHA-256 {expected!r} is not 64 hexadecimal digits")
        if actual != expected:
            raise ValueError(f"{path}: SHA-256 {actual} does not match the expected {expected}")
    return actual


def download(
    url: str,
    dest: Union[str, os.PathLike],
    *,
    sha256: Optional[str] = None,
    progress: bool = True,
    timeout_s: float = 60.0,
) -> Path:
    """Fetch ``url`` into ``dest``, resuming a partial ``<dest>.part`` left by an interrupted run.

    A complete ``dest`` that is already there is kept (and checked against ``sha256`` when given).

    Args:
        url: an ``http://`` or ``https://`` address.
        dest: the file to write.
        sha256: the expected hex digest; the file is refused (and the partial file removed) when it differs.
        progress: show a progress bar.
        timeout_s: seconds to wait for the server before giving up.

    Returns:
        ``dest``.

    Raises:
        ValueError: not an HTTP(S) address, a checksum mismatch, or a server answer that cannot be used (the
            status, or a range other than the one asked for).
        OSError: the network or the disk failed (the partial file is kept for the next attempt).
    """
    if not is_url(url):
        raise ValueError(f"not an http(s) address: {url!r}")
    dest = Path(dest)
    if dest.is_file():
        check_sha256(dest, sha256)
        logger.info("%s is already there; not downloading %s again", dest, url)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    response = _request_from(url, offset, timeout_s)
    if response is not None:
        with response:
            _receive(response, url, part, offset, progress=progress)
    try:
        check_sha256(part, sha256)
    except ValueError:
        part.unlink()
        raise
    os.replace(part, dest)
    logger.info("downloaded %s to %s", url, dest)
    return dest


def _request_from(url: str, offset: int, timeout_s: float):
    """The server's response for ``url`` from byte ``offset`` on, or None when a resumed file is already whole
    (HTTP 416 for a range that starts at its end).

    Raises:
        ValueError: any other HTTP error status.
    """
    request = urllib.request.Request(url, headers={"User-Agent": "geoswc"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        return urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            # Nothing left to send: the partial file is already whole.
            return None
        raise ValueError(f"{url}: the server answered HTTP {err.code} ({err.reason})") from None


def _receive(response, url: str, part: Path, offset: int, *, progress: bool) -> None:
    """Append the body of a 206 answer to ``part`` (or write a 200 answer's over it), checking the range
    and, when the server announced it, the length.

    Raises:
        ValueError: another status, or a range other than the one asked for.
        OSError: the connection ended early (the partial file is kept).
    """
    dest_name = part.name[: -len(".part")]
    status = response.status
    if status == 206:
        match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
        if not match or int(match.group(1)) != offset:
            raise ValueError(
                f"{url}: asked for bytes from {offset}, the server sent the range "
                f"{response.headers.get('Content-Range')!r}"
            )
        total = None if match.group(3) == "*" else int(match.group(3))
        mode = "ab"
    elif status == 200:
        if offset:
            logger.info("%s does not resume downloads; starting %s over", url, dest_name)
        offset, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
    else:
        raise ValueError(f"{url}: unexpected HTTP status {status}")
    with (
        open(part, mode) as f,
        tqdm(
            total=total,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=dest_name,
            disable=not progress,
        ) as bar,
    ):
        for block in iter(lambda: response.read(_CHUNK), b""):
            f.write(block)
            bar.update(len(block))
    size = part.stat().st_size
    if total is not None and size != total:
        raise OSError(
            f"{url}: the connection ended after {size} of {total} bytes; run again to resume from {part}"
        )
