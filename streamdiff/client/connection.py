"""The Python client of the streamdiff WebSocket protocol (docs/protocol.md).

:class:`StreamClient` is one stream over one WebSocket, in asyncio, on the sans-I/O
:class:`~streamdiff.protocol.client.ClientConnection`::

    async with await StreamClient.connect("ws://127.0.0.1:8765/ws", {"prompt": "a watercolor"}, token=token) as c:
        await c.send_frame(rgb_uint8_array)          # or encoded JPEG/WebP bytes
        out = await c.next_output(timeout=5)         # OutputFrame: frame_id, latency_ms, timings, body
        await c.update(prompt="an oil painting")     # Ack, or RequestFailed naming the field

The remote engine (:class:`~streamdiff.client.remote.RemoteEngine`, in :mod:`streamdiff.client.remote`) builds on it: an engine with the
``open_stream(...)`` of :class:`~streamdiff.engine.StreamEngine`, so that ``streamdiff run --engine ws://HOST:PORT``
streams through a server unchanged.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import numpy as np

from ..errors import ConfigError, StreamDiffError, missing_extra
from ..protocol.client import Ack, ClientConnection, OutputFrame, Ready, ServerError, Stats
from ..protocol.images import ImageFormat, decode, encode
from ..protocol.limits import ServerLimits
from ..protocol.settings import StreamSettings
from ..protocol.wire import SESSION_HEADER, STREAM_PATH, SUBPROTOCOL

__all__ = ["RequestFailed", "ServerRefused", "StreamClient", "decode_output", "stream_url"]

_DECODE_LIMITS = ServerLimits(max_frame_pixels=4096 * 4096, max_width=4096, max_height=4096)


class ServerRefused(StreamDiffError):
    """The server refused or ended the stream: ``code`` is the close code, ``error`` its error message (if any)."""

    def __init__(self, message: str, code: int | None = None, error: ServerError | None = None) -> None:
        super().__init__(message)
        self.code, self.error = code, error


class RequestFailed(ConfigError):
    """The server answered an update with an error (``error.field`` names the setting)."""

    def __init__(self, error: ServerError) -> None:
        super().__init__(str(error))
        self.error = error


def stream_url(url: str) -> str:
    """``ws://host:port`` → ``ws://host:port/ws`` (the stream socket); a URL with a path is kept as is."""
    if not url.startswith(("ws://", "wss://")):
        raise ConfigError(f"engine URL {url!r} must start with ws:// or wss://")
    scheme, _, rest = url.partition("://")
    return url if "/" in rest else f"{url}{STREAM_PATH}"


class StreamClient:
    """One stream over one WebSocket. Build with :meth:`connect`; read outputs with :meth:`next_output`."""

    def __init__(self, ws: Any, conn: ClientConnection, ready: Ready, max_outputs: int = 64) -> None:
        self.ws, self.conn, self.ready = ws, conn, ready
        self.outputs: collections.deque[OutputFrame] = collections.deque()
        self.max_outputs = max_outputs
        self.dropped_outputs = 0  # outputs not read before max_outputs newer ones arrived
        self.stats: dict[str, Any] = {}
        self.errors: collections.deque[ServerError] = collections.deque(maxlen=100)
        self.error: ServerError | None = None  # the fatal error the server ended the stream with
        self.close_code: int | None = None
        self.close_reason = ""
        self.closed = asyncio.Event()
        self.changed = asyncio.Event()  # set whenever anything arrives (outputs, stats, close)
        self.listener: Any = None  # called (no arguments) after every message and at the close
        self._requests: dict[int | str, asyncio.Future[Ack]] = {}
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def connect(cls, url: str, settings: dict[str, Any] | None = None, *, token: str | None = None,
                      view_token: str | None = None, origin: str | None = None, open_timeout: float = 10.0,
                      max_size: int = 16 << 20, client: str = "streamdiff-python/1",
                      compression: str | None = None, session: str | None = None) -> StreamClient:
        """Open the socket, send the hello, wait for ``ready``; :class:`ServerRefused` if the server says no.

        ``session``: the stream id of this client's previous stream, sent as the ``X-Session-Id`` header so that a
        fleet (docs/scaling.md) routes the new stream to the same replica; a single server ignores it."""
        try:
            from websockets.asyncio.client import connect
            from websockets.exceptions import ConnectionClosed
        except ImportError:
            raise missing_extra("websockets", "server") from None
        headers = {SESSION_HEADER: session} if session else None
        ws = await connect(url, origin=origin, compression=compression, max_size=max_size, additional_headers=headers,
                           subprotocols=[SUBPROTOCOL], open_timeout=open_timeout, ping_interval=None)
        conn = ClientConnection(settings, token=token, client=client, view_token=view_token)
        try:
            try:
                await ws.send(conn.hello())
            except ConnectionClosed:
                pass  # the server refused at once (origin, shutdown): its error message may still be queued
            while True:
                message = await asyncio.wait_for(ws.recv(), open_timeout)
                event = conn.receive_text(message) if isinstance(message, str) else None
                if isinstance(event, (Ready, ServerError)):
                    break
        except ConnectionClosed as closed:
            raise _refused(closed, None) from None
        except BaseException:
            await ws.close()
            raise
        if isinstance(event, ServerError):
            try:
                await asyncio.wait_for(ws.wait_closed(), open_timeout)
            finally:
                ws.transport.abort()
            raise _refused(None, event, ws.close_code, ws.close_reason)
        return cls(ws, conn, event)

    async def __aenter__(self) -> StreamClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def settings(self) -> StreamSettings:
        """The effective settings (from ``ready`` and every ``ack``)."""
        assert self.conn.settings is not None
        return self.conn.settings

    @property
    def frames_lost(self) -> int:
        """Frames the server reported it will never answer (dropped, rate-limited, rejected), from the last
        ``stats`` message: a pipelining client stops counting them as awaiting their output."""
        s = self.stats
        return s.get("frames_dropped", 0) + s.get("frames_rate_limited", 0) + s.get("frames_rejected", 0)

    async def send_frame(self, image: np.ndarray | bytes, *, frame_id: int | None = None,
                         client_ts: float | None = None, format: ImageFormat | str = ImageFormat.JPEG,
                         quality: int = 90) -> int:
        """Send one frame (uint8 RGB ``[H, W, 3]``, encoded in a worker thread, or JPEG/WebP bytes); its id."""
        body = image if isinstance(image, (bytes, bytearray)) else \
            await asyncio.get_running_loop().run_in_executor(None, encode, image, format, quality)
        data = self.conn.frame(body, client_ts=client_ts, frame_id=frame_id)
        await self.ws.send(data)
        return int.from_bytes(data[8:12], "big")

    async def update(self, timeout: float = 10.0, **settings: Any) -> Ack:
        """Change settings live (JSON names); returns the Ack, raises :class:`RequestFailed` on an error."""
        request_id, text = self.conn.update(**settings)
        future: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        self._requests[request_id] = future
        try:
            await self.ws.send(text)
            return await asyncio.wait_for(future, timeout)
        finally:
            self._requests.pop(request_id, None)

    async def next_output(self, timeout: float | None = None) -> OutputFrame | None:
        """The oldest unread output frame, waiting up to ``timeout`` s (TimeoutError); None once closed."""
        async def wait() -> OutputFrame | None:
            while not self.outputs:
                if self.closed.is_set():
                    return None
                self.changed.clear()
                await self.changed.wait()
            return self.outputs.popleft()

        return await asyncio.wait_for(wait(), timeout)

    async def wait_for(self, predicate: Any, timeout: float | None = None) -> None:
        """Wait until ``predicate()`` is true (checked whenever a message arrives); TimeoutError after ``timeout``."""
        async def wait() -> None:
            while not predicate():
                if self.closed.is_set():
                    raise ServerRefused(f"the connection closed ({self.close_code} {self.close_reason})",
                                        self.close_code, self.error)
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), timeout)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.ws.close(code, reason)
        await asyncio.gather(self._reader, return_exceptions=True)

    async def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for message in self.ws:
                if isinstance(message, bytes):
                    self.outputs.append(self.conn.receive_bytes(message))
                    while len(self.outputs) > self.max_outputs:
                        self.outputs.popleft()
                        self.dropped_outputs += 1
                else:
                    self._on_text(self.conn.receive_text(message))
                self.changed.set()
                if self.listener is not None:
                    self.listener()
        except ConnectionClosed:
            pass
        finally:
            self.close_code, self.close_reason = self.ws.close_code, self.ws.close_reason or ""
            for future in self._requests.values():
                if not future.done():
                    future.set_exception(ServerRefused("the connection closed before the answer",
                                                       self.close_code, self.error))
            self.closed.set()
            self.changed.set()
            if self.listener is not None:
                self.listener()

    def _on_text(self, event: Any) -> None:
        if isinstance(event, Stats):
            self.stats = dict(event.counters)
        elif isinstance(event, ServerError):
            if event.fatal:
                self.error = event
            else:
                self.errors.append(event)
            future = self._requests.get(event.request_id) if event.request_id is not None else None
            if future is not None and not future.done():
                future.set_exception(RequestFailed(event))
        elif isinstance(event, Ack):
            future = self._requests.get(event.request_id) if event.request_id is not None else None
            if future is not None and not future.done():
                future.set_result(event)


def _refused(closed: Any, error: ServerError | None, code: int | None = None, reason: str = "") -> ServerRefused:
    if closed is not None:
        rcvd = getattr(closed, "rcvd", None)
        code, reason = (rcvd.code, rcvd.reason) if rcvd is not None else (1006, "")
    text = str(error) if error is not None else reason or "no reason given"
    return ServerRefused(f"the server refused the stream ({code}): {text}", code, error)


def decode_output(frame: OutputFrame) -> np.ndarray:
    """An output frame's image as uint8 RGB ``[H, W, 3]`` (the safe decoder, with generous limits)."""
    return decode(frame.body, _DECODE_LIMITS)
