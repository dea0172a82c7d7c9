"""Whole-tick CUDA graphs (streamdiff/engine/tick_graph.py) in the engine, on the CPU through a recording fake.

The fake (``graph_helpers.py``) replays the tensor operations recorded while capturing, not the Python that made
them: a value baked in at capture, a tensor replaced after it, host work inside the program or a host read during
the capture all show here as they would on a GPU. Frames of the graphed engine must equal the eager engine's bit
for bit, through live guidance and prompt changes, streams joining and leaving, txt2img beside img2img, and the
similarity filter deciding on the host.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pytest
import torch

from graph_helpers import HostSyncInCapture, RecordingCuda, assert_same, tick_outputs
from streamdiff import ConfigError, StreamConfig, StreamEngine
from streamdiff.backends.cuda_graphs import GraphedPrograms, Program
from streamdiff.backends.torch_backend import TorchUNet
from streamdiff.engine import EngineConfig, tick_graph

SIZE = 64
A = (StreamConfig(width=SIZE, height=SIZE, t_index_list=(20, 40), cfg_type="self"),
     dict(prompt="a watercolor portrait", seed=1, guidance_scale=1.4, delta=0.8))
B = (StreamConfig(width=SIZE, height=SIZE, t_index_list=(10, 25, 40), cfg_type="full", frame_buffer_size=2),
     dict(prompt="an oil painting", negative_prompt="blurry", seed=2, guidance_scale=1.6))
T2I = (StreamConfig(width=SIZE, height=SIZE, t_index_list=(30,), cfg_type="initialize", mode="txt2img"),
       dict(prompt="a lighthouse", seed=3, guidance_scale=1.3))
SEQ = (StreamConfig(width=32, height=32, t_index_list=(15, 35), cfg_type="none", use_denoising_batch=False),
       dict(prompt="neon", seed=4))


def make_engine(model, cuda: RecordingCuda | None, scope: str = "tick", max_shapes: int = 8,
                batch_vae: bool = True) -> StreamEngine:
    config = EngineConfig(max_streams=4, max_batch_rows=32, batch_vae=batch_vae, cuda_graphs=cuda is not None,
                          max_shapes=max_shapes, cuda_graph_scope=scope)
    return StreamEngine(model, config, unet=TorchUNet(model.unet), cuda=cuda)


def run(engine: StreamEngine, frames: list, ticks: int = 14, cuda: RecordingCuda | None = None) -> list[dict]:
    """A, B (F=2) and a txt2img stream from tick 0; a sequential 32×32 stream from tick 4; A's guidance changes at
    tick 6, B's prompt at tick 8 and A's schedule at tick 9; the txt2img stream closes at tick 11. Each tick's
    outputs by stream name; with ``cuda``, ONE host copy per tick that has outputs."""
    streams = {"a": engine.open_stream(A[0], **A[1]), "b": engine.open_stream(B[0], **B[1]),
               "t2i": engine.open_stream(T2I[0], **T2I[1])}
    got = []
    for tick in range(ticks):
        if tick == 4:
            streams["seq"] = engine.open_stream(SEQ[0], **SEQ[1])
        if tick == 6:
            streams["a"].update(guidance_scale=2.1, delta=0.5)
        if tick == 8:
            streams["b"].update(prompt="a charcoal sketch")
        if tick == 9:
            streams["a"].update(t_index_list=(15, 35))
        if tick == 11:
            streams.pop("t2i").close()
        inputs = {}
        for i, s in enumerate(streams.values()):
            f = s.config.frame_buffer_size
            inputs[s] = frames[(tick + i) % len(frames)] if f == 1 else np.stack(
                [frames[(tick + i + k) % len(frames)] for k in range(f)])
        got.append(tick_outputs(engine, streams, inputs, cuda))
    return got


@pytest.fixture()
def eager_frames(tiny_model, frames) -> list[dict]:
    engine = make_engine(tiny_model, None)
    assert engine.graphs is None
    return run(engine, frames)


def test_whole_tick_graphs_equal_eager_ticks_bit_for_bit(tiny_model, frames, eager_frames) -> None:
    cuda = RecordingCuda()
    engine = make_engine(tiny_model, cuda)
    got = run(engine, frames, cuda=cuda)
    assert_same(got, eager_frames, 30)
    ticks = engine.graphs.ticks
    # A+B+t2i once B's batch filled, again after A's new schedule (new coefficients: a new key) and after the t2i
    # stream closed (new members); A's guidance (γ stays > 1) and B's prompt (written in place) need no capture.
    assert ticks.captures == 3 and not ticks.eager, (ticks.captures, ticks.eager)
    assert ticks.replays >= 8
    assert len(ticks.programs) == 1  # the two graphs the closed txt2img stream was in were released with it
    unet_call = engine.graphs.calls()[0]  # per-call graphs ran the eager ticks (a batch filling, the sequential one)
    tick_ops = len(next(iter(ticks.programs.values())).graph.ops)
    assert tick_ops > max(len(c.graph.ops) for c in unet_call.graphs.values())  # a whole tick, not one call


def test_whole_tick_graphs_encode_and_decode_per_stream_without_batch_vae(tiny_model, frames) -> None:
    cuda = RecordingCuda()
    engine = make_engine(tiny_model, cuda, batch_vae=False)
    assert_same(run(engine, frames, cuda=cuda), run(make_engine(tiny_model, None, batch_vae=False), frames), 30)
    assert engine.graphs.ticks.captures == 3 and engine.graphs.ticks.replays >= 8


def test_a_guidance_value_baked_at_capture_would_show(tiny_model, frames, eager_frames, monkeypatch) -> None:
    """γ and δ are read from their static tensor at every replay; rewritten once only (as a capture baking the
    value in would behave), A's guidance change is missed and the frame check fails."""
    fill = tick_graph.TickGraphs._fill
    filled: set[int] = set()

    def fill_once(self, program, members):
        guidance = program.guidance.clone() if id(program) in filled else None
        fill(self, program, members)
        if guidance is not None:
            program.guidance.copy_(guidance)
        filled.add(id(program))

    monkeypatch.setattr(tick_graph.TickGraphs, "_fill", fill_once)
    with pytest.raises(AssertionError):
        assert_same(run(make_engine(tiny_model, RecordingCuda()), frames), eager_frames, 30)


def test_a_replaced_tensor_without_a_new_key_would_show(tiny_model, frames, eager_frames, monkeypatch) -> None:
    """The key names each tensor the graph reads: without their identities in it, A's new schedule (new
    coefficient tensors) is not seen by the replay (it reads the old ones) and the frame check fails."""
    key = tick_graph.tick_key

    def without_identities(members, unet, vae):
        return tuple(part[:-1] if isinstance(part, tuple) and len(part) > 3 else part
                     for part in key(members, unet, vae))

    monkeypatch.setattr(tick_graph, "tick_key", without_identities)
    with pytest.raises(AssertionError):
        assert_same(run(make_engine(tiny_model, RecordingCuda()), frames), eager_frames, 30)


def test_a_host_read_inside_a_tick_cannot_be_captured(tiny_model, frames, eager_frames, monkeypatch, caplog) -> None:
    """A program that reads a number back (here: γ as a Python float inside the step) fails its capture, runs
    eagerly from then on, and the frames stay right."""
    real = tick_graph.batch_apply

    def reading(prediction, buffers, coeffs, guidance, kind, add_noise):
        scale = float(guidance.scale)  # what a step taking γ as a Python float would need: a host read
        return real(prediction, buffers, coeffs, replace(guidance, scale=torch.tensor(scale)), kind, add_noise)

    monkeypatch.setattr(tick_graph, "batch_apply", reading)
    cuda = RecordingCuda()
    engine = make_engine(tiny_model, cuda)
    with caplog.at_level(logging.WARNING):
        assert_same(run(engine, frames, cuda=cuda), eager_frames, 30)
    ticks = engine.graphs.ticks
    assert ticks.captures == 0 and ticks.eager and cuda.capture_attempts >= len(ticks.eager)
    assert any("runs eagerly" in r.getMessage() for r in caplog.records)


def test_the_recording_fake_refuses_host_reads_and_replays_recorded_work() -> None:
    cuda = RecordingCuda()
    x, scale = torch.ones(3), 2.0
    graph = cuda.capture(None, lambda: x.mul_(scale))  # runs once while recording: 2
    scale = 5.0
    cuda.replay(graph)  # the recorded multiplication by 2, not by the new Python value
    assert torch.equal(x, torch.full((3,), 4.0))
    with pytest.raises(HostSyncInCapture):
        cuda.capture(None, lambda: float(x.sum()))


def test_a_capture_leaves_the_state_it_found() -> None:
    """Warm-ups and the capture run the program (the fake's capture does); the mutable tensors are restored, so
    only the replay after it advances the state."""
    cuda = RecordingCuda()
    counter = torch.zeros(2)
    programs = GraphedPrograms("test", torch.device("cpu"), cuda, max_programs=1)
    program = Program(run=lambda: counter.add_(1), mutable=[counter])
    assert programs.capture("k", program) and torch.equal(counter, torch.zeros(2))
    programs.replay(program)
    assert torch.equal(counter, torch.ones(2))
    assert programs.capture("k2", Program(run=lambda: counter.add_(1), mutable=[counter]))
    assert programs.evictions == 1 and cuda.graphs[0].released and list(programs.programs) == ["k2"]

    runs = []

    def failing() -> None:  # the second warm-up raises, after the first changed the state
        counter.add_(1)
        runs.append(1)
        if len(runs) == 2:
            raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        programs.capture("k3", Program(run=failing, mutable=[counter]))
    assert torch.equal(counter, torch.ones(2)) and "k3" not in programs.programs and not programs.is_eager("k3")


def test_captures_are_rationed_when_a_client_keeps_changing_the_key(tiny_model, frames) -> None:
    """A stream whose schedule changes every third tick makes a new key each time: after CAPTURE_BURST captures its
    call runs eagerly (the others pay no capture after capture), with the same frames."""
    schedules = [(20, 40), (19, 40), (18, 40), (17, 40), (16, 40), (15, 40), (14, 40), (13, 40), (12, 40)]

    def churn(engine):
        a, b = engine.open_stream(A[0], **A[1]), engine.open_stream(StreamConfig(width=SIZE, height=SIZE),
                                                                    prompt="calm", seed=5)
        got = []
        for tick in range(3 * len(schedules)):
            if tick % 3 == 0:
                a.update(t_index_list=schedules[tick // 3])
            out = engine.step({a: frames[tick % 8], b: frames[(tick + 3) % 8]})
            got.append({name: o.images.clone() for name, o in (("a", out.get(a)), ("b", out.get(b)))
                        if o is not None and o.images is not None})
        return got

    cuda = RecordingCuda()
    engine, eager = make_engine(tiny_model, cuda), make_engine(tiny_model, None)
    got, expected = churn(engine), churn(eager)
    ticks = engine.graphs.ticks
    assert ticks.captures == tick_graph.CAPTURE_BURST and len(engine.executor.ticks.seen) >= len(schedules)
    assert ticks.replays > tick_graph.CAPTURE_BURST  # each capture replayed at its tick, most on the next too
    for name in ("unet_calls", "unet_rows", "padded_rows", "ticks"):  # replayed calls are counted as eager ones
        assert getattr(engine.stats, name) == getattr(eager.stats, name), name
    assert sum(len(t) for t in expected) >= 40
    for g, e in zip(got, expected):
        assert g.keys() == e.keys() and all(torch.equal(g[name], e[name]) for name in e)


def test_a_call_seen_once_is_not_captured(tiny_model, frames) -> None:
    cuda = RecordingCuda()
    engine = make_engine(tiny_model, cuda)
    a = engine.open_stream(A[0], **A[1])
    for tick in range(2):  # tick 0 fills A's batch (eager); tick 1 is the first sighting of the full call
        engine.step({a: frames[tick]})
    assert engine.graphs.ticks.captures == 0
    engine.step({a: frames[2]})
    assert engine.graphs.ticks.captures == 1 and engine.graphs.ticks.replays == 1
    unet = engine.graphs.calls()[0]
    replays = unet.replays
    engine.step({a: frames[3]})
    assert engine.graphs.ticks.replays == 2 and unet.replays == replays  # the tick's graph, no per-call graph


def test_the_similarity_filter_decides_on_the_host_with_the_same_decisions(tiny_model, frames) -> None:
    """On a GPU the filter reads the host frames (no device read per tick); its decisions equal the device path's."""
    still = StreamConfig(width=SIZE, height=SIZE, t_index_list=(20, 40), cfg_type="none",
                         filter={"enabled": True, "threshold": 0.9, "max_skip_frames": 3})
    sequence = [frames[0]] * 6 + [frames[1]] * 3 + [frames[0]] * 5

    def outcomes(cuda):
        engine = make_engine(tiny_model, cuda)
        stream = engine.open_stream(still, prompt="fog", seed=9)
        got = []
        for frame in sequence:
            out = engine.step({stream: frame}).get(stream)
            got.append(None if out is None else (out.skipped, out.frame_ids,
                                                 None if out.images is None else out.images.clone()))
        return got, stream.stats.filter_skips

    host, host_skips = outcomes(RecordingCuda())
    device, device_skips = outcomes(None)
    assert host_skips == device_skips >= 3
    assert [o and o[:2] for o in host] == [o and o[:2] for o in device]
    assert all(torch.equal(h[2], d[2]) for h, d in zip(host, device) if h and h[2] is not None)


def test_call_scope_keeps_per_call_graphs_only(tiny_model, frames, eager_frames) -> None:
    cuda = RecordingCuda()
    engine = make_engine(tiny_model, cuda, scope="call")
    assert engine.graphs.ticks is None
    assert_same(run(engine, frames, cuda=cuda), eager_frames, 30)
    with pytest.raises(ConfigError, match="cuda_graph_scope='all' must be one of tick, call"):
        EngineConfig(cuda_graph_scope="all")
