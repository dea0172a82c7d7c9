"""Random model components for tests and benchmarks: the tiny recipe, a small KL VAE, SD-2.1-size modules."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from ..models.tiny import SD_SCHEDULER, build_tiny_components, save_diffusers_folder

# Stable Diffusion 2.1 architecture (v-prediction aside, which streaming does not use): 866M-parameter U-Net.
SD21_UNET = dict(
    sample_size=96,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
)
SD21_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=768,
)
SD21_TEXT = dict(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=512,
)


def tiny_components(seed: int = 0) -> dict[str, object]:
    """Fresh tiny random components (the same recipe as the built-in model)."""
    return build_tiny_components(seed)


def save_tiny_model(folder: Path, seed: int = 0, kl_vae: bool = False) -> Path:
    """Save a tiny random model as a diffusers folder; ``kl_vae`` gives it a small AutoencoderKL instead of TAESD."""
    components = tiny_components(seed)
    if kl_vae:
        components["vae"] = small_kl_vae(seed)
    save_diffusers_folder(components, folder)
    return folder


def small_kl_vae(seed: int = 0) -> torch.nn.Module:
    """A small random ``AutoencoderKL`` (scale factor 8, 4 latent channels)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed + 3)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
    ).eval()


def small_sd21_unet_config() -> dict[str, Any]:
    """SD-2.1's U-Net layout (linear projections, per-level heads) at a small width, for fast export tests."""
    config = copy.deepcopy(SD21_UNET)
    config.update(block_out_channels=(32, 64, 64, 64), cross_attention_dim=64, attention_head_dim=(2, 4, 4, 4))
    config.update(norm_num_groups=16, layers_per_block=1)
    return config


def sd21_components(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, object]:
    """SD-2.1-size components with random weights (no download): U-Net, KL VAE, TAESD, text encoder, scheduler."""
    from diffusers import AutoencoderKL, AutoencoderTiny, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD21_UNET)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**SD21_VAE)
    torch.manual_seed(seed + 2)
    taesd = AutoencoderTiny()
    torch.manual_seed(seed + 3)
    text_encoder = CLIPTextModel(CLIPTextConfig(**SD21_TEXT))
    out: dict[str, object] = {
        "unet": unet,
        "vae": vae,
        "taesd": taesd,
        "text_encoder": text_encoder,
        "scheduler": LCMScheduler(**SD_SCHEDULER),
    }
    for module in out.values():
        if isinstance(module, torch.nn.Module):
            module.to(dtype).eval().requires_grad_(False)
    return out
