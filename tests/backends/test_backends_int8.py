"""The opt-in int8 U-Net of the OpenVINO backend (``EngineOptions(quantize="int8-weights")``, real OpenVINO + NNCF).

Frames close to the float engine's (a stated PSNR bound), int8 weights really in the compiled U-Net and only there,
its own cache entry; the option refused with a clear error where it cannot run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from streamdiff import ConfigError, Quantization, StreamConfig, StreamPipeline
from streamdiff.backends.cache import EngineCache
from streamdiff.backends.keys import EngineOptions
from streamdiff.core.image import psnr
from streamdiff.errors import BackendUnavailable
from streamdiff.options import ENGINE_DEFAULTS, MODEL_DEFAULTS, model_options

pytest.importorskip("openvino")

CONFIG = StreamConfig(width=64, height=64, t_index_list=(20, 40))
# Measured on the tiny-random model at 64² (AMD EPYC, OpenVINO 2026.4, NNCF 3.4): 56.2–56.6 dB per frame against the
# float32 engine; the trained tiny model at 256²: 49.0 dB. Asserted with a margin.
MIN_PSNR_DB = 50.0


def _frames(count: int = 5) -> list[torch.Tensor]:
    return [torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(count)]


def _run(pipe: StreamPipeline) -> list[torch.Tensor]:
    pipe.prepare(prompt="a red fox", seed=3)
    return [pipe.step(frame).images for frame in _frames()][1:]


def test_int8_weights_frames_are_close_to_float_and_only_the_unet_holds_int8(tiny_model, tmp_path: Path) -> None:
    pytest.importorskip("nncf")
    from streamdiff.backends.openvino_backend import weight_precisions

    float_pipe = StreamPipeline(tiny_model, CONFIG, backend="openvino",
                                engine_options=EngineOptions(engine_dir=tmp_path))
    int8_pipe = StreamPipeline(tiny_model, CONFIG, backend="openvino",
                               engine_options=EngineOptions(engine_dir=tmp_path, quantize="int8-weights"))
    assert int8_pipe.engine.options.quantize is Quantization.INT8_WEIGHTS
    assert weight_precisions(int8_pipe.unet.model.compiled).get("u8", 0) > 0  # compressed weights (+ zero points)
    assert "u8" not in weight_precisions(float_pipe.unet.model.compiled)
    for half in (int8_pipe.vae.encoder, int8_pipe.vae.decoder):  # the VAE stays float
        assert "u8" not in weight_precisions(half.compiled)
    # Its own U-Net entry in the cache; the VAE entries are shared with the float engine.
    keys = [manifest["key"] for _, manifest in EngineCache(tmp_path).entries()]
    unets = [key for key in keys if key["component"] == "unet"]
    assert len(keys) == 4 and len(unets) == 2
    assert sorted(dict(key["extra"]).get("quantize", "none").split("+")[0] for key in unets) == ["int8-weights", "none"]

    for want, got in zip(_run(float_pipe), _run(int8_pipe)):
        assert not torch.equal(want, got)
        assert psnr(want, got) >= MIN_PSNR_DB


def test_quantize_is_validated_and_refused_where_it_cannot_run(tiny_model, monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"quantize='int4' is not one of 'none', 'int8-weights'") as error:
        EngineOptions(quantize="int4")
    assert error.value.field == "quantize" and error.value.value == "int4"
    assert EngineOptions(quantize="INT8-Weights").quantize is Quantization.INT8_WEIGHTS
    assert EngineOptions().quantize is Quantization.NONE
    options = {**MODEL_DEFAULTS, **ENGINE_DEFAULTS, "quantize": "int8-weights"}
    assert model_options(options).engine.quantize is Quantization.INT8_WEIGHTS

    int8 = EngineOptions(engine_dir=tmp_path, quantize="int8-weights")
    for backend in ("torch", "onnxruntime"):
        with pytest.raises(ConfigError, match=rf"quantize='int8-weights' needs backend 'openvino'.*is '{backend}'"):
            StreamPipeline(tiny_model, CONFIG, backend=backend, engine_options=int8)
    with pytest.raises(ConfigError, match="needs backend 'openvino'.*is 'torch'"):  # auto with compile picks torch
        StreamPipeline(tiny_model, CONFIG, backend="auto",
                       engine_options=EngineOptions(engine_dir=tmp_path, quantize="int8-weights", compile=True))
    monkeypatch.setitem(sys.modules, "nncf", None)  # as if NNCF were not installed
    with pytest.raises(BackendUnavailable, match=r"pip install 'streamdiff\[int8\]'"):
        StreamPipeline(tiny_model, CONFIG, backend="openvino", engine_options=int8)
    assert not any(tmp_path.iterdir())  # refused before anything was built
