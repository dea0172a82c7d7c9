"""Batch assembly: many streams' U-Net rows into one call and the prediction back to each stream.

:func:`assemble` concatenates the :class:`~streamdiff.core.step.UNetRows` of the streams in a call (in the order the
scheduler gave) and, for backends compiled for fixed batch sizes, pads the batch up to the next size they have by
repeating the last row; :meth:`Assembled.split` cuts the prediction back into each stream's rows (padding dropped).
The U-Net is batch-independent, so a stream's rows give the same prediction in any company.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..core.step import UNetRows
from ..errors import ConfigError


def padded_size(rows: int, batch_sizes: Sequence[int] | None) -> int:
    """The batch a call of ``rows`` rows runs at: ``rows`` itself, or the smallest of ``batch_sizes`` that holds it."""
    if not batch_sizes:
        return rows
    fitting = [size for size in batch_sizes if size >= rows]
    if not fitting:
        raise ConfigError(f"a call of {rows} U-Net rows exceeds the largest batch the backend has ({max(batch_sizes)})")
    return min(fitting)


@dataclass
class Assembled:
    """One call's inputs and where each stream's rows sit in it."""

    rows: UNetRows  # the padded, concatenated inputs
    spans: list[tuple[int, int]]  # [start, stop) of each stream's rows, in the order given
    padding: int  # rows added at the end

    def split(self, prediction: torch.Tensor) -> list[torch.Tensor]:
        """Each stream's slice of ``prediction`` ``[B, C, h, w]`` (views; padding dropped)."""
        return [prediction[start:stop] for start, stop in self.spans]


def assemble(parts: Sequence[UNetRows], batch_sizes: Sequence[int] | None = None) -> Assembled:
    """Concatenate ``parts`` into one call, padded to a size of ``batch_sizes`` when given."""
    spans, start = [], 0
    for part in parts:
        spans.append((start, start + part.rows))
        start += part.rows
    padding = padded_size(start, batch_sizes) - start
    if len(parts) == 1 and padding == 0:
        return Assembled(parts[0], spans, 0)

    def joined(tensors: list[torch.Tensor]) -> torch.Tensor:
        if padding:
            tensors = tensors + [tensors[-1][-1:].expand(padding, *tensors[-1].shape[1:])]
        return torch.cat(tensors)

    names = set(parts[0].extras)
    if any(set(p.extras) != names for p in parts):
        raise ConfigError(f"streams in one U-Net call must have the same extra inputs, got "
                          f"{sorted({tuple(sorted(p.extras)) for p in parts})}")
    rows = UNetRows(
        joined([p.sample for p in parts]), joined([p.timesteps for p in parts]), joined([p.embeddings for p in parts]),
        {name: joined([p.extras[name] for p in parts]) for name in sorted(names)},
    )
    return Assembled(rows, spans, padding)
