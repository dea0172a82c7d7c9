"""The plain-HTTP side of ``streamdiff serve``: static pages, health, readiness and metrics (no I/O here).

:func:`route` maps a request path to an :class:`HttpReply`, or to None when the request is for a WebSocket
(``/ws``, ``/ws/view/<token>``). The server's one application (:mod:`.asgi`) sends the replies, under
``streamdiff serve`` and Ray Serve alike.

==================  =========================================================================================
``/``               the stream page (``index.html``)
``/view.html`` …    the view-only page and the pages' scripts and style (``web/``, loaded once at start)
``/healthz``        200 while the process serves HTTP (liveness)
``/readyz``         200 when the model is loaded and the engine runs, 503 otherwise (readiness)
``/metrics``        Prometheus text exposition (with ``metrics_token_required``: 401 without
                    ``Authorization: Bearer <token>``)
==================  =========================================================================================

Before any of these: a ``Host`` header the server's ``hosts`` policy does not allow gets 421 (every path, the
WebSocket upgrades included: DNS rebinding), and the stream socket with a query string gets 400 (it takes none).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..protocol.wire import STREAM_PATH, VIEW_SOCKET_PREFIX

__all__ = ["HttpReply", "StaticFiles", "route", "wrong_host"]

_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8"}
# Pages may load only their own scripts, draw decoded frames (blob:) and open WebSockets to this server.
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
        "media-src 'self' blob: mediastream:; connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'")
_SECURITY_HEADERS = (("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer"),
                     ("Cache-Control", "no-cache"))


@dataclass(frozen=True)
class HttpReply:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


class StaticFiles:
    """The web pages, read once (a handful of small files; no path from a request ever reaches the file system)."""

    def __init__(self, folder: Path) -> None:
        self.files: dict[str, HttpReply] = {}
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.suffix in _TYPES:
                headers = _SECURITY_HEADERS + ((("Content-Security-Policy", _CSP),) if path.suffix == ".html" else ())
                self.files[f"/{path.name}"] = HttpReply(200, path.read_bytes(), _TYPES[path.suffix], headers)
        if "/index.html" in self.files:
            self.files["/"] = self.files["/index.html"]

    def get(self, path: str) -> HttpReply | None:
        return self.files.get(path)


def route(target: str, static: StaticFiles, hub: Any, headers: Mapping[str, str] | None = None) -> HttpReply | None:
    """The reply to a GET of ``target`` (path and query) with request ``headers`` (a case-insensitive mapping, as
    :class:`~.asgi.Headers` is; None: no headers); None: a WebSocket route, go on with the handshake."""
    headers = headers or {}
    config = hub.config
    refused = wrong_host(hub, headers)
    if refused is not None:
        return refused
    path = urlsplit(target).path
    if path == STREAM_PATH:
        return HttpReply(400, b"the stream socket takes no query parameters\n") if "?" in target else None
    if path.startswith(VIEW_SOCKET_PREFIX):
        return None
    if path == "/healthz":
        return HttpReply(200, b"ok\n")
    if path == "/readyz":
        return HttpReply(200, b"ready\n") if hub.ready else HttpReply(503, b"not ready\n")
    if path == "/metrics":
        if config.metrics_token_required and not _bearer_is(headers.get("Authorization"), config.token):
            return HttpReply(401, b"/metrics needs the header Authorization: Bearer <token>\n",
                             headers=(("WWW-Authenticate", 'Bearer realm="streamdiff"'),))
        body, content_type = hub.metrics.render()
        return HttpReply(200, body, content_type)
    reply = static.get(path)
    return reply if reply is not None else HttpReply(404, b"not found\n")


def wrong_host(hub: Any, headers: Mapping[str, str]) -> HttpReply | None:
    """421 when the request's ``Host`` is not one the server's ``hosts`` policy answers for (DNS rebinding), else
    None: the first check of every request, whatever its method or path."""
    if hub.config.hosts.allows(headers.get("Host")):
        return None
    return HttpReply(421, b"this server does not answer for this host name\n")


def _bearer_is(header: str | None, token: str) -> bool:
    """True when ``header`` is ``Bearer <token>`` (compared in constant time)."""
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("utf-8", "surrogatepass"),
                                                              token.encode("utf-8"))
