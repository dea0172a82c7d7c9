"""Run a stream: source → capture thread → slot → engine thread → slots → sink threads.

Typical use::

    runner = StreamRunner(pipe, open_source("testpattern"), [open_sink("file:out.mp4")])
    summary = runner.run(status_interval=2.0, on_status=print)   # returns at end of input, on stop() or Ctrl-C

Every stage runs in its own thread (a sink that must live on the main thread, such as a window on macOS, is served
by :meth:`StreamRunner.run` itself), so throughput is that of the slowest stage, not the sum. With a real-time
source the slots are latest-wins (the engine always takes the newest frame, drops are counted); otherwise they are
lossless with back-pressure and nothing is dropped. Shutdown — end of input, :meth:`stop`, a control's quit,
Ctrl-C or an error in any stage — sets one event that every wait watches, then all threads are joined.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from ..config import check_bool, check_int, check_number
from ..errors import ConfigError, StreamDiffError
from ..io.resize import fit_frame
from .controls import Controls
from .engine_stage import Engine, EngineStage
from .metrics import DropReason, RunMetrics, RunSummary
from .slots import Closed, FrameSlot, SlotPolicy
from .stages import END, CapturedFrame, OutputFrame, Stage

logger = logging.getLogger(__name__)

DEFAULT_FPS = 30.0
IDLE_INTERVAL = 0.02  # s without a frame after which a sink's idle() runs (the window polls its keys)


class Source(Protocol):
    """A frame source (see :mod:`streamdiff.io.sources`): ``read()`` gives uint8 RGB ``[H, W, 3]``, None at the end."""

    name: str
    realtime: bool  # frames arrive at their own pace (a camera, or a file paced on request)
    fps: float | None

    def open(self) -> None: ...

    def read(self) -> np.ndarray | None: ...

    def close(self) -> None: ...


class Sink(Protocol):
    """A frame sink (see :mod:`streamdiff.io.sinks`).

    Optional: ``bind(controls, metrics)``, ``main_thread``, and ``idle()``, called every ``IDLE_INTERVAL`` s while
    no frame arrives (a window keeps polling its keys and redrawing, so a pause can be undone).
    """

    name: str

    def open(self, width: int, height: int, fps: float) -> None: ...

    def write(self, frame: np.ndarray) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class RuntimeConfig:
    """How frames move between the stages.

    ``realtime``: latest-wins slots (None: follow ``source.realtime``). ``queue_size``: capacity of latest-wins
    slots; ``lossless_queue_size`` of lossless ones. ``max_frames``: stop reading after that many. ``frame_size``:
    the engine's (width, height), taken from ``engine.config`` when None. ``output_size``: what sinks receive
    (default the engine size; ``"source"``: the source's native size, scaling the output back). ``fps``: the
    sinks' frame rate (default the source's, else 30).
    """

    realtime: bool | None = None
    queue_size: int = 1
    lossless_queue_size: int = 4
    max_frames: int | None = None
    frame_size: tuple[int, int] | None = None
    output_size: tuple[int, int] | str | None = None
    fps: float | None = None
    flush: bool = True
    join_timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.realtime is not None:
            check_bool("realtime", self.realtime)
        check_int("queue_size", self.queue_size, 1)
        check_int("lossless_queue_size", self.lossless_queue_size, 1)
        if self.max_frames is not None:
            check_int("max_frames", self.max_frames, 0)
        if self.frame_size is not None:
            object.__setattr__(self, "frame_size", _size_pair("frame_size", self.frame_size))
        if isinstance(self.output_size, str) and self.output_size != "source":
            raise ConfigError(f"output_size={self.output_size!r} must be (width, height), 'source' or None")
        if self.output_size is not None and self.output_size != "source":
            object.__setattr__(self, "output_size", _size_pair("output_size", self.output_size))
        if self.fps is not None:
            check_number("fps", self.fps, 0, 1000, min_open=True)
        check_bool("flush", self.flush)
        check_number("join_timeout", self.join_timeout, 0, min_open=True)


def _size_pair(name: str, value: Any) -> tuple[int, int]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ConfigError(f"{name}={value!r} must be a (width, height) pair of integers")
    return (check_int(f"{name} width", value[0], 1), check_int(f"{name} height", value[1], 1))


class SinkStage:
    """Moves output frames from one slot into one sink, recording end-to-end latency."""

    def __init__(self, sink: Sink, slot: FrameSlot, metrics: RunMetrics, output_size: tuple[int, int] | None):
        self.sink = sink
        self.slot = slot
        self.metrics = metrics
        self.output_size = output_size
        self.done = False

    def step(self, stop: threading.Event, timeout: float | None = None) -> None:
        """Write at most one frame (waiting up to ``timeout`` s); sets :attr:`done` at the end marker.

        When no frame came in time (paused, or the engine is slower), a sink with an ``idle()`` method (the window:
        keys, redraw) gets that call instead.
        """
        try:
            item = self.slot.get(stop, timeout=timeout)
        except Closed:
            return
        except TimeoutError:
            idle = getattr(self.sink, "idle", None)
            if idle is not None:
                idle()
            return
        if item is END:
            self.done = True
            return
        assert isinstance(item, OutputFrame)
        image = item.image
        if self.output_size is not None:
            image = fit_frame(image, *self.output_size)
        self.sink.write(image)
        self.metrics.record_output(self.sink.name, item.captured, time.perf_counter())

    def __call__(self, stop: threading.Event) -> None:
        timeout = IDLE_INTERVAL if hasattr(self.sink, "idle") else None
        while not self.done and not stop.is_set():
            self.step(stop, timeout)


class StreamRunner:
    """One streaming run. Build, then :meth:`run` (or :meth:`start` + :meth:`wait`). Not reusable."""

    def __init__(
        self,
        engine: Engine,
        source: Source,
        sinks: Sequence[Sink],
        config: RuntimeConfig | None = None,
        controls: Controls | None = None,
    ) -> None:
        if not sinks:
            raise ConfigError("no sink given: pass at least one (e.g. a null sink)")
        self.engine = engine
        self.source = source
        self.sinks = list(sinks)
        self.config = config or RuntimeConfig()
        engine_config = getattr(engine, "config", None)
        self.controls = controls or Controls(engine_config if hasattr(engine_config, "t_index_list") else None)
        self.metrics = RunMetrics()
        size = self.config.frame_size
        if size is None and engine_config is not None:
            size = (int(engine_config.width), int(engine_config.height))
        if size is None:
            raise ConfigError("frame_size is unknown: the engine has no config; pass RuntimeConfig(frame_size=(w, h))")
        self.frame_size = size
        realtime = self.config.realtime
        self.realtime = bool(getattr(source, "realtime", False)) if realtime is None else realtime
        policy = SlotPolicy.LATEST_WINS if self.realtime else SlotPolicy.LOSSLESS
        capacity = self.config.queue_size if self.realtime else self.config.lossless_queue_size
        self.source_slot: FrameSlot = FrameSlot(capacity, policy, "source")
        self.sink_slots = [FrameSlot(capacity, policy, f"sink:{s.name}") for s in self.sinks]
        self._stop = threading.Event()
        self._threads: list[Stage] = []
        self._sink_stages = [
            SinkStage(sink, slot, self.metrics, None) for sink, slot in zip(self.sinks, self.sink_slots)
        ]
        self.output_size: tuple[int, int] | None = None
        self._main_stage: SinkStage | None = None
        self._opened: list[Any] = []
        self.summary: RunSummary | None = None
        self.error: BaseException | None = None

    # -- life cycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Open the source and sinks (errors raise here, before any thread starts) and start the threads.

        An error also sets :attr:`error` and a :attr:`summary` saying what failed to open.
        """
        where = f"opening source {self.source.name}"
        try:
            self.source.open()
            self._opened.append(self.source)
            fps = self.config.fps or getattr(self.source, "fps", None) or DEFAULT_FPS
            self.output_size = self._resolve_output_size()
            for stage in self._sink_stages:
                stage.output_size = self.output_size
            width, height = self.output_size or self.frame_size
            for sink in self.sinks:
                where = f"opening sink {sink.name}"
                sink.open(width, height, fps)
                self._opened.append(sink)
                self.metrics.add_sink(sink.name)
                if hasattr(sink, "bind"):
                    sink.bind(self.controls, self.metrics)
        except BaseException as error:
            for name, close_error in self._close_all():
                logger.error("closing sink %s failed: %s", name, close_error)
            if isinstance(error, Exception):
                self.error = error
                self.summary = self.metrics.summary({}, _describe(error, where), False)
            raise
        logger.info(
            "streaming %s -> %s at %dx%d, %s queues", self.source.name, ", ".join(s.name for s in self.sinks),
            *self.frame_size, "latest-wins" if self.realtime else "lossless",
        )
        engine_stage = EngineStage(
            self.engine, self.source_slot, self.sink_slots, self.metrics, self.controls, flush=self.config.flush
        )
        self._threads = [Stage("capture", self._capture, self._stop), Stage("engine", engine_stage, self._stop)]
        for stage in self._sink_stages:
            if getattr(stage.sink, "main_thread", False) and self._main_stage is None:
                self._main_stage = stage
            else:
                self._threads.append(Stage(f"sink-{stage.sink.name}", stage, self._stop))
        for thread in self._threads:
            thread.start()

    def _resolve_output_size(self) -> tuple[int, int] | None:
        size = self.config.output_size
        if size != "source":
            return size  # type: ignore[return-value]
        native = getattr(self.source, "size", None)
        if native is None and hasattr(self.source, "width"):
            native = (self.source.width, self.source.height)
        if native is None:
            raise ConfigError(f"output_size='source' but the size of {self.source.name} is unknown; give WxH")
        return (int(native[0]), int(native[1]))

    def stop(self) -> None:
        """End the run soon (from any thread or a signal handler); :meth:`wait` then returns."""
        self._stop.set()

    def wait(
        self,
        status_interval: float | None = None,
        on_status: Callable[[RunSummary], None] | None = None,
        raise_on_error: bool = True,
    ) -> RunSummary:
        """Serve a main-thread sink, report status every ``status_interval`` s, and return the final summary.

        Ctrl-C ends the run cleanly (``summary.interrupted``). An error in any stage, or a sink failing to close
        (a video file is finalised there), is raised after shutdown (as a :class:`StreamDiffError`) unless
        ``raise_on_error=False``; the summary, with that error, is on :attr:`summary`.
        """
        interrupted = False
        next_status = time.monotonic() + status_interval if status_interval else None
        main_error: BaseException | None = None
        try:
            while True:
                if self.controls.stop_requested:
                    self._stop.set()
                main = self._main_stage
                if main is not None and not main.done and not self._stop.is_set():
                    try:
                        main.step(self._stop, timeout=IDLE_INTERVAL)
                    except Exception as error:  # noqa: BLE001 - reported like a thread's error
                        main_error = error
                        self._stop.set()
                else:
                    alive = [t for t in self._threads if t.is_alive()]
                    if not alive:
                        break
                    alive[0].join(0.05)
                if next_status is not None and on_status is not None and time.monotonic() >= next_status:
                    next_status += status_interval
                    on_status(self.metrics.summary())
        except KeyboardInterrupt:
            interrupted = True
            logger.warning("interrupted: stopping")
        finally:
            self._stop.set()
            close_errors = self._shutdown()
        # The first failure is the run's error: the main-thread sink's, a stage's, else a sink's at close
        # (a video file is finalised there); later ones are only logged.
        failures: list[tuple[str, BaseException]] = []
        if main_error is not None and self._main_stage is not None:
            failures.append((f"sink-{self._main_stage.sink.name} stage", main_error))
        failures += [(f"{t.stage_name} stage", t.error) for t in self._threads if t.error is not None]
        failures += [(f"closing sink {name}", close_error) for name, close_error in close_errors]
        for where, later in failures[1:]:
            logger.error("%s", _describe(later, where))
        where, error = failures[0] if failures else ("", None)
        self.error = error
        depths = {slot.name: slot.max_depth for slot in [self.source_slot, *self.sink_slots]}
        self.summary = self.metrics.summary(depths, _describe(error, where), interrupted)
        if error is not None and raise_on_error:
            if isinstance(error, StreamDiffError):
                raise error
            raise StreamDiffError(_describe(error, where)) from error
        return self.summary

    def run(
        self, status_interval: float | None = None, on_status: Callable[[RunSummary], None] | None = None
    ) -> RunSummary:
        """:meth:`start` then :meth:`wait`."""
        self.start()
        return self.wait(status_interval, on_status)

    @property
    def threads(self) -> list[threading.Thread]:
        return list(self._threads)

    # -- stages -----------------------------------------------------------------------------------------------

    def _capture(self, stop: threading.Event) -> None:
        width, height = self.frame_size
        limit = self.config.max_frames
        frame_id = 0
        while not stop.is_set() and (limit is None or frame_id < limit):
            image = self.source.read()
            captured = time.perf_counter()
            if image is None:
                break
            frame = CapturedFrame(frame_id, captured, fit_frame(image, width, height))
            self.metrics.record_capture(captured)
            dropped = self.source_slot.put(frame, stop)
            self.metrics.record_drop(DropReason.SUPERSEDED, len(dropped))
            frame_id += 1
        self.source_slot.put(END, stop, force=True)

    def _shutdown(self) -> list[tuple[str, Exception]]:
        for slot in [self.source_slot, *self.sink_slots]:
            slot.wake()
        deadline = time.monotonic() + self.config.join_timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                logger.error("thread %s did not stop within %.1f s", thread.name, self.config.join_timeout)
        return self._close_all()

    def _close_all(self) -> list[tuple[str, Exception]]:
        """Close everything opened; returns the sinks whose close failed (a source's failure is only logged)."""
        failed = []
        for item in reversed(self._opened):
            try:
                item.close()
            except Exception as error:  # noqa: BLE001 - closing must reach every sink; sinks' failures are returned
                if item is self.source:
                    logger.error("closing %s failed: %s", getattr(item, "name", item), error)
                else:
                    failed.append((str(getattr(item, "name", item)), error))
        self._opened.clear()
        return failed


def _describe(error: BaseException | None, where: str) -> str | None:
    """``where: message`` for streamdiff's own errors, ``where failed: Type: message`` for others."""
    if error is None:
        return None
    text = str(error) or type(error).__name__
    if isinstance(error, StreamDiffError):
        return f"{where}: {text}"
    return f"{where} failed: {type(error).__name__}: {text}"
