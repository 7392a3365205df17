"""What ``geoswc serve`` was started with (`ServeSettings`), and the hosts it answers to."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import List, Optional, Tuple

__all__ = ["DEFAULT_TILE_URL", "LOOPBACK_NAMES", "TILE_ATTRIBUTION", "ServeSettings"]

# The OpenStreetMap tile server, for ``--tiles`` (never used unless named: the page works offline).
DEFAULT_TILE_URL = "https://tile.openstreetmap.org/{z}/{x}/{y}.png"
TILE_ATTRIBUTION = "&copy; OpenStreetMap contributors"
# Names a browser on this machine uses for it: always accepted in the Host header.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def host_header_name(host: str) -> str:
    """``host`` as it appears in a Host header: IPv6 addresses in brackets, lower case."""
    host = host.strip().lower()
    try:
        if ipaddress.ip_address(host.strip("[]")).version == 6:
            return f"[{host.strip('[]')}]"
    except ValueError:
        pass
    return host


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
        tile_url: online map tiles the page may switch to (``--tiles``); None (the default): the shipped
            offline basemap only, and the page requests nothing from another host.
        thumbnail_px: longest side of the thumbnails served.
        host: the address the server is bound to; requests must name it, a loopback name or one of
            ``allowed_hosts`` in their Host header (DNS rebinding).
        allowed_hosts: further names the server answers to (``--allowed-host``), e.g. the machine's name
            when it serves a network.
        max_decode_mb: memory budget, in MiB, of the upload bytes and decoded pixels of all requests in
            flight; a request that would go past it is answered 503 with Retry-After.
    """

    max_upload_mb: float = 25.0
    max_files: int = 16
    keep_uploads: Optional[str] = None
    images: Optional[str] = None
    tags: Optional[str] = None
    max_batch: int = 32
    batch_wait_ms: float = 5.0
    tile_url: Optional[str] = None
    thumbnail_px: int = 192
    host: str = "127.0.0.1"
    allowed_hosts: Tuple[str, ...] = ()
    max_decode_mb: float = 1024.0

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_decode_bytes(self) -> int:
        return int(self.max_decode_mb * 1024 * 1024)

    def trusted_hosts(self) -> List[str]:
        """The names accepted in a request's Host header: the loopback names, the bound host (unless it is
        a wildcard address, which no client names) and ``allowed_hosts``."""
        names = list(LOOPBACK_NAMES)
        bound = host_header_name(self.host)
        if bound not in ("0.0.0.0", "[::]", ""):
            names.append(bound)
        names.extend(host_header_name(h) for h in self.allowed_hosts)
        return list(dict.fromkeys(names))
