"""Prompt encoding with a cache: the text encoder runs once per new prompt text, never per frame."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch


class PromptEncoder:
    """Encodes prompts to CLIP hidden states ``[1, L, D]``, caching the most recent ``capacity`` texts."""

    def __init__(self, tokenizer: Any, text_encoder: torch.nn.Module, capacity: int = 16) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.capacity = capacity
        self.encoder_calls = 0
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @torch.inference_mode()
    def encode(self, text: str) -> torch.Tensor:
        """Hidden states of ``text`` (cached), on the text encoder's device and dtype."""
        cached = self._cache.get(text)
        if cached is not None:
            self._cache.move_to_end(text)
            return cached
        ids = self.tokenizer(
            text,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        device = next(self.text_encoder.parameters()).device
        hidden = self.text_encoder(ids.to(device))[0]
        self.encoder_calls += 1
        self._cache[text] = hidden
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return hidden
