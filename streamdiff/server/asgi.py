"""The one application of ``streamdiff serve`` and ``streamdiff serve --ray``: every route, as an ASGI app.

:class:`ServerApp` answers every request of a server — ``streamdiff serve`` runs it on aiohttp
(:mod:`.aiohttp_app`, an ASGI host that keeps aiohttp's connection guards), a Ray Serve replica hands it to Serve as
its ingress (:mod:`streamdiff.deploy.replica`). What happens to a request is decided here, once:

- every request: the ``Host`` policy first (421, DNS rebinding);
- ``GET``/``HEAD`` (plain HTTP): :func:`~.routes.route` — the pages, ``/healthz``, ``/readyz``, ``/metrics``; a
  WebSocket path asked for without an upgrade gets 426;
- ``POST``/``PATCH``/``DELETE``/``OPTIONS`` of ``/whip…`` and ``/whep/…``: WHIP/WHEP (:meth:`RtcFront.handle
  <streamdiff.server.rtc.RtcFront.handle>`), the body read whole first, within ``handshake_timeout_s`` (408) and at
  most ``max_message_bytes`` (413); other methods 405;
- WebSockets: :meth:`Hub.upgrade_reply <.hub.Hub.upgrade_reply>` (400 for a query string on ``/ws``, 503 with
  ``Retry-After`` when admission refuses), sent as a real HTTP answer where the server offers ASGI's
  ``websocket.http.response`` extension, else as a denied handshake (403); then ``/ws`` runs a
  :class:`~.session.StreamSession` and ``/ws/view/<token>`` a :class:`~.viewing.ViewerSession`, each over
  :class:`AsgiTransport`.

The application starts and stops nothing: its owner (:class:`~.app.StreamServer`, the replica) runs the engine and
closes the WebRTC peers; ``lifespan`` events are answered at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote

from ..protocol.wire import SUBPROTOCOL, VIEW_SOCKET_PREFIX, WHEP_PREFIX, WHIP_PATH
from .hub import Hub
from .pacing import within
from .routes import HttpReply, StaticFiles, route, wrong_host
from .session import StreamSession
from .transport import TransportClosed
from .viewing import ViewerSession

__all__ = ["AsgiTransport", "Headers", "ServerApp"]

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

SIGNALING_PREFIXES = (WHIP_PATH, WHEP_PREFIX)
SIGNALING_METHODS = frozenset({"POST", "PATCH", "DELETE", "OPTIONS"})
#: headers of a signaling answer that hold a path of this server (the application's ``root_path`` goes before it)
_PATH_HEADERS = frozenset({"location", "x-streamdiff-view"})


class Headers(Mapping[str, str]):
    """An ASGI scope's headers as a case-insensitive mapping (the first of repeated names), what :func:`route`,
    :class:`~.hub.Hub` and the WebRTC front read."""

    def __init__(self, raw: Any) -> None:
        self._items: dict[str, str] = {}
        for name, value in raw or ():
            self._items.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))

    def __getitem__(self, name: str) -> str:
        return self._items[name.lower()]

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return self._items.get(name.lower(), default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


class ServerApp:
    """The ASGI application of one server (see the module docstring).

    ``rtc``: the WebRTC front (:class:`~streamdiff.server.rtc.RtcFront`), None: no WHIP/WHEP (404).
    ``headers``: added to every plain HTTP answer (a replica names itself). ``on_stream(session)``: a context
    manager around each stream socket's session (a replica records the Serve request that holds it)."""

    def __init__(self, hub: Hub, static: StaticFiles, rtc: Any = None, *,
                 headers: tuple[tuple[str, str], ...] = (),
                 on_stream: Callable[[StreamSession], contextlib.AbstractContextManager[Any]] | None = None) -> None:
        self.hub, self.static, self.rtc = hub, static, rtc
        self.headers = headers
        self.on_stream = on_stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "lifespan":
            await _lifespan(receive, send)

    # -- plain HTTP -------------------------------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope.get("headers"))
        answer = wrong_host(self.hub, headers) or await self._answer(scope, headers, receive)
        await _send_reply(send, answer, self.headers)  # a HEAD's body too: the server drops it, keeps its length

    async def _answer(self, scope: Scope, headers: Headers, receive: Receive) -> HttpReply:
        path, target = _target(scope)
        method = scope["method"].upper()
        if method in ("GET", "HEAD"):
            return route(target, self.static, self.hub, headers) or HttpReply(
                426, b"this path is a WebSocket: connect with a WebSocket client\n", headers=(("Upgrade", "websocket"),))
        if path.startswith(SIGNALING_PREFIXES) and self.rtc is None:
            return HttpReply(404, b"WebRTC (WHIP/WHEP) is off on this server\n")
        if path.startswith(SIGNALING_PREFIXES) and method in SIGNALING_METHODS:
            return await self._signaling(scope, method, path, headers, receive)
        return HttpReply(405, f"{method} is not allowed here\n".encode(),
                         headers=(("Allow", "GET, HEAD, POST, PATCH, DELETE, OPTIONS"),))

    async def _signaling(self, scope: Scope, method: str, path: str, headers: Headers, receive: Receive) -> HttpReply:
        limits = self.hub.limits
        try:
            body = await within(_read_body(receive, headers, limits.max_message_bytes), limits.handshake_timeout_s)
        except asyncio.TimeoutError:
            return HttpReply(408, f"the request body did not arrive within {limits.handshake_timeout_s:g} s\n".encode())
        except _BodyTooLarge as error:
            return HttpReply(413, f"{error}\n".encode())
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        reply = await self.rtc.handle(method, path, headers, query, body, _client_host(scope))
        root = scope.get("root_path", "").rstrip("/")
        answer_headers = tuple((name, root + value if name.lower() in _PATH_HEADERS else value)
                               for name, value in reply.headers)
        return HttpReply(reply.status, reply.body, reply.content_type, answer_headers)

    # -- WebSockets -------------------------------------------------------------------------------------------------

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        hub = self.hub
        path, target = _target(scope)
        key, state = object(), {"open": True}  # the socket, for admission until its session counts itself
        answer = hub.upgrade_reply(target, self.static, Headers(scope.get("headers")), key, _client_host(scope),
                                   lambda: state["open"])
        try:
            if answer is not None:
                await self._refuse(scope, send, answer)
                return
            offered = scope.get("subprotocols") or ()
            await send({"type": "websocket.accept", "subprotocol": SUBPROTOCOL if SUBPROTOCOL in offered else None})
            transport = AsgiTransport(scope, receive, send)
            if path.startswith(VIEW_SOCKET_PREFIX):
                await ViewerSession(hub, transport, unquote(path[len(VIEW_SOCKET_PREFIX):])).run()
                return
            session = StreamSession(hub, transport)
            hub.connection_started(key)  # the session counts itself from here on
            with self.on_stream(session) if self.on_stream is not None else contextlib.nullcontext():
                await session.run()
        finally:
            state["open"] = False
            hub.connection_started(key)  # idempotent: a socket refused or lost before its session gives its place back

    async def _refuse(self, scope: Scope, send: Send, answer: HttpReply) -> None:
        if "websocket.http.response" in (scope.get("extensions") or {}):
            await _send_reply(send, answer, self.headers, "websocket.http.response")
        else:  # the server can only deny the handshake (403); the close code tells a proxy why
            await send({"type": "websocket.close", "code": 1013 if answer.status == 503 else 1008})


class AsgiTransport:
    """:class:`Transport` over an accepted ASGI WebSocket (:class:`~.asgi.ServerApp` makes it): ``receive()``,
    ``send()`` and ``close()`` are ASGI's ``websocket.*`` messages.

    A ``websocket.disconnect`` becomes :class:`TransportClosed` with its code and reason (1006, a connection lost
    without a close frame: code None); ``by_server`` when the server says it closed the socket itself (a key of
    :mod:`.aiohttp_app`'s disconnect messages, ``"streamdiff.by_server"``). :meth:`abort` drops the connection where
    the server offers it (the ``"streamdiff.transport"`` scope extension's ``abort``); elsewhere (Ray Serve's proxy)
    the socket is only marked closed and ends when the application returns.
    """

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._receive, self._send = receive, send
        self.origin: str | None = Headers(scope.get("headers")).get("Origin")
        client = scope.get("client")
        self.remote = f"{client[0]}:{client[1]}" if client else "?"
        self._abort = ((scope.get("extensions") or {}).get("streamdiff.transport") or {}).get("abort")
        self._closed: TransportClosed | None = None

    async def receive(self) -> str | bytes:
        if self._closed is not None:
            raise self._closed
        try:
            message = await self._receive()
        except Exception as error:  # noqa: BLE001 - a server raises once the connection is gone
            raise self._gone(TransportClosed(None)) from error
        if message["type"] == "websocket.receive":
            if message.get("text") is not None:
                return message["text"]
            if message.get("bytes") is not None:
                return message["bytes"]
        if message["type"] == "websocket.disconnect":
            code = message.get("code", 1005)
            raise self._gone(TransportClosed(None if code == 1006 else code, message.get("reason") or "",
                                             by_server=bool(message.get("streamdiff.by_server"))))
        raise self._gone(TransportClosed(None))  # a message a WebSocket never carries

    def _gone(self, closed: TransportClosed) -> TransportClosed:
        self._closed = closed
        return closed

    async def send(self, data: str | bytes) -> None:
        if self._closed is not None:
            raise self._closed
        message = {"type": "websocket.send", "text": data} if isinstance(data, str) else \
            {"type": "websocket.send", "bytes": data}
        try:
            await self._send(message)
        except Exception as error:  # noqa: BLE001 - servers raise several kinds once the peer is gone
            raise self._gone(TransportClosed(None)) from error

    async def close(self, code: int, reason: str) -> None:
        if self._closed is not None:
            return
        self._closed = TransportClosed(code, reason, by_server=True)
        try:
            await self._send({"type": "websocket.close", "code": code, "reason": reason})
        except Exception as error:  # noqa: BLE001 - never raises, as the seam promises
            logger.debug("close(%d) failed: %s", code, error)

    def abort(self) -> None:
        if self._closed is None:
            self._closed = TransportClosed(None, "aborted", by_server=True)
        if self._abort is not None:
            self._abort()


class _BodyTooLarge(Exception):
    pass


async def _read_body(receive: Receive, headers: Headers, limit: int) -> bytes:
    """The request's whole body, at most ``limit`` bytes (a ``Content-Length`` over it is refused unread)."""
    length = headers.get("Content-Length")
    if length is not None and length.strip().isdigit() and int(length) > limit:
        raise _BodyTooLarge(f"the body has {int(length)} bytes, more than the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect: the client left
            raise asyncio.TimeoutError
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge(f"the body has more than the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _send_reply(send: Send, answer: HttpReply, extra: tuple[tuple[str, str], ...],
                      kind: str = "http.response") -> None:
    """``answer`` as ASGI's ``<kind>.start`` and ``<kind>.body`` (``websocket.http.response``: a refused upgrade)."""
    await send({"type": f"{kind}.start", "status": answer.status, "headers": _raw_headers(answer, extra)})
    await send({"type": f"{kind}.body", "body": answer.body})


def _raw_headers(answer: HttpReply, extra: tuple[tuple[str, str], ...]) -> list[tuple[bytes, bytes]]:
    """The answer's headers as ASGI wants them; ``Content-Length`` always (a HEAD's answer gives its GET's)."""
    pairs = [("Content-Type", answer.content_type), ("Content-Length", str(len(answer.body))), *answer.headers,
             *extra]
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in pairs]


def _target(scope: Scope) -> tuple[str, str]:
    """(path, path with its query string) of the request, the application's ``root_path`` left out; the raw
    (still percent-encoded) path where the server gives it, as a URL was sent."""
    raw = scope.get("raw_path")
    path = raw.decode("latin-1") if raw else scope.get("path", "/")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    query = scope.get("query_string", b"")
    return path, path + ("?" + query.decode("latin-1") if query else "")


def _client_host(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "?"


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
