"""The built-in tiny model (streamdiff/models/tiny.py): its output follows its input, through the real loading path."""

from __future__ import annotations

import json

import numpy as np
import torch

from streamdiff import StreamConfig, StreamPipeline
from streamdiff.models.tiny import TINY_VERSION, tiny_model_path

SIZE = 128


def _pattern(shift: int) -> np.ndarray:
    """A moving colour gradient with 32-pixel blocks (structure the 8× VAE keeps)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    blocks = ((xx + shift) // 32 + yy // 32) % 2
    return np.stack([(xx * 2 + shift) % 256, yy * 2, blocks * 255], -1).astype(np.uint8)


def test_tiny_model_is_a_diffusers_folder_of_this_version(cache_dir) -> None:
    folder = tiny_model_path()
    assert folder.name == f"tiny-v{TINY_VERSION}-seed0"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderTiny"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]


def test_tiny_model_output_follows_its_input(tiny_model) -> None:
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
