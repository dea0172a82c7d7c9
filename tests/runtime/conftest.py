"""Fakes for runtime tests: an engine with a configurable per-step cost, and recording sources and sinks.

The cost is a sleep *in the fake*, standing for model work; the runtime under test never sleeps in its engine stage.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest
import torch

from streamdiff import SinkError, StreamConfig, StreamOutput
from streamdiff.io import pattern_frame


class FakeEngine:
    """``step``/``flush`` like StreamPipeline: a Stream Batch of ``n`` (frame k leaves after frame k+n−1 went in).

    Output = 1 − input. ``cost`` seconds per step; ``fail_at`` raises on that step; ``skip`` is a set of step
    numbers reported as filter skips (returning the last output, as StreamPipeline does).
    """

    def __init__(self, size: int = 32, n: int = 1, cost: float = 0.0, frame_buffer_size: int = 1,
                 fail_at: int | None = None, skip: set[int] | None = None) -> None:
        t_index_list = tuple(range(20, 20 + 10 * n, 10))
        self.config = StreamConfig(width=size, height=size, t_index_list=t_index_list,
                                   frame_buffer_size=frame_buffer_size)
        self.n = n
        self.cost = cost
        self.fail_at = fail_at
        self.skip = skip or set()
        self.steps = 0
        self.updates: list[tuple[str, dict[str, Any]]] = []
        self.step_threads: set[str] = set()
        self._inside: list[tuple[Any, torch.Tensor]] = []
        self._last: torch.Tensor | None = None

    def step(self, images: torch.Tensor, frame_id: Any = None) -> StreamOutput:
        self.step_threads.add(threading.current_thread().name)
        step = self.steps
        self.steps += 1
        if self.cost:
            time.sleep(self.cost)
        if self.fail_at is not None and step == self.fail_at:
            raise RuntimeError(f"fake engine failure at step {step}")
        if step in self.skip:
            return StreamOutput(self._last, skipped=True)
        self._inside.append((frame_id, 1.0 - images))
        if len(self._inside) < self.n:
            return StreamOutput(None)
        leaving, out = self._inside.pop(0)
        self._last = out
        return StreamOutput(out, frame_ids=(leaving,))

    def flush(self) -> list[StreamOutput]:
        outs = [StreamOutput(img, frame_ids=(fid,)) for fid, img in self._inside]
        self._inside.clear()
        return outs

    def update(self, **changes: Any) -> None:
        self.updates.append((threading.current_thread().name, changes))


class PatternSource:
    """The moving test pattern with an optional per-read cost (sleep) or a failure; ``frames=None`` is endless."""

    def __init__(self, size: int = 32, frames: int | None = 20, cost: float = 0.0, realtime: bool = False,
                 fail_at: int | None = None) -> None:
        self.size, self.frames, self.cost, self.realtime, self.fail_at = size, frames, cost, realtime, fail_at
        self.name = "pattern"
        self.fps = 30.0
        self.index = 0
        self.closed = False

    def open(self) -> None:
        self.index = 0

    def read(self) -> np.ndarray | None:
        if self.frames is not None and self.index >= self.frames:
            return None
        if self.cost:
            time.sleep(self.cost)
        if self.fail_at is not None and self.index == self.fail_at:
            raise OSError("fake source failure")
        frame = pattern_frame(self.index, self.size, self.size)
        self.index += 1
        return frame

    def close(self) -> None:
        self.closed = True


class RecordingSink:
    """Keeps every frame written (and when); optional per-write cost or failure, or a failure at open or close."""

    def __init__(self, name: str = "rec", cost: float = 0.0, fail_at: int | None = None, fail_open: bool = False,
                 fail_close: bool = False) -> None:
        self.name, self.cost, self.fail_at = name, cost, fail_at
        self.fail_open, self.fail_close = fail_open, fail_close
        self.frames: list[np.ndarray] = []
        self.times: list[float] = []
        self.opened: tuple[int, int, float] | None = None
        self.closed = False

    def open(self, width: int, height: int, fps: float) -> None:
        if self.fail_open:
            raise SinkError(f"fake sink {self.name} cannot open")
        self.opened = (width, height, fps)

    def write(self, frame: np.ndarray) -> None:
        if self.fail_at is not None and len(self.frames) == self.fail_at:
            raise OSError("fake sink failure")
        if self.cost:
            time.sleep(self.cost)
        self.frames.append(frame)
        self.times.append(time.perf_counter())

    def close(self) -> None:
        self.closed = True
        if self.fail_close:
            raise OSError("fake sink failure at close")


def streamdiff_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("streamdiff-") and t.is_alive()]


@pytest.fixture()
def fakes():
    """The fake classes, as a namespace."""

    class Fakes:
        Engine = FakeEngine
        Source = PatternSource
        Sink = RecordingSink
        threads = staticmethod(streamdiff_threads)

    yield Fakes
    assert streamdiff_threads() == [], "a runtime thread was left running"
