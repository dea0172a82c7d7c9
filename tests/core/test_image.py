from __future__ import annotations

import numpy as np
import pytest
import torch

from streamdiff import FrameError
from streamdiff.core.image import (
    check_image_tensor,
    frame_to_tensor,
    from_model_range,
    psnr,
    tensor_to_frame,
    to_model_range,
)


def test_round_trip_uint8() -> None:
    frame = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    tensor = frame_to_tensor(frame)
    assert tensor.shape == (1, 3, 5, 7) and tensor.dtype == torch.float32
    assert 0.0 <= tensor.min() and tensor.max() <= 1.0
    assert np.array_equal(tensor_to_frame(tensor)[0], frame)


def test_ranges() -> None:
    x = torch.tensor([0.0, 0.5, 1.0])
    assert to_model_range(x).tolist() == [-1.0, 0.0, 1.0]
    assert from_model_range(torch.tensor([-2.0, 0.0, 1.0])).tolist() == [0.0, 0.5, 1.0]


def test_bad_frames() -> None:
    with pytest.raises(FrameError, match=r"shape \(4, 4\) is not"):
        frame_to_tensor(np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(FrameError, match="not uint8"):
        frame_to_tensor(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(FrameError, match="numpy array"):
        frame_to_tensor([[0]])  # type: ignore[arg-type]
    with pytest.raises(FrameError, match="not floating point"):
        check_image_tensor(torch.zeros((1, 3, 4, 4), dtype=torch.uint8), 1, 4, 4)


def test_psnr() -> None:
    a = np.zeros((4, 4, 3), dtype=np.uint8)
    b = a.copy()
    assert psnr(a, b) == float("inf")
    b[0, 0, 0] = 255
    assert psnr(a, b) == pytest.approx(10 * np.log10(255**2 / (255**2 / 48)))
