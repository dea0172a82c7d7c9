"""SDXL streams on the built-in ``tiny-sdxl`` model (CPU, float32): diffusers' SDXL img2img pipeline is the judge."""

from __future__ import annotations

import pytest
import torch

from streamdiff import StreamConfig, StreamPipeline
from streamdiff.backends.torch_backend import TorchUNet
from streamdiff.testing import CountingUNet

SIZE = 64


@pytest.fixture(scope="module")
def sdxl_model(cache_dir):
    from streamdiff import load_model

    return load_model("tiny-sdxl", device="cpu")


def _image(seed: int, size: int = SIZE) -> torch.Tensor:
    return torch.rand((1, 3, size, size), generator=torch.Generator().manual_seed(seed))


def _diffusers_img2img(model):
    from diffusers import LCMScheduler, StableDiffusionXLImg2ImgPipeline

    from streamdiff.models.tiny import SD_SCHEDULER

    return StableDiffusionXLImg2ImgPipeline(
        vae=model.vae, text_encoder=model.text_encoder, text_encoder_2=model.text_encoder_2,
        tokenizer=model.tokenizer, tokenizer_2=model.tokenizer_2, unet=model.unet,
        scheduler=LCMScheduler(**SD_SCHEDULER), requires_aesthetics_score=False, force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


@pytest.mark.parametrize("mode, scale, negative", [("none", 1.0, ""), ("full", 1.8, ""), ("full", 1.8, "blurry")])
@pytest.mark.parametrize("t_index", [20, 40])
def test_one_step_equals_diffusers_sdxl_img2img(sdxl_model, mode: str, scale: float, negative: str,
                                                t_index: int) -> None:
    """One streamdiff step (n = 1) equals ``StableDiffusionXLImg2ImgPipeline`` with the LCM scheduler at the same
    timestep, with the same noise (the seed's generator), in [0, 1], to 1e-4.

    Full guidance is diffusers' classifier-free guidance (a real negative pass, ε_u + γ(ε_c − ε_u)); an empty
    negative prompt is diffusers' ``negative_prompt=None``: all zeros, as ``force_zeros_for_empty_prompt`` says."""
    seed, image = 7, _image(3)
    pipe = StreamPipeline(sdxl_model, StreamConfig(width=SIZE, height=SIZE, t_index_list=(t_index,), cfg_type=mode))
    pipe.prepare("a watercolor cat", negative_prompt=negative, guidance_scale=scale, seed=seed)
    ours = pipe.step(image).images
    timestep = int(pipe.state.coeffs.timesteps[0])
    reference = _diffusers_img2img(sdxl_model)
    theirs = reference(
        prompt="a watercolor cat", negative_prompt=negative or None, image=image, strength=1.0,
        timesteps=[timestep], guidance_scale=scale, generator=torch.Generator().manual_seed(seed), output_type="pt",
    ).images
    assert ours.shape == theirs.shape == (1, 3, SIZE, SIZE)
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (ours - image).abs().max().item() > 1e-2  # the U-Net did something


def test_guidance_and_negative_prompt_change_the_frame(sdxl_model) -> None:
    """The added conditions reach the U-Net: a negative prompt (full guidance) and the pooled embedding matter."""
    outputs = []
    for negative in ("", "blurry"):
        pipe = StreamPipeline(sdxl_model, StreamConfig(width=SIZE, height=SIZE, t_index_list=(30,), cfg_type="full"))
        pipe.prepare("a watercolor cat", negative_prompt=negative, guidance_scale=2.0, seed=1)
        outputs.append(pipe.step(_image(4)).images)
    assert (outputs[0] - outputs[1]).abs().max().item() > 1e-4


@pytest.mark.parametrize("mode", ["none", "full", "self", "initialize"])
@pytest.mark.parametrize("f, t_index_list", [(1, [20, 40]), (2, [15, 30, 45])])
def test_stream_batch_equals_sequential_sdxl(sdxl_model, mode: str, f: int, t_index_list: list[int]) -> None:
    """SDXL's extra inputs follow the rows: the staggered Stream Batch equals step-by-step denoising (≤ 1e-5)."""
    pipes = []
    for use_denoising_batch in (True, False):
        config = StreamConfig(width=SIZE, height=SIZE, t_index_list=t_index_list, cfg_type=mode, frame_buffer_size=f,
                              use_denoising_batch=use_denoising_batch)
        pipe = StreamPipeline(sdxl_model, config, unet=CountingUNet(TorchUNet(sdxl_model.unet)))
        pipe.prepare("a watercolor portrait", negative_prompt="blurry", guidance_scale=1.6, delta=0.9, seed=5)
        pipes.append(pipe)
    batched, sequential = pipes
    inputs = [torch.rand((f, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(20 + i)) for i in range(4)]
    got = [out.images for out in (batched.step(x) for x in inputs) if out.images is not None]
    got += [out.images for out in batched.flush()]
    expected = [sequential.step(x).images for x in inputs]
    assert len(got) == len(expected) == len(inputs)
    worst = max((a - b).abs().max().item() for a, b in zip(got, expected))
    assert worst <= 1e-5
