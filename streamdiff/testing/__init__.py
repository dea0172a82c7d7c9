"""Helpers for tests and benchmarks: tiny random components, analytic fake U-Nets, SD-2.1-size configs, LDM
checkpoints, random LoRAs, a fake hub cache and test media. Everything here is offline and seeded; nothing downloads.

Not part of the product: nothing under ``streamdiff`` outside ``testing`` and ``bench`` imports it.
"""

from __future__ import annotations

from .components import (
    SD21_TEXT,
    SD21_UNET,
    SD21_VAE,
    save_tiny_model,
    sd21_components,
    small_kl_vae,
    small_sd21_unet_config,
    tiny_components,
)
from ..models.tiny import TINY_UNET
from .fakes import AnalyticUNet, CountingUNet
from .ldm import clip_to_ldm, open_clip_to_ldm, save_ldm_checkpoint, unet_to_ldm, vae_to_ldm
from .lora import fake_hub_cache, random_lora, save_kohya_lora, save_lora
from .media import stream_frames, write_pattern_video

__all__ = [
    "AnalyticUNet",
    "CountingUNet",
    "SD21_TEXT",
    "SD21_UNET",
    "SD21_VAE",
    "TINY_UNET",
    "clip_to_ldm",
    "fake_hub_cache",
    "open_clip_to_ldm",
    "random_lora",
    "save_kohya_lora",
    "save_ldm_checkpoint",
    "save_lora",
    "save_tiny_model",
    "sd21_components",
    "small_kl_vae",
    "small_sd21_unet_config",
    "stream_frames",
    "tiny_components",
    "unet_to_ldm",
    "vae_to_ldm",
    "write_pattern_video",
]
