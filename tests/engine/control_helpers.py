"""Shared by the ControlNet tests of the engine (SD, SDXL, the conditioning mix): deterministic frames and control
images, an engine that counts its U-Net calls, one stream's single step, diffusers' ControlNet img2img pipelines as
the judge, and a ControlNet that records the rows of its calls."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from streamdiff import StreamEngine
from streamdiff.backends.torch_backend import TorchUNet
from streamdiff.engine import EngineConfig
from streamdiff.models.tiny import SD_SCHEDULER
from streamdiff.testing import CountingUNet

SIZE = 64
TOLERANCE = 1e-4  # float32, max abs in [0, 1]


class CountingControlNet(torch.nn.Module):
    """A ControlNet that records the rows of every call."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.batches: list[int] = []

    def forward(self, sample, *args, **kwargs):
        self.batches.append(int(sample.shape[0]))
        return self.inner(sample, *args, **kwargs)


def picture(i: int) -> np.ndarray:
    """A deterministic 64×64 RGB frame with edges (shapes that move with ``i``)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    frame = np.stack([(xx * 4 + 9 * i) % 256, (yy * 3) % 256, ((xx // 8 + yy // 8 + i) % 2) * 200 + 20], -1)
    return frame.astype(np.uint8)


def control_picture(i: int) -> np.ndarray:
    """A deterministic 64×64 control image: a disc that moves with ``i``, in three arrangements."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    disc = ((xx - 20 - 2 * i) ** 2 + (yy - 30) ** 2 < 15 ** 2) * 255
    return np.stack([disc, disc[::-1], disc.T], -1).astype(np.uint8)


def make_engine(model, controlnets, max_streams: int = 4) -> StreamEngine:
    return StreamEngine(model, EngineConfig(max_streams=max_streams, max_batch_rows=32),
                        unet=CountingUNet(TorchUNet(model.unet)), controlnets=controlnets)


def streamdiff_run(engine, config, specs, image, control, seed, prompt, negative="", guidance_scale=1.0):
    """One frame through one stream of ``engine`` (flushed when the Stream Batch holds it back): ``[1, 3, H, W]``."""
    stream = engine.open_stream(config, prompt=prompt, negative_prompt=negative, guidance_scale=guidance_scale,
                                seed=seed, controlnets=specs)
    stream.submit(image, control_image=control)
    out = engine.step({})[stream]
    if out.images is None:
        out = engine.flush(stream)[0]
    stream.close()
    return out.images


def diffusers_run(model, controlnets, scales, image, controls, steps, strength, seed, prompt, negative="",
                  guidance_scale=1.0, start=0.0, end=1.0) -> torch.Tensor:
    """diffusers' ControlNet img2img pipeline for ``model`` (SD: ``StableDiffusionControlNetImg2ImgPipeline``, SDXL:
    ``StableDiffusionXLControlNetImg2ImgPipeline``) with the LCM scheduler → ``[1, 3, H, W]`` in [0, 1]."""
    from diffusers import LCMScheduler, StableDiffusionControlNetImg2ImgPipeline
    from diffusers import StableDiffusionXLControlNetImg2ImgPipeline

    single = len(controlnets) == 1
    common = dict(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
                  controlnet=controlnets[0] if single else list(controlnets), scheduler=LCMScheduler(**SD_SCHEDULER))
    if getattr(model, "sdxl", None) is not None:
        pipe = StableDiffusionXLControlNetImg2ImgPipeline(
            **common, text_encoder_2=model.text_encoder_2, tokenizer_2=model.tokenizer_2,
            requires_aesthetics_score=False, force_zeros_for_empty_prompt=True, add_watermarker=False)
    else:
        pipe = StableDiffusionControlNetImg2ImgPipeline(
            **common, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt, image=Image.fromarray(image), control_image=Image.fromarray(controls[0]) if single else
        [Image.fromarray(c) for c in controls], num_inference_steps=steps, strength=strength,
        guidance_scale=guidance_scale, negative_prompt=negative or None, output_type="pt",
        controlnet_conditioning_scale=scales[0] if single else list(scales),
        control_guidance_start=start, control_guidance_end=end,
        generator=torch.Generator().manual_seed(seed),
    )
    return out.images


def check_one_step_equals_diffusers(model, controlnets, cfg: str) -> None:
    """One step with one ControlNet (passthrough control image) equals diffusers' pipeline for ``model``, and the
    ControlNet changes the frame."""
    from streamdiff import ControlNetSpec, StreamConfig

    guidance = 1.0 if cfg == "none" else 1.6
    config = StreamConfig(width=SIZE, height=SIZE, t_index_list=(3,), num_inference_steps=4, cfg_type=cfg)
    spec = ControlNetSpec("a", scale=0.7, preprocessor="passthrough")
    got = streamdiff_run(make_engine(model, controlnets), config, [spec], picture(0), control_picture(0), 5,
                         "a red house", "blurry", guidance)
    expected = diffusers_run(model, [controlnets["a"]], [0.7], picture(0), [control_picture(0)], 4, 0.25, 5,
                             "a red house", "blurry" if cfg == "full" else "", guidance)
    without = streamdiff_run(make_engine(model, controlnets), config, [], picture(0), None, 5, "a red house",
                             "blurry", guidance)
    assert float((got - without).abs().max()) > 1e-3  # the ControlNet does something
    assert float((got - expected).abs().max()) <= TOLERANCE


def check_two_controlnets_equal_diffusers(model, controlnets) -> None:
    """Two ControlNets (scales 0.6 and 1.3; passthrough and Canny) equal diffusers' multi-ControlNet pipeline."""
    from streamdiff import ControlNetSpec, StreamConfig
    from streamdiff.models.controlnet import canny

    config = StreamConfig(width=SIZE, height=SIZE, t_index_list=(3,), num_inference_steps=4, cfg_type="none")
    edges = canny(picture(1), ControlNetSpec("b"))
    specs = [ControlNetSpec("a", scale=0.6, preprocessor="passthrough"), ControlNetSpec("b", scale=1.3)]
    got = streamdiff_run(make_engine(model, controlnets), config, specs, picture(1), control_picture(1), 7,
                         "a boat")
    expected = diffusers_run(model, [controlnets["a"], controlnets["b"]], [0.6, 1.3], picture(1),
                             [control_picture(1), edges], 4, 0.25, 7, "a boat")
    assert float((got - expected).abs().max()) <= TOLERANCE
