"""The frame sizes an engine can run: the model's constraint ∩ the backend's ∩ the operator's list. Pure.

A size is refused before any stream runs it (:meth:`SizeRule.check`, called by ``StreamEngine.check_settings``),
never accepted and then failed in the model:

- **the model**: image sides are multiples of the VAE factor (8 for SD), and traced graphs need the latent to be
  divisible by the U-Net's down factor too (2^upsamplers: 8 for SD, 4 for the tiny model). diffusers' eager U-Net
  passes its skip connections' sizes to the upsamplers and runs any latent size; a traced or compiled graph
  (OpenVINO, ONNX Runtime, TensorRT, AOTInductor) has the ×2 upsampling baked in and fails in its skip concat.
- **the backend**: a multi-stream engine on a compiled backend is built once for the whole side range
  (``EngineOptions.min_resolution``/``max_resolution``, default 64–1024), so a client can never trigger a rebuild
  that stalls every stream; fixed-shape artifacts (AOTInductor) serve exactly the listed sizes.
- **the operator**: ``EngineConfig.sizes`` narrows it to a list; every listed size must itself be allowed.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..backends.keys import EngineOptions
from ..config import BackendKind
from ..errors import ConfigError
from ..models import LoadedModel
from .limits import EngineConfig

# Default side range of a multi-stream engine on a compiled backend (built once for all of it).
ENGINE_MIN_SIDE = 64
ENGINE_MAX_SIDE = 1024
# Widest side range any engine accepts (eager torch; a single stream's compiled engines are built for its size).
ANY_MAX_SIDE = 4096


@dataclass(frozen=True)
class SizeRule:
    """Frame sizes allowed: sides that are multiples of ``multiple`` in [``min_side``, ``max_side``], or, when
    ``sizes`` is set, exactly those (width, height) pairs. ``reason`` says where ``multiple`` comes from."""

    multiple: int
    min_side: int
    max_side: int
    sizes: tuple[tuple[int, int], ...] | None = None
    reason: str = ""

    def describe(self) -> str:
        """What is allowed, in words: ``multiples of 32 from 64 to 1024`` or ``256x256, 320x240``."""
        if self.sizes is not None:
            return ", ".join(f"{w}x{h}" for w, h in self.sizes)
        return f"multiples of {self.multiple} from {self.min_side} to {self.max_side}"

    def check(self, width: int, height: int) -> None:
        """Raise ConfigError (with ``field``, ``value``, ``allowed``) unless a ``width`` × ``height`` frame is allowed."""
        allowed = self.describe()
        if self.sizes is not None:
            if (width, height) not in self.sizes:
                raise ConfigError(f"size={width}x{height} is not one of this engine's sizes; allowed: {allowed}",
                                  field="size", value=f"{width}x{height}", allowed=allowed)
            return
        for name, value in (("width", width), ("height", height)):
            if value % self.multiple:
                why = f" ({self.reason})" if self.reason else ""
                raise ConfigError(f"{name}={value} is not a multiple of {self.multiple}{why}; allowed: {allowed}",
                                  field=name, value=value, allowed=allowed)
            if not self.min_side <= value <= self.max_side:
                raise ConfigError(f"{name}={value} is outside this engine's range [{self.min_side}, "
                                  f"{self.max_side}]; allowed: {allowed}", field=name, value=value, allowed=allowed)


def traced(backend: BackendKind, options: EngineOptions) -> bool:
    """True when ``backend`` runs a traced or compiled graph (everything but eager torch)."""
    return backend is not BackendKind.TORCH or options.compile


def fixed_shapes(backend: BackendKind, options: EngineOptions) -> bool:
    """True when the backend's artifacts are compiled for exact sizes (AOTInductor packages)."""
    return backend is BackendKind.TORCH and options.compile


def size_rule(model: LoadedModel, backend: BackendKind, options: EngineOptions, config: EngineConfig) -> SizeRule:
    """The sizes an engine of ``model`` on ``backend`` runs: model ∩ backend ∩ ``config.sizes``; see the module."""
    vae, down = model.vae_scale_factor, model.unet_down_factor
    name = f"the {model.model_id} model's"
    if traced(backend, options):
        multiple, reason = vae * down, f"{name} VAE factor {vae} × U-Net down factor {down}"
    else:
        multiple, reason = vae, f"{name} VAE factor {vae}"
    shared = config.max_streams > 1 and traced(backend, options)
    low = options.min_resolution or (ENGINE_MIN_SIDE if shared else multiple)
    high = options.max_resolution or (ENGINE_MAX_SIDE if shared else ANY_MAX_SIDE)
    low = -(-low // multiple) * multiple
    high = high // multiple * multiple
    if low > high:
        raise ConfigError(f"no frame size fits: sides must be multiples of {multiple} ({reason}) within "
                          f"[{options.min_resolution}, {options.max_resolution}]", field="max_resolution",
                          value=options.max_resolution, allowed=f"at least {low}")
    rule = SizeRule(multiple, low, high, None, reason)
    sizes = config.sizes
    if sizes is None and shared and fixed_shapes(backend, options):
        side = min(max(options.opt_resolution // multiple * multiple, low), high)
        sizes = ((side, side),)
    if sizes is None:
        return rule
    for width, height in sizes:
        try:
            rule.check(width, height)
        except ConfigError as error:
            raise ConfigError(f"sizes entry {width}x{height}: {error}", field="sizes", value=f"{width}x{height}",
                              allowed=rule.describe()) from None
    return SizeRule(multiple, low, high, tuple(sizes), reason)
