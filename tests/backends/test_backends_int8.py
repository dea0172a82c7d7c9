"""The opt-in int8 U-Nets of the OpenVINO backend (``EngineOptions(quantize="int8-weights" | "int8")``, real
OpenVINO + NNCF).

Frames close to the float engine's (a stated PSNR bound), int8 weights (and, for ``int8``, int8 kernels on int8
activations) really in the compiled U-Net and only there, its own cache entry keyed by the calibration, the same
calibration giving the same engine; the option refused with a clear error where it cannot run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from streamdiff import Calibration, ConfigError, Quantization, StreamConfig, StreamPipeline
from streamdiff.backends.cache import EngineCache
from streamdiff.backends.factory import engine_steps
from streamdiff.backends.keys import EngineOptions
from streamdiff.core.image import psnr
from streamdiff.errors import BackendUnavailable
from streamdiff.options import ENGINE_DEFAULTS, MODEL_DEFAULTS, model_options

pytest.importorskip("openvino")

CONFIG = StreamConfig(width=64, height=64, t_index_list=(20, 40))
# Measured on the tiny-random model at 64² (AMD EPYC, OpenVINO 2026.4, NNCF 3.4): 56.2–56.6 dB per frame against the
# float32 engine; the trained tiny model at 256²: 49.0 dB. Asserted with a margin.
MIN_PSNR_DB = 50.0
# Full int8 (weights and activations, NNCF's TRANSFORMER model type) on the tiny-random model at 64², per frame
# against float32 (AMD EPYC, OpenVINO 2026.4, NNCF 3.4): 30.8–31.1 dB with this test's 8 calibration calls,
# 32.0–32.4 dB with the default 32; NNCF's default model type gave 26.6–27.2 dB, which this bound refuses. The
# issue's bar for an SD-2.1-size model against bf16 is 30 dB (docs/PERF.md, "int8 on the CPU").
MIN_PSNR_INT8_DB = 29.0
CALIBRATION = Calibration(samples=8, seed=1)


def _frames(count: int = 5) -> list[torch.Tensor]:
    return [torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(count)]


def _run(pipe: StreamPipeline) -> list[torch.Tensor]:
    pipe.prepare(prompt="a red fox", seed=3)
    return [pipe.step(frame).images for frame in _frames()][1:]


def test_int8_weights_frames_are_close_to_float_and_only_the_unet_holds_int8(tiny_model, tmp_path: Path) -> None:
    pytest.importorskip("nncf")
    from streamdiff.backends.openvino_quantize import int8_layers, weight_precisions

    float_pipe = StreamPipeline(tiny_model, CONFIG, backend="openvino",
                                engine_options=EngineOptions(engine_dir=tmp_path))
    int8_pipe = StreamPipeline(tiny_model, CONFIG, backend="openvino",
                               engine_options=EngineOptions(engine_dir=tmp_path, quantize="int8-weights"))
    assert int8_pipe.engine.options.quantize is Quantization.INT8_WEIGHTS
    assert weight_precisions(int8_pipe.unet.model.compiled).get("u8", 0) > 0  # compressed weights (+ zero points)
    assert "u8" not in weight_precisions(float_pipe.unet.model.compiled)
    assert not int8_layers(int8_pipe.unet.model.compiled)  # weight-only: no int8 activations
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


def test_full_int8_runs_int8_kernels_close_to_float_and_is_keyed_by_its_calibration(tiny_model,
                                                                                      tmp_path: Path) -> None:
    pytest.importorskip("nncf")
    from streamdiff.backends.openvino_quantize import int8_layers

    def pipe(folder: str, quantize: str = "int8") -> StreamPipeline:
        options = EngineOptions(engine_dir=tmp_path / folder, quantize=quantize, calibration=CALIBRATION)
        return StreamPipeline(tiny_model, CONFIG, backend="openvino", engine_options=options)

    float_pipe, int8_pipe = pipe("a", "none"), pipe("a")
    assert int8_pipe.engine.options.quantize is Quantization.INT8
    # calibrated at the stream's timesteps, fixed at the first build
    assert int8_pipe.engine.options.calibration == Calibration(samples=8, seed=1, t_index_list=(20, 40))
    layers = int8_layers(int8_pipe.unet.model.compiled)
    assert layers.get("Convolution", 0) > 0 and layers.get("FullyConnected", 0) + layers.get("MatMul", 0) > 0
    assert not int8_layers(float_pipe.unet.model.compiled)
    for half in (int8_pipe.vae.encoder, int8_pipe.vae.decoder):  # the VAE stays float
        assert not int8_layers(half.compiled)
    unets = [manifest["key"] for _, manifest in EngineCache(tmp_path / "a").entries()
             if manifest["key"]["component"] == "unet"]
    none, int8 = sorted((dict(key["extra"]).get("quantize", "none") for key in unets), key=lambda label: label != "none")
    assert none == "none" and int8.startswith("int8+nncf-") and "+calib-8x-seed1-t20,40of50-" in int8

    want, got = _run(float_pipe), _run(int8_pipe)
    for a, b in zip(want, got):
        assert MIN_PSNR_INT8_DB <= psnr(a, b) < MIN_PSNR_DB  # int8 activations: further from float than weights
    # The same calibration, built again elsewhere: the same engine, the same frames.
    again = _run(pipe("b"))
    assert all(torch.equal(a, b) for a, b in zip(got, again))


def test_the_int8_cache_key_names_mode_and_calibration(tiny_model, tmp_path: Path) -> None:
    pytest.importorskip("nncf")

    def unet_key(**options: object) -> str:
        steps = engine_steps("openvino", tiny_model, CONFIG, EngineOptions(engine_dir=tmp_path, **options))[1]
        return next(step.key.name for step in steps if step.component.value == "unet")

    keys = [unet_key(), unet_key(quantize="int8-weights"), unet_key(quantize="int8"),
            unet_key(quantize="int8", calibration=Calibration(seed=1)),
            unet_key(quantize="int8", calibration=Calibration(samples=16)),
            unet_key(quantize="int8", calibration=Calibration(t_index_list=(10, 30))),
            unet_key(quantize="int8", calibration=Calibration(prompts=("a cat",)))]
    assert len(set(keys)) == len(keys)
    assert unet_key(quantize="int8") == unet_key(quantize="int8", calibration=Calibration(t_index_list=(20, 40)))
    assert unet_key(calibration=Calibration(seed=1)) == keys[0]  # only int8 reads the calibration
    assert not any(tmp_path.iterdir())  # planned, nothing built


def test_calibration_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"calibration samples=2 is outside \[4, 256\]") as error:
        Calibration(samples=2)
    assert error.value.field == "calibration samples"
    with pytest.raises(ConfigError, match="t_index_list entry 50 is outside"):
        Calibration(t_index_list=(10, 50))
    with pytest.raises(ConfigError, match="calibration prompts=.* must be a non-empty sequence of strings"):
        Calibration(prompts="a cat")
    with pytest.raises(ConfigError, match="calibration=.* must be a Calibration"):
        EngineOptions(calibration={"samples": 8})
    assert Calibration().for_stream(CONFIG).t_index_list == (20, 40)
    assert Calibration(t_index_list=(5,)).for_stream(CONFIG).t_index_list == (5,)


def test_quantize_is_validated_and_refused_where_it_cannot_run(tiny_model, monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"quantize='int4' is not one of 'none', 'int8-weights', 'int8'") as error:
        EngineOptions(quantize="int4")
    assert error.value.field == "quantize" and error.value.value == "int4"
    assert EngineOptions(quantize="INT8-Weights").quantize is Quantization.INT8_WEIGHTS
    assert EngineOptions().quantize is Quantization.NONE
    options = {**MODEL_DEFAULTS, **ENGINE_DEFAULTS, "quantize": "int8-weights"}
    assert model_options(options).engine.quantize is Quantization.INT8_WEIGHTS
    options.update(quantize="int8", calibration_samples=16, calibration_seed=5)  # --calibration-samples/-seed
    assert model_options(options).engine.calibration == Calibration(samples=16, seed=5)
    with pytest.raises(ConfigError, match=r"calibration samples=300 is outside \[4, 256\]"):
        model_options({**options, "calibration_samples": 300})

    assert EngineOptions(quantize="INT8").quantize is Quantization.INT8
    int8 = EngineOptions(engine_dir=tmp_path, quantize="int8-weights")
    for backend in ("torch", "onnxruntime"):
        for mode in ("int8-weights", "int8"):
            with pytest.raises(ConfigError, match=rf"quantize='{mode}' needs backend 'openvino'.*is '{backend}'"):
                StreamPipeline(tiny_model, CONFIG, backend=backend,
                               engine_options=EngineOptions(engine_dir=tmp_path, quantize=mode))
    with pytest.raises(ConfigError, match="needs backend 'openvino'.*is 'torch'"):  # auto with compile picks torch
        StreamPipeline(tiny_model, CONFIG, backend="auto",
                       engine_options=EngineOptions(engine_dir=tmp_path, quantize="int8-weights", compile=True))
    monkeypatch.setitem(sys.modules, "nncf", None)  # as if NNCF were not installed
    with pytest.raises(BackendUnavailable, match=r"pip install 'streamdiff\[int8\]'"):
        StreamPipeline(tiny_model, CONFIG, backend="openvino", engine_options=int8)
    assert not any(tmp_path.iterdir())  # refused before anything was built
