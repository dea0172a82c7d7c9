"""Fit frames to a size: center-crop to the target aspect ratio, then resize (area-averaging down, bilinear up).

Pure numpy/torch on uint8 RGB ``[H, W, 3]``; used by sources (to the engine size) and sinks (back to an output size).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FrameError


def crop_box(src_w: int, src_h: int, width: int, height: int) -> tuple[int, int, int, int]:
    """(x0, y0, w, h) of the largest centered region of ``src`` with the aspect ratio ``width:height``."""
    if src_w * height > src_h * width:  # source is wider: crop the sides
        w = max(1, round(src_h * width / height))
        return ((src_w - w) // 2, 0, w, src_h)
    h = max(1, round(src_w * height / width))
    return (0, (src_h - h) // 2, src_w, h)


def fit_frame(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 RGB ``[H, W, 3]`` → ``[height, width, 3]`` keeping the aspect ratio (center crop, no bars)."""
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        shape = getattr(frame, "shape", None)
        raise FrameError(f"frame {type(frame).__name__} {shape} is not a uint8 RGB [H, W, 3] array")
    src_h, src_w = frame.shape[:2]
    if (src_w, src_h) == (width, height):
        return frame
    x0, y0, w, h = crop_box(src_w, src_h, width, height)
    cropped = frame[y0 : y0 + h, x0 : x0 + w]
    if (w, h) == (width, height):
        return np.ascontiguousarray(cropped)
    tensor = torch.from_numpy(np.ascontiguousarray(cropped)).permute(2, 0, 1)[None].float()  # [1, 3, h, w]
    shrinking = w >= width and h >= height
    mode = "area" if shrinking else "bilinear"
    kwargs = {} if shrinking else {"align_corners": False}
    out = F.interpolate(tensor, size=(height, width), mode=mode, **kwargs)
    return out[0].permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8).numpy()

