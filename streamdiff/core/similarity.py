"""Stochastic similarity filter (StreamDiffusion paper, Sec. 3.5, Eq. 15–16).

A frame whose cosine similarity with the last *processed* input is ``sim`` is skipped with probability
``P = max(0, 1 − (1 − sim) / (1 − η))`` where η is the threshold. Never more than ``max_skip_frames`` frames are
skipped in a row. Draws come from a seeded ``random.Random``: the same seed and inputs give the same decisions.

The filter does no I/O and never sleeps: a skip is a decision the caller acts on at once. It computes on the
tensors it is given: on a device tensor, reading the similarity is one device→host copy of a scalar per frame, so
on a GPU the engine gives it the host frames instead (:mod:`streamdiff.engine.execute`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..config import FilterConfig


def skip_probability(similarity: float, threshold: float) -> float:
    """P(skip) = max(0, 1 − (1 − sim) / (1 − threshold)), clipped to [0, 1]."""
    if threshold >= 1.0:
        return 0.0
    return min(1.0, max(0.0, 1.0 - (1.0 - similarity) / (1.0 - threshold)))


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two tensors taken as flat vectors (float32 accumulation)."""
    a = a.reshape(-1).float()
    b = b.reshape(-1).float()
    denom = a.norm() * b.norm()
    return float((a @ b) / denom.clamp_min(1e-12))


@dataclass
class FilterDecision:
    """Outcome for one frame: ``skip`` and the numbers behind it."""

    skip: bool
    similarity: float
    probability: float


class SimilarityFilter:
    """Stateful filter: call :meth:`decide` once per input frame, in order."""

    def __init__(self, config: FilterConfig, seed: int = 0) -> None:
        self.config = config
        self._rng = random.Random(seed)
        self._reference: torch.Tensor | None = None
        self.skip_run = 0
        self.total_skips = 0

    def reset(self, seed: int | None = None) -> None:
        """Forget the reference frame (and reseed when ``seed`` is given)."""
        if seed is not None:
            self._rng = random.Random(seed)
        self._reference = None
        self.skip_run = 0

    def decide(self, frame: torch.Tensor) -> FilterDecision:
        """Decide whether ``frame`` is skipped; a processed frame becomes the new reference."""
        if not self.config.enabled or self._reference is None or self._reference.shape != frame.shape:
            self._accept(frame)
            return FilterDecision(False, 0.0, 0.0)
        similarity = cosine_similarity(self._reference, frame)
        probability = skip_probability(similarity, self.config.threshold)
        draw = self._rng.random()
        if draw < probability and self.skip_run < self.config.max_skip_frames:
            self.skip_run += 1
            self.total_skips += 1
            return FilterDecision(True, similarity, probability)
        self._accept(frame)
        return FilterDecision(False, similarity, probability)

    def _accept(self, frame: torch.Tensor) -> None:
        if self._reference is None or self._reference.shape != frame.shape:
            self._reference = frame.detach().clone()
        else:
            self._reference.copy_(frame)
        self.skip_run = 0
