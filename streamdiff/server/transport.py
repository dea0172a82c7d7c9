"""The seam between a session and its socket: a small async transport, and its aiohttp implementation.

A session (:mod:`.session`) speaks to its client only through :class:`Transport`: receive a message, send a
message, close with a code, abort. Any WebSocket library can drive a session by implementing these five
members; :class:`AiohttpTransport` wraps an ``aiohttp.web.WebSocketResponse`` (the server of :mod:`.app`). (A
Starlette/FastAPI ``WebSocket`` fits the same shape: ``receive()`` → ``websocket.receive()``'s text or bytes,
``send`` → ``send_text``/``send_bytes``, ``close`` → ``websocket.close(code, reason)``; see
:mod:`streamdiff.deploy.transport`.)

Time limits are the session's business (``asyncio.timeout`` around these calls), not the transport's.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any, Protocol

from ..protocol.wire import CloseCode, ErrorCode, close_reason

__all__ = ["AiohttpTransport", "Transport", "TransportClosed", "library_close_reason"]

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


class AiohttpTransport:
    """:class:`Transport` over a prepared ``aiohttp.web.WebSocketResponse`` (:mod:`.app` makes it).

    ``send_buffer_bytes`` caps the kernel's send buffer of the socket (``SO_SNDBUF``) so that a client that stops
    reading holds a bounded amount of data and its sends back up quickly. ``writer``: what ``prepare()`` returned;
    :meth:`send` waits on its ``drain()`` while the socket's buffer is full (aiohttp's own send waits only once per
    64 KiB written, so a session would not see a stalled client at every message).
    """

    def __init__(self, websocket: Any, request: Any, send_buffer_bytes: int | None = None,
                 writer: Any = None) -> None:
        self.websocket, self._writer = websocket, writer
        self.origin: str | None = request.headers.get("Origin")
        peer = request.transport.get_extra_info("peername") if request.transport is not None else None
        self.remote = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "?"
        self._transport = request.transport
        if send_buffer_bytes is not None and self._transport is not None:
            sock = self._transport.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer_bytes)
                except OSError as error:  # not fatal: the write timeout still bounds a stalled client
                    logger.warning("could not set SO_SNDBUF=%d: %s", send_buffer_bytes, error)

    async def receive(self) -> str | bytes:
        from aiohttp import WSMsgType

        ws = self.websocket
        if ws.closed:
            raise self._gone()
        try:
            message = await ws.receive()
        except RuntimeError:  # receiving after the close (aiohttp counts such calls)
            raise self._gone() from None
        if message.type is WSMsgType.TEXT or message.type is WSMsgType.BINARY:
            return message.data
        if message.type is WSMsgType.CLOSE:  # the peer's close frame (aiohttp answered it)
            raise TransportClosed(message.data, message.extra or "")
        raise self._gone()

    def _gone(self) -> TransportClosed:
        """Why the connection ended without a close frame from the peer: the library closed it itself (1009, 1007,
        1002: ``sent_close``), a ping went unanswered (1011: aiohttp dropped the socket), or the peer vanished."""
        ws = self.websocket
        sent = getattr(ws, "sent_close", None)
        if sent is not None:
            return TransportClosed(sent[0], sent[1], by_server=True)
        if isinstance(ws.exception(), asyncio.TimeoutError):  # "No PONG received after …": an open socket's only one
            return TransportClosed(*KEEPALIVE_CLOSE, by_server=True)
        return TransportClosed(None)

    async def send(self, data: str | bytes) -> None:
        ws = self.websocket
        if ws.closed:
            raise self._gone()
        try:
            if isinstance(data, str):
                await ws.send_str(data)
            else:
                await ws.send_bytes(data)
            if self._writer is not None:
                await self._writer.drain()
        except (ConnectionError, RuntimeError) as error:  # the transport is gone (aiohttp raises either)
            raise TransportClosed(None) from error

    async def close(self, code: int, reason: str) -> None:
        try:
            await self.websocket.close(code=code, message=reason.encode("utf-8"))
        except Exception as error:  # noqa: BLE001 - never raises, as the seam promises
            logger.debug("close(%d) failed: %s", code, error)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()
