"""Per-stream numeric state, apart from the shared model: buffers, coefficients, conditioning, filter, last output.

Many :class:`StreamState` objects share one model and one U-Net call; each owns what changes from frame to frame.
Only the engine's worker (the thread that owns the model) touches a state. Each tick a state turns its new frame
group into a :class:`StreamTask` — the U-Net rounds it needs (one for the Stream Batch, n without it), planned and
applied through :mod:`streamdiff.core.step`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import PromptConfig, StreamConfig, StreamMode
from ..core.control import ControlRows, control_rows
from ..core.guidance import call_rows, expand_embeddings, expand_extras
from ..core.schedule import NoiseSchedule, PredictionType, SlotCoefficients, slot_coefficients
from ..core.similarity import SimilarityFilter
from ..core.step import (
    Embeddings,
    Guidance,
    SequentialRun,
    StreamBuffers,
    UNetRows,
    batch_apply,
    batch_plan,
    noise_first_step,
)
from .control import ControlState


def draw_noise(seed: int, rows: int, latent_shape: tuple[int, int, int]) -> torch.Tensor:
    """Per-row initial noise, StreamDiffusion-compatible: float32 randn on the CPU from ``manual_seed(seed)``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((rows, *latent_shape), generator=generator, dtype=torch.float32)


@dataclass
class RowExtras:
    """A stream's per-row extra U-Net inputs (``backends.base.UNET_EXTRAS``) in the three row layouts of
    :class:`~streamdiff.core.step.Embeddings`: the whole Stream Batch, a first step, a later step."""

    batch: dict[str, torch.Tensor]
    first: dict[str, torch.Tensor]
    later: dict[str, torch.Tensor]


@dataclass
class StreamStats:
    """Counters of one stream (frames, not groups)."""

    frames_in: int = 0
    frames_out: int = 0
    unet_calls: int = 0
    filter_skips: int = 0
    dropped_inputs: int = 0  # superseded in the latest-wins input queue before the engine took them
    dropped_on_reconfigure: int = 0  # inside the Stream Batch when a change of shape restarted it


@dataclass
class StreamState:
    """Everything one stream carries between ticks. Build with :meth:`create`; the engine applies changes."""

    config: StreamConfig
    prompt: PromptConfig
    coeffs: SlotCoefficients
    buffers: StreamBuffers
    guidance: Guidance
    embeddings: Embeddings
    filter: SimilarityFilter
    prediction_type: PredictionType
    latent_shape: tuple[int, int, int]
    last_output: torch.Tensor | None = None  # [F, 3, H, W] in [0, 1] (float32, CPU)
    last_latents: torch.Tensor | None = None  # the newest group at t0 (flush re-feeds it as padding)
    version: int = 0  # settings version of the last applied change
    extras: RowExtras | None = None  # per-row extra U-Net inputs (the image prompt's), same rows as embeddings
    control: ControlState | None = None  # control images of the frames inside (ControlNet streams)

    @classmethod
    def create(
        cls,
        config: StreamConfig,
        prompt: PromptConfig,
        schedule: NoiseSchedule,
        latent_shape: tuple[int, int, int],
        cond: torch.Tensor,
        uncond: torch.Tensor | None,
        device: torch.device,
        dtype: torch.dtype,
        cond_extras: dict[str, torch.Tensor] | None = None,
        uncond_extras: dict[str, torch.Tensor] | None = None,
    ) -> StreamState:
        """``cond_extras``/``uncond_extras``: extra conditioning U-Net inputs (``[1, ...]`` each, by name, e.g. SDXL's
        ``text_embeds`` and ``time_ids``) for the conditional and the negative rows."""
        coeffs = _coefficients(config, schedule, device, dtype)
        f = config.frame_buffer_size
        noise = draw_noise(prompt.seed, config.denoising_steps * f, latent_shape).to(device, dtype)
        return cls(
            config=config,
            prompt=prompt,
            coeffs=coeffs,
            buffers=StreamBuffers.allocate(coeffs, f, latent_shape, noise),
            guidance=Guidance(config.cfg_type, float(prompt.guidance_scale), float(prompt.delta)),
            embeddings=_embeddings(config, cond, uncond, cond_extras, uncond_extras),
            filter=SimilarityFilter(config.filter, seed=prompt.seed),
            prediction_type=schedule.prediction_type,
            latent_shape=latent_shape,
            control=ControlState(config.denoising_steps * f, f, config.use_denoising_batch),
        )

    # -- live changes that keep the buffers ---------------------------------------------------------------------

    def set_conditioning(
        self, cond: torch.Tensor, uncond: torch.Tensor | None, cond_extras: dict[str, torch.Tensor] | None = None,
        uncond_extras: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """New prompt embeddings and extra conditioning (expanded once for every row layout). The Stream Batch's
        rows are written into the tensor they replace where the shape allows: a captured CUDA graph reads that
        tensor, so a prompt change needs no new capture."""
        embeddings = _embeddings(self.config, cond, uncond, cond_extras, uncond_extras)
        current = self.embeddings.batch
        if (embeddings.batch.shape, embeddings.batch.dtype, embeddings.batch.device) == (
                current.shape, current.dtype, current.device):
            current.copy_(embeddings.batch)
            embeddings.batch = current
        self.embeddings = embeddings

    def set_image_prompt(self, tokens: torch.Tensor, negative: torch.Tensor, scale: float) -> None:
        """IP-Adapter inputs for every row: ``tokens`` ``[1, N, D]`` on the conditional rows, ``negative`` on the
        unconditional ones (as diffusers' pipeline does), ``scale`` on all (0 with zero tokens: no image prompt)."""
        mode, f = self.config.cfg_type, self.config.frame_buffer_size
        rows = self.config.denoising_steps * f

        def layout(count: int, first_step: bool) -> dict[str, torch.Tensor]:
            ip_tokens = expand_embeddings(mode, tokens, negative, count, f, first_step)
            return {"ip_tokens": ip_tokens, "ip_scale": torch.full(ip_tokens.shape[:1], float(scale),
                                                                   device=ip_tokens.device, dtype=ip_tokens.dtype)}

        self.extras = RowExtras(layout(rows, True), layout(f, True), layout(f, False))

    def set_schedule(self, config: StreamConfig, schedule: NoiseSchedule) -> None:
        """New timesteps with the same n and F: coefficients change in place, the frames inside stay."""
        coeffs = _coefficients(config, schedule, self.coeffs.alpha_sqrt.device, self.coeffs.alpha_sqrt.dtype)
        self.coeffs = coeffs
        self.buffers.set_coefficients(coeffs)
        self.config = config

    def set_seed(self, seed: int) -> None:
        """Redraw the per-row noise for ``seed`` and reseed the filter."""
        noise = draw_noise(seed, self.buffers.init_noise.shape[0], tuple(self.buffers.init_noise.shape[1:]))
        self.buffers.set_noise(noise.to(self.buffers.init_noise.device, self.buffers.init_noise.dtype))
        self.filter.reset(seed)

    # -- per tick -------------------------------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        """The most U-Net rows this stream puts into one call (what the scheduler packs)."""
        return stream_rows(self.config)

    @property
    def frames_inside(self) -> int:
        """Real frames still inside the Stream Batch (what a flush would bring out)."""
        return sum(len(ids) for ids in self.buffers.frame_ids if ids is not None)

    def entry_latents(self, encoded: torch.Tensor | None) -> torch.Tensor:
        """The F latents that enter slot 0: encoded frames noised to t0 (img2img), or the seed's noise (txt2img)."""
        f = self.config.frame_buffer_size
        if self.config.mode is StreamMode.TXT2IMG or encoded is None:
            return self.buffers.init_noise[:f]
        return noise_first_step(encoded, self.coeffs, self.buffers.init_noise)

    def task(self, latents: torch.Tensor, frame_ids: tuple[Any, ...] | None,
             control: dict[str, torch.Tensor] | None = None) -> StreamTask:
        """This tick's work for ``latents`` at t0; ``frame_ids`` None marks flush padding (no output). ``control``:
        the group's control images ``[F, 3, H, W]`` by ControlNet name (None: the last group's again)."""
        self.last_latents = latents
        if self.control is not None and (self.prompt.controlnets or self.control.group):
            self.control.enter(control if control is not None or frame_ids is None else {})
        if self.config.use_denoising_batch:
            return BatchTask(self, latents, frame_ids)
        return SequentialTask(self, latents, frame_ids)

    @property
    def batch_full(self) -> bool:
        """Whether the next Stream Batch call brings real frames out (the batch has filled, and what leaves is not a
        flush's padding)."""
        inside = self.buffers.frame_ids
        return len(inside) + 1 >= self.config.denoising_steps and (not inside or inside[0] is not None)

    def leaving(self, frame_ids: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
        """A Stream Batch call's frame ids: ``frame_ids`` (None: flush padding) enter slot 0; the ids of the group
        that leaves slot n−1 with this call, or None (the batch is still filling, or padding leaves)."""
        inside = self.buffers.frame_ids
        inside.append(frame_ids)
        if len(inside) < self.config.denoising_steps:
            return None
        return inside.pop(0)

    def reset(self) -> None:
        """Empty the Stream Batch (after a flush); the next n−1 ticks are warm-up again."""
        self.buffers.reset()
        self.last_latents = None


class StreamTask:
    """One stream's work in one tick: ``rounds`` U-Net calls, each planned and applied; then :meth:`finish`."""

    rounds = 1

    def __init__(self, state: StreamState, latents: torch.Tensor, frame_ids: tuple[Any, ...] | None) -> None:
        self.state = state
        self.latents = latents
        self.frame_ids = frame_ids
        self.x0: torch.Tensor | None = None

    def plan(self, round_index: int) -> UNetRows:
        raise NotImplementedError

    def apply(self, round_index: int, prediction: torch.Tensor) -> None:
        raise NotImplementedError

    def finish(self) -> tuple[torch.Tensor | None, tuple[Any, ...]]:
        """The finished latents ``[F, C, h, w]`` leaving this tick and their frame ids, or ``(None, ())``."""
        raise NotImplementedError

    def controls(self, round_index: int) -> dict[str, ControlRows]:
        """The inputs of each ControlNet the stream uses for the rows of :meth:`plan` (see core/control.py)."""
        s = self.state
        if not s.prompt.controlnets or s.control is None:
            return {}
        f, n = s.config.frame_buffer_size, s.config.denoising_steps
        batched = isinstance(self, BatchTask)
        images = s.control.batch if batched else s.control.group
        row_steps = [r // f for r in range(n * f)] if batched else [round_index] * f
        first = batched or round_index == 0
        return {spec.name: control_rows(spec, s.guidance.mode, images[spec.name], row_steps, n, f, first)
                for spec in s.prompt.controlnets if spec.name in images}


class BatchTask(StreamTask):
    """One Stream Batch call: the new group enters slot 0, the group that entered n−1 ticks ago leaves."""

    def plan(self, round_index: int) -> UNetRows:
        s = self.state
        rows = batch_plan(self.latents, s.buffers, s.coeffs, s.embeddings, s.guidance.mode)
        if s.extras is not None:
            rows.extras.update(s.extras.batch)
        return rows

    def apply(self, round_index: int, prediction: torch.Tensor) -> None:
        s = self.state
        self.x0 = batch_apply(prediction, s.buffers, s.coeffs, s.guidance, s.prediction_type, s.config.add_noise)
        s.buffers.filled += 1

    def finish(self) -> tuple[torch.Tensor | None, tuple[Any, ...]]:
        leaving = self.state.leaving(self.frame_ids)
        if leaving is None or self.x0 is None:
            return None, ()
        return self.x0, leaving


class SequentialTask(StreamTask):
    """The n steps of one group, one U-Net round each (``use_denoising_batch=False``)."""

    def __init__(self, state: StreamState, latents: torch.Tensor, frame_ids: tuple[Any, ...] | None) -> None:
        super().__init__(state, latents, frame_ids)
        self.run = SequentialRun(
            latents, state.buffers.init_noise, state.coeffs, state.embeddings, state.guidance, state.prediction_type,
            state.config.add_noise,
        )
        self.rounds = self.run.steps

    def plan(self, round_index: int) -> UNetRows:
        rows = self.run.plan(round_index)
        extras = self.state.extras
        if extras is not None:
            rows.extras.update(extras.first if round_index == 0 else extras.later)
        return rows

    def apply(self, round_index: int, prediction: torch.Tensor) -> None:
        self.run.apply(round_index, prediction)

    def finish(self) -> tuple[torch.Tensor | None, tuple[Any, ...]]:
        if self.frame_ids is None or self.run.result is None:
            return None, ()
        return self.run.result, self.frame_ids


def stream_rows(config: StreamConfig) -> int:
    """The most U-Net rows a stream with ``config`` puts into one call."""
    return max(call_rows(config.cfg_type, config.denoising_steps, config.frame_buffer_size, config.use_denoising_batch))


def _coefficients(
    config: StreamConfig, schedule: NoiseSchedule, device: torch.device, dtype: torch.dtype
) -> SlotCoefficients:
    coeffs = slot_coefficients(schedule, config.t_index_list, config.num_inference_steps, config.frame_buffer_size)
    return coeffs.to(device, dtype)


def _embeddings(
    config: StreamConfig, cond: torch.Tensor, uncond: torch.Tensor | None,
    cond_extras: dict[str, torch.Tensor] | None = None, uncond_extras: dict[str, torch.Tensor] | None = None,
) -> Embeddings:
    mode, f = config.cfg_type, config.frame_buffer_size
    rows = config.denoising_steps * f
    extras = cond_extras or {}
    negative_extras = uncond_extras if uncond is not None else None
    return Embeddings(
        # The stream's own copy (it may alias the prompt cache's tensor), rewritten in place by set_conditioning.
        batch=expand_embeddings(mode, cond, uncond, rows, f, has_first_step=True).clone(),
        first=expand_embeddings(mode, cond, uncond, f, f, has_first_step=True),
        later=expand_embeddings(mode, cond, uncond, f, f, has_first_step=False),
        batch_extras=expand_extras(mode, extras, negative_extras, rows, f, has_first_step=True),
        first_extras=expand_extras(mode, extras, negative_extras, f, f, has_first_step=True),
        later_extras=expand_extras(mode, extras, negative_extras, f, f, has_first_step=False),
    )
