"""Random LoRAs in the diffusers and kohya layouts, and a fake Hugging Face hub cache."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch

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
