"""ControlNet and IP-Adapter on the OpenVINO backend (real OpenVINO, tiny random models, float32): streams equal the
same streams on eager torch, a call mixing rows with and without control equals eager, live scale changes need no
rebuild, and the residual inputs' layout is what a real ControlNet returns."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from streamdiff import ControlNetSpec, StreamConfig, StreamEngine, load_model
from streamdiff.backends.unet_inputs import controlnet_residual_inputs
from streamdiff.backends.keys import EngineOptions
from streamdiff.engine import EngineConfig
from streamdiff.models.controlnet import build_tiny_controlnet

pytest.importorskip("openvino")

SIZE = 64
TOLERANCE = 1e-4  # float32, max abs in [0, 1]; measured ~5e-7 (ControlNet) and ~1e-6 (IP-Adapter)
CONFIG = StreamConfig(width=SIZE, height=SIZE, t_index_list=(20, 40), cfg_type="self")


@pytest.fixture(scope="module")
def controlnets() -> dict[str, torch.nn.Module]:
    return {"a": build_tiny_controlnet(seed=1), "b": build_tiny_controlnet(seed=2)}


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ov-control")


def picture(i: int) -> np.ndarray:
    """A deterministic frame with edges that move with ``i``."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    return np.stack([(xx * 4 + 9 * i) % 256, (yy * 3) % 256, ((xx // 8 + yy // 8 + i) % 2) * 200 + 20],
                    -1).astype(np.uint8)


def control_picture(i: int) -> np.ndarray:
    """A deterministic control image: a disc that moves with ``i``."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    disc = ((xx - 20 - 2 * i) ** 2 + (yy - 30) ** 2 < 15 ** 2) * 255
    return np.stack([disc, disc[::-1], disc.T], -1).astype(np.uint8)


def _engine(model, backend: str, engine_dir: Path, controlnets=None, max_streams: int = 4) -> StreamEngine:
    return StreamEngine(model, EngineConfig(max_streams=max_streams, max_batch_rows=16), backend=backend,
                        engine_options=EngineOptions(engine_dir=engine_dir), controlnets=controlnets)


def _stream_outputs(engine: StreamEngine, settings: list[dict], ticks: int, changes: dict | None = None
                    ) -> list[list[torch.Tensor]]:
    """Streams opened with ``settings`` (one per stream) fed ``ticks`` frames, all in one tick each;
    ``changes[tick]``: ``(stream index, update kwargs)`` applied before that tick. Each stream's images."""
    streams = [engine.open_stream(CONFIG, prompt="a fox", seed=3 + i, guidance_scale=1.4, **s)
               for i, s in enumerate(settings)]
    got: list[list[torch.Tensor]] = [[] for _ in streams]
    for tick in range(ticks):
        if changes and tick in changes:
            index, update = changes[tick]
            streams[index].update(**update)
        for i, stream in enumerate(streams):
            control = control_picture(tick + i) if stream.prompt.controlnets else None
            stream.submit(picture(tick + i), control_image=control)
        outputs = engine.step({})
        for i, stream in enumerate(streams):
            if outputs[stream].images is not None:
                got[i].append(outputs[stream].images)
    for stream in streams:
        stream.close()
    return got


def _worst(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> float:
    assert [len(x) for x in a] == [len(x) for x in b] and all(len(x) > 0 for x in a)
    return max(float((p - q).abs().max()) for x, y in zip(a, b) for p, q in zip(x, y))


def test_controlnet_streams_mixed_with_a_plain_one_equal_eager_torch_and_a_scale_change_rebuilds_nothing(
    tiny_model, controlnets, engine_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Three streams in ONE U-Net call: two ControlNets on one, one on another, none on the third (its rows get
    zero residuals); then a call where no row has control (the graph's zero residuals); then a live scale change."""
    from streamdiff.backends.openvino_backend import OvUNet
    from streamdiff.backends.openvino_controlnet import OvControlNet

    settings = [dict(controlnets=[ControlNetSpec("a", scale=0.8, preprocessor="passthrough"),
                                  ControlNetSpec("b", scale=1.2, end=0.7)]),
                dict(controlnets=[ControlNetSpec("b", scale=0.6, preprocessor="passthrough")]),
                dict()]
    changes = {3: (0, dict(controlnets=[ControlNetSpec("a", scale=0.3, preprocessor="passthrough")])),
               4: (1, dict(controlnets=[]))}
    expected = _stream_outputs(_engine(tiny_model, "torch", engine_dir, controlnets), settings, 6, changes)
    with caplog.at_level(logging.INFO, logger="streamdiff.backends"):
        engine = _engine(tiny_model, "openvino", engine_dir, controlnets)
        got = _stream_outputs(engine, settings, 6, changes)
    assert isinstance(engine.unet, OvUNet) and engine.unet.feeds.residuals == controlnet_residual_inputs(
        tiny_model.unet)
    assert all(isinstance(engine.controlnet_engines[n], OvControlNet) for n in "ab")
    assert _worst(got, expected) <= TOLERANCE
    # Built once each (U-Net with residual inputs, VAE halves, two ControlNets); the scale changes rebuilt nothing.
    assert caplog.text.count("not built yet") == 5
    imports = engine.unet.model.imports
    assert imports == 1 and engine.controlnet_engines["a"].model.imports == 1
    # Without any control, the same graph (zero residuals) equals an engine without ControlNets.
    plain = _engine(tiny_model, "torch", engine_dir)
    alone = _stream_outputs(plain, [dict()], 3)
    again = _stream_outputs(engine, [dict()], 3)
    assert _worst(again, alone) <= TOLERANCE
    assert engine.unet.model.imports == imports


def test_a_controlnet_stream_changes_the_frames(tiny_model, controlnets, engine_dir: Path) -> None:
    """The OpenVINO ControlNet acts: the same stream with and without it differs (so the equality above can fail)."""
    engine = _engine(tiny_model, "openvino", engine_dir, controlnets)
    spec = [ControlNetSpec("a", scale=0.8, preprocessor="passthrough")]
    with_control = _stream_outputs(engine, [dict(controlnets=spec)], 3)
    without = _stream_outputs(engine, [dict()], 3)
    assert max(float((a - b).abs().max()) for a, b in zip(with_control[0], without[0])) > 1e-3


@pytest.fixture(scope="module")
def ip_model(tmp_path_factory: pytest.TempPathFactory):
    from streamdiff.models.ip_adapter import build_tiny_ip_adapter, save_ip_adapter
    from streamdiff.testing.components import save_tiny_model

    root = tmp_path_factory.mktemp("ov-ip")
    folder = save_tiny_model(root / "model", seed=7)
    adapter = save_ip_adapter(build_tiny_ip_adapter(load_model(str(folder), device="cpu").unet, seed=3), root / "ip")
    return load_model(str(folder), device="cpu", ip_adapter=adapter)


def _reference(seed: int, size: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3)).astype(np.uint8)


def test_ip_adapter_streams_equal_eager_torch_and_a_live_scale_change_rebuilds_nothing(
    ip_model, engine_dir: Path
) -> None:
    from streamdiff.backends.factory import choose_auto
    from streamdiff.backends.openvino_backend import OvUNet

    settings = [dict(reference_image=_reference(1), ip_adapter_scale=0.6),
                dict(reference_image=_reference(2), ip_adapter_scale=1.3), dict()]
    changes = {2: (0, dict(ip_adapter_scale=1.5)), 3: (1, dict(ip_adapter_scale=0.0))}
    expected = _stream_outputs(_engine(ip_model, "torch", engine_dir), settings, 5, changes)
    engine = _engine(ip_model, "openvino", engine_dir)
    got = _stream_outputs(engine, settings, 5, changes)
    assert isinstance(engine.unet, OvUNet) and {"ip_tokens", "ip_scale"} <= set(engine.unet.feeds.names)
    assert _worst(got, expected) <= TOLERANCE
    assert max(float((a - b).abs().max()) for a, b in zip(got[0], got[2])) > 1e-3  # the image prompt acts
    assert engine.unet.model.imports == 1  # scale changes are inputs: nothing rebuilt or imported again
    assert choose_auto(ip_model, EngineOptions())[0].value == "openvino"


def test_sdxl_controlnet_stream_equals_eager_torch(engine_dir: Path) -> None:
    model = load_model("tiny-sdxl", device="cpu")
    controlnets = {"a": build_tiny_controlnet(seed=1, sdxl=True)}
    settings = [dict(controlnets=[ControlNetSpec("a", scale=0.9, preprocessor="passthrough")]), dict()]
    expected = _stream_outputs(_engine(model, "torch", engine_dir, controlnets), settings, 3)
    got = _stream_outputs(_engine(model, "openvino", engine_dir, controlnets), settings, 3)
    assert _worst(got, expected) <= TOLERANCE
