"""IP-Adapter loading and the per-row scaled attention, judged by diffusers' own IP-Adapter U-Net."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from streamdiff.config import ReferenceImage
from streamdiff.errors import ConfigError, ModelLoadError
from streamdiff.models.ip_adapter import (
    IP_ADAPTER_FILE,
    ImagePromptEncoder,
    build_tiny_ip_adapter,
    load_ip_adapter,
    save_ip_adapter,
    tiny_ip_adapter_path,
)
from streamdiff.models.ip_attention import has_ip_attention
from streamdiff.models.tiny import build_tiny_components

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    return build_tiny_components(0)["unet"].requires_grad_(False)


@pytest.fixture(scope="module")
def adapter_folder(unet: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_ip_adapter(build_tiny_ip_adapter(unet, seed=5), tmp_path_factory.mktemp("ip"))


def _diffusers_unet(unet: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """``unet`` with the IP-Adapter of ``folder`` loaded by diffusers itself (its own processors)."""
    from safetensors.torch import load_file

    state: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, tensor in load_file(str(folder / IP_ADAPTER_FILE)).items():
        part, _, name = key.partition(".")
        state[part][name] = tensor
    theirs = copy.deepcopy(unet)
    theirs._load_ip_adapter_weights([state], low_cpu_mem_usage=False)
    return theirs


def _inputs(rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 4, 16, 16, generator=g), torch.tensor([999, 500, 250, 19][:rows]),
            torch.randn(rows, 77, 64, generator=g))


@torch.inference_mode()
def test_rows_with_different_scales_equal_diffusers_with_each_scale(unet, adapter_folder) -> None:
    ours = copy.deepcopy(unet)
    adapter = load_ip_adapter(adapter_folder, ours, CPU, torch.float32)
    theirs = _diffusers_unet(unet, adapter_folder)
    assert has_ip_attention(ours) and not has_ip_attention(theirs)
    g = torch.Generator().manual_seed(3)
    embeds = torch.randn(3, 32, generator=g)  # image embeddings [B, P]
    tokens = adapter.image_proj(embeds)
    sample, t, text = _inputs(3)
    scales = [0.75, 0.0, 1.5]
    out = ours(sample, t, text, cross_attention_kwargs={"ip_tokens": tokens, "ip_scale": torch.tensor(scales)}).sample
    for row, scale in enumerate(scales):
        for processor in theirs.attn_processors.values():
            if hasattr(processor, "scale"):
                processor.scale = [scale]
        expected = theirs(sample[row:row + 1], t[row:row + 1], text[row:row + 1],
                          added_cond_kwargs={"image_embeds": [embeds[row:row + 1, None]]}).sample
        assert (out[row:row + 1] - expected).abs().max() <= 1e-5, row
    # the IP-Adapter does something: the same rows with scale 0 everywhere differ
    zero = ours(sample, t, text, cross_attention_kwargs={"ip_tokens": tokens, "ip_scale": torch.zeros(3)}).sample
    assert (zero[0] - out[0]).abs().max() > 1e-3


@torch.inference_mode()
def test_scale_zero_with_zero_tokens_is_exactly_the_plain_unet(unet, adapter_folder) -> None:
    ours = copy.deepcopy(unet)
    adapter = load_ip_adapter(adapter_folder, ours, CPU, torch.float32)
    sample, t, text = _inputs(2)
    tokens = torch.zeros(2, 4, 64)
    out = ours(sample, t, text, cross_attention_kwargs={"ip_tokens": tokens, "ip_scale": torch.zeros(2)}).sample
    plain = unet(sample, t, text).sample
    assert torch.equal(out, plain) and torch.isfinite(out).all()
    assert torch.equal(ours(sample, t, text).sample, plain)  # without the IP inputs too
    assert adapter.hidden_states is False


@torch.inference_mode()
def test_image_tokens_equal_diffusers_encode_image_and_are_cached(unet, adapter_folder) -> None:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline  # noqa: F401 - diffusers importable
    from PIL import Image

    ours = copy.deepcopy(unet)
    adapter = load_ip_adapter(adapter_folder, ours, CPU, torch.float32)
    encoder = ImagePromptEncoder(adapter, capacity=2)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    image = ReferenceImage.from_pixels(pixels)
    tokens = encoder.encode(image)
    processed = adapter.image_processor(Image.fromarray(pixels), return_tensors="pt").pixel_values
    theirs = _diffusers_unet(unet, adapter_folder)
    expected = theirs.encoder_hid_proj([adapter.image_encoder(processed).image_embeds[:, None]])[0][:, 0]
    assert tokens.shape == (1, 4, 64) and (tokens - expected).abs().max() <= 1e-6
    negative = theirs.encoder_hid_proj([torch.zeros(1, 1, 32)])[0][:, 0]
    assert (encoder.negative() - negative).abs().max() <= 1e-6
    assert encoder.encode(ReferenceImage.from_pixels(pixels.copy())) is tokens  # same pixels: cached
    for i in range(3):
        encoder.encode(ReferenceImage.from_pixels(pixels + np.uint8(i + 1)))
    assert encoder.encoder_calls == 4
    encoder.encode(image)  # pushed out of the bound of 2: computed again
    assert encoder.encoder_calls == 5


def test_tiny_is_built_once_into_the_cache_and_loads(unet, tmp_path: Path) -> None:
    folder = tiny_ip_adapter_path(unet, tmp_path)
    assert (folder / IP_ADAPTER_FILE).is_file() and (folder / "image_encoder" / "config.json").is_file()
    assert tiny_ip_adapter_path(unet, tmp_path) == folder
    adapter = load_ip_adapter("tiny", copy.deepcopy(unet), CPU, torch.float32, cache_dir=tmp_path)
    assert adapter.name.endswith(IP_ADAPTER_FILE)


def test_bad_sources_are_clear_errors(unet, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="offline"):
        load_ip_adapter(tmp_path / "nowhere", copy.deepcopy(unet), CPU, torch.float32)
    with pytest.raises(ModelLoadError, match="no .safetensors"):
        load_ip_adapter(tmp_path, copy.deepcopy(unet), CPU, torch.float32)
    other = build_tiny_components(0, unet_config={**unet.config, "cross_attention_dim": 32})["unet"]
    folder = save_ip_adapter(build_tiny_ip_adapter(other), tmp_path / "other")
    with pytest.raises(ModelLoadError, match="does not fit"):
        load_ip_adapter(folder, copy.deepcopy(unet), CPU, torch.float32)


def test_reference_image_is_validated_and_named_by_its_pixels() -> None:
    a = ReferenceImage.from_pixels(np.zeros((4, 5, 3), np.uint8))
    assert a == ReferenceImage.from_pixels(np.zeros((4, 5, 3), np.uint8))
    assert a != ReferenceImage.from_pixels(np.zeros((5, 4, 3), np.uint8))
    assert not a.pixels.flags.writeable
    with pytest.raises(ConfigError, match="uint8 RGB"):
        ReferenceImage.from_pixels(np.zeros((4, 5), np.uint8))
    with pytest.raises(ConfigError, match="4096"):
        ReferenceImage.from_pixels(np.zeros((1, 5000, 3), np.uint8))
