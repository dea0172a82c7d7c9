"""The SDXL family: the built-in ``tiny-sdxl`` folder, loading, and prompt conditioning equal to diffusers'."""

from __future__ import annotations

import json

import pytest
import torch

from streamdiff.errors import ModelLoadError
from streamdiff.models.prompts import PromptEncoder
from streamdiff.models.sdxl import build_tiny_sdxl_components, tiny_sdxl_model_path


@pytest.fixture(scope="module")
def sdxl_model(cache_dir):
    from streamdiff import load_model

    return load_model("tiny-sdxl", device="cpu")


def test_tiny_sdxl_is_an_sdxl_diffusers_folder(cache_dir, sdxl_model) -> None:
    from diffusers import StableDiffusionXLPipeline

    folder = tiny_sdxl_model_path()
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)  # diffusers reads the folder as an SDXL pipeline
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert sdxl_model.sdxl is not None and sdxl_model.unet_extras == ("text_embeds", "time_ids")
    assert sdxl_model.text_hidden_size == sdxl_model.unet.config.cross_attention_dim
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            ours = getattr(sdxl_model, name)
            assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), module.state_dict().values()))


@pytest.mark.parametrize("force_zeros", [True, False])
@pytest.mark.parametrize("negative", ["", "blurry"])
def test_conditioning_equals_diffusers_encode_prompt(sdxl_model, negative: str, force_zeros: bool) -> None:
    """Hidden states, pooled embedding and time ids, positive and negative, equal diffusers' own. Our settings have
    no None: an empty negative prompt is diffusers' ``negative_prompt=None`` (zeros if the model forces them)."""
    from diffusers import LCMScheduler, StableDiffusionXLImg2ImgPipeline

    from streamdiff.models.sdxl import SdxlConditions

    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=sdxl_model.vae, text_encoder=sdxl_model.text_encoder, text_encoder_2=sdxl_model.text_encoder_2,
        tokenizer=sdxl_model.tokenizer, tokenizer_2=sdxl_model.tokenizer_2, unet=sdxl_model.unet,
        scheduler=LCMScheduler(), add_watermarker=False, force_zeros_for_empty_prompt=force_zeros,
    )
    embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
        "a watercolor cat", device=torch.device("cpu"), do_classifier_free_guidance=True,
        negative_prompt=negative or None)
    time_ids, negative_time_ids = pipe._get_add_time_ids(
        (256, 192), (0, 0), (256, 192), 6.0, 2.5, (256, 192), (0, 0), (256, 192), dtype=torch.float32,
        text_encoder_projection_dim=sdxl_model.pooled_size)
    prompts = PromptEncoder(sdxl_model.tokenizer, sdxl_model.text_encoder, tokenizer_2=sdxl_model.tokenizer_2,
                            text_encoder_2=sdxl_model.text_encoder_2, sdxl=SdxlConditions(force_zeros))
    hidden, extras = prompts.conditioning("a watercolor cat", 256, 192)
    assert torch.equal(hidden, embeds) and torch.equal(extras["text_embeds"], pooled)
    assert torch.equal(extras["time_ids"], time_ids)
    negative_hidden, negative_extras = prompts.conditioning(negative, 256, 192, negative=True)
    assert negative_hidden.any() is not (force_zeros and not negative)
    assert torch.equal(negative_hidden, negative_embeds)
    assert torch.equal(negative_extras["text_embeds"], negative_pooled)
    assert torch.equal(negative_extras["time_ids"], negative_time_ids)
    prompts.conditioning("a watercolor cat", 64, 64)
    assert prompts.encoder_calls == 2  # cached per text; time ids per size


def test_an_sdxl_unet_needs_the_second_encoder() -> None:
    from streamdiff.models import model_from_components

    components = build_tiny_sdxl_components(seed=1)
    components.pop("text_encoder_2")
    components["tokenizer"] = object()
    with pytest.raises(ModelLoadError, match=r"SDXL U-Net.*\['text_encoder_2', 'tokenizer_2'\] are missing"):
        model_from_components(components)


def test_an_sdxl_folder_without_its_second_encoder_is_refused(tmp_path, cache_dir) -> None:
    import shutil

    from streamdiff import load_model

    folder = tmp_path / "model"
    shutil.copytree(tiny_sdxl_model_path(), folder)
    shutil.rmtree(folder / "tokenizer_2")
    with pytest.raises(ModelLoadError, match=r"SDXL model folder .* lacks .*\['tokenizer_2'\]"):
        load_model(str(folder))


def test_a_lora_fuses_into_the_sdxl_unet(cache_dir, sdxl_model, tmp_path) -> None:
    """LoRAs (the LCM-LoRA for SDXL among them) fuse through diffusers' SDXL pipeline: base + scale·BA·α/r."""
    from streamdiff import load_model
    from streamdiff.testing.lora import random_lora, save_lora

    state = random_lora(sdxl_model.unet, seed=11)
    path = save_lora(state, tmp_path / "lora")
    fused_model = load_model(str(tiny_sdxl_model_path()), loras=[(str(path), 0.7)])
    assert fused_model.sdxl is not None and fused_model.text_encoder_2 is not None
    base, fused = sdxl_model.unet.state_dict(), fused_model.unet.state_dict()
    assert set(base) == set(fused)
    changed = 0
    for key in state:
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0]
        delta = 0.7 * (state[f"{module}.lora_B.weight"] @ state[f"{module}.lora_A.weight"]) * (8.0 / 4)
        torch.testing.assert_close(fused[f"{module}.weight"], base[f"{module}.weight"] + delta, rtol=0, atol=1e-5)
        changed += 1
    assert changed > 0
