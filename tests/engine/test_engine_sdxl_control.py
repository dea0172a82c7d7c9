"""SDXL ControlNets in the engine, on the built-in ``tiny-sdxl`` model with tiny random SDXL ControlNets (CPU,
float32): judged by diffusers' ``StableDiffusionXLControlNetImg2ImgPipeline`` (one step with one and with two
ControlNets), the Stream Batch against the sequential path, ``tiny`` on an SDXL engine, and family refusals."""

from __future__ import annotations

import pytest
import torch
from control_helpers import (
    SIZE, check_one_step_equals_diffusers, check_two_controlnets_equal_diffusers, control_picture, make_engine,
    picture,
)

from streamdiff import ConfigError, ControlNetSpec, StreamConfig, StreamEngine
from streamdiff.engine import EngineConfig
from streamdiff.models.controlnet import build_tiny_controlnet
from streamdiff.models.sdxl import is_sdxl_unet

@pytest.fixture(scope="module")
def sdxl_model(cache_dir):
    from streamdiff import load_model

    return load_model("tiny-sdxl", device="cpu")


@pytest.fixture(scope="module")
def controlnets() -> dict[str, torch.nn.Module]:
    return {"a": build_tiny_controlnet(seed=1, sdxl=True), "b": build_tiny_controlnet(seed=2, sdxl=True)}


@pytest.mark.parametrize("cfg", ["none", "full"])
def test_one_step_equals_diffusers_sdxl_controlnet_img2img(sdxl_model, controlnets, cfg) -> None:
    check_one_step_equals_diffusers(sdxl_model, controlnets, cfg)


def test_two_controlnets_equal_diffusers_sdxl_multicontrolnet(sdxl_model, controlnets) -> None:
    check_two_controlnets_equal_diffusers(sdxl_model, controlnets)


def test_the_controlnet_takes_the_added_conditions(sdxl_model, controlnets) -> None:
    """Another pooled prompt embedding changes the ControlNet's residuals, not just the U-Net's own conditions."""
    from streamdiff.core.control import ControlRows
    from streamdiff.core.step import UNetRows
    from streamdiff.backends.torch_backend import TorchControlNet
    from streamdiff.engine.control import controlnet_extras

    generator = torch.Generator().manual_seed(0)
    sample = torch.randn((1, 4, 8, 8), generator=generator)
    hidden = torch.randn((1, 77, 96), generator=generator)
    time_ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]], dtype=torch.float32)
    control = [{"a": ControlRows(image=torch.rand((1, 3, SIZE, SIZE), generator=generator), scale=torch.ones(1))}]
    residuals = []
    for pooled in (torch.zeros((1, 32)), torch.ones((1, 32))):
        rows = UNetRows(sample, torch.tensor([500]), hidden, extras={"text_embeds": pooled, "time_ids": time_ids})
        residuals.append(controlnet_extras({"a": TorchControlNet(controlnets["a"])}, rows, [(0, 1)], control)["mid_residual"])
    assert float((residuals[0] - residuals[1]).abs().max()) > 1e-4


@pytest.mark.parametrize("cfg", ["self", "initialize", "full"])
def test_stream_batch_equals_sequential_sdxl_controlnet(sdxl_model, controlnets, cfg) -> None:
    specs = [ControlNetSpec("a", scale=0.8, preprocessor="passthrough"), ControlNetSpec("b", scale=1.1, start=0.3)]
    settings = dict(prompt="a cat", negative_prompt="dark", guidance_scale=1.5, delta=0.9, seed=4, controlnets=specs)
    outs = {}
    for batched in (True, False):
        config = StreamConfig(width=SIZE, height=SIZE, t_index_list=(10, 25, 40), cfg_type=cfg,
                              use_denoising_batch=batched)
        engine = make_engine(sdxl_model, controlnets)
        stream = engine.open_stream(config, **settings)
        got = []
        for i in range(5):
            stream.submit(picture(i), control_image=control_picture(i))
            out = engine.step({}).get(stream)
            if out is not None and out.images is not None:
                got.append(out.images)
        outs[batched] = got + [o.images for o in engine.flush(stream)]
    assert len(outs[True]) == len(outs[False]) == 5
    worst = max(float((a - b).abs().max()) for a, b in zip(outs[True], outs[False]))
    assert worst <= 1e-5


def test_tiny_on_an_sdxl_engine_is_the_sdxl_controlnet_and_families_must_match(sdxl_model, tiny_model) -> None:
    engine = StreamEngine(sdxl_model, EngineConfig(max_streams=1), controlnets={"t": "tiny"})
    assert is_sdxl_unet(engine.controlnets["t"])
    config = StreamConfig(width=SIZE, height=SIZE, t_index_list=(30,), cfg_type="none")
    stream = engine.open_stream(config, controlnets=[ControlNetSpec("t", preprocessor="passthrough")])
    stream.submit(picture(0), control_image=control_picture(0))
    assert engine.step({})[stream].images is not None
    with pytest.raises(ConfigError, match="'sd' is not an SDXL ControlNet but the engine's model is SDXL"):
        StreamEngine(sdxl_model, controlnets={"sd": build_tiny_controlnet()})
    with pytest.raises(ConfigError, match=r"'xl' is an SDXL ControlNet .* but the engine's model is SD 1.x/2.x"):
        StreamEngine(tiny_model, controlnets={"xl": "tiny-sdxl"})
