"""The exported U-Net's extra inputs (backends/unet_inputs.py): ControlNet residuals read from the U-Net, zero
residuals for calls without control, the cache key, and the TensorRT plan's profiles and bindings (fake tensorrt)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from fake_tensorrt import analytic
from streamdiff import load_model
from streamdiff.backends.builders import spec_for, tensorrt_plan, unet_extra_inputs
from streamdiff.backends.keys import Component, EngineOptions, ShapeRange, engine_key
from streamdiff.backends.unet_inputs import ExtraFeeds, ExtraInput, controlnet_residual_inputs
from streamdiff.errors import ConfigError
from streamdiff.models.controlnet import build_tiny_controlnet

CPU = torch.device("cpu")
RESIDUALS = EngineOptions(controlnet_residuals=True)
# Sides 64 … 128 px (latents 8 … 16), 1 … 4 rows, tuned for 2 rows at 64 × 96.
SHAPES = ShapeRange(batch=(1, 4), height=(64, 128), width=(64, 128), opt_batch=2, opt_height=64, opt_width=96)


@pytest.fixture(scope="module")
def ip_model(cache_dir):
    return load_model("tiny", device="cpu", ip_adapter="tiny")


@pytest.mark.parametrize("side", [(8, 8), (16, 24)])
def test_residual_inputs_are_what_the_controlnet_returns(tiny_model, side) -> None:
    h, w = side
    controlnet = build_tiny_controlnet(seed=1)
    hidden = torch.randn(2, 77, int(tiny_model.unet.config.cross_attention_dim))
    with torch.no_grad():
        down, mid = controlnet(torch.randn(2, 4, h, w), torch.tensor([10, 500]), encoder_hidden_states=hidden,
                               controlnet_cond=torch.rand(2, 3, 8 * h, 8 * w), return_dict=False)
    inputs = controlnet_residual_inputs(tiny_model.unet)
    assert [i.shape(2, h, w) for i in inputs] == [tuple(r.shape) for r in (*down, mid)]
    assert [i.name for i in inputs] == [f"down_residual_{k}" for k in range(len(down))] + ["mid_residual"]


def test_extra_feeds_fill_zero_residuals_and_refuse_partial_or_unknown_extras() -> None:
    feeds = ExtraFeeds([ExtraInput("mid_residual", (6,), 4), ExtraInput("ip_scale", ()),
                        ExtraInput("down_residual_0", (3,), 1)])
    assert feeds.names == ("down_residual_0", "ip_scale", "mid_residual")  # graph order
    sample, scale = torch.randn(2, 4, 8, 12), torch.ones(2)
    out = feeds.complete(sample, {"ip_scale": scale})
    assert list(out) == ["down_residual_0", "ip_scale", "mid_residual"]
    assert out["down_residual_0"].shape == (2, 3, 8, 12) and out["mid_residual"].shape == (2, 6, 2, 3)
    assert not out["down_residual_0"].any() and not out["mid_residual"].any() and out["ip_scale"] is scale
    assert feeds.complete(sample, {"ip_scale": scale})["mid_residual"] is out["mid_residual"]  # kept per shape
    given = {"down_residual_0": torch.ones(2, 3, 8, 12), "mid_residual": torch.ones(2, 6, 2, 3), "ip_scale": scale}
    assert feeds.complete(sample, given)["mid_residual"] is given["mid_residual"]
    with pytest.raises(ConfigError, match=r"residuals all or none\), got \('down_residual_0', 'ip_scale'\)"):
        feeds.complete(sample, {"ip_scale": scale, "down_residual_0": given["down_residual_0"]})
    with pytest.raises(ConfigError, match="got \\('ip_scale', 'text_embeds'\\)"):
        feeds.complete(sample, {"ip_scale": scale, "text_embeds": torch.ones(2, 8)})
    with pytest.raises(ConfigError, match="got \\(\\)"):
        feeds.complete(sample, {})  # ip_scale is not optional
    with pytest.raises(ConfigError, match="'bogus' is not one of"):
        ExtraInput("bogus", (1,))


def test_the_extra_inputs_and_the_cache_key_follow_the_model_and_the_options(tiny_model, ip_model) -> None:
    assert unet_extra_inputs(tiny_model) == ()
    assert [i.name for i in unet_extra_inputs(ip_model)] == ["ip_scale", "ip_tokens"]
    assert unet_extra_inputs(ip_model)[1] == ExtraInput("ip_tokens", (4, 64))  # the tiny adapter: 4 tokens of 64
    names = [i.name for i in unet_extra_inputs(ip_model, RESIDUALS)]
    assert names == [*(f"down_residual_{k}" for k in range(6)), "ip_scale", "ip_tokens", "mid_residual"]
    from streamdiff.backends.builders import key_extra

    keys = {}
    for name, model, options in (("sd", tiny_model, EngineOptions()), ("sd+cn", tiny_model, RESIDUALS),
                                 ("ip", ip_model, EngineOptions())):
        keys[name] = engine_key(model, Component.UNET, SHAPES, backend="onnx", backend_version="1",
                                dtype=torch.float32, opset=17, target="portable",
                                extra=key_extra(model, Component.UNET, options))
    assert len({key.digest() for key in keys.values()}) == 3
    assert dict(keys["sd+cn"].extra)["unet_extras"].startswith("down_residual_0,down_residual_1,")
    fingerprint = ip_model.ip_adapter.fingerprint  # the graph holds the IP-Adapter's weights
    assert dict(keys["ip"].extra) == {"unet_extras": "ip_scale,ip_tokens", "ip_adapter": fingerprint}
    assert "unet_extras" not in dict(keys["sd"].extra)


def test_the_tensorrt_profile_covers_the_residual_and_ip_inputs(ip_model) -> None:
    plan = tensorrt_plan(ip_model, Component.UNET, SHAPES, Path("model.onnx"), options=RESIDUALS)
    profile = {p.name: (p.min, p.opt, p.max) for p in plan.profile}
    # latents 8×8 (min), 8×12 (opt), 16×16 (max); strides 1, 2, 4 over them
    assert profile["sample"] == ((1, 4, 8, 8), (2, 4, 8, 12), (4, 4, 16, 16))
    assert profile["down_residual_0"] == ((1, 32, 8, 8), (2, 32, 8, 12), (4, 32, 16, 16))
    assert profile["down_residual_2"] == ((1, 32, 4, 4), (2, 32, 4, 6), (4, 32, 8, 8))
    assert profile["down_residual_5"] == ((1, 64, 2, 2), (2, 64, 2, 3), (4, 64, 4, 4))
    assert profile["mid_residual"] == ((1, 64, 2, 2), (2, 64, 2, 3), (4, 64, 4, 4))
    assert profile["ip_tokens"] == ((1, 4, 64), (2, 4, 64), (4, 4, 64))
    assert profile["ip_scale"] == ((1,), (2,), (4,))
    assert len(profile) == 3 + 6 + 3


@pytest.fixture(scope="module")
def extras_graph(ip_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny IP-Adapter model's U-Net with residual inputs, exported in float16 (not folded: fast)."""
    from streamdiff.backends.builders import component_module
    from streamdiff.backends.onnx_export import export_module

    module = copy.deepcopy(component_module(ip_model, Component.UNET, RESIDUALS)).half()
    spec = spec_for(ip_model, Component.UNET, torch.float16, CPU, RESIDUALS)
    path = tmp_path_factory.mktemp("extras") / "model.onnx"
    return export_module(module, spec, SHAPES, path, 17, fold=False)


def test_tensorrt_builds_and_binds_the_residual_and_ip_inputs(fake_trt, ip_model, extras_graph: Path,
                                                              tmp_path: Path) -> None:
    from streamdiff.backends.tensorrt_build import build_engine
    from streamdiff.backends.tensorrt_runtime import TrtUNet

    plan = tensorrt_plan(ip_model, Component.UNET, SHAPES, extras_graph, options=RESIDUALS)
    build_engine(plan, tmp_path / "model.plan", trt=fake_trt, cuda=fake_trt.cuda)
    (profile,) = fake_trt.builders[-1].config.profiles
    assert profile.shapes == {p.name: (p.min, p.opt, p.max) for p in plan.profile}  # what the builder was given
    assert profile.shapes["down_residual_4"] == ((1, 32, 2, 2), (2, 32, 2, 3), (4, 32, 4, 4))

    extras = unet_extra_inputs(ip_model, RESIDUALS)
    unet = TrtUNet(tmp_path / "model.plan", CPU, extras=extras, cuda=fake_trt.cuda, trt=fake_trt)
    g = torch.Generator().manual_seed(0)
    sample, timestep, hidden = torch.randn(3, 4, 16, 8, generator=g), torch.tensor([900, 500, 100]), \
        torch.randn(3, 77, 64, generator=g)
    ip = {"ip_tokens": torch.randn(3, 4, 64, generator=g), "ip_scale": torch.tensor([0.0, 0.5, 1.5])}
    residuals = {e.name: torch.randn(e.shape(3, 16, 8), generator=g) + 1 for e in extras if e.stride}
    for given in (residuals, {}):
        out = unet(sample, timestep, hidden, **ip, **given)
        feeds = {e.name: given.get(e.name, torch.zeros(e.shape(3, 16, 8))) for e in extras if e.stride}
        expected = analytic({"sample": sample.half(), "timestep": timestep.float(), "encoder_hidden_states":
                             hidden.half(), **{k: v.half() for k, v in {**ip, **feeds}.items()}})["noise_pred"]
        assert float((out - expected.float()).abs().max()) <= 1e-3 * float(expected.abs().max())
        (slot,) = unet.engine.slots.values()  # one shape: the same slot, its buffers bound
        assert slot.tensors["down_residual_2"].shape == (3, 32, 8, 4) and slot.tensors["ip_tokens"].shape == (3, 4, 64)
        assert torch.equal(slot.tensors["mid_residual"], feeds["mid_residual"].half())
    assert float((unet(sample, timestep, hidden, **ip, **residuals) - out).abs().max()) > 1e-3  # residuals count
    with pytest.raises(ConfigError, match="residual"):
        unet(sample, timestep, hidden, **ip, down_residual_0=residuals["down_residual_0"])
