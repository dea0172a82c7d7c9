"""ControlNets: loading (a diffusers ``ControlNetModel`` folder, a cached hub id, or the built-in ``tiny``) and the
control-image preprocessors (built in: ``canny`` with OpenCV and ``passthrough``; others registered as plugins).

An engine is built with named ControlNets (``StreamEngine.from_pretrained(..., controlnets={"canny": "ID_OR_PATH"})``);
a stream names the ones it uses in :class:`~streamdiff.config.ControlNetSpec`. The built-in ``tiny`` ControlNet
(random weights from a seed, ``ControlNetModel.from_unet`` of the tiny U-Net architecture, its zero convolutions
randomised so that it does something) fits both ``tiny`` and ``tiny-random`` and lets ``run``/``serve`` work offline.
Its SDXL twin (``ControlNetModel.from_unet`` of the ``tiny-sdxl`` U-Net architecture: ``addition_embed_type
"text_time"``, so it takes SDXL's added conditions) is what ``tiny`` means on an SDXL engine; ``tiny-sdxl`` names it
anywhere. A ControlNet must be of the engine's model family (SDXL ControlNets for SDXL models): others are refused.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..config import ControlNetSpec
from ..errors import ConfigError, ModelLoadError
from .hub import hub_snapshot, is_hub_id
from .sdxl import TINY_SDXL_NAME, TINY_SDXL_UNET, is_sdxl_unet
from .tiny import TINY_NAME, TINY_RANDOM_NAME, TINY_SEED, TINY_UNET, _cached_folder

CONTROLNET_PATTERNS = ["config.json", "diffusion_pytorch_model.safetensors"]
TINY_CONTROLNET_VERSION = 1
TINY_SDXL_CONTROLNET_VERSION = 1
TINY_CONTROLNET = dict(conditioning_embedding_out_channels=(8, 16, 16, 32))  # 3 downsamplings: the VAE's factor 8

# A preprocessor: (the input frame uint8 [H, W, 3] RGB at the stream's size, the spec) → uint8 [H, W, 3].
Preprocessor = Callable[[np.ndarray, ControlNetSpec], np.ndarray]
PASSTHROUGH = "passthrough"


def check_name(name: Any) -> str:
    """``name`` if it can name a ControlNet an engine offers (letters, digits, ``-_.``), else ConfigError."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        raise ConfigError(f"controlnet name {name!r} must be 1-64 letters, digits, '-', '_' or '.'",
                          field="controlnets", value=name, allowed="e.g. canny, depth")
    return name


def canny(frame: np.ndarray, spec: ControlNetSpec) -> np.ndarray:
    """OpenCV's Canny edges of ``frame`` with the spec's thresholds, as a 3-channel image (as diffusers' examples)."""
    try:
        import cv2
    except ImportError:  # pragma: no cover - a dependency of the package
        raise ConfigError("the canny preprocessor needs OpenCV: pip install opencv-python-headless") from None
    edges = cv2.Canny(np.ascontiguousarray(frame), spec.low_threshold, spec.high_threshold)  # [H, W] uint8
    return np.repeat(edges[:, :, None], 3, axis=2)


def depth_estimator(model: Any, device: str = "cpu") -> Preprocessor:
    """A plugin preprocessor (``StreamEngine(..., preprocessors={"depth": depth_estimator(...)})``): a transformers
    depth-estimation model — a folder, a hub id in the local cache, or a ready ``pipeline("depth-estimation")`` —
    whose depth map, as a 3-channel image, is the control image (as diffusers' depth ControlNet examples make it).

    It runs where Canny runs, on the submitting thread; one lock serialises the model's calls across streams.
    """
    import threading

    from PIL import Image

    if isinstance(model, (str, Path)):
        try:
            from transformers import pipeline
        except ImportError:  # pragma: no cover - a dependency of the package
            raise ConfigError("depth_estimator needs transformers: pip install transformers") from None
        try:
            model = pipeline("depth-estimation", model=str(model), device=device)
        except Exception as error:  # noqa: BLE001 - reported with the source
            raise ModelLoadError(f"depth-estimation model {str(model)!r} did not load: {type(error).__name__}: "
                                 f"{error}") from error
    lock = threading.Lock()

    def depth(frame: np.ndarray, spec: ControlNetSpec) -> np.ndarray:
        with lock:
            image = model(Image.fromarray(frame))["depth"]  # PIL, mode L
        height, width = frame.shape[:2]
        if image.size != (width, height):
            image = image.resize((width, height), Image.BICUBIC)
        values = np.asarray(image.convert("L"), dtype=np.uint8)
        return np.repeat(values[:, :, None], 3, axis=2)

    return depth


def builtin_preprocessors() -> dict[str, Preprocessor | None]:
    """The built-in preprocessors by name; ``passthrough`` (None) takes the client's control image as is."""
    return {"canny": canny, PASSTHROUGH: None}


def build_tiny_controlnet(seed: int = TINY_SEED, sdxl: bool = False) -> torch.nn.Module:
    """The built-in tiny ControlNet: the tiny U-Net architecture's ControlNet (``sdxl``: the ``tiny-sdxl`` U-Net's,
    which takes SDXL's added conditions), every weight random from ``seed``."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(seed + 10)
    unet = UNet2DConditionModel(**(TINY_SDXL_UNET if sdxl else TINY_UNET))
    controlnet = ControlNetModel.from_unet(unet, **TINY_CONTROLNET)
    generator = torch.Generator().manual_seed(seed + 11)
    with torch.no_grad():  # the zero convolutions would make every residual zero
        for name, param in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding")):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return controlnet.eval()


def tiny_controlnet_path(cache_dir: Path | None = None, seed: int = TINY_SEED, sdxl: bool = False) -> Path:
    """The folder of the built-in tiny ControlNet (``sdxl``: its SDXL twin), built atomically on first use."""

    def build(staging: Path) -> None:
        build_tiny_controlnet(seed, sdxl).save_pretrained(staging)
        (staging / "model_index.json").write_text("{}")  # the cache's completeness marker

    name = (f"tiny-sdxl-controlnet-v{TINY_SDXL_CONTROLNET_VERSION}" if sdxl
            else f"tiny-controlnet-v{TINY_CONTROLNET_VERSION}")
    return _cached_folder(cache_dir, f"{name}-seed{seed}", build)


def check_family(name: str, controlnet: torch.nn.Module, sdxl: bool) -> torch.nn.Module:
    """``controlnet`` if it is of the engine's model family (SDXL: takes the added conditions), else ConfigError.
    A module without a diffusers config (a wrapper) is taken as it is."""
    family = "SDXL" if sdxl else "SD 1.x/2.x"
    if getattr(controlnet, "config", None) is not None and is_sdxl_unet(controlnet) != sdxl:
        kind = "an SDXL ControlNet (addition_embed_type 'text_time')" if not sdxl else "not an SDXL ControlNet"
        raise ConfigError(f"controlnet {name!r} is {kind} but the engine's model is {family}",
                          field="controlnets", value=name, allowed=f"{family} ControlNets")
    return controlnet


def load_controlnet(source: Any, device: torch.device, dtype: torch.dtype, revision: str | None = None,
                    sdxl: bool = False) -> torch.nn.Module:
    """A ``ControlNetModel`` on ``device``/``dtype`` from a model, ``tiny``, a folder or a hub id (cache first).

    ``sdxl``: for an SDXL model (``tiny`` is then the tiny SDXL ControlNet; ``tiny-sdxl`` is that one anyway)."""
    from diffusers import ControlNetModel

    if isinstance(source, torch.nn.Module):
        first = next(source.parameters())
        if first.dtype != dtype:
            source = source.to(dtype=dtype)
        return source.to(device).eval()
    if not isinstance(source, (str, Path)) or not str(source):
        raise ConfigError(f"controlnet source {source!r} must be a ControlNetModel, a folder, a hub id or 'tiny'")
    if str(source) in (TINY_NAME, TINY_RANDOM_NAME, TINY_SDXL_NAME):
        folder = tiny_controlnet_path(sdxl=sdxl or str(source) == TINY_SDXL_NAME)
    elif Path(source).expanduser().exists():
        folder = Path(source).expanduser()
    elif is_hub_id(str(source)):
        folder = hub_snapshot(str(source), CONTROLNET_PATTERNS, revision, "controlnet")
    else:
        raise ModelLoadError(f"controlnet {source!r} is neither a folder nor a hub id (org/name) nor 'tiny' "
                             "(or 'tiny-sdxl')")
    try:
        model = ControlNetModel.from_pretrained(folder, torch_dtype=dtype)
    except Exception as error:  # noqa: BLE001 - reported with the source
        raise ModelLoadError(f"controlnet {source!r} ({folder}) did not load: {type(error).__name__}: "
                             f"{error}") from error
    return model.to(device).eval()
