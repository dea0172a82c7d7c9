"""Prompt encoding with a cache: the text encoder runs once per new prompt text, never per frame.

The one owner of prompt encoding for every model family: SD 1.x/2.x (one encoder, its last hidden states) and SDXL
(two encoders, :mod:`.sdxl`), whose U-Net also takes extra conditioning inputs (``text_embeds``, ``time_ids``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from .sdxl import SdxlConditions


class PromptEncoder:
    """Encodes prompts to CLIP hidden states ``[1, L, D]``, caching the most recent ``capacity`` texts.

    With ``text_encoder_2``/``tokenizer_2`` and ``sdxl`` (an SDXL model, see :meth:`for_model`) the hidden states are
    both encoders' penultimate hidden states concatenated, and :meth:`conditioning` adds the pooled embedding of the
    second encoder (``text_embeds`` ``[1, D_pool]``) and the added time ids (``time_ids`` ``[1, 6]``), as diffusers'
    ``StableDiffusionXLImg2ImgPipeline.encode_prompt`` and ``_get_add_time_ids`` make them.
    """

    def __init__(
        self,
        tokenizer: Any,
        text_encoder: torch.nn.Module,
        capacity: int = 16,
        *,
        tokenizer_2: Any = None,
        text_encoder_2: torch.nn.Module | None = None,
        sdxl: SdxlConditions | None = None,
    ) -> None:
        if sdxl is not None and (tokenizer_2 is None or text_encoder_2 is None):
            raise ValueError("an SDXL prompt encoder needs tokenizer_2 and text_encoder_2")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_2 = text_encoder_2
        self.sdxl = sdxl
        self.capacity = capacity
        self.encoder_calls = 0
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()

    @classmethod
    def for_model(cls, model: Any, capacity: int = 16) -> PromptEncoder:
        """The prompt encoder of a :class:`~streamdiff.models.loading.LoadedModel` (SD or SDXL)."""
        return cls(model.tokenizer, model.text_encoder, capacity, tokenizer_2=model.tokenizer_2,
                   text_encoder_2=model.text_encoder_2, sdxl=model.sdxl)

    def encode(self, text: str) -> torch.Tensor:
        """Hidden states of ``text`` (cached), on the text encoder's device and dtype."""
        return self._encoded(text)[0]

    def conditioning(
        self, text: str, height: int, width: int, negative: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hidden states ``[1, L, D]`` and the extra conditioning U-Net inputs (``[1, ...]`` by name) of ``text`` for
        a ``height``×``width`` frame: none for SD; ``text_embeds`` and ``time_ids`` for SDXL.

        ``negative``: ``text`` is a negative prompt; an empty one is all zeros when the SDXL model forces zeros for
        it (diffusers' ``force_zeros_for_empty_prompt`` with ``negative_prompt=None``).
        """
        hidden, pooled = self._encoded(text)
        if self.sdxl is None:
            return hidden, {}
        assert pooled is not None
        if negative and not text and self.sdxl.force_zeros_for_empty_prompt:
            hidden, pooled = torch.zeros_like(hidden), torch.zeros_like(pooled)
        time_ids = self.sdxl.time_ids(height, width, hidden.dtype, hidden.device)
        return hidden, {"text_embeds": pooled, "time_ids": time_ids}

    @torch.inference_mode()
    def _encoded(self, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        cached = self._cache.get(text)
        if cached is not None:
            self._cache.move_to_end(text)
            return cached
        if self.sdxl is None:
            entry: tuple[torch.Tensor, torch.Tensor | None] = (self.text_encoder(self._ids(self.tokenizer, text))[0],
                                                               None)
        else:
            entry = self._encode_sdxl(text)
        self.encoder_calls += 1
        self._cache[text] = entry
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return entry

    def _ids(self, tokenizer: Any, text: str) -> torch.Tensor:
        ids = tokenizer(
            text,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return ids.to(next(self.text_encoder.parameters()).device)

    def _encode_sdxl(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Both encoders' penultimate hidden states, concatenated, and encoder 2's pooled projection."""
        assert self.text_encoder_2 is not None
        first = self.text_encoder(self._ids(self.tokenizer, text), output_hidden_states=True)
        second = self.text_encoder_2(self._ids(self.tokenizer_2, text), output_hidden_states=True)
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2].to(first.hidden_states[-2].dtype)],
                           dim=-1)
        return hidden, second[0]
