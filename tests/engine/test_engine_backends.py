"""Compiled backends under the multi-stream engine: one set of engines for every stream and batch, never one per
stream; a fixed-shape backend gets its calls padded to the batch sizes it has."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from streamdiff import StreamConfig, StreamEngine
from streamdiff.backends.cache import MANIFEST, EngineCache
from streamdiff.backends.keys import EngineOptions
from streamdiff.backends.torch_backend import TorchUNet
from streamdiff.engine import EngineConfig
from streamdiff.errors import ConfigError

SIZE = 64


def _run(engine: StreamEngine, configs: list[StreamConfig], ticks: int = 4) -> dict:
    streams = [engine.open_stream(c, prompt=f"prompt {i}", seed=i) for i, c in enumerate(configs)]
    frames = [torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(i)) for i in range(ticks)]
    outs: dict = {i: [] for i in range(len(streams))}
    for tick in range(ticks):
        produced = engine.step({s: frames[tick][: s.config.frame_buffer_size] for s in streams})
        for i, s in enumerate(streams):
            if produced[s].images is not None:
                outs[i].append(produced[s].images)
    return outs


def test_onnxruntime_serves_every_stream_from_one_engine_over_the_batch_range(tiny_model, tmp_path: Path) -> None:
    configs = [StreamConfig(width=SIZE, height=SIZE, t_index_list=(20, 40)),
               StreamConfig(width=SIZE, height=SIZE, t_index_list=(10, 25, 40), cfg_type="full"),
               StreamConfig(width=SIZE, height=SIZE, t_index_list=(30,), frame_buffer_size=2)]
    engine = StreamEngine(tiny_model, EngineConfig(max_streams=3, max_batch_rows=12), backend="onnxruntime",
                          engine_options=EngineOptions(engine_dir=tmp_path))
    ours = _run(engine, configs)
    reference = _run(StreamEngine(tiny_model, EngineConfig(max_streams=3, max_batch_rows=12)), configs)
    for i in ours:
        assert len(ours[i]) == len(reference[i]) > 0
        assert max(float((a - b).abs().max()) for a, b in zip(ours[i], reference[i])) <= 1e-3
    unet_keys = [json.loads((p / MANIFEST).read_text())["key"] for p, _ in EngineCache(tmp_path).entries()]
    unet_keys = [k for k in unet_keys if k["component"] == "unet"]
    assert len(unet_keys) == 1 and unet_keys[0]["shapes"]["batch"] == [1, 12]  # one U-Net for 1 … max_batch_rows
    assert engine.stats.recent_rows == [10] * 4  # 2 + 6 + 2 rows: one call per tick


class FixedBatches:
    """A U-Net compiled for batch sizes 4 and 8 only (like an AOTInductor package per size): refuses others."""

    batch_sizes = (4, 8)

    def __init__(self, unet) -> None:
        self.unet, self.seen = unet, []

    def __call__(self, sample, timestep, encoder_hidden_states):
        self.seen.append(sample.shape[0])
        assert sample.shape[0] in self.batch_sizes, sample.shape
        return self.unet(sample, timestep, encoder_hidden_states)


def test_fixed_shape_backends_get_padded_calls_with_unchanged_frames(tiny_model) -> None:
    configs = [StreamConfig(width=SIZE, height=SIZE, t_index_list=(20, 40)),
               StreamConfig(width=SIZE, height=SIZE, t_index_list=(30,), cfg_type="initialize")]
    fixed = FixedBatches(TorchUNet(tiny_model.unet))
    padded = _run(StreamEngine(tiny_model, EngineConfig(max_streams=2, max_batch_rows=8), unet=fixed), configs)
    plain = _run(StreamEngine(tiny_model, EngineConfig(max_streams=2, max_batch_rows=8)), configs)
    assert fixed.seen == [4] * 4  # 2 + 2 rows, already a compiled size
    for i in plain:
        assert max(float((a - b).abs().max()) for a, b in zip(padded[i], plain[i])) <= 1e-4
    three = [StreamConfig(width=SIZE, height=SIZE, t_index_list=(20, 40))] + configs
    fixed.seen.clear()
    _run(StreamEngine(tiny_model, EngineConfig(max_streams=3, max_batch_rows=8), unet=fixed), three)
    assert fixed.seen == [8] * 4  # 6 rows padded to 8


def test_every_allowed_size_runs_on_the_engines_built_first_and_others_are_refused(tiny_model, tmp_path: Path
                                                                                    ) -> None:
    """A multi-stream engine is built once for its whole range: no size a client may ask for rebuilds it."""
    engine = StreamEngine(tiny_model, EngineConfig(max_streams=3, max_batch_rows=8), backend="onnxruntime",
                          engine_options=EngineOptions(engine_dir=tmp_path))
    assert (engine.size_multiple, engine.size_range, engine.allowed_sizes) == (32, (64, 1024), None)
    first = engine.open_stream(StreamConfig(width=SIZE, height=SIZE, t_index_list=(20, 40)))
    engine.step({first: torch.rand(1, 3, SIZE, SIZE)})
    unet = engine.unet
    for side in (96, 1024):
        other = engine.open_stream(StreamConfig(width=side, height=SIZE, t_index_list=(20, 40)))
        outputs = engine.step({first: torch.rand(1, 3, SIZE, SIZE), other: torch.rand(1, 3, SIZE, side)})
        assert engine.unet is unet and set(outputs) == {first, other}  # inside the range built first: no rebuild
        other.close()
    for side, message in ((32, r"width=32 is outside this engine's range \[64, 1024\]"),
                          (1056, r"width=1056 is outside this engine's range \[64, 1024\]"),
                          (200, r"width=200 is not a multiple of 32 \(the tiny-random model's VAE factor 8 × U-Net down "
                                r"factor 4\); allowed: multiples of 32 from 64 to 1024")):
        with pytest.raises(ConfigError, match=message) as refused:
            engine.open_stream(StreamConfig(width=side, height=SIZE, t_index_list=(20, 40)))
        assert (refused.value.field, refused.value.value) == ("width", side)
    assert engine.unet is unet and len([p for p, _ in EngineCache(tmp_path).entries()]) == 3
