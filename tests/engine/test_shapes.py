"""The frame sizes an engine runs: the model's factor (× the U-Net's down factor when traced), the side range,
the operator's list — refused in check_settings with field, value and what is allowed, never accepted then failed."""

from __future__ import annotations

import pytest
import torch

from streamdiff import StreamConfig, StreamEngine
from streamdiff.backends.keys import EngineOptions
from streamdiff.config import BackendKind
from streamdiff.engine import EngineConfig, SizeRule
from streamdiff.engine.shapes import size_rule
from streamdiff.errors import ConfigError

MULTI = EngineConfig(max_streams=4)
SINGLE = EngineConfig(max_streams=1)


def test_the_tiny_model_knows_its_factors(tiny_model) -> None:
    assert (tiny_model.vae_scale_factor, tiny_model.unet_down_factor) == (8, 4)


@pytest.mark.parametrize("backend, options, config, expected", [
    (BackendKind.TORCH, EngineOptions(), MULTI, SizeRule(8, 8, 4096, None, "the tiny-random model's VAE factor 8")),
    (BackendKind.OPENVINO, EngineOptions(), MULTI, SizeRule(32, 64, 1024, None, "the tiny-random model's VAE factor 8 × "
                                                                              "U-Net down factor 4")),
    (BackendKind.ONNXRUNTIME, EngineOptions(min_resolution=100, max_resolution=700), MULTI,
     SizeRule(32, 128, 672, None, "the tiny-random model's VAE factor 8 × U-Net down factor 4")),
    (BackendKind.OPENVINO, EngineOptions(), SINGLE, SizeRule(32, 32, 4096, None, "the tiny-random model's VAE factor 8 × "
                                                                               "U-Net down factor 4")),
    (BackendKind.TORCH, EngineOptions(compile=True), MULTI,  # fixed-shape packages: one size unless listed
     SizeRule(32, 64, 1024, ((512, 512),), "the tiny-random model's VAE factor 8 × U-Net down factor 4")),
    (BackendKind.TORCH, EngineOptions(compile=True), EngineConfig(max_streams=4, sizes=(256, "320x192")),
     SizeRule(32, 64, 1024, ((256, 256), (320, 192)), "the tiny-random model's VAE factor 8 × U-Net down factor 4")),
])
def test_size_rule_is_model_and_backend_and_operator(tiny_model, backend, options, config, expected) -> None:
    assert size_rule(tiny_model, backend, options, config) == expected


def test_a_listed_size_the_backend_cannot_run_is_refused_at_construction(tiny_model) -> None:
    with pytest.raises(ConfigError, match=r"^sizes entry 200x200: width=200 is not a multiple of 32 \(the tiny-random "
                                          r"model's VAE factor 8 × U-Net down factor 4\); allowed: multiples of 32 "
                                          r"from 64 to 1024$") as refused:
        StreamEngine(tiny_model, EngineConfig(max_streams=4, sizes=(256, 200)), backend="openvino")
    assert (refused.value.field, refused.value.value) == ("sizes", "200x200")
    with pytest.raises(ConfigError, match=r"sizes=\(\) is empty"):
        EngineConfig(sizes=())
    with pytest.raises(ConfigError, match=r"sizes entry='2x' is not WIDTHxHEIGHT"):
        EngineConfig(sizes=("2x",))
    with pytest.raises(ConfigError, match=r"max_shapes=0 must be >= 1"):
        EngineConfig(max_shapes=0)


def test_every_entry_point_refuses_what_the_engine_cannot_run(tiny_model) -> None:
    engine = StreamEngine(tiny_model, EngineConfig(max_streams=4), backend="openvino")
    assert (engine.size_multiple, engine.size_range, engine.allowed_sizes) == (32, (64, 1024), None)
    message = (r"^width=200 is not a multiple of 32 \(the tiny-random model's VAE factor 8 × U-Net down factor 4\); "
               r"allowed: multiples of 32 from 64 to 1024$")
    with pytest.raises(ConfigError, match=message) as refused:
        engine.open_stream(StreamConfig(width=200, height=200))
    assert (refused.value.field, refused.value.value, refused.value.allowed) == (
        "width", 200, "multiples of 32 from 64 to 1024")
    with pytest.raises(ConfigError, match=r"^height=32 is outside this engine's range \[64, 1024\]") as refused:
        engine.open_stream(StreamConfig(width=64, height=32))
    assert refused.value.field == "height"
    stream = engine.open_stream(StreamConfig(width=64, height=64, t_index_list=(20, 40)))
    with pytest.raises(ConfigError, match=message):
        stream.update(width=200)
    assert stream.config.width == 64 and engine.streams == [stream]


def test_an_operator_list_is_all_a_stream_may_use(tiny_model) -> None:
    engine = StreamEngine(tiny_model, EngineConfig(max_streams=4, sizes=(64, "96x64")))
    assert engine.allowed_sizes == ((64, 64), (96, 64)) and engine.size_multiple == 8
    with pytest.raises(ConfigError, match=r"^size=64x96 is not one of this engine's sizes; allowed: 64x64, 96x64$") \
            as refused:
        engine.open_stream(StreamConfig(width=64, height=96))
    assert (refused.value.field, refused.value.value) == ("size", "64x96")
    stream = engine.open_stream(StreamConfig(width=96, height=64, t_index_list=(20, 40)))
    out = engine.step({stream: torch.rand(1, 3, 64, 96)})[stream]
    assert out.images is None or out.images.shape[-2:] == (64, 96)


def test_eager_torch_runs_sizes_a_traced_graph_cannot(tiny_model) -> None:
    """Eager diffusers handles a 25×25 latent (200 px: 25 → 13 → 7 and back); the refusal is the traced backends'."""
    engine = StreamEngine(tiny_model, EngineConfig(max_streams=2))
    stream = engine.open_stream(StreamConfig(width=200, height=200, t_index_list=(20, 40)))
    outputs = [engine.step({stream: torch.rand(1, 3, 200, 200, generator=torch.Generator().manual_seed(i))})[stream]
               for i in range(3)]
    assert outputs[-1].images.shape == (1, 3, 200, 200) and not stream.finished
