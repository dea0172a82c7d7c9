"""Single checkpoint files (``.safetensors`` / ``.ckpt``) in the original Stable Diffusion (LDM) layout.

Such a file holds the weights only (``model.diffusion_model.*`` for the U-Net, ``first_stage_model.*`` for the VAE,
``cond_stage_model.*`` for the text encoder; SDXL: ``conditioner.embedders.0.transformer.*`` for CLIP-L and
``conditioner.embedders.1.model.*`` for OpenCLIP bigG). The family (SD 1.x, SD 2.x or SDXL) is read from the keys;
the architecture comes from a diffusers *config* folder of the same family: ``model_config=`` a local diffusers
folder or a hub id whose configs are cached (only the small json / tokenizer files are needed, never its weights).
Without ``model_config`` the family's reference repo is used (SD 1.x →
``stable-diffusion-v1-5/stable-diffusion-v1-5``, SD 2.x → ``stabilityai/stable-diffusion-2-1``, SDXL →
``stabilityai/stable-diffusion-xl-base-1.0``): offline that works only if its configs are cached. diffusers' own
single-file loaders convert the weights. SDXL refiner files (OpenCLIP bigG alone, ``conditioner.embedders.0.model.*``)
are refused. ``.ckpt`` files are read with ``torch.load(weights_only=True)``, so a pickle that carries code is
refused.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError
from .hub import hub_snapshot, is_hub_id
from .sdxl import is_sdxl_folder, sdxl_conditions

logger = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
# The small files that describe a diffusers pipeline's architecture (no weights).
CONFIG_PATTERNS = ["model_index.json", "*/config.json", "*/*_config.json", "tokenizer/*", "tokenizer_2/*"]
FAMILY_CONFIGS = {
    "sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd2": "stabilityai/stable-diffusion-2-1",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
# A model of each family whose diffusers configs fit its single files (named in the error without model_config).
_FAMILY_EXAMPLES = {"sd1": "stabilityai/sd-turbo", "sd2": "stabilityai/sd-turbo", "sdxl": "stabilityai/sdxl-turbo"}
_UNET_PREFIX = "model.diffusion_model."
_SD1_TEXT_KEY = "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"
_SD2_TEXT_KEY = "cond_stage_model.model.token_embedding.weight"
_CONDITIONER = "conditioner.embedders."
_SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."  # CLIP-L (transformers layout)
_SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # OpenCLIP bigG
_SDXL_REFINER_PREFIX = "conditioner.embedders.0.model."  # a refiner's only encoder: OpenCLIP bigG
_DIFFUSERS_HINTS = ("conv_in.weight", "unet.conv_in.weight", "down_blocks.0.resnets.0.conv1.weight")


def checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a checkpoint file, read without loading the weights into memory."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same clear error
        what = "safetensors" if path.suffix == ".safetensors" else "torch (weights_only=True, no pickled code)"
        raise ModelLoadError(f"checkpoint file {path} is not a readable {what} file: {error}") from error
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"checkpoint file {path} holds a {type(state).__name__}, not a state dict")
    return {key: tuple(value.shape) for key, value in state.items() if isinstance(value, torch.Tensor)}


def checkpoint_family(path: Path, shapes: dict[str, tuple[int, ...]]) -> str:
    """``"sd1"``, ``"sd2"`` or ``"sdxl"`` from the text encoders' layout; a clear error for anything else."""
    if not any(key.startswith(_UNET_PREFIX) for key in shapes):
        if any(key in shapes for key in _DIFFUSERS_HINTS):
            raise ModelLoadError(
                f"checkpoint file {path} holds diffusers-layout weights, not the original Stable Diffusion layout "
                f"('{_UNET_PREFIX}*' keys); save the model with save_pretrained() and pass that folder instead"
            )
        raise ModelLoadError(
            f"checkpoint file {path} is not a Stable Diffusion checkpoint: none of its {len(shapes)} tensors has "
            f"the U-Net prefix '{_UNET_PREFIX}'"
        )
    if any(key.startswith(_CONDITIONER) for key in shapes):
        return _sdxl_family(path, shapes)
    if _SD1_TEXT_KEY in shapes:
        return "sd1"
    if _SD2_TEXT_KEY in shapes:
        return "sd2"
    raise ModelLoadError(
        f"checkpoint file {path} has no text encoder in a known layout ('{_SD1_TEXT_KEY}' for SD 1.x or "
        f"'{_SD2_TEXT_KEY}' for SD 2.x)"
    )


def _sdxl_family(path: Path, shapes: dict[str, tuple[int, ...]]) -> str:
    """``"sdxl"`` for an SDXL base layout (both text encoders); refiners and other layouts are refused."""
    has = {prefix: any(key.startswith(prefix) for key in shapes)
           for prefix in (_SDXL_CLIP_PREFIX, _SDXL_OPEN_CLIP_PREFIX, _SDXL_REFINER_PREFIX)}
    if has[_SDXL_CLIP_PREFIX] and has[_SDXL_OPEN_CLIP_PREFIX]:
        return "sdxl"
    supported = (f"supported are SD 1.x, SD 2.x and SDXL base checkpoints (SDXL base, sdxl-turbo: CLIP-L at "
                 f"'{_SDXL_CLIP_PREFIX}*' and OpenCLIP bigG at '{_SDXL_OPEN_CLIP_PREFIX}*')")
    if has[_SDXL_REFINER_PREFIX] and not has[_SDXL_OPEN_CLIP_PREFIX]:
        raise ModelLoadError(f"checkpoint file {path} is an SDXL refiner checkpoint (one text encoder, OpenCLIP bigG "
                             f"at '{_SDXL_REFINER_PREFIX}*', and an aesthetic-score U-Net); {supported}")
    found = sorted({".".join(key.split(".")[:4]) for key in shapes if key.startswith(_CONDITIONER)})
    raise ModelLoadError(f"checkpoint file {path} has SDXL-style text encoders in an unknown layout ({found}); "
                         f"{supported}")


def resolve_config_folder(source: str, revision: str | None = None) -> Path:
    """A local diffusers folder (with ``model_index.json``) describing the architecture, from a path or hub id."""
    path = Path(source).expanduser()
    if not path.exists():
        if not is_hub_id(source):
            raise ModelLoadError(f"model_config {source!r} is neither an existing folder nor a hub id ('org/name')")
        path = hub_snapshot(source, CONFIG_PATTERNS, revision, "model_config")
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(
            f"model_config {source!r} ({path}) has no model_index.json: pass a diffusers pipeline folder or hub id"
        )
    return path


def load_single_file(
    path: Path, dtype: torch.dtype, model_config: str | None = None, revision: str | None = None
) -> dict[str, Any]:
    """The components of an original-layout SD or SDXL checkpoint, loaded directly in ``dtype`` on the CPU.

    Returns ``unet``, ``vae``, ``text_encoder``, ``tokenizer`` and ``scheduler`` (the config folder's scheduler);
    SDXL also ``text_encoder_2``, ``tokenizer_2`` and ``sdxl`` (the config folder's added-condition settings).
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if not path.name.endswith(CHECKPOINT_SUFFIXES):
        raise ModelLoadError(f"model file {path} is not a {' or '.join(CHECKPOINT_SUFFIXES)} checkpoint")
    family = checkpoint_family(path, checkpoint_shapes(path))
    sdxl = family == "sdxl"
    config_folder = _config_folder(path, family, model_config, revision)
    if is_sdxl_folder(config_folder) != sdxl:
        given, other = str(model_config or config_folder), "an SD 1.x/2.x" if sdxl else "an SDXL"
        raise ModelLoadError(
            f"checkpoint file {path} is {FAMILY_NAMES[family]}, but model_config {given!r} is {other} model: pass a "
            f"model_config of the checkpoint's family (e.g. {_FAMILY_EXAMPLES[family]!r})"
        )
    if sdxl:
        pipeline_class, extra = StableDiffusionXLPipeline, dict(add_watermarker=False)
    else:
        pipeline_class, extra = StableDiffusionPipeline, dict(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = pipeline_class.from_single_file(
            str(path), config=str(config_folder), local_files_only=True, torch_dtype=dtype,
            feature_extractor=None, image_encoder=None, **extra,
        )
    except Exception as error:  # noqa: BLE001 - reported with what was tried
        raise ModelLoadError(
            f"could not load the checkpoint file {path} with the architecture of {config_folder}: "
            f"{type(error).__name__}: {error}"
        ) from error
    names = ("unet", "vae", "text_encoder", "text_encoder_2") if sdxl else ("unet", "vae", "text_encoder")
    components = {name: getattr(pipe, name) for name in (*names, "tokenizer", "scheduler")}
    for name in names:
        empty = [n for n, p in components[name].named_parameters() if p.device.type == "meta"]
        if empty:
            raise ModelLoadError(
                f"checkpoint file {path} lacks {len(empty)} {name} weights for the architecture of {config_folder} "
                f"(e.g. {empty[0]!r}): is model_config the right model family?"
            )
    if sdxl:
        components.update(tokenizer_2=pipe.tokenizer_2, sdxl=sdxl_conditions(config_folder))
    logger.info("loaded %s checkpoint %s with the architecture of %s", family, path, config_folder)
    return components


def _config_folder(path: Path, family: str, model_config: str | None, revision: str | None) -> Path:
    """The diffusers config folder for a checkpoint of ``family``: ``model_config``, else the family's reference."""
    source = model_config or FAMILY_CONFIGS[family]
    try:
        return resolve_config_folder(source, revision)
    except ModelLoadError as error:
        hint = "" if model_config else (
            f" The architecture of {path.name} ({FAMILY_NAMES[family]}) comes from {source!r} by default; pass "
            f"model_config= a local diffusers folder or a cached hub id of the same architecture (e.g. "
            f"{_FAMILY_EXAMPLES[family]!r}; only its configs and tokenizers are read)."
        )
        raise ModelLoadError(f"{error}{hint}") from error
