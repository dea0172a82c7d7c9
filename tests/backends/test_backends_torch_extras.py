"""The torch U-Net engine passes the named extra inputs to diffusers' U-Net as its own keyword arguments."""

from __future__ import annotations

import pytest
import torch

from streamdiff.backends.base import extra_names
from streamdiff.backends.torch_backend import unet_kwargs


def test_residuals_go_in_block_order_and_added_conditions_together() -> None:
    extras = {f"down_residual_{i}": torch.full((1,), float(i)) for i in (10, 2, 0, 1)}
    extras |= {"mid_residual": torch.ones(1), "text_embeds": torch.zeros(1, 4), "time_ids": torch.zeros(1, 6)}
    assert extra_names(extras)[:4] == ("down_residual_0", "down_residual_1", "down_residual_2", "down_residual_10")
    kwargs = unet_kwargs(extras)
    assert [float(t) for t in kwargs["down_block_additional_residuals"]] == [0.0, 1.0, 2.0, 10.0]
    assert kwargs["mid_block_additional_residual"] is extras["mid_residual"]
    assert set(kwargs["added_cond_kwargs"]) == {"text_embeds", "time_ids"}


def test_an_unknown_extra_is_an_error_naming_it() -> None:
    with pytest.raises(TypeError, match="bogus"):
        unet_kwargs({"bogus": torch.zeros(1)})


def test_ip_adapter_inputs_go_to_the_attention_processors() -> None:
    tokens, scale = torch.zeros(2, 4, 8), torch.ones(2)
    kwargs = unet_kwargs({"ip_tokens": tokens, "ip_scale": scale})
    assert set(kwargs) == {"cross_attention_kwargs"}
    ip = kwargs["cross_attention_kwargs"]
    assert ip["ip_tokens"] is tokens and ip["ip_scale"] is scale
