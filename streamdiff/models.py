"""Model loading: hub id, local diffusers folder, single checkpoint file, or the built-in ``tiny`` model.

Everything becomes a :class:`LoadedModel`: the U-Net, the VAE (the model's own ``AutoencoderKL`` or a tiny
``AutoencoderTiny``), the text encoder and tokenizer, and the model's noise schedule. LoRAs are fused at load.
A hub id is looked up in the local cache first; a download is tried only when the hub is reachable and
``HF_HUB_OFFLINE`` is not set, and a failure says what was tried and how to fix it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import ModelLoadError
from .schedule import NoiseSchedule
from .tiny import TINY_NAME, tiny_model_path

logger = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
# What a Stable Diffusion repo needs for streaming; skips root-level checkpoints, EMA and non-safetensors variants.
PIPELINE_PATTERNS = [
    "model_index.json",
    "*/config.json",
    "scheduler/*.json",
    "tokenizer/*",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
]
VAE_PATTERNS = ["config.json", "diffusion_pytorch_model.safetensors"]


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA to fuse at load: a file, folder or hub id, and its scale."""

    source: str
    scale: float = 1.0


@dataclass
class LoadedModel:
    """The modules of one loaded model, on their device and dtype, ready for a pipeline."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    schedule: NoiseSchedule
    device: torch.device
    dtype: torch.dtype
    model_id: str
    fingerprint: str  # identifies the weights (for engine cache keys)
    loras: tuple[LoraSpec, ...] = field(default_factory=tuple)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def vae_scale_factor(self) -> int:
        config = self.vae.config
        blocks = getattr(config, "block_out_channels", None) or getattr(config, "encoder_block_out_channels")
        return 2 ** (len(blocks) - 1)

    @property
    def text_hidden_size(self) -> int:
        return int(self.text_encoder.config.hidden_size)


def _hub_snapshot(repo_id: str, patterns: list[str], revision: str | None, what: str) -> Path:
    """A hub repo's local snapshot folder: the cache first, then a download unless offline."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True))
    except Exception as cached_error:  # noqa: BLE001 - any miss falls through to the download attempt
        logger.debug("%s %s not in the local cache: %s", what, repo_id, cached_error)
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ModelLoadError(
            f"{what} {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set, so it cannot be "
            f"downloaded. Download it once with network access (e.g. `huggingface-cli download {repo_id}`), or "
            f"pass a local folder or file path instead."
        )
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, etag_timeout=10))
    except Exception as error:  # noqa: BLE001 - reported with what was tried
        raise ModelLoadError(
            f"{what} {repo_id!r} is neither a local file or folder nor in the Hugging Face cache, and downloading "
            f"it failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). Check the id "
            f"and your network, log in with `huggingface-cli login` for gated models, or pass a local path."
        ) from error


def resolve_model_path(model: str, revision: str | None = None, cache_dir: Path | None = None) -> Path:
    """``tiny`` → the built-in model's folder; a path → itself; otherwise a hub id → its snapshot folder."""
    if model == TINY_NAME:
        return tiny_model_path(cache_dir)
    path = Path(model).expanduser()
    if path.exists():
        return path
    if model.count("/") == 1 and not model.startswith((".", "/", "~")) and not model.endswith(CHECKPOINT_SUFFIXES):
        return _hub_snapshot(model, PIPELINE_PATTERNS, revision, "model")
    raise ModelLoadError(
        f"model {model!r} is not an existing file or folder, not a Hugging Face hub id ('org/name') and not "
        f"'{TINY_NAME}'"
    )


def _folder_fingerprint(folder: Path) -> str:
    """A cheap identity of a weights folder or file: names, sizes and modification times of the weight files."""
    digest = hashlib.sha256()
    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    for p in files:
        stat = p.stat()
        digest.update(f"{p.relative_to(folder.parent)}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    return digest.hexdigest()[:16]


def load_vae(source: str | Path, dtype: torch.dtype, revision: str | None = None) -> torch.nn.Module:
    """A VAE from a folder or hub id; ``AutoencoderTiny`` or ``AutoencoderKL`` chosen by its config."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    source_str = str(source)
    path = Path(source_str).expanduser()
    if not path.exists():
        if source_str.count("/") != 1:
            raise ModelLoadError(f"VAE {source_str!r} is not an existing folder and not a hub id ('org/name')")
        path = _hub_snapshot(source_str, VAE_PATTERNS + [f"vae/{p}" for p in VAE_PATTERNS], revision, "VAE")
    if (path / "vae" / "config.json").is_file() and not (path / "config.json").is_file():
        path = path / "vae"
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"VAE folder {path} has no config.json")
    class_name = json.loads(config_file.read_text()).get("_class_name", "AutoencoderKL")
    cls = AutoencoderTiny if class_name == "AutoencoderTiny" else AutoencoderKL
    try:
        return cls.from_pretrained(path, torch_dtype=dtype).eval()
    except Exception as error:  # noqa: BLE001
        raise ModelLoadError(f"could not load the VAE from {path}: {error}") from error


def _load_folder(folder: Path, dtype: torch.dtype) -> dict[str, Any]:
    from diffusers import LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    missing = [c for c in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (folder / c).is_dir()]
    if missing:
        raise ModelLoadError(f"model folder {folder} lacks the diffusers component folder(s) {missing}")
    try:
        return {
            "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype).eval(),
            "vae": load_vae(folder / "vae", dtype),
            "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype).eval(),
            "tokenizer": CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
            "scheduler": LCMScheduler.from_pretrained(folder, subfolder="scheduler"),
        }
    except ModelLoadError:
        raise
    except Exception as error:  # noqa: BLE001
        raise ModelLoadError(f"could not load the diffusers folder {folder}: {type(error).__name__}: {error}") from error


def _load_single_file(path: Path, dtype: torch.dtype, config: str | None) -> dict[str, Any]:
    """A Stable Diffusion checkpoint in the original (LDM) layout; ``config`` names a diffusers folder or hub id."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    kwargs: dict[str, Any] = {"torch_dtype": dtype, "safety_checker": None, "requires_safety_checker": False}
    if config is not None:
        config_path = Path(config).expanduser()
        kwargs["config"] = str(config_path if config_path.exists() else config)
        kwargs["local_files_only"] = config_path.exists() or os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true")
    try:
        pipe = StableDiffusionPipeline.from_single_file(str(path), **kwargs)
    except Exception as error:  # noqa: BLE001
        raise ModelLoadError(
            f"could not load the checkpoint file {path}: {type(error).__name__}: {error}. Offline, pass "
            f"model_config= a diffusers folder (or cached hub id) of the same architecture."
        ) from error
    return {
        "unet": pipe.unet.eval(),
        "vae": pipe.vae.eval(),
        "text_encoder": pipe.text_encoder.eval(),
        "tokenizer": pipe.tokenizer,
        "scheduler": LCMScheduler.from_config(pipe.scheduler.config),
    }


def _fuse_loras(components: dict[str, Any], loras: Sequence[LoraSpec]) -> None:
    """Fuse each LoRA into the U-Net (and text encoder) weights with its scale, then drop the adapters."""
    from diffusers import StableDiffusionPipeline

    try:
        import peft  # noqa: F401
    except ImportError:
        from .errors import missing_extra

        raise missing_extra("peft", "lora") from None
    pipe = StableDiffusionPipeline(
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        tokenizer=components["tokenizer"],
        unet=components["unet"],
        scheduler=components["scheduler"],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    names = []
    for i, spec in enumerate(loras):
        name = f"lora{i}"
        source = Path(spec.source).expanduser()
        try:
            if source.is_file():
                pipe.load_lora_weights(str(source.parent), weight_name=source.name, adapter_name=name)
            else:
                pipe.load_lora_weights(spec.source, adapter_name=name)
        except Exception as error:  # noqa: BLE001
            raise ModelLoadError(f"could not load LoRA {spec.source!r}: {type(error).__name__}: {error}") from error
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[spec.scale for spec in loras])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()


def load_model(
    model: str = TINY_NAME,
    *,
    vae: str | None = None,
    loras: Sequence[LoraSpec | tuple[str, float] | str] = (),
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    revision: str | None = None,
    model_config: str | None = None,
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load a model for streaming.

    ``model``: ``"tiny"``, a local diffusers folder, a ``.safetensors``/``.ckpt`` file (original SD layout; give
    ``model_config`` offline), or a hub id such as ``"stabilityai/sd-turbo"``. ``vae``: replace the model's VAE, e.g.
    ``"madebyollin/taesd"``. ``loras``: fused at load with their scales. Next: build a
    :class:`~streamdiff.pipeline.StreamPipeline` on it.
    """
    lora_specs = tuple(
        spec if isinstance(spec, LoraSpec) else LoraSpec(spec) if isinstance(spec, str) else LoraSpec(*spec)
        for spec in loras
    )
    path = resolve_model_path(model, revision, cache_dir)
    if path.is_file():
        if not path.name.endswith(CHECKPOINT_SUFFIXES):
            raise ModelLoadError(f"model file {path} is not a {' or '.join(CHECKPOINT_SUFFIXES)} checkpoint")
        components = _load_single_file(path, torch.float32, model_config)
    else:
        components = _load_folder(path, torch.float32)
    if vae is not None:
        components["vae"] = load_vae(vae, torch.float32)
    if lora_specs:
        _fuse_loras(components, lora_specs)
    fingerprint_parts = [_folder_fingerprint(path), f"vae={vae}"]
    fingerprint_parts += [f"lora={s.source}:{s.scale}" for s in lora_specs]
    fingerprint = hashlib.sha256("|".join(fingerprint_parts).encode()).hexdigest()[:16]
    device = torch.device(device)
    for name in ("unet", "vae", "text_encoder"):
        components[name].to(device=device, dtype=dtype).requires_grad_(False)
    scheduler_config = components["scheduler"].config
    schedule = NoiseSchedule(
        alphas_cumprod=tuple(float(a) for a in components["scheduler"].alphas_cumprod),
        original_inference_steps=int(getattr(scheduler_config, "original_inference_steps", 50)),
        timestep_scaling=float(getattr(scheduler_config, "timestep_scaling", 10.0)),
    )
    logger.info("loaded model %s (%s, %s) from %s", model, device, dtype, path)
    return LoadedModel(
        unet=components["unet"],
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        tokenizer=components["tokenizer"],
        schedule=schedule,
        device=device,
        dtype=dtype,
        model_id=model,
        fingerprint=fingerprint,
        loras=lora_specs,
    )
