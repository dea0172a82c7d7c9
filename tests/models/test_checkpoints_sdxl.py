"""Single-file SDXL checkpoints in the original (Stability ``generative-models``) layout
(streamdiff/models/checkpoints.py).

A tiny SDXL model (the ``tiny-sdxl`` recipe with a small ``AutoencoderKL``, since single files carry a KL VAE) is saved
twice: as a diffusers folder, and as one LDM-layout file written by :mod:`streamdiff.testing.ldm`. The file, loaded
with the architecture of a *configs-only* folder (other weights, deleted), must stream the folder's frames.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from streamdiff import ModelLoadError, load_model
from streamdiff.models.checkpoints import FAMILY_CONFIGS
from streamdiff.models.sdxl import build_tiny_sdxl_components, save_sdxl_folder
from streamdiff.testing import (
    fake_hub_cache, save_ldm_checkpoint, save_tiny_model, small_kl_vae, stream_frames, tiny_components,
)

SDXL_MODULES = ("unet", "vae", "text_encoder", "text_encoder_2")


def sdxl_kl_components(seed: int) -> dict[str, object]:
    components = build_tiny_sdxl_components(seed)
    components["vae"] = small_kl_vae(seed)
    return components


@pytest.fixture(scope="module")
def components() -> dict[str, object]:
    return sdxl_kl_components(0)


@pytest.fixture(scope="module")
def folder(components, tmp_path_factory) -> Path:
    """The reference: the same weights as a diffusers ``StableDiffusionXLPipeline`` folder."""
    path = tmp_path_factory.mktemp("sdxl-folder") / "model"
    save_sdxl_folder(components, path)
    return path


@pytest.fixture(scope="module")
def config_only(tmp_path_factory) -> Path:
    """An SDXL diffusers folder of the same architecture with other weights (seed 1), weights then deleted."""
    path = tmp_path_factory.mktemp("sdxl-config") / "model"
    save_sdxl_folder(sdxl_kl_components(1), path)
    for weights in path.rglob("*.safetensors"):
        weights.unlink()
    return path


@pytest.fixture(scope="module")
def ldm_state(components) -> dict[str, torch.Tensor]:
    from streamdiff.testing.ldm import SDXL_CLIP_PREFIX, clip_to_ldm, open_clip_to_ldm, unet_to_ldm, vae_to_ldm

    return {**unet_to_ldm(components["unet"]), **vae_to_ldm(components["vae"]),
            **clip_to_ldm(components["text_encoder"], SDXL_CLIP_PREFIX),
            **open_clip_to_ldm(components["text_encoder_2"])}


def save_state(state: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({key: value.detach().contiguous().clone() for key, value in state.items()}, str(path))
    return path


def test_ldm_file_has_the_sdxl_base_layout(tmp_path, components) -> None:
    from safetensors import safe_open

    path = save_ldm_checkpoint(components, tmp_path / "model.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
    assert "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight" in keys
    assert "conditioner.embedders.1.model.text_projection" in keys
    assert "model.diffusion_model.label_emb.0.0.weight" in keys  # the added-condition embedding
    assert not any(key.startswith("cond_stage_model.") for key in keys)


@pytest.mark.parametrize("suffix, dtype", [(".safetensors", torch.float32), (".ckpt", torch.float32),
                                           (".safetensors", torch.bfloat16)])
def test_single_file_gives_the_folder_frames(tmp_path, frames, components, folder, config_only, suffix,
                                             dtype) -> None:
    path = save_ldm_checkpoint(components, tmp_path / f"model{suffix}")
    model = load_model(str(path), model_config=str(config_only), dtype=dtype)
    reference = load_model(str(folder), dtype=dtype)
    assert model.sdxl == reference.sdxl and model.unet_extras == ("text_embeds", "time_ids")
    assert type(model.vae).__name__ == "AutoencoderKL"
    for name in SDXL_MODULES:
        expected, got = getattr(reference, name).state_dict(), getattr(model, name).state_dict()
        assert set(got) == set(expected), name
        assert all(torch.equal(got[k], expected[k]) for k in expected), name
        assert {v.dtype for v in got.values() if v.is_floating_point()} == {dtype}, name
    ours, theirs = stream_frames(model, frames[:4]), stream_frames(reference, frames[:4])
    assert ours.shape == theirs.shape == (3, 3, 64, 64)  # two-step stream: the first frame is warm-up
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_frames_depend_on_the_second_encoders_attention_layout(tmp_path, frames, folder, config_only,
                                                               ldm_state) -> None:
    """Query and key of OpenCLIP's ``in_proj`` swapped: the weights still load, the frames must change (so the
    comparison above sees the second encoder's conversion)."""
    state = dict(ldm_state)
    key = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    q, k, v = state[key].chunk(3)
    state[key] = torch.cat([k, q, v])
    model = load_model(str(save_state(state, tmp_path / "swapped.safetensors")), model_config=str(config_only))
    worst = (stream_frames(model, frames[:4]) - stream_frames(load_model(str(folder)), frames[:4])).abs().max().item()
    assert worst > 1e-3


def test_extra_keys_of_released_files_are_ignored(tmp_path, components, config_only, ldm_state) -> None:
    """Released files carry buffers the models do not have as weights (CLIP's ``position_ids``, OpenCLIP's
    ``logit_scale``)."""
    state = {**ldm_state, "conditioner.embedders.1.model.logit_scale": torch.tensor(4.6),
             "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}
    model = load_model(str(save_state(state, tmp_path / "extra.safetensors")), model_config=str(config_only))
    for name in SDXL_MODULES:
        expected, got = components[name].state_dict(), getattr(model, name).state_dict()
        assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected), name


def test_refiner_checkpoint_is_refused(tmp_path, ldm_state, config_only) -> None:
    """A refiner has one text encoder, OpenCLIP bigG at ``conditioner.embedders.0.model``."""
    state = {key.replace("conditioner.embedders.1.model.", "conditioner.embedders.0.model."): value
             for key, value in ldm_state.items() if not key.startswith("conditioner.embedders.0.transformer.")}
    path = save_state(state, tmp_path / "refiner.safetensors")
    with pytest.raises(ModelLoadError, match=r"refiner.safetensors is an SDXL refiner checkpoint.*supported are SD "
                                             r"1.x, SD 2.x and SDXL base"):
        load_model(str(path), model_config=str(config_only))


def test_unknown_conditioner_layout_is_refused(tmp_path, ldm_state, config_only) -> None:
    state = {key: value for key, value in ldm_state.items() if not key.startswith("conditioner.embedders.1.")}
    path = save_state(state, tmp_path / "half.safetensors")
    with pytest.raises(ModelLoadError, match=r"SDXL-style text encoders in an unknown layout "
                                             r"\(\['conditioner.embedders.0.transformer'\]\)"):
        load_model(str(path), model_config=str(config_only))


def test_without_model_config_offline_says_how_to_fix(tmp_path, components, monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    path = save_ldm_checkpoint(components, tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"'stabilityai/stable-diffusion-xl-base-1.0' is not in the local .*"
                                             r"HF_HUB_OFFLINE.*model.safetensors \(SDXL\).*pass model_config=.*"
                                             r"'stabilityai/sdxl-turbo'"):
        load_model(str(path))


def test_family_reference_configs_are_used_when_cached(tmp_path, components, config_only, monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    fake_hub_cache(tmp_path / "hub", FAMILY_CONFIGS["sdxl"], config_only)
    model = load_model(str(save_ldm_checkpoint(components, tmp_path / "model.safetensors")))
    assert torch.equal(model.text_encoder_2.text_projection.weight, components["text_encoder_2"].text_projection.weight)


def test_model_config_of_the_other_family_is_refused(tmp_path, components, config_only) -> None:
    sd_folder = save_tiny_model(tmp_path / "sd", seed=1, kl_vae=True)
    path = save_ldm_checkpoint(components, tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"model.safetensors is SDXL, but model_config '.*sd' is an SD 1.x/2.x "
                                             r"model: pass a model_config of the checkpoint's family"):
        load_model(str(path), model_config=str(sd_folder))
    sd_path = save_ldm_checkpoint({**tiny_components(1), "vae": small_kl_vae(1)}, tmp_path / "sd.safetensors")
    with pytest.raises(ModelLoadError, match=r"sd.safetensors is SD 1.x, but model_config .* is an SDXL model"):
        load_model(str(sd_path), model_config=str(config_only))
