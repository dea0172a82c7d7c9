"""Fake noise predictors for tests: an analytic U-Net and a call-counting wrapper."""

from __future__ import annotations

from typing import Any

import torch


class AnalyticUNet(torch.nn.Module):
    """A deterministic fake noise predictor, ``ε = x·t/(t+1) + 0.01·mean(hidden)``: no weights, batch-independent.

    Counts calls and the batch of every call, so tests can check the U-Net work per frame.
    """

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        self.batches.append(int(sample.shape[0]))
        t = timestep.to(sample.dtype).view(-1, 1, 1, 1) / 1000.0
        cond = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return sample * t / (t + 1) + 0.01 * cond


class CountingUNet:
    """Wraps a U-Net engine and records the batch of every call."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.batches: list[int] = []

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 **extras: torch.Tensor) -> Any:
        self.batches.append(int(sample.shape[0]))
        return self.inner(sample, timestep, encoder_hidden_states, **extras)
