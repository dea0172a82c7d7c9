"""A PNG contact sheet beside a video file: a row of input frames over the output frames made from them.

``streamdiff run`` adds one for every video file sink (``file:out/demo.mp4`` → ``out/demo.png``):
:class:`InputTap` wraps the source and keeps every ``every``-th input frame, :class:`ContactSheetSink` keeps the
outputs with the same index and writes the sheet when it closes. Output i is input i's frame when nothing was
dropped (the run's summary says); a lossy run pairs the i-th output written with the i-th input read.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

SHEET_EVERY = 15
SHEET_COLUMNS = 8


def contact_sheet(rows: Sequence[Sequence[np.ndarray]], gap: int = 4) -> np.ndarray:
    """uint8 RGB frames in a grid (rows × columns, all one size) on a dark background."""
    height, width = rows[0][0].shape[:2]
    columns = max(len(r) for r in rows)
    sheet = np.full((len(rows) * (height + gap) + gap, columns * (width + gap) + gap, 3), 24, np.uint8)
    for r, row in enumerate(rows):
        for c, frame in enumerate(row):
            y, x = gap + r * (height + gap), gap + c * (width + gap)
            sheet[y : y + height, x : x + width] = frame
    return sheet


class InputTap:
    """A source that passes every frame on and keeps frames 0, every, 2·every … (``columns`` of them)."""

    def __init__(self, source: Any, every: int = SHEET_EVERY, columns: int = SHEET_COLUMNS) -> None:
        self.source = source
        self.every, self.columns = every, columns
        self.kept: list[np.ndarray] = []
        self._index = 0

    def __getattr__(self, name: str) -> Any:  # name, realtime, fps, width, height … of the wrapped source
        return getattr(self.source, name)

    def open(self) -> None:
        self.source.open()

    def read(self) -> np.ndarray | None:
        frame = self.source.read()
        if frame is not None and self._index % self.every == 0 and len(self.kept) < self.columns:
            self.kept.append(frame.copy())
        self._index += 1
        return frame

    def close(self) -> None:
        self.source.close()


class ContactSheetSink:
    """Keeps the outputs matching an :class:`InputTap`'s frames; writes the PNG sheet at ``path`` on close."""

    def __init__(self, path: str | Path, tap: InputTap) -> None:
        self.path = Path(path)
        self.tap = tap
        self.name = f"contact-sheet:{self.path}"
        self.kept: list[np.ndarray] = []
        self._index = 0

    def open(self, width: int, height: int, fps: float) -> None:
        self.kept, self._index = [], 0

    def write(self, frame: np.ndarray) -> None:
        if self._index % self.tap.every == 0 and len(self.kept) < self.tap.columns:
            self.kept.append(frame.copy())
        self._index += 1

    def close(self) -> None:
        if not self.kept:
            return
        from PIL import Image

        inputs = self.tap.kept[: len(self.kept)]
        rows = [inputs, self.kept] if inputs and inputs[0].shape == self.kept[0].shape else [self.kept]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(contact_sheet(rows)).save(self.path)
        logger.info("wrote a contact sheet of %d frames (inputs above outputs) to %s", len(self.kept), self.path)
