"""The SDXL family: what sets it apart from SD 1.x/2.x, and the built-in ``tiny-sdxl`` model.

An SDXL model (``stabilityai/sdxl-turbo``, SDXL + LCM-LoRA, …) has two text encoders: a ``CLIPTextModel`` and a
``CLIPTextModelWithProjection`` (``text_encoder_2``/``tokenizer_2``). Its U-Net (``addition_embed_type ==
"text_time"``) takes the penultimate hidden states of both, concatenated, as encoder hidden states, and two added
conditions per row: the pooled, projected output of the second encoder (``text_embeds``) and the "added time ids"
(``time_ids``: original size, crop origin and target size). :class:`SdxlConditions` holds the model's settings for
them; :class:`~streamdiff.models.prompts.PromptEncoder` (the one owner of prompt encoding) makes them as diffusers'
``StableDiffusionXLImg2ImgPipeline`` does.

``tiny-sdxl``: the same architecture at a tiny size with random weights from a seed (two tiny CLIP encoders, a
TAESD(XL)-style pass-through ``AutoencoderTiny``, hand-written tokenizers), saved as a normal diffusers folder in the
cache on first use and loaded through the same path as any local model. Sized for 256×256 (32×32 latents).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .tiny import SD_SCHEDULER, TINY_SEED, TINY_UNET, TINY_VAE, _cached_folder, _make_passthrough_vae, save_diffusers_folder
from .tokenizer_vocab import build_vocab, write_tokenizer_files

TINY_SDXL_NAME = "tiny-sdxl"
TINY_SDXL_VERSION = 1
SDXL_PARTS = ("text_encoder_2", "tokenizer_2")

TINY_SDXL_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      max_position_embeddings=77, projection_dim=32)
TINY_SDXL_TEXT_2 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                        max_position_embeddings=77, projection_dim=32)
TINY_SDXL_TIME_EMBED = 8
TINY_SDXL_UNET = dict(
    TINY_UNET,  # the tiny SD U-Net's blocks, with SDXL's conditioning
    cross_attention_dim=TINY_SDXL_TEXT["hidden_size"] + TINY_SDXL_TEXT_2["hidden_size"],
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=TINY_SDXL_TIME_EMBED,
    # the pooled embedding (encoder 2's projection) + 6 time ids × the time embedding width
    projection_class_embeddings_input_dim=TINY_SDXL_TEXT_2["projection_dim"] + 6 * TINY_SDXL_TIME_EMBED,
)


@dataclass(frozen=True)
class SdxlConditions:
    """An SDXL model's settings for its added conditions (from its ``model_index.json``, diffusers' defaults).

    ``force_zeros_for_empty_prompt``: an empty negative prompt is all zeros (hidden states and pooled embedding)
    instead of the encoded empty text, as diffusers does for ``negative_prompt=None`` (sdxl-turbo: true).
    """

    force_zeros_for_empty_prompt: bool = True

    @staticmethod
    def time_ids(height: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The added time ids ``[1, 6]`` of a ``height``×``width`` frame: original size, crop origin (0, 0) and
        target size, as diffusers' img2img ``_get_add_time_ids`` makes them without an aesthetic score."""
        return torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device)


def is_sdxl_unet(unet: torch.nn.Module) -> bool:
    """Whether ``unet`` takes SDXL's added conditions (``addition_embed_type == "text_time"``)."""
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def is_sdxl_folder(folder: Path) -> bool:
    """Whether a diffusers folder holds an SDXL model: a second text encoder, or a "text_time" U-Net."""
    if (folder / "text_encoder_2").is_dir():
        return True
    config = folder / "unet" / "config.json"
    return config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("addition_embed_type") == "text_time"


def sdxl_conditions(folder: Path) -> SdxlConditions:
    """The added-condition settings of an SDXL diffusers folder; a refiner-style model (aesthetic score) is refused."""
    from ..errors import ModelLoadError

    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text(encoding="utf-8")) if index_file.is_file() else {}
    if index.get("requires_aesthetics_score"):
        raise ModelLoadError(f"model {folder} requires an aesthetic score (an SDXL refiner); supported are SDXL base "
                             f"models (requires_aesthetics_score false)")
    return SdxlConditions(force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)))


def load_sdxl_parts(folder: Path, dtype: torch.dtype) -> dict[str, Any]:
    """The second text encoder (``CLIPTextModelWithProjection``) and tokenizer of an SDXL diffusers folder."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    return {
        "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2",
                                                                      dtype=dtype).eval(),
        "tokenizer_2": CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2"),
    }


def build_tiny_sdxl_components(seed: int = TINY_SEED) -> dict[str, object]:
    """The tiny SDXL model's components with deterministic random weights (each part seeded on its own)."""
    from diffusers import AutoencoderTiny, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab, _ = build_vocab()
    special = dict(vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                   pad_token_id=vocab["<|endoftext|>"])
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_SDXL_UNET)
    torch.manual_seed(seed + 1)
    vae = AutoencoderTiny(**TINY_VAE)
    _make_passthrough_vae(vae)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**special, **TINY_SDXL_TEXT))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**special, **TINY_SDXL_TEXT_2))
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval(),
            "text_encoder_2": text_encoder_2.eval(), "scheduler": LCMScheduler(**SD_SCHEDULER)}


def save_sdxl_folder(components: dict[str, object], folder: Path, force_zeros_for_empty_prompt: bool = True) -> None:
    """Save SDXL components (+ generated tokenizers unless given) as a diffusers ``StableDiffusionXLPipeline`` folder."""
    save_diffusers_folder(components, folder)
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    if "tokenizer_2" not in components:
        write_tokenizer_files(folder / "tokenizer_2")
        index["tokenizer_2"] = ["transformers", "CLIPTokenizer"]
    index.update(_class_name="StableDiffusionXLPipeline", force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def tiny_sdxl_model_path(cache_dir: Path | None = None, seed: int = TINY_SEED) -> Path:
    """The folder of the ``tiny-sdxl`` model (random weights from ``seed``), building it atomically on first use."""
    return _cached_folder(cache_dir, f"tiny-sdxl-v{TINY_SDXL_VERSION}-seed{seed}",
                          lambda staging: save_sdxl_folder(build_tiny_sdxl_components(seed), staging))
