"""SDXL's U-Net extra inputs (``text_embeds``, ``time_ids``) on each backend: run where taken, refused up front where
not (never mid-stream)."""

from __future__ import annotations

import pytest

from pathlib import Path

import torch

from streamdiff import ConfigError, StreamConfig, StreamEngine, StreamPipeline
from streamdiff.backends import factory
from streamdiff.backends.keys import EngineOptions
from streamdiff.config import BackendKind
from streamdiff.engine import EngineConfig

CONFIG = StreamConfig(width=64, height=64, t_index_list=(20, 40), cfg_type="initialize")
TOLERANCE = 1e-4  # float32 compiled engines equal torch to 1e-4 of the image range (as for SD)


@pytest.fixture(scope="module")
def sdxl_model(cache_dir):
    from streamdiff import load_model

    return load_model("tiny-sdxl", device="cpu")


def test_cuda_graphs_are_refused_for_sdxl_and_compiled_torch_is_not(sdxl_model, tmp_path) -> None:
    engine = StreamEngine(sdxl_model, backend="torch", engine_options=EngineOptions(compile=True, engine_dir=tmp_path))
    assert engine.backend is BackendKind.TORCH  # AOTInductor packages take the extra inputs (built at open_stream)
    with pytest.raises(ConfigError, match=r"cuda_graphs=True does not take the U-Net extra inputs"):
        StreamEngine(sdxl_model, EngineConfig(cuda_graphs=True), backend="torch")


def test_auto_picks_a_backend_that_takes_the_extra_inputs(sdxl_model, tiny_model) -> None:
    kind, reason = factory.choose_auto(sdxl_model, EngineOptions())
    assert kind in factory.EXTRA_INPUT_BACKENDS
    engine = StreamEngine(sdxl_model, EngineConfig(max_streams=1), backend="auto")
    assert engine.backend is kind
    if kind is BackendKind.TORCH:
        assert "SDXL" in reason


def _run(pipe: StreamPipeline) -> list[torch.Tensor]:
    pipe.prepare(prompt="a red fox", negative_prompt="blurry", guidance_scale=1.4, delta=0.9, seed=3)
    frames = [torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    return [o for o in (pipe.step(frame).images for frame in frames) if o is not None]


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_compiled_sdxl_unet_equals_torch(sdxl_model, tmp_path: Path, backend: str) -> None:
    """The exported SDXL U-Net takes text_embeds and time_ids as graph inputs; its frames equal eager torch's."""
    pytest.importorskip(backend)
    options = EngineOptions(engine_dir=tmp_path, min_resolution=32, max_resolution=128, opt_resolution=64)
    compiled = StreamPipeline(sdxl_model, CONFIG, backend=backend, engine_options=options)
    expected, actual = _run(StreamPipeline(sdxl_model, CONFIG, backend="torch")), _run(compiled)
    assert len(expected) == len(actual) == 3
    worst = max(float((a - b).abs().max()) for a, b in zip(actual, expected))
    assert worst <= TOLERANCE
    unet_entries = [p.name for p in tmp_path.iterdir() if p.name.startswith("unet-")]
    assert len(unet_entries) == 1
    manifest = (tmp_path / unet_entries[0] / "manifest.json").read_text()
    assert "unet_extras" in manifest and "text_embeds,time_ids" in manifest  # the cache key names the extra inputs


def test_the_engine_key_names_the_extra_inputs(sdxl_model, tiny_model) -> None:
    from streamdiff.backends.keys import Component, ShapeRange, engine_key

    shapes = ShapeRange(batch=(1, 4), height=(64, 64), width=(64, 64), opt_batch=2, opt_height=64, opt_width=64)
    sdxl = engine_key(sdxl_model, Component.UNET, shapes, backend="onnx", backend_version="1", dtype=torch.float32,
                      opset=17, target="portable")
    sd = engine_key(tiny_model, Component.UNET, shapes, backend="onnx", backend_version="1", dtype=torch.float32,
                    opset=17, target="portable")
    assert ("unet_extras", "text_embeds,time_ids") in sdxl.extra and not any(k == "unet_extras" for k, _ in sd.extra)
    vae = engine_key(sdxl_model, Component.VAE_DECODER, shapes, backend="onnx", backend_version="1",
                     dtype=torch.float32, opset=17, target="portable")
    assert not any(k == "unet_extras" for k, _ in vae.extra)


def test_tensorrt_build_plan_has_the_extra_input_profiles(sdxl_model, tmp_path: Path) -> None:
    from streamdiff.backends.builders import spatial_multiple, tensorrt_plan
    from streamdiff.backends.keys import Component, shape_range

    shapes = shape_range(Component.UNET, CONFIG, EngineOptions(), spatial_multiple(sdxl_model, Component.UNET))
    profile = tensorrt_plan(sdxl_model, Component.UNET, shapes, tmp_path / "model.onnx").describe()["profile"]
    assert list(profile) == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    rows = 2 + 1  # initialize, n = 2, F = 1: n·F rows + F negatives
    assert profile["text_embeds"] == {"min": [rows, 32], "opt": [rows, 32], "max": [rows, 32]}
    assert profile["time_ids"]["max"] == [rows, 6]
    assert profile["encoder_hidden_states"]["max"] == [rows, 77, sdxl_model.text_hidden_size]
    decoder = tensorrt_plan(sdxl_model, Component.VAE_DECODER, shapes, tmp_path / "model.onnx").describe()["profile"]
    assert list(decoder) == ["latents"]


def test_tensorrt_unet_runs_the_extra_inputs(fake_trt, tmp_path: Path) -> None:
    """The TensorRT U-Net feeds SDXL's extras by name (fake TensorRT: the analytic U-Net with extras) and refuses
    a call without them."""
    from fake_tensorrt import fake_plan

    from streamdiff.backends.tensorrt_runtime import TrtUNet
    from streamdiff.testing import AnalyticUNet

    profile = {"sample": ((1, 4, 4, 4), (4, 4, 8, 8), (8, 4, 16, 16)), "timestep": ((1,), (4,), (8,)),
               "encoder_hidden_states": ((1, 77, 64), (4, 77, 64), (8, 77, 64)),
               "text_embeds": ((1, 32), (4, 32), (8, 32)), "time_ids": ((1, 6), (4, 6), (8, 6))}
    path = tmp_path / "unet-tensorrt" / "model.plan"
    path.parent.mkdir(parents=True)
    path.write_bytes(fake_plan(fake_trt.__version__, "unet", profile, dtype="FLOAT"))
    unet = TrtUNet(path, torch.device("cpu"), cuda=fake_trt.cuda, trt=fake_trt)
    generator = torch.Generator().manual_seed(0)
    inputs = (torch.randn(3, 4, 8, 8, generator=generator), torch.tensor([999, 500, 20]),
              torch.randn(3, 77, 64, generator=generator))
    extras = {"text_embeds": torch.randn(3, 32, generator=generator),
              "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]).expand(3, -1)}
    torch.testing.assert_close(unet(*inputs, **extras), AnalyticUNet()(*inputs, **extras))
    with pytest.raises(ConfigError, match=r"takes the extra inputs \['text_embeds', 'time_ids'\], got \[\]"):
        unet(*inputs)
