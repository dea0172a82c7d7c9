"""Runtime test helpers: the real tiny model through the real engine, plus recording sources and sinks.

Where a test needs a slower or failing model, the real U-Net is wrapped (:class:`SlowUNet` sleeps a fixed cost per
call, standing for a bigger model; :class:`FailingUNet` raises at one call). The runtime under test never sleeps.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

from streamdiff import SinkError, StreamConfig, StreamEngine
from streamdiff.backends.torch_backend import TorchUNet
from streamdiff.engine import EngineConfig
from streamdiff.io import pattern_frame

SIZE = 64


class SlowUNet:
    """The real U-Net plus ``cost`` seconds per call (a bigger model's time); counts calls and their threads."""

    def __init__(self, unet: Any, cost: float = 0.0, fail_at: int | None = None) -> None:
        self.unet, self.cost, self.fail_at = unet, cost, fail_at
        self.calls = 0
        self.threads: set[str] = set()

    def __call__(self, sample, timestep, encoder_hidden_states):
        self.threads.add(threading.current_thread().name)
        call = self.calls
        self.calls += 1
        if self.fail_at is not None and call == self.fail_at:
            raise RuntimeError(f"U-Net failure at call {call}")
        if self.cost:
            time.sleep(self.cost)
        return self.unet(sample, timestep, encoder_hidden_states)


class PatternSource:
    """The moving test pattern with an optional per-read cost (sleep) or a failure; ``frames=None`` is endless."""

    def __init__(self, size: int = SIZE, frames: int | None = 20, cost: float = 0.0, realtime: bool = False,
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


def config(n: int = 2, f: int = 1, **changes: Any) -> StreamConfig:
    """A small stream: ``n`` steps, F = ``f``."""
    t_index_list = tuple(range(20, 20 + 10 * n, 10))
    return StreamConfig(width=SIZE, height=SIZE, t_index_list=t_index_list, frame_buffer_size=f, **changes)


@pytest.fixture()
def kit(tiny_model):
    """Engines on the real tiny model (optionally with a slow or failing U-Net), sources, sinks; checks threads."""

    class Kit:
        Source = PatternSource
        Sink = RecordingSink
        threads = staticmethod(streamdiff_threads)
        stream_config = staticmethod(config)
        model = tiny_model

        @staticmethod
        def engine(cost: float = 0.0, fail_at: int | None = None) -> StreamEngine:
            unet = SlowUNet(TorchUNet(tiny_model.unet), cost, fail_at)
            return StreamEngine(tiny_model, EngineConfig(max_streams=1, max_batch_rows=64), unet=unet)

    yield Kit
    assert streamdiff_threads() == [], "a runtime or engine thread was left running"
