"""Single-file checkpoints in the original Stable Diffusion layout (streamdiff/checkpoints.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from streamdiff import ModelLoadError, load_model
from streamdiff.models.checkpoints import checkpoint_family
from streamdiff.models import model_from_components
from streamdiff.testing import stream_frames, save_ldm_checkpoint, save_tiny_model, small_kl_vae, tiny_components

SIZE = 64


@pytest.fixture(scope="module")
def kl_components():
    components = tiny_components(0)
    components["vae"] = small_kl_vae(0)
    return components


@pytest.fixture(scope="module")
def config_only_folder(tmp_path_factory) -> Path:
    """A diffusers folder of the same architecture with other weights (seed 1), weights then deleted: configs only."""
    folder = save_tiny_model(tmp_path_factory.mktemp("config") / "model", seed=1, kl_vae=True)
    for weights in folder.rglob("*.safetensors"):
        weights.unlink()
    return folder


@pytest.fixture(scope="module")
def in_memory(kl_components, config_only_folder):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(config_only_folder / "tokenizer")
    return model_from_components({**kl_components, "tokenizer": tokenizer})


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_gives_the_in_memory_frames(tmp_path, frames, kl_components, config_only_folder, in_memory,
                                                suffix) -> None:
    path = save_ldm_checkpoint(kl_components, tmp_path / f"model{suffix}")
    model = load_model(str(path), model_config=str(config_only_folder))
    assert type(model.vae).__name__ == "AutoencoderKL"
    for name in ("unet", "vae", "text_encoder"):
        expected = getattr(in_memory, name).state_dict()
        got = getattr(model, name).state_dict()
        assert set(got) == set(expected), name
        assert all(torch.equal(got[k], expected[k]) for k in expected), name
    worst = (stream_frames(model, frames[:4]) - stream_frames(in_memory, frames[:4])).abs().max().item()
    assert worst <= 1e-5


def test_folder_gives_the_in_memory_frames(tmp_path, frames, in_memory) -> None:
    folder = save_tiny_model(tmp_path / "model", seed=0, kl_vae=True)
    worst = (stream_frames(load_model(str(folder)), frames[:4]) - stream_frames(in_memory, frames[:4])).abs().max().item()
    assert worst <= 1e-5


def test_single_file_loads_directly_in_bfloat16(tmp_path, kl_components, config_only_folder) -> None:
    path = save_ldm_checkpoint(kl_components, tmp_path / "model.safetensors")
    model = load_model(str(path), model_config=str(config_only_folder), dtype=torch.bfloat16)
    for module in (model.unet, model.vae, model.text_encoder):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    w = model.unet.conv_in.weight
    assert torch.equal(w, kl_components["unet"].conv_in.weight.to(torch.bfloat16))


def test_single_file_without_model_config_offline_says_how_to_fix(tmp_path, kl_components, monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    path = save_ldm_checkpoint(kl_components, tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"stable-diffusion-v1-5/stable-diffusion-v1-5.*model_config="):
        load_model(str(path))


def test_diffusers_layout_file_is_refused_clearly(tmp_path, kl_components) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in kl_components["unet"].state_dict().items()}, str(path))
    with pytest.raises(ModelLoadError, match="diffusers-layout weights.*save_pretrained"):
        load_model(str(path), model_config="unused/unused")


class _NotATensor:
    pass


def test_ckpt_with_pickled_objects_is_refused(tmp_path) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": _NotATensor()}, path)
    with pytest.raises(ModelLoadError, match=r"evil.ckpt is not a readable torch \(weights_only=True"):
        load_model(str(path), model_config="unused/unused")


def test_wrong_architecture_config_fails_clearly(tmp_path, kl_components) -> None:
    import json

    folder = save_tiny_model(tmp_path / "other", seed=1, kl_vae=True)
    config_file = folder / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    config["block_out_channels"] = [32, 64, 128]
    config_file.write_text(json.dumps(config))
    path = save_ldm_checkpoint(kl_components, tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"model.safetensors with the architecture of .*other"):
        load_model(str(path), model_config=str(folder))


def test_checkpoint_family_from_key_layout() -> None:
    unet = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}
    sd1 = {**unet, "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768)}
    sd2 = {**unet, "cond_stage_model.model.token_embedding.weight": (49408, 1024)}
    bigg = {"conditioner.embedders.1.model.token_embedding.weight": (49408, 1280)}
    sdxl = {**unet, **bigg,
            "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768)}
    refiner = {**unet, "conditioner.embedders.0.model.token_embedding.weight": (49408, 1280)}
    assert checkpoint_family(Path("a.safetensors"), sd1) == "sd1"
    assert checkpoint_family(Path("a.safetensors"), sd2) == "sd2"
    assert checkpoint_family(Path("a.safetensors"), sdxl) == "sdxl"
    with pytest.raises(ModelLoadError, match="is an SDXL refiner checkpoint"):
        checkpoint_family(Path("a.safetensors"), refiner)
    with pytest.raises(ModelLoadError, match=r"SDXL-style text encoders in an unknown layout"):
        checkpoint_family(Path("a.safetensors"), {**unet, **bigg})
    with pytest.raises(ModelLoadError, match="no text encoder in a known layout"):
        checkpoint_family(Path("a.safetensors"), unet)
    with pytest.raises(ModelLoadError, match="not a Stable Diffusion checkpoint: none of its 1 tensors"):
        checkpoint_family(Path("a.safetensors"), {"weight": (1,)})


def test_model_config_by_cached_hub_id(tmp_path, kl_components, config_only_folder, monkeypatch) -> None:
    from huggingface_hub import constants

    from streamdiff.testing import fake_hub_cache

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    fake_hub_cache(tmp_path / "hub", "someorg/tiny-config", config_only_folder)
    path = save_ldm_checkpoint(kl_components, tmp_path / "model.safetensors")
    model = load_model(str(path), model_config="someorg/tiny-config")
    assert torch.equal(model.unet.conv_in.weight, kl_components["unet"].conv_in.weight)
