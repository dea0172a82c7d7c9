"""One denoising step of the StreamDiffusion method, as PLAN and APPLY around a U-Net call made by someone else.

The Stream Batch (paper Sec. 3.2) holds ``n = len(t_index_list)`` steps × ``F = frame_buffer_size`` frames; row
``k·F + f`` is step k of frame f ("slot" k). A step is split so that the engine can put the rows of many streams
into ONE U-Net call:

- :func:`plan_rows` (PLAN): the U-Net rows a set of latents needs — samples, timesteps and text embeddings, with the
  negative rows the CFG mode adds (:mod:`.guidance`). No U-Net call.
- the caller runs the U-Net on the plan's rows (possibly concatenated with other streams' rows) and hands back the
  prediction rows that belong to this plan;
- :func:`apply_rows` (APPLY): the prediction as ε (:func:`to_epsilon`), guidance, the x̂0 prediction and, in the RCFG
  modes, the residual noise each row carries on.

:func:`batch_plan` / :func:`batch_apply` do this for the whole Stream Batch of one stream (slot 0 takes the new
frames, slot n−1 leaves, every other slot is re-noised into the next); :class:`SequentialRun` does the same n steps one
after another for the same F frames (``use_denoising_batch=False``). Both call :func:`plan_rows` and
:func:`apply_rows`, the one implementation of a step, so for the same frames and noise they agree.
:func:`stream_batch_step` and :func:`sequential_step` compose plan → U-Net → apply for a single stream.

Noise: ``init_noise`` ``[n·F, C, h, w]`` is drawn once per seed; row r is the noise of row r in every call. An
img2img frame enters slot 0 noised to the first timestep with the first F noise rows (:func:`noise_first_step`).
RCFG's residual noise ("stock noise") travels with its frame from slot to slot.

No I/O, no timing, no device choice: everything computes on the tensors it is given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..config import CfgMode
from .guidance import RESIDUAL_MODES, combine, expand_inputs, split_prediction
from .schedule import PredictionType, SlotCoefficients


class UNetFn(Protocol):
    """The noise predictor: ``[B, C, h, w]``, ``[B]``, ``[B, L, D]`` (and per-row extras) → ``[B, C, h, w]``."""

    def __call__(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
        **extras: torch.Tensor,
    ) -> torch.Tensor: ...


@dataclass
class Guidance:
    """Guidance settings for one call: the mode (fixed per configuration), γ and δ (live)."""

    mode: CfgMode
    scale: float
    delta: float

    @property
    def active(self) -> bool:
        return self.mode is not CfgMode.NONE and self.scale > 1.0


@dataclass
class Embeddings:
    """Expanded encoder hidden states for the three row layouts a stream uses (see guidance.expand_embeddings)."""

    batch: torch.Tensor  # all n·F rows, first step included
    first: torch.Tensor  # the F rows of step 0 (sequential mode)
    later: torch.Tensor  # the F rows of a later step (sequential mode)
    # Extra conditioning U-Net inputs (e.g. SDXL's text_embeds and time_ids), by name, in the same three layouts
    # (guidance.expand_extras); they go into UNetRows.extras.
    batch_extras: dict[str, torch.Tensor] = field(default_factory=dict)
    first_extras: dict[str, torch.Tensor] = field(default_factory=dict)
    later_extras: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class DeviceGuidance:
    """Guidance whose γ and δ are device tensors (0-d, rewritten in place between CUDA-graph replays), so a captured
    step reads the live values; ``active`` (γ > 1 in a guided mode) is a plain bool fixed when the step is captured."""

    mode: CfgMode
    scale: torch.Tensor
    delta: torch.Tensor
    active: bool


@dataclass
class UNetRows:
    """The PLAN of one step: the rows it needs in a U-Net call (negatives first, see :mod:`.guidance`)."""

    sample: torch.Tensor  # [R, C, h, w]
    timesteps: torch.Tensor  # [R] int64
    embeddings: torch.Tensor  # [R, L, D]
    # Further per-row U-Net inputs, each with the R rows as dimension 0, by name (see backends.base.UNET_EXTRAS);
    # batch assembly concatenates them like the three above.
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return int(self.sample.shape[0])


@dataclass
class StreamBuffers:
    """Per-stream tensors, allocated once with their final shapes."""

    init_noise: torch.Tensor  # [nF, C, h, w]
    x_batch: torch.Tensor  # [nF, C, h, w]: slot 0 = new latents, slots 1.. = carried noisy latents
    stock_noise: torch.Tensor  # [nF, C, h, w]: RCFG residual noise of each row
    next_alpha: torch.Tensor  # [nF, 1, 1, 1]: alpha_sqrt of the row's next slot (1 for the last)
    next_beta: torch.Tensor  # [nF, 1, 1, 1]
    next_noise: torch.Tensor  # [nF, C, h, w]: init noise of the row's next slot
    frames: int = 1
    filled: int = 0  # how many calls have entered the batch since the last reset
    frame_ids: list[object] = field(default_factory=list)  # ids of the frames inside, oldest first

    @classmethod
    def allocate(
        cls, coeffs: SlotCoefficients, frames: int, latent_shape: tuple[int, int, int], noise: torch.Tensor
    ) -> StreamBuffers:
        rows = coeffs.alpha_sqrt.shape[0]
        ones = torch.ones_like(coeffs.alpha_sqrt[:frames])
        buffers = cls(
            init_noise=noise,
            x_batch=torch.zeros((rows, *latent_shape), device=noise.device, dtype=noise.dtype),
            stock_noise=torch.zeros_like(noise),
            next_alpha=torch.cat([coeffs.alpha_sqrt[frames:], ones]),
            next_beta=torch.cat([coeffs.beta_sqrt[frames:], ones]),
            next_noise=torch.roll(noise, -frames, dims=0),
            frames=frames,
        )
        buffers.reset()
        return buffers

    def set_noise(self, noise: torch.Tensor) -> None:
        """Replace the per-row noise in place (a new seed)."""
        self.init_noise.copy_(noise)
        self.next_noise.copy_(torch.roll(noise, -self.frames, dims=0))
        self.stock_noise[: self.frames].copy_(noise[: self.frames])

    def set_coefficients(self, coeffs: SlotCoefficients) -> None:
        """New timesteps with the same n: refresh the next-slot coefficients in place."""
        f = self.frames
        self.next_alpha[:-f].copy_(coeffs.alpha_sqrt[f:])
        self.next_beta[:-f].copy_(coeffs.beta_sqrt[f:])

    def reset(self) -> None:
        """Empty the batch: the next n−1 calls are warm-up again."""
        self.x_batch.zero_()
        self.stock_noise.zero_()
        self.stock_noise[: self.frames].copy_(self.init_noise[: self.frames])
        self.filled = 0
        self.frame_ids.clear()


def noise_first_step(latents: torch.Tensor, coeffs: SlotCoefficients, init_noise: torch.Tensor) -> torch.Tensor:
    """An encoded frame noised to the first timestep: x_t0 = √ᾱ_t0·z + √(1−ᾱ_t0)·init_noise[0:F] (paper Sec. 3).

    ``latents`` ``[F, C, h, w]`` are clean VAE latents; slot 0's coefficients and noise rows are the first F.
    """
    f = latents.shape[0]
    return coeffs.alpha_sqrt[:f] * latents + coeffs.beta_sqrt[:f] * init_noise[:f]


def to_epsilon(
    prediction: torch.Tensor, x_t: torch.Tensor, coeffs: SlotCoefficients, kind: PredictionType
) -> torch.Tensor:
    """The U-Net's prediction as noise ε, whatever the model predicts (exact; guidance then works on ε).

    ``V_PREDICTION``: ε = √ᾱ·v + √(1−ᾱ)·x_t. ``SAMPLE``: ε = (x_t − √ᾱ·x̂0) / √(1−ᾱ). With these, the LCM step below
    gives the same x̂0 as the model's own formula (x̂0 = √ᾱ·x_t − √(1−ᾱ)·v for v-prediction).
    """
    if kind is PredictionType.EPSILON:
        return prediction
    if kind is PredictionType.V_PREDICTION:
        return coeffs.alpha_sqrt * prediction + coeffs.beta_sqrt * x_t
    return (x_t - coeffs.alpha_sqrt * prediction) / coeffs.beta_sqrt


def lcm_x0(x_t: torch.Tensor, eps: torch.Tensor, c: SlotCoefficients) -> torch.Tensor:
    """Consistency-model prediction: x̂0 = c_out·(x_t − √(1−ᾱ)·ε)/√ᾱ + c_skip·x_t (LCM paper, Eq. 9)."""
    return c.c_out * ((x_t - c.beta_sqrt * eps) / c.alpha_sqrt) + c.c_skip * x_t


def plan_rows(
    mode: CfgMode,
    x_t: torch.Tensor,
    coeffs: SlotCoefficients,
    embeddings: torch.Tensor,
    frames: int,
    has_first_step: bool,
    extras: dict[str, torch.Tensor] | None = None,
) -> UNetRows:
    """PLAN: the U-Net rows for latents ``x_t`` ``[R, C, h, w]`` at ``coeffs`` (negatives first, per ``mode``).

    ``embeddings`` and the conditioning ``extras`` are already expanded to the mode's row layout
    (:func:`.guidance.expand_embeddings`, :func:`.guidance.expand_extras`).
    """
    sample, timesteps = expand_inputs(mode, x_t, coeffs.timesteps, frames, has_first_step)
    return UNetRows(sample, timesteps, embeddings, dict(extras or {}))


def apply_rows(
    prediction: torch.Tensor,
    x_t: torch.Tensor,
    coeffs: SlotCoefficients,
    guidance: Guidance | DeviceGuidance,
    prediction_type: PredictionType,
    stock: torch.Tensor,
    next_alpha: torch.Tensor,
    next_beta: torch.Tensor,
    next_noise: torch.Tensor,
    frames: int,
    has_first_step: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """APPLY: the U-Net ``prediction`` for the rows :func:`plan_rows` planned → ``(x0_pred, next_stock)``.

    Guidance (paper Eq. 8 and 11–14), then the x̂0 prediction. ``next_stock`` (RCFG modes only) is the residual noise
    each row carries into its next slot (paper Eq. 12–13): ε̃' = n' + (√ᾱ'/√(1−ᾱ')) · f(√(1−ᾱ)·ε̃, ε), with f the LCM
    step and n' the next slot's noise. In INITIALIZE mode the first step's ε̃ is the real negative prediction.
    """
    cond, uncond = split_prediction(guidance.mode, prediction, frames, has_first_step)
    eps_cond = to_epsilon(cond, x_t, coeffs, prediction_type)
    eps_uncond = None
    if uncond is not None:
        rows = uncond.shape[0]
        eps_uncond = to_epsilon(uncond, x_t[:rows], coeffs.rows(0, rows), prediction_type)
    residual = guidance.mode in RESIDUAL_MODES
    if residual and eps_uncond is not None:
        stock = torch.cat([eps_uncond, stock[frames:]])
    if guidance.active:
        negative = guidance.delta * stock if residual else eps_uncond
        assert negative is not None
        eps = combine(eps_cond, negative, guidance.scale)
    else:
        eps = eps_cond
    x0_pred = lcm_x0(x_t, eps, coeffs)
    if not residual:
        return x0_pred, None
    delta_x = lcm_x0(coeffs.beta_sqrt * stock, eps, coeffs) * (next_alpha / next_beta)
    return x0_pred, next_noise + delta_x


# -- the Stream Batch of one stream ----------------------------------------------------------------------------------


def batch_plan(
    latents: torch.Tensor, buffers: StreamBuffers, coeffs: SlotCoefficients, embeddings: Embeddings, mode: CfgMode
) -> UNetRows:
    """PLAN one Stream Batch call: F new latents ``[F, C, h, w]`` (already at t0) enter slot 0; all n·F rows run."""
    buffers.x_batch[: buffers.frames].copy_(latents)
    return plan_rows(mode, buffers.x_batch, coeffs, embeddings.batch, buffers.frames, has_first_step=True,
                     extras=embeddings.batch_extras)


def batch_apply(
    prediction: torch.Tensor,
    buffers: StreamBuffers,
    coeffs: SlotCoefficients,
    guidance: Guidance | DeviceGuidance,
    prediction_type: PredictionType,
    add_noise: bool = True,
) -> torch.Tensor:
    """APPLY one Stream Batch call: the F latents leaving slot n−1 ``[F, C, h, w]``; every other slot moves on.

    The output belongs to the frames that entered n−1 calls ago. Tensor work on the buffers only, no host state
    (a CUDA graph of a whole tick captures it): the caller counts the call (``buffers.filled``).
    """
    f = buffers.frames
    x0_pred, next_stock = apply_rows(
        prediction, buffers.x_batch, coeffs, guidance, prediction_type, buffers.stock_noise, buffers.next_alpha,
        buffers.next_beta, buffers.next_noise, f, has_first_step=True,
    )
    if next_stock is not None:
        # Each frame's residual noise moves with it to the next slot; slot 0 starts again from its own noise.
        buffers.stock_noise[f:].copy_(next_stock[:-f])
        buffers.stock_noise[:f].copy_(buffers.init_noise[:f])
    if x0_pred.shape[0] > f:
        renoised = coeffs.alpha_sqrt[f:] * x0_pred[:-f]
        if add_noise:
            renoised = renoised + coeffs.beta_sqrt[f:] * buffers.init_noise[f:]
        buffers.x_batch[f:].copy_(renoised)
    return x0_pred[-f:]


class SequentialRun:
    """The same n steps for the same F frames, one U-Net call per step (``use_denoising_batch=False``).

    ``plan(k)`` then ``apply(k, prediction)`` for k = 0 … n−1; :attr:`result` is the final x̂0 ``[F, C, h, w]``.
    """

    def __init__(
        self,
        latents: torch.Tensor,
        init_noise: torch.Tensor,
        coeffs: SlotCoefficients,
        embeddings: Embeddings,
        guidance: Guidance,
        prediction_type: PredictionType,
        add_noise: bool = True,
    ) -> None:
        self.frames = latents.shape[0]
        self.steps = coeffs.alpha_sqrt.shape[0] // self.frames
        self.init_noise, self.coeffs, self.embeddings = init_noise, coeffs, embeddings
        self.guidance, self.prediction_type, self.add_noise = guidance, prediction_type, add_noise
        self.x_t = latents
        self.stock = init_noise[: self.frames]
        self.result: torch.Tensor | None = None

    def _rows(self, step: int) -> tuple[int, int]:
        return step * self.frames, (step + 1) * self.frames

    def plan(self, step: int) -> UNetRows:
        start, stop = self._rows(step)
        first = step == 0
        embeddings = self.embeddings.first if first else self.embeddings.later
        extras = self.embeddings.first_extras if first else self.embeddings.later_extras
        return plan_rows(self.guidance.mode, self.x_t, self.coeffs.rows(start, stop), embeddings, self.frames, first,
                         extras=extras)

    def apply(self, step: int, prediction: torch.Tensor) -> None:
        start, stop = self._rows(step)
        f, last = self.frames, step == self.steps - 1
        following = None if last else self.coeffs.rows(stop, stop + f)
        ones = torch.ones_like(self.coeffs.alpha_sqrt[:f])
        x0_pred, next_stock = apply_rows(
            prediction, self.x_t, self.coeffs.rows(start, stop), self.guidance, self.prediction_type, self.stock,
            ones if following is None else following.alpha_sqrt,
            ones if following is None else following.beta_sqrt,
            self.init_noise[:f] if following is None else self.init_noise[stop : stop + f],
            f, has_first_step=step == 0,
        )
        if following is None:
            self.result = x0_pred
            return
        self.x_t = following.alpha_sqrt * x0_pred
        if self.add_noise:
            self.x_t = self.x_t + following.beta_sqrt * self.init_noise[stop : stop + f]
        if next_stock is not None:
            self.stock = next_stock


def _call(unet: UNetFn, rows: UNetRows) -> torch.Tensor:
    return unet(rows.sample, rows.timesteps, rows.embeddings, **rows.extras)


def stream_batch_step(
    unet: UNetFn,
    latents: torch.Tensor,
    buffers: StreamBuffers,
    coeffs: SlotCoefficients,
    embeddings: Embeddings,
    guidance: Guidance,
    add_noise: bool = True,
    prediction_type: PredictionType = PredictionType.EPSILON,
) -> torch.Tensor:
    """One Stream Batch call of a single stream: plan → ``unet`` → apply. F latents at t0 in, F finished out."""
    rows = batch_plan(latents, buffers, coeffs, embeddings, guidance.mode)
    x0 = batch_apply(_call(unet, rows), buffers, coeffs, guidance, prediction_type, add_noise)
    buffers.filled += 1
    return x0


def sequential_step(
    unet: UNetFn,
    latents: torch.Tensor,
    init_noise: torch.Tensor,
    coeffs: SlotCoefficients,
    embeddings: Embeddings,
    guidance: Guidance,
    add_noise: bool = True,
    prediction_type: PredictionType = PredictionType.EPSILON,
) -> torch.Tensor:
    """The n steps of :class:`SequentialRun` with ``unet``: F latents at t0 in, their finished x̂0 out."""
    run = SequentialRun(latents, init_noise, coeffs, embeddings, guidance, prediction_type, add_noise)
    for step in range(run.steps):
        run.apply(step, _call(unet, run.plan(step)))
    assert run.result is not None
    return run.result
