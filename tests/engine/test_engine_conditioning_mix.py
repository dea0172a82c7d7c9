"""Every kind of per-stream conditioning on ONE engine at once: a tiny random model with an IP-Adapter and two named
ControlNets runs a stream with ControlNet A, one with ControlNet B, one with an image prompt and a plain one, all in
one U-Net call per tick (one call of each ControlNet over its rows), and each stream's outputs equal the same stream
run alone on the same engine setup (float32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from control_helpers import SIZE, TOLERANCE, CountingControlNet, control_picture, picture

from streamdiff import ControlNetSpec, StreamConfig, load_model
from streamdiff.backends.torch_backend import TorchUNet
from streamdiff.engine import EngineConfig, StreamEngine
from streamdiff.models.controlnet import build_tiny_controlnet
from streamdiff.models.ip_adapter import build_tiny_ip_adapter, save_ip_adapter
from streamdiff.testing.components import save_tiny_model

TICKS = 4


class RecordingUNet:
    """A U-Net engine that records, for every call, its rows, the rows with an image prompt (``ip_scale`` ≠ 0) and
    the rows with ControlNet residuals (any non-zero value in ``mid_residual``)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls: list[tuple[int, int, int]] = []

    def __call__(self, sample, timestep, encoder_hidden_states, **extras):
        ip = int(torch.count_nonzero(extras["ip_scale"])) if "ip_scale" in extras else 0
        control = (int((extras["mid_residual"].flatten(1).abs().amax(1) > 0).sum()) if "mid_residual" in extras
                   else 0)
        self.calls.append((int(sample.shape[0]), ip, control))
        return self.inner(sample, timestep, encoder_hidden_states, **extras)


@pytest.fixture(scope="module")
def ip_model(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("conditioning-mix")
    folder = save_tiny_model(root / "model", seed=7)
    unet = load_model(str(folder), device="cpu").unet
    return load_model(str(folder), device="cpu", ip_adapter=save_ip_adapter(build_tiny_ip_adapter(unet, seed=3),
                                                                            root / "ip"))


@pytest.fixture(scope="module")
def controlnets() -> dict[str, torch.nn.Module]:
    return {"A": build_tiny_controlnet(seed=1), "B": build_tiny_controlnet(seed=2)}


def reference() -> np.ndarray:
    rng = np.random.default_rng(2)
    return rng.integers(0, 256, (48, 48, 3)).astype(np.uint8)


# (config, settings, frames' control images or None); rows per U-Net call: 2 + 6 + 3 + 2.
MIX = [
    (StreamConfig(width=SIZE, height=SIZE, t_index_list=(20, 40), cfg_type="self"),
     dict(prompt="ink", seed=1, guidance_scale=1.4,
          controlnets=[ControlNetSpec("A", scale=0.9, preprocessor="passthrough")]), True),
    (StreamConfig(width=SIZE, height=SIZE, t_index_list=(15, 30, 45), cfg_type="full"),
     dict(prompt="oil", negative_prompt="gray", seed=2, guidance_scale=1.6,
          controlnets=[ControlNetSpec("B", scale=1.2, low_threshold=50, high_threshold=150)]), False),
    (StreamConfig(width=SIZE, height=SIZE, t_index_list=(30, 45), cfg_type="initialize"),
     dict(prompt="pencil", negative_prompt="color", seed=5, guidance_scale=1.8, reference_image=reference(),
          ip_adapter_scale=0.8), False),
    (StreamConfig(width=SIZE, height=SIZE, t_index_list=(25, 40), cfg_type="none"), dict(prompt="plain", seed=3),
     False),
]


def make_engine(model, controlnets, max_streams: int) -> StreamEngine:
    return StreamEngine(model, EngineConfig(max_streams=max_streams, max_batch_rows=32),
                        unet=RecordingUNet(TorchUNet(model.unet)), controlnets=controlnets)


def frame_of(stream: int, tick: int) -> tuple[np.ndarray, np.ndarray | None]:
    return picture(tick + 3 * stream), (control_picture(tick + stream) if MIX[stream][2] else None)


def test_four_streams_share_one_call_per_tick_and_each_equals_itself_alone(ip_model, controlnets) -> None:
    counted = {name: CountingControlNet(model) for name, model in controlnets.items()}
    engine = make_engine(ip_model, counted, 4)
    streams = [engine.open_stream(config, **settings) for config, settings, _ in MIX]
    together: list[list[torch.Tensor]] = [[] for _ in streams]
    for tick in range(TICKS):
        for i, stream in enumerate(streams):
            frame, control = frame_of(i, tick)
            stream.submit(frame, control_image=control)
        outputs = engine.step({})
        for i, stream in enumerate(streams):
            out = outputs.get(stream)
            if out is not None and out.images is not None:
                together[i].append(out.images)
    for i, stream in enumerate(streams):
        together[i] += [o.images for o in engine.flush(stream)]

    # The ticks: ONE U-Net call of all four streams' rows (2 + 6 + 3 + 2) with the image prompt in the IP stream's
    # 3 rows and ControlNet residuals in A's 2 and B's 6; ONE call of each ControlNet over its stream's rows.
    ticks = engine.unet.calls[:TICKS]
    assert ticks == [(13, 3, 8)] * TICKS
    assert engine.stats.unet_calls >= TICKS
    assert counted["A"].batches[:TICKS] == [2] * TICKS
    assert counted["B"].batches[:TICKS] == [6] * TICKS

    for i, (config, settings, _) in enumerate(MIX):
        solo = make_engine(ip_model, controlnets, 1)
        stream = solo.open_stream(config, **settings)
        alone = []
        for tick in range(TICKS):
            frame, control = frame_of(i, tick)
            stream.submit(frame, control_image=control)
            out = solo.step({}).get(stream)
            if out is not None and out.images is not None:
                alone.append(out.images)
        alone += [o.images for o in solo.flush(stream)]
        assert len(together[i]) == len(alone) == TICKS, i
        worst = max(float((a - b).abs().max()) for a, b in zip(together[i], alone))
        assert worst <= TOLERANCE, (i, worst)
