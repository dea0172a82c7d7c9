"""The seam between a session and its socket: a small async transport, and its ASGI implementation.

A session (:mod:`.session`) speaks to its client only through :class:`Transport`: receive a message, send a
message, close with a code, abort. Any WebSocket library can drive a session by implementing these five
members; :class:`AsgiTransport` is an ASGI WebSocket's (the one application, :mod:`.asgi`, under ``streamdiff
serve``'s aiohttp host and under Ray Serve alike); the WebRTC data channel has its own
(:class:`~.rtc.peer.PeerTransport`).

Time limits are the session's business (``asyncio.timeout`` around these calls), not the transport's.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from ..protocol.wire import CloseCode, ErrorCode, close_reason

__all__ = ["AsgiTransport", "Transport", "TransportClosed", "library_close_reason"]

logger = logging.getLogger(__name__)

# Closes the WebSocket library starts on its own, and the error code their reason begins with (docs/protocol.md,
# "Close codes": every close the server starts says "<error code>: <message>").
_LIBRARY_CLOSES = {CloseCode.MESSAGE_TOO_BIG: ErrorCode.MESSAGE_TOO_BIG, CloseCode.INVALID_PAYLOAD: ErrorCode.BAD_JSON}
#: The close the server starts when a ping is not answered in time (the peer is gone or stopped reading).
KEEPALIVE_CLOSE = (CloseCode.INTERNAL_ERROR, "keepalive ping timeout")


class TransportClosed(Exception):
    """The connection is gone: ``code`` is the close code (None: no close frame, e.g. a dead peer); ``by_server``
    when the WebSocket layer closed it itself (a message over ``max_size``, invalid UTF-8, no pong)."""

    def __init__(self, code: int | None = None, reason: str = "", by_server: bool = False) -> None:
        super().__init__(f"connection closed ({code if code is not None else 'no close frame'})")
        self.code, self.reason, self.by_server = code, reason, by_server


class Transport(Protocol):
    """One WebSocket as a session sees it."""

    #: the peer's address for logs (``"127.0.0.1:53412"``); never a URL (it may carry a view token)
    remote: str
    #: the browser's ``Origin`` header, None when the client sent none
    origin: str | None

    async def receive(self) -> str | bytes:
        """The next message (text as str, binary as bytes); raises TransportClosed once the connection is gone."""
        ...

    async def send(self, data: str | bytes) -> None:
        """Send one message (waits while the socket's buffer is full); raises TransportClosed."""
        ...

    async def close(self, code: int, reason: str) -> None:
        """Start (and wait for) the closing handshake; never raises."""
        ...

    def abort(self) -> None:
        """Drop the connection at once, without a closing handshake (the peer stopped reading)."""
        ...


def library_close_reason(code: int, error: BaseException | None, max_message_bytes: int) -> str | None:
    """The reason of a close the WebSocket layer starts itself — a message over ``max_message_bytes`` (1009), a text
    message that is not UTF-8 (1007) — in the format of every close of this server: ``"message_too_big: frame with
    2000000 bytes exceeds limit of 1048576 bytes"``. None for other codes. ``error``: the library's exception (its
    text gives the declared size)."""
    coded = _LIBRARY_CLOSES.get(code)  # type: ignore[call-overload]
    if coded is None:
        return None
    if coded is ErrorCode.MESSAGE_TOO_BIG:
        size = next((word for word in str(error or "").split() if word.isdigit()), None)
        what = f"frame with {size} bytes" if size is not None else "a message"
        return close_reason(f"{coded.value}: {what} exceeds limit of {max_message_bytes} bytes")
    return close_reason(f"{coded.value}: a text message is not valid UTF-8")


class AsgiTransport:
    """:class:`Transport` over an accepted ASGI WebSocket (:class:`~.asgi.ServerApp` makes it): ``receive()``,
    ``send()`` and ``close()`` are ASGI's ``websocket.*`` messages.

    A ``websocket.disconnect`` becomes :class:`TransportClosed` with its code and reason (1006, a connection lost
    without a close frame: code None); ``by_server`` when the server says it closed the socket itself (a key of
    :mod:`.aiohttp_app`'s disconnect messages, ``"streamdiff.by_server"``). :meth:`abort` drops the connection where
    the server offers it (the ``"streamdiff.transport"`` scope extension's ``abort``); elsewhere (Ray Serve's proxy)
    the socket is only marked closed and ends when the application returns.
    """

    def __init__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self._receive, self._send = receive, send
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope.get("headers") or ()}
        self.origin: str | None = headers.get("origin")
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
