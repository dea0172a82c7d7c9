"""The tiny model's styles (streamdiff/models/tiny_styles.py): pure, deterministic, distinct transforms."""

from __future__ import annotations

import pytest
import torch

from streamdiff.bench.quality import to_images
from streamdiff.errors import ConfigError
from streamdiff.io.sources import pattern_frame
from streamdiff.models.tiny_styles import MOSAIC_BLOCK, STYLES, apply_style, edges, luminance, style_of_prompt


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return to_images([pattern_frame(40, 128, 96)])


def test_every_style_keeps_shape_and_range_and_is_deterministic(image) -> None:
    for style in STYLES:
        out = apply_style(style, image)
        assert out.shape == image.shape and out.dtype == image.dtype
        assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
        assert torch.equal(out, apply_style(style, image.clone()))
    assert apply_style("", image) is image


def test_styles_differ_from_the_input_and_from_each_other(image) -> None:
    outs = {style: apply_style(style, image) for style in STYLES}
    for style, out in outs.items():
        assert float((out - image).abs().mean()) > 0.04, style
    for i, a in enumerate(STYLES):
        for b in STYLES[i + 1 :]:
            assert float((outs[a] - outs[b]).abs().mean()) > 0.04, (a, b)


def test_what_each_style_looks_like(image) -> None:
    bright = float(luminance(image).mean())
    assert float(luminance(apply_style("night", image)).mean()) < 0.5 * bright
    night = apply_style("night", image)
    assert float(night[:, 2].mean()) > float(night[:, 0].mean())  # blue
    assert float(luminance(apply_style("neon", image)).median()) < 0.5 * bright  # mostly dark, with bright lines
    assert float(apply_style("neon", image).amax()) > 0.8
    sketch = apply_style("sketch", image)
    assert float(luminance(sketch).median()) > 0.7  # mostly paper
    tiles = apply_style("mosaic", image)[..., :MOSAIC_BLOCK, :MOSAIC_BLOCK]
    assert torch.equal(tiles, tiles[..., :1, :1].expand_as(tiles))  # flat blocks
    wash = apply_style("watercolor", image)
    assert float(edges(luminance(wash)).mean()) < float(edges(luminance(image)).mean())  # softer
    assert float(wash[:, 0].mean() - wash[:, 2].mean()) > float(image[:, 0].mean() - image[:, 2].mean())  # warm paper


def test_unknown_style_is_refused_with_the_allowed_names(image) -> None:
    with pytest.raises(ConfigError, match="'oil' is not one of .*watercolor"):
        apply_style("oil", image)


def test_style_of_prompt_is_the_first_style_word() -> None:
    assert style_of_prompt("a Watercolor portrait") == "watercolor"
    assert style_of_prompt("a neon sketch") == "neon"
    assert style_of_prompt("city, night") == "night"
    assert style_of_prompt("a cat") == ""
