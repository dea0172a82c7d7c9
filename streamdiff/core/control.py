"""ControlNet per row, as pure tensor functions: which rows a ControlNet acts on, with what image and scale.

A stream's ControlNet inputs follow its U-Net rows (:func:`.guidance.expand_inputs`): the control image of the frame
each row holds, duplicated for the negative rows as diffusers' ControlNet pipelines do with CFG, and a per-row
conditioning scale. The scale is the spec's ``scale`` while the row's step k of n is inside ``[start, end]`` and 0
outside (diffusers' ``controlnet_keep``: ``1 − (k/n < start or (k+1)/n > end)``). ControlNet residuals are linear in
the conditioning scale (diffusers multiplies every residual by it), so one ControlNet call at scale 1 over the rows of
many streams, each row's residuals then multiplied by its own scale, equals a call per stream at its scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import CfgMode, ControlNetSpec
from .guidance import expand_inputs


@dataclass
class ControlRows:
    """One ControlNet's inputs for the rows of one step's plan (the same row layout as its :class:`.step.UNetRows`)."""

    image: torch.Tensor  # [R, 3, H, W] in [0, 1]
    scale: torch.Tensor  # [R] float: the row's conditioning scale, 0 where the ControlNet does not act

    @property
    def active(self) -> bool:
        return bool((self.scale != 0).any())


def control_keep(step: int, steps: int, start: float, end: float) -> bool:
    """Whether a ControlNet acts at step ``step`` of ``steps`` (diffusers' ``control_guidance_start/end``)."""
    return not (step / steps < start or (step + 1) / steps > end)


def control_rows(
    spec: ControlNetSpec,
    mode: CfgMode,
    images: torch.Tensor,
    row_steps: list[int],
    steps: int,
    frames: int,
    has_first_step: bool,
) -> ControlRows:
    """The inputs of ``spec``'s ControlNet for latent rows holding ``images`` ``[R, 3, H, W]`` at steps ``row_steps``
    (one entry per latent row, k in [0, steps)); negative rows are prepended as :func:`.guidance.expand_inputs` does."""
    keep = torch.tensor([spec.scale if control_keep(k, steps, spec.start, spec.end) else 0.0 for k in row_steps],
                        dtype=torch.float32)
    image, scale = expand_inputs(mode, images, keep, frames, has_first_step)
    return ControlRows(image, scale)
