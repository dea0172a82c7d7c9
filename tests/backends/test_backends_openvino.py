"""The OpenVINO backend on the tiny model (real OpenVINO): same frames as torch, cached, float32 time embedding."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch

from streamdiff import ConfigError, StreamConfig, StreamPipeline
from streamdiff.backends.factory import create_engines
from streamdiff.backends.keys import EngineOptions, EngineShapes
from streamdiff.backends.openvino_backend import OvUNet, OvVae

pytest.importorskip("openvino")

CONFIG = StreamConfig(width=64, height=64, t_index_list=(20, 40))
SHAPES = EngineShapes.for_engine(max_batch_rows=4, max_vae_batch=2, sizes=((64, 64),))


def _frames(count: int = 4) -> list[torch.Tensor]:
    return [torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(count)]


def _run(pipe: StreamPipeline) -> list[torch.Tensor]:
    pipe.prepare(prompt="a red fox", seed=3)
    return [pipe.step(frame).images for frame in _frames()][1:]


def _bf16(model):  # noqa: ANN001, ANN202 - a LoadedModel copy in bfloat16 (the session's model stays float32)
    clone = copy.copy(model)
    clone.unet = copy.deepcopy(model.unet).to(torch.bfloat16)
    clone.vae = copy.deepcopy(model.vae).to(torch.bfloat16)
    clone.dtype = torch.bfloat16
    return clone


def test_float32_frames_equal_torch_static_shapes_and_the_engines_are_reused(
    tiny_model, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    options = EngineOptions(engine_dir=tmp_path)
    with caplog.at_level(logging.INFO, logger="streamdiff.backends"):
        ov_pipe = StreamPipeline(tiny_model, CONFIG, backend="openvino", engine_options=options)
    assert isinstance(ov_pipe.unet, OvUNet) and isinstance(ov_pipe.vae, OvVae)
    assert caplog.text.count("not built yet") == 3
    assert ov_pipe.unet.model.precision == "f32"
    # One stream: static shapes (faster than dynamic axes); another shape is a clear error.
    assert ov_pipe.unet.model.static_shapes == [(2, 4, 8, 8), (2, 32), (2, 77, 64)]
    assert ov_pipe.vae.encoder.static_shapes == [(1, 3, 64, 64)]
    with pytest.raises(ConfigError, match="compiled for inputs"):
        ov_pipe.unet(torch.zeros(3, 4, 8, 8), torch.zeros(3, dtype=torch.int64), torch.zeros(3, 77, 64))
    expected, actual = _run(StreamPipeline(tiny_model, CONFIG, backend="torch")), _run(ov_pipe)
    for want, got in zip(expected, actual):
        # Stated tolerance: float32 OpenVINO equals torch to 1e-4 of the image range (measured ~1e-6).
        assert float((got - want).abs().max()) <= 1e-4

    entries = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="streamdiff.backends"):
        again = StreamPipeline(tiny_model, CONFIG, backend="openvino", engine_options=options)
    assert "not built yet" not in caplog.text and "built engine" not in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == entries
    for want, got in zip(actual, _run(again)):
        assert torch.equal(want, got)


@pytest.fixture(scope="module")
def bf16_engines(tiny_model, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """The tiny model in bfloat16 and its OpenVINO engines for 1 … 4 U-Net rows (built once for this module)."""
    model = _bf16(tiny_model)
    unet, vae = create_engines("openvino", model, SHAPES, EngineOptions(engine_dir=tmp_path_factory.mktemp("ov")))
    return model, unet, vae


def test_bfloat16_serves_every_batch_and_keeps_the_time_embedding_float32(bf16_engines) -> None:
    from streamdiff.backends.keys import cpu_has_native_bf16

    model, unet, vae = bf16_engines
    # OpenVINO's CPU plugin computes bf16 only where the CPU has it (AVX512-BF16, AMX); elsewhere (e.g. an AMD host
    # without AVX-512) it runs the hint at f32, and the checks below hold all the more.
    precision = "bf16" if cpu_has_native_bf16() else "f32"
    assert unet.model.precision == precision and vae.decoder.precision == precision
    assert unet.model.static_shapes is None  # a multi-stream engine: dynamic batch, no padding
    import openvino as ov

    assert unet.model.compiled.inputs[1].get_element_type() == ov.Type.f32  # the time projection comes in float32
    generator = torch.Generator().manual_seed(0)
    for batch in (1, 3, 4):  # a dynamic batch: every size a multi-stream call can have
        sample = torch.randn(batch, 4, 8, 8, generator=generator).to(torch.bfloat16)
        hidden = torch.randn(batch, 77, 64, generator=generator).to(torch.bfloat16)
        timestep = torch.full((batch,), 500)
        with torch.inference_mode():
            expected = model.unet(sample, timestep, encoder_hidden_states=hidden).sample.float()
        got = unet(sample, timestep, hidden)
        assert got.shape == expected.shape and got.dtype == torch.bfloat16
        got = got.float()
        # Stated tolerance in bfloat16: relative error <= 5e-2 of torch's own bfloat16 result.
        assert float((got - expected).abs().max() / expected.abs().max()) <= 5e-2

    # bfloat16 would round 999 to 1000 before the sinusoidal projection; float32 keeps them apart.
    sample = torch.randn(1, 4, 8, 8, generator=generator).to(torch.bfloat16)
    hidden = torch.randn(1, 77, 64, generator=generator).to(torch.bfloat16)
    at_999 = unet(sample, torch.tensor([999]), hidden).float()
    at_1000 = unet(sample, torch.tensor([1000]), hidden).float()
    assert not torch.equal(at_999, at_1000)


def test_bfloat16_pipeline_frames_stay_close_to_float32(tiny_model, bf16_engines) -> None:
    model, unet, vae = bf16_engines
    expected = _run(StreamPipeline(tiny_model, CONFIG, backend="torch"))
    actual = _run(StreamPipeline(model, CONFIG, unet=unet, vae=vae))
    for want, got in zip(expected, actual):
        mse = float(((got.float() - want) ** 2).mean())
        assert 10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-12))) >= 35.0  # PSNR >= 35 dB against float32



def test_per_size_state_is_bounded_and_a_failed_call_is_undone(tiny_model, tmp_path: Path) -> None:
    """Beyond ``max_shapes`` frame sizes the compiled model is imported again (releasing every size's state); a
    call at a latent the traced graph cannot run fails, ``recover()`` re-imports, and later calls are right."""
    from streamdiff.backends.torch_backend import TorchUNet

    unet, _ = create_engines("openvino", tiny_model, SHAPES, EngineOptions(engine_dir=tmp_path), max_shapes=2)
    model, reference = unet.model, TorchUNet(tiny_model.unet)
    hidden = torch.randn(2, 77, 64, generator=torch.Generator().manual_seed(1))

    def check(side: int) -> None:
        sample = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(side))
        timestep = torch.tensor([500, 700])
        assert float((unet(sample, timestep, hidden) - reference(sample, timestep, hidden)).abs().max()) <= 1e-4

    imports = model.imports
    for side in (8, 16, 8):
        check(side)
    assert list(model.sizes) == [((16, 16),), ((8, 8),)] and model.imports == imports
    check(24)  # a third size: imported again, only it remains
    assert list(model.sizes) == [((24, 24),)] and model.imports == imports + 1
    with pytest.raises(Exception, match="(?i)concat|a latent size its graph cannot run"):
        unet(torch.randn(2, 4, 25, 25), torch.tensor([500, 700]), hidden)
    assert model.failed
    unet.recover()
    assert not model.failed and model.imports == imports + 2
    unet.recover()  # nothing failed since: nothing to do
    assert model.imports == imports + 2
    for side in (32, 8):
        check(side)
