"""Helpers for tests and benchmarks: tiny random components, analytic fake U-Nets, SD-2.1-size configs.

Everything here is offline and seeded; nothing downloads.
"""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from .tiny import SD_SCHEDULER, TINY_UNET, build_tiny_components, save_diffusers_folder

# Stable Diffusion 2.1 architecture (v-prediction aside, which streaming does not use): 866M-parameter U-Net.
SD21_UNET = dict(
    sample_size=96,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
)
SD21_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=768,
)
SD21_TEXT = dict(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=512,
)


class AnalyticUNet(torch.nn.Module):
    """A deterministic fake noise predictor, ``ε = x·t/(t+1) + 0.01·mean(hidden)``: no weights, batch-independent.

    Counts calls and the batch of every call, so tests can check the U-Net work per frame.
    """

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        self.batches.append(int(sample.shape[0]))
        t = timestep.to(sample.dtype).view(-1, 1, 1, 1) / 1000.0
        cond = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return sample * t / (t + 1) + 0.01 * cond


class CountingUNet:
    """Wraps a U-Net engine and records the batch of every call."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.batches: list[int] = []

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> Any:
        self.batches.append(int(sample.shape[0]))
        return self.inner(sample, timestep, encoder_hidden_states)


def tiny_components(seed: int = 0) -> dict[str, object]:
    """Fresh tiny random components (the same recipe as the built-in model)."""
    return build_tiny_components(seed)


def save_tiny_model(folder: Path, seed: int = 0, kl_vae: bool = False) -> Path:
    """Save a tiny random model as a diffusers folder; ``kl_vae`` gives it a small AutoencoderKL instead of TAESD."""
    components = tiny_components(seed)
    if kl_vae:
        components["vae"] = small_kl_vae(seed)
    save_diffusers_folder(components, folder)
    return folder


def small_kl_vae(seed: int = 0) -> torch.nn.Module:
    """A small random ``AutoencoderKL`` (scale factor 8, 4 latent channels)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed + 3)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
    ).eval()


def small_sd21_unet_config() -> dict[str, Any]:
    """SD-2.1's U-Net layout (linear projections, per-level heads) at a small width, for fast export tests."""
    config = copy.deepcopy(SD21_UNET)
    config.update(block_out_channels=(32, 64, 64, 64), cross_attention_dim=64, attention_head_dim=(2, 4, 4, 4))
    config.update(norm_num_groups=16, layers_per_block=1)
    return config


def sd21_components(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, object]:
    """SD-2.1-size components with random weights (no download): U-Net, KL VAE, TAESD, text encoder, scheduler."""
    from diffusers import AutoencoderKL, AutoencoderTiny, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD21_UNET)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**SD21_VAE)
    torch.manual_seed(seed + 2)
    taesd = AutoencoderTiny()
    torch.manual_seed(seed + 3)
    text_encoder = CLIPTextModel(CLIPTextConfig(**SD21_TEXT))
    out: dict[str, object] = {
        "unet": unet,
        "vae": vae,
        "taesd": taesd,
        "text_encoder": text_encoder,
        "scheduler": LCMScheduler(**SD_SCHEDULER),
    }
    for module in out.values():
        if isinstance(module, torch.nn.Module):
            module.to(dtype).eval().requires_grad_(False)
    return out



# -- original Stable Diffusion (LDM) checkpoint layout ------------------------------------------------------------
# The key mapping of the original CompVis/Stability code base, written from the layouts of the two model classes.

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


# -- LoRAs and a fake hub cache -------------------------------------------------------------------------------------

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def random_lora(unet: torch.nn.Module, seed: int, rank: int = 4, alpha: float = 8.0) -> dict[str, torch.Tensor]:
    """A random LoRA for ``unet``'s attention projections, in peft's key layout (``….lora_A.weight``, ``lora_B``).

    ``lora_B`` is random and non-zero (peft initialises it to zero), so the LoRA changes the weights. ``unet`` is
    left unchanged.
    """
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(LORA_TARGETS))
    copy_unet = copy.deepcopy(unet)
    torch.manual_seed(seed)
    inject_adapter_in_model(config, copy_unet)
    generator = torch.Generator().manual_seed(seed)
    state = get_peft_model_state_dict(copy_unet)
    return {
        key: (torch.randn(value.shape, generator=generator) * 0.05 if "lora_B" in key else value.clone())
        for key, value in state.items()
    }


def save_lora(state: dict[str, torch.Tensor], folder: Path, rank: int = 4, alpha: float = 8.0) -> Path:
    """Save a peft-layout U-Net LoRA the way diffusers writes one (``pytorch_lora_weights.safetensors``)."""
    from diffusers import StableDiffusionPipeline

    metadata = {"r": rank, "lora_alpha": alpha, "target_modules": list(LORA_TARGETS)}
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=state, unet_lora_adapter_metadata=metadata)
    return folder / "pytorch_lora_weights.safetensors"


def save_kohya_lora(state: dict[str, torch.Tensor], path: Path, alpha: float = 8.0) -> Path:
    """Save a peft-layout U-Net LoRA in the kohya layout most community LoRAs (and the LCM-LoRA) ship in:
    ``lora_unet_<module_path_with_underscores>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``."""
    from safetensors.torch import save_file

    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, _, kind = key.rpartition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        out[f"{name}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = value.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path))
    return path


def fake_hub_cache(hub_cache: Path, repo_id: str, folder: Path, commit: str = "0" * 40) -> Path:
    """Lay ``folder`` out in a Hugging Face hub cache as the snapshot of ``repo_id`` at ``refs/main``.

    The same layout ``huggingface_hub`` writes (``models--org--name/snapshots/<commit>/…`` plus ``refs/main``), so
    offline look-ups find it. Returns the snapshot folder.
    """
    repo = hub_cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit, encoding="utf-8")
    return snapshot

__all__ = [
    "AnalyticUNet",
    "clip_to_ldm",
    "fake_hub_cache",
    "random_lora",
    "save_kohya_lora",
    "save_ldm_checkpoint",
    "save_lora",
    "unet_to_ldm",
    "vae_to_ldm",
    "CountingUNet",
    "SD21_UNET",
    "TINY_UNET",
    "save_tiny_model",
    "sd21_components",
    "small_kl_vae",
    "small_sd21_unet_config",
    "tiny_components",
]


def write_pattern_video(path: Path, frames: int, width: int, height: int, fps: int) -> None:
    """Write ``frames`` frames of the built-in test pattern as an H.264 mp4 (PyAV)."""
    from fractions import Fraction

    import av

    from .io import pattern_frame

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(pattern_frame(i, width, height), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def stream_frames(model: Any, frames: list[Any], size: int = 64, t_index_list: tuple[int, ...] = (20, 40)) -> torch.Tensor:
    """Push uint8 frames through a fresh two-step stream on ``model``; the outputs stacked ``[k, 3, H, W]``."""
    from .config import StreamConfig
    from .image import frame_to_tensor
    from .pipeline import StreamPipeline

    pipe = StreamPipeline(model, StreamConfig(width=size, height=size, t_index_list=t_index_list))
    pipe.prepare("a watercolor portrait", seed=3)
    outs = [pipe.step(frame_to_tensor(f)).images for f in frames]
    return torch.cat([o for o in outs if o is not None])
