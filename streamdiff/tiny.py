"""The built-in ``tiny`` model: Stable-Diffusion architecture, random weights, built offline from a seed.

U-Net (attention only at the two coarse levels), TAESD-style ``AutoencoderTiny`` VAE, a small CLIP text encoder and a
tokenizer from a hand-written vocabulary. It is saved as a normal diffusers folder on first use and loaded through the
same code path as any local model. Its images are meaningless noise patterns: it exists so that everything runs in
real time on a CPU with no download. Sized for 256×256 (32×32 latents).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .tokenizer_vocab import build_vocab, write_tokenizer_files

logger = logging.getLogger(__name__)

TINY_NAME = "tiny"
TINY_VERSION = 1
TINY_SEED = 0

# Shared by the tiny model and the tests' random components.
TINY_UNET = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    norm_num_groups=16,
    cross_attention_dim=64,
    attention_head_dim=8,
)
TINY_VAE = dict(
    encoder_block_out_channels=(16, 16, 16, 16),
    decoder_block_out_channels=(16, 16, 16, 16),
    num_encoder_blocks=(1, 1, 1, 1),
    num_decoder_blocks=(1, 1, 1, 1),
    latent_channels=4,
)
TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=77,
    projection_dim=64,
)
# Stable Diffusion's training schedule, read by the LCM scheduler config.
SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    original_inference_steps=50,
    timestep_scaling=10.0,
)


def default_cache_dir() -> Path:
    """``$STREAMDIFF_CACHE`` or ``$XDG_CACHE_HOME/streamdiff`` (``~/.cache/streamdiff``)."""
    env = os.environ.get("STREAMDIFF_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "streamdiff"


def build_tiny_components(seed: int = TINY_SEED) -> dict[str, object]:
    """The tiny model's components with deterministic random weights (each part seeded on its own)."""
    from diffusers import AutoencoderTiny, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab, _ = build_vocab()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET)
    torch.manual_seed(seed + 1)
    vae = AutoencoderTiny(**TINY_VAE)
    _calibrate_vae(vae, seed)
    torch.manual_seed(seed + 2)
    text_config = CLIPTextConfig(
        vocab_size=len(vocab),
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        **TINY_TEXT,
    )
    text_encoder = CLIPTextModel(text_config)
    scheduler = LCMScheduler(**SD_SCHEDULER)
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval(), "scheduler": scheduler}


@torch.no_grad()
def _calibrate_vae(vae: torch.nn.Module, seed: int) -> None:
    """Rescale the random VAE's last layers so latents have unit spread and decoded images fill [0, 1].

    Freshly initialised, the random encoder gives latents with std ~0.03 and the decoder near-black images; after
    this the streamed output is visibly textured (still meaningless) and responds to the input.
    """
    generator = torch.Generator().manual_seed(seed)
    probe = torch.rand((1, 3, 64, 64), generator=generator) * 2 - 1
    enc_last = vae.encoder.layers[-1]
    scale = 1.0 / vae.encode(probe).latents.std().clamp_min(1e-6)
    enc_last.weight.mul_(scale)
    enc_last.bias.mul_(scale)
    dec_last = vae.decoder.layers[-1]
    latents = torch.randn((1, vae.config.latent_channels, 8, 8), generator=generator)
    before = (vae.decode(latents).sample + 1) / 2  # the decoder's last layer output
    k = 0.25 / before.std().clamp_min(1e-6)
    dec_last.weight.mul_(k)
    dec_last.bias.mul_(k)
    dec_last.bias.add_(0.5 - before.mean(dim=(0, 2, 3)) * k)


def save_diffusers_folder(components: dict[str, object], folder: Path) -> None:
    """Save components (+ a generated tokenizer unless one is given) as a diffusers folder with model_index.json."""
    folder.mkdir(parents=True, exist_ok=True)
    index: dict[str, object] = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.27.0"}
    for name, component in components.items():
        component.save_pretrained(folder / name)  # type: ignore[attr-defined]
        library = "transformers" if type(component).__module__.startswith("transformers") else "diffusers"
        index[name] = [library, type(component).__name__]
    if "tokenizer" not in components:
        write_tokenizer_files(folder / "tokenizer")
        index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def tiny_model_path(cache_dir: Path | None = None, seed: int = TINY_SEED) -> Path:
    """The folder of the built-in tiny model, building it atomically on first use."""
    root = (cache_dir or default_cache_dir()) / "models"
    folder = root / f"tiny-v{TINY_VERSION}-seed{seed}"
    if (folder / "model_index.json").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    logger.info("building the built-in tiny model (random weights, seed %d) in %s", seed, folder)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=root))
    try:
        save_diffusers_folder(build_tiny_components(seed), staging)
        try:
            os.replace(staging, folder)
        except OSError:
            if not (folder / "model_index.json").is_file():  # another process won the race otherwise
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return folder
