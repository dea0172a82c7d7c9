"""The seam between a session and its socket: a small async transport, and its `websockets` implementation.

A session (:mod:`.session`) speaks to its client only through :class:`Transport`: receive a message, send a
message, close with a code, abort. Any WebSocket library can drive a session by implementing these five
members; :class:`WebsocketsTransport` wraps a ``websockets`` server connection. (A Starlette/FastAPI ``WebSocket``
fits the same shape: ``receive()`` → ``websocket.receive()``'s text or bytes, ``send`` → ``send_text``/``send_bytes``,
``close`` → ``websocket.close(code, reason)``.)

Time limits are the session's business (``asyncio.timeout`` around these calls), not the transport's.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from ..protocol.wire import CloseCode, ErrorCode, close_reason

if TYPE_CHECKING:
    from websockets.asyncio.server import ServerConnection as WebSocket

__all__ = ["Transport", "TransportClosed", "WebsocketsTransport", "create_connection"]

logger = logging.getLogger(__name__)

# Closes the WebSocket library starts on its own, and the error code their reason begins with (docs/protocol.md,
# "Close codes": every close the server starts says "<error code>: <message>").
_LIBRARY_CLOSES = {CloseCode.MESSAGE_TOO_BIG: ErrorCode.MESSAGE_TOO_BIG, CloseCode.INVALID_PAYLOAD: ErrorCode.BAD_JSON}


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


class WebsocketsTransport:
    """:class:`Transport` over a ``websockets`` (asyncio) server connection.

    ``send_buffer_bytes`` caps the kernel's send buffer of the socket (``SO_SNDBUF``) so that a client that stops
    reading holds a bounded amount of data and its sends back up quickly.
    """

    def __init__(self, connection: WebSocket, send_buffer_bytes: int | None = None) -> None:
        self.connection = connection
        self.origin = connection.request.headers.get("Origin") if connection.request is not None else None
        address = connection.remote_address
        self.remote = f"{address[0]}:{address[1]}" if isinstance(address, tuple) and len(address) >= 2 else "?"
        if send_buffer_bytes is not None:
            sock = connection.transport.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer_bytes)
                except OSError as error:  # not fatal: the write timeout still bounds a stalled client
                    logger.warning("could not set SO_SNDBUF=%d: %s", send_buffer_bytes, error)

    async def receive(self) -> str | bytes:
        from websockets.exceptions import ConnectionClosed

        try:
            return await self.connection.recv()
        except ConnectionClosed as closed:
            raise _closed(closed) from None

    async def send(self, data: str | bytes) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            await self.connection.send(data)
        except ConnectionClosed as closed:
            raise _closed(closed) from None

    async def close(self, code: int, reason: str) -> None:
        await self.connection.close(code, reason)

    def abort(self) -> None:
        self.connection.transport.abort()


def _closed(closed: BaseException) -> TransportClosed:
    received, sent = getattr(closed, "rcvd", None), getattr(closed, "sent", None)
    if sent is not None and (received is None or getattr(closed, "rcvd_then_sent", None) is False):
        return TransportClosed(sent.code, sent.reason, by_server=True)  # the library closed it (1009, 1007, 1011)
    return TransportClosed(received.code if received is not None else None,
                           received.reason if received is not None else "")


def create_connection(protocol: Any, *args: Any, **kwargs: Any) -> WebSocket:
    """``create_connection`` for ``websockets``' ``serve``: its own connection, except that the closes the library
    starts itself — a message over ``max_size`` (1009), a text message that is not UTF-8 (1007) — give their reason
    as every close of this server does, ``"message_too_big: frame with 2000000 bytes exceeds limit of 1048576
    bytes"`` (through the sans-I/O protocol's public ``fail``)."""
    from websockets.asyncio.server import ServerConnection

    protocol.fail = _coded_fail(protocol.fail)
    return ServerConnection(protocol, *args, **kwargs)


def _coded_fail(fail: Callable[..., None]) -> Callable[..., None]:
    def coded(code: int, reason: str = "") -> None:
        error = _LIBRARY_CLOSES.get(code)  # type: ignore[call-overload]
        if error is not None and not reason.startswith(f"{error.value}: "):
            reason = close_reason(f"{error.value}: {reason or 'refused by the WebSocket layer'}")
        fail(code, reason)

    return coded
