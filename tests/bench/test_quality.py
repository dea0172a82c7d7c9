"""The quality metrics (streamdiff/bench/quality.py) on inputs whose answer is known, no model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamdiff.bench.quality import (
    mean_abs_difference,
    nearest_style,
    ssim_luma,
    style_distances,
    style_margin,
    to_images,
    warp_error,
)
from streamdiff.io.sources import pattern_frame
from streamdiff.models.tiny_styles import STYLES, apply_style


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    return to_images([pattern_frame(i, 128, 128) for i in (0, 50)])


def test_to_images_takes_one_frame_a_list_or_a_batch() -> None:
    frame = pattern_frame(3, 32, 16)
    one, listed, batch = to_images(frame), to_images([frame, frame]), to_images(np.stack([frame, frame]))
    assert one.shape == (1, 3, 16, 32) and listed.shape == batch.shape == (2, 3, 16, 32)
    assert torch.equal(listed, batch) and 0.0 <= float(one.min()) and float(one.max()) <= 1.0


def test_ssim_is_one_for_equal_images_and_falls_with_noise(inputs) -> None:
    assert torch.allclose(ssim_luma(inputs, inputs), torch.ones(2), atol=1e-6)
    g = torch.Generator().manual_seed(0)
    slightly = (inputs + 0.02 * torch.randn(inputs.shape, generator=g)).clamp(0, 1)
    noise = torch.rand(inputs.shape, generator=g)
    assert float(ssim_luma(inputs, slightly).min()) > 0.5
    assert float(ssim_luma(inputs, noise).max()) < 0.1
    # SSIM is about structure: a brightness shift costs less than scrambling the pixels
    assert float(ssim_luma(inputs, (inputs + 0.1).clamp(0, 1)).min()) > float(ssim_luma(inputs, noise).max())


def test_each_styles_own_transform_is_nearest_with_a_margin(inputs) -> None:
    for style in STYLES:
        distances = style_distances(inputs, apply_style(style, inputs))
        assert distances[style] == 0.0
        assert nearest_style(distances) == style and style_margin(distances, style) > 0.05, (style, distances)
    with_identity = style_distances(inputs, inputs, ("",) + STYLES)
    assert nearest_style(with_identity) == ""


def test_mean_abs_difference(inputs) -> None:
    assert mean_abs_difference(inputs, inputs) == 0.0
    assert mean_abs_difference(torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.25)) == pytest.approx(0.25)


def test_warp_error_is_zero_for_outputs_that_follow_the_motion_exactly() -> None:
    canvas = to_images(pattern_frame(7, 160, 160))
    # content moves by (+3, +2) px per frame: frame t shows the canvas from (30 − 3t, 20 − 2t)
    clip = torch.cat([canvas[:, :, 20 - 2 * t : 148 - 2 * t, 30 - 3 * t : 158 - 3 * t] for t in range(5)])
    assert warp_error(clip, (3, 2)) == 0.0
    assert warp_error(clip, (0, 0)) > 0.01  # the same clip judged as still has moved
    flicker = clip + 0.05 * (torch.arange(5) % 2).view(5, 1, 1, 1)
    assert warp_error(flicker, (3, 2)) == pytest.approx(0.05, abs=1e-6)
    with pytest.raises(ValueError):
        warp_error(clip, (-1, 0))
