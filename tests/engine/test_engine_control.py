"""ControlNet in the engine, on the tiny random model (CPU, float32), judged by diffusers' ControlNet img2img pipeline:
one step with one and with two ControlNets, start/end gating, the Stream Batch against the sequential path, streams
with different ControlNets (and none) in one U-Net call against each alone, live scale changes, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from control_helpers import (
    SIZE, TOLERANCE, CountingControlNet, check_one_step_equals_diffusers, check_two_controlnets_equal_diffusers,
    control_picture, diffusers_run, make_engine, picture, streamdiff_run,
)

from streamdiff import ConfigError, ControlNetSpec, FrameError, StreamConfig, StreamEngine
from streamdiff.backends.torch_backend import TorchUNet
from streamdiff.engine import EngineConfig
from streamdiff.models.controlnet import build_tiny_controlnet
from streamdiff.testing import CountingUNet

@pytest.fixture(scope="module")
def controlnets() -> dict[str, torch.nn.Module]:
    return {"a": build_tiny_controlnet(seed=1), "b": build_tiny_controlnet(seed=2)}


@pytest.mark.parametrize("cfg", ["none", "full"])
def test_one_step_equals_diffusers(tiny_model, controlnets, cfg) -> None:
    check_one_step_equals_diffusers(tiny_model, controlnets, cfg)


def test_two_controlnets_equal_diffusers_multicontrolnet(tiny_model, controlnets) -> None:
    check_two_controlnets_equal_diffusers(tiny_model, controlnets)


def test_start_end_over_two_steps_equals_diffusers(tiny_model, controlnets) -> None:
    config = StreamConfig(width=SIZE, height=SIZE, t_index_list=(2, 3), num_inference_steps=4, cfg_type="none",
                          use_denoising_batch=False)
    spec = ControlNetSpec("a", scale=1.2, end=0.5, preprocessor="passthrough")
    got = streamdiff_run(make_engine(tiny_model, controlnets), config, [spec], picture(2), control_picture(2), 3,
                         "a tree")
    expected = diffusers_run(tiny_model, [controlnets["a"]], [1.2], picture(2), [control_picture(2)], 4, 0.5, 3,
                             "a tree", end=0.5)
    assert float((got - expected).abs().max()) <= TOLERANCE


def run_frames(engine, config, settings, frames, controls=None) -> list[torch.Tensor]:
    stream = engine.open_stream(config, **settings)
    outs = []
    for i, frame in enumerate(frames):
        stream.submit(frame, control_image=None if controls is None else controls[i])
        out = engine.step({}).get(stream)
        if out is not None and out.images is not None:
            outs.append(out.images)
    outs += [o.images for o in engine.flush(stream)]
    stream.close()
    return outs


@pytest.mark.parametrize("cfg", ["self", "initialize", "full"])
def test_stream_batch_equals_sequential(tiny_model, controlnets, cfg) -> None:
    specs = [ControlNetSpec("a", scale=0.8, preprocessor="passthrough"), ControlNetSpec("b", scale=1.1, start=0.3)]
    settings = dict(prompt="a cat", negative_prompt="dark", guidance_scale=1.5, delta=0.9, seed=4, controlnets=specs)
    frames = [picture(i) for i in range(5)]
    controls = [control_picture(i) for i in range(5)]
    outs = {}
    for batched in (True, False):
        config = StreamConfig(width=SIZE, height=SIZE, t_index_list=(10, 25, 40), cfg_type=cfg,
                              use_denoising_batch=batched)
        outs[batched] = run_frames(make_engine(tiny_model, controlnets), config, settings, frames, controls)
    assert len(outs[True]) == len(outs[False]) == 5
    worst = max(float((a - b).abs().max()) for a, b in zip(outs[True], outs[False]))
    assert worst <= 1e-5


def test_mixed_streams_share_calls_and_equal_each_alone(tiny_model, controlnets) -> None:
    counted = {name: CountingControlNet(model) for name, model in controlnets.items()}
    mix = [
        (StreamConfig(width=SIZE, height=SIZE, t_index_list=(20, 40), cfg_type="self"),
         dict(prompt="ink", seed=1, guidance_scale=1.4, controlnets=[ControlNetSpec("a", scale=0.9)])),
        (StreamConfig(width=SIZE, height=SIZE, t_index_list=(15, 30, 45), cfg_type="full"),
         dict(prompt="oil", negative_prompt="gray", seed=2, guidance_scale=1.6,
              controlnets=[ControlNetSpec("b", scale=1.2, low_threshold=50, high_threshold=150),
                           ControlNetSpec("a", scale=0.4, end=0.7)])),
        (StreamConfig(width=SIZE, height=SIZE, t_index_list=(25, 40), cfg_type="none"), dict(prompt="plain", seed=3)),
        (StreamConfig(width=SIZE, height=SIZE, t_index_list=(30, 45), cfg_type="initialize"),
         dict(prompt="pencil", negative_prompt="color", seed=5, guidance_scale=1.8,
              controlnets=[ControlNetSpec("b", scale=0.7)])),
    ]
    engine = StreamEngine(tiny_model, EngineConfig(max_streams=4, max_batch_rows=32),
                          unet=CountingUNet(TorchUNet(tiny_model.unet)), controlnets=counted)
    streams = [engine.open_stream(config, **settings) for config, settings in mix]
    got: dict = {s: [] for s in streams}
    for tick in range(4):
        outputs = engine.step({s: picture(tick + 3 * i) for i, s in enumerate(streams)})
        for s, out in outputs.items():
            if out.images is not None:
                got[s].append(out.images)
    # Every tick: ONE U-Net call of 2 + 6 + 2 + 3 rows, ONE call of "a" (stream 1's 2 rows, stream 2's rows at
    # steps 0 and 1 of 3 with their negatives: 4) and ONE of "b" (6 + 3 rows).
    assert engine.unet.batches == [13] * 4
    assert counted["a"].batches == [6] * 4
    assert counted["b"].batches == [9] * 4
    for i, (s, (config, settings)) in enumerate(zip(streams, mix)):
        expected = run_frames(make_engine(tiny_model, controlnets, 1), config, settings,
                              [picture(tick + 3 * i) for tick in range(4)])
        assert len(got[s]) > 0
        worst = max(float((a - b).abs().max()) for a, b in zip(got[s], expected))
        assert worst <= TOLERANCE, (i, worst)


def test_live_scale_change_keeps_the_stream_batch(tiny_model, controlnets) -> None:
    engine = make_engine(tiny_model, controlnets)
    config = StreamConfig(width=SIZE, height=SIZE, t_index_list=(20, 40), cfg_type="self")
    stream = engine.open_stream(config, prompt="x", controlnets=[ControlNetSpec("a", scale=1.0)])
    outs = [engine.step({stream: picture(i)})[stream] for i in range(3)]
    state = stream.state
    stream.update(controlnets=[ControlNetSpec("a", scale=0.2)])
    changed = engine.step({stream: picture(3)})[stream]
    assert stream.state is state and stream.stats.dropped_on_reconfigure == 0
    assert changed.images is not None and changed.version == 1
    # The same frame at the same place with the old scale gives another image.
    again = make_engine(tiny_model, controlnets)
    other = again.open_stream(config, prompt="x", controlnets=[ControlNetSpec("a", scale=1.0)])
    old = [again.step({other: picture(i)})[other] for i in range(4)][-1]
    assert all(o.images is not None for o in outs[1:])
    assert float((old.images - changed.images).abs().max()) > 1e-4
    stream.update(controlnets=[])  # no ControlNet any more: live too
    assert engine.step({stream: picture(4)})[stream].images is not None
    assert stream.state is state


def test_refusals(tiny_model, controlnets) -> None:
    engine = make_engine(tiny_model, controlnets)
    config = StreamConfig(width=SIZE, height=SIZE)
    with pytest.raises(ConfigError, match=r"'depth' is not one this engine offers: a, b"):
        engine.open_stream(config, controlnets=[ControlNetSpec("depth")])
    with pytest.raises(ConfigError, match=r"preprocessor 'hed' of controlnet 'a' is not one of canny, passthrough"):
        engine.open_stream(config, controlnets=[ControlNetSpec("a", preprocessor="hed")])
    stream = engine.open_stream(config)
    with pytest.raises(ConfigError, match="not one this engine offers"):
        stream.update(controlnets=["nope"])


def test_passthrough_reuses_the_last_control_image_and_needs_a_first(tiny_model, controlnets) -> None:
    config = StreamConfig(width=SIZE, height=SIZE, t_index_list=(20, 40), cfg_type="none", use_denoising_batch=False)
    spec = ControlNetSpec("a", preprocessor="passthrough")
    outs = []
    for controls in ([control_picture(0), None, None], [control_picture(0)] * 3):
        engine = make_engine(tiny_model, controlnets)
        stream = engine.open_stream(config, controlnets=[spec])
        if controls[1] is None:
            with pytest.raises(FrameError, match=r"\['a'\] take the client's control image"):
                stream.submit(picture(0))
        for i, control in enumerate(controls):
            stream.submit(picture(i), control_image=control)
            outs.append(engine.step({})[stream].images)
    assert all(torch.equal(a, b) for a, b in zip(outs[:3], outs[3:]))
    with pytest.raises(FrameError, match="uses no ControlNet"):
        make_engine(tiny_model, controlnets).open_stream(config).submit(picture(0), control_image=control_picture(0))


def test_txt2img_with_a_passthrough_controlnet(tiny_model, controlnets) -> None:
    config = StreamConfig(width=SIZE, height=SIZE, t_index_list=(0, 25), cfg_type="none", mode="txt2img")
    got = []
    for control in (control_picture(0), control_picture(5)):
        engine = make_engine(tiny_model, controlnets)
        stream = engine.open_stream(config, controlnets=[ControlNetSpec("a", preprocessor="passthrough")])
        stream.submit(None, control_image=control)
        assert engine.step({})[stream].images is None  # warm-up: the frame is inside the Stream Batch
        got.append(engine.flush(stream)[0].images)
    assert float((got[0] - got[1]).abs().max()) > 1e-3


def test_a_plugin_preprocessor_makes_the_control_image(tiny_model, controlnets) -> None:
    def invert(frame: np.ndarray, spec: ControlNetSpec) -> np.ndarray:
        return 255 - frame

    config = StreamConfig(width=SIZE, height=SIZE, t_index_list=(30,), cfg_type="none")
    engine = StreamEngine(tiny_model, EngineConfig(max_streams=1), controlnets=controlnets,
                          preprocessors={"invert": invert})
    stream = engine.open_stream(config, controlnets=[ControlNetSpec("a", preprocessor="invert")])
    got = engine.step({stream: picture(0)})[stream].images
    other = make_engine(tiny_model, controlnets)
    given = other.open_stream(config, controlnets=[ControlNetSpec("a", preprocessor="passthrough")])
    given.submit(picture(0), control_image=255 - picture(0))
    assert torch.equal(got, other.step({})[given].images)


def test_the_pipeline_runs_controlnets_as_the_engine(tiny_model, controlnets) -> None:
    from streamdiff import StreamPipeline

    config = StreamConfig(width=SIZE, height=SIZE, t_index_list=(20, 40), cfg_type="self")
    specs = [ControlNetSpec("a", scale=0.9), ControlNetSpec("b", preprocessor="passthrough")]
    pipe = StreamPipeline(tiny_model, config, controlnets=controlnets)
    pipe.prepare("ink", seed=3, controlnets=specs)
    got = [pipe(picture(i), control_image=control_picture(i)) for i in range(3)]
    engine = make_engine(tiny_model, controlnets, 1)
    expected = run_frames(engine, config, dict(prompt="ink", seed=3, controlnets=specs), [picture(i) for i in range(3)],
                          [control_picture(i) for i in range(3)])
    assert got[0] is None
    for a, b in zip(got[1:], expected):
        assert np.array_equal(a, (b[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
