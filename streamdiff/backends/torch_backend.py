"""The PyTorch backend: diffusers modules run eagerly (optionally channels-last, bfloat16 on the CPU).

Ahead-of-time compiled U-Nets (``EngineOptions.compile``) come from :mod:`streamdiff.backends.compiled`.
"""

from __future__ import annotations

import torch

from .base import unet_kwargs
from .onnx_export import VaeDecoder, VaeEncoder


class TorchUNet:
    """Wraps a diffusers ``UNet2DConditionModel`` as a :class:`~streamdiff.backends.base.UNetEngine`."""

    def __init__(self, unet: torch.nn.Module, channels_last: bool = False) -> None:
        self.unet = unet
        self.channels_last = channels_last
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
        **extras: torch.Tensor,
    ) -> torch.Tensor:
        if self.channels_last:
            sample = sample.contiguous(memory_format=torch.channels_last)
        out = self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False,
                        **unet_kwargs(extras))[0]
        return out.contiguous() if self.channels_last else out


class TorchControlNet:
    """Wraps a diffusers ``ControlNetModel`` (or a module called the same way) as a
    :class:`~streamdiff.backends.base.ControlNetEngine`: conditioning scale 1, no guess mode."""

    def __init__(self, controlnet: torch.nn.Module) -> None:
        self.controlnet = controlnet

    @torch.inference_mode()
    def __call__(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor, **extras: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                                    controlnet_cond=controlnet_cond, conditioning_scale=1.0, guess_mode=False,
                                    return_dict=False, **unet_kwargs(extras))
        return (*down, mid)


class TorchVae:
    """Wraps ``AutoencoderTiny`` or ``AutoencoderKL`` as a :class:`~streamdiff.backends.base.VaeEngine`.

    The KL encoder returns its distribution's mode (deterministic), not a sample. The same wrapper modules are
    exported to ONNX, so every backend computes the same function.
    """

    def __init__(self, vae: torch.nn.Module, channels_last: bool = False) -> None:
        self.vae = vae
        self.encoder = VaeEncoder(vae)
        self.decoder = VaeDecoder(vae)
        self.scaling_factor = self.encoder.scaling_factor
        self.shift_factor = self.encoder.shift_factor
        self.is_tiny = self.encoder.is_tiny
        self.channels_last = channels_last
        if channels_last:
            self.vae.to(memory_format=torch.channels_last)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(self._layout(images)).contiguous()

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(self._layout(latents)).contiguous()


def compiled_unet(unet: torch.nn.Module, channels_last: bool = True) -> TorchUNet:
    """An in-process ``torch.compile`` (inductor, weight freezing) of ``unet``: compiles on the first call.

    For benchmarks. Pipelines use ``EngineOptions(compile=True)``, which keeps the compiled result in the engine
    cache (AOTInductor) instead of paying the ~90 s compile of an SD-2.1 U-Net at every start.
    """
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # pre-packed weights: where bf16 on AMX gets its speed
    engine = TorchUNet(unet, channels_last=channels_last)
    engine.unet = torch.compile(unet)
    return engine


def compiled_vae(vae: torch.nn.Module, channels_last: bool = True) -> TorchVae:
    """An in-process ``torch.compile`` (inductor, weight freezing) of the VAE's encoder and decoder (benchmarks)."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    engine = TorchVae(vae, channels_last=channels_last)
    engine.encoder = torch.compile(engine.encoder)
    engine.decoder = torch.compile(engine.decoder)
    return engine
