"""Model loading: hub id, local diffusers folder, single checkpoint file, or the built-in ``tiny`` model.

Everything becomes a :class:`LoadedModel`: the U-Net, the VAE (the model's own ``AutoencoderKL`` or a tiny
``AutoencoderTiny`` given with ``vae=``), the text encoder and tokenizer, and the model's noise schedule. LoRAs (the
LCM-LoRA among them) are fused into the weights at load, in float32, each with its own scale; the fused model has no
adapter layers left. Weights are loaded directly in the target dtype (float32 on the CPU by default, bfloat16 on the
CPU as an option, float16 on CUDA; the device and dtype are resolved in :mod:`streamdiff.backends.device`).

Example, SD 1.5 with the LCM-LoRA and the TAESD autoencoder::

    model = load_model("stable-diffusion-v1-5/stable-diffusion-v1-5", vae="madebyollin/taesd",
                       loras=[("latent-consistency/lcm-lora-sdv1-5", 1.0)])

Next: build a :class:`~streamdiff.pipeline.StreamPipeline` on it. See docs/models.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .checkpoints import CHECKPOINT_SUFFIXES, load_single_file
from ..config import check_number
from ..errors import ConfigError, ModelLoadError
from .hub import hub_snapshot, is_hub_id
from ..core.schedule import NoiseSchedule, PredictionType
from .sdxl import (
    SDXL_PARTS, TINY_SDXL_NAME, SdxlConditions, is_sdxl_folder, is_sdxl_unet, load_sdxl_parts, sdxl_conditions,
    tiny_sdxl_model_path,
)
from .tiny import TINY_NAME, TINY_RANDOM_NAME, tiny_model_path, tiny_random_model_path
from .ip_adapter import IPAdapter, IPAdapterWeights, load_ip_adapter

logger = logging.getLogger(__name__)

# What a Stable Diffusion repo needs for streaming; skips root-level checkpoints, EMA and non-safetensors variants.
PIPELINE_PATTERNS = [
    "model_index.json",
    "*/config.json",
    "scheduler/*.json",
    "tokenizer/*",
    "tokenizer_2/*",  # SDXL
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder_2/model.safetensors",  # SDXL
]
VAE_PATTERNS = ["config.json", "diffusion_pytorch_model.safetensors"]
LORA_PATTERNS = ["*.safetensors"]
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA to fuse at load: a ``.safetensors`` file, a folder holding one, or a hub id; and its scale."""

    source: str
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise ConfigError(f"LoRA source {self.source!r} must be a non-empty path or hub id")
        object.__setattr__(self, "scale", check_number(f"LoRA {self.source!r} scale", self.scale))


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
    fingerprint: str  # identifies the weights: model, VAE and LoRAs with their scales (for engine cache keys)
    loras: tuple[LoraSpec, ...] = field(default_factory=tuple)
    ip_adapter: IPAdapter | None = None  # an image-prompt adapter installed on the U-Net (see .ip_adapter)
    # SDXL: the second text encoder (CLIPTextModelWithProjection) and tokenizer, and the added-condition settings
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: Any = None
    sdxl: SdxlConditions | None = None

    @property
    def unet_extras(self) -> tuple[str, ...]:
        """The extra conditioning inputs the U-Net takes in every call (see ``backends.base.UNET_EXTRAS``)."""
        return ("text_embeds", "time_ids") if self.sdxl is not None else ()

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def vae_scale_factor(self) -> int:
        config = self.vae.config
        blocks = getattr(config, "block_out_channels", None) or getattr(config, "encoder_block_out_channels")
        return 2 ** (len(blocks) - 1)

    @property
    def unet_down_factor(self) -> int:
        """How much the U-Net shrinks a latent: 2^(its upsamplers). Traced graphs need latent sides divisible by it.

        diffusers' eager U-Net also runs other sizes (it passes the skip connections' sizes to its upsamplers);
        a traced or compiled graph has the ×2 upsampling baked in, and its skip concatenation fails.
        """
        return unet_down_factor(self.unet)

    @property
    def text_hidden_size(self) -> int:
        """The width D of the encoder hidden states (SDXL: both encoders' widths together)."""
        size = int(self.text_encoder.config.hidden_size)
        if self.text_encoder_2 is not None:
            size += int(self.text_encoder_2.config.hidden_size)
        return size

    @property
    def pooled_size(self) -> int:
        """SDXL: the width of the pooled text embedding ``text_embeds`` (encoder 2's projection); 0 otherwise."""
        return int(self.text_encoder_2.config.projection_dim) if self.text_encoder_2 is not None else 0


def unet_down_factor(unet: torch.nn.Module) -> int:
    """2^(the U-Net's upsamplers): how much it shrinks a latent (see :attr:`LoadedModel.unet_down_factor`)."""
    upsamplers = getattr(unet, "num_upsamplers", None)
    if upsamplers is None:
        upsamplers = len(unet.config.block_out_channels) - 1
    return 2 ** int(upsamplers)


def resolve_model_path(model: str, revision: str | None = None, cache_dir: Path | None = None) -> Path:
    """``tiny`` / ``tiny-random`` / ``tiny-sdxl`` → a built-in model's folder; a path → itself; otherwise a hub id →
    its snapshot."""
    if model == TINY_NAME:
        return tiny_model_path(cache_dir)
    if model == TINY_RANDOM_NAME:
        return tiny_random_model_path(cache_dir)
    if model == TINY_SDXL_NAME:
        return tiny_sdxl_model_path(cache_dir)
    path = Path(model).expanduser()
    if path.exists():
        return path
    if is_hub_id(model):
        return hub_snapshot(model, PIPELINE_PATTERNS, revision, "model")
    raise ModelLoadError(
        f"model {model!r} is not an existing file or folder, not a Hugging Face hub id ('org/name') and not "
        f"{TINY_NAME!r}, {TINY_RANDOM_NAME!r} or {TINY_SDXL_NAME!r}"
    )


def _fingerprint(path: Path) -> str:
    """A cheap identity of a weights folder or file: names, sizes and modification times of its files."""
    digest = hashlib.sha256(str(path.resolve()).encode())
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        stat = p.stat()
        digest.update(f"{p.relative_to(path.parent)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _local_or_hub(source: str, patterns: list[str], revision: str | None, what: str) -> Path:
    path = Path(source).expanduser()
    if path.exists():
        return path
    if is_hub_id(source):
        return hub_snapshot(source, patterns, revision, what)
    raise ModelLoadError(f"{what} {source!r} is not an existing file or folder and not a hub id ('org/name')")


def load_vae(source: str | Path, dtype: torch.dtype = torch.float32, revision: str | None = None) -> torch.nn.Module:
    """A VAE from a folder or hub id: ``AutoencoderTiny`` or ``AutoencoderKL``, chosen by its config's ``_class_name``.

    A model folder with a ``vae/`` subfolder works too. Loaded directly in ``dtype``.
    """
    from diffusers import AutoencoderKL, AutoencoderTiny

    path = _local_or_hub(str(source), VAE_PATTERNS + [f"vae/{p}" for p in VAE_PATTERNS], revision, "VAE")
    if (path / "vae" / "config.json").is_file() and not (path / "config.json").is_file():
        path = path / "vae"
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"VAE {str(source)!r}: folder {path} has no config.json (a diffusers VAE folder has one)")
    class_name = json.loads(config_file.read_text(encoding="utf-8")).get("_class_name", "AutoencoderKL")
    classes = {"AutoencoderTiny": AutoencoderTiny, "AutoencoderKL": AutoencoderKL}
    if class_name not in classes:
        raise ModelLoadError(f"VAE {str(source)!r} is a {class_name}; supported are {sorted(classes)}")
    try:
        return classes[class_name].from_pretrained(path, torch_dtype=dtype).eval()
    except Exception as error:  # noqa: BLE001
        raise ModelLoadError(f"could not load the VAE from {path}: {type(error).__name__}: {error}") from error


def _load_folder(folder: Path, dtype: torch.dtype) -> dict[str, Any]:
    from diffusers import LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    missing = [c for c in COMPONENTS if not (folder / c).is_dir()]
    if missing:
        raise ModelLoadError(f"model folder {folder} lacks the diffusers component folder(s) {missing}")
    sdxl = is_sdxl_folder(folder)
    missing = [c for c in SDXL_PARTS if sdxl and not (folder / c).is_dir()]
    if missing:
        raise ModelLoadError(f"SDXL model folder {folder} lacks the diffusers component folder(s) {missing}")
    try:
        components = {
            "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype).eval(),
            "vae": load_vae(folder / "vae", dtype),
            "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=dtype).eval(),
            "tokenizer": CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
            "scheduler": LCMScheduler.from_pretrained(folder, subfolder="scheduler"),
        }
        if sdxl:
            components.update(load_sdxl_parts(folder, dtype), sdxl=sdxl_conditions(folder))
        return components
    except ModelLoadError:
        raise
    except Exception as error:  # noqa: BLE001
        raise ModelLoadError(f"could not load the diffusers folder {folder}: {type(error).__name__}: {error}") from error


def _fuse_loras(components: dict[str, Any], loras: Sequence[LoraSpec], revision: str | None) -> list[str]:
    """Fuse each LoRA into the U-Net (and text encoder) weights with its scale, then drop the adapters.

    Returns a fingerprint part per LoRA. Works on float32 weights: fusing in half precision would round twice.
    """
    from diffusers import LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    try:
        import peft  # noqa: F401
    except ImportError:
        from ..errors import missing_extra

        raise missing_extra("peft", "lora") from None
    paths = [_local_or_hub(spec.source, LORA_PATTERNS, revision, "LoRA") for spec in loras]  # fail before work
    if components.get("text_encoder_2") is not None:  # SDXL (e.g. latent-consistency/lcm-lora-sdxl)
        pipe = StableDiffusionXLPipeline(
            vae=components["vae"], text_encoder=components["text_encoder"], tokenizer=components["tokenizer"],
            text_encoder_2=components["text_encoder_2"], tokenizer_2=components["tokenizer_2"],
            unet=components["unet"], scheduler=LCMScheduler(steps_offset=1),
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=components["vae"], text_encoder=components["text_encoder"], tokenizer=components["tokenizer"],
            unet=components["unet"], scheduler=LCMScheduler(steps_offset=1),  # a stand-in the pipeline leaves alone
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    names, parts = [], []
    for i, (spec, path) in enumerate(zip(loras, paths)):
        name = f"lora{i}"
        try:
            if path.is_file():
                pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
            else:
                pipe.load_lora_weights(str(path), adapter_name=name)
        except Exception as error:  # noqa: BLE001
            raise ModelLoadError(f"could not load LoRA {spec.source!r}: {type(error).__name__}: {error}") from error
        names.append(name)
        parts.append(f"lora={_fingerprint(path)}:{spec.scale!r}")
    pipe.set_adapters(names, adapter_weights=[float(spec.scale) for spec in loras])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()
    return parts


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast parameters and buffers to ``dtype`` in place (once, after fusing LoRAs in float32).

    ``torch.nn.Module.to`` directly: diffusers' own ``to`` warns on every dtype cast, and none of the models used
    here (U-Net, AutoencoderKL/Tiny, CLIP) keep modules in float32.
    """
    if getattr(module, "_keep_in_fp32_modules", None):
        raise ModelLoadError(f"{type(module).__name__} keeps modules in float32 and cannot be cast to {dtype}")
    torch.nn.Module.to(module, dtype=dtype)


def model_from_components(
    components: dict[str, Any],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    model_id: str = "in-memory",
    fingerprint: str | None = None,
    loras: tuple[LoraSpec, ...] = (),
) -> LoadedModel:
    """A :class:`LoadedModel` from modules in memory (``unet``, ``vae``, ``text_encoder``, ``tokenizer`` and
    ``scheduler``: a scheduler object or its config dict). Casts to ``dtype`` only what is not in it already.

    SDXL (a U-Net with ``addition_embed_type="text_time"``) also needs ``text_encoder_2`` and ``tokenizer_2``;
    ``sdxl`` (a :class:`~streamdiff.models.sdxl.SdxlConditions`) defaults to diffusers' defaults."""
    missing = [c for c in COMPONENTS if c not in components]
    if missing:
        raise ModelLoadError(f"components {missing} are missing (need {list(COMPONENTS)})")
    sdxl = is_sdxl_unet(components["unet"])
    if sdxl:
        missing = [c for c in SDXL_PARTS if components.get(c) is None]
        if missing:
            raise ModelLoadError(f"the U-Net is an SDXL U-Net (addition_embed_type 'text_time'); components {missing} "
                                 f"are missing (need {list(COMPONENTS + SDXL_PARTS)})")
    elif components.get("text_encoder_2") is not None:
        raise ModelLoadError("a text_encoder_2 was given, but the U-Net is not an SDXL U-Net (addition_embed_type "
                             f"{getattr(components['unet'].config, 'addition_embed_type', None)!r}, not 'text_time')")
    dtype = dtype or components["unet"].dtype
    device = torch.device(device)
    names = ("unet", "vae", "text_encoder", "text_encoder_2") if sdxl else ("unet", "vae", "text_encoder")
    modules = {name: components[name] for name in names}
    for module in modules.values():
        if any(p.dtype != dtype for p in module.parameters()):
            _cast(module, dtype)
        if any(p.device != device for p in module.parameters()):
            module.to(device)
        module.eval().requires_grad_(False)
    scheduler = components["scheduler"]
    config = dict(scheduler if isinstance(scheduler, dict) else scheduler.config)
    schedule = _schedule(config)
    return LoadedModel(
        unet=modules["unet"], vae=modules["vae"], text_encoder=modules["text_encoder"],
        tokenizer=components["tokenizer"], schedule=schedule, device=device, dtype=dtype, model_id=model_id,
        fingerprint=fingerprint or "in-memory", loras=loras, text_encoder_2=modules.get("text_encoder_2"),
        tokenizer_2=components.get("tokenizer_2") if sdxl else None,
        sdxl=(components.get("sdxl") or SdxlConditions()) if sdxl else None,
    )


def _schedule(config: dict[str, Any]) -> NoiseSchedule:
    """The model's training noise schedule, read through diffusers' LCM scheduler (any SD scheduler config works)."""
    from diffusers import LCMScheduler

    kind = str(config.get("prediction_type", PredictionType.EPSILON.value))
    try:
        prediction_type = PredictionType(kind)
    except ValueError:
        allowed = ", ".join(repr(p.value) for p in PredictionType)
        raise ModelLoadError(
            f"the model's scheduler has prediction_type={kind!r}; streamdiff supports {allowed}"
        ) from None
    scheduler = LCMScheduler.from_config(config)
    return NoiseSchedule(
        alphas_cumprod=tuple(float(a) for a in scheduler.alphas_cumprod),
        original_inference_steps=int(scheduler.config.original_inference_steps),
        timestep_scaling=float(scheduler.config.timestep_scaling),
        prediction_type=prediction_type,
    )


def _lora_specs(loras: Sequence[LoraSpec | tuple[str, float] | str]) -> tuple[LoraSpec, ...]:
    specs = []
    for spec in loras:
        if isinstance(spec, LoraSpec):
            specs.append(spec)
        elif isinstance(spec, str):
            specs.append(LoraSpec(spec))
        elif isinstance(spec, (tuple, list)) and len(spec) == 2:
            specs.append(LoraSpec(str(spec[0]), spec[1]))
        else:
            raise ConfigError(f"LoRA {spec!r} must be a LoraSpec, a path/hub id, or a (source, scale) pair")
    return tuple(specs)


def load_model(
    model: str = TINY_NAME,
    *,
    vae: str | None = None,
    loras: Sequence[LoraSpec | tuple[str, float] | str] = (),
    dtype: torch.dtype | str | None = torch.float32,
    device: torch.device | str = "cpu",
    revision: str | None = None,
    model_config: str | None = None,
    cache_dir: Path | None = None,
    ip_adapter: str | Path | IPAdapterWeights | None = None,
) -> LoadedModel:
    """Load a model for streaming.

    ``model``: ``"tiny"`` (trained, built in), ``"tiny-random"`` (random weights, for tests), ``"tiny-sdxl"`` (an
    SDXL-architecture model with random weights), a local diffusers folder, a ``.safetensors``/``.ckpt`` file in the
    original SD 1.x/2.x or SDXL layout (``model_config`` names a diffusers folder or cached hub id of the same
    architecture; needed offline unless the family's reference configs are cached), or a hub
    id such as ``"stabilityai/sd-turbo"``. ``vae``: replace the model's VAE, e.g. ``"madebyollin/taesd"``.
    ``loras``: fused at load, each ``(source, scale)``, e.g. ``("latent-consistency/lcm-lora-sdv1-5", 1.0)``.
    ``ip_adapter``: an IP-Adapter (image prompt) installed on the U-Net: ``"tiny"`` (built in, for the tiny models),
    a local folder or ``.safetensors`` file with an ``image_encoder/`` beside it, or :class:`.IPAdapterWeights`.
    ``device``: ``"cpu"``, ``"cuda"``, ``"auto"`` … (:func:`streamdiff.backends.device.resolve_device`); ``dtype``: a
    torch dtype, a precision name, or None for the device's default (:func:`~streamdiff.backends.device.resolve_dtype`).
    Next: open streams on a :class:`~streamdiff.engine.StreamEngine` (or a :class:`~streamdiff.pipeline.StreamPipeline`).
    """
    from ..backends.device import resolve_device, resolve_dtype

    device = resolve_device(device)
    if not isinstance(dtype, torch.dtype):
        dtype = resolve_dtype(dtype, device)
    lora_specs = _lora_specs(loras)
    load_dtype = torch.float32 if lora_specs else dtype  # LoRAs are fused in float32, then cast once
    path = resolve_model_path(model, revision, cache_dir)
    if path.is_file():
        if not path.name.endswith(CHECKPOINT_SUFFIXES):
            raise ModelLoadError(f"model file {path} is not a {' or '.join(CHECKPOINT_SUFFIXES)} checkpoint")
        components = load_single_file(path, load_dtype, model_config, revision)
    else:
        components = _load_folder(path, load_dtype)
    parts = [_fingerprint(path), f"config={model_config}" if path.is_file() else ""]
    if vae is not None:
        components["vae"] = load_vae(vae, dtype, revision)
        parts.append(f"vae={_fingerprint(_local_or_hub(vae, VAE_PATTERNS, revision, 'VAE'))}")
    if lora_specs:
        parts += _fuse_loras(components, lora_specs, revision)
    fingerprint = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
    loaded = model_from_components(
        components, dtype=dtype, device=device, model_id=model, fingerprint=fingerprint, loras=lora_specs
    )
    if ip_adapter is not None:
        loaded.ip_adapter = load_ip_adapter(ip_adapter, loaded.unet, loaded.device, loaded.dtype, cache_dir)
    logger.info("loaded model %s (%s, %s) from %s", model, loaded.device, dtype, path)
    return loaded
