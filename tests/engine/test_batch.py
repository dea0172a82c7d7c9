"""Batch assembly: concatenation, padding to a compiled batch size, and splitting the prediction back."""

from __future__ import annotations

import pytest
import torch

from streamdiff import ConfigError
from streamdiff.core.step import UNetRows
from streamdiff.engine.batch import assemble, padded_size


def rows(n: int, value: float) -> UNetRows:
    return UNetRows(
        torch.full((n, 4, 2, 2), value), torch.full((n,), int(value), dtype=torch.int64), torch.full((n, 3, 5), value)
    )


def test_concatenates_in_order_and_splits_back() -> None:
    parts = [rows(2, 1.0), rows(3, 2.0), rows(1, 3.0)]
    assembled = assemble(parts)
    assert assembled.padding == 0 and assembled.rows.rows == 6
    assert assembled.spans == [(0, 2), (2, 5), (5, 6)]
    prediction = assembled.rows.sample * 10
    for part, piece in zip(parts, assembled.split(prediction)):
        torch.testing.assert_close(piece, part.sample * 10)


def test_pads_with_the_last_row_to_a_compiled_size() -> None:
    assembled = assemble([rows(2, 1.0), rows(3, 2.0)], batch_sizes=(1, 2, 4, 8))
    assert assembled.rows.rows == 8 and assembled.padding == 3
    assert torch.equal(assembled.rows.sample[5:], torch.full((3, 4, 2, 2), 2.0))
    assert assembled.rows.timesteps.tolist() == [1, 1, 2, 2, 2, 2, 2, 2]
    pieces = assembled.split(assembled.rows.sample)
    assert [p.shape[0] for p in pieces] == [2, 3]


def test_padded_size() -> None:
    assert padded_size(5, None) == 5
    assert padded_size(5, (4, 8, 16)) == 8
    with pytest.raises(ConfigError, match="a call of 17 U-Net rows exceeds the largest batch the backend has \\(16\\)"):
        padded_size(17, (4, 8, 16))


def test_extra_inputs_are_concatenated_and_padded_like_the_rows() -> None:
    def part(rows: int, base: float) -> UNetRows:
        return UNetRows(torch.full((rows, 4, 2, 2), base), torch.full((rows,), int(base)),
                        torch.full((rows, 3, 8), base), {"text_embeds": torch.arange(rows * 5.0).view(rows, 5) + base,
                                                         "time_ids": torch.full((rows, 6), base)})

    a, b = part(2, 10.0), part(1, 20.0)
    assembled = assemble([a, b], batch_sizes=[4])
    extras = assembled.rows.extras
    assert sorted(extras) == ["text_embeds", "time_ids"]
    assert torch.equal(extras["text_embeds"][:2], a.extras["text_embeds"])
    assert torch.equal(extras["text_embeds"][2:3], b.extras["text_embeds"])
    assert torch.equal(extras["text_embeds"][3], b.extras["text_embeds"][-1])  # padding repeats the last row
    assert extras["time_ids"][:, 0].tolist() == [10.0, 10.0, 20.0, 20.0]


def test_streams_with_different_extra_inputs_are_refused_in_one_call() -> None:
    plain = UNetRows(torch.zeros(1, 4, 2, 2), torch.zeros(1), torch.zeros(1, 3, 8))
    extra = UNetRows(torch.zeros(1, 4, 2, 2), torch.zeros(1), torch.zeros(1, 3, 8), {"mid_residual": torch.zeros(1, 8)})
    with pytest.raises(ConfigError, match="same extra inputs"):
        assemble([plain, extra])
