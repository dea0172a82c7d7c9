"""The client side of the streamdiff WebSocket protocol, sans I/O (what ``streamdiff.client`` drives).

::

    conn = ClientConnection({"prompt": "a watercolor portrait", "strength": 0.5}, token=token)
    await ws.send(conn.hello())
    ready = conn.receive_text(await ws.recv())           # Ready, or ServerError then the server closes
    await ws.send(conn.frame(jpeg_bytes))                # as fast as frames are captured (pipelined)
    request_id, text = conn.update(prompt="an oil painting"); await ws.send(text)
    event = conn.receive_bytes(message)                  # OutputFrame with latency_ms

Server messages the client does not know (future versions) come back as :class:`UnknownMessage`: ignore them.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ProtocolError
from .images import ImageFormat
from .settings import StreamSettings, apply_settings
from .wire import (
    PROTOCOL_VERSION,
    SETTINGS_VERSIONS,
    ErrorCode,
    ServerTimings,
    dump_json,
    load_json,
    pack_input_header,
    pack_reference_header,
    unpack_output_frame,
)

__all__ = [
    "Ack", "ClientConnection", "ClientEvent", "ClientState", "OutputFrame", "Ready", "ServerError", "Stats",
    "UnknownMessage", "Viewing",
]


class ClientState(enum.Enum):
    AWAIT_READY = "await_ready"
    STREAMING = "streaming"
    CLOSED = "closed"


@dataclass(frozen=True)
class Ready:
    """The server admitted the stream: its id, the effective settings, the server's limits, the viewer's URL.
    ``settings_version``: that of these settings (0; None from a server older than settings versions)."""

    stream_id: str
    settings: StreamSettings
    limits: Mapping[str, Any]
    view_token: str | None = None
    view_url: str | None = None
    settings_version: int | None = None


@dataclass(frozen=True)
class Ack:
    """An update was accepted; ``settings`` are the effective settings after it. ``settings_version``: the version
    outputs made with them carry (:attr:`OutputFrame.settings_version`; None from an older server)."""

    request_id: int | str | None
    settings: StreamSettings
    settings_version: int | None = None


@dataclass(frozen=True)
class ServerError:
    """An ``error`` message; when ``fatal`` the server closes the connection next."""

    code: str
    message: str
    fatal: bool
    field: str | None = None
    value: Any = None
    allowed: str | None = None
    request_id: Any = None  # of the message it answers, as sent (an invalid one too)
    frame_id: int | None = None

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclass(frozen=True)
class Stats:
    counters: Mapping[str, Any]


@dataclass(frozen=True)
class Viewing:
    stream_id: str


@dataclass(frozen=True)
class UnknownMessage:
    message: Mapping[str, Any]


@dataclass(frozen=True)
class OutputFrame:
    """An output frame: echoed ``frame_id``/``client_ts``, the server's timings and the encoded image.
    ``settings_version``: that of the ``ready`` or ``ack`` whose settings made it (docs/protocol.md)."""

    frame_id: int
    client_ts: float
    format: ImageFormat
    timings: ServerTimings
    body: bytes
    latency_ms: float  # capture -> output received, on the client's clock
    settings_version: int = 0


ClientEvent = Ready | Ack | ServerError | Stats | Viewing | UnknownMessage


class ClientConnection:
    """One stream's client. ``settings`` go in the hello (JSON names, docs/protocol.md "Settings").

    ``clock`` is monotonic seconds; frames carry ``clock() * 1000`` as their capture time unless given one.
    """

    def __init__(self, settings: Mapping[str, Any] | None = None, *, token: str | None = None,
                 client: str = "streamdiff-python/1", view_token: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.initial_settings = dict(settings or {})
        self._token, self._client, self._view_token, self._clock = token, client, view_token, clock
        self.state = ClientState.AWAIT_READY
        self.ready: Ready | None = None
        self.settings: StreamSettings | None = None
        self._next_frame_id = 0
        self._next_request_id = 1

    def __repr__(self) -> str:
        return f"<ClientConnection {self.state.value}>"

    def hello(self) -> str:
        """The first message to send."""
        message: dict[str, Any] = {"type": "hello", "version": PROTOCOL_VERSION, "client": self._client,
                                   "settings": self.initial_settings}
        if self._token is not None:
            message["token"] = self._token
        if self._view_token is not None:
            message["view_token"] = self._view_token
        return dump_json(message)

    def update(self, **settings: Any) -> tuple[int, str]:
        """An update message changing ``settings`` live: returns ``(request_id, text)``; expect :class:`Ack`."""
        request_id = self._next_request_id
        self._next_request_id += 1
        return request_id, dump_json({"type": "update", "request_id": request_id, "settings": settings})

    def reference_image(self, body: bytes) -> tuple[int, bytes]:
        """A reference image (image prompt; JPEG/WebP ``body``) for a stream with ``settings.ip_adapter``: returns
        ``(request_id, binary message)``; expect :class:`Ack` (docs/protocol.md, "Reference image")."""
        request_id = self._next_request_id
        self._next_request_id += 1
        return request_id, pack_reference_header(request_id) + body

    def frame(self, body: bytes, *, client_ts: float | None = None, frame_id: int | None = None) -> bytes:
        """One binary input message: header + ``body`` (JPEG or WebP). Frame ids count up from 0 unless given."""
        if frame_id is None:
            frame_id = self._next_frame_id
            self._next_frame_id = (self._next_frame_id + 1) % 2**32
        ts = self._clock() * 1000.0 if client_ts is None else client_ts
        return pack_input_header(frame_id, ts) + bytes(body)

    def receive_text(self, text: str) -> ClientEvent:
        """Parse a server text message; raises ProtocolError when the server breaks the protocol."""
        message = load_json(text)
        kind = message.get("type")
        if kind == "ready":
            settings = self._settings(message.get("settings"))
            stream_id, limits, view = message.get("stream_id"), message.get("limits", {}), message.get("view") or {}
            if not isinstance(stream_id, str) or not isinstance(limits, dict) or not isinstance(view, dict):
                raise ProtocolError("ready message has no valid stream_id, limits or view", code=ErrorCode.BAD_JSON)
            self.ready = Ready(stream_id, settings, limits, view.get("token"), view.get("url"),
                               _version(message.get("settings_version")))
            self.state, self.settings = ClientState.STREAMING, settings
            return self.ready
        if kind == "ack":
            self.settings = self._settings(message.get("settings"))
            return Ack(message.get("request_id"), self.settings, _version(message.get("settings_version")))
        if kind == "error":
            error = ServerError(str(message.get("code")), str(message.get("message")), bool(message.get("fatal")),
                                message.get("field"), message.get("value"), message.get("allowed"),
                                message.get("request_id"), message.get("frame_id"))
            if error.fatal:
                self.state = ClientState.CLOSED
            return error
        if kind == "stats":
            return Stats({k: v for k, v in message.items() if k != "type"})
        if kind == "viewing":
            self.state = ClientState.STREAMING
            return Viewing(str(message.get("stream_id")))
        return UnknownMessage(message)

    def receive_bytes(self, data: bytes | bytearray | memoryview) -> OutputFrame:
        """Parse an output frame; ``latency_ms`` is now minus the echoed capture time (same clock)."""
        header, body = unpack_output_frame(data)
        latency_ms = self._clock() * 1000.0 - header.client_ts
        return OutputFrame(header.frame_id, header.client_ts, header.format, header.timings, body, latency_ms,
                           header.settings_version)

    def _settings(self, value: Any) -> StreamSettings:
        try:
            return apply_settings(StreamSettings(), value, None)
        except ProtocolError as exc:
            raise ProtocolError(f"server sent invalid settings: {exc}", code=ErrorCode.BAD_JSON) from None


def _version(value: Any) -> int | None:
    """A ``settings_version`` as sent (None: absent, from a server older than settings versions)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < SETTINGS_VERSIONS:
        raise ProtocolError(f"server sent settings_version {value!r}, not an integer in [0, {SETTINGS_VERSIONS})",
                            code=ErrorCode.BAD_JSON)
    return value
