"""The styles the built-in ``tiny`` model was trained to paint, each a procedural transform of the input image.

The trained ``tiny`` model (``tools/train_tiny.py``) learned, from prompts naming one of :data:`STYLES`, to turn its
input into :func:`apply_style` of it; an empty prompt means the input itself. The same transforms judge it: the
quality metrics (:mod:`streamdiff.bench.quality`) measure how close an output is to each style's transform of its input.

Pure torch, no device choice: images are ``[B, 3, H, W]`` in [0, 1]; sizes are in pixels (the mosaic's blocks are
16 px, so H and W should be multiples of 16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError

STYLES: tuple[str, ...] = ("watercolor", "sketch", "neon", "mosaic", "night")
MOSAIC_BLOCK = 16

_PAPER = (0.97, 0.92, 0.80)  # the watercolor's warm paper
_SKETCH_PAPER = (0.96, 0.95, 0.92)
_NEON_LINE = (1.0, 0.25, 0.85)  # magenta lines
_NEON_GLOW = (0.1, 0.85, 1.0)  # cyan glow


def luminance(image: torch.Tensor) -> torch.Tensor:
    """Rec. 601 luma ``[B, 1, H, W]`` of ``[B, 3, H, W]`` RGB."""
    r, g, b = image[:, 0:1], image[:, 1:2], image[:, 2:3]
    return 0.299 * r + 0.587 * g + 0.114 * b


def box_blur(image: torch.Tensor, size: int) -> torch.Tensor:
    """A ``size``×``size`` mean filter (odd size) with reflected borders; the shape is kept."""
    pad = size // 2
    return F.avg_pool2d(F.pad(image, (pad, pad, pad, pad), mode="reflect"), size, stride=1)


def _soft_blur(image: torch.Tensor, size: int) -> torch.Tensor:
    """Two box blurs: close to a Gaussian, no ringing."""
    return box_blur(box_blur(image, size), size)


def edges(gray: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude of ``[B, 1, H, W]``, about [0, 1] for a black/white step."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=gray.dtype, device=gray.device)
    kernel = torch.stack([kx, kx.t()]).unsqueeze(1) / 4.0  # [2, 1, 3, 3]
    grad = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kernel)
    return grad.square().sum(1, keepdim=True).add(1e-12).sqrt()


def _colour(rgb: tuple[float, float, float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(rgb, dtype=like.dtype, device=like.device).view(1, 3, 1, 1)


def watercolor(image: torch.Tensor) -> torch.Tensor:
    """Soft blur, posterised to five tones, washed out onto warm paper."""
    soft = _soft_blur(image, 5)
    poster = torch.round(soft * 4.0) / 4.0
    wash = 0.6 * poster + 0.4 * soft
    return ((0.25 + 0.75 * wash) * _colour(_PAPER, image)).clamp(0, 1)


def sketch(image: torch.Tensor) -> torch.Tensor:
    """Dark pencil lines (edges of the softened luminance, thickened) and light shading on grey paper."""
    gray = luminance(_soft_blur(image, 3))
    lines = box_blur(edges(gray), 3) * 6.0
    shade = 0.85 + 0.15 * gray
    return ((shade - lines).clamp(0, 1) * _colour(_SKETCH_PAPER, image)).clamp(0, 1)


def neon(image: torch.Tensor) -> torch.Tensor:
    """Glowing magenta edges with a cyan halo on an almost black picture."""
    line = box_blur(edges(luminance(_soft_blur(image, 3))), 3) * 6.0
    glow = _soft_blur(line, 7)
    out = 0.06 * image + line.clamp(0, 1) * _colour(_NEON_LINE, image) + 1.5 * glow * _colour(_NEON_GLOW, image)
    return out.clamp(0, 1)


def mosaic(image: torch.Tensor) -> torch.Tensor:
    """Flat 16-pixel tiles of each block's mean colour, a little more saturated."""
    tiles = F.avg_pool2d(image, MOSAIC_BLOCK, ceil_mode=True)
    tiles = (tiles + 0.3 * (tiles - luminance(tiles))).clamp(0, 1)
    return F.interpolate(tiles, scale_factor=MOSAIC_BLOCK, mode="nearest")[..., : image.shape[-2], : image.shape[-1]]


def night(image: torch.Tensor) -> torch.Tensor:
    """Dark, blue, low-contrast: moonlight."""
    luma = luminance(image)
    r, g, b = image[:, 0:1], image[:, 1:2], image[:, 2:3]
    return torch.cat([0.10 * r + 0.04 * luma, 0.15 * g + 0.08 * luma, 0.30 * luma + 0.20 * b + 0.10], 1).clamp(0, 1)


_TRANSFORMS = {"watercolor": watercolor, "sketch": sketch, "neon": neon, "mosaic": mosaic, "night": night}


def apply_style(name: str, image: torch.Tensor) -> torch.Tensor:
    """Style ``name`` (one of :data:`STYLES`, or ``""`` for the input itself) of ``[B, 3, H, W]`` in [0, 1]."""
    if name == "":
        return image
    try:
        transform = _TRANSFORMS[name]
    except KeyError:
        raise ConfigError(f"style {name!r} is not one of {list(STYLES)} (or '' for none)") from None
    return transform(image)


def style_of_prompt(prompt: str) -> str:
    """The first style named in ``prompt`` (``""`` when none): what the tiny model was taught that prompt means."""
    words = prompt.lower().replace(",", " ").split()
    for word in words:
        if word in _TRANSFORMS:
            return word
    return ""
