"""ControlNet and IP-Adapter streams on compiled backends (ONNX Runtime, torch ``compile=True``) equal the same
streams on eager torch: tiny random models, float32, CPU. Rows with and without control share calls, and calls where
no row has control run the same graph with zero residuals (backends/unet_inputs.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from control_helpers import SIZE, TOLERANCE, control_picture, picture

from streamdiff import ControlNetSpec, StreamConfig, StreamEngine, load_model
from streamdiff.backends.cache import MANIFEST, EngineCache
from streamdiff.backends.keys import EngineOptions
from streamdiff.engine import EngineConfig
from streamdiff.models.controlnet import build_tiny_controlnet

CONFIG = StreamConfig(width=SIZE, height=SIZE, t_index_list=(20, 40), cfg_type="self")
MEASURED: dict[str, float] = {}  # max abs difference to eager torch, per test (printed with -s)


@pytest.fixture(scope="module")
def controlnets() -> dict[str, torch.nn.Module]:
    return {"a": build_tiny_controlnet(seed=1)}


@pytest.fixture(scope="module")
def ip_model(cache_dir):
    return load_model("tiny", device="cpu", ip_adapter="tiny")


def reference(i: int) -> np.ndarray:
    rng = np.random.default_rng(40 + i)
    return rng.integers(0, 256, (48, 48, 3)).astype(np.uint8)


def run(engine: StreamEngine, settings: list[dict], ticks: list[list[int]]) -> list[list[torch.Tensor]]:
    """Open a stream per ``settings``; tick ``t`` submits frame t (with its control image) to the streams
    ``ticks[t]`` names. Returns each stream's outputs."""
    streams = [engine.open_stream(CONFIG, prompt="a house", seed=3, guidance_scale=1.3, **s) for s in settings]
    outs: list[list[torch.Tensor]] = [[] for _ in streams]
    for t, members in enumerate(ticks):
        for i in members:
            streams[i].submit(picture(t), control_image=control_picture(t) if settings[i].get("controlnets") else None)
        produced = engine.step({})
        for i in members:
            if streams[i] in produced and produced[streams[i]].images is not None:
                outs[i].append(produced[streams[i]].images)
    return outs


def compare(name: str, got: list[list[torch.Tensor]], want: list[list[torch.Tensor]]) -> float:
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        assert len(a) == len(b) > 0
        worst = max(worst, *(float((x - y).abs().max()) for x, y in zip(a, b)))
    MEASURED[name] = worst
    print(f"{name}: max abs difference to eager torch {worst:.2e}")
    return worst


def unet_extras_in_cache(folder: Path) -> list[str]:
    keys = [json.loads((p / MANIFEST).read_text())["key"] for p, _ in EngineCache(folder).entries()]
    return [dict(k["extra"]).get("unet_extras", "") for k in keys if k["component"] == "unet"]


def test_controlnet_streams_on_onnxruntime_equal_eager_torch(tiny_model, controlnets, tmp_path: Path) -> None:
    """A ControlNet stream and a plain one share calls (rows with and without control), then the plain one runs
    alone (calls without control: zero residuals); both equal eager torch."""
    from streamdiff.backends.onnxruntime_backend import OrtUNet

    settings = [dict(controlnets=[ControlNetSpec("a", scale=0.9, preprocessor="passthrough")]), dict()]
    ticks = [[0, 1], [0, 1], [0, 1], [1], [1], [0, 1]]
    engines = {}
    for backend in ("onnxruntime", "torch"):
        engines[backend] = StreamEngine(tiny_model, EngineConfig(max_streams=2, max_batch_rows=4), backend=backend,
                                        engine_options=EngineOptions(engine_dir=tmp_path), controlnets=controlnets)
    got, want = (run(engines[b], settings, ticks) for b in ("onnxruntime", "torch"))
    assert isinstance(engines["onnxruntime"].unet, OrtUNet)
    assert compare("controlnet onnxruntime", got, want) <= TOLERANCE
    assert float((got[0][0] - got[1][0]).abs().max()) > 1e-3  # the ControlNet changes the frame
    (extras,) = unet_extras_in_cache(tmp_path)
    assert extras.split(",") == [f"down_residual_{i}" for i in range(6)] + ["mid_residual"]


def test_ip_adapter_streams_on_onnxruntime_equal_eager_torch(ip_model, tmp_path: Path) -> None:
    """Streams with two image prompts (scales 0.7, 1.4) and none share calls; all equal eager torch."""
    settings = [dict(reference_image=reference(0), ip_adapter_scale=0.7),
                dict(reference_image=reference(1), ip_adapter_scale=1.4), dict()]
    ticks = [[0, 1, 2]] * 4
    got = run(StreamEngine(ip_model, EngineConfig(max_streams=3, max_batch_rows=6), backend="onnxruntime",
                           engine_options=EngineOptions(engine_dir=tmp_path)), settings, ticks)
    want = run(StreamEngine(ip_model, EngineConfig(max_streams=3, max_batch_rows=6)), settings, ticks)
    assert compare("ip-adapter onnxruntime", got, want) <= TOLERANCE
    assert float((got[0][0] - got[2][0]).abs().max()) > 1e-3  # the image prompt changes the frame
    assert unet_extras_in_cache(tmp_path) == ["ip_scale,ip_tokens"]


def test_compiled_torch_takes_sdxl_controlnet_and_ip_adapter_inputs(cache_dir, tmp_path: Path) -> None:
    """compile=True (AOTInductor, one package) runs an SDXL stream with an image prompt and a ControlNet that acts on
    the first step only (rows with and without control in each call) as eager torch does: all three kinds of extra
    inputs in one build (an AOTInductor build takes a minute or two here)."""
    from streamdiff.backends.compiled import CompiledUNet

    model = load_model("tiny-sdxl", device="cpu", ip_adapter="tiny")
    controlnets = {"a": build_tiny_controlnet(seed=1, sdxl=True)}
    spec = ControlNetSpec("a", scale=1.1, end=0.5, preprocessor="passthrough")
    settings = [dict(reference_image=reference(2), ip_adapter_scale=0.8, controlnets=[spec])]
    ticks = [[0]] * 4
    compiled = StreamEngine(model, EngineConfig(max_streams=1), backend="torch", controlnets=controlnets,
                            engine_options=EngineOptions(compile=True, engine_dir=tmp_path))
    got = run(compiled, settings, ticks)
    want = run(StreamEngine(model, EngineConfig(max_streams=1), controlnets=controlnets), settings, ticks)
    assert isinstance(compiled.unet, CompiledUNet)
    assert compare("sdxl + controlnet + ip-adapter compile=True", got, want) <= TOLERANCE
    (extras,) = unet_extras_in_cache(tmp_path)
    assert extras.endswith("ip_scale,ip_tokens,mid_residual,text_embeds,time_ids")
