"""The view-only connection (``/ws/view/<view token>``), sans I/O: an OBS Browser Source watching a stream.

The server sends ``viewing`` once, then the stream's output frames (the same binary messages its client gets);
the viewer may send nothing. The I/O layer looks the view token up (compare tokens with ``hmac.compare_digest``,
never log them) and calls :meth:`ViewerConnection.accept` or ``close(ErrorCode.UNKNOWN_VIEW_TOKEN, …)``.
"""

from __future__ import annotations

from typing import Any

from .session import Close, ConnectionState, Event, Send
from .settings import StreamSettings
from .wire import PROTOCOL_VERSION, ErrorCode, close_reason, dump_json, error_message

__all__ = ["ViewerConnection"]


class ViewerConnection:
    """A view-only WebSocket (``/ws/view/<view token>``): receives a stream's output frames, may send nothing."""

    def __init__(self) -> None:
        self.state = ConnectionState.AWAIT_HELLO

    def accept(self, stream_id: str, settings: StreamSettings | None = None) -> list[Event]:
        """The view token matched a stream: ``[Send(viewing)]``; then forward the stream's output frames."""
        self.state = ConnectionState.STREAMING
        message: dict[str, Any] = {"type": "viewing", "version": PROTOCOL_VERSION, "stream_id": stream_id}
        if settings is not None:
            message["width"], message["height"] = settings.stream.width, settings.stream.height
        return [Send(dump_json(message))]

    def receive_text(self, text: str) -> list[Event]:
        return self.close(ErrorCode.VIEW_ONLY, "this is a view-only connection; it accepts no messages")

    def receive_bytes(self, data: bytes | bytearray | memoryview) -> list[Event]:
        return self.close(ErrorCode.VIEW_ONLY, "this is a view-only connection; it accepts no messages")

    def close(self, code: ErrorCode, message: str) -> list[Event]:
        """End the view (unknown_view_token, shutting_down, or the stream ended with ``ErrorCode`` of its close)."""
        if self.state is ConnectionState.CLOSED:
            return []
        self.state = ConnectionState.CLOSED
        return [Send(error_message(code, message, fatal=True)),
                Close(code.close_code, close_reason(f"{code.value}: {message}"), code)]
