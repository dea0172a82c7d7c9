"""Compiled backends under the multi-stream engine: one set of engines for every stream and batch, never one per
stream; a fixed-shape backend gets its calls padded to the batch sizes it has."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from streamdiff import StreamConfig, StreamEngine
from streamdiff.backends.cache import MANIFEST, EngineCache
from streamdiff.backends.keys import EngineOptions
from streamdiff.backends.torch_backend import TorchUNet
from streamdiff.engine import EngineConfig

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


def test_a_new_size_inside_the_compiled_range_keeps_the_engines(tiny_model, tmp_path: Path) -> None:
    engine = StreamEngine(tiny_model, EngineConfig(max_streams=3, max_batch_rows=8), backend="onnxruntime",
                          engine_options=EngineOptions(engine_dir=tmp_path))
    first = engine.open_stream(StreamConfig(width=SIZE, height=SIZE, t_index_list=(20, 40)))
    engine.step({first: torch.rand(1, 3, SIZE, SIZE)})
    unet = engine.unet
    inside = engine.open_stream(StreamConfig(width=96, height=96, t_index_list=(20, 40)))
    outputs = engine.step({first: torch.rand(1, 3, SIZE, SIZE), inside: torch.rand(1, 3, 96, 96)})
    assert engine.unet is unet and set(outputs) == {first, inside}  # 96 px is inside the same range: no rebuild
    below = engine.open_stream(StreamConfig(width=32, height=32, t_index_list=(20, 40)))
    engine.step({below: torch.rand(1, 3, 32, 32)})
    assert engine.unet is not unet  # 32 px is below the range [64, 1024]: engines for a wider range
