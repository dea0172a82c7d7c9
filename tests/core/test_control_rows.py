"""ControlNet rows as pure functions: gating equals diffusers' ``controlnet_keep``; images and scales follow the
U-Net row layout of every cfg mode (negatives first, duplicated as diffusers duplicates the control image)."""

from __future__ import annotations

import pytest
import torch

from streamdiff.config import CfgMode, ControlNetSpec
from streamdiff.core.control import control_keep, control_rows
from streamdiff.core.guidance import expand_inputs


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("start, end", [(0.0, 1.0), (0.0, 0.5), (0.3, 1.0), (0.25, 0.75), (0.5, 0.6)])
def test_keep_equals_diffusers(steps: int, start: float, end: float) -> None:
    # diffusers' ControlNet pipelines: keeps = 1.0 - float(i / len(timesteps) < s or (i + 1) / len(timesteps) > e)
    for i in range(steps):
        assert control_keep(i, steps, start, end) == bool(1.0 - float(i / steps < start or (i + 1) / steps > end))


@pytest.mark.parametrize("mode", list(CfgMode))
@pytest.mark.parametrize("has_first_step", [True, False])
def test_rows_follow_the_unet_layout(mode: CfgMode, has_first_step: bool) -> None:
    frames, steps = 2, 3
    images = torch.arange(steps * frames, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 4, 4)
    row_steps = [r // frames for r in range(steps * frames)]
    spec = ControlNetSpec("a", scale=0.5, start=0.0, end=0.7)  # acts at steps 0 and 1 of 3
    rows = control_rows(spec, mode, images, row_steps, steps, frames, has_first_step)
    expected_images, _ = expand_inputs(mode, images, torch.zeros(len(row_steps)), frames, has_first_step)
    assert torch.equal(rows.image, expected_images)
    per_row = torch.tensor([0.5 if k < 2 else 0.0 for k in row_steps])
    _, expected_scale = expand_inputs(mode, images, per_row, frames, has_first_step)
    assert torch.equal(rows.scale, expected_scale) and rows.active
    late = control_rows(ControlNetSpec("a", start=0.9), mode, images, row_steps, steps, frames, has_first_step)
    assert not late.active
