"""The aiohttp application of ``streamdiff serve``: every route on one HTTP/WebSocket stack (imported when a server
starts; :mod:`.app` runs it).

- ``GET`` of any path: :meth:`~.hub.Hub.upgrade_reply` decides (pages, ``/healthz``, ``/readyz``, ``/metrics``, 421,
  400, 503 before an upgrade); ``/ws`` and ``/ws/view/<token>`` then become WebSockets, run by a
  :class:`~.session.StreamSession` or a :class:`~.viewing.ViewerSession` over :class:`~.transport.AiohttpTransport`.
- Routes mounted by other modules (``mount(app, hub)``: WHIP/WHEP's ``POST``/``PATCH``/``DELETE``) take their
  request bodies: the guard middleware reads a body whole first (within ``handshake_timeout_s``, at most
  ``max_message_bytes``), after the ``Host`` policy (421 on every path).

What the server enforces before any session runs: a connection's first request (its headers) within
``handshake_timeout_s`` (:func:`bound_slow_requests`: a slowloris client is cut off), the next ones on a kept-alive
connection within the same time (aiohttp's keep-alive timer), bodies within the same time, messages of at
most ``max_message_bytes`` (1009 with the documented ``"message_too_big: …"`` reason before a larger one is read),
UTF-8 text (1007, ``"bad_json: …"``), pings every ``ping_interval_s`` answered within ``ping_timeout_s`` (else 1011
for the session; the socket is dropped), no compression, no access log (paths carry view tokens), no versions in the
``Server`` header.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import unquote, urlsplit

from aiohttp import WebSocketError, web

from .hub import Hub
from ..protocol.limits import ServerLimits
from .pacing import within
from .routes import HttpReply, StaticFiles
from .session import StreamSession
from .transport import AiohttpTransport, library_close_reason
from .viewing import ViewerSession
from ..protocol.wire import SUBPROTOCOL, VIEW_SOCKET_PREFIX

__all__ = ["CodedWebSocketResponse", "Mount", "bound_slow_requests", "build_application", "runner_options"]

logger = logging.getLogger(__name__)

#: A function that adds routes to the application before it starts (``add_rtc_routes(app, hub)``).
Mount = Callable[[web.Application, Hub], None]


class CodedWebSocketResponse(web.WebSocketResponse):
    """aiohttp's server WebSocket, with the limits of :class:`ServerLimits` and the closes it starts itself (a message
    over the size limit: 1009, text that is not UTF-8: 1007) given the documented reason (:attr:`sent_close`)."""

    def __init__(self, limits: ServerLimits) -> None:
        super().__init__(
            protocols=(SUBPROTOCOL,), compress=False, autoping=True, autoclose=True,
            heartbeat=limits.ping_interval_s, timeout=limits.close_timeout_s,
            max_msg_size=limits.max_message_bytes + 1,  # aiohttp refuses a message of max_msg_size bytes already
        )
        if hasattr(self, "_pong_heartbeat"):  # aiohttp waits heartbeat / 2 for the pong; the limit says how long
            self._pong_heartbeat = limits.ping_timeout_s
        self.max_message_bytes = limits.max_message_bytes
        #: (code, reason) of a close the library started on a protocol error; None otherwise
        self.sent_close: tuple[int, str] | None = None

    async def close(self, *, code: int = 1000, message: bytes = b"", drain: bool = True) -> bool:
        error = sys.exc_info()[1]  # receive() closes while handling the WebSocketError it read
        if not message and isinstance(error, WebSocketError) and self.sent_close is None:
            reason = library_close_reason(code, error, self.max_message_bytes) or ""
            self.sent_close = (code, reason)
            message = reason.encode("utf-8")
        return await super().close(code=code, message=message, drain=drain)


def runner_options(limits: ServerLimits) -> dict[str, Any]:
    """``web.AppRunner``'s options: aiohttp closes a kept-alive connection whose next request has not arrived whole
    within its keep-alive timeout; no access log; connections still open at shutdown get ``close_timeout_s``."""
    return {"keepalive_timeout": limits.handshake_timeout_s, "access_log": None,
            "shutdown_timeout": limits.close_timeout_s}


def bound_slow_requests(server: web.Server, app: web.Application, timeout: float) -> None:
    """Close every new connection of ``server`` (``AppRunner.server``) whose first request has not arrived whole (its
    headers; the guard middleware reads a body) within ``timeout`` seconds (aiohttp's own keep-alive timer covers a
    connection's first request only in its most recent versions): a slowloris client is cut off."""
    waiting = app[_WAITING]
    loop = asyncio.get_running_loop()
    connection_made = server.connection_made

    def expire(handler: Any) -> None:
        if waiting.pop(handler, None) is not None and handler.transport is not None:
            handler.force_close()

    def made(handler: Any, transport: asyncio.Transport) -> None:
        connection_made(handler, transport)
        waiting[handler] = loop.call_later(timeout, expire, handler)

    server.connection_made = made  # type: ignore[method-assign]


#: connection (aiohttp's RequestHandler) → the timer that closes it unless its first request arrives before
_WAITING: web.AppKey[dict[Any, asyncio.TimerHandle]] = web.AppKey("streamdiff_waiting", dict)


def build_application(hub: Hub, static: StaticFiles, mounts: Iterable[Mount] = ()) -> web.Application:
    """The application: the guard middleware, the ``mounts``' routes, then every ``GET`` (see the module docstring)."""
    limits = hub.limits
    waiting: dict[Any, asyncio.TimerHandle] = {}
    app = web.Application(middlewares=[_guard(hub, waiting)], client_max_size=limits.max_message_bytes)
    app[_WAITING] = waiting
    app.on_response_prepare.append(_server_header)
    for mount in mounts:
        mount(app, hub)
    app.router.add_get("/{path:.*}", _Sockets(hub, static).get)
    return app


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = "streamdiff"  # not aiohttp's, which names the Python and aiohttp versions


def _guard(hub: Hub, waiting: dict[Any, asyncio.TimerHandle]) -> Any:
    @web.middleware
    async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
        timer = waiting.pop(request.protocol, None)  # the request's headers came whole: no deadline any more
        if timer is not None:
            timer.cancel()
        if not hub.config.hosts.allows(request.headers.get("Host")):
            return reply(HttpReply(421, b"this server does not answer for this host name\n"))
        if request.body_exists:
            try:
                await within(request.read(), hub.limits.handshake_timeout_s)
            except asyncio.TimeoutError:
                return reply(HttpReply(408, f"the request body did not arrive within "
                                            f"{hub.limits.handshake_timeout_s:g} s\n".encode()))
        return await handler(request)

    return guard


class _Sockets:
    """``GET``: a reply from :meth:`Hub.upgrade_reply`, or a WebSocket and its session."""

    def __init__(self, hub: Hub, static: StaticFiles) -> None:
        self.hub, self.static = hub, static

    async def get(self, request: web.Request) -> web.StreamResponse:
        hub = self.hub
        peer = request.transport.get_extra_info("peername") if request.transport is not None else None
        address = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        key = request.protocol  # the connection (a request is no dict key)
        answer = hub.upgrade_reply(request.raw_path, self.static, request.headers, key, address,
                                   lambda: request.transport is not None and not request.transport.is_closing())
        if answer is not None:
            return reply(answer)
        ws = CodedWebSocketResponse(hub.limits)
        if not ws.can_prepare(request).ok:
            hub.connection_started(key)  # no socket: give its place back
            if request.headers.get("Upgrade", "").lower().strip() != "websocket":
                return reply(HttpReply(426, b"this path is a WebSocket: connect with a WebSocket client\n",
                                       headers=(("Upgrade", "websocket"),)))
            return reply(HttpReply(400, b"invalid WebSocket handshake\n"))
        writer = await ws.prepare(request)
        transport = AiohttpTransport(ws, request, hub.limits.send_buffer_bytes, writer)
        path = urlsplit(request.raw_path).path
        if path.startswith(VIEW_SOCKET_PREFIX):
            await ViewerSession(hub, transport, unquote(path[len(VIEW_SOCKET_PREFIX):])).run()
        else:
            session = StreamSession(hub, transport)
            hub.connection_started(key)  # the session counts itself from here on
            await session.run()
        return ws


def reply(answer: HttpReply) -> web.Response:
    """An :class:`HttpReply` as an aiohttp response; the connection closes after it (as a refusal should)."""
    response = web.Response(status=answer.status, body=answer.body,
                            headers=[("Content-Type", answer.content_type), *answer.headers])
    response.force_close()
    return response
