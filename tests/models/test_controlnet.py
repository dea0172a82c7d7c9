"""ControlNet loading (built-in tiny, folder, hub id offline) and the built-in preprocessors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamdiff import ControlNetSpec
from streamdiff.errors import ConfigError, ModelLoadError
from streamdiff.models.controlnet import build_tiny_controlnet, canny, check_name, load_controlnet


def test_tiny_controlnet_is_cached_and_reloads_bit_identically(cache_dir, tmp_path) -> None:
    built = build_tiny_controlnet()
    loaded = load_controlnet("tiny", torch.device("cpu"), torch.float32)
    again = load_controlnet("tiny-random", torch.device("cpu"), torch.float32)
    for a, b, c in zip(built.state_dict().values(), loaded.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(b, c)
    assert any(float(p.abs().max()) > 0 for n, p in loaded.state_dict().items() if n.startswith("controlnet_mid_block"))
    built.save_pretrained(tmp_path / "cn")
    from_folder = load_controlnet(str(tmp_path / "cn"), torch.device("cpu"), torch.bfloat16)
    assert next(from_folder.parameters()).dtype == torch.bfloat16


def test_tiny_sdxl_controlnet_takes_sdxls_added_conditions(cache_dir) -> None:
    from streamdiff.models.sdxl import is_sdxl_unet

    built = build_tiny_controlnet(sdxl=True)
    named = load_controlnet("tiny-sdxl", torch.device("cpu"), torch.float32)
    for_sdxl = load_controlnet("tiny", torch.device("cpu"), torch.float32, sdxl=True)
    assert is_sdxl_unet(built) and not is_sdxl_unet(build_tiny_controlnet())
    for a, b, c in zip(built.state_dict().values(), named.state_dict().values(), for_sdxl.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(b, c)


def test_bad_sources_are_clear(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="'nobody/no-such-controlnet'.*HF_HUB_OFFLINE"):
        load_controlnet("nobody/no-such-controlnet", torch.device("cpu"), torch.float32)
    with pytest.raises(ModelLoadError, match="neither a folder nor a hub id"):
        load_controlnet("no such thing", torch.device("cpu"), torch.float32)
    with pytest.raises(ConfigError, match="must be 1-64 letters"):
        check_name("a b")


def test_canny_is_opencvs_edges_on_three_channels() -> None:
    import cv2

    frame = np.zeros((32, 32, 3), np.uint8)
    frame[8:24, 8:24] = 200
    edges = canny(frame, ControlNetSpec("c", low_threshold=50, high_threshold=150))
    assert edges.shape == (32, 32, 3) and edges.dtype == np.uint8
    assert np.array_equal(edges[:, :, 1], cv2.Canny(frame, 50, 150)) and edges[:, :, 1].max() == 255


def test_depth_estimator_plugin_is_transformers_depth_map(tmp_path) -> None:
    from PIL import Image
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor, pipeline

    from streamdiff.models.controlnet import depth_estimator

    torch.manual_seed(0)
    config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8, backbone_out_indices=[0, 1, 2, 3],
                       neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, head_hidden_size=8,
                       reassemble_factors=[4, 2, 1, 0.5])
    DPTForDepthEstimation(config).eval().save_pretrained(tmp_path / "dpt")
    DPTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "dpt")
    frame = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    made = depth_estimator(tmp_path / "dpt")(frame, ControlNetSpec("depth", preprocessor="depth"))
    expected = np.asarray(pipeline("depth-estimation", model=str(tmp_path / "dpt"))(Image.fromarray(frame))["depth"])
    assert made.shape == (48, 64, 3) and np.array_equal(made[:, :, 0], expected) and made.std() > 0
    with pytest.raises(ModelLoadError, match="depth-estimation model"):
        depth_estimator(tmp_path / "missing")
