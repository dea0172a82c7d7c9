"""The TensorRT runtime's bookkeeping on the CPU: a fake ``tensorrt`` (10.x and 11.x) on a fake CUDA seam.

The fake engines compute an analytic function of whatever is in the buffers bound to them, so every test checks
output values: a buffer bound to the wrong context, a stale graph or a missed copy gives wrong numbers.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import pytest
import torch

from fake_tensorrt import analytic, fake_plan
from streamdiff import StreamConfig
from streamdiff.backends.tensorrt_runtime import TrtEngine, TrtUNet, TrtVae
from streamdiff.engine import EngineConfig, StreamEngine
from streamdiff.errors import ConfigError, StreamDiffError
from streamdiff.testing import AnalyticUNet

CPU = torch.device("cpu")
UNET_PROFILE = {
    "sample": ((1, 4, 4, 4), (4, 4, 8, 8), (8, 4, 16, 16)),
    "timestep": ((1,), (4,), (8,)),
    "encoder_hidden_states": ((1, 77, 64), (4, 77, 64), (8, 77, 64)),
}
VAE_PROFILES = {
    "vae_encoder": {"images": ((1, 3, 32, 32), (1, 3, 64, 64), (4, 3, 128, 128))},
    "vae_decoder": {"latents": ((1, 4, 4, 4), (1, 4, 8, 8), (4, 4, 16, 16))},
}


def _write(tmp_path: Path, trt, component: str, profile: dict) -> Path:
    path = tmp_path / f"{component}-tensorrt" / "model.plan"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(fake_plan(trt.__version__, component, profile))
    return path


def _unet(tmp_path: Path, trt, **kwargs) -> TrtUNet:
    return TrtUNet(_write(tmp_path, trt, "unet", UNET_PROFILE), CPU, cuda=trt.cuda, trt=trt, **kwargs)


def _inputs(batch: int, side: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, side, side, generator=generator)
    timestep = torch.randint(0, 1000, (batch,), generator=generator)
    hidden = torch.randn(batch, 77, 64, generator=generator)
    return sample, timestep, hidden


def _close(actual: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> None:
    expected = AnalyticUNet()(*inputs)
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    assert float((actual - expected).abs().max()) <= 2e-3 * float(expected.abs().max())


def test_each_shape_has_its_own_context_on_shared_scratch_memory(fake_trt, tmp_path: Path) -> None:
    unet = _unet(tmp_path, fake_trt)
    engine = unet.engine
    for batch, seed in ((2, 0), (3, 1), (2, 2)):
        inputs = _inputs(batch, seed=seed)
        _close(unet(*inputs), inputs)
    assert fake_trt.contexts_created == 2 and list(engine.slots) == [
        ((3, 4, 8, 8), (3,), (3, 77, 64)), ((2, 4, 8, 8), (2,), (2, 77, 64))  # most recently used last
    ]
    scratch = (engine.scratch.data_ptr(), engine.scratch.numel())
    for slot in engine.slots.values():
        assert slot.context.strategy == fake_trt.ExecutionContextAllocationStrategy.USER_MANAGED
        assert slot.context.device_memory == scratch  # one scratch allocation for every context
        assert {n: slot.context.addresses[n] for n in slot.tensors} == {n: t.data_ptr() for n, t in slot.tensors.items()}
    stream = engine.stream.handle
    assert stream != 0 and {handle for handle, _ in fake_trt.runs} == {stream}  # never the default stream
    waits = [e for e in fake_trt.cuda.events if e[0] == "wait"]
    assert waits == [("wait", stream, 0), ("wait", 0, stream)] * 3  # ordered both ways, no host sync
    allocations = [e for e in fake_trt.cuda.events if e[0] == "alloc"]
    assert {handle for *_, handle in allocations} == {stream}  # buffers belong to the engine's stream
    assert fake_trt.touched_removed == []


def test_cuda_graph_is_captured_on_the_second_call_and_replayed(fake_trt, tmp_path: Path) -> None:
    unet = _unet(tmp_path, fake_trt, cuda_graph=True)
    for seed in range(5):
        inputs = _inputs(4, seed=seed)
        _close(unet(*inputs), inputs)  # new inputs every call: replays read the copied-in values
    (graph,) = fake_trt.cuda.graphs
    assert graph.replays == 3 and len(graph.ops) == 1
    assert len(fake_trt.runs) == 5  # calls 1 and 2 ran directly (2 was also captured), 3-5 replayed
    (slot,) = unet.engine.slots.values()
    assert slot.graph is graph and slot.context.runs == 3  # two direct runs and the captured one


def test_least_recently_used_shapes_are_freed(fake_trt, tmp_path: Path) -> None:
    unet = _unet(tmp_path, fake_trt, cuda_graph=True, max_shapes=2)
    for batch in (1, 1, 2, 2, 3, 3):  # every shape twice: each gets a graph
        inputs = _inputs(batch, seed=batch)
        _close(unet(*inputs), inputs)
    engine = unet.engine
    assert [shapes[0][0] for shapes in engine.slots] == [2, 3] and engine.evictions == 1
    first, second, third = fake_trt.cuda.graphs
    assert first.released and not second.released and not third.released
    gc.collect()
    assert len(list(unet.engine.engine.contexts)) == 2  # the freed slot's context is gone
    inputs = _inputs(1, seed=9)
    _close(unet(*inputs), inputs)  # the freed shape comes back with a new context
    assert fake_trt.contexts_created == 4 and second.released


def test_a_shape_outside_the_profile_names_tensor_shape_and_profile(fake_trt, tmp_path: Path) -> None:
    unet = _unet(tmp_path, fake_trt)
    with pytest.raises(ConfigError, match=(
        r"input 'sample' shape \(9, 4, 8, 8\) is outside its optimization profile \(min \(1, 4, 4, 4\), "
        r"opt \(4, 4, 8, 8\), max \(8, 4, 16, 16\)\)"
    )):
        unet(*_inputs(9))
    with pytest.raises(ConfigError, match=r"input 'sample' shape \(2, 4, 32, 32\) is outside"):
        unet(*_inputs(2, side=32))
    assert not unet.engine.slots


def test_a_failed_capture_falls_back_to_running_without_graphs(
    fake_trt, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake_trt.cuda.fail_capture = True
    unet = _unet(tmp_path, fake_trt, cuda_graph=True)
    with caplog.at_level(logging.WARNING):
        for seed in range(4):
            inputs = _inputs(2, seed=seed)
            _close(unet(*inputs), inputs)
    assert caplog.text.count("CUDA graph capture of TensorRT engine unet-tensorrt failed") == 1  # logged once
    assert unet.engine.uncaptured == {((2, 4, 8, 8), (2,), (2, 77, 64))}
    assert fake_trt.cuda.graphs == [] and len(fake_trt.runs) == 4 and unet.engine.failed is None


def test_an_enqueue_refused_while_capturing_leaves_that_shape_uncaptured(
    fake_trt, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``execute_async_v3`` returning False during capture (an engine a graph cannot hold, at one shape) fails
    neither that call nor the batch: the shape runs directly from then on, the other shapes keep their graphs."""
    from fake_tensorrt import ExecutionContext

    real = ExecutionContext.execute_async_v3

    def refuse_batch_3_in_capture(self, handle: int) -> bool:  # noqa: ANN001
        if fake_trt.cuda.capturing is not None and self.shapes["sample"][0] == 3:
            return False
        return real(self, handle)

    monkeypatch.setattr(ExecutionContext, "execute_async_v3", refuse_batch_3_in_capture)
    unet = _unet(tmp_path, fake_trt, cuda_graph=True)
    with caplog.at_level(logging.WARNING):
        for call in range(4):
            for batch in (2, 3):
                inputs = _inputs(batch, seed=10 * call + batch)
                _close(unet(*inputs), inputs)  # every call right, the capture calls too
    engine = unet.engine
    assert engine.uncaptured == {((3, 4, 8, 8), (3,), (3, 77, 64))} and engine.failed is None
    assert caplog.text.count("CUDA graph capture of TensorRT engine unet-tensorrt failed for inputs ((3, 4, 8, 8)") == 1
    assert "execute_async_v3 failed" in caplog.text
    slots = {shapes[0][0]: slot for shapes, slot in engine.slots.items()}
    assert slots[3].graph is None and slots[3].calls == 4  # every call of batch 3 ran directly
    assert slots[2].graph is not None and slots[2].graph.replays == 2  # batch 2 captured on call 2, replayed after


def test_a_failed_replay_runs_the_call_directly_and_stops_graphs_for_that_shape(
    fake_trt, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    unet = _unet(tmp_path, fake_trt, cuda_graph=True)
    for seed in range(2):
        inputs = _inputs(2, seed=seed)
        _close(unet(*inputs), inputs)
    (graph,) = fake_trt.cuda.graphs
    real_replay = fake_trt.cuda.replay

    def failing_replay(replayed) -> None:  # noqa: ANN001
        raise RuntimeError("cudaGraphLaunch: an illegal memory access")

    fake_trt.cuda.replay = failing_replay
    with caplog.at_level(logging.WARNING):
        for seed in range(2, 5):
            inputs = _inputs(2, seed=seed)
            _close(unet(*inputs), inputs)
    fake_trt.cuda.replay = real_replay
    assert graph.released and len(fake_trt.cuda.graphs) == 1  # released, never captured again
    assert caplog.text.count("CUDA graph replay of TensorRT engine unet-tensorrt failed") == 1


def test_vae_engines_encode_and_decode(fake_trt, tmp_path: Path) -> None:
    paths = [_write(tmp_path, fake_trt, c, VAE_PROFILES[c]) for c in ("vae_encoder", "vae_decoder")]
    vae = TrtVae(*paths, CPU, cuda=fake_trt.cuda, trt=fake_trt)
    images = torch.rand(2, 3, 64, 96) * 2 - 1
    latents = vae.encode(images)
    expected = analytic({"images": images})["latents"]
    assert latents.shape == (2, 4, 8, 12) and torch.allclose(latents, expected, atol=4e-3)
    decoded = vae.decode(latents)
    assert decoded.shape == (2, 3, 64, 96)
    assert torch.allclose(decoded, analytic({"latents": latents})["images"], atol=4e-3)


def test_stream_engine_on_fake_tensorrt_engines_gives_the_reference_frames(fake_trt, tiny_model,
                                                                           tmp_path: Path) -> None:
    """Three streams of two sizes through the multi-stream engine: TensorRT engines (fake) vs the same functions
    in torch. The U-Net keeps one shape slot, so shapes are freed and made again while the streams run; the VAE
    engines keep two and replay CUDA graphs."""

    class ReferenceVae:
        def encode(self, images: torch.Tensor) -> torch.Tensor:
            return analytic({"images": images})["latents"]

        def decode(self, latents: torch.Tensor) -> torch.Tensor:
            return analytic({"latents": latents})["images"]

    paths = [_write(tmp_path, fake_trt, c, VAE_PROFILES[c]) for c in ("vae_encoder", "vae_decoder")]
    engines = {
        "tensorrt": (TrtUNet(_write(tmp_path, fake_trt, "unet", UNET_PROFILE), CPU, cuda_graph=True, max_shapes=1,
                             cuda=fake_trt.cuda, trt=fake_trt),
                     TrtVae(*paths, CPU, cuda_graph=True, max_shapes=2, cuda=fake_trt.cuda, trt=fake_trt)),
        "torch": (AnalyticUNet(), ReferenceVae()),
    }
    configs = [StreamConfig(width=64, height=64, t_index_list=(20, 40)),
               StreamConfig(width=96, height=64, t_index_list=(30,)),
               StreamConfig(width=64, height=64, t_index_list=(10, 25, 40), cfg_type="full")]
    frames = [torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    outputs: dict[str, list[torch.Tensor]] = {}
    for name, (unet, vae) in engines.items():
        engine = StreamEngine(tiny_model, EngineConfig(max_streams=3, max_batch_rows=8), unet=unet, vae=vae)
        streams = [engine.open_stream(c, prompt="a red fox", negative_prompt="blur", seed=i)
                   for i, c in enumerate(configs)]
        collected = []
        for frame in frames:
            ticks = engine.step({s: frame[:, :, : s.config.width] for s in streams})
            collected += [ticks[s].images for s in streams if s in ticks and ticks[s].images is not None]
        outputs[name] = collected
    assert len(outputs["tensorrt"]) == len(outputs["torch"]) >= 12
    for actual, expected in zip(outputs["tensorrt"], outputs["torch"]):
        assert actual.shape == expected.shape
        assert float((actual - expected).abs().max()) <= 5e-3
    unet_engine = engines["tensorrt"][0].engine
    assert unet_engine.evictions >= len(frames) and len(unet_engine.slots) == 1
    assert any(graph.replays for graph in fake_trt.cuda.graphs)
    assert fake_trt.touched_removed == []


def test_engine_without_tensorrt_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from streamdiff import BackendUnavailable

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailable, match=r"pip install 'streamdiff\[tensorrt\]'"):
        TrtEngine(tmp_path / "model.plan", CPU)


def test_a_failed_run_frees_its_shape_slot_and_the_next_call_is_right(fake_trt, tmp_path: Path) -> None:
    """A run that fails (here ``execute_async_v3`` refuses) leaves its slot — context, buffers, a half-made graph —
    suspect: ``recover()`` frees it, the other shapes' slots stay, and the next call at that shape is right."""
    unet = _unet(tmp_path, fake_trt, cuda_graph=True)
    for batch in (2, 3):
        inputs = _inputs(batch, seed=batch)
        _close(unet(*inputs), inputs)
    engine = unet.engine
    (slot, _) = engine.slots.values()
    slot.context.execute_async_v3 = lambda handle: False
    with pytest.raises(StreamDiffError, match="execute_async_v3 failed"):
        unet(*_inputs(2, seed=7))
    unet.recover()
    assert [shapes[0][0] for shapes in engine.slots] == [3] and engine.failed is None
    for batch, seed in ((2, 8), (3, 9)):
        inputs = _inputs(batch, seed=seed)
        _close(unet(*inputs), inputs)
    assert fake_trt.contexts_created == 3  # one new context for the failed shape, none for the other


def test_a_failed_call_mid_batch_ends_only_its_stream_on_tensorrt(fake_trt, tiny_model, tmp_path: Path) -> None:
    """Three streams and a culprit batched on fake TensorRT engines; from the 5th call every call carrying the
    culprit's rows (the only odd row count) fails. The others' frames equal a clean run's; a later stream's too."""

    class Failing:
        def __init__(self, inner: TrtUNet) -> None:
            self.inner, self.calls, self.recovered = inner, [], 0

        def __call__(self, sample, timestep, hidden):
            self.calls.append(sample.shape[0])
            if len(self.calls) >= 5 and sample.shape[0] % 2:
                raise RuntimeError("injected TensorRT failure")
            return self.inner(sample, timestep, hidden)

        def recover(self) -> None:
            self.recovered += 1
            self.inner.recover()

    profile = {"sample": ((1, 4, 4, 4), (4, 4, 8, 8), (16, 4, 16, 16)), "timestep": ((1,), (4,), (16,)),
               "encoder_hidden_states": ((1, 77, 64), (4, 77, 64), (16, 77, 64))}
    unet_path = _write(tmp_path, fake_trt, "unet", profile)
    vae_paths = [_write(tmp_path, fake_trt, c, VAE_PROFILES[c]) for c in ("vae_encoder", "vae_decoder")]
    configs = [StreamConfig(width=64, height=64, t_index_list=(20, 40)) for _ in range(3)]
    configs.append(StreamConfig(width=64, height=64, t_index_list=(10, 25, 40)))
    late = StreamConfig(width=96, height=64, t_index_list=(15, 35))
    frames = [torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(i)) for i in range(7)]

    def run(wrap: bool) -> tuple[dict[int, list], list, Failing | None]:
        unet = TrtUNet(unet_path, CPU, cuda=fake_trt.cuda, trt=fake_trt)
        failing = Failing(unet) if wrap else None
        engine = StreamEngine(tiny_model, EngineConfig(max_streams=5, max_batch_rows=16), unet=failing or unet,
                              vae=TrtVae(*vae_paths, CPU, cuda=fake_trt.cuda, trt=fake_trt))
        streams = [engine.open_stream(c, prompt=f"p{i}", seed=i) for i, c in enumerate(configs)]
        outs: dict[int, list] = {i: [] for i in range(len(streams))}
        for frame in frames:
            ticks = engine.step({s: frame[..., : s.config.width] for s in streams if not s.finished})
            for i, s in enumerate(streams):
                if s in ticks and ticks[s].images is not None:
                    outs[i].append(ticks[s].images)
        for s in streams:
            s.close()
        later = engine.open_stream(late, seed=9)
        later_outs = [engine.step({later: frame})[later].images for frame in frames[:3]]
        return outs, later_outs, failing

    clean, clean_later, _ = run(False)
    faulty, faulty_later, failing = run(True)
    assert failing.calls[4] == 9 and failing.recovered >= 2  # the batched call failed; recovered before retries
    assert 0 < len(faulty[3]) < len(clean[3])
    for i in range(3):
        assert len(faulty[i]) == len(clean[i]) > 0
        assert max(float((a - b).abs().max()) for a, b in zip(faulty[i], clean[i])) <= 1e-4
    pairs = [(a, b) for a, b in zip(faulty_later, clean_later) if b is not None]
    assert pairs and all(a is not None and float((a - b).abs().max()) <= 1e-4 for a, b in pairs)
