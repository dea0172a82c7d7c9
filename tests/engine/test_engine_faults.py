"""A failed backend call never poisons the shared engine: the other streams of the batch, and every later stream,
get exactly the frames they get from a clean run — on torch, OpenVINO and ONNX Runtime (the TensorRT fake:
tests/backends/test_backends_tensorrt_runtime.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from streamdiff import StreamConfig, StreamEngine
from streamdiff.backends.base import recover
from streamdiff.backends.keys import EngineOptions
from streamdiff.engine import EngineConfig

SIZE = 64
# Three streams of 2 rows each and a culprit of 3 rows: the only odd row count, so a call carries its rows iff odd.
OTHERS = [StreamConfig(width=SIZE, height=SIZE, t_index_list=(20, 40)) for _ in range(3)]
CULPRIT = StreamConfig(width=SIZE, height=SIZE, t_index_list=(10, 25, 40))
LATE = [StreamConfig(width=SIZE, height=SIZE, t_index_list=(20, 40)),
        StreamConfig(width=128, height=96, t_index_list=(15, 35))]
BACKENDS = ["torch", "openvino", "onnxruntime"]


class FailingUNet:
    """From call ``first`` on, every call with an odd row count (the culprit's rows) fails.

    ``real``: the failure is the backend's own — the latent is cropped by 3 (8×8 → 5×5, not a multiple of the
    U-Net's down factor 4) and the traced graph's skip concatenation fails, leaving whatever state a failed
    shape inference leaves (OpenVINO's CPU plugin: broken for later calls). Else a RuntimeError is raised.
    """

    def __init__(self, inner, first: int, real: bool) -> None:
        self.inner, self.first, self.real = inner, first, real
        self.calls: list[int] = []
        self.failures = 0

    def __call__(self, sample, timestep, encoder_hidden_states):
        self.calls.append(sample.shape[0])
        if len(self.calls) >= self.first and sample.shape[0] % 2:
            self.failures += 1
            if self.real:
                self.inner(sample[..., :-3, :-3].contiguous(), timestep, encoder_hidden_states)
                raise AssertionError("the backend ran a latent its traced graph cannot run")
            raise RuntimeError("injected U-Net failure")
        return self.inner(sample, timestep, encoder_hidden_states)

    def recover(self) -> None:
        recover(self.inner)


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engines")  # one build per backend for the whole module


def _engine(tiny_model, backend: str, engine_dir: Path) -> StreamEngine:
    engine = StreamEngine(tiny_model, EngineConfig(max_streams=6, max_batch_rows=16), backend=backend,
                          engine_options=EngineOptions(engine_dir=engine_dir))
    engine.prepare_backends(OTHERS[0])
    return engine


def _frame(tick: int, index: int, config: StreamConfig) -> torch.Tensor:
    return torch.rand(1, 3, config.height, config.width, generator=torch.Generator().manual_seed(100 * tick + index))


def _run(engine: StreamEngine, configs: list[StreamConfig], ticks: int, first_seed: int = 0) -> dict[int, list]:
    """Each stream's frames over ``ticks`` ticks (one step per tick, every live stream batched)."""
    streams = [engine.open_stream(c, prompt=f"prompt {i}", seed=first_seed + i) for i, c in enumerate(configs)]
    outs: dict[int, list] = {i: [] for i in range(len(streams))}
    for tick in range(ticks):
        produced = engine.step({s: _frame(tick, first_seed + i, s.config)
                                for i, s in enumerate(streams) if not s.finished})
        for i, stream in enumerate(streams):
            out = produced.get(stream)
            if out is not None and out.images is not None:
                outs[i].append(out.images)
    for stream in streams:
        stream.close()
    engine.step({})
    return outs


def _assert_same(actual: list, expected: list) -> None:
    assert len(actual) == len(expected) > 0
    assert max(float((a - b).abs().max()) for a, b in zip(actual, expected)) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failed_call_mid_batch_ends_only_its_stream_and_later_streams_are_right(tiny_model, engine_dir: Path,
                                                                                 backend: str) -> None:
    configs = OTHERS + [CULPRIT]
    clean_engine = _engine(tiny_model, backend, engine_dir)
    clean = _run(clean_engine, configs, ticks=7)
    clean_late = _run(clean_engine, LATE, ticks=3, first_seed=10)

    engine = _engine(tiny_model, backend, engine_dir)
    failing = FailingUNet(engine.unet, first=5, real=backend != "torch")
    engine.unet = failing
    streams_before = engine.stats.streams_failed
    faulty = _run(engine, configs, ticks=7)

    assert failing.failures >= 2 and failing.calls[4] == 9  # the batched call of all four failed, then the culprit
    assert engine.stats.streams_failed == streams_before + 1  # the culprit, and only it
    assert 0 < len(faulty[3]) < len(clean[3])  # the culprit ran until its rows failed
    for i in range(len(OTHERS)):
        _assert_same(faulty[i], clean[i])  # values, not shapes: the retried calls ran on a sound backend
    late = _run(engine, LATE, ticks=3, first_seed=10)
    for i in late:
        _assert_same(late[i], clean_late[i])


def _real_call(engine: StreamEngine, width: int, height: int):
    """One U-Net call at an image size, straight on the backend (what a 200×200 stream's first call was)."""
    model = engine.model
    factor = model.vae_scale_factor
    sample = torch.randn(2, model.latent_channels, height // factor, width // factor)
    hidden = torch.zeros(2, 77, int(model.unet.config.cross_attention_dim))
    return engine.unet(sample, torch.tensor([500, 700]), hidden)


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_the_measured_poison_sequence_leaves_later_streams_right(tiny_model, engine_dir: Path, backend: str
                                                                 ) -> None:
    """256, 128, 256, then a 200×200 call that fails (refused by validation now, so made on the backend itself),
    then a 256×256 stream: its frames equal a fresh engine's. Before the fix every later 256 stream failed."""
    big, small = StreamConfig(width=256, height=256, t_index_list=(32, 45)), \
        StreamConfig(width=128, height=128, t_index_list=(32, 45))
    engine = _engine(tiny_model, backend, engine_dir)
    for config in (big, small, big):
        assert all(_run(engine, [config], ticks=2).values())
    with pytest.raises(Exception, match="(?i)concat|a latent size its graph cannot run"):
        _real_call(engine, 200, 200)  # OpenVINO on one thread: its output is the previous call's, caught as such
    after = _run(engine, [big], ticks=3, first_seed=5)
    fresh = _run(_engine(tiny_model, backend, engine_dir), [big], ticks=3, first_seed=5)
    _assert_same(after[0], fresh[0])
