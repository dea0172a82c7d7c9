"""The quality figures of a model, measured on fixed inputs: runs streams and applies :mod:`.quality`.

``quality_figures(model)`` is what ``streamdiff bench --quality``, ``tools/train_tiny.py`` (into the weights'
manifest) and the tests report. Inputs are frames of the built-in test pattern at 256×256 (the README's source) and,
for temporal stability, a window moving over a still larger pattern (a known translation), with pauses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..config import FilterConfig, StreamConfig, t_index_list_for_strength
from ..io.sources import pattern_frame
from ..models import LoadedModel
from ..models.tiny_styles import STYLES, apply_style
from ..pipeline import StreamPipeline
from .quality import (
    mean_abs_difference,
    nearest_style,
    ssim_luma,
    style_distances,
    style_margin,
    to_images,
    warp_error,
)

SIZE = 256
STRENGTH = 0.5
STEPS = 2
STILL_INDICES = (0, 40, 80, 120)
# Styles that keep the input's luminance structure (their own transform scores SSIM ≥ 0.7 against the input); neon
# (0.25) and night (0.46) remap luminance on purpose, so SSIM to the input says little about them.
STRUCTURE_STYLES = ("watercolor", "sketch", "mosaic")
MOTION = (2, 1)  # px per frame (dx, dy) of the moving clip while it moves
CLIP_PHASES = (8, 4)  # frames moving, then frames still, repeated
CLIP_FRAMES = 36


def still_inputs(size: int = SIZE) -> torch.Tensor:
    """Four test-pattern frames ``[4, 3, size, size]`` in [0, 1]."""
    return to_images([pattern_frame(i, size, size) for i in STILL_INDICES])


def moving_clip(size: int = SIZE, frames: int = CLIP_FRAMES) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """A window sliding over a still test pattern: ``[T, 3, size, size]`` and the shift between each pair."""
    shifts = [MOTION if i % sum(CLIP_PHASES) < CLIP_PHASES[0] else (0, 0) for i in range(frames - 1)]
    total_x, total_y = sum(s[0] for s in shifts), sum(s[1] for s in shifts)
    canvas = pattern_frame(0, size + total_x, size + total_y)
    x = y = 0
    out = [canvas[y : y + size, x : x + size]]
    for dx, dy in shifts:  # content moves by +shift on screen: the window moves by −shift
        x, y = x + dx, y + dy
        out.append(canvas[y : y + size, x : x + size])
    # reverse the window walk so that content moves right/down (the shift warp_error expects)
    return to_images(out[::-1]), shifts[::-1]


def run_stream(
    model: LoadedModel,
    frames: torch.Tensor,
    prompt: str,
    *,
    strength: float = STRENGTH,
    steps: int = STEPS,
    denoising_batch: bool = True,
    fresh_noise: bool = False,
    filter_enabled: bool = False,
    seed: int = 2,
    guidance_scale: float = 1.2,
    cfg_type: str = "self",
    counts: dict[str, int] | None = None,
) -> torch.Tensor:
    """The frames shown for ``frames`` ``[T, 3, H, W]``: one per input, oldest first (Stream Batch latency removed
    by frame id; where the similarity filter skipped an input, the held output shown instead). ``fresh_noise``
    draws new noise for every frame (plain per-frame img2img) instead of the stream's fixed noise. ``counts``, if
    given, receives ``skipped``: the inputs the filter skipped."""
    config = StreamConfig(
        width=frames.shape[-1], height=frames.shape[-2],
        t_index_list=t_index_list_for_strength(strength, steps), use_denoising_batch=denoising_batch,
        cfg_type=cfg_type, filter=FilterConfig(enabled=filter_enabled),
    )
    pipe = StreamPipeline(model, config)
    pipe.prepare(prompt=prompt, guidance_scale=guidance_scale, seed=seed)
    made: dict[int, torch.Tensor] = {}  # input index → the image shown for it (a held one where it was skipped)
    for i, frame in enumerate(frames):
        if fresh_noise:
            pipe.update(seed=seed + 1 + i)
        out = pipe.step(frame[None], frame_id=i)
        if out.images is not None:
            made[out.frame_ids[0]] = out.images[0]
    for out in pipe.flush():
        if out.images is not None:
            made[out.frame_ids[0]] = out.images[0]
    if counts is not None:
        counts["skipped"] = pipe.stats.filter_skips
    pipe.close()
    shown = [made.get(0, made[min(made)])]  # a skip before the first output shows the first output
    for i in range(1, len(frames)):
        shown.append(made.get(i, shown[-1]))
    return torch.stack(shown)


def style_figures(model: LoadedModel, styles: Sequence[str] = STYLES, template: str = "a {style} portrait") -> dict:
    """Per style: SSIM to the input (and to the style's transform, and of the transform itself), distances to every
    style's transform, the nearest one and the margin; the empty prompt's SSIM; prompt sensitivity."""
    inputs = still_inputs()
    outputs = {s: run_stream(model, inputs, template.format(style=s)) for s in styles}
    identity = run_stream(model, inputs, "")
    per_style: dict[str, Any] = {}
    for style, out in outputs.items():
        distances = style_distances(inputs, out, styles)
        target = apply_style(style, inputs)
        per_style[style] = {
            "ssim": round(float(ssim_luma(inputs, out).mean()), 4),
            "ssim_to_style": round(float(ssim_luma(target, out).mean()), 4),
            "transform_ssim": round(float(ssim_luma(inputs, target).mean()), 4),
            "nearest": nearest_style(distances),
            "margin": round(style_margin(distances, style), 4),
            "distances": {k: round(v, 4) for k, v in distances.items()},
        }
    pairs = [(a, b) for i, a in enumerate(styles) for b in styles[i + 1 :]]
    differences = {f"{a}/{b}": round(mean_abs_difference(outputs[a], outputs[b]), 4) for a, b in pairs}
    return {
        "strength": STRENGTH,
        "styles": per_style,
        "identity_ssim": round(float(ssim_luma(inputs, identity).mean()), 4),
        "min_structure_ssim": min([v["ssim"] for s, v in per_style.items() if s in STRUCTURE_STYLES], default=1.0),
        "styles_reached": sum(v["nearest"] == s for s, v in per_style.items()),
        "prompt_difference": differences,
        "min_prompt_difference": min(differences.values()) if differences else 0.0,
    }


def temporal_figures(model: LoadedModel, prompt: str = "a watercolor portrait") -> dict:
    """Warp error of the outputs on the moving clip: Stream Batch (with and without the similarity filter), the same
    steps one frame at a time with the same fixed noise, and per-frame img2img (fresh noise every frame). The filter
    is not combined with fresh noise: a new seed resets the filter too."""
    clip, shifts = moving_clip()

    def error(frames: torch.Tensor) -> float:
        return round(sum(warp_error(frames[i : i + 2], s) for i, s in enumerate(shifts)) / len(shifts), 4)

    options = {
        "stream_batch": {},
        "stream_batch_filter": {"filter_enabled": True},
        "sequential_fixed_noise": {"denoising_batch": False},
        "per_frame_img2img": {"denoising_batch": False, "fresh_noise": True},
    }
    errors, skipped = {"input": error(clip)}, {}
    for name, kwargs in options.items():
        counts: dict[str, int] = {}
        errors[name] = error(run_stream(model, clip, prompt, counts=counts, **kwargs))
        if kwargs.get("filter_enabled"):
            skipped[name] = counts["skipped"]
    return {"prompt": prompt, "motion_px": list(MOTION), "phases": list(CLIP_PHASES), "frames": len(clip),
            "warp_error": errors, "filter_skipped": skipped}


def quality_figures(model: LoadedModel, temporal: bool = True) -> dict:
    """Every quality figure of ``model`` (deterministic for a given model and torch build)."""
    with torch.inference_mode():
        figures = {"style": style_figures(model)}
        if temporal:
            figures["temporal"] = temporal_figures(model)
    return figures


def format_quality(figures: dict) -> str:
    """A short plain-text table of :func:`quality_figures`."""
    style = figures["style"]
    lines = [f"style at strength {style['strength']}, prompt 'a <style> portrait'. SSIM of luminance: output vs input, "
             f"vs the style's transform, and (style) the transform vs input; distances at 1/4 resolution",
             f"{'style':<12}{'SSIM in':>8}{'to style':>9}{'(style)':>8}{'nearest':>12}{'margin':>8}"]
    for name, row in style["styles"].items():
        lines.append(f"{name:<12}{row['ssim']:>8.3f}{row['ssim_to_style']:>9.3f}{row['transform_ssim']:>8.3f}"
                     f"{row['nearest']:>12}{row['margin']:>8.3f}")
    lines.append(f"empty prompt: SSIM {style['identity_ssim']:.3f}; styles reached {style['styles_reached']}/"
                 f"{len(style['styles'])}; smallest difference between two styles' outputs "
                 f"{style['min_prompt_difference']:.3f}")
    if "temporal" in figures:
        temporal = figures["temporal"]
        lines.append(f"warp error on a moving clip ({temporal['frames']} frames, {temporal['motion_px']} px/frame "
                     f"with pauses, '{temporal['prompt']}'; lower is steadier)")
        for name, value in temporal["warp_error"].items():
            skipped = temporal["filter_skipped"].get(name)
            lines.append(f"  {name:<28}{value:.4f}" + (f"  ({skipped} frames skipped)" if skipped is not None else ""))
    return "\n".join(lines)
