"""What keeps other sites out of ``geoswc serve``.

- Hosts: a request must name the server in its Host header (the bound address, a loopback name or an
  ``--allowed-host``; Starlette's TrustedHostMiddleware), so a web page whose name an attacker re-points at
  127.0.0.1 (DNS rebinding) cannot read the API.
- Origins: a POST from a page of another origin (its ``Origin`` header) is refused with 403, so another site
  cannot make a visitor's browser upload to the server.
- Headers on every answer: a Content-Security-Policy that runs only the server's own script files (no inline
  script or handler, nothing from another host but the ``--tiles`` the operator named), and forbids framing;
  ``X-Content-Type-Options: nosniff``.
"""

from __future__ import annotations

import json
from typing import List, Optional
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from geoswc.serve.settings import ServeSettings

__all__ = ["SameOriginWrites", "SecurityHeaders", "content_security_policy", "protect"]

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def content_security_policy(tile_url: Optional[str]) -> str:
    """The page's policy: its own files only (images also ``data:``/``blob:`` for the previews of the
    photos being uploaded, and the tile server when ``--tiles`` names one)."""
    images = ["'self'", "data:", "blob:"]
    if tile_url:
        parts = urlsplit(tile_url.replace("{s}", "a"))
        if parts.scheme in ("http", "https") and parts.netloc:
            host = parts.netloc.replace("a.", "*.", 1) if "{s}" in tile_url else parts.netloc
            images.append(f"{parts.scheme}://{host}")
    return "; ".join(
        [
            "default-src 'self'",
            "script-src 'self'",
            "style-src 'self' 'unsafe-inline'",
            f"img-src {' '.join(images)}",
            "connect-src 'self'",
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
        ]
    )


class SecurityHeaders:
    """Adds the Content-Security-Policy, ``X-Content-Type-Options: nosniff`` and a no-referrer policy to
    every HTTP answer."""

    def __init__(self, app: ASGIApp, *, policy: str):
        self.app = app
        self.headers = [
            (b"content-security-policy", policy.encode("latin-1")),
            (b"x-content-type-options", b"nosniff"),
            (b"x-frame-options", b"DENY"),
            (b"referrer-policy", b"no-referrer"),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                names = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in self.headers if k not in names]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _origin_key(scheme: str, netloc: str) -> str:
    """``scheme://host[:port]`` in lower case, without the scheme's default port."""
    netloc = netloc.lower()
    default = _DEFAULT_PORTS.get(scheme)
    if default and netloc.endswith(":" + default):
        netloc = netloc[: -len(default) - 1]
    return f"{scheme}://{netloc}"


class SameOriginWrites:
    """Refuses (403, one JSON line) a POST, PUT, PATCH or DELETE whose ``Origin`` header names another origin
    than the server the request was sent to. A request without Origin (curl, Python clients) passes: only
    browsers send it, and they always do for a cross-site POST."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in UNSAFE_METHODS:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if origin is None:
            await self.app(scope, receive, send)
            return
        scheme = scope.get("scheme", "http")
        own = _origin_key(scheme, headers.get("host", ""))
        parts = urlsplit(origin)
        if origin != "null" and parts.scheme and _origin_key(parts.scheme, parts.netloc) == own:
            await self.app(scope, receive, send)
            return
        body = json.dumps(
            {"detail": f"cross-site request refused: Origin {origin!r} is not this server ({own})"}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def protect(app, settings: ServeSettings) -> List[str]:
    """Add the middleware above to ``app``; returns the trusted host names."""
    hosts = settings.trusted_hosts()
    app.add_middleware(SameOriginWrites)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts, www_redirect=False)
    app.add_middleware(SecurityHeaders, policy=content_security_policy(settings.tile_url))
    return hosts
