"""SDXL streams on the multi-stream engine (built-in ``tiny-sdxl``, CPU, float32): batched equals alone."""

from __future__ import annotations

import pytest
import torch

from streamdiff import StreamConfig, StreamEngine, StreamPipeline
from streamdiff.backends.torch_backend import TorchUNet
from streamdiff.engine import EngineConfig
from streamdiff.testing import CountingUNet

SIZE = 64
TOLERANCE = 1e-4  # float32, max abs in [0, 1]

# Streams that differ in prompt, seed, steps, F, cfg mode, guidance, and size (SDXL's time ids are per size).
MIX = [
    (StreamConfig(width=SIZE, height=SIZE, t_index_list=(20, 40), cfg_type="self"),
     dict(prompt="a watercolor portrait", seed=1, guidance_scale=1.4, delta=0.8)),
    (StreamConfig(width=SIZE, height=SIZE, t_index_list=(10, 25, 40), cfg_type="full"),
     dict(prompt="an oil painting", negative_prompt="blurry", seed=2, guidance_scale=1.6)),
    (StreamConfig(width=SIZE, height=SIZE, t_index_list=(30,), cfg_type="initialize", frame_buffer_size=2),
     dict(prompt="charcoal", seed=3, guidance_scale=2.0)),
    (StreamConfig(width=SIZE, height=SIZE, t_index_list=(15, 35), cfg_type="none", use_denoising_batch=False),
     dict(prompt="neon", seed=4)),
    (StreamConfig(width=SIZE, height=48, t_index_list=(25, 40), cfg_type="full"),
     dict(prompt="neon", negative_prompt="dark", seed=5, guidance_scale=1.5)),
]


@pytest.fixture(scope="module")
def sdxl_model(cache_dir):
    from streamdiff import load_model

    return load_model("tiny-sdxl", device="cpu")


def _inputs(config: StreamConfig, ticks: int, offset: int) -> list[torch.Tensor]:
    return [torch.rand((config.frame_buffer_size, 3, config.height, config.width),
                       generator=torch.Generator().manual_seed(100 * offset + tick)) for tick in range(ticks)]


def _alone(model, config: StreamConfig, settings: dict, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    pipe = StreamPipeline(model, config)
    pipe.prepare(**{"negative_prompt": "", **settings})
    return [o.images for o in (pipe.step(x) for x in inputs) if o.images is not None]


def test_sdxl_streams_batched_equal_each_stream_alone(sdxl_model) -> None:
    unet = CountingUNet(TorchUNet(sdxl_model.unet))
    with StreamEngine(sdxl_model, EngineConfig(max_streams=8, max_batch_rows=32), unet=unet) as engine:
        streams = [engine.open_stream(config, **settings) for config, settings in MIX]
        inputs = {s: _inputs(s.config, 5, i) for i, s in enumerate(streams)}
        got: dict = {s: [] for s in streams}
        for tick in range(5):
            outputs = engine.step({s: inputs[s][tick] for s in streams})
            for s, out in outputs.items():
                if out.images is not None:
                    got[s].append(out.images)
    # Per tick: one call for the 64×64 streams' rows (2 + 6 + 4 + 1) and the sequential stream's second step,
    # and one call for the 64×48 stream (4 rows, full guidance).
    assert sorted(unet.batches[:3]) == [1, 4, 13]
    for s, (config, settings) in zip(streams, MIX):
        expected = _alone(sdxl_model, config, settings, inputs[s])
        assert len(got[s]) == len(expected) > 0
        worst = max(float((a - b).abs().max()) for a, b in zip(got[s], expected))
        assert worst <= TOLERANCE, (s.name, worst)


def test_a_live_prompt_change_reaches_the_pooled_embedding(sdxl_model) -> None:
    """After ``update(prompt=…)`` an SDXL stream gives what a stream opened with that prompt gives."""
    config = StreamConfig(width=SIZE, height=SIZE, t_index_list=(30,), cfg_type="full")
    image = torch.rand((1, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(9))
    pipe = StreamPipeline(sdxl_model, config)
    pipe.prepare("a cat", negative_prompt="blurry", guidance_scale=1.7, seed=3)
    before = pipe.step(image).images
    pipe.update(prompt="a dog", negative_prompt="")
    after = pipe.step(image).images
    fresh = StreamPipeline(sdxl_model, config)
    fresh.prepare("a dog", negative_prompt="", guidance_scale=1.7, seed=3)
    expected = fresh.step(image).images
    assert float((after - expected).abs().max()) <= 1e-6 < float((after - before).abs().max())
