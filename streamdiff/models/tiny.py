"""The built-in models: ``tiny`` (trained here, shipped) and ``tiny-random`` (random weights, built from a seed).

Both have the same Stable-Diffusion architecture: a U-Net (cross-attention at its coarsest level), a TAESD-style
``AutoencoderTiny`` VAE, a small CLIP text encoder and a tokenizer from a hand-written vocabulary. Each is saved as a
normal diffusers folder in the cache on first use and loaded through the same code path as any local model. Sized
for 256×256 (32×32 latents).

``tiny``: weights trained by ``tools/train_tiny.py`` on procedural images (fp16 safetensors + ``manifest.json`` in
``weights/tiny/``, package data). Its prompts name one of five styles (:mod:`.tiny_styles`: watercolor, sketch,
neon, mosaic, night); an empty prompt keeps the input as it is.

``tiny-random``: random U-Net and text encoder; the VAE is a lossy pass-through with a random texture, so the output
follows the input with meaningless styling. Tests that need exact numbers from a seed use it.

Version 3 of the architecture is sized for ≥ 30 frames/s end to end on 2 CPU threads: the VAE is 8 channels wide
and does no block work at full resolution, and the U-Net keeps attention at its 8×8 level only. Measured:
docs/PERF.md ("The tiny model").
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from .tokenizer_vocab import build_vocab, write_tokenizer_files

logger = logging.getLogger(__name__)

TINY_NAME = "tiny"
TINY_RANDOM_NAME = "tiny-random"
TINY_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "tiny"
TINY_PARTS = ("unet", "vae", "text_encoder")
TINY_VERSION = 3
TINY_SEED = 0

# Shared by the tiny model and the tests' random components.
TINY_UNET = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=64,
    attention_head_dim=8,
)
TINY_VAE = dict(
    encoder_block_out_channels=(8, 8, 8, 8),
    decoder_block_out_channels=(8, 8, 8, 8),
    num_encoder_blocks=(0, 1, 1, 1),  # no block at full resolution: one 3→8 convolution there
    num_decoder_blocks=(1, 1, 1, 0),  # likewise: an 8→8 and an 8→3 convolution at full resolution
    latent_channels=4,
    scaling_factor=3.0,
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
    steps_offset=1,
)


def default_cache_dir() -> Path:
    """``$STREAMDIFF_CACHE`` or ``$XDG_CACHE_HOME/streamdiff`` (``~/.cache/streamdiff``)."""
    env = os.environ.get("STREAMDIFF_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "streamdiff"


def build_tiny_components(
    seed: int = TINY_SEED,
    unet_config: dict[str, object] | None = None,
    vae_config: dict[str, object] | None = None,
    text_config: dict[str, object] | None = None,
) -> dict[str, object]:
    """The tiny model's components with deterministic random weights (each part seeded on its own).

    The ``*_config`` arguments replace ``TINY_UNET`` / ``TINY_VAE`` / ``TINY_TEXT`` (e.g. an even smaller model for
    a test fixture); the recipe (seeds, pass-through VAE, vocabulary) stays the same.
    """
    from diffusers import AutoencoderTiny, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab, _ = build_vocab()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**(unet_config or TINY_UNET))
    torch.manual_seed(seed + 1)
    vae = AutoencoderTiny(**(vae_config or TINY_VAE))
    _make_passthrough_vae(vae)
    torch.manual_seed(seed + 2)
    clip_config = CLIPTextConfig(
        vocab_size=len(vocab),
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        **(text_config or TINY_TEXT),
    )
    text_encoder = CLIPTextModel(clip_config)
    scheduler = LCMScheduler(**SD_SCHEDULER)
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval(), "scheduler": scheduler}


@torch.no_grad()
def _identity_taps(conv: torch.nn.Conv2d, channels: int, value: float, texture: float) -> None:
    """Keep ``texture`` × the random weights and add ``value`` at the centre tap of channel i → i (i < channels)."""
    conv.weight.mul_(texture)
    centre = conv.kernel_size[0] // 2
    for i in range(channels):
        conv.weight[i, i, centre, centre] += value


@torch.no_grad()
def _make_passthrough_vae(vae: torch.nn.Module) -> None:
    """Turn the random TAESD-style VAE into a lossy pass-through with a faint random texture.

    Channels 0–2 carry the RGB image through every layer (blocks' residual branches are damped, down-sampling
    convolutions average, the last convolutions map RGB in [0, 1] to latents in [-1, 1] and back); what remains of
    the random weights adds texture. With a latent scaling factor of 3 the latents stand out of the noise the
    Stream Batch adds, so the tiny model's output follows its input (meaningless styling, but visibly live).
    """
    rgb, texture = 3, 0.02
    for layers in (vae.encoder.layers, vae.decoder.layers):
        for layer in layers:
            if type(layer).__name__ == "AutoencoderTinyBlock":
                layer.conv[-1].weight.mul_(texture)
                layer.conv[-1].bias.mul_(texture)
    enc = [m for m in vae.encoder.layers if isinstance(m, torch.nn.Conv2d)]
    _identity_taps(enc[0], rgb, 1.0, texture)
    enc[0].bias.zero_()
    for down in enc[1:-1]:
        down.weight.mul_(texture)
        for i in range(rgb):
            down.weight[i, i] += 1.0 / 9.0
    _identity_taps(enc[-1], rgb, 2.0, texture)  # latent = 2·rgb − 1
    enc[-1].bias.zero_()
    enc[-1].bias[:rgb] = -1.0
    dec = [m for m in vae.decoder.layers if isinstance(m, torch.nn.Conv2d)]
    _identity_taps(dec[0], rgb, 1.0, texture)  # channel = latent + 1 ∈ [0, 2], positive through the ReLUs
    dec[0].bias.zero_()
    dec[0].bias[:rgb] = 1.0
    for conv in dec[1:-1]:
        _identity_taps(conv, rgb, 1.0, texture)
    _identity_taps(dec[-1], rgb, 0.5, texture)  # rgb = channel / 2; the decoder then maps [0, 1] to [-1, 1]
    dec[-1].bias.zero_()


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


def load_trained_components(weights_dir: Path = TINY_WEIGHTS_DIR) -> dict[str, object]:
    """The tiny architecture with the trained fp16 weights of ``weights_dir`` (held in float32)."""
    from safetensors.torch import load_file

    from ..errors import ModelLoadError

    components = build_tiny_components(TINY_SEED)
    for name in TINY_PARTS:
        path = weights_dir / f"{name}.safetensors"
        if not path.is_file():
            raise ModelLoadError(f"the tiny model's weights {path} are missing; reinstall streamdiff or run "
                                 f"tools/train_tiny.py")
        module = components[name]
        state = {k: v.float() for k, v in load_file(str(path)).items()}
        missing, unexpected = module.load_state_dict(state, strict=False)  # type: ignore[attr-defined]
        missing = [k for k in missing if k in dict(module.named_parameters())]  # type: ignore[attr-defined]
        if missing or unexpected:
            raise ModelLoadError(f"{path} does not fit the tiny architecture: missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]}")
    return components


def save_trained_folder(weights_dir: Path, folder: Path) -> Path:
    """A diffusers folder at ``folder`` from the shipped weights in ``weights_dir`` (+ configs, tokenizer, scheduler)."""
    save_diffusers_folder(load_trained_components(weights_dir), folder)
    return folder


def _weights_digest(weights_dir: Path) -> str:
    """Eight hex digits naming this set of weights (from the manifest's file hashes)."""
    import hashlib

    manifest = weights_dir / "manifest.json"
    data = manifest.read_bytes() if manifest.is_file() else b""
    files = json.loads(data).get("files", {}) if data else {}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:8]


def tiny_model_path(cache_dir: Path | None = None) -> Path:
    """The folder of the built-in trained ``tiny`` model, assembled atomically from the shipped weights on first use."""
    name = f"tiny-trained-v{TINY_VERSION}-{_weights_digest(TINY_WEIGHTS_DIR)}"
    return _cached_folder(cache_dir, name, lambda staging: save_trained_folder(TINY_WEIGHTS_DIR, staging))


def tiny_random_model_path(cache_dir: Path | None = None, seed: int = TINY_SEED) -> Path:
    """The folder of the ``tiny-random`` model (random weights from ``seed``), building it atomically on first use."""
    return _cached_folder(cache_dir, f"tiny-v{TINY_VERSION}-seed{seed}",
                          lambda staging: save_diffusers_folder(build_tiny_components(seed), staging))


def _cached_folder(cache_dir: Path | None, name: str, build: Callable[[Path], object],
                   marker: str = "model_index.json") -> Path:
    """``root/models/name``, made by ``build(staging)`` and renamed into place unless it exists (has ``marker``)."""
    root = (cache_dir or default_cache_dir()) / "models"
    folder = root / name
    if (folder / marker).is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    logger.info("building the built-in model %s in %s", name, folder)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=root))
    try:
        build(staging)
        try:
            os.replace(staging, folder)
        except OSError:
            if not (folder / marker).is_file():  # another process won the race otherwise
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return folder
