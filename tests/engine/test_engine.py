"""The multi-stream engine on the real tiny model (CPU, float32): each stream's frames equal what it gets alone."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from streamdiff import ConfigError, EngineFull, StreamClosed, StreamConfig, StreamEngine, StreamPipeline
from streamdiff.engine import EngineConfig
from streamdiff.testing import CountingUNet
from streamdiff.backends.torch_backend import TorchUNet

SIZE = 64
TOLERANCE = 1e-4  # float32, max abs in [0, 1]

# Three streams that differ in prompt, seed, steps, F, cfg mode, guidance and filter settings.
MIX = [
    (StreamConfig(width=SIZE, height=SIZE, t_index_list=(20, 40), cfg_type="self"),
     dict(prompt="a watercolor portrait", seed=1, guidance_scale=1.4, delta=0.8)),
    (StreamConfig(width=SIZE, height=SIZE, t_index_list=(10, 25, 40), cfg_type="full"),
     dict(prompt="an oil painting", negative_prompt="blurry", seed=2, guidance_scale=1.6)),
    (StreamConfig(width=SIZE, height=SIZE, t_index_list=(30,), cfg_type="initialize", frame_buffer_size=2),
     dict(prompt="charcoal", negative_prompt="color", seed=3, guidance_scale=2.0)),
    (StreamConfig(width=SIZE, height=SIZE, t_index_list=(15, 35), cfg_type="none", use_denoising_batch=False),
     dict(prompt="neon", seed=4)),
]


def group(frames: list[np.ndarray], tick: int, f: int, offset: int = 0) -> np.ndarray:
    """Frames ``tick·f … tick·f+f−1`` (cycling), as one frame (F = 1) or a group."""
    picked = [frames[(offset + tick * f + k) % len(frames)] for k in range(f)]
    return picked[0] if f == 1 else np.stack(picked)


def alone(model, config: StreamConfig, settings: dict, inputs: list[np.ndarray]) -> list[torch.Tensor]:
    """The frames a single-stream pipeline gives for ``inputs`` (one entry per tick), warm-up dropped."""
    pipe = StreamPipeline(model, config)
    pipe.prepare(**{"negative_prompt": "", **settings})
    outs = [pipe.step(torch.from_numpy(x.reshape(-1, SIZE, SIZE, 3)).permute(0, 3, 1, 2).float() / 255)
            for x in inputs]
    return [o.images for o in outs if o.images is not None]


@pytest.fixture()
def engine(tiny_model):
    engine = StreamEngine(tiny_model, EngineConfig(max_streams=8, max_batch_rows=32),
                          unet=CountingUNet(TorchUNet(tiny_model.unet)))
    yield engine
    engine.stop()


def test_mixed_streams_share_one_call_and_equal_each_stream_alone(tiny_model, engine, frames) -> None:
    streams = [engine.open_stream(config, **settings) for config, settings in MIX]
    got: dict = {s: [] for s in streams}
    inputs: dict = {s: [] for s in streams}
    for tick in range(6):
        feed = {s: group(frames, tick, s.config.frame_buffer_size, offset=i) for i, s in enumerate(streams)}
        for s, x in feed.items():
            inputs[s].append(x)
        outputs = engine.step(feed)
        assert set(outputs) == set(streams)
        for s, out in outputs.items():
            if out.images is not None:
                got[s].append(out.images)
    # One U-Net call per tick holds every stream's rows: 2 (self) + 6 (full) + 4 (initialize, F=2) + 1 (step 0
    # of the sequential stream); its second step runs alone in a second call.
    assert engine.unet.batches == [13, 1] * 6
    for s, (config, settings) in zip(streams, MIX):
        expected = alone(tiny_model, config, settings, inputs[s])
        assert len(got[s]) == len(expected) > 0
        worst = max(float((a - b).abs().max()) for a, b in zip(got[s], expected))
        assert worst <= TOLERANCE, (s.name, worst)


def test_streams_join_and_leave_between_ticks(tiny_model, engine, frames) -> None:
    (config_a, settings_a), (config_b, settings_b) = MIX[0], MIX[1]
    a = engine.open_stream(config_a, **settings_a)
    b = engine.open_stream(config_b, **settings_b)
    got_a, inputs_a, c = [], [], None
    for tick in range(8):
        if tick == 3:
            c = engine.open_stream(StreamConfig(width=SIZE, height=SIZE, t_index_list=(25,)), prompt="late", seed=9)
        if tick == 5:
            b.close()
        feed = {a: frames[tick % 8]}
        if tick < 5:
            feed[b] = frames[(tick + 1) % 8]
        if tick >= 3:
            feed[c] = frames[(tick + 2) % 8]
        inputs_a.append(feed[a])
        outputs = engine.step(feed)
        assert (c is not None and c in outputs) == (tick >= 3) and (b in outputs) == (tick < 5)
        if outputs[a].images is not None:
            got_a.append(outputs[a].images)
    assert b.finished and b not in engine.streams and c.stats.frames_out == 5
    with pytest.raises(StreamClosed, match="stream-2 is closed"):
        b.submit(frames[0])
    expected = alone(tiny_model, config_a, settings_a, inputs_a)
    assert max(float((x - y).abs().max()) for x, y in zip(got_a, expected)) <= TOLERANCE


def test_row_cap_is_fair(tiny_model, frames) -> None:
    """Five 2-row streams under a cap of 4 rows: two per call, each served at least once every ⌈5/2⌉ = 3 ticks."""
    engine = StreamEngine(tiny_model, EngineConfig(max_streams=5, max_batch_rows=4),
                          unet=CountingUNet(TorchUNet(tiny_model.unet)))
    streams = [engine.open_stream(StreamConfig(width=SIZE, height=SIZE, t_index_list=(20, 40)), prompt=str(i))
               for i in range(5)]
    served = []
    for tick in range(12):
        outputs = engine.step({s: frames[tick % 8] for s in streams})
        served.append({s.id for s in outputs})
    assert engine.unet.batches == [4] * 12
    for s in streams:
        ticks = [t for t, ids in enumerate(served) if s.id in ids]
        assert max(b - a for a, b in zip([-1] + ticks, ticks + [12])) <= 3, (s.name, ticks)
        # A stream left out keeps only its newest frame (latest wins); the older one is counted.
        assert s.stats.dropped_inputs > 0 and s.stats.frames_in == len(ticks)


def test_admission_refuses_one_stream_too_many(tiny_model) -> None:
    engine = StreamEngine(tiny_model, EngineConfig(max_streams=2, max_batch_rows=8))
    config = StreamConfig(width=SIZE, height=SIZE, t_index_list=(20, 40))
    first, _ = engine.open_stream(config), engine.open_stream(config)
    with pytest.raises(EngineFull, match=r"already serves max_streams=2 streams; close one or try later"):
        engine.open_stream(config)
    with pytest.raises(ConfigError, match=r"needs 10 U-Net rows per call, more than the engine's max_batch_rows=8"):
        first.update(t_index_list=(5, 15, 25, 35, 45), cfg_type="full")
    first.close()
    engine.open_stream(config)  # room again at once


def test_invalid_update_raises_in_the_caller_and_the_stream_keeps_producing(tiny_model, engine, frames) -> None:
    config, settings = MIX[0]
    stream = engine.open_stream(config, **settings)
    engine.step({stream: frames[0]})
    version = stream.version
    for bad, message in [
        (dict(guidance_scale=99), r"guidance_scale=99 is outside \[0, 50\]"),
        (dict(t_index_list=(40, 20)), r"must be strictly increasing"),
        (dict(width=60), r"width=60 is not a multiple of 8 \(the tiny-random model.s VAE factor 8\); allowed: multiples of 8 "),
        (dict(colour="red"), r"unknown setting\(s\) \['colour'\]"),
        (dict(seed=-1), r"seed=-1 is outside \[0, "),
    ]:
        with pytest.raises(ConfigError, match=message):
            stream.update(**bad)
    assert stream.version == version and stream.config == config
    outs = [engine.step({stream: frames[i]})[stream] for i in range(1, 4)]
    assert all(o.images is not None for o in outs) and not stream.finished


def test_concurrent_updates_never_mix_two_settings(tiny_model, frames) -> None:
    """200 frames while another thread flips between two settings: every frame is wholly one or the other."""
    config = StreamConfig(width=SIZE, height=SIZE, t_index_list=(25,), cfg_type="self")
    a = dict(prompt="a watercolor", seed=1, guidance_scale=1.5, delta=0.9)
    b = dict(prompt="an oil painting", seed=2, guidance_scale=2.5, delta=0.5)
    expected = {name: alone(tiny_model, config, s, frames) for name, s in (("a", a), ("b", b))}
    engine = StreamEngine(tiny_model, EngineConfig(max_streams=1)).start()
    stream = engine.open_stream(config, lossless=True, output_capacity=256, **a)
    stop = threading.Event()

    def flip() -> None:
        turn = 0
        while not stop.is_set():
            stream.update(**(b if turn % 2 == 0 else a))
            turn += 1

    flipper = threading.Thread(target=flip)
    flipper.start()
    try:
        for i in range(200):
            stream.submit(frames[i % 8], frame_id=i)
        seen = {"a": 0, "b": 0}
        for _ in range(200):
            out = stream.get(timeout=30)
            i = out.frame_ids[0]
            errors = {k: float((out.images - v[i % 8]).abs().max()) for k, v in expected.items()}
            best = min(errors, key=errors.get)
            assert errors[best] <= TOLERANCE, (i, errors)
            seen[best] += 1
    finally:
        stop.set()
        flipper.join()
        engine.stop()
    assert seen["a"] > 0 and seen["b"] > 0  # both settings really ran


class FailOnTimestep:
    """A U-Net engine that raises whenever a call contains one stream's timestep (standing for a bad stream)."""

    def __init__(self, inner, timestep: int) -> None:
        self.inner, self.timestep = inner, timestep

    def __call__(self, sample, timestep, encoder_hidden_states):
        if (timestep == self.timestep).any():
            raise RuntimeError("this stream's rows broke the U-Net")
        return self.inner(sample, timestep, encoder_hidden_states)


def test_an_error_in_one_streams_work_ends_only_that_stream(tiny_model, frames) -> None:
    from streamdiff.core.schedule import lcm_timesteps

    bad_t = lcm_timesteps(tiny_model.schedule, 50)[7]
    engine = StreamEngine(tiny_model, EngineConfig(max_streams=4, max_batch_rows=32),
                          unet=FailOnTimestep(TorchUNet(tiny_model.unet), bad_t))
    good = [engine.open_stream(config, **settings) for config, settings in MIX[:2]]
    bad = engine.open_stream(StreamConfig(width=SIZE, height=SIZE, t_index_list=(7, 30)), prompt="doomed")
    callback_bad = engine.open_stream(MIX[0][0], prompt="x", on_output=lambda s, o: 1 / 0)
    got = {s: [] for s in good}
    inputs = {s: [] for s in good}
    for tick in range(5):
        feed = {s: frames[(tick + i) % 8] for i, s in enumerate(good)}
        if tick == 0:
            feed[bad] = frames[3]
            feed[callback_bad] = frames[4]
        for s in good:
            inputs[s].append(feed[s])
        outputs = engine.step(feed)
        for s in good:
            if outputs[s].images is not None:
                got[s].append(outputs[s].images)
    assert bad.finished and "this stream's rows broke the U-Net" in str(bad.error)
    assert callback_bad.finished and isinstance(callback_bad.error, ZeroDivisionError)
    assert engine.stats.streams_failed == 2 and set(engine.streams) == set(good)
    for s, (config, settings) in zip(good, MIX):
        expected = alone(tiny_model, config, settings, inputs[s])
        assert len(got[s]) == len(expected) > 0
        assert max(float((x - y).abs().max()) for x, y in zip(got[s], expected)) <= TOLERANCE


def test_threaded_mode_end_input_flushes_every_frame(tiny_model, frames) -> None:
    engine = StreamEngine(tiny_model, EngineConfig(max_streams=2)).start()
    try:
        config = StreamConfig(width=SIZE, height=SIZE, t_index_list=(15, 30, 45), frame_buffer_size=2)
        stream = engine.open_stream(config, prompt="p", lossless=True)
        for i in range(7):  # an odd count: the last group is padded, its padding never leaves
            stream.submit(frames[i], frame_id=i)
        stream.end_input()
        ids = []
        while (out := stream.get(timeout=30)) is not None:
            ids += list(out.frame_ids)
            assert out.images is None or out.images.shape[0] == len(out.frame_ids)
        assert ids == list(range(7)) and stream.error is None and stream.finished
    finally:
        engine.stop()
    with pytest.raises(StreamClosed):
        stream.update(prompt="too late")


def test_txt2img_streams_generate_on_request(tiny_model) -> None:
    engine = StreamEngine(tiny_model, EngineConfig(max_streams=2))
    config = StreamConfig(width=SIZE, height=SIZE, t_index_list=(0, 25), mode="txt2img")
    a, b = engine.open_stream(config, prompt="a", seed=5), engine.open_stream(config, prompt="a", seed=5)
    outs = [engine.step({a: None, b: None}) for _ in range(3)]
    assert outs[0][a].images is None and outs[1][a].images is not None
    assert torch.equal(outs[2][a].images, outs[2][b].images)  # same seed, same frames


def test_prompt_embeddings_are_shared_by_streams_with_the_same_prompt(tiny_model, frames) -> None:
    engine = StreamEngine(tiny_model, EngineConfig(max_streams=4))
    config = StreamConfig(width=SIZE, height=SIZE, t_index_list=(20, 40), cfg_type="full")
    streams = [engine.open_stream(config, prompt="a shared prompt", negative_prompt="blur", seed=i) for i in range(3)]
    engine.step({s: frames[0] for s in streams})
    assert engine.prompts.encoder_calls == 2  # the prompt and the negative prompt, once for all three streams
    streams[0].update(prompt="another prompt")
    streams[1].update(prompt="another prompt")
    engine.step({s: frames[1] for s in streams})
    assert engine.prompts.encoder_calls == 3
