"""The session of a view-only socket (``/ws/view/<view token>``), over any :class:`~.transport.Transport`.

A viewer receives the output frames of the stream whose view token it names — the very bytes the stream's client
gets — latest-wins, and may send nothing. Its stream session hands it each frame with :meth:`ViewerSession.offer`
and ends it (``stream_ended``, 1000) when the stream ends. The token is a bearer secret: it is compared in
constant time and never logged.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from .pacing import LatestSlot, SendTimeout, send_within
from ..protocol.session import Close, ConnectionState, Send
from .transport import Transport, TransportClosed
from ..protocol.viewer import ViewerConnection
from ..protocol.wire import ErrorCode

if TYPE_CHECKING:
    from .hub import Hub
    from .session import StreamSession

__all__ = ["ViewerSession"]

logger = logging.getLogger(__name__)


class ViewerSession:
    """One viewer of one stream. Call :meth:`run` once."""

    def __init__(self, hub: Hub, transport: Transport, view_token: str) -> None:
        self.hub, self.transport = hub, transport
        self._view_token = view_token
        self.conn = ViewerConnection()
        self.stream: StreamSession | None = None
        self.frames_sent = 0
        self.frames_dropped = 0
        self._slot: LatestSlot[bytes] = LatestSlot()

    def __repr__(self) -> str:  # never shows the token
        return f"<ViewerSession {self.stream.stream_id if self.stream else 'pending'} {self.conn.state.value}>"

    async def run(self) -> None:
        hub = self.hub
        hub.metrics.connections.labels("view").inc()
        sender: asyncio.Task[Any] | None = None
        try:
            stream = None if hub.shutting_down else hub.find_view(self._view_token)
            if not hub.config.origins.allows(self.transport.origin):
                await self._execute(self.conn.close(ErrorCode.FORBIDDEN_ORIGIN,
                                                    "pages from this origin may not connect to this server"))
            elif hub.shutting_down:
                await self._execute(self.conn.close(ErrorCode.SHUTTING_DOWN, "the server is shutting down"))
            elif stream is None or stream.conn.state is ConnectionState.CLOSED:
                await self._execute(self.conn.close(ErrorCode.UNKNOWN_VIEW_TOKEN, "no stream has this view token"))
            elif hub.viewer_count(stream) >= hub.limits.max_viewers_per_stream:
                await self._execute(self.conn.close(ErrorCode.SERVER_FULL, "this stream has its "
                                                    f"{hub.limits.max_viewers_per_stream} viewers; try again later"))
            else:
                self.stream = stream
                stream.viewers.add(self)
                hub.viewers.add(self)
                hub.viewers_changed()
                logger.info("viewer from %s watching %s", self.transport.remote, stream.stream_id)
                await self._execute(self.conn.accept(stream.stream_id or "?", stream.conn.settings))
                sender = asyncio.ensure_future(self._send_loop())
                await self._receive_loop()
        finally:
            if sender is not None:
                sender.cancel()
                await asyncio.wait([sender], timeout=5.0)
            if self.stream is not None:
                self.stream.viewers.discard(self)
                hub.viewers.discard(self)
                hub.viewers_changed()
                logger.info("viewer from %s of %s left (%d frames, %d dropped)", self.transport.remote,
                            self.stream.stream_id, self.frames_sent, self.frames_dropped)

    def offer(self, data: bytes) -> None:
        """A new output frame of the stream (latest-wins: an unsent older one is dropped)."""
        if self.conn.state is ConnectionState.STREAMING and self._slot.put(data) is not None:
            self.frames_dropped += 1

    async def end(self, code: ErrorCode, message: str) -> None:
        """Close the view (stream_ended, shutting_down): error message, then close."""
        await self._execute(self.conn.close(code, message))

    async def _receive_loop(self) -> None:
        while self.conn.state is not ConnectionState.CLOSED:
            try:
                message = await self.transport.receive()
            except TransportClosed:
                self.conn.state = ConnectionState.CLOSED
                return
            events = self.conn.receive_text(message) if isinstance(message, str) else \
                self.conn.receive_bytes(message)
            await self._execute(events)

    async def _send_loop(self) -> None:
        while self.conn.state is not ConnectionState.CLOSED:
            data = await self._slot.get()
            await self._send(data)
            self.frames_sent += 1

    async def _execute(self, events: list[Any]) -> None:
        for event in events:
            if isinstance(event, Send):
                await self._send(event.data)
            elif isinstance(event, Close):
                await self.transport.close(event.code, event.reason)

    async def _send(self, data: str | bytes) -> None:
        try:
            await send_within(self.transport, data, self.hub.limits.write_timeout_s)
        except SendTimeout:
            self.conn.state = ConnectionState.CLOSED
            self.transport.abort()
        except TransportClosed:
            pass
