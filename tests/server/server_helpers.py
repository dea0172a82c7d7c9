"""Helpers of the server tests: a fake clock, encoded test images."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image


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
