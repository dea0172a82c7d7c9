"""A Starlette/FastAPI WebSocket as the server's :class:`~streamdiff.server.transport.Transport`.

The stream and viewer sessions of ``streamdiff serve`` (:mod:`streamdiff.server.session`) speak to their socket only
through that small seam, so a Ray Serve replica runs the very same protocol implementation over the ASGI WebSocket
its FastAPI ingress accepted. What the ``websockets`` server enforces itself (``max_size``, pings, the opening
handshake's timeout) is the job of the HTTP proxy in front of the replica here (Ray Serve's uvicorn); the session
still checks every message's size and keeps its own hello and idle deadlines.
"""

from __future__ import annotations

import logging
from typing import Any

from ..server.transport import TransportClosed

__all__ = ["StarletteTransport"]

logger = logging.getLogger(__name__)


class StarletteTransport:
    """:class:`~streamdiff.server.transport.Transport` over an accepted ``starlette.websockets.WebSocket``."""

    def __init__(self, websocket: Any) -> None:
        self.websocket = websocket
        self.origin: str | None = websocket.headers.get("origin")
        client = websocket.client
        self.remote = f"{client.host}:{client.port}" if client is not None else "?"
        self._closed = False

    async def receive(self) -> str | bytes:
        if self._closed:
            raise TransportClosed(None)
        try:
            message = await self.websocket.receive()
        except RuntimeError:  # receiving after a disconnect message
            self._closed = True
            raise TransportClosed(None) from None
        kind = message["type"]
        if kind == "websocket.disconnect":
            self._closed = True
            raise TransportClosed(message.get("code", 1006), message.get("reason") or "")
        if message.get("text") is not None:
            return message["text"]
        if message.get("bytes") is not None:
            return message["bytes"]
        raise TransportClosed(None)  # an ASGI message a WebSocket never carries

    async def send(self, data: str | bytes) -> None:
        if self._closed:
            raise TransportClosed(None)
        try:
            if isinstance(data, str):
                await self.websocket.send_text(data)
            else:
                await self.websocket.send_bytes(data)
        except Exception as error:  # noqa: BLE001 - starlette raises several kinds once the peer is gone
            self._closed = True
            raise TransportClosed(None) from error

    async def close(self, code: int, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self.websocket.close(code, reason)
        except Exception as error:  # noqa: BLE001 - never raises, as the seam promises
            logger.debug("close(%d) failed: %s", code, error)

    def abort(self) -> None:
        """ASGI has no abort: mark the socket closed; the handler's return ends the connection at the proxy."""
        self._closed = True
