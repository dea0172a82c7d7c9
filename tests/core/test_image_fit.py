"""Fitting frames to the engine size: center crop keeping the aspect ratio, then resize."""

from __future__ import annotations

import numpy as np
import pytest

from streamdiff import FrameError
from streamdiff.core.image import fit_frame
from streamdiff.core.image import crop_box


def banded(width: int, height: int) -> np.ndarray:
    """Left quarter red, right quarter blue, middle green."""
    frame = np.zeros((height, width, 3), np.uint8)
    frame[:, :, 1] = 255
    frame[:, : width // 4] = (255, 0, 0)
    frame[:, width - width // 4 :] = (0, 0, 255)
    return frame


def test_wide_frame_is_center_cropped_not_squeezed() -> None:
    out = fit_frame(banded(640, 320), 64, 64)  # 2:1 -> the middle square: only green survives
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert np.all(out[:, :, 1] >= 250) and out[:, :, 0].max() <= 5 and out[:, :, 2].max() <= 5


def test_tall_frame_crops_top_and_bottom() -> None:
    frame = np.zeros((400, 100, 3), np.uint8)
    frame[150:250] = 200  # the centered 100x100 square
    out = fit_frame(frame, 32, 32)
    assert np.all(out == 200)
    assert crop_box(100, 400, 32, 32) == (0, 150, 100, 100)


def test_same_size_is_untouched_and_upscaling_works() -> None:
    frame = banded(64, 48)
    assert fit_frame(frame, 64, 48) is frame
    up = fit_frame(frame, 128, 96)
    assert up.shape == (96, 128, 3)
    assert tuple(up[48, 2]) == (255, 0, 0) and tuple(up[48, 125]) == (0, 0, 255)


def test_bad_input() -> None:
    with pytest.raises(FrameError, match="uint8 RGB"):
        fit_frame(np.zeros((8, 8, 3), np.float32), 4, 4)
