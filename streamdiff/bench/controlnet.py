"""``streamdiff bench --only controlnet``: what a ControlNet costs per frame, and what batching ControlNet streams gains.

On the default CPU backend (``auto``: OpenVINO, with the U-Net and the ControlNet compiled), bfloat16 requested:

- ``plain``: one stream without ControlNet, stepped alone (its calls pass the U-Net zero residuals);
- ``controlnet``: one stream with a ControlNet (passthrough control image), stepped alone;
- ``controlnet-batched-k4``: four ControlNet streams, one tick for all (ONE U-Net call and ONE
  ControlNet call over the four streams' rows);
- ``controlnet-turns-k4``: the same four streams taking turns (each stepped alone: one call of each per stream).

All cases share one engine with the ControlNet (one compiled U-Net and ControlNet: an SD-2.1-size U-Net compiled at
f32 weighs 3.3 GB, and two U-Nets with their per-shape state overran this 23 GB host), so the cases differ only in
the streams' settings and in how they are stepped. A round of a k-stream case gives each stream one frame; seconds
per item are per frame. Cases are interleaved (A B A B …); figures are medians over rounds.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import ControlNetSpec, StreamConfig
from ..engine import EngineConfig, Stream, StreamEngine
from ..errors import StreamDiffError
from ..engine.state import stream_rows
from .harness import Case, Check, Comparison, run_interleaved

STREAMS = 4
PROMPTS = ("a watercolor portrait", "an oil painting", "a charcoal sketch", "neon city at night")


@torch.no_grad()
def controlnet_for(unet: torch.nn.Module, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A ControlNet of ``unet``'s size (diffusers' ``ControlNetModel.from_unet``: its encoder's weights), in
    ``dtype``, with seeded small random zero-convolutions (from_unet leaves them 0, so the residuals would be 0)."""
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(unet)
    generator = torch.Generator().manual_seed(seed)
    for block in (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block):
        block.weight.copy_(torch.randn(block.weight.shape, generator=generator) * 1e-3)
    return controlnet.to(dtype).eval().requires_grad_(False)


class EngineCase:
    """Streams on one engine, fed a frame each per :meth:`step`; ``batched``: one tick for all, else one stream at a
    time (taking turns). Control images are the frames themselves (passthrough)."""

    def __init__(self, engine: StreamEngine, config: StreamConfig, count: int, control: bool, batched: bool,
                 frames: list[torch.Tensor], first: int = 0) -> None:
        specs = [ControlNetSpec("cn", scale=0.8, preprocessor="passthrough")] if control else []
        self.engine = engine
        self.streams: list[Stream] = [
            engine.open_stream(config, prompt=PROMPTS[(first + i) % len(PROMPTS)], seed=first + i + 1,
                               controlnets=specs)
            for i in range(count)]
        self.control = control
        self.batched = batched
        self.frames = [f[0].float() for f in frames]
        self.rounds = 0

    def step(self) -> None:
        frame = self.frames[self.rounds % len(self.frames)]
        groups = [self.streams] if self.batched else [[s] for s in self.streams]
        for group in groups:
            for stream in group:
                stream.submit(frame, control_image=frame if self.control else None)
            waiting = set(group)
            while waiting:
                waiting -= set(self.engine.step({}))
                for stream in waiting:
                    if stream.finished:
                        raise StreamDiffError(f"{stream.name} ended: {stream.error}")
        self.rounds += 1


def compare_controlnet(model: Any, controlnet: torch.nn.Module, config: StreamConfig, frames: list[torch.Tensor],
                       rounds: int, warmup: int, backend: str = "auto") -> Comparison:
    """The cases of the module docstring, interleaved; checks ControlNet ≤ 1.6× plain and 4 batched ≥ 1.15×
    taking turns."""
    engine_config = EngineConfig(max_streams=2 + 2 * STREAMS, max_batch_rows=stream_rows(config) * STREAMS)
    shared = StreamEngine(model, engine_config, backend=backend, controlnets={"cn": controlnet})
    cases = {
        "plain": EngineCase(shared, config, 1, False, True, frames),
        "controlnet": EngineCase(shared, config, 1, True, True, frames),
        f"controlnet-batched-k{STREAMS}": EngineCase(shared, config, STREAMS, True, True, frames),
        f"controlnet-turns-k{STREAMS}": EngineCase(shared, config, STREAMS, True, False, frames),
    }
    results = run_interleaved([Case(name, case.step, items=len(case.streams)) for name, case in cases.items()],
                              rounds, 1, warmup)
    comparison = Comparison("controlnet", results, baseline="plain")
    cost = 1.0 / comparison.speedup("controlnet")
    comparison.checks.append(Check("ControlNet stream / plain stream, seconds per frame", cost, 1.6,
                                   higher_is_better=False))
    comparison.checks.append(Check(f"{STREAMS} ControlNet streams batched / taking turns, aggregate frames/s",
                                   comparison.speedup(f"controlnet-batched-k{STREAMS}",
                                                      over=f"controlnet-turns-k{STREAMS}"), 1.15))
    unet = shared.unet
    precision = getattr(getattr(unet, "model", None), "precision", None)
    comparison.note = (f"backend {shared.backend.value}" + (f", inference precision {precision}" if precision else "")
                       + f"; {model.dtype} requested; seconds per frame (k-stream cases: per stream-frame)")
    return comparison
