"""IP-Adapter (image prompt): loading onto a U-Net, and image embeddings computed once per reference image.

An IP-Adapter is diffusers' weight layout — a ``.safetensors`` file with ``image_proj.*`` (the image projection) and
``ip_adapter.*`` (the ``to_k_ip``/``to_v_ip`` weights of every cross-attention layer) — plus a CLIP image encoder
(``CLIPVisionModelWithProjection``, in an ``image_encoder/`` folder beside the file) and its image processor (the
folder's own ``preprocessor_config.json``, else diffusers' default ``CLIPImageProcessor`` at the encoder's size).
Offline only: a local folder or file, an :class:`IPAdapterWeights` object, or ``"tiny"`` (random weights from a seed,
for the built-in tiny models, built into the cache on first use like ``tiny-random``).

:func:`load_ip_adapter` puts :class:`~.ip_attention.RowScaledIPAttention` processors on the U-Net (a per-row scale:
see :mod:`.ip_attention`) and keeps the image projection beside it: the engine projects each reference image ONCE
(:class:`ImagePromptEncoder`, a bounded cache by pixel digest) and hands the tokens to the U-Net per row, so the
U-Net call itself never runs the image encoder or the projection. Plain IP-Adapters and the Plus/Full-face kinds
(penultimate hidden states) are supported; FaceID kinds (face embeddings and LoRAs) are refused.

Next: ``load_model(..., ip_adapter=...)``, then ``stream.set_reference_image(image)`` (docs/models.md).
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ReferenceImage
from ..errors import ModelLoadError
from .ip_attention import install_ip_attention, ip_layer_sizes

logger = logging.getLogger(__name__)

TINY_IP_ADAPTER_NAME = "tiny"
TINY_IP_ADAPTER_VERSION = 1
IP_ADAPTER_FILE = "ip-adapter.safetensors"  # the name the built-in one is saved under (and preferred in folders)
IMAGE_ENCODER_FOLDER = "image_encoder"
# The tiny CLIP image encoder of the built-in IP-Adapter.
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                   patch_size=8, projection_dim=32)


@dataclass
class IPAdapterWeights:
    """An IP-Adapter given as objects: ``state_dict`` ``{"image_proj": {...}, "ip_adapter": {...}}`` (diffusers'
    layout), the image encoder and, optionally, its image processor."""

    state_dict: dict[str, dict[str, torch.Tensor]]
    image_encoder: torch.nn.Module
    image_processor: Any = None
    name: str = "ip-adapter"


@dataclass
class IPAdapter:
    """A loaded IP-Adapter: what turns a reference image into the U-Net's per-row ``ip_tokens`` ``[1, N, D]``."""

    image_encoder: torch.nn.Module
    image_processor: Any
    image_proj: torch.nn.Module
    hidden_states: bool  # Plus/Full-face kinds: the encoder's penultimate hidden states, not its image embedding
    name: str
    fingerprint: str


def load_ip_adapter(
    source: str | Path | IPAdapterWeights,
    unet: torch.nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    cache_dir: Path | None = None,
) -> IPAdapter:
    """Load ``source`` and install its attention processors on ``unet`` (in place). Raises ModelLoadError."""
    if isinstance(source, IPAdapterWeights):
        weights = source
        fingerprint = hashlib.sha256(repr(sorted((k, tuple(v.shape), float(v.float().sum()))
                                                 for part in weights.state_dict.values()
                                                 for k, v in part.items())).encode()).hexdigest()[:16]
    else:
        if str(source) == TINY_IP_ADAPTER_NAME:
            source = tiny_ip_adapter_path(unet, cache_dir)
        path = _weights_file(Path(source))
        weights = _load_files(path)
        stat = path.stat()
        fingerprint = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    image_proj_state = weights.state_dict.get("image_proj")
    ip_state = weights.state_dict.get("ip_adapter")
    if not image_proj_state or not ip_state:
        raise ModelLoadError(f"IP-Adapter {weights.name}: needs 'image_proj' and 'ip_adapter' weights, got "
                             f"{sorted(weights.state_dict)}")
    if "proj.weight" not in image_proj_state and "latents" not in image_proj_state and \
            "proj.3.weight" not in image_proj_state:
        raise ModelLoadError(f"IP-Adapter {weights.name}: this kind (FaceID?) is not supported; supported: plain, "
                             "Plus and Full-face IP-Adapters")
    try:
        image_proj = unet._convert_ip_adapter_image_proj_to_diffusers(  # type: ignore[attr-defined]
            image_proj_state, low_cpu_mem_usage=False)
        install_ip_attention(unet, ip_state)
    except (KeyError, RuntimeError, ValueError) as error:
        raise ModelLoadError(f"IP-Adapter {weights.name} does not fit this U-Net: {error}") from error
    from diffusers.models.embeddings import ImageProjection

    encoder = weights.image_encoder.to(device, dtype).eval().requires_grad_(False)
    processor = weights.image_processor or default_image_processor(encoder)
    logger.info("loaded IP-Adapter %s (%d cross-attention layers)", weights.name,
                sum(size is not None for size in ip_layer_sizes(unet).values()))
    return IPAdapter(encoder, processor, image_proj.to(device, dtype).eval().requires_grad_(False),
                     not isinstance(image_proj, ImageProjection), weights.name, fingerprint)


def default_image_processor(image_encoder: torch.nn.Module) -> Any:
    """diffusers' default for an IP-Adapter without one: ``CLIPImageProcessor`` at the encoder's image size."""
    try:
        from transformers import CLIPImageProcessorPil as Processor  # the same class, without torchvision's warning
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    size = int(image_encoder.config.image_size)
    return Processor(size=size, crop_size=size)


def _weights_file(path: Path) -> Path:
    """The IP-Adapter's weight file: ``path`` itself, or the one ``.safetensors`` file in folder ``path`` (or its
    ``models/``), ``ip-adapter.safetensors`` when there are several."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise ModelLoadError(f"IP-Adapter {str(path)!r} is neither 'tiny', a local folder nor a .safetensors file "
                             "(IP-Adapters load offline only)")
    for folder in (path, path / "models"):
        files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
        if len(files) == 1:
            return files[0]
        preferred = [f for f in files if f.name == IP_ADAPTER_FILE]
        if preferred:
            return preferred[0]
        if files:
            raise ModelLoadError(f"IP-Adapter folder {folder} holds several weight files "
                                 f"{[f.name for f in files]}: name one of them")
    raise ModelLoadError(f"IP-Adapter folder {path} holds no .safetensors weights")


def _load_files(path: Path) -> IPAdapterWeights:
    """The weights of ``path`` (``image_proj.*``/``ip_adapter.*`` keys) and the image encoder beside it."""
    from safetensors.torch import load_file
    from transformers import CLIPVisionModelWithProjection

    if path.suffix != ".safetensors":
        raise ModelLoadError(f"IP-Adapter weights {path} must be a .safetensors file")
    state: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, tensor in load_file(str(path)).items():
        part, _, name = key.partition(".")
        if part in state:
            state[part][name] = tensor
    encoder_folder = path.parent / IMAGE_ENCODER_FOLDER
    if not (encoder_folder / "config.json").is_file():
        raise ModelLoadError(f"IP-Adapter {path}: no image encoder folder {encoder_folder} (a saved "
                             "CLIPVisionModelWithProjection)")
    encoder = CLIPVisionModelWithProjection.from_pretrained(str(encoder_folder), local_files_only=True)
    processor = None
    if (encoder_folder / "preprocessor_config.json").is_file():
        from transformers import CLIPImageProcessor

        processor = CLIPImageProcessor.from_pretrained(str(encoder_folder), local_files_only=True)
    return IPAdapterWeights(state, encoder, processor, name=str(path))


class ImagePromptEncoder:
    """Reference images → IP tokens ``[1, N, D]`` (image encoder + projection), caching the ``capacity`` newest.

    Runs on the engine's worker, when a stream's reference image changes, never per frame. :meth:`negative` is what
    diffusers' pipeline gives the unconditional rows of classifier-free guidance (the projection of a zero image
    embedding); :meth:`empty` is what rows without an image get (zeros, used with scale 0).
    """

    def __init__(self, adapter: IPAdapter, capacity: int = 8) -> None:
        self.adapter = adapter
        self.capacity = capacity
        self.encoder_calls = 0
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._negative: torch.Tensor | None = None

    @torch.inference_mode()
    def encode(self, image: ReferenceImage) -> torch.Tensor:
        cached = self._cache.get(image.digest)
        if cached is not None:
            self._cache.move_to_end(image.digest)
            return cached
        from PIL import Image

        pixels = self.adapter.image_processor(Image.fromarray(image.pixels), return_tensors="pt").pixel_values
        parameter = next(self.adapter.image_encoder.parameters())
        tokens = self._project(self._embed(pixels.to(parameter.device, parameter.dtype)))
        self.encoder_calls += 1
        self._cache[image.digest] = tokens
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return tokens

    @torch.inference_mode()
    def negative(self) -> torch.Tensor:
        if self._negative is None:
            parameter = next(self.adapter.image_encoder.parameters())
            size = int(self.adapter.image_encoder.config.image_size)
            if self.adapter.hidden_states:  # diffusers: the encoder's hidden states of a zero image
                embeds = self._embed(torch.zeros(1, 3, size, size, device=parameter.device, dtype=parameter.dtype))
            else:  # diffusers: a zero image embedding
                dim = int(self.adapter.image_encoder.config.projection_dim)
                embeds = torch.zeros(1, dim, device=parameter.device, dtype=parameter.dtype)
            self._negative = self._project(embeds)
        return self._negative

    def empty(self) -> torch.Tensor:
        return torch.zeros_like(self.negative())

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.adapter.hidden_states:
            return self.adapter.image_encoder(pixels, output_hidden_states=True).hidden_states[-2]
        return self.adapter.image_encoder(pixels).image_embeds  # [1, P]

    def _project(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.adapter.image_proj(embeds)  # [1, N, D]


def build_tiny_ip_adapter(unet: torch.nn.Module, seed: int = 0) -> IPAdapterWeights:
    """A random IP-Adapter for ``unet`` (each part seeded): a tiny CLIP image encoder (32 px), a plain image
    projection to 4 tokens, and ``to_k_ip``/``to_v_ip`` for every cross-attention layer."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_VISION)).eval()
    cross = int(unet.config.cross_attention_dim)  # type: ignore[attr-defined]
    generator = torch.Generator().manual_seed(seed + 1)
    dim = TINY_VISION["projection_dim"]
    image_proj = {
        "proj.weight": torch.randn(4 * cross, dim, generator=generator) / dim**0.5,
        "proj.bias": torch.randn(4 * cross, generator=generator) * 0.1,
        "norm.weight": 1.0 + 0.1 * torch.randn(cross, generator=generator),
        "norm.bias": 0.1 * torch.randn(cross, generator=generator),
    }
    ip: dict[str, torch.Tensor] = {}
    key_id = 1
    for size in ip_layer_sizes(unet).values():
        if size is None:
            continue
        hidden, cross_dim = size
        ip[f"{key_id}.to_k_ip.weight"] = torch.randn(hidden, cross_dim, generator=generator) / cross_dim**0.5
        ip[f"{key_id}.to_v_ip.weight"] = torch.randn(hidden, cross_dim, generator=generator) / cross_dim**0.5
        key_id += 2
    return IPAdapterWeights({"image_proj": image_proj, "ip_adapter": ip}, encoder, name=TINY_IP_ADAPTER_NAME)


def save_ip_adapter(weights: IPAdapterWeights, folder: Path) -> Path:
    """Save ``weights`` in the layout :func:`load_ip_adapter` (and diffusers' ``load_ip_adapter``) read: the
    ``ip-adapter.safetensors`` file and ``image_encoder/``. The folder."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    flat = {f"{part}.{key}": tensor.contiguous() for part, tensors in weights.state_dict.items()
            for key, tensor in tensors.items()}
    save_file(flat, str(folder / IP_ADAPTER_FILE))
    weights.image_encoder.save_pretrained(folder / IMAGE_ENCODER_FOLDER)  # type: ignore[attr-defined]
    if weights.image_processor is not None:
        weights.image_processor.save_pretrained(folder / IMAGE_ENCODER_FOLDER)
    return folder


def tiny_ip_adapter_path(unet: torch.nn.Module, cache_dir: Path | None = None, seed: int = 0) -> Path:
    """The folder of the built-in ``tiny`` IP-Adapter for ``unet``'s layout, built atomically on first use."""
    from .tiny import _cached_folder

    layout = hashlib.sha256(repr(sorted(ip_layer_sizes(unet).items())).encode()).hexdigest()[:8]
    name = f"tiny-ip-adapter-v{TINY_IP_ADAPTER_VERSION}-seed{seed}-{layout}"
    return _cached_folder(cache_dir, name, lambda staging: save_ip_adapter(build_tiny_ip_adapter(unet, seed), staging),
                          marker=IP_ADAPTER_FILE)
