"""Writing models in the original Stable Diffusion (LDM) checkpoint layout, to test single-file loading.

The key mapping of the original CompVis/Stability code base, written from the layouts of the two model classes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

_LDM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_LDM_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                   "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_LDM_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_BLOCK_KEY = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")
_MID_KEY = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def _renamed(rest: str, names: dict[str, str]) -> str:
    head, _, tail = rest.partition(".")
    return f"{names.get(head, head)}.{tail}"


def unet_to_ldm(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A diffusers ``UNet2DConditionModel`` state dict in the original layout (``model.diffusion_model.*``).

    LDM numbers the U-Net as one flat list: ``input_blocks.0`` is conv_in, then per down level ``layers_per_block``
    (resnet ``.0``, attention ``.1``) entries and one downsampler entry (``.0.op``); ``middle_block`` is resnet,
    attention, resnet; ``output_blocks`` has ``layers_per_block + 1`` entries per up level, the upsampler after the
    attention of the last one.
    """
    config = unet.config
    per_level = config.layers_per_block + 1
    up_has_attention = ["CrossAttn" in name for name in config.up_block_types]
    out = {}
    for key, value in unet.state_dict().items():
        block, mid = _BLOCK_KEY.match(key), _MID_KEY.match(key)
        if block:
            kind, level, part, index, rest = block.groups()
            level, index = int(level), int(index)
            if kind == "down_blocks":
                first = 1 + level * per_level
                prefix = {"resnets": f"input_blocks.{first + index}.0", "attentions": f"input_blocks.{first + index}.1",
                          "downsamplers": f"input_blocks.{first + per_level - 1}.0"}[part]
                rest = rest.replace("conv.", "op.", 1) if part == "downsamplers" else rest
            else:
                first = level * per_level
                upsampler = f"output_blocks.{first + per_level - 1}.{2 if up_has_attention[level] else 1}"
                prefix = {"resnets": f"output_blocks.{first + index}.0",
                          "attentions": f"output_blocks.{first + index}.1", "upsamplers": upsampler}[part]
            ldm = f"{prefix}.{_renamed(rest, _LDM_RESNET) if part == 'resnets' else rest}"
        elif mid:
            part, index, rest = mid.groups()
            if part == "resnets":
                ldm = f"middle_block.{2 * int(index)}.{_renamed(rest, _LDM_RESNET)}"
            else:
                ldm = f"middle_block.1.{rest}"
        else:
            head, _, tail = key.rpartition(".")
            ldm = f"{_LDM_UNET_FIXED[head]}.{tail}"
        out["model.diffusion_model." + ldm] = value
    return out


def vae_to_ldm(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` state dict in the original layout (``first_stage_model.*``).

    Levels are ``down.{i}`` / ``up.{i}`` with the decoder's levels numbered from the bottom (diffusers' up block 0 is
    LDM's ``up.{n-1}``); the mid-block attention is a set of 1×1 convolutions (``q``, ``k``, ``v``, ``proj_out``).
    """
    levels = len(vae.config.up_block_types)
    out = {}
    for key, value in vae.state_dict().items():
        side, _, rest = key.partition(".")
        block, mid = _BLOCK_KEY.match(rest), _MID_KEY.match(rest)
        if block:
            kind, level, part, index, tail = block.groups()
            name = f"down.{level}" if kind == "down_blocks" else f"up.{levels - 1 - int(level)}"
            if part == "resnets":
                ldm = f"{side}.{name}.block.{index}.{_renamed(tail, {'conv_shortcut': 'nin_shortcut'})}"
            else:
                ldm = f"{side}.{name}.{'downsample' if part == 'downsamplers' else 'upsample'}.{tail}"
        elif mid:
            part, index, tail = mid.groups()
            if part == "resnets":
                ldm = f"{side}.mid.block_{int(index) + 1}.{_renamed(tail, {'conv_shortcut': 'nin_shortcut'})}"
            else:
                head, _, leaf = tail.rpartition(".")
                ldm = f"{side}.mid.attn_1.{_LDM_VAE_ATTENTION[head]}.{leaf}"
                value = value[:, :, None, None] if value.ndim == 2 else value
        elif rest.startswith("conv_norm_out."):
            ldm = f"{side}.norm_out.{rest.partition('.')[2]}"
        else:
            ldm = key
        out["first_stage_model." + ldm] = value
    return out


def clip_to_ldm(text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPTextModel`` state dict in SD 1.x's layout (``cond_stage_model.transformer.text_model.*``)."""
    out = {}
    for key, value in text_encoder.state_dict().items():
        key = key if key.startswith("text_model.") else f"text_model.{key}"
        out[f"cond_stage_model.transformer.{key}"] = value
    return out


def save_ldm_checkpoint(components: dict[str, Any], path: Path) -> Path:
    """Save U-Net, ``AutoencoderKL`` and text encoder as one original-layout SD 1.x checkpoint.

    ``.safetensors`` is written with safetensors; ``.ckpt`` as a torch file ``{"state_dict": ...}`` like the
    original releases (tensors only, so it loads with ``weights_only=True``).
    """
    state = {**unet_to_ldm(components["unet"]), **vae_to_ldm(components["vae"]),
             **clip_to_ldm(components["text_encoder"])}
    state = {key: value.detach().contiguous().clone() for key, value in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    return path
