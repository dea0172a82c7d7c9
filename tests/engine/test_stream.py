"""Stream handles from many client threads against the engine's worker (real tiny model, CPU): the input queue keeps
settings whole, accounts for every frame, wakes blocked submitters, and coalesces pending changes."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from streamdiff import StreamClosed, StreamConfig, StreamEngine, StreamPipeline
from streamdiff.engine import EngineConfig

SIZE = 64
TOLERANCE = 1e-4  # float32, max abs in [0, 1]
# One step, F = 1, no filter: an output depends on its frame and its settings only, so each can be checked alone.
CONFIG = StreamConfig(width=SIZE, height=SIZE, t_index_list=(25,), cfg_type="self")
A = dict(prompt="a watercolor", seed=1, guidance_scale=1.5, delta=0.9)
B = dict(prompt="an oil painting", seed=2, guidance_scale=2.5, delta=0.5)


def golden(model, settings: dict, frames: list[np.ndarray]) -> list[torch.Tensor]:
    """What a single-stream pipeline makes of each frame with ``settings``."""
    pipe = StreamPipeline(model, CONFIG)
    pipe.prepare(**settings)
    return [pipe.step(torch.from_numpy(x).permute(2, 0, 1)[None].float() / 255).images for x in frames]


def settings_of(version: int) -> str:
    """The flipping clients below request B at odd versions and A at even ones (A is version 0)."""
    return "b" if version % 2 else "a"


def test_many_client_threads_never_mix_settings_and_account_for_every_frame(tiny_model, frames) -> None:
    """Three streams, each fed by its own thread while another thread flips its settings A ↔ B; a fourth stream is
    closed from a third thread while its lossless submit waits for room. Every output is exactly the golden image of
    its frame under the settings of the version it carries; every frame is either output or counted as dropped."""
    expected = {"a": golden(tiny_model, A, frames), "b": golden(tiny_model, B, frames)}
    engine = StreamEngine(tiny_model, EngineConfig(max_streams=4, max_batch_rows=8)).start()
    lossless = [engine.open_stream(CONFIG, lossless=True, output_capacity=64, **A) for _ in range(2)]
    realtime_outputs: list = []
    realtime = engine.open_stream(CONFIG, on_output=lambda s, o: realtime_outputs.append(o), **A)
    blocked = engine.open_stream(CONFIG, lossless=True, input_capacity=1, output_capacity=1, **A)
    streams = [*lossless, realtime]
    offset = {s: i for i, s in enumerate(streams)}  # each stream sees other frames: a swapped output shows
    count = 40
    stop_flipping = threading.Event()
    failures: list[BaseException] = []

    def feed(stream) -> None:
        for i in range(count):
            stream.submit(frames[(i + offset[stream]) % 8], frame_id=i, timeout=60)
        stream.end_input()

    def flip(stream) -> None:
        turn = 0
        while not stop_flipping.is_set() and not stream.closed:
            try:
                stream.update(**(B if turn % 2 == 0 else A))
            except StreamClosed:
                return  # it ended meanwhile
            turn += 1

    def block() -> None:
        try:
            while True:  # nobody reads: once its queues are full, a submit waits for room until the close
                blocked.submit(frames[0], timeout=60)
        except StreamClosed:
            return
        except BaseException as error:  # noqa: BLE001 - reported below
            failures.append(error)

    blocker = threading.Thread(target=block)
    threads = [threading.Thread(target=feed, args=(s,)) for s in streams]
    threads += [threading.Thread(target=flip, args=(s,)) for s in streams]
    for thread in [blocker, *threads]:
        thread.start()
    try:
        got = {s: [] for s in lossless}
        for stream in lossless:
            while (out := stream.get(timeout=60)) is not None:
                got[stream].append(out)
        blocked.close()  # from this thread, while the blocker waits
        blocker.join(30)
        stop_flipping.set()
        for thread in threads:
            thread.join(30)
        realtime.get(timeout=60)
        assert realtime.finished
    finally:
        stop_flipping.set()
        engine.stop()
    assert not blocker.is_alive() and failures == [] and blocked.finished and blocked.error is None
    for stream in streams:
        outs = got.get(stream, realtime_outputs)
        for out in outs:
            assert out.images is not None and len(out.frame_ids) == 1
            i = out.frame_ids[0]
            error = float((out.images - expected[settings_of(out.version)][(i + offset[stream]) % 8]).abs().max())
            assert error <= TOLERANCE, (stream.name, i, out.version, error)
        ids = [out.frame_ids[0] for out in outs]
        assert ids == sorted(set(ids))  # in order, none twice
        stats = stream.stats
        assert stats.frames_out == len(ids) and stats.frames_out + stats.dropped_inputs == count, (stream.name, stats)
        assert stream.error is None and outs and outs[-1].frame_ids == (count - 1,)  # the newest frame always runs
    for stream in lossless:  # nothing dropped; both settings really ran
        assert len(got[stream]) == count and {settings_of(o.version) for o in got[stream]} == {"a", "b"}


def test_changes_queued_between_two_ticks_apply_once_all_at_once(tiny_model, frames) -> None:
    """Three updates before a tick: the state is untouched until the tick, then only the newest applies (the
    first prompt is never encoded) and the output is exactly what the final settings make alone."""
    engine = StreamEngine(tiny_model, EngineConfig(max_streams=1))
    stream = engine.open_stream(CONFIG, **A)
    first = engine.step({stream: frames[0]})[stream]
    assert first.version == 0
    calls = engine.prompts.encoder_calls
    assert stream.update(prompt="never encoded") == 1
    assert stream.update(prompt=B["prompt"], seed=B["seed"]) == 2
    assert stream.update(guidance_scale=B["guidance_scale"], delta=B["delta"]) == 3
    assert stream.state.version == 0 and stream.state.prompt.prompt == A["prompt"]  # nothing applied yet
    assert stream.config == CONFIG and stream.prompt.prompt == B["prompt"] and stream.version == 3  # requested
    out = engine.step({stream: frames[1]})[stream]
    assert engine.prompts.encoder_calls == calls + 1
    assert out.version == 3 and stream.state.version == 3 and stream.state.prompt == stream.prompt
    assert float((out.images - golden(tiny_model, B, [frames[1]])[0]).abs().max()) <= TOLERANCE


def test_a_stream_closed_before_its_first_tick_never_runs(tiny_model, frames) -> None:
    engine = StreamEngine(tiny_model, EngineConfig(max_streams=1))
    stream = engine.open_stream(CONFIG, **A)
    stream.submit(frames[0])
    stream.close()
    assert engine.step({}) == {} and stream.finished and stream.state is None
    assert engine.streams == [] and stream.get(timeout=1) is None
    with pytest.raises(StreamClosed, match="stream-1 is closed"):
        stream.update(prompt="late")


class BrokenUNet:
    """A U-Net engine that always fails (standing for a stream whose work breaks the model call)."""

    def __call__(self, sample, timestep, encoder_hidden_states):
        raise RuntimeError("broken U-Net")


def test_a_submit_refused_because_the_engine_failed_the_stream_sees_the_error(tiny_model, frames) -> None:
    engine = StreamEngine(tiny_model, EngineConfig(max_streams=1), unet=BrokenUNet()).start()
    stream = engine.open_stream(CONFIG, lossless=True, input_capacity=1, **A)
    try:
        with pytest.raises(StreamClosed) as refused:
            for i in range(1000):  # the first frame fails the stream; a later submit is refused
                stream.submit(frames[i % 8], timeout=30)
        seen = stream.error
    finally:
        engine.stop()
    assert isinstance(seen, RuntimeError) and "stream-1 is closed: broken U-Net" in str(refused.value)
    assert stream.finished and engine.streams == [] and engine.stats.streams_failed == 1
