"""The runner: ordering and flush, latest-wins under a slow engine, pipelined throughput, shutdown causes."""

from __future__ import annotations

import _thread
import statistics
import threading
import time

import numpy as np
import pytest

from streamdiff import SinkError, StreamDiffError
from streamdiff.io import TestPatternSource, pattern_frame
from streamdiff.runtime import RuntimeConfig, StreamRunner


def test_lossless_run_outputs_every_frame_in_order_including_the_flushed_tail(fakes) -> None:
    engine = fakes.Engine(size=32, n=3)
    sink, other = fakes.Sink("a"), fakes.Sink("b")
    summary = StreamRunner(engine, fakes.Source(size=48, frames=23), [sink, other]).run()
    assert summary.frames_in == 23 and summary.frames_out == 23 and summary.drops == {}
    assert len(sink.frames) == len(other.frames) == 23
    # Output k is 1 - input k (the fake's effect), fitted to the engine size: order is preserved through the batch.
    for k in (0, 11, 22):
        expected = 255 - _fit(pattern_frame(k, 48, 48), 32).astype(np.int16)
        assert np.abs(sink.frames[k].astype(np.int16) - expected).max() <= 1
    assert sink.opened == (32, 32, 30.0) and sink.closed and other.closed


def _fit(frame: np.ndarray, size: int) -> np.ndarray:
    from streamdiff.io import fit_frame

    return fit_frame(frame, size, size)


def test_frame_groups_are_padded_at_end_of_input(fakes) -> None:
    engine = fakes.Engine(size=32, n=2, frame_buffer_size=2)
    sink = fakes.Sink()
    summary = StreamRunner(engine, fakes.Source(size=32, frames=7), [sink]).run()
    assert summary.frames_out == 7 and len(sink.frames) == 7


def test_filter_skips_are_counted_and_repeat_the_last_output(fakes) -> None:
    """A skipped frame is not denoised (counted as a filter skip) but still leaves as the previous output."""
    engine = fakes.Engine(size=32, n=1, skip={0, 2, 3, 7})
    sink = fakes.Sink()
    summary = StreamRunner(engine, fakes.Source(size=32, frames=10), [sink]).run()
    assert summary.drops == {"filter_skip": 4} and summary.filter_skips == 4
    # step 0 has no previous output to repeat: 9 frames out, one per input after it
    assert summary.frames_out == len(sink.frames) == 9
    images = sink.frames
    assert np.array_equal(images[1], images[0]) and np.array_equal(images[2], images[0])
    assert np.array_equal(images[6], images[5]) and not np.array_equal(images[5], images[4])


def test_paced_source_with_slow_engine_is_latest_wins(fakes) -> None:
    """100 fps camera-like source, 40 ms engine: bounded queues, superseded drops, latency flat over time."""
    engine = fakes.Engine(size=32, n=1, cost=0.04)
    sink = fakes.Sink()
    source = TestPatternSource(32, 32, fps=100.0, realtime=True)
    runner = StreamRunner(engine, source, [sink], RuntimeConfig(max_frames=150))
    assert runner.realtime
    summary = runner.run()
    assert runner.source_slot.max_depth <= runner.source_slot.capacity == 1
    assert all(slot.max_depth <= 1 for slot in runner.sink_slots)
    superseded = summary.drops.get("superseded", 0)
    assert superseded > 50  # the engine takes ~1 frame in 4
    assert summary.frames_in == summary.frames_out + superseded  # nothing lost silently
    latencies = [lat for _, lat in runner.metrics.latency_series()]
    third = len(latencies) // 3
    first, last = statistics.median(latencies[:third]), statistics.median(latencies[-third:])
    # Latest wins: a frame waits at most ~one engine step before being taken, so latency does not grow.
    assert last < first + 0.02, (first, last)
    assert max(latencies) < 3 * engine.cost + 0.05


def test_throughput_is_the_slowest_stage_not_the_sum(fakes) -> None:
    """Stage costs ~10, 30, 10 ms: the run approaches 1/30 ms, far above the 1/50 ms of a serial loop."""
    frames = 40
    engine = fakes.Engine(size=32, n=1, cost=0.030)
    sink = fakes.Sink(cost=0.010)
    summary = StreamRunner(engine, fakes.Source(size=32, frames=frames, cost=0.010), [sink]).run()
    assert summary.frames_out == frames
    serial_fps = 1 / 0.050
    assert summary.fps_out > 1.25 * serial_fps, summary.fps_out  # pipelined (ideal 33.3 fps vs 20 serial)
    assert summary.fps_out < 1 / 0.030 * 1.05  # and bounded by the slowest stage


def test_controls_apply_in_the_engine_thread_between_steps(fakes) -> None:
    engine = fakes.Engine(size=32, n=1, cost=0.005)
    runner = StreamRunner(engine, fakes.Source(size=32, frames=None), [fakes.Sink()])
    runner.start()
    time.sleep(0.05)
    runner.controls.update(prompt="a new prompt")
    new_strength = runner.controls.change_strength(+0.1)
    assert runner.controls.toggle_filter() is True
    time.sleep(0.1)
    runner.controls.request_stop()
    summary = runner.wait()
    assert summary.error is None and not summary.interrupted
    assert engine.step_threads == {"streamdiff-engine"}
    thread, changes = engine.updates[0]
    assert thread == "streamdiff-engine"
    assert changes["prompt"] == "a new prompt" and changes["filter"].enabled
    assert changes["t_index_list"][0] == round((1 - new_strength) * 50)


def test_pause_holds_the_engine(fakes) -> None:
    engine = fakes.Engine(size=32, n=1)
    runner = StreamRunner(engine, fakes.Source(size=32, frames=None), [fakes.Sink()])
    runner.start()
    time.sleep(0.05)
    assert runner.controls.toggle_pause()
    time.sleep(0.1)
    steps = engine.steps
    time.sleep(0.2)
    assert engine.steps == steps  # no step while paused
    runner.controls.toggle_pause()
    time.sleep(0.1)
    assert engine.steps > steps
    runner.stop()
    runner.wait()


@pytest.mark.parametrize("where", ["source", "engine", "sink"])
def test_an_error_in_any_stage_stops_everything_and_is_raised(fakes, where: str) -> None:
    source = fakes.Source(size=32, frames=None, fail_at=5 if where == "source" else None)
    engine = fakes.Engine(size=32, n=2, fail_at=5 if where == "engine" else None)
    sink = fakes.Sink(fail_at=5 if where == "sink" else None)
    runner = StreamRunner(engine, source, [sink])
    stage = {"source": "capture", "engine": "engine", "sink": "sink-rec"}[where]
    with pytest.raises(StreamDiffError, match=f"{stage} stage failed"):
        runner.run()
    assert runner.summary is not None and runner.summary.error.startswith(stage)
    assert fakes.threads() == [] and source.closed and sink.closed


def test_a_sink_failing_at_close_fails_the_run_and_every_sink_is_still_closed(fakes) -> None:
    failing, other = fakes.Sink("bad", fail_close=True), fakes.Sink("good")
    runner = StreamRunner(fakes.Engine(size=32, n=2), fakes.Source(size=32, frames=5), [failing, other])
    with pytest.raises(StreamDiffError, match="closing sink bad failed: OSError: fake sink failure at close"):
        runner.run()
    assert runner.summary is not None and runner.summary.frames_out == 5
    assert runner.summary.error == "closing sink bad failed: OSError: fake sink failure at close"
    assert failing.closed and other.closed and len(other.frames) == 5
    # Without raising, the summary carries it.
    runner = StreamRunner(fakes.Engine(size=32), fakes.Source(size=32, frames=3), [fakes.Sink("bad", fail_close=True)])
    runner.start()
    assert runner.wait(raise_on_error=False).error.startswith("closing sink bad failed")


def test_a_sink_failing_at_open_leaves_a_summary_naming_it(fakes) -> None:
    source, first = fakes.Source(size=32), fakes.Sink("first")
    runner = StreamRunner(fakes.Engine(size=32), source, [first, fakes.Sink("bad", fail_open=True)])
    with pytest.raises(SinkError, match="fake sink bad cannot open"):
        runner.start()
    assert runner.summary is not None and runner.summary.error == "opening sink bad: fake sink bad cannot open"
    assert source.closed and first.closed and fakes.threads() == []


def test_stop_from_another_thread_ends_an_endless_run(fakes) -> None:
    runner = StreamRunner(fakes.Engine(size=32, cost=0.002), fakes.Source(size=32, frames=None), [fakes.Sink()])
    threading.Timer(0.3, runner.stop).start()
    started = time.monotonic()
    summary = runner.run()
    assert time.monotonic() - started < 2.0
    assert summary.frames_out > 0 and summary.error is None
    assert all(not t.is_alive() for t in runner.threads)


def test_ctrl_c_interrupts_cleanly(fakes) -> None:
    runner = StreamRunner(fakes.Engine(size=32, cost=0.002), fakes.Source(size=32, frames=None), [fakes.Sink()])
    threading.Timer(0.3, _thread.interrupt_main).start()
    summary = runner.run()
    assert summary.interrupted and summary.error is None
    assert all(not t.is_alive() for t in runner.threads)


def test_main_thread_sink_is_served_by_run(fakes) -> None:
    sink = fakes.Sink("window-like")
    sink.main_thread = True
    summary = StreamRunner(fakes.Engine(size=32, n=2), fakes.Source(size=32, frames=9), [sink]).run()
    assert summary.frames_out == 9
    assert len(sink.frames) == 9


class PauseScriptDisplay:
    """The window's display seam, pressing keys like a person: pause after 3 engine steps, resume after 15 key polls
    while paused, quit 3 steps after resuming. Records what it saw."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.phase = "running"
        self.polls = 0
        self.shown = 0
        self.sink = None
        self.seen: dict[str, object] = {}

    def open(self, title: str, width: int, height: int) -> None:
        pass

    def show(self, frame: np.ndarray) -> None:
        self.shown += 1

    def poll_key(self) -> int | None:
        self.polls += 1
        if self.phase == "running" and self.engine.steps >= 3:
            self.phase, self.seen["pause"] = "paused", (self.polls, self.engine.steps, self.shown)
            return ord(" ")
        if self.phase == "paused" and self.polls >= self.seen["pause"][0] + 15:
            self.phase, self.seen["resume"] = "resumed", (self.polls, self.engine.steps, self.shown)
            self.seen["overlay"] = self.sink.overlay_lines()
            return ord(" ")
        if self.phase == "resumed" and self.engine.steps >= self.seen["resume"][1] + 3:
            self.phase = "quit"
            return ord("q")
        return None

    def close(self) -> None:
        pass


def test_the_window_keeps_polling_keys_while_paused_so_pause_can_be_undone(fakes) -> None:
    from streamdiff.io import WindowSink

    engine = fakes.Engine(size=32, n=1, cost=0.002)
    display = PauseScriptDisplay(engine)
    window = WindowSink(display=display)
    display.sink = window
    source = TestPatternSource(32, 32, fps=60.0, realtime=True)
    runner = StreamRunner(engine, source, [window])
    safety = threading.Timer(10.0, runner.stop)  # without idle polling the pause would never end
    safety.start()
    try:
        summary = runner.run()
    finally:
        safety.cancel()
    assert display.phase == "quit", display.seen  # paused, resumed by a second key press, then quit by key
    assert runner.controls.stop_requested and summary.error is None
    _, steps_at_pause, shown_at_pause = display.seen["pause"]
    _, steps_at_resume, shown_at_resume = display.seen["resume"]
    assert steps_at_resume - steps_at_pause <= 1  # the engine took no frame while paused (one may have been inside)
    assert shown_at_resume - shown_at_pause >= 10  # the last frame was redrawn while paused
    assert "PAUSED" in display.seen["overlay"][-1]
    assert engine.steps >= steps_at_resume + 3


def test_a_sink_in_its_own_thread_is_idled_while_paused(fakes) -> None:
    class IdleSink(fakes.Sink):
        idles = 0

        def idle(self) -> None:
            self.idles += 1

    sink = IdleSink()
    runner = StreamRunner(fakes.Engine(size=32), fakes.Source(size=32, frames=None), [sink])
    runner.start()
    time.sleep(0.05)
    runner.controls.toggle_pause()
    time.sleep(0.05)
    before = sink.idles
    time.sleep(0.3)
    runner.stop()
    runner.wait()
    assert sink.idles - before >= 5  # every ~20 ms without a frame
