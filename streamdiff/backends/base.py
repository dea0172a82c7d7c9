"""The backend interface: a U-Net engine and a VAE engine."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class UNetEngine(Protocol):
    """Noise prediction: sample ``[B, C, h, w]``, timestep ``[B]`` (int64), hidden states ``[B, L, D]`` → ε."""

    def __call__(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
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
