"""Stream Batch: the staggered, batched denoising core (StreamDiffusion paper, Sec. 3.2).

The Stream Batch holds ``n = len(t_index_list)`` steps × ``F = frame_buffer_size`` frames. Row ``k·F + f`` is step
k of frame f ("slot" k). One call of :func:`stream_batch_step` puts F new latents into slot 0, runs ONE U-Net call over
all rows, returns the F finished latents of slot n−1 and re-noises every other slot's prediction into the next
slot. :func:`sequential_step` runs the same n steps one after another for the same F frames (the baseline). Both go
through :func:`denoise_rows`, the only implementation of a denoising step, so for the same frames and noise they agree.

Noise: ``init_noise`` ``[n·F, C, h, w]`` is drawn once per seed; row r is the noise of row r in every call.
RCFG's residual noise ("stock noise") travels with its frame from slot to slot.

No I/O, no timing, no device choice: the U-Net is any callable ``(sample, timestep, encoder_hidden_states) -> ε``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..config import CfgMode
from .guidance import RESIDUAL_MODES, combine, expand_inputs, split_prediction
from .schedule import SlotCoefficients


class UNetFn(Protocol):
    """The noise predictor: ``[B, C, h, w]``, ``[B]``, ``[B, L, D]`` → ε ``[B, C, h, w]``."""

    def __call__(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
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


def lcm_x0(x_t: torch.Tensor, eps: torch.Tensor, c: SlotCoefficients) -> torch.Tensor:
    """Consistency-model prediction: x̂0 = c_out·(x_t − √(1−ᾱ)·ε)/√ᾱ + c_skip·x_t (LCM paper, Eq. 9)."""
    return c.c_out * ((x_t - c.beta_sqrt * eps) / c.alpha_sqrt) + c.c_skip * x_t


def denoise_rows(
    unet: UNetFn,
    x_t: torch.Tensor,
    coeffs: SlotCoefficients,
    embeddings: torch.Tensor,
    guidance: Guidance,
    stock: torch.Tensor,
    next_alpha: torch.Tensor,
    next_beta: torch.Tensor,
    next_noise: torch.Tensor,
    frames: int,
    has_first_step: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One denoising step for a set of rows: one U-Net call, guidance, the x̂0 prediction.

    Returns ``(x0_pred, next_stock)``. ``next_stock`` (RCFG modes only) is the residual noise each row carries into
    its next slot (paper Eq. 12–13): ε̃' = n' + (√ᾱ'/√(1−ᾱ')) · f(√(1−ᾱ)·ε̃, ε), with f the LCM step above and
    n' the next slot's noise. In INITIALIZE mode the first step's ε̃ is the real negative prediction.
    """
    x_in, t_in = expand_inputs(guidance.mode, x_t, coeffs.timesteps, frames, has_first_step)
    prediction = unet(x_in, t_in, embeddings)
    eps_cond, eps_uncond = split_prediction(guidance.mode, prediction, frames, has_first_step)
    residual = guidance.mode in RESIDUAL_MODES
    if residual and eps_uncond is not None:
        stock = torch.cat([eps_uncond, stock[frames:]])
    if guidance.active:
        negative = guidance.delta * stock if residual else eps_uncond
        eps = combine(eps_cond, negative, guidance.scale)
    else:
        eps = eps_cond
    x0_pred = lcm_x0(x_t, eps, coeffs)
    if not residual:
        return x0_pred, None
    delta_x = lcm_x0(coeffs.beta_sqrt * stock, eps, coeffs) * (next_alpha / next_beta)
    return x0_pred, next_noise + delta_x


def stream_batch_step(
    unet: UNetFn,
    latents: torch.Tensor,
    buffers: StreamBuffers,
    coeffs: SlotCoefficients,
    embeddings: Embeddings,
    guidance: Guidance,
    add_noise: bool = True,
) -> torch.Tensor:
    """One Stream Batch call: F new latents ``[F, C, h, w]`` in, the F latents of slot n−1 ``[F, C, h, w]`` out.

    The output belongs to the frames that entered n−1 calls ago (``buffers.filled`` tells when it is real).
    """
    f = buffers.frames
    buffers.x_batch[:f].copy_(latents)
    x0_pred, next_stock = denoise_rows(
        unet,
        buffers.x_batch,
        coeffs,
        embeddings.batch,
        guidance,
        buffers.stock_noise,
        buffers.next_alpha,
        buffers.next_beta,
        buffers.next_noise,
        f,
        has_first_step=True,
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
    buffers.filled += 1
    return x0_pred[-f:]


def sequential_step(
    unet: UNetFn,
    latents: torch.Tensor,
    init_noise: torch.Tensor,
    coeffs: SlotCoefficients,
    embeddings: Embeddings,
    guidance: Guidance,
    add_noise: bool = True,
) -> torch.Tensor:
    """The same n steps for the same F frames, one U-Net call per step (``use_denoising_batch=False``)."""
    f = latents.shape[0]
    rows = coeffs.alpha_sqrt.shape[0]
    x_t = latents
    stock = init_noise[:f]
    x0_pred = latents
    for start in range(0, rows, f):
        stop = start + f
        last = stop >= rows
        step = coeffs.rows(start, stop)
        following = coeffs.rows(stop, stop + f) if not last else None
        ones = torch.ones_like(step.alpha_sqrt)
        x0_pred, next_stock = denoise_rows(
            unet,
            x_t,
            step,
            embeddings.first if start == 0 else embeddings.later,
            guidance,
            stock,
            following.alpha_sqrt if following is not None else ones,
            following.beta_sqrt if following is not None else ones,
            init_noise[stop : stop + f] if following is not None else init_noise[:f],
            f,
            has_first_step=start == 0,
        )
        if following is None:
            break
        x_t = following.alpha_sqrt * x0_pred
        if add_noise:
            x_t = x_t + following.beta_sqrt * init_noise[stop : stop + f]
        if next_stock is not None:
            stock = next_stock
    return x0_pred

