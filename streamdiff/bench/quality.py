"""Quality metrics of img2img streams: structure kept, style reached, prompt sensitivity, temporal stability.

Pure numerics (torch on whatever device the tensors are on, no model, no I/O). Images are float ``[B, 3, H, W]`` in
[0, 1]; :func:`to_images` converts uint8 RGB frames. :mod:`streamdiff.bench.quality_suite` runs a model through
these; ``streamdiff bench --quality`` prints them.

- **structure**: :func:`ssim_luma`, SSIM (Wang et al. 2004, Eq. 13; 11×11 Gaussian window, σ = 1.5) of luminance.
- **style**: :func:`style_distances`, the RMS distance of an output to each style's transform of its input,
  compared at a quarter of the resolution (tone, colour and layout; a few-step tiny model does not draw single-pixel
  lines). "Reached" means the named style's transform is the closest.
- **prompt sensitivity**: :func:`mean_abs_difference` between the outputs of two prompts.
- **temporal stability**: :func:`warp_error`, the mean absolute difference between consecutive outputs after
  undoing the input's own motion (a known translation), as in Lai et al. 2018 ("warping error") with exact flow.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..models.tiny_styles import STYLES, apply_style, luminance

SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2
STYLE_POOL = 4  # style distances compare images averaged over 4×4 pixels


def to_images(frames: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
    """uint8 RGB ``[H, W, 3]`` frames (or one ``[B, H, W, 3]`` array) → float ``[B, 3, H, W]`` in [0, 1]."""
    array = np.stack(list(frames)) if not isinstance(frames, np.ndarray) or frames.ndim == 3 else frames
    if array.ndim == 3:
        array = array[None]
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float() / 255.0


def _gaussian_window(size: int = 11, sigma: float = 1.5, like: torch.Tensor | None = None) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = (g / g.sum()).to(like.dtype if like is not None else torch.float32)
    return (g[:, None] * g[None, :]).view(1, 1, size, size).to(like.device if like is not None else "cpu")


def ssim_luma(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of the luminance of ``a`` and ``b`` (``[B, 3, H, W]`` in [0, 1]) → ``[B]``; 1 = identical."""
    x, y = luminance(a.double()), luminance(b.double())
    window = _gaussian_window(like=x)
    mu_x, mu_y = F.conv2d(x, window), F.conv2d(y, window)
    var_x = F.conv2d(x * x, window) - mu_x**2
    var_y = F.conv2d(y * y, window) - mu_y**2
    cov = F.conv2d(x * y, window) - mu_x * mu_y
    ssim = ((2 * mu_x * mu_y + SSIM_C1) * (2 * cov + SSIM_C2)) / ((mu_x**2 + mu_y**2 + SSIM_C1) * (var_x + var_y + SSIM_C2))
    return ssim.flatten(1).mean(1).float()


def _pooled(image: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(image, STYLE_POOL)


def style_distances(inputs: torch.Tensor, outputs: torch.Tensor, styles: Sequence[str] = STYLES) -> dict[str, float]:
    """RMS distance (in [0, 1] units, at 1/4 resolution) of ``outputs`` to each style's transform of ``inputs``.

    ``""`` in ``styles`` stands for the input itself. Next: :func:`nearest_style`.
    """
    out = _pooled(outputs)
    return {
        style: float((out - _pooled(apply_style(style, inputs))).square().mean().sqrt()) for style in styles
    }


def nearest_style(distances: dict[str, float]) -> str:
    """The style whose transform is closest (the one the output was painted in, if the model learned it)."""
    return min(distances, key=distances.__getitem__)


def style_margin(distances: dict[str, float], style: str) -> float:
    """How much closer ``style``'s transform is than the closest other one (> 0: the style was reached)."""
    others = [d for name, d in distances.items() if name != style]
    return min(others) - distances[style]


def mean_abs_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute difference of two image batches, in [0, 1] units."""
    return float((a - b).abs().mean())


def warp_error(outputs: torch.Tensor, shift: tuple[int, int]) -> float:
    """Temporal instability of ``outputs`` ``[T, 3, H, W]`` whose inputs moved by ``shift = (dx, dy)`` px per frame.

    Content at ``(x, y)`` in frame t is at ``(x + dx, y + dy)`` in frame t+1 (dx, dy ≥ 0). Returns the mean absolute
    difference between frame t+1 and frame t moved the same way, over the pixels both show; 0 for outputs that
    follow the motion exactly, whatever they look like.
    """
    dx, dy = shift
    if dx < 0 or dy < 0:
        raise ValueError(f"shift={shift} must be non-negative")
    height, width = outputs.shape[-2:]
    later = outputs[1:, :, dy:, dx:]
    earlier = outputs[:-1, :, : height - dy, : width - dx]
    return float((later - earlier).abs().mean())
