"""The PyTorch backend: diffusers modules run eagerly (optionally channels-last)."""

from __future__ import annotations

import torch


class TorchUNet:
    """Wraps a diffusers ``UNet2DConditionModel`` as a :class:`~streamdiff.backends.base.UNetEngine`."""

    def __init__(self, unet: torch.nn.Module, channels_last: bool = False) -> None:
        self.unet = unet
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class TorchVae:
    """Wraps ``AutoencoderTiny`` or ``AutoencoderKL`` as a :class:`~streamdiff.backends.base.VaeEngine`.

    The KL encoder returns its distribution's mode (deterministic), not a sample.
    """

    def __init__(self, vae: torch.nn.Module) -> None:
        self.vae = vae
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", 1.0))
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.is_tiny = type(vae).__name__ == "AutoencoderTiny"

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        out = self.vae.encode(images, return_dict=False)[0]
        latents = out if self.is_tiny else out.mode()
        return (latents - self.shift_factor) * self.scaling_factor

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scaling_factor + self.shift_factor, return_dict=False)[0]
