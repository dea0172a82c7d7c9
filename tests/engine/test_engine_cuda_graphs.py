"""The torch backend's CUDA graphs (streamdiff/backends/cuda_graphs.py) in the engine, on the CPU through a fake seam.

The fake's "graph" is the callable handed to ``capture``, recorded and NOT run (a capture computes nothing); ``replay``
calls it, so it reads whatever the static input buffers hold then. Its buffers start as NaN. Frames from the graphed
engine must equal the eager engine's bit for bit; a stale static buffer or a missed replay shows in the frames.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from graph_helpers import assert_same, tick_outputs

from streamdiff import ConfigError, StreamConfig, StreamEngine
from streamdiff.backends import cuda_graphs
from streamdiff.backends.torch_backend import TorchUNet
from streamdiff.engine import EngineConfig
from streamdiff.testing.cuda_seam import CallableCuda

SIZE = 64
A = (StreamConfig(width=SIZE, height=SIZE, t_index_list=(20, 40), cfg_type="self"),
     dict(prompt="a watercolor portrait", seed=1, guidance_scale=1.4, delta=0.8))
B = (StreamConfig(width=SIZE, height=SIZE, t_index_list=(10, 25, 40), cfg_type="full"),
     dict(prompt="an oil painting", negative_prompt="blurry", seed=2, guidance_scale=1.6))
SMALL = (StreamConfig(width=32, height=32, t_index_list=(15, 35), cfg_type="none", use_denoising_batch=False),
         dict(prompt="neon", seed=4))


GraphCuda = CallableCuda  # its "graph" is the callable handed to capture, called at replay


def make_engine(model, cuda: GraphCuda | None, graphs: bool, max_shapes: int = 8, unet: Any = None) -> StreamEngine:
    config = EngineConfig(max_streams=4, max_batch_rows=32, batch_vae=True, cuda_graphs=graphs, max_shapes=max_shapes,
                          cuda_graph_scope="call")  # the per-call graphs alone (whole ticks: test_tick_graph.py)
    return StreamEngine(model, config, unet=unet or TorchUNet(model.unet), cuda=cuda)


def run(engine: StreamEngine, frames: list, ticks: int = 8, cuda: GraphCuda | None = None) -> list[dict]:
    """Streams A and B from tick 0, a 32×32 stream from tick 3 (a new bucket), B closed at tick 5 (a new row count).
    Each tick's outputs by stream name ((frame ids, images) or None); with ``cuda``, checks ONE host copy per tick."""
    streams = {"a": engine.open_stream(A[0], **A[1]), "b": engine.open_stream(B[0], **B[1])}
    got = []
    for tick in range(ticks):
        if tick == 3:
            streams["small"] = engine.open_stream(SMALL[0], **SMALL[1])
        if tick == 5:
            streams.pop("b").close()
        got.append(tick_outputs(engine, streams, {s: frames[(tick + i) % len(frames)]
                                                  for i, s in enumerate(streams.values())}, cuda))
    return got


@pytest.fixture()
def eager_frames(tiny_model, frames) -> list[dict]:
    engine = make_engine(tiny_model, None, graphs=False)
    assert engine.graphs is None
    return run(engine, frames)


def test_graphed_ticks_equal_eager_ticks_bit_for_bit(tiny_model, frames, eager_frames) -> None:
    cuda = GraphCuda()
    engine = make_engine(tiny_model, cuda, graphs=True, max_shapes=2)
    got = run(engine, frames, cuda=cuda)
    assert_same(got, eager_frames, 10)
    unet, encode, decode = engine.graphs.calls()
    # U-Net signatures: A+B (8 rows at 64), the small stream's two sequential rounds (1 row at 32, twice the same
    # signature), A alone after B closed (2 rows): three, so with max_shapes=2 the oldest was released.
    assert unet.captures == 3 and unet.evictions == 1 and len(unet.graphs) == 2
    assert [g.released for g in cuda.graphs].count(True) >= 1
    assert unet.replays > unet.captures and all(g.replays for g in cuda.graphs)  # captured graphs are replayed
    assert encode.replays > encode.captures >= 2 and decode.replays > decode.captures >= 2
    assert not unet.eager and cuda.waits == 2 * cuda.capture_attempts  # warm-up on a side stream, ordered both ways


def test_a_failed_capture_runs_eagerly_and_is_not_retried(tiny_model, frames, eager_frames, caplog) -> None:
    cuda = GraphCuda(fail_capture=True)
    engine = make_engine(tiny_model, cuda, graphs=True)
    with caplog.at_level(logging.WARNING, logger=cuda_graphs.__name__):
        got = run(engine, frames, cuda=cuda)
    assert_same(got, eager_frames, 10)
    calls = engine.graphs.calls()
    signatures = sum(len(call.eager) for call in calls)
    assert cuda.capture_attempts == signatures  # once per signature, not once per tick
    assert all(call.captures == 0 and not call.graphs for call in calls)
    warnings = [r for r in caplog.records if "capture" in r.getMessage()]
    assert len(warnings) == signatures and "runs eagerly" in warnings[0].getMessage()


def test_static_inputs_are_refilled_before_every_replay(tiny_model, frames, eager_frames, monkeypatch) -> None:
    """The graph reads its static inputs: refilled, the frames are right; refilled into buffers the graph does not
    read (the stale-buffer bug), the same check fails."""
    cuda = GraphCuda()
    seen: list[torch.Tensor] = []
    engine = make_engine(tiny_model, cuda, graphs=True, unet=_Recording(TorchUNet(tiny_model.unet), seen))
    assert_same(run(engine, frames, cuda=cuda), eager_frames, 10)
    samples = [s for s in seen if s.shape[0] == 8]  # A+B calls (warm-ups, the recorded capture, replays)
    assert len(samples) >= 4 and not torch.equal(samples[-1], samples[-2])  # the inputs changed between replays

    capture = cuda_graphs.GraphedCall._capture

    def stale(self, key, inputs):
        captured = capture(self, key, inputs)
        if captured is not None:
            captured.inputs = [x.clone() for x in captured.inputs]  # refills go where the graph does not read
        return captured

    monkeypatch.setattr(cuda_graphs.GraphedCall, "_capture", stale)
    cuda = GraphCuda()
    stale_engine = make_engine(tiny_model, cuda, graphs=True)
    with pytest.raises(AssertionError):
        assert_same(run(stale_engine, frames, cuda=cuda), eager_frames, 10)


class _Recording:
    """A U-Net engine that keeps a copy of every sample it is called with."""

    def __init__(self, unet: TorchUNet, seen: list[torch.Tensor]) -> None:
        self.unet, self.seen = unet, seen

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        self.seen.append(sample.clone())
        return self.unet(sample, timestep, embeddings)


def test_graphs_are_on_only_where_asked(tiny_model) -> None:
    assert StreamEngine(tiny_model, EngineConfig()).graphs is None  # auto: torch on CUDA in float16 only
    with pytest.raises(ConfigError, match="cuda_graphs='yes' must be True or False"):
        EngineConfig(cuda_graphs="yes")


def test_one_option_serves_torch_and_tensorrt_and_is_refused_elsewhere(tiny_model) -> None:
    with pytest.raises(ConfigError, match="torch and tensorrt backends, not openvino") as info:
        StreamEngine(tiny_model, EngineConfig(cuda_graphs=True), backend="openvino")
    assert info.value.field == "cuda_graphs"
    assert StreamEngine(tiny_model, EngineConfig(cuda_graphs=False), backend="openvino").graphs is None


def test_a_graphed_call_keeps_at_most_max_shapes_graphs() -> None:
    cuda = GraphCuda()
    call = cuda_graphs.GraphedCall(lambda x: x * 2 + 1, "test", torch.device("cpu"), cuda, max_shapes=2)
    for n in (1, 2, 1, 3, 2):
        x = torch.arange(n, dtype=torch.float32) + n
        assert torch.equal(call(x), x * 2 + 1)
    assert call.captures == 4 and call.evictions == 2 and [k[0][0] for k in call.graphs] == [(3,), (2,)]
    assert [g.released for g in cuda.graphs] == [True, True, False, False]
    out = call(torch.ones(2))
    out.fill_(0)  # the caller owns what it gets: the static output is not handed out
    assert torch.equal(call(torch.ones(2)), torch.full((2,), 3.0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_graphed_float16_equals_eager_float16_on_a_gpu(frames) -> None:
    """The real seam (never run where this was written): graphs on by default for torch on CUDA in float16, and
    their frames equal the eager float16 frames within PSNR ≥ 40 dB (issue 17)."""
    from streamdiff import load_model

    model = load_model("tiny-random", device="cuda", dtype="float16")
    graphed = StreamEngine(model, EngineConfig(max_streams=4, max_batch_rows=32))
    assert graphed.graphs is not None and torch.backends.cudnn.benchmark
    got = run(graphed, frames)
    expected = run(StreamEngine(model, EngineConfig(max_streams=4, max_batch_rows=32, cuda_graphs=False)), frames)
    assert [sorted(t) for t in got] == [sorted(t) for t in expected]
    for g, e in zip(got, expected):
        for name in e:
            mse = float(((g[name][1] - e[name][1]) ** 2).mean())
            assert mse == 0 or 10 * torch.log10(torch.tensor(1 / mse)) >= 40, (name, mse)
    assert all(call.captures and call.replays > call.captures for call in graphed.graphs.calls())


def test_controlnet_is_refused_when_a_stream_asks_an_engine_with_graphs(tiny_model) -> None:
    """The one backend without residual inputs: the torch backend's CUDA graphs. A stream asking for ControlNet is
    refused when it opens (never mid-stream); a plain stream on the same engine runs; without graphs it opens."""
    from streamdiff import ControlNetSpec
    from streamdiff.models.controlnet import build_tiny_controlnet

    config = StreamConfig(width=64, height=64, cfg_type="none")
    controlnets = {"a": build_tiny_controlnet(seed=1)}
    graphed = StreamEngine(tiny_model, EngineConfig(max_streams=2, cuda_graphs=True), unet=TorchUNet(tiny_model.unet),
                           cuda=GraphCuda(), controlnets=controlnets)
    assert graphed.graphs is not None
    with pytest.raises(ConfigError, match="the torch backend with CUDA graphs does not") as info:
        graphed.open_stream(config, controlnets=[ControlNetSpec("a", preprocessor="passthrough")])
    assert info.value.field == "controlnets" and info.value.value == ["a"]
    assert graphed.open_stream(config) is not None
    eager = StreamEngine(tiny_model, EngineConfig(max_streams=2), controlnets=controlnets)
    assert eager.open_stream(config, controlnets=[ControlNetSpec("a", preprocessor="passthrough")]) is not None
