"""The engine stage: the one thread that owns the model.

It takes frames from the input slot (F at a time for a Stream Batch with ``frame_buffer_size`` F), applies queued
control updates between steps, calls ``engine.step(images, frame_id)``, maps the returned ``frame_ids`` back to the
captured frames (the Stream Batch returns frame k after frame k+n−1 went in) and hands the outputs to every sink's
slot. At end of input it flushes the n−1 frames still inside the batch. It never sleeps: a skipped frame returns at
once and pacing belongs to sources and sinks.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any, Protocol, Sequence

import numpy as np

from ..core.image import frame_to_tensor, tensor_to_frame
from .controls import Controls
from .metrics import DropReason, RunMetrics
from .slots import Closed, FrameSlot
from .stages import END, CapturedFrame, OutputFrame

logger = logging.getLogger(__name__)

PAUSE_POLL = 0.05


class Engine(Protocol):
    """What the engine stage drives: :class:`~streamdiff.pipeline.StreamPipeline` or any object like it.

    ``step(images [F, 3, H, W] in [0, 1], frame_id) -> StreamOutput``; ``flush() -> list[StreamOutput]``. An
    ``update(**changes)`` method is used for live controls when present, ``config.frame_buffer_size`` for F.
    """

    def step(self, images: Any, frame_id: Any = None) -> Any: ...

    def flush(self) -> list[Any]: ...


def frames_per_step(engine: Any) -> int:
    config = getattr(engine, "config", None)
    return int(getattr(config, "frame_buffer_size", 1) or 1)


class EngineStage:
    """Body of the engine thread; see the module docstring."""

    def __init__(
        self,
        engine: Engine,
        source_slot: FrameSlot,
        sink_slots: Sequence[FrameSlot],
        metrics: RunMetrics,
        controls: Controls,
        flush: bool = True,
    ) -> None:
        self.engine = engine
        self.source_slot = source_slot
        self.sink_slots = list(sink_slots)
        self.metrics = metrics
        self.controls = controls
        self.flush_at_end = flush
        self.frames_per_step = frames_per_step(engine)
        # id of a step's first frame -> the captured frames of that step (None marks end-of-input padding).
        self._pending: OrderedDict[Any, list[CapturedFrame | None]] = OrderedDict()
        self._stop = threading.Event()

    def __call__(self, stop: threading.Event) -> None:
        self._stop = stop
        group: list[CapturedFrame] = []
        while not stop.is_set():
            self._apply_controls()
            if self.controls.paused:
                self.controls.wait_unpaused(PAUSE_POLL)
                continue
            try:
                item = self.source_slot.get(stop)
            except Closed:
                return
            if item is END:
                break
            group.append(item)
            if len(group) == self.frames_per_step:
                self._step(group)
                group = []
        if stop.is_set():
            return
        if group:  # end of input inside a frame group: pad with copies of the last frame, drop their outputs
            self._step(group, padding=self.frames_per_step - len(group))
        if self.flush_at_end:
            for out in self.engine.flush():
                self._emit(out)
        self._drop_pending(until=None)
        for slot in self.sink_slots:
            slot.put(END, stop, force=True)

    def _apply_controls(self) -> None:
        changes = self.controls.take_updates()
        if changes and hasattr(self.engine, "update"):
            logger.info("applying live update %s", sorted(changes))
            self.engine.update(**changes)

    def _step(self, group: list[CapturedFrame], padding: int = 0) -> None:
        images = [frame.image for frame in group] + [group[-1].image] * padding
        tensor = frame_to_tensor(np.stack(images))  # [F, 3, H, W] in [0, 1]
        key = group[0].frame_id
        self._pending[key] = list(group) + [None] * padding
        out = self.engine.step(tensor, frame_id=key)
        if getattr(out, "skipped", False):
            # Not denoised, counted as a filter skip; the frame still leaves, as the previous output held.
            self._pending.pop(key, None)
            self.metrics.record_drop(DropReason.FILTER_SKIP, len(group))
            if out.images is not None:
                self._send(group, tensor_to_frame(out.images[-1:]).repeat(len(group), axis=0))
            return
        if out.images is not None:
            self._emit(out)

    def _emit(self, out: Any) -> None:
        ids = tuple(getattr(out, "frame_ids", ()) or ())
        key = ids[0] if ids and ids[0] in self._pending else next(iter(self._pending), None)
        if key is None:
            logger.warning("the engine returned an output for no pending frame (ids %s); ignored", ids)
            return
        self._drop_pending(until=key)
        self._send(self._pending.pop(key), tensor_to_frame(out.images))

    def _send(self, frames: Sequence[CapturedFrame | None], images: np.ndarray) -> None:
        """Hand output ``images`` ``[F, H, W, 3]`` of the captured ``frames`` to every sink (padding skipped)."""
        for frame, image in zip(frames, images):
            if frame is None:
                continue
            message = OutputFrame(frame.frame_id, frame.captured, image)
            for slot in self.sink_slots:
                dropped = slot.put(message, self._stop)
                self.metrics.record_drop(DropReason.SUPERSEDED, len(dropped))

    def _drop_pending(self, until: Any) -> None:
        """Count the pending steps older than ``until`` (all when None) as lost to a reconfiguration."""
        while self._pending:
            key = next(iter(self._pending))
            if key == until:
                return
            frames = self._pending.pop(key)
            self.metrics.record_drop(DropReason.RECONFIGURE, sum(f is not None for f in frames))
