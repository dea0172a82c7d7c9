from __future__ import annotations

import pytest
import torch

from streamdiff.config import CfgMode
from streamdiff.core.guidance import combine, expand_embeddings, expand_inputs, split_prediction, unet_rows


@pytest.mark.parametrize(
    "mode, expected", [(CfgMode.NONE, 6), (CfgMode.SELF, 6), (CfgMode.INITIALIZE, 8), (CfgMode.FULL, 12)]
)
def test_unet_rows_and_expansion_agree(mode: CfgMode, expected: int) -> None:
    rows, frames = 6, 2
    x = torch.arange(rows, dtype=torch.float32).view(rows, 1, 1, 1)
    t = torch.arange(rows)
    x_in, t_in = expand_inputs(mode, x, t, frames, has_first_step=True)
    cond, uncond = torch.ones(1, 3, 2), torch.zeros(1, 3, 2)
    emb = expand_embeddings(mode, cond, uncond, rows, frames, has_first_step=True)
    assert unet_rows(mode, rows, frames, True) == expected == x_in.shape[0] == t_in.shape[0] == emb.shape[0]
    negatives = expected - rows
    assert torch.all(emb[:negatives] == 0) and torch.all(emb[negatives:] == 1)
    if mode is CfgMode.INITIALIZE:
        assert x_in[:frames].flatten().tolist() == [0.0, 1.0]  # the negative pass covers the first slot only


def test_initialize_without_first_step_adds_nothing() -> None:
    assert unet_rows(CfgMode.INITIALIZE, 2, 2, has_first_step=False) == 2


def test_split_and_combine() -> None:
    pred = torch.cat([torch.zeros(2, 1), torch.ones(2, 1)])
    cond, uncond = split_prediction(CfgMode.FULL, pred, 2, True)
    assert torch.equal(cond, torch.ones(2, 1)) and torch.equal(uncond, torch.zeros(2, 1))
    assert torch.equal(combine(cond, uncond, 3.0), torch.full((2, 1), 3.0))
    cond, real_negative = split_prediction(CfgMode.INITIALIZE, torch.arange(5.0), 2, True)
    assert cond.tolist() == [2.0, 3.0, 4.0] and real_negative.tolist() == [0.0, 1.0]
    cond, none = split_prediction(CfgMode.SELF, torch.arange(3.0), 1, True)
    assert none is None and cond.tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("mode", list(CfgMode))
@pytest.mark.parametrize("has_first_step", [True, False])
def test_extras_follow_the_rows_like_the_embeddings(mode: CfgMode, has_first_step: bool) -> None:
    """Extra conditioning (SDXL's pooled embedding [1, D], time ids [1, 6]) takes the negative variant exactly on the
    rows where the hidden states do."""
    from streamdiff.core.guidance import expand_extras

    rows, frames = 4, 2
    cond = {"text_embeds": torch.ones(1, 3), "time_ids": torch.full((1, 6), 2.0)}
    uncond = {"text_embeds": torch.zeros(1, 3), "time_ids": torch.full((1, 6), -2.0)}
    emb = expand_embeddings(mode, torch.ones(1, 5, 3), torch.zeros(1, 5, 3), rows, frames, has_first_step)
    extras = expand_extras(mode, cond, uncond, rows, frames, has_first_step)
    assert extras["text_embeds"].shape == (emb.shape[0], 3) and extras["time_ids"].shape == (emb.shape[0], 6)
    negative_rows = emb[:, 0, 0] == 0
    assert torch.equal(extras["text_embeds"][:, 0] == 0, negative_rows)
    assert torch.equal(extras["time_ids"][:, 0] < 0, negative_rows)
    with pytest.raises(ValueError, match="differ"):
        expand_extras(mode, cond, {"text_embeds": torch.zeros(1, 3)}, rows, frames, has_first_step)
