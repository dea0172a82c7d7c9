"""Pacing a source to its frame rate, like a camera: used by every source that can play in real time (files,
folders, the test pattern, the screen)."""

from __future__ import annotations

import time

from ..errors import ConfigError

__all__ = ["Pacer"]


class Pacer:
    """Releases frame i at ``start + i / fps`` like a camera: a late reader skips ahead instead of bursting."""

    def __init__(self, fps: float) -> None:
        if not fps > 0:
            raise ConfigError(f"pacing fps={fps!r} must be > 0")
        self.interval = 1.0 / fps
        self._next: float | None = None

    def wait(self) -> None:
        now = time.perf_counter()
        if self._next is None or now - self._next > self.interval:
            self._next = now  # first frame, or more than a frame late: restart the clock (frames are missed)
        elif self._next > now:
            time.sleep(self._next - now)
        self._next += self.interval
