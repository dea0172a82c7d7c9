"""Helpers of the server tests: a fake clock, encoded test images, a connection that is already streaming."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
from PIL import Image

from streamdiff.protocol import Close, ConnectionState, ErrorCode, ServerConnection, ServerLimits
from streamdiff.protocol.client import ClientConnection


class FakeClock:
    """A monotonic clock the test moves by hand (seconds)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def pattern(width: int = 48, height: int = 32, seed: int = 0) -> np.ndarray:
    """A deterministic uint8 RGB [H, W, 3] test frame."""
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([(xx * 5 + seed) % 256, (yy * 7) % 256, (xx * yy + 3 * seed) % 256], -1).astype(np.uint8)


def save(array: np.ndarray, fmt: str, **options: Any) -> bytes:
    """``array`` (uint8 gray, RGB or RGBA) encoded by Pillow as ``fmt`` with ``options``."""
    out = io.BytesIO()
    Image.fromarray(array).save(out, fmt, **options)
    return out.getvalue()


def streaming(clock: FakeClock | None = None, limits: ServerLimits | None = None, token: str | None = None,
              **settings: Any) -> ServerConnection:
    """A connection past hello and accept(), with ``settings`` in its hello."""
    conn = ServerConnection(limits, token=token, clock=clock or FakeClock())
    hello: dict[str, Any] = {"type": "hello", "version": 1, "settings": settings}
    if token is not None:
        hello["token"] = token
    events = conn.receive_text(json.dumps(hello))
    assert conn.state is ConnectionState.HELLO_RECEIVED, events
    conn.accept("stream-1", "view-token-0123456789")
    return conn


def frame_message(body: bytes, frame_id: int = 1, client_ts: float = 12.5) -> bytes:
    return ClientConnection().frame(body, frame_id=frame_id, client_ts=client_ts)


def closed_with(events: list, error: ErrorCode, close: int) -> dict[str, Any]:
    """Assert ``events`` are [error message, Close] for ``error``; returns the error message."""
    assert len(events) == 2 and isinstance(events[1], Close), events
    message = json.loads(events[0].data)
    assert (message["type"], message["code"], message["fatal"]) == ("error", error.value, True)
    assert (events[1].code, events[1].error) == (close, error)
    assert events[1].reason.startswith(f"{error.value}: ")
    return message
