"""Backends through the pipeline: ONNX Runtime gives torch's frames, engines are reused, choices are explained."""

from __future__ import annotations

import importlib.machinery
import json
import logging
import sys
from pathlib import Path

import pytest
import torch

from streamdiff import BackendUnavailable, ConfigError, StreamConfig, StreamPipeline
from streamdiff.backends import factory
from streamdiff.backends.cache import MANIFEST, EngineCache
from streamdiff.backends.keys import EngineOptions
from streamdiff.config import BackendKind

CONFIG = StreamConfig(width=64, height=64, t_index_list=(20, 40), cfg_type="initialize")


def _frames(count: int = 5) -> list[torch.Tensor]:
    return [torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(count)]


def _run(pipe: StreamPipeline) -> list[torch.Tensor]:
    pipe.prepare(prompt="a red fox", guidance_scale=1.4, delta=0.9, seed=3)
    outputs = [pipe.step(frame).images for frame in _frames()]
    return [o for o in outputs if o is not None]


def _options(tmp_path: Path) -> EngineOptions:
    return EngineOptions(engine_dir=tmp_path, min_resolution=32, max_resolution=128, opt_resolution=64)


def test_onnxruntime_pipeline_matches_torch_and_reuses_its_engines(
    tiny_model, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reference = _run(StreamPipeline(tiny_model, CONFIG, backend="torch"))
    with caplog.at_level(logging.INFO, logger="streamdiff.backends"):
        ort_pipe = StreamPipeline(tiny_model, CONFIG, backend="onnxruntime", engine_options=_options(tmp_path))
    assert caplog.text.count("not built yet") == 3
    frames = _run(ort_pipe)
    assert len(frames) == len(reference) == 4
    for expected, actual in zip(reference, frames):
        error = float((actual - expected).abs().max() / expected.abs().max())
        assert error <= 1e-3, error

    manifests = {p: (p / MANIFEST).read_text() for p, _ in EngineCache(tmp_path).entries()}
    assert len(manifests) == 3
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="streamdiff.backends"):
        again = StreamPipeline(tiny_model, CONFIG.with_changes(width=96), backend="onnxruntime",
                               engine_options=_options(tmp_path))
    assert "not built yet" not in caplog.text and "built engine" not in caplog.text
    assert {p: (p / MANIFEST).read_text() for p, _ in EngineCache(tmp_path).entries()} == manifests
    again.prepare(prompt="a red fox")
    again.step(torch.rand(1, 3, 64, 96))
    assert again.step(torch.rand(1, 3, 64, 96)).images.shape == (1, 3, 64, 96)  # same engine, another size

    # A change of U-Net batch (cfg mode) needs a new U-Net engine only; the VAE engines are reused.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="streamdiff.backends"):
        StreamPipeline(tiny_model, CONFIG.with_changes(cfg_type="full"), backend="onnxruntime",
                       engine_options=_options(tmp_path))
    assert caplog.text.count("not built yet") == 1 and "export unet" in caplog.text
    keys = [json.loads(m)["key"]["shapes"]["batch"] for m in manifests.values()]
    assert sorted(keys) == [[1, 1], [1, 1], [3, 3]]


def test_live_update_remakes_engines_for_new_shapes(tiny_model, tmp_path: Path) -> None:
    """A live change of U-Net batch (cfg mode) or of frames per call gets engines of the new shapes, built once."""
    pipe = StreamPipeline(tiny_model, CONFIG, backend="onnxruntime", engine_options=_options(tmp_path))
    pipe.prepare(prompt="a red fox", negative_prompt="blur", guidance_scale=1.5)
    first_unet = pipe.unet
    pipe.update(cfg_type="full", frame_buffer_size=2)  # applied before the next frame
    outs = [pipe.step(torch.rand(2, 3, 64, 64)) for _ in range(CONFIG.denoising_steps)]
    assert pipe.unet is not first_unet
    assert outs[-1].images.shape == (2, 3, 64, 64)
    reference = StreamPipeline(tiny_model, pipe.config, backend="torch")
    reference.prepare(prompt="a red fox", negative_prompt="blur", guidance_scale=1.5)
    frames = [torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    pipe.update(seed=2)  # same noise as the reference
    pipe.flush()
    ours = [pipe.step(f).images for f in frames]
    theirs = [reference.step(f).images for f in frames]
    for a, b in zip(ours[CONFIG.denoising_steps - 1 :], theirs[CONFIG.denoising_steps - 1 :]):
        assert float((a - b).abs().max()) <= 1e-3
    batches = sorted(json.loads((p / MANIFEST).read_text())["key"]["shapes"]["batch"][0]
                     for p, _ in EngineCache(tmp_path).entries())
    assert 2 * CONFIG.denoising_steps * 2 in batches  # the full-CFG U-Net batch 2·n·F was built


def test_missing_backends_name_their_extra(tiny_model, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable, match=r"streamdiff\[tensorrt\]"):
        StreamPipeline(tiny_model, CONFIG, backend="tensorrt", engine_options=_options(tmp_path))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if onnxruntime were not installed
    with pytest.raises(BackendUnavailable, match=r"pip install 'streamdiff\[onnx\]'"):
        StreamPipeline(tiny_model, CONFIG, backend="onnxruntime", engine_options=_options(tmp_path))
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(BackendUnavailable, match=r"pip install 'streamdiff\[openvino\]'"):
        StreamPipeline(tiny_model, CONFIG, backend="openvino", engine_options=_options(tmp_path))
    with pytest.raises(ConfigError, match="backend='onnx' is not one of 'torch', 'onnxruntime', 'tensorrt', 'openvino'"):
        StreamPipeline(tiny_model, CONFIG, backend="onnx")


def test_auto_says_what_it_picked_and_why(
    tiny_model, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import dataclasses

    options = EngineOptions()
    bf16 = dataclasses.replace(tiny_model, dtype=torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="streamdiff.backends.factory"):
        assert factory.resolve_backend("auto", bf16, options) is BackendKind.OPENVINO
    assert "backend auto: picked openvino because bfloat16 on the CPU runs fastest in OpenVINO" in caplog.text
    kind, reason = factory.choose_auto(tiny_model, options)
    assert kind is BackendKind.OPENVINO and reason.startswith("float32 on the CPU")
    kind, reason = factory.choose_auto(bf16, EngineOptions(compile=True))
    assert kind is BackendKind.TORCH and "AOTInductor" in reason
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if openvino were not installed
    kind, reason = factory.choose_auto(bf16, options)
    assert kind is BackendKind.TORCH and "streamdiff[openvino]" in reason
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="streamdiff.backends.factory"):
        assert factory.resolve_backend("auto", tiny_model, options) is BackendKind.ONNXRUNTIME
    assert "backend auto: picked onnxruntime because float32 on the CPU without openvino" in caplog.text
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    kind, reason = factory.choose_auto(tiny_model, options)
    assert kind is BackendKind.TORCH and "streamdiff[openvino]" in reason


def test_torch_backend_channels_last_gives_the_same_frames(tiny_model) -> None:
    import copy

    model = copy.copy(tiny_model)
    model.unet = copy.deepcopy(tiny_model.unet)
    model.vae = copy.deepcopy(tiny_model.vae)
    reference = _run(StreamPipeline(tiny_model, CONFIG, backend="torch"))
    frames = _run(StreamPipeline(model, CONFIG, backend="torch", engine_options=EngineOptions(channels_last=True)))
    for expected, actual in zip(reference, frames):
        assert float((actual - expected).abs().max() / expected.abs().max()) <= 1e-4


@pytest.mark.parametrize("breakage", ["import", "attribute", "too-old"])
def test_auto_falls_back_with_a_warning_when_tensorrt_is_broken(
    breakage: str, tiny_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A TensorRT whose import fails (missing native library: OSError), whose module fails on use, or that is too
    old: ``auto`` on a GPU picks torch and says why; asking for ``tensorrt`` itself is a BackendUnavailable."""
    import dataclasses
    import types

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    if breakage == "import":
        package = tmp_path / "site" / "tensorrt"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(
            'raise OSError("libnvinfer.so.10: cannot open shared object file: No such file or directory")\n')
        monkeypatch.syspath_prepend(str(tmp_path / "site"))
        cause = "OSError: libnvinfer.so.10: cannot open shared object file"
    elif breakage == "attribute":

        class Broken(types.ModuleType):
            def __getattr__(self, name: str):  # noqa: ANN204
                raise RuntimeError("CUDA initialization failure with error: 35")

        module = Broken("tensorrt")
        module.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
        monkeypatch.setitem(sys.modules, "tensorrt", module)
        cause = "RuntimeError: CUDA initialization failure with error: 35"
    else:
        from fake_tensorrt import make_fake_tensorrt

        module = make_fake_tensorrt("8.6.1")
        module.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
        monkeypatch.setitem(sys.modules, "tensorrt", module)
        cause = "TensorRT 8.6.1 is too old"
    gpu_model = dataclasses.replace(tiny_model, device=torch.device("cuda"), dtype=torch.float16)
    with caplog.at_level(logging.INFO, logger="streamdiff.backends.factory"):
        assert factory.resolve_backend("auto", gpu_model, EngineOptions()) is BackendKind.TORCH
    assert "backend auto: TensorRT is installed but unusable, falling back to torch" in caplog.text
    assert cause in caplog.text
    assert "backend auto: picked torch because TensorRT is installed but unusable" in caplog.text
    with pytest.raises(BackendUnavailable, match=r"streamdiff\[tensorrt\]"):
        factory.resolve_backend("tensorrt", gpu_model, EngineOptions())


def test_auto_on_a_gpu_without_tensorrt_picks_torch_quietly(
    tiny_model, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import dataclasses

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as if not installed
    gpu_model = dataclasses.replace(tiny_model, device=torch.device("cuda"), dtype=torch.float16)
    with caplog.at_level(logging.WARNING, logger="streamdiff.backends.factory"):
        kind, reason = factory.choose_auto(gpu_model, EngineOptions())
    assert kind is BackendKind.TORCH and "pip install 'streamdiff[tensorrt]'" in reason and caplog.text == ""
