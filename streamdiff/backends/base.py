"""The backend interface: a U-Net engine and a VAE engine."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


# The per-row extra inputs a U-Net engine may take besides sample, timestep and hidden states, by name; each has the
# batch as dimension 0. An engine that cannot take one of them is refused when a stream is opened, never mid-stream.
UNET_EXTRAS = {
    "text_embeds": "SDXL: the pooled text embedding [B, D_pool] (added condition)",
    "time_ids": "SDXL: original size, crop and target size [B, 6] (added condition)",
    "mid_residual": "ControlNet: the residual added to the mid block's output [B, C, h', w']",
    "ip_tokens": "IP-Adapter: the image prompt's projected tokens [B, N, D] (zeros in rows without one)",
    "ip_scale": "IP-Adapter: each row's image-prompt scale [B] (0 in rows without one)",
    # "down_residual_0", "down_residual_1", …: ControlNet residuals added to the down blocks' outputs, in order
}
RESIDUAL_PREFIX = "down_residual_"  # + the down-block residual's index
MID_RESIDUAL = "mid_residual"


def extra_names(extras: dict[str, torch.Tensor]) -> tuple[str, ...]:
    """The extras' names, down-block residuals in block order."""
    return tuple(sorted(extras, key=lambda name: (not name.startswith(RESIDUAL_PREFIX),
                                                  int(name.rsplit("_", 1)[1]) if name.startswith(RESIDUAL_PREFIX)
                                                  else 0, name)))


def unet_kwargs(extras: dict[str, torch.Tensor]) -> dict[str, object]:
    """A diffusers ``UNet2DConditionModel``'s keyword arguments for the named extras (see :data:`UNET_EXTRAS`)."""
    kwargs: dict[str, object] = {}
    added = {name: extras[name] for name in ("text_embeds", "time_ids") if name in extras}
    if added:
        kwargs["added_cond_kwargs"] = added
    downs = [name for name in extra_names(extras) if name.startswith(RESIDUAL_PREFIX)]
    if downs:
        kwargs["down_block_additional_residuals"] = tuple(extras[name] for name in downs)
    if MID_RESIDUAL in extras:
        kwargs["mid_block_additional_residual"] = extras[MID_RESIDUAL]
    ip = {name: extras[name] for name in ("ip_tokens", "ip_scale") if name in extras}
    if ip:  # read by streamdiff.models.ip_attention's processors, which diffusers hands these to
        kwargs["cross_attention_kwargs"] = ip
    unknown = set(extras) - set(added) - set(downs) - {MID_RESIDUAL} - set(ip)
    if unknown:
        raise TypeError(f"unknown U-Net extra inputs {sorted(unknown)}")
    return kwargs


@runtime_checkable
class ControlNetEngine(Protocol):
    """A ControlNet at conditioning scale 1: sample ``[B, C, h, w]``, timestep ``[B]``, hidden states ``[B, L, D]``,
    control image ``[B, 3, H, W]`` in [0, 1] and, for SDXL, the ``text_embeds``/``time_ids`` extras → its residuals
    (down blocks' in order, then the mid block's), each ``[B, C_i, h_i, w_i]``, as
    :func:`~.unet_inputs.controlnet_residual_inputs` names them."""

    def __call__(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor, **extras: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]: ...


@runtime_checkable
class UNetEngine(Protocol):
    """Noise prediction: sample ``[B, C, h, w]``, timestep ``[B]`` (int64), hidden states ``[B, L, D]`` and the
    per-row ``extras`` of :data:`UNET_EXTRAS` → the prediction ``[B, C, h, w]``."""

    def __call__(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
        **extras: torch.Tensor,
    ) -> torch.Tensor: ...


@runtime_checkable
class VaeEngine(Protocol):
    """Images in [-1, 1] ``[B, 3, H, W]`` ↔ scaled latents ``[B, C, H/s, W/s]`` (already × scaling_factor)."""

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Recoverable(Protocol):
    """An engine (U-Net or VAE) with per-shape state that a failed call can leave broken.

    ``recover()`` restores it; the multi-stream engine calls it after any failed call, before the next call or
    retry. A no-op when the last call succeeded. Engines without such state (eager torch) need not have it.
    """

    def recover(self) -> None: ...


def recover(engine: object) -> None:
    """``engine.recover()`` when the engine has one (see :class:`Recoverable`)."""
    if isinstance(engine, Recoverable):
        engine.recover()
