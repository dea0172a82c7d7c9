"""TensorRT: everything up to the GPU runs here (profiles, build plan, errors); the GPU part is marked ``gpu``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from streamdiff import BackendUnavailable, StreamConfig
from streamdiff.backends.builders import spatial_multiple
from streamdiff.backends.keys import Component, EngineOptions, shape_range
from streamdiff.backends.tensorrt_build import TensorProfile, build_engine, build_plan, trt_profile

SD21 = dict(latent_channels=4, vae_scale_factor=8, text_length=77, text_dim=1024)


def test_unet_profile_is_what_the_configuration_implies() -> None:
    config = StreamConfig(width=512, height=448, t_index_list=(20, 30, 40), frame_buffer_size=2, cfg_type="full")
    options = EngineOptions(min_resolution=256, max_resolution=768, opt_resolution=512)
    shapes = shape_range(Component.UNET, config, options, 64)
    assert trt_profile(Component.UNET, shapes, **SD21) == (
        # 2n·F = 12 rows in full CFG; latents are 1/8 of the 256..768 px range, tuned for 512 px.
        TensorProfile("sample", (12, 4, 32, 32), (12, 4, 64, 64), (12, 4, 96, 96)),
        TensorProfile("timestep", (12,), (12,), (12,)),
        TensorProfile("encoder_hidden_states", (12, 77, 1024), (12, 77, 1024), (12, 77, 1024)),
    )


def test_sequential_initialize_profile_spans_both_batches() -> None:
    config = StreamConfig(width=512, height=512, t_index_list=(20, 40), frame_buffer_size=1, cfg_type="initialize",
                          use_denoising_batch=False)
    shapes = shape_range(Component.UNET, config, EngineOptions(), 64)
    sample = trt_profile(Component.UNET, shapes, **SD21)[0]
    # F rows per later step, F + F negatives at the first: the profile spans 1..2, tuned for the common F.
    assert (sample.min[0], sample.opt[0], sample.max[0]) == (1, 1, 2)
    assert (sample.min[2:], sample.max[2:]) == ((32, 32), (128, 128))  # 256..1024 px by default


def test_vae_profiles_use_the_frame_buffer() -> None:
    config = StreamConfig(width=512, height=512, t_index_list=(20, 40), frame_buffer_size=3)
    options = EngineOptions(min_resolution=256, max_resolution=1024, batch_sizes=(16,))
    encoder = shape_range(Component.VAE_ENCODER, config, options, 8)
    decoder = shape_range(Component.VAE_DECODER, config, options, 8)
    assert trt_profile(Component.VAE_ENCODER, encoder, **SD21) == (
        TensorProfile("images", (3, 3, 256, 256), (3, 3, 512, 512), (3, 3, 1024, 1024)),
    )
    assert trt_profile(Component.VAE_DECODER, decoder, **SD21) == (
        TensorProfile("latents", (3, 4, 32, 32), (3, 4, 64, 64), (3, 4, 128, 128)),
    )


def test_build_plan_of_the_tiny_model(tiny_model, tmp_path: Path) -> None:
    config = StreamConfig(width=256, height=256, t_index_list=(20, 40), cfg_type="self")
    shapes = shape_range(Component.UNET, config, EngineOptions(), spatial_multiple(tiny_model, Component.UNET))
    plan = build_plan(Component.UNET, tmp_path / "model.onnx", shapes, latent_channels=tiny_model.latent_channels,
                      vae_scale_factor=tiny_model.vae_scale_factor, text_dim=64)
    described = plan.describe()
    assert described["fp16"] is True and described["onnx"] == "model.onnx"
    assert described["profile"]["sample"] == {"min": [2, 4, 32, 32], "opt": [2, 4, 64, 64], "max": [2, 4, 128, 128]}
    assert described["profile"]["encoder_hidden_states"]["max"] == [2, 77, 64]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_building_without_tensorrt_names_the_extra(tmp_path: Path) -> None:
    plan = build_plan(Component.VAE_DECODER, tmp_path / "model.onnx",
                      shape_range(Component.VAE_DECODER, StreamConfig(), EngineOptions(), 8),
                      latent_channels=4, vae_scale_factor=8)
    with pytest.raises(BackendUnavailable, match=r"pip install 'streamdiff\[tensorrt\]'"):
        build_engine(plan, tmp_path / "model.plan")


@pytest.mark.gpu
def test_tensorrt_pipeline_matches_torch_on_the_gpu(tmp_path: Path) -> None:
    """Never run on the development machines (no GPU): builds fp16 engines of the tiny model and compares."""
    from streamdiff import StreamPipeline

    config = StreamConfig(width=256, height=256, t_index_list=(20, 40))
    options = EngineOptions(engine_dir=tmp_path, cuda_graph=True)
    frames = [torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    outputs = {}
    for backend in ("torch", "tensorrt"):
        pipe = StreamPipeline.from_pretrained("tiny", config, device="cuda", dtype="float16", backend=backend,
                                              engine_options=options)
        pipe.prepare(prompt="a red fox", seed=3)
        outputs[backend] = [pipe.step(frame.cuda()).images for frame in frames][1:]
    for expected, actual in zip(outputs["torch"], outputs["tensorrt"]):
        assert float((actual - expected).abs().max()) <= 2e-2
