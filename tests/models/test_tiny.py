"""The built-in models (streamdiff/models/tiny.py): ``tiny-random`` follows its input; the trained ``tiny`` is
assembled from the shipped weights and reaches its quality figures on fixed inputs (streamdiff.bench.quality_suite)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from streamdiff import StreamConfig, StreamPipeline
from streamdiff.bench.quality_suite import STRUCTURE_STYLES, run_stream, still_inputs, style_figures
from streamdiff.models.tiny import (
    TINY_PARTS,
    TINY_VERSION,
    TINY_WEIGHTS_DIR,
    load_trained_components,
    tiny_model_path,
    tiny_random_model_path,
)
from streamdiff.models.tiny_styles import STYLES

SIZE = 128
MIN_SSIM = 0.5  # structure kept at strength 0.5
MIN_STYLE_DIFFERENCE = 0.05  # mean |a − b| in [0, 1] between the outputs of any two styles
MANIFEST_TOLERANCE = 1e-3  # the figures recorded at training time, measured again here


def _pattern(shift: int) -> np.ndarray:
    """A moving colour gradient with 32-pixel blocks (structure the 8× VAE keeps)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    blocks = ((xx + shift) // 32 + yy // 32) % 2
    return np.stack([(xx * 2 + shift) % 256, yy * 2, blocks * 255], -1).astype(np.uint8)


# -- tiny-random ----------------------------------------------------------------------------------------------------


def test_tiny_random_is_a_diffusers_folder_of_this_version(cache_dir) -> None:
    folder = tiny_random_model_path()
    assert folder.name == f"tiny-v{TINY_VERSION}-seed0"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderTiny"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]


def test_tiny_random_output_follows_its_input(tiny_model) -> None:
    assert any("attn" in name for name, _ in tiny_model.unet.named_modules())  # cross-attention is still there
    torch.manual_seed(0)
    pipe = StreamPipeline(tiny_model, StreamConfig(width=SIZE, height=SIZE, t_index_list=(32, 45)))
    pipe.prepare(prompt="a watercolor portrait")
    inputs = [_pattern(12 * i) for i in range(6)]
    outputs = [pipe(frame) for frame in inputs]
    correlations = []
    for frame, output in zip(inputs[:-1], outputs[1:]):  # n = 2: a frame leaves one call after it entered
        assert output is not None and output.std() > 10  # not flat
        correlations.append(np.corrcoef(frame.astype(float).ravel(), output.astype(float).ravel())[0, 1])
    assert min(correlations) > 0.5, correlations
    # and it follows the right frame: the input it came from correlates better than the frame after it
    later = np.corrcoef(inputs[-1].astype(float).ravel(), outputs[-2].astype(float).ravel())[0, 1]
    assert correlations[-2] > later


# -- the trained tiny model -----------------------------------------------------------------------------------------


def test_shipped_weights_match_their_manifest_and_stay_small() -> None:
    manifest = json.loads((TINY_WEIGHTS_DIR / "manifest.json").read_text())
    files = {f"{part}.safetensors" for part in TINY_PARTS}
    assert set(manifest["files"]) == files
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((TINY_WEIGHTS_DIR / name).read_bytes()).hexdigest() == digest, name
    assert sum((TINY_WEIGHTS_DIR / name).stat().st_size for name in files) <= 10 * 2**20
    assert manifest["dtype"] == "float16" and manifest["styles"] == list(STYLES)
    for key in ("data", "recipe", "seed", "wall_time_s", "metrics"):
        assert key in manifest, key


def test_tiny_is_assembled_from_the_shipped_weights(cache_dir, tiny_trained) -> None:
    folder = tiny_model_path()
    assert folder.name.startswith(f"tiny-trained-v{TINY_VERSION}-")
    assert json.loads((folder / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DConditionModel"]
    shipped = load_trained_components()
    for part in TINY_PARTS:
        loaded = dict(getattr(tiny_trained, part).state_dict())
        for name, value in shipped[part].state_dict().items():
            assert torch.equal(loaded[name], value), (part, name)
            if value.is_floating_point():
                assert torch.equal(value, value.half().float()), (part, name)  # float16 values held in float32


@pytest.fixture(scope="module")
def figures(tiny_trained) -> dict:
    return style_figures(tiny_trained)


def test_structure_is_kept_at_strength_half(figures) -> None:
    assert figures["strength"] == 0.5
    assert figures["identity_ssim"] >= MIN_SSIM  # the empty prompt keeps the input
    for style in STRUCTURE_STYLES:  # styles whose transform keeps luminance structure (SSIM ≥ 0.7 against the input)
        row = figures["styles"][style]
        assert row["ssim"] >= MIN_SSIM and row["ssim_to_style"] >= MIN_SSIM, (style, row)
    # neon and night remap luminance (their own transforms score 0.25 and 0.46 against the input): their output
    # keeps the structure of the style's transform instead, less sharply (a blurry model draws no 1-px lines)
    assert figures["styles"]["night"]["ssim_to_style"] >= 0.4
    assert figures["styles"]["neon"]["ssim_to_style"] >= 0.15


def test_each_style_is_nearest_to_its_own_transform(figures) -> None:
    for style, row in figures["styles"].items():
        assert row["nearest"] == style and row["margin"] > 0, (style, row)


def test_two_styles_outputs_differ(figures) -> None:
    assert figures["min_prompt_difference"] >= MIN_STYLE_DIFFERENCE, figures["prompt_difference"]


def test_figures_reproduce_the_manifest(figures) -> None:
    recorded = json.loads((TINY_WEIGHTS_DIR / "manifest.json").read_text())["metrics"]["style"]
    for style, row in figures["styles"].items():
        assert row["ssim"] == pytest.approx(recorded["styles"][style]["ssim"], abs=MANIFEST_TOLERANCE)
        assert row["margin"] == pytest.approx(recorded["styles"][style]["margin"], abs=MANIFEST_TOLERANCE)
    assert figures["min_prompt_difference"] == pytest.approx(recorded["min_prompt_difference"],
                                                             abs=MANIFEST_TOLERANCE)


def test_trained_output_is_deterministic_per_seed(tiny_trained) -> None:
    frames = still_inputs(128)[:2]
    a = run_stream(tiny_trained, frames, "a neon sketch", seed=5)
    b = run_stream(tiny_trained, frames, "a neon sketch", seed=5)
    c = run_stream(tiny_trained, frames, "a neon sketch", seed=6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
