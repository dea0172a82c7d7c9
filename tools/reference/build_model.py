"""Build the reference fixture's model with streamdiff's own code: ``python build_model.py OUT_FOLDER``.

Writes ``OUT_FOLDER/model`` (a diffusers Stable Diffusion folder: U-Net, pass-through ``AutoencoderTiny``, CLIP text
encoder, the hand-written tokenizer, LCM scheduler config) and ``OUT_FOLDER/vae_kl`` (a small random
``AutoencoderKL`` with the same scale factor, for the KL-sampling case). Everything is seeded and tiny (~0.5 MB),
because the weights live in the repository: the test never depends on random initialisation being reproducible
across library versions. The reference venv only loads these folders.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from streamdiff.models.tiny import build_tiny_components, save_diffusers_folder

SEED = 7
# Two U-Net levels, attention only at the coarse one; 32 px frames give 8×8 latents through a 3-level VAE (factor 4).
UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(8, 16),
    layers_per_block=1,
    norm_num_groups=4,
    cross_attention_dim=16,
    attention_head_dim=8,
)
VAE = dict(
    encoder_block_out_channels=(8, 8, 8),
    decoder_block_out_channels=(8, 8, 8),
    num_encoder_blocks=(1, 1, 1),
    num_decoder_blocks=(1, 1, 1),
    latent_channels=4,
    scaling_factor=3.0,
)
TEXT = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    max_position_embeddings=77,
    projection_dim=16,
)
KL_VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(8, 8, 8),
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=4,
)


def portable_text_encoder(folder: Path) -> None:
    """Give the saved CLIP weights the ``text_model.`` key prefix every Stable Diffusion checkpoint has.

    transformers 5 saves ``CLIPTextModel`` without it; transformers 4.x (the reference's) then silently initialises
    the whole text encoder at random. Both versions load the prefixed layout.
    """
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    state = load_file(path)
    save_file({k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}, path,
              metadata={"format": "pt"})


def main(out: Path) -> None:
    from diffusers import AutoencoderKL

    components = build_tiny_components(SEED, unet_config=UNET, vae_config=VAE, text_config=TEXT)
    save_diffusers_folder(components, out / "model")
    portable_text_encoder(out / "model" / "text_encoder")
    torch.manual_seed(SEED + 3)
    AutoencoderKL(**KL_VAE).eval().save_pretrained(out / "vae_kl")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"model folders written to {out} ({size / 1e3:.0f} kB)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: build_model.py OUT_FOLDER")
    main(Path(sys.argv[1]))
