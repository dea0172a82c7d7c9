"""The seam between a session and its socket: a small async transport, and its ASGI implementation.

A session (:mod:`.session`) speaks to its client only through :class:`Transport`: receive a message, send a
message, close with a code, abort. Any WebSocket library can drive a session by implementing these five
members; :class:`~.asgi.AsgiTransport` is an ASGI WebSocket's (the one application, :mod:`.asgi`, under
``streamdiff serve``'s aiohttp host and under Ray Serve alike); the WebRTC data channel has its own
(:class:`~.rtc.peer.PeerTransport`).

Time limits are the session's business (``asyncio.timeout`` around these calls), not the transport's.
"""

from __future__ import annotations

from typing import Protocol

from ..protocol.wire import CloseCode, ErrorCode, close_reason

__all__ = ["Transport", "TransportClosed", "library_close_reason"]

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
