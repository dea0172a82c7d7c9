"""Frame ↔ tensor conversions and value ranges, in one place.

Three representations meet here:

- **frame**: ``numpy.ndarray`` ``[H, W, 3]`` (or ``[F, H, W, 3]``) ``uint8`` RGB, as sources deliver and sinks take;
- **image tensor**: float ``[B, 3, H, W]`` in ``[0, 1]``, the public tensor form;
- **model tensor**: float ``[B, 3, H, W]`` in ``[-1, 1]``, what the VAE encodes and decodes.

and frames are fitted to a size (:func:`fit_frame`: centre-crop to the aspect ratio, then area-averaging down or
bilinear up) — by streams (to their current size) and by sinks (to the size they opened with).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FrameError


def frame_to_tensor(frame: np.ndarray) -> torch.Tensor:
    """uint8 RGB ``[H, W, 3]`` or ``[F, H, W, 3]`` → float32 ``[F, 3, H, W]`` in [0, 1] (CPU)."""
    if not isinstance(frame, np.ndarray):
        raise FrameError(f"frame must be a numpy array or a torch tensor, got {type(frame).__name__}")
    if frame.dtype != np.uint8:
        raise FrameError(f"frame dtype {frame.dtype} is not uint8; pass uint8 RGB or a float tensor in [0, 1]")
    if frame.ndim == 3:
        frame = frame[None]
    if frame.ndim != 4 or frame.shape[-1] != 3:
        raise FrameError(f"frame shape {tuple(frame.shape)} is not [H, W, 3] or [F, H, W, 3] RGB")
    tensor = torch.from_numpy(np.ascontiguousarray(frame)).permute(0, 3, 1, 2)
    return tensor.float().div_(255.0)


def tensor_to_frame(images: torch.Tensor) -> np.ndarray:
    """float ``[F, 3, H, W]`` in [0, 1] → uint8 ``[F, H, W, 3]`` (rounded, clipped)."""
    out = images.detach().float().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    return out.permute(0, 2, 3, 1).cpu().numpy()


def check_image_tensor(images: torch.Tensor, frames: int, height: int, width: int) -> None:
    """Raise FrameError unless ``images`` is float ``[frames, 3, height, width]``."""
    if not torch.is_floating_point(images):
        raise FrameError(f"image tensor dtype {images.dtype} is not floating point; expected values in [0, 1]")
    expected = (frames, 3, height, width)
    if tuple(images.shape) != expected:
        raise FrameError(f"image shape {tuple(images.shape)} does not match the stream's {list(expected)}")


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] → [-1, 1]."""
    return images * 2.0 - 1.0


def from_model_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] → [0, 1], clipped."""
    return (images / 2.0 + 0.5).clamp(0.0, 1.0)


def psnr(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, peak: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB between two images of the same shape (uint8 peak 255, float peak 1)."""
    ta = torch.as_tensor(np.asarray(a) if isinstance(a, np.ndarray) else a.detach().cpu())
    tb = torch.as_tensor(np.asarray(b) if isinstance(b, np.ndarray) else b.detach().cpu())
    if peak is None:
        peak = 255.0 if ta.dtype == torch.uint8 else 1.0
    mse = torch.mean((ta.double() - tb.double()) ** 2).item()
    if mse == 0.0:
        return float("inf")
    return 10.0 * float(np.log10(peak * peak / mse))


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


def pattern_frame(index: int, width: int, height: int) -> np.ndarray:
    """Frame ``index`` of the moving test pattern: uint8 RGB ``[height, width, 3]``, a pure function of its inputs.

    A diagonal colour gradient scrolling one pixel per frame, a bright disc moving on a Lissajous path and a bar
    that fills with the frame number modulo 64, so that motion, colour and order are all visible.
    """
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    t = float(index)
    r = (xx + t) * (255.0 / max(width, 1))
    g = (yy + 0.5 * t) * (255.0 / max(height, 1))
    b = 128.0 + 127.0 * np.sin((xx + yy) / max(width + height, 1) * 4 * math.pi + t / 10.0)
    frame = np.stack([r % 256.0, g % 256.0, b], axis=-1)
    cx = width * (0.5 + 0.35 * math.sin(t / 17.0))
    cy = height * (0.5 + 0.35 * math.sin(t / 11.0 + 1.0))
    radius = max(2.0, min(width, height) / 8.0)
    disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius * radius
    frame[disc] = (255.0, 240.0, 40.0)
    bar_h = max(1, height // 32)
    filled = int(width * ((index % 64) + 1) / 64)
    frame[:bar_h, :filled] = 255.0
    frame[:bar_h, filled:] = 0.0
    return np.clip(frame, 0, 255).astype(np.uint8)
