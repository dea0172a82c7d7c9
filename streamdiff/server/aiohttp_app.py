"""``streamdiff serve``'s HTTP server: aiohttp as the host of the one ASGI application (:class:`~.asgi.ServerApp`),
keeping what only the connection's owner can enforce (imported when a server starts; :mod:`.app` runs it).

Every request of every method goes to the application, as ASGI's ``http`` or ``websocket`` scope (a ``GET`` with a
valid WebSocket handshake), so ``streamdiff serve`` and ``streamdiff serve --ray`` answer with the same code. The
host adds:

- a connection's first request (its headers) within ``handshake_timeout_s`` (:func:`bound_slow_requests`: a
  slowloris client is cut off), the next ones on a kept-alive connection within the same time (aiohttp's keep-alive
  timer);
- WebSocket messages of at most ``max_message_bytes`` (1009 with the documented ``"message_too_big: …"`` reason
  before a larger one is read), UTF-8 text (1007, ``"bad_json: …"``), pings every ``ping_interval_s`` answered within
  ``ping_timeout_s`` (else 1011: the socket is dropped), no compression, ``SO_SNDBUF`` capped at
  ``send_buffer_bytes`` and every send waiting on the socket's drain (a client that stops reading is seen at once);
  each close the host starts reaches the application as a ``websocket.disconnect`` with its code, reason and
  ``"streamdiff.by_server": True``;
- ASGI's ``websocket.http.response`` extension (a refused upgrade is a real HTTP answer: 503 with ``Retry-After``,
  421, 400) and ``"streamdiff.transport"``'s ``abort`` (drop a socket without a closing handshake);
- no access log (paths carry view tokens), no versions in the ``Server`` header, and every connection closed after
  its answer.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from typing import Any

from aiohttp import WebSocketError, WSMsgType, web

from ..protocol.limits import ServerLimits
from ..protocol.wire import SUBPROTOCOL
from .transport import KEEPALIVE_CLOSE, library_close_reason

__all__ = ["AsgiHost", "CodedWebSocketResponse", "bound_slow_requests", "build_application", "runner_options"]

logger = logging.getLogger(__name__)


class CodedWebSocketResponse(web.WebSocketResponse):
    """aiohttp's server WebSocket, with the limits of :class:`ServerLimits` and the closes it starts itself (a message
    over the size limit: 1009, text that is not UTF-8: 1007) given the documented reason (:attr:`sent_close`)."""

    def __init__(self, limits: ServerLimits, protocols: tuple[str, ...] = (SUBPROTOCOL,)) -> None:
        super().__init__(
            protocols=protocols, compress=False, autoping=True, autoclose=True,
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


def build_application(app: Any, limits: ServerLimits) -> web.Application:
    """The aiohttp application hosting ``app`` (an ASGI application, :class:`~.asgi.ServerApp`): the first-request
    timer's middleware, then every method of every path handed to ``app``."""
    waiting: dict[Any, asyncio.TimerHandle] = {}
    application = web.Application(middlewares=[_first_request_arrived(waiting)])  # bodies: the app reads, within limits
    application[_WAITING] = waiting
    application.on_response_prepare.append(_server_header)
    application.router.add_route("*", "/{path:.*}", AsgiHost(app, limits).handle)
    return application


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = "streamdiff"  # not aiohttp's, which names the Python and aiohttp versions


def _first_request_arrived(waiting: dict[Any, asyncio.TimerHandle]) -> Any:
    @web.middleware
    async def arrived(request: web.Request, handler: Any) -> web.StreamResponse:
        timer = waiting.pop(request.protocol, None)  # the request's headers came whole: no deadline any more
        if timer is not None:
            timer.cancel()
        return await handler(request)

    return arrived


class AsgiHost:
    """One aiohttp request → one call of the ASGI application (``http`` or ``websocket`` scope)."""

    def __init__(self, app: Any, limits: ServerLimits) -> None:
        self.app, self.limits = app, limits

    async def handle(self, request: web.Request) -> web.StreamResponse:
        websocket = request.method == "GET" and request.headers.get("Upgrade", "").lower().strip() == "websocket"
        if websocket:
            if not CodedWebSocketResponse(self.limits).can_prepare(request).ok:
                return _closing(web.Response(status=400, text="invalid WebSocket handshake\n"))
            return await _WebSocketCall(self, request).run()
        return await self._http(request)

    def scope(self, request: web.Request, kind: str, **more: Any) -> dict[str, Any]:
        peer = request.transport.get_extra_info("peername") if request.transport is not None else None
        sock = request.transport.get_extra_info("sockname") if request.transport is not None else None
        raw_path = request.raw_path.partition("?")[0]
        return {
            "type": kind, "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
            "scheme": "ws" if kind == "websocket" else "http", "path": request.path,
            "raw_path": raw_path.encode("latin-1"), "query_string": request.query_string.encode("latin-1"),
            "root_path": "", "headers": [(k.lower(), v) for k, v in request.raw_headers],
            "client": (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) and len(peer) >= 2 else None,
            "server": (str(sock[0]), int(sock[1])) if isinstance(sock, tuple) and len(sock) >= 2 else None,
            **more,
        }

    async def _http(self, request: web.Request) -> web.StreamResponse:
        scope = self.scope(request, "http", method=request.method)
        answer: dict[str, Any] = {}
        body: list[bytes] = []
        sent_body = False

        async def receive() -> dict[str, Any]:
            nonlocal sent_body
            if sent_body:
                await asyncio.Event().wait()  # nothing more comes: the application is answered or cancelled
            chunk = await request.content.readany()
            sent_body = request.content.at_eof()
            return {"type": "http.request", "body": chunk, "more_body": not sent_body}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                answer.update(message)
            elif message["type"] == "http.response.body":
                body.append(message.get("body", b""))

        await self.app(scope, receive, send)
        if "status" not in answer:
            return _closing(web.Response(status=500, text="no answer\n"))
        return _response(answer, body)


class _WebSocketCall:
    """One WebSocket handshake through the ASGI application: the connect event, then either an accept (the socket is
    prepared, messages flow) or a refusal (an HTTP answer, or 403)."""

    def __init__(self, host: AsgiHost, request: web.Request) -> None:
        self.host, self.request = host, request
        self.ws: CodedWebSocketResponse | None = None
        self.refusal: dict[str, Any] = {}
        self.refusal_body: list[bytes] = []
        self.connected = False

    async def run(self) -> web.StreamResponse:
        request = self.request
        offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        scope = self.host.scope(request, "websocket", subprotocols=offered, extensions={
            "websocket.http.response": {}, "streamdiff.transport": {"abort": self.abort}})
        await self.host.app(scope, self.receive, self.send)
        if self.ws is not None:
            if not self.ws.closed:
                await self.ws.close()
            return self.ws
        if "status" in self.refusal:
            return _response(self.refusal, self.refusal_body)
        return _closing(web.Response(status=403, text="the WebSocket was refused\n"))

    async def receive(self) -> dict[str, Any]:
        if not self.connected:
            self.connected = True
            return {"type": "websocket.connect"}
        ws = self.ws
        if ws is None:
            await asyncio.Event().wait()  # no socket yet: nothing to read until the application answers
        assert ws is not None
        if ws.closed:
            return self._disconnect()
        try:
            message = await ws.receive()
        except RuntimeError:  # receiving after the close (aiohttp counts such calls)
            return self._disconnect()
        if message.type is WSMsgType.TEXT:
            return {"type": "websocket.receive", "text": message.data}
        if message.type is WSMsgType.BINARY:
            return {"type": "websocket.receive", "bytes": message.data}
        if message.type is WSMsgType.CLOSE:  # the peer's close frame (aiohttp answered it)
            return {"type": "websocket.disconnect", "code": message.data, "reason": message.extra or ""}
        return self._disconnect()

    def _disconnect(self) -> dict[str, Any]:
        """Why the connection ended without a close frame from the peer: the host closed it itself (1009, 1007,
        1002: ``sent_close``), a ping went unanswered (1011: aiohttp dropped the socket), or the peer vanished."""
        ws = self.ws
        assert ws is not None
        if ws.sent_close is not None:
            code, reason = ws.sent_close
        elif isinstance(ws.exception(), asyncio.TimeoutError):  # "No PONG received after …"
            code, reason = KEEPALIVE_CLOSE
        else:
            return {"type": "websocket.disconnect", "code": 1006, "reason": ""}
        return {"type": "websocket.disconnect", "code": code, "reason": reason, "streamdiff.by_server": True}

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        ws = self.ws
        if kind == "websocket.send":
            if ws is None or ws.closed:
                raise ConnectionResetError("the WebSocket is closed")
            if message.get("text") is not None:
                await ws.send_str(message["text"])
            else:
                await ws.send_bytes(message["bytes"])
            await self.writer.drain()  # aiohttp's own send waits only once per 64 KiB written
        elif kind == "websocket.accept" and ws is None and not self.refusal:
            await self._accept(message.get("subprotocol"))
        elif kind == "websocket.close":
            if ws is not None:
                await ws.close(code=message.get("code", 1000), message=(message.get("reason") or "").encode())
        elif kind == "websocket.http.response.start" and ws is None:
            self.refusal.update(message)
        elif kind == "websocket.http.response.body" and ws is None:
            self.refusal_body.append(message.get("body", b""))

    async def _accept(self, subprotocol: str | None) -> None:
        limits = self.host.limits
        ws = CodedWebSocketResponse(limits, (subprotocol,) if subprotocol else ())
        self.writer = await ws.prepare(self.request)
        self.ws = ws
        transport = self.request.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is not None:  # a client that stops reading holds a bounded amount of data; its sends back up soon
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, limits.send_buffer_bytes)
            except OSError as error:  # not fatal: the write timeout still bounds a stalled client
                logger.warning("could not set SO_SNDBUF=%d: %s", limits.send_buffer_bytes, error)

    def abort(self) -> None:
        if self.request.transport is not None:
            self.request.transport.abort()


def _response(start: dict[str, Any], body: list[bytes]) -> web.Response:
    """The aiohttp response of an ASGI answer: its ``*.response.start`` message and its body's parts; the names of
    its headers (lower-case, as ASGI wants them) spelled as HTTP/1.1 writes them."""
    headers = [(_SPELLING.get(name, "-".join(part.capitalize() for part in name.decode("latin-1").split("-"))),
                value.decode("latin-1")) for name, value in start.get("headers", ())]
    return _closing(web.Response(status=start["status"], body=b"".join(body), headers=headers))


_SPELLING = {b"www-authenticate": "WWW-Authenticate"}


def _closing(response: web.Response) -> web.Response:
    """The connection closes after ``response`` (every answer of this server: a refusal should, and a page or a probe
    loses nothing)."""
    response.force_close()
    return response

