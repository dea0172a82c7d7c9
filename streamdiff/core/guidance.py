"""Residual classifier-free guidance (RCFG) as pure tensor functions.

StreamDiffusion paper (Kodaira et al., 2023), Sec. 3.3. With guidance scale γ and text-conditioned prediction ε_c:

- ``FULL``:      ε = ε_u + γ (ε_c − ε_u), ε_u from a real negative-prompt pass on every slot (Eq. 8).
- ``SELF``:      ε = δ·ε̃ + γ (ε_c − δ·ε̃), where the virtual negative ε̃ is the residual noise carried from the
                 previous step (Eq. 11–13); no extra U-Net work.
- ``INITIALIZE``: as SELF, but ε̃ of the first step is a real negative pass on the first slot only (Eq. 14).
- ``NONE``:      ε = ε_c.

Guidance is applied only when γ > 1 (as in diffusers); the U-Net batch layout depends only on the mode, so shapes
stay static when γ changes live. Layout of every expanded batch: negatives first, then the conditional rows.
"""

from __future__ import annotations

import torch

from ..config import CfgMode

RESIDUAL_MODES = frozenset({CfgMode.SELF, CfgMode.INITIALIZE})


def unet_rows(mode: CfgMode, rows: int, frames: int, has_first_step: bool) -> int:
    """U-Net batch for ``rows`` latents: rows (NONE/SELF), 2·rows (FULL), rows + F with the first step (INITIALIZE)."""
    if mode is CfgMode.FULL:
        return 2 * rows
    if mode is CfgMode.INITIALIZE and has_first_step:
        return rows + frames
    return rows


def call_rows(mode: CfgMode, steps: int, frames: int, batched: bool) -> tuple[int, ...]:
    """Every U-Net batch one stream runs, ascending: one call of n·F rows (plus negatives) with the denoising batch;
    without it, one call of F rows (plus negatives) per step."""
    if batched:
        return (unet_rows(mode, steps * frames, frames, has_first_step=True),)
    sizes = {unet_rows(mode, frames, frames, has_first_step=True)}
    if steps > 1:
        sizes.add(unet_rows(mode, frames, frames, has_first_step=False))
    return tuple(sorted(sizes))


def expand_inputs(
    mode: CfgMode, x_t: torch.Tensor, timesteps: torch.Tensor, frames: int, has_first_step: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prepend the negative rows the mode needs. ``x_t`` ``[R, C, h, w]``, ``timesteps`` ``[R]``."""
    if mode is CfgMode.FULL:
        return torch.cat([x_t, x_t]), torch.cat([timesteps, timesteps])
    if mode is CfgMode.INITIALIZE and has_first_step:
        return torch.cat([x_t[:frames], x_t]), torch.cat([timesteps[:frames], timesteps])
    return x_t, timesteps


def expand_embeddings(
    mode: CfgMode, cond: torch.Tensor, uncond: torch.Tensor | None, rows: int, frames: int, has_first_step: bool
) -> torch.Tensor:
    """Per-row conditioning matching :func:`expand_inputs`. ``cond``/``uncond`` are ``[1, ...]`` (hidden states
    ``[1, L, D]``, or an extra conditioning tensor such as SDXL's pooled embedding ``[1, D]``)."""
    cond_rows = cond.expand(rows, *cond.shape[1:])
    negatives = unet_rows(mode, rows, frames, has_first_step) - rows
    if negatives == 0:
        return cond_rows.contiguous()
    assert uncond is not None
    return torch.cat([uncond.expand(negatives, *uncond.shape[1:]), cond_rows]).contiguous()


def expand_extras(
    mode: CfgMode,
    cond: dict[str, torch.Tensor],
    uncond: dict[str, torch.Tensor] | None,
    rows: int,
    frames: int,
    has_first_step: bool,
) -> dict[str, torch.Tensor]:
    """Extra conditioning tensors (each ``[1, ...]``, by name) expanded like :func:`expand_embeddings`: the
    negative rows take the ``uncond`` variant. ``uncond`` may be None when the mode has no negative rows."""
    if uncond is not None and set(uncond) != set(cond):
        raise ValueError(f"conditional extras {sorted(cond)} and negative extras {sorted(uncond)} differ")
    return {name: expand_embeddings(mode, value, None if uncond is None else uncond[name], rows, frames,
                                    has_first_step)
            for name, value in cond.items()}


def split_prediction(
    mode: CfgMode, prediction: torch.Tensor, frames: int, has_first_step: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split the U-Net output into (conditional ε_c, real negative ε_u or None)."""
    if mode is CfgMode.FULL:
        uncond, cond = prediction.chunk(2)
        return cond, uncond
    if mode is CfgMode.INITIALIZE and has_first_step:
        return prediction[frames:], prediction[:frames]
    return prediction, None


def combine(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """ε = ε_u + γ (ε_c − ε_u)."""
    return uncond + guidance_scale * (cond - uncond)
