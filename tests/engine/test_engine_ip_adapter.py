"""Streams with image prompts (IP-Adapter) on the engine: judged by diffusers' img2img pipeline with the same
IP-Adapter, by the sequential path, and by each stream alone (tiny random models built here, float32)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from streamdiff import StreamConfig, load_model
from streamdiff.config import ReferenceImage
from streamdiff.core.schedule import lcm_timesteps
from streamdiff.engine import EngineConfig, StreamEngine
from streamdiff.errors import ConfigError
from streamdiff.models.ip_adapter import IP_ADAPTER_FILE, build_tiny_ip_adapter, save_ip_adapter
from streamdiff.pipeline import StreamPipeline
from streamdiff.testing.components import save_tiny_model

SIZE = 64


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ip-engine")
    model = save_tiny_model(root / "model", seed=7)
    unet = load_model(str(model), device="cpu").unet
    return model, save_ip_adapter(build_tiny_ip_adapter(unet, seed=3), root / "ip")


@pytest.fixture(scope="module")
def ip_model(folders):
    model, ip = folders
    return load_model(str(model), device="cpu", ip_adapter=ip)


def _images(seed: int, count: int, size: int = SIZE) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (size, size, 3)).astype(np.int16)
    return [np.clip(base + rng.integers(-30, 30, (size, size, 3)), 0, 255).astype(np.uint8) for _ in range(count)]


def _tensor(frame: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255


@pytest.mark.parametrize("mode, guidance", [("none", 1.0), ("full", 1.6)])
def test_one_step_equals_diffusers_img2img_with_the_same_ip_adapter(folders, ip_model, mode, guidance) -> None:
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    model_folder, ip_folder = folders
    frame, reference = _images(1, 1)[0], _images(2, 1, 48)[0]
    seed, scale = 11, 0.7
    pipe = StreamPipeline(ip_model, StreamConfig(width=SIZE, height=SIZE, t_index_list=(25,), cfg_type=mode))
    pipe.prepare("a watercolor", guidance_scale=guidance, seed=seed, reference_image=reference,
                 ip_adapter_scale=scale)
    ours = pipe.step(_tensor(frame)).images

    theirs = StableDiffusionImg2ImgPipeline.from_pretrained(
        str(model_folder), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    theirs.load_ip_adapter(str(ip_folder), subfolder="", weight_name=IP_ADAPTER_FILE)
    theirs.set_ip_adapter_scale(scale)
    timestep = lcm_timesteps(ip_model.schedule, 50)[25]
    expected = theirs("a watercolor", image=Image.fromarray(frame), timesteps=[timestep], strength=1.0,
                      guidance_scale=guidance, generator=torch.Generator().manual_seed(seed), output_type="pt",
                      ip_adapter_image=Image.fromarray(reference)).images
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max() <= 1e-4
    # the image prompt matters: without it the frame differs
    pipe.prepare("a watercolor", guidance_scale=guidance, seed=seed)
    assert (pipe.step(_tensor(frame)).images - expected).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["self", "initialize", "full"])
def test_stream_batch_equals_sequential_with_an_image_prompt(ip_model, mode) -> None:
    frames, reference = _images(3, 5), _images(4, 1, 40)[0]
    outs = []
    for batched in (True, False):
        pipe = StreamPipeline(ip_model, StreamConfig(width=SIZE, height=SIZE, t_index_list=(15, 30, 45),
                                                     cfg_type=mode, use_denoising_batch=batched))
        pipe.prepare("charcoal", negative_prompt="color", guidance_scale=1.5, delta=0.8, seed=3,
                     reference_image=reference, ip_adapter_scale=0.8)
        got = [o.images for o in (pipe.step(_tensor(x)) for x in frames) if o.images is not None]
        if batched:
            got += [o.images for o in pipe.flush()]
        outs.append(got)
    assert len(outs[0]) == len(outs[1]) == len(frames)
    assert max((a - b).abs().max().item() for a, b in zip(*outs)) <= 1e-5


def test_streams_with_different_images_scales_and_none_share_a_call_and_equal_each_alone(folders, ip_model) -> None:
    frames = _images(5, 4)
    ref_a, ref_b = _images(6, 1, 40)[0], _images(7, 1, 72)[0]
    config = StreamConfig(width=SIZE, height=SIZE, t_index_list=(20, 40), cfg_type="self")
    settings = [dict(reference_image=ref_a, ip_adapter_scale=0.6), dict(reference_image=ref_b, ip_adapter_scale=1.3),
                dict()]
    engine = StreamEngine(ip_model, EngineConfig(max_streams=4, max_batch_rows=16))
    streams = [engine.open_stream(config, "neon", seed=2, guidance_scale=1.4, **s) for s in settings]
    together: list[list[torch.Tensor]] = [[] for _ in streams]
    for frame in frames:
        outputs = engine.step({s: frame for s in streams})
        for i, s in enumerate(streams):
            if outputs[s].images is not None:
                together[i].append(outputs[s].images)
    assert engine.stats.unet_calls == len(frames)  # one U-Net call per tick for all three streams

    def alone(model, **extra) -> list[torch.Tensor]:
        solo = StreamEngine(model, EngineConfig(max_streams=1))
        stream = solo.open_stream(config, "neon", seed=2, guidance_scale=1.4, **extra)
        outs = [solo.step({stream: frame})[stream].images for frame in frames]
        return [o for o in outs if o is not None]

    expected = [alone(ip_model, **extra) for extra in settings]
    for got, want in zip(together, expected):
        assert len(got) == len(want) == len(frames) - 1
        assert max((a - b).abs().max().item() for a, b in zip(got, want)) <= 1e-4
    # a stream without an image gets exactly (bit for bit) the output of the same model without an IP-Adapter
    plain = load_model(str(folders[0]), device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(expected[2], alone(plain)))
    assert max((a - b).abs().max().item() for a, b in zip(together[0], together[2])) > 1e-3


def test_live_scale_and_image_changes_keep_the_stream_batch(ip_model) -> None:
    frames = _images(8, 6)
    ref_a, ref_b = _images(9, 1, 40)[0], _images(10, 1, 40)[0]
    config = StreamConfig(width=SIZE, height=SIZE, t_index_list=(20, 40), cfg_type="self")
    engine = StreamEngine(ip_model, EngineConfig(max_streams=2))
    stream = engine.open_stream(config, "neon", reference_image=ref_a, ip_adapter_scale=0.5)
    twin = engine.open_stream(config, "neon", reference_image=ref_a, ip_adapter_scale=0.5)
    for frame in frames[:2]:
        engine.step({stream: frame, twin: frame})
    calls = engine.images.encoder_calls
    assert calls == 1  # both streams' image embedded once
    stream.update(ip_adapter_scale=1.5)
    out = engine.step({stream: frames[2], twin: frames[2]})
    assert engine.images.encoder_calls == calls  # a scale change embeds nothing
    assert out[stream].images is not None and (out[stream].images - out[twin].images).abs().max() > 1e-4
    assert float(stream.state.extras.batch["ip_scale"][0]) == 1.5
    version = stream.set_reference_image(ref_b)
    out = engine.step({stream: frames[3], twin: frames[3]})
    assert engine.images.encoder_calls == calls + 1 and out[stream].version == version
    stream.set_reference_image(ReferenceImage.from_pixels(ref_b.copy()))  # the same pixels: cached
    stream.set_reference_image(None)
    engine.step({stream: frames[4], twin: frames[4]})
    assert engine.images.encoder_calls == calls + 1
    assert float(stream.state.extras.batch["ip_scale"].abs().max()) == 0.0
    assert stream.stats.dropped_on_reconfigure == 0 and stream.stats.frames_out == 4
    assert stream.state.buffers.filled == 5


def test_reference_images_need_an_ip_adapter_and_every_backend_takes_one(folders, ip_model) -> None:
    plain = load_model(str(folders[0]), device="cpu")
    engine = StreamEngine(plain, EngineConfig(max_streams=1))
    config = StreamConfig(width=SIZE, height=SIZE)
    with pytest.raises(ConfigError, match="IP-Adapter") as info:
        engine.open_stream(config, "x", reference_image=_images(1, 1)[0])
    assert info.value.field == "reference_image"
    # Every backend takes the IP-Adapter's inputs (their outputs: tests/engine/test_engine_extras_backends.py,
    # tests/backends/test_backends_openvino_controlnet.py).
    from streamdiff.backends.keys import EngineOptions

    for backend in ("onnxruntime", "openvino"):
        assert StreamEngine(ip_model, backend=backend).backend.value == backend
    assert StreamEngine(ip_model, backend="torch", engine_options=EngineOptions(compile=True)).backend.value == "torch"
    assert StreamEngine(ip_model, backend="auto").backend.value == "openvino"  # the CPU's fastest
    with pytest.raises(ConfigError, match="ip_adapter_scale"):
        engine.open_stream(config, "x", ip_adapter_scale=-1)
