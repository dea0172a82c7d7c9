"""Run one stream: source → capture thread → engine (its own worker) → output thread → slots → sink threads.

Typical use::

    engine = StreamEngine.from_pretrained("tiny")
    runner = StreamRunner(engine, open_source("testpattern"), [open_sink("file:out.mp4")],
                          stream_config=StreamConfig(width=256, height=256), prompt=PromptConfig("a watercolor"))
    summary = runner.run(status_interval=2.0, on_status=print)   # returns at end of input, on stop() or Ctrl-C

The runner opens its stream on ``engine`` — a :class:`~streamdiff.engine.StreamEngine` (started if it is not
running) or anything with the same ``open_stream`` (the WebSocket client's remote engine) — and every stage runs in
its own thread (a sink that must live on the main thread, such as a window, is served by :meth:`StreamRunner.run`
itself), so throughput is that of the slowest stage, not the sum. With a real-time source the stream and the sink
queues are latest-wins (the engine always takes the newest frame; drops are counted); otherwise they are lossless
with back-pressure and nothing is dropped. The stream resizes frames to its current size, so a live change of size
or frame_buffer_size (through :class:`~.controls.Controls`) just works; sinks get frames at the size they opened
with. Shutdown — end of input, :meth:`stop`, a control's quit, Ctrl-C or an error in any stage — sets one event
that every wait watches, then all threads are joined.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Protocol, Sequence

import numpy as np

from ..config import PromptConfig, StreamConfig, check_bool, check_int, check_number
from ..errors import ConfigError, StreamClosed, StreamDiffError
from ..core.image import fit_frame
from .controls import Controls
from .metrics import DropReason, RunMetrics, RunSummary
from .slots import Closed, FrameSlot, SlotPolicy
from .stages import END, OutputFrame, Stage

logger = logging.getLogger(__name__)

DEFAULT_FPS = 30.0
OUTPUT_POLL = 0.05  # seconds the output thread waits for the engine before looking at the stop event again
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
    """A frame sink (see :mod:`streamdiff.io.sinks`). Optional: ``bind(controls, metrics)``, ``main_thread``."""

    name: str

    def open(self, width: int, height: int, fps: float) -> None: ...

    def write(self, frame: np.ndarray) -> None: ...

    def close(self) -> None: ...


class StreamEngineLike(Protocol):
    """What the runner opens its stream on: a StreamEngine, or the client's remote engine."""

    def open_stream(self, config: StreamConfig, prompt: str = "", *args: Any, **kwargs: Any) -> Any: ...


class CaptureId(NamedTuple):
    """The frame id the runner gives the engine: the running index and the capture time (``perf_counter``)."""

    index: int
    captured: float


@dataclass(frozen=True)
class RuntimeConfig:
    """How frames move between the stages.

    ``realtime``: latest-wins queues (None: follow ``source.realtime``). ``queue_size``: capacity of latest-wins
    slots; ``lossless_queue_size`` of lossless ones. ``max_frames``: stop reading after that many. ``output_size``:
    what sinks receive (default the stream's size at start; ``"source"``: the source's native size, scaling the output
    back). ``fps``: the sinks' frame rate (default the source's, else 30). ``flush``: at end of input, run the frames
    still inside the Stream Batch out.
    """

    realtime: bool | None = None
    queue_size: int = 1
    lossless_queue_size: int = 4
    max_frames: int | None = None
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
    """Moves output frames from one slot into one sink (at the size it opened with), recording latency."""

    def __init__(self, sink: Sink, slot: FrameSlot, metrics: RunMetrics) -> None:
        self.sink = sink
        self.slot = slot
        self.metrics = metrics
        self.size: tuple[int, int] | None = None
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
        assert isinstance(item, OutputFrame) and self.size is not None
        self.sink.write(fit_frame(item.image, *self.size))
        self.metrics.record_output(self.sink.name, item.captured, time.perf_counter())

    def __call__(self, stop: threading.Event) -> None:
        timeout = IDLE_INTERVAL if hasattr(self.sink, "idle") else None
        while not self.done and not stop.is_set():
            self.step(stop, timeout)


class StreamRunner:
    """One streaming run. Build, then :meth:`run` (or :meth:`start` + :meth:`wait`). Not reusable."""

    def __init__(
        self,
        engine: StreamEngineLike,
        source: Source,
        sinks: Sequence[Sink],
        config: RuntimeConfig | None = None,
        *,
        stream_config: StreamConfig,
        prompt: PromptConfig | None = None,
        controls: Controls | None = None,
    ) -> None:
        if not sinks:
            raise ConfigError("no sink given: pass at least one (e.g. a null sink)")
        self.engine = engine
        self.source = source
        self.sinks = list(sinks)
        self.config = config or RuntimeConfig()
        self.stream_config = stream_config
        self.prompt = prompt or PromptConfig()
        self.controls = controls or Controls()
        self.metrics = RunMetrics()
        realtime = self.config.realtime
        self.realtime = bool(getattr(source, "realtime", False)) if realtime is None else realtime
        policy = SlotPolicy.LATEST_WINS if self.realtime else SlotPolicy.LOSSLESS
        capacity = self.config.queue_size if self.realtime else self.config.lossless_queue_size
        self.sink_slots = [FrameSlot(capacity, policy, f"sink:{s.name}") for s in self.sinks]
        self.stream: Any = None
        self._stop = threading.Event()
        self._threads: list[Stage] = []
        self._sink_stages = [SinkStage(sink, slot, self.metrics) for sink, slot in zip(self.sinks, self.sink_slots)]
        self.output_size: tuple[int, int] | None = None
        self._main_stage: SinkStage | None = None
        self._opened: list[Any] = []
        self._started_engine = False
        self.summary: RunSummary | None = None
        self.error: BaseException | None = None

    # -- life cycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Open the source, the sinks and the stream (errors raise here, before any thread starts); start threads.

        An error also sets :attr:`error` and a :attr:`summary` saying what failed to open.
        """
        where = f"opening source {self.source.name}"
        try:
            self.source.open()
            self._opened.append(self.source)
            fps = self.config.fps or getattr(self.source, "fps", None) or DEFAULT_FPS
            self.output_size = self._resolve_output_size() or (self.stream_config.width, self.stream_config.height)
            for stage in self._sink_stages:
                stage.size = self.output_size
            for sink in self.sinks:
                where = f"opening sink {sink.name}"
                sink.open(*self.output_size, fps)
                self._opened.append(sink)
                self.metrics.add_sink(sink.name)
                if hasattr(sink, "bind"):
                    sink.bind(self.controls, self.metrics)
            where = "opening the stream"
            self._open_stream()
        except BaseException as error:
            for name, close_error in self._close_all():
                logger.error("closing sink %s failed: %s", name, close_error)
            if isinstance(error, Exception):
                self.error = error
                self.summary = self.metrics.summary({}, _describe(error, where), False)
            raise
        logger.info(
            "streaming %s -> %s at %dx%d, %s queues", self.source.name, ", ".join(s.name for s in self.sinks),
            self.stream_config.width, self.stream_config.height, "latest-wins" if self.realtime else "lossless",
        )
        self._threads = [Stage("capture", self._capture, self._stop), Stage("output", self._output, self._stop)]
        for stage in self._sink_stages:
            if getattr(stage.sink, "main_thread", False) and self._main_stage is None:
                self._main_stage = stage
            else:
                self._threads.append(Stage(f"sink-{stage.sink.name}", stage, self._stop))
        for thread in self._threads:
            thread.start()

    def _open_stream(self) -> None:
        p = self.prompt
        image_prompt = ({} if p.reference_image is None else
                        {"reference_image": p.reference_image, "ip_adapter_scale": p.ip_adapter_scale})
        self.stream = self.engine.open_stream(
            self.stream_config, p.prompt, p.negative_prompt, p.guidance_scale, p.delta, p.seed,
            lossless=not self.realtime, name="run", **image_prompt,
            **({"controlnets": p.controlnets} if p.controlnets else {}),
        )
        self._opened.append(self.stream)
        self.controls.bind(self.stream)
        if hasattr(self.engine, "start") and not getattr(self.engine, "running", True):
            self.engine.start()
            self._started_engine = True

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

        Ctrl-C ends the run cleanly (``summary.interrupted``). An error in any stage, in the stream's engine work, or
        a sink failing to close (a video file is finalised there) is raised after shutdown (as a
        :class:`StreamDiffError`) unless ``raise_on_error=False``; the summary, with that error, is on :attr:`summary`.
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
                    on_status(self._summary())
        except KeyboardInterrupt:
            interrupted = True
            logger.warning("interrupted: stopping")
        finally:
            self._stop.set()
            close_errors = self._shutdown()
        # The first failure is the run's error: the main-thread sink's, a stage's, the stream's engine work, else a
        # sink's at close (a video file is finalised there); later ones are only logged.
        failures: list[tuple[str, BaseException]] = []
        if main_error is not None and self._main_stage is not None:
            failures.append((f"sink-{self._main_stage.sink.name} stage", main_error))
        failures += [(f"{t.stage_name} stage", t.error) for t in self._threads if t.error is not None]
        stream_error = getattr(self.stream, "error", None)
        if stream_error is not None:
            failures.append(("engine stage", stream_error))
        failures += [(f"closing sink {name}", close_error) for name, close_error in close_errors]
        for where, later in failures[1:]:
            logger.error("%s", _describe(later, where))
        where, error = failures[0] if failures else ("", None)
        self.error = error
        self.summary = self._summary(_describe(error, where), interrupted)
        if error is not None and raise_on_error:
            if isinstance(error, StreamDiffError):
                raise type(error)(_describe(error, where)) from error
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

    def _summary(self, error: str | None = None, interrupted: bool = False) -> RunSummary:
        stats = getattr(self.stream, "stats", None)
        engine_drops = {}
        if stats is not None:
            engine_drops = {
                DropReason.SUPERSEDED: stats.dropped_inputs + getattr(self.stream, "dropped_outputs", 0),
                DropReason.RECONFIGURE: stats.dropped_on_reconfigure,
            }
        depths = {slot.name: slot.max_depth for slot in self.sink_slots}
        return self.metrics.summary(depths, error, interrupted, extra_drops=engine_drops)

    # -- stages -----------------------------------------------------------------------------------------------

    def _capture(self, stop: threading.Event) -> None:
        limit = self.config.max_frames
        index = 0
        while not stop.is_set() and (limit is None or index < limit):
            if self.controls.paused:
                self.controls.wait_unpaused(OUTPUT_POLL)
                continue
            image = self.source.read()
            captured = time.perf_counter()
            if image is None:
                break
            self.metrics.record_capture(captured)
            self._submit(image, CaptureId(index, captured), stop)
            index += 1
        if stop.is_set():
            return
        if self.config.flush:
            self.stream.end_input()
        else:
            self.stream.close()

    def _submit(self, image: np.ndarray, frame_id: CaptureId, stop: threading.Event) -> None:
        """Hand one frame to the stream; a lossless stream's wait for room watches ``stop``."""
        while not stop.is_set():
            try:
                self.stream.submit(image, frame_id, timeout=OUTPUT_POLL if not self.realtime else None)
                return
            except TimeoutError:
                continue
            except StreamClosed:
                if stop.is_set():  # closed by the shutdown itself
                    return
                if getattr(self.stream, "error", None) is None:
                    raise
                stop.set()  # the engine ended the stream with an error: wait() reports it
                return

    def _output(self, stop: threading.Event) -> None:
        """Engine outputs → every sink's slot; the end of the stream → the end marker."""
        while not stop.is_set():
            try:
                out = self.stream.get(timeout=OUTPUT_POLL)
            except TimeoutError:
                continue
            if out is None:
                break
            if out.skipped:  # not denoised; leaves as the previous output, held (none before the first output)
                self.metrics.record_drop(DropReason.FILTER_SKIP, len(out.frame_ids))
            if out.images is None:
                continue
            for frame_id, image in zip(out.frame_ids, out.frames()):
                message = OutputFrame(frame_id.index, frame_id.captured, image)
                for slot in self.sink_slots:
                    dropped = slot.put(message, stop)
                    self.metrics.record_drop(DropReason.SUPERSEDED, len(dropped))
        if stop.is_set():
            return
        if getattr(self.stream, "error", None) is not None:
            stop.set()  # the engine ended the stream with an error: wait() reports it
            return
        for slot in self.sink_slots:
            slot.put(END, stop, force=True)

    def _shutdown(self) -> list[tuple[str, Exception]]:
        if self.stream is not None and not getattr(self.stream, "finished", True):
            self.stream.close()
        for slot in self.sink_slots:
            slot.wake()
        deadline = time.monotonic() + self.config.join_timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                logger.error("thread %s did not stop within %.1f s", thread.name, self.config.join_timeout)
        if self._started_engine:
            self.engine.stop()
        return self._close_all()

    def _close_all(self) -> list[tuple[str, Exception]]:
        """Close everything opened; returns the sinks whose close failed (a source's failure is only logged)."""
        failed = []
        for item in reversed(self._opened):
            try:
                item.close()
            except Exception as error:  # noqa: BLE001 - closing must reach every sink; sinks' failures are returned
                if item in self.sinks:
                    failed.append((str(getattr(item, "name", item)), error))
                else:
                    logger.error("closing %s failed: %s", getattr(item, "name", item), error)
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
