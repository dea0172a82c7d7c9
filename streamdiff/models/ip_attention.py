"""IP-Adapter attention with a scale per ROW, so that streams with different image prompts share one U-Net call.

diffusers' ``IPAdapterAttnProcessor2_0`` has one scale per layer for the whole batch. :class:`RowScaledIPAttention`
computes, for every row b of the batch,

    out_b = to_out( attn(q_b, K_text_b, V_text_b) + ip_scale_b · attn(q_b, K_ip_b, V_ip_b) )

with ``K_ip = to_k_ip(ip_tokens)``, ``V_ip = to_v_ip(ip_tokens)`` — the same operations, in the same order, as
diffusers' processor with a uniform scale (IP-Adapter paper, Eq. 5, "decoupled cross-attention"). The per-call
tensors travel as ``cross_attention_kwargs`` (``ip_tokens`` ``[B, N, D]``, the image projection's tokens, and
``ip_scale`` ``[B]``): diffusers' U-Net hands those to every attention processor unchanged, so nothing has to be
packed into the text hidden states (diffusers' older way, splitting them by ``num_tokens``) and the text path is
untouched. A row with scale 0 and zero tokens gets exactly its no-adapter output: its IP keys and values are 0
(``to_k_ip``/``to_v_ip`` have no bias), so the IP attention is exactly 0 (finite) and 0 · 0 adds nothing.

Self-attention layers keep their processor, behind :class:`IgnoresIPInputs` (which takes and drops the two
keywords, so diffusers does not warn about unexpected ``cross_attention_kwargs`` on every call).

Next: :func:`install_ip_attention` on a U-Net (see :mod:`.ip_adapter`, which loads the weights).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

IP_KWARGS = ("ip_tokens", "ip_scale")


class RowScaledIPAttention(torch.nn.Module):
    """A cross-attention processor with IP-Adapter keys/values and a per-row scale (see the module docstring)."""

    def __init__(self, hidden_size: int, cross_attention_dim: int) -> None:
        super().__init__()
        self.to_k_ip = torch.nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = torch.nn.Linear(cross_attention_dim, hidden_size, bias=False)

    def __call__(  # diffusers calls processors through __call__ and reads its keywords from this signature
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        ip_tokens: torch.Tensor | None = None,
        ip_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, sequence_length, _ = (hidden_states.shape if encoder_hidden_states is None
                                     else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # [B, heads, S, d]
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        out = self._attend(attn, query, key, value, attention_mask, batch, head_dim, True)  # [B, S, heads·d]

        if ip_tokens is not None:
            if ip_scale is None:
                raise TypeError("ip_tokens without ip_scale")
            ip_out = self._attend(attn, query, self.to_k_ip(ip_tokens), self.to_v_ip(ip_tokens), None, batch,
                                  head_dim, False)
            out = out + ip_scale.to(out.dtype).view(-1, 1, 1) * ip_out

        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    @staticmethod
    def _attend(attn: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: torch.Tensor | None, batch: int, head_dim: int, text: bool) -> torch.Tensor:
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if text and attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
        return out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)


class IgnoresIPInputs:
    """Wraps a processor that has no IP-Adapter part (self-attention): takes the IP keywords and drops them."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        ip_tokens: torch.Tensor | None = None,
        ip_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def ip_layer_sizes(unet: torch.nn.Module) -> dict[str, tuple[int, int] | None]:
    """Each attention processor's name → (hidden size, cross-attention dim) for cross-attention, None otherwise.

    In the U-Net's processor order, which is the order of the IP-Adapter's weights (diffusers'
    ``_convert_ip_adapter_attn_to_diffusers``: the i-th cross-attention layer has keys ``{2i+1}.to_k_ip.weight``).
    """
    config = unet.config  # type: ignore[attr-defined]
    widths = list(config.block_out_channels)
    sizes: dict[str, tuple[int, int] | None] = {}
    for name in unet.attn_processors:  # type: ignore[attr-defined]
        if name.endswith("attn1.processor") or "motion_modules" in name:
            sizes[name] = None
            continue
        if name.startswith("mid_block"):
            hidden = widths[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(widths))[int(name[len("up_blocks.")])]
        else:
            hidden = widths[int(name[len("down_blocks.")])]
        sizes[name] = (hidden, int(config.cross_attention_dim))
    return sizes


def install_ip_attention(unet: torch.nn.Module, ip_weights: dict[str, torch.Tensor]) -> None:
    """Put :class:`RowScaledIPAttention` processors with ``ip_weights`` (the ``ip_adapter`` state dict of an
    IP-Adapter, diffusers' key layout) on every cross-attention layer of ``unet``; wrap the others.

    Raises KeyError/ValueError (the caller turns them into a ModelLoadError) when the weights do not fit the U-Net.
    """
    existing = unet.attn_processors  # type: ignore[attr-defined]
    processors: dict[str, Any] = {}
    key_id = 1
    parameter = next(unet.parameters())
    for name, size in ip_layer_sizes(unet).items():
        if size is None:
            processors[name] = IgnoresIPInputs(existing[name])
            continue
        processor = RowScaledIPAttention(*size)
        processor.load_state_dict({"to_k_ip.weight": ip_weights[f"{key_id}.to_k_ip.weight"],
                                   "to_v_ip.weight": ip_weights[f"{key_id}.to_v_ip.weight"]})
        processors[name] = processor.to(parameter.device, parameter.dtype).requires_grad_(False)
        key_id += 2
    unet.set_attn_processor(processors)  # type: ignore[attr-defined]


def has_ip_attention(unet: torch.nn.Module) -> bool:
    """Whether ``unet`` carries :class:`RowScaledIPAttention` processors."""
    processors = getattr(unet, "attn_processors", {})
    return any(isinstance(p, RowScaledIPAttention) for p in processors.values())
