"""The runner on the real engine and tiny model: order and flush, latest-wins under a slow model, pipelining,
live controls (including changes of size and frame_buffer_size), pause, and every way a run ends."""

from __future__ import annotations

import _thread
import signal
import statistics
import threading
import time

import numpy as np
import pytest

from streamdiff import ConfigError, PromptConfig, SinkError, StreamDiffError, StreamPipeline
from streamdiff.io import TestPatternSource, fit_frame, pattern_frame
from streamdiff.runtime import RuntimeConfig, StreamRunner

PROMPT = PromptConfig("a watercolor portrait", seed=3)


def runner_for(kit, engine, source, sinks, runtime=None, **config_changes) -> StreamRunner:
    return StreamRunner(engine, source, sinks, runtime, stream_config=kit.stream_config(**config_changes),
                        prompt=PROMPT)


def test_lossless_run_outputs_every_frame_in_order_including_the_flushed_tail(kit) -> None:
    sink, other = kit.Sink("a"), kit.Sink("b")
    summary = runner_for(kit, kit.engine(), kit.Source(size=96, frames=13), [sink, other], n=3).run()
    assert summary.frames_in == 13 and summary.frames_out == 13 and summary.drops == {}
    assert len(sink.frames) == len(other.frames) == 13
    assert sink.opened == (64, 64, 30.0) and sink.closed and other.closed
    # Frame k equals what a single-stream pipeline makes of input k: order is kept through the Stream Batch.
    pipe = StreamPipeline(kit.model, kit.stream_config(n=3))
    pipe.prepare(PROMPT.prompt, seed=PROMPT.seed)
    expected = [pipe(fit_frame(pattern_frame(k, 96, 96), 64, 64)) for k in range(13)]
    expected = [e for e in expected if e is not None] + [o.frames()[0] for o in pipe.flush()]
    for k in (0, 6, 12):
        assert np.abs(sink.frames[k].astype(int) - expected[k].astype(int)).max() <= 1, k


def test_frame_groups_are_padded_at_end_of_input(kit) -> None:
    sink = kit.Sink()
    summary = runner_for(kit, kit.engine(), kit.Source(frames=7), [sink], f=2).run()
    assert summary.frames_out == 7 and len(sink.frames) == 7


def test_filter_skips_are_counted_and_repeat_the_last_output(kit) -> None:
    """A still picture with the filter on: skipped frames are not denoised but still leave, as the last output."""

    class Still(kit.Source):
        def read(self):
            frame = super().read()
            return None if frame is None else pattern_frame(0, self.size, self.size)

    sink = kit.Sink()
    filter_config = {"enabled": True, "threshold": 0.5, "max_skip_frames": 3}
    runner = runner_for(kit, kit.engine(), Still(frames=16), [sink], n=1, filter=filter_config)
    summary = runner.run()
    skips = summary.drops["filter_skip"]
    assert skips == summary.filter_skips and 8 <= skips <= 12  # at most 3 in a row
    assert summary.frames_out == len(sink.frames) == 16
    assert runner.stream.stats.unet_calls == 16 - skips
    assert all(np.array_equal(frame, sink.frames[0]) for frame in sink.frames)


def test_paced_source_with_a_slow_model_is_latest_wins(kit) -> None:
    """100 fps camera-like source, ~40 ms model: bounded queues, superseded drops, latency flat over time."""
    engine = kit.engine(cost=0.04)
    sink = kit.Sink()
    source = TestPatternSource(64, 64, fps=100.0, realtime=True)
    runner = runner_for(kit, engine, source, [sink], RuntimeConfig(max_frames=150), n=1)
    assert runner.realtime
    summary = runner.run()
    assert all(slot.max_depth <= 1 for slot in runner.sink_slots)
    superseded = summary.drops.get("superseded", 0)
    assert superseded > 50  # the engine takes ~1 frame in 4
    assert summary.frames_in == summary.frames_out + superseded  # nothing lost silently
    latencies = [lat for _, lat in runner.metrics.latency_series()]
    third = len(latencies) // 3
    first, last = statistics.median(latencies[:third]), statistics.median(latencies[-third:])
    # Latest wins: a frame waits at most ~one engine step before being taken, so latency does not grow.
    assert last < first + 0.03, (first, last)


def test_throughput_is_the_slowest_stage_not_the_sum(kit) -> None:
    """Source, engine and sink each cost about the same time c: pipelined, the run approaches 1/c, three times the
    rate of a serial loop (1/3c)."""
    engine = kit.engine(cost=0.02)
    stream = engine.open_stream(kit.stream_config(n=1))
    times = []
    for k in range(8):
        started = time.perf_counter()
        engine.step({stream: pattern_frame(k, 64, 64)})
        times.append(time.perf_counter() - started)
    stream.close()
    cost = statistics.median(times[2:])  # the engine's time per frame, the slow U-Net included
    frames = 30
    summary = runner_for(kit, engine, kit.Source(frames=frames, cost=cost), [kit.Sink(cost=cost)], n=1).run()
    assert summary.frames_out == frames
    serial_fps = 1 / (3 * cost)
    assert summary.fps_out > 1.6 * serial_fps, (summary.fps_out, cost)


def test_controls_change_the_stream_live_and_invalid_changes_raise_in_the_caller(kit) -> None:
    engine = kit.engine(cost=0.005)
    runner = runner_for(kit, engine, kit.Source(frames=None), [kit.Sink()])
    runner.start()
    time.sleep(0.1)
    runner.controls.update(prompt="a new prompt")
    new_strength = runner.controls.change_strength(+0.1)
    assert runner.controls.toggle_filter() is True
    with pytest.raises(ConfigError, match="guidance_scale=-1 is outside"):
        runner.controls.update(guidance_scale=-1)
    deadline = time.monotonic() + 5
    while runner.stream.state.version < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    out_before = runner.stream.stats.frames_out
    time.sleep(0.2)
    runner.controls.request_stop()
    summary = runner.wait()
    assert summary.error is None and not summary.interrupted
    state = runner.stream.state
    assert state.prompt.prompt == "a new prompt" and state.config.filter.enabled
    assert state.config.t_index_list[0] == round((1 - new_strength) * 50)
    assert runner.stream.stats.frames_out > out_before  # still producing after the refused change
    assert engine.unet.threads == {"streamdiff-engine"}


def test_live_size_and_frame_buffer_changes_keep_the_run_alive(kit) -> None:
    """F 1 → 2 → 1 and 64 → 96 px while frames flow: no crash, frames keep coming, sinks keep their size."""
    engine = kit.engine(cost=0.002)
    sink = kit.Sink()
    runner = runner_for(kit, engine, kit.Source(size=80, frames=None), [sink])
    runner.start()
    seen = []
    for change in (dict(frame_buffer_size=2), dict(width=96, height=96), dict(frame_buffer_size=1, cfg_type="full"),
                   dict(width=64, height=64, t_index_list=(10, 25, 40))):
        count = len(sink.frames)
        runner.controls.update(**change)
        deadline = time.monotonic() + 10
        while len(sink.frames) < count + 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        seen.append((runner.stream.state.config.frame_buffer_size, runner.stream.state.config.width))
        assert len(sink.frames) >= count + 6, change
    runner.stop()
    summary = runner.wait()
    assert summary.error is None
    assert seen == [(2, 64), (2, 96), (1, 96), (1, 64)]
    assert {frame.shape for frame in sink.frames} == {(64, 64, 3)}  # fitted to the size the sink opened with
    assert summary.drops.get("reconfigure", 0) == runner.stream.stats.dropped_on_reconfigure > 0


def test_pause_holds_the_stream(kit) -> None:
    engine = kit.engine()
    runner = runner_for(kit, engine, kit.Source(frames=None), [kit.Sink()])
    runner.start()
    time.sleep(0.1)
    assert runner.controls.toggle_pause()
    time.sleep(0.15)
    frames = runner.stream.stats.frames_in
    time.sleep(0.2)
    assert runner.stream.stats.frames_in == frames  # nothing taken while paused
    runner.controls.toggle_pause()
    time.sleep(0.2)
    assert runner.stream.stats.frames_in > frames
    runner.stop()
    runner.wait()


@pytest.mark.parametrize("where", ["source", "engine", "sink"])
def test_an_error_in_any_stage_stops_everything_and_is_raised(kit, where: str) -> None:
    source = kit.Source(frames=None, fail_at=5 if where == "source" else None)
    engine = kit.engine(fail_at=5 if where == "engine" else None)
    sink = kit.Sink(fail_at=5 if where == "sink" else None)
    runner = runner_for(kit, engine, source, [sink])
    stage = {"source": "capture", "engine": "engine", "sink": "sink-rec"}[where]
    with pytest.raises(StreamDiffError, match=f"{stage} stage"):
        runner.run()
    assert runner.summary is not None and runner.summary.error.startswith(stage)
    if where == "engine":
        assert "U-Net failure at call 5" in runner.summary.error
    assert source.closed and sink.closed


def test_stop_from_another_thread_ends_an_endless_run(kit) -> None:
    runner = runner_for(kit, kit.engine(), kit.Source(frames=None), [kit.Sink()])
    threading.Timer(0.5, runner.stop).start()
    started = time.monotonic()
    summary = runner.run()
    assert time.monotonic() - started < 3.0
    assert summary.frames_out > 0 and summary.error is None
    assert all(not t.is_alive() for t in runner.threads)


def test_ctrl_c_interrupts_cleanly(kit) -> None:
    runner = runner_for(kit, kit.engine(), kit.Source(frames=None), [kit.Sink()])
    # Python raises KeyboardInterrupt on SIGINT only where SIGINT was not ignored when it started (a job started in
    # the background of a non-interactive shell has it ignored, and interrupt_main would then do nothing).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Timer(0.5, _thread.interrupt_main).start()
    try:
        summary = runner.run()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert summary.interrupted and summary.error is None
    assert all(not t.is_alive() for t in runner.threads)


def test_main_thread_sink_is_served_by_run(kit) -> None:
    sink = kit.Sink("window-like")
    sink.main_thread = True
    summary = runner_for(kit, kit.engine(), kit.Source(frames=9), [sink]).run()
    assert summary.frames_out == 9 and len(sink.frames) == 9


def test_a_runner_opens_its_stream_beside_others_on_a_shared_engine(kit, tiny_model) -> None:
    """Two runs on one started engine: each gets its own frames, in one batched call per tick."""
    from streamdiff import StreamEngine
    from streamdiff.engine import EngineConfig

    engine = StreamEngine(tiny_model, EngineConfig(max_streams=2)).start()
    try:
        sinks = [kit.Sink("one"), kit.Sink("two")]
        runners = [StreamRunner(engine, kit.Source(frames=12), [sink], stream_config=kit.stream_config(),
                                prompt=PromptConfig(prompt, seed=seed))
                   for sink, prompt, seed in zip(sinks, ("a fox", "a cat"), (1, 2))]
        for runner in runners:
            runner.start()
        summaries = [runner.wait() for runner in runners]
    finally:
        engine.stop()
    assert [s.frames_out for s in summaries] == [12, 12]
    assert not np.array_equal(sinks[0].frames[5], sinks[1].frames[5])


def test_a_sink_failing_at_close_fails_the_run_and_every_sink_is_still_closed(kit) -> None:
    failing, other = kit.Sink("bad", fail_close=True), kit.Sink("good")
    runner = runner_for(kit, kit.engine(), kit.Source(frames=5), [failing, other])
    with pytest.raises(StreamDiffError, match="closing sink bad failed: OSError: fake sink failure at close"):
        runner.run()
    assert runner.summary is not None and runner.summary.frames_out == 5
    assert runner.summary.error == "closing sink bad failed: OSError: fake sink failure at close"
    assert failing.closed and other.closed and len(other.frames) == 5
    # Without raising, the summary carries it.
    runner = runner_for(kit, kit.engine(), kit.Source(frames=3), [kit.Sink("bad", fail_close=True)])
    runner.start()
    assert runner.wait(raise_on_error=False).error.startswith("closing sink bad failed")


def test_a_sink_failing_at_open_leaves_a_summary_naming_it(kit) -> None:
    source, first = kit.Source(), kit.Sink("first")
    runner = runner_for(kit, kit.engine(), source, [first, kit.Sink("bad", fail_open=True)])
    with pytest.raises(SinkError, match="fake sink bad cannot open"):
        runner.start()
    assert runner.summary is not None and runner.summary.error == "opening sink bad: fake sink bad cannot open"
    assert source.closed and first.closed and kit.threads() == []


class PauseScriptDisplay:
    """The window's display seam, pressing keys like a person: pause after 3 frames in, resume after 15 key polls
    while paused, quit 3 frames after resuming. Records what it saw."""

    def __init__(self, runner_box: list) -> None:
        self.runner_box = runner_box
        self.phase = "running"
        self.polls = 0
        self.shown = 0
        self.sink = None
        self.seen: dict[str, object] = {}

    def frames_in(self) -> int:
        runner = self.runner_box[0]
        return 0 if runner.stream is None else runner.stream.stats.frames_in

    def open(self, title: str, width: int, height: int) -> None:
        pass

    def show(self, frame: np.ndarray) -> None:
        self.shown += 1

    def poll_key(self) -> int | None:
        self.polls += 1
        frames = self.frames_in()
        if self.phase == "running" and frames >= 3:
            self.phase, self.seen["pause"] = "paused", (self.polls, frames, self.shown)
            return ord(" ")
        if self.phase == "paused" and self.polls >= self.seen["pause"][0] + 15:
            self.phase, self.seen["resume"] = "resumed", (self.polls, frames, self.shown)
            self.seen["overlay"] = self.sink.overlay_lines()
            return ord(" ")
        if self.phase == "resumed" and frames >= self.seen["resume"][1] + 3:
            self.phase = "quit"
            return ord("q")
        return None

    def close(self) -> None:
        pass


def test_the_window_keeps_polling_keys_while_paused_so_pause_can_be_undone(kit) -> None:
    from streamdiff.io import WindowSink

    box: list = []
    display = PauseScriptDisplay(box)
    window = WindowSink(display=display)
    display.sink = window
    source = TestPatternSource(64, 64, fps=60.0, realtime=True)
    runner = runner_for(kit, kit.engine(cost=0.002), source, [window])
    box.append(runner)
    safety = threading.Timer(20.0, runner.stop)  # without idle polling the pause would never end
    safety.start()
    try:
        summary = runner.run()
    finally:
        safety.cancel()
    assert display.phase == "quit", display.seen  # paused, resumed by a second key press, then quit by key
    assert runner.controls.stop_requested and summary.error is None
    _, frames_at_pause, shown_at_pause = display.seen["pause"]
    _, frames_at_resume, shown_at_resume = display.seen["resume"]
    # The engine took no new frame while paused: at most the one queued and the one being captured at the key press.
    assert frames_at_resume - frames_at_pause <= 2
    assert shown_at_resume - shown_at_pause >= 10  # the last frame was redrawn while paused
    assert "PAUSED" in display.seen["overlay"][-1]


def test_a_sink_in_its_own_thread_is_idled_while_paused(kit) -> None:
    class IdleSink(kit.Sink):
        idles = 0

        def idle(self) -> None:
            self.idles += 1

    sink = IdleSink()
    runner = runner_for(kit, kit.engine(), kit.Source(frames=None), [sink])
    runner.start()
    time.sleep(0.1)
    runner.controls.toggle_pause()
    time.sleep(0.1)
    before = sink.idles
    time.sleep(0.3)
    runner.stop()
    runner.wait()
    assert sink.idles - before >= 5  # every ~20 ms without a frame
