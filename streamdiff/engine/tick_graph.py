"""A whole tick of one U-Net call as ONE CUDA graph: VAE encode, entry noise, plan, the batched U-Net call, the step
arithmetic of every stream in it, VAE decode and the output's range and dtype.

The per-call graphs (:mod:`streamdiff.backends.cuda_graphs`) leave the step arithmetic between the calls: tens of
small kernels per stream, each a launch, and guidance values read from the host. Here everything between the input
copy and the output copy is one replay.

- **What the graph reads** is fixed when it is captured: each member stream's Stream Batch buffers, coefficients and
  prompt embeddings (by identity: a prompt change or a new schedule makes new tensors, hence a new key and a new
  capture), the static input images and the static guidance values. γ and δ live in a static ``[members, 2]``
  tensor rewritten before every replay (:class:`~streamdiff.core.step.DeviceGuidance`), so a live guidance change
  costs no capture; whether guidance is active (γ > 1) is part of the key.
- **The key** (:func:`tick_key`) names the engines, the members in call order, and for each its settings, sizes and
  the identity of every tensor the graph reads. A key is captured on its second sighting (:data:`CAPTURE_AFTER`):
  a membership seen once (a stream warming up, a frame the similarity filter skipped) runs through the eager path
  rather than paying a capture it may never replay. A capture costs the whole call two warm-up runs, and every
  stream of the call pays them: captures are rationed (:data:`CAPTURE_BURST` at once, then one per
  :data:`CAPTURE_REFILL` calls), so a client that keeps changing what the key names (schedules, streams joining
  and leaving) makes its call run eagerly, as without graphs, instead of costing the others capture after
  capture. A prompt change is written into the stream's own embeddings tensor (the same identity: no new key).
- **The host keeps** the Stream Batch's frame-id record, the counters and ``last_latents`` (a copy of the entry
  latents the graph wrote), and hands the decoded frames to the tick's ONE device→host copy.
- **Who is eligible** (:func:`graphable`): Stream Batch streams (``use_denoising_batch``) without ControlNet,
  IP-Adapter or U-Net extra inputs, whose batch has filled (every member brings frames out, so the graph decodes
  exactly what the eager path decodes), taking a new frame group or generating (txt2img); a call with any other
  member runs the eager path (with its per-call graphs). A stream's first n−1 ticks, a drain and a flush are
  transient and run eagerly.

No I/O and no device choice: the device work goes through the owner's engines and the CUDA seam.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..backends.cuda_graphs import GraphedPrograms, Program
from ..core.image import from_model_range, to_model_range
from ..core.schedule import PredictionType, SlotCoefficients
from ..core.step import DeviceGuidance, Embeddings, StreamBuffers, batch_apply, batch_plan, noise_first_step
from .batch import assemble, padded_size
from .state import StreamState, stream_rows

CAPTURE_AFTER = 2  # sightings of a key before it is captured
CAPTURE_BURST = 4  # captures that may follow one another ...
CAPTURE_REFILL = 64  # ... then one per this many calls at most
_MEMBERS = 3  # where the members' parts start in a key (each part starts with its state's id)
SEEN_KEYS = 64  # keys whose sightings are counted (least recently seen forgotten)


@dataclass(eq=False)
class Member:
    """One stream's part of a graphed call: its state and this tick's frame group (host ``[F, 3, H, W]`` in
    [0, 1]; None for txt2img)."""

    state: StreamState
    images: torch.Tensor | None


@dataclass(eq=False)
class TickProgram(Program):
    """A captured call: the program plus its static input, guidance values and outputs."""

    images: torch.Tensor | None = None  # [frames of img2img members, 3, H, W], model dtype
    guidance: torch.Tensor | None = None  # [members, 2]: γ, δ of each member (float32)
    entries: torch.Tensor | None = None  # [all frames, C, h, w]: the latents that entered slot 0
    output: torch.Tensor | None = None  # [all frames, 3, H, W] float32 in [0, 1]
    rows: int = 0  # U-Net rows of the call, padding not counted
    padding: int = 0  # rows added to reach a batch size the U-Net has


def graphable(state: StreamState) -> bool:
    """Whether a stream's tick can be part of a whole-tick graph (see the module docstring)."""
    return (state.config.use_denoising_batch and state.batch_full and not state.prompt.controlnets
            and state.extras is None and not state.embeddings.batch_extras
            and not (state.control is not None and state.control.group))


def tick_key(members: Sequence[Member], unet: Any, vae: Any) -> tuple[Any, ...]:
    """Everything a captured call depends on besides the contents of its tensors: engines, members, settings,
    shapes and the identity of each tensor it reads."""
    parts: list[Any] = [id(unet), id(vae), tuple(getattr(unet, "batch_sizes", None) or ())]  # then _MEMBERS on
    for m in members:
        s, b, c = m.state, m.state.buffers, m.state.coeffs
        parts.append((
            id(s), m.images is not None, s.config.width, s.config.height, s.config.frame_buffer_size,
            s.config.denoising_steps, s.config.add_noise, s.guidance.mode, s.guidance.active, s.prediction_type,
            s.latent_shape,
            tuple(id(t) for t in (b.init_noise, b.x_batch, b.stock_noise, b.next_alpha, b.next_beta, b.next_noise,
                                  c.timesteps, c.alpha_sqrt, c.beta_sqrt, c.c_skip, c.c_out, s.embeddings.batch)),
        ))
    return tuple(parts)


class TickGraphs:
    """Whole-tick graphs of an engine's U-Net calls; see the module docstring.

    ``programs``: where graphs are kept (:class:`~streamdiff.backends.cuda_graphs.GraphedPrograms`);
    ``engines()``: the current (U-Net, VAE) engines, ungraphed; ``empty(shape, dtype)``: a device buffer (the CUDA
    seam's); ``batch_vae``: one VAE encode and one decode for the call's frames (else one per stream, as the eager
    path does with ``EngineConfig.batch_vae`` off). :meth:`run` returns None when the call is not (yet) captured:
    the caller runs it eagerly.
    """

    def __init__(self, programs: GraphedPrograms, engines: Callable[[], tuple[Any, Any]],
                 empty: Callable[[tuple[int, ...], torch.dtype], torch.Tensor], dtype: torch.dtype,
                 batch_vae: bool = True) -> None:
        self.programs, self.engines, self.empty, self.dtype = programs, engines, empty, dtype
        self.batch_vae = batch_vae
        self.seen: OrderedDict[tuple[Any, ...], int] = OrderedDict()
        self.tokens = float(CAPTURE_BURST)  # captures allowed now (see CAPTURE_REFILL)

    def run(self, members: Sequence[Member]) -> tuple[TickProgram, list[torch.Tensor]] | None:
        """Replay the call of ``members`` (capturing it on its :data:`CAPTURE_AFTER`-th sighting). Each member's
        decoded frames ``[F, 3, H, W]`` (views of the program's static output, valid until its next replay); None
        when the call runs eagerly instead. Raises what the program raised (the member states are as they were
        when a warm-up raises)."""
        unet, vae = self.engines()
        key = tick_key(members, unet, vae)
        program = self.programs.get(key)
        self.tokens = min(float(CAPTURE_BURST), self.tokens + 1.0 / CAPTURE_REFILL)
        if program is None:
            if self.programs.is_eager(key) or not self._sighted(key) or self.tokens < 1.0:
                return None
            self.tokens -= 1.0
            program = self._build(members, unet, vae)
            self._fill(program, members)
            if not self.programs.capture(key, program):
                return None
        else:
            self._fill(program, members)
        self.programs.replay(program)
        return program, self._finish(program, members)

    def forget(self, state: StreamState) -> None:
        """A stream ended: release the graphs it is a member of (they hold its buffers and their own memory)."""
        self.programs.release_where(lambda key: any(part[0] == id(state) for part in key[_MEMBERS:]))
        for key in [k for k in self.seen if any(part[0] == id(state) for part in k[_MEMBERS:])]:
            del self.seen[key]

    def _sighted(self, key: tuple[Any, ...]) -> bool:
        count = self.seen.pop(key, 0) + 1
        self.seen[key] = count
        while len(self.seen) > SEEN_KEYS:
            self.seen.popitem(last=False)
        return count >= CAPTURE_AFTER

    def _fill(self, program: TickProgram, members: Sequence[Member]) -> None:
        """The static inputs for this replay: the frame groups (one host→device copy) and γ, δ (one more)."""
        groups = [m.images for m in members if m.images is not None]
        if program.images is not None:
            program.images.copy_(torch.cat(groups) if len(groups) > 1 else groups[0])
        values = torch.tensor([[m.state.guidance.scale, m.state.guidance.delta] for m in members],
                              dtype=torch.float32)
        assert program.guidance is not None
        program.guidance.copy_(values)

    def _build(self, members: Sequence[Member], unet: Any, vae: Any) -> TickProgram:
        """The program of this call: static buffers, and a closure over them and the members' tensors only."""
        config, latent = members[0].state.config, members[0].state.latent_shape
        frames = sum(m.state.config.frame_buffer_size for m in members)
        image_frames = sum(m.state.config.frame_buffer_size for m in members if m.images is not None)
        batch_sizes = getattr(unet, "batch_sizes", None)
        rows = sum(stream_rows(m.state.config) for m in members)
        program = TickProgram(run=lambda: None, mutable=[], rows=rows,
                              padding=padded_size(rows, batch_sizes) - rows)
        if image_frames:
            program.images = self.empty((image_frames, 3, config.height, config.width), self.dtype)
        program.guidance = self.empty((len(members), 2), torch.float32)
        program.entries = self.empty((frames, *latent), self.dtype)
        program.output = self.empty((frames, 3, config.height, config.width), torch.float32)
        parts, image_at, frame_at = [], 0, 0
        for index, m in enumerate(members):
            s, f = m.state, m.state.config.frame_buffer_size
            parts.append(_Part(
                s.buffers, s.coeffs, s.embeddings, s.prediction_type, s.config.add_noise,
                DeviceGuidance(s.guidance.mode, program.guidance[index, 0], program.guidance[index, 1],
                               s.guidance.active),
                None if m.images is None else slice(image_at, image_at + f), slice(frame_at, frame_at + f)))
            image_at += f if m.images is not None else 0
            frame_at += f
            program.mutable += [s.buffers.x_batch, s.buffers.stock_noise]
        images, entries, output, batch_vae = program.images, program.entries, program.output, self.batch_vae

        def run() -> None:  # device work only: nothing here runs again at a replay
            latents = vae.encode(to_model_range(images)) if images is not None and batch_vae else None
            planned = []
            for part in parts:
                if part.images is None:
                    entry = part.buffers.init_noise[: part.buffers.frames]
                else:
                    assert images is not None
                    encoded = latents[part.images] if latents is not None else vae.encode(
                        to_model_range(images[part.images]))
                    entry = noise_first_step(encoded, part.coeffs, part.buffers.init_noise)
                entries[part.frames].copy_(entry)
                planned.append(batch_plan(entries[part.frames], part.buffers, part.coeffs, part.embeddings,
                                          part.guidance.mode))
            assembled = assemble(planned, batch_sizes)
            prediction = unet(assembled.rows.sample, assembled.rows.timesteps, assembled.rows.embeddings,
                              **assembled.rows.extras)
            x0 = [batch_apply(p, part.buffers, part.coeffs, part.guidance, part.prediction_type, part.add_noise)
                  for part, p in zip(parts, assembled.split(prediction))]
            if batch_vae:
                output.copy_(from_model_range(vae.decode(torch.cat(x0) if len(x0) > 1 else x0[0])).float())
                return
            for part, latent in zip(parts, x0):
                output[part.frames].copy_(from_model_range(vae.decode(latent)).float())

        program.run = run
        return program

    def _finish(self, program: TickProgram, members: Sequence[Member]) -> list[torch.Tensor]:
        """The host's part after a replay: counters and ``last_latents``; each member's frames."""
        assert program.entries is not None and program.output is not None
        out: list[torch.Tensor] = []
        at = 0
        for m in members:
            f = m.state.config.frame_buffer_size
            m.state.buffers.filled += 1
            m.state.last_latents = program.entries[at:at + f].clone()
            out.append(program.output[at:at + f])
            at += f
        return out

    def release(self) -> None:
        self.programs.release()
        self.seen.clear()


@dataclass(frozen=True)
class _Part:
    """One member as the program reads it, fixed at capture: its tensors, the host values baked in, and where its
    frames sit in the static input (``images``; None for txt2img) and outputs (``frames``)."""

    buffers: StreamBuffers
    coeffs: SlotCoefficients
    embeddings: Embeddings
    prediction_type: PredictionType
    add_noise: bool
    guidance: DeviceGuidance
    images: slice | None
    frames: slice
