"""Writing models in the original Stable Diffusion (LDM) checkpoint layout, to test single-file loading.

The key mapping of the original CompVis/Stability code base (and of Stability's ``generative-models`` for SDXL),
written from the layouts of the model classes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

_LDM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_LDM_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                   "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
                   # SDXL: the added-condition embedding (pooled text + time ids) is LDM's label embedding
                   "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_LDM_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}
_OPEN_CLIP_FIXED = {"embeddings.token_embedding.weight": "token_embedding.weight",
                    "embeddings.position_embedding.weight": "positional_embedding",
                    "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
_LAYER_KEY = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
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


def clip_to_ldm(text_encoder: torch.nn.Module,
                prefix: str = "cond_stage_model.transformer.") -> dict[str, torch.Tensor]:
    """A transformers ``CLIPTextModel`` state dict in SD 1.x's layout (``cond_stage_model.transformer.text_model.*``;
    SDXL's first encoder: ``prefix`` :data:`SDXL_CLIP_PREFIX`)."""
    out = {}
    for key, value in text_encoder.state_dict().items():
        key = key if key.startswith("text_model.") else f"text_model.{key}"
        out[f"{prefix}{key}"] = value
    return out


def open_clip_to_ldm(text_encoder: torch.nn.Module, prefix: str = SDXL_OPEN_CLIP_PREFIX) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPTextModelWithProjection`` state dict in OpenCLIP's layout (SDXL's second encoder, bigG).

    OpenCLIP keeps the attention's query, key and value as one ``in_proj`` matrix ``[3·D, D]`` (in that order) and
    the text projection as a plain ``[D, P]`` parameter (the transpose of transformers' ``Linear`` weight).
    """
    state = {key.removeprefix("text_model."): value for key, value in text_encoder.state_dict().items()}
    out = {f"{prefix}text_projection": state.pop("text_projection.weight").T}
    for key, value in state.items():
        layer = _LAYER_KEY.fullmatch(key)
        if key in _OPEN_CLIP_FIXED:
            out[prefix + _OPEN_CLIP_FIXED[key]] = value
        elif layer is None:
            raise ValueError(f"no OpenCLIP name for the text encoder weight {key!r}")
        elif layer.group(2) in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            if layer.group(2) == "self_attn.q_proj":
                index, kind = layer.group(1), layer.group(3)
                parts = [state[f"encoder.layers.{index}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                out[f"{prefix}transformer.resblocks.{index}.attn.in_proj_{kind}"] = torch.cat(parts)
        else:
            index, name, kind = layer.groups()
            out[f"{prefix}transformer.resblocks.{index}.{_OPEN_CLIP_LAYER[name]}.{kind}"] = value
    return out


def save_ldm_checkpoint(components: dict[str, Any], path: Path) -> Path:
    """Save U-Net, ``AutoencoderKL`` and text encoder as one original-layout SD 1.x checkpoint; with a
    ``text_encoder_2``, as an SDXL base checkpoint (CLIP-L at :data:`SDXL_CLIP_PREFIX`, the second encoder in
    OpenCLIP's layout at :data:`SDXL_OPEN_CLIP_PREFIX`).

    ``.safetensors`` is written with safetensors; ``.ckpt`` as a torch file ``{"state_dict": ...}`` like the
    original releases (tensors only, so it loads with ``weights_only=True``).
    """
    state = {**unet_to_ldm(components["unet"]), **vae_to_ldm(components["vae"])}
    if components.get("text_encoder_2") is not None:
        state.update(clip_to_ldm(components["text_encoder"], SDXL_CLIP_PREFIX))
        state.update(open_clip_to_ldm(components["text_encoder_2"]))
    else:
        state.update(clip_to_ldm(components["text_encoder"]))
    state = {key: value.detach().contiguous().clone() for key, value in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    return path
