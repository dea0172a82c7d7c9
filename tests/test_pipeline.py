"""The stream pipeline on the real tiny model (CPU, float32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamdiff import CfgMode, ConfigError, FrameError, StreamConfig, StreamDiffError, StreamPipeline
from streamdiff.backends.torch_backend import TorchUNet
from streamdiff.testing import CountingUNet

SIZE = 64


def make_pipe(model, **kwargs) -> StreamPipeline:
    config = StreamConfig(width=SIZE, height=SIZE, **kwargs)
    return StreamPipeline(model, config, unet=CountingUNet(TorchUNet(model.unet)))


def as_batches(frames: list[np.ndarray], f: int) -> list[np.ndarray]:
    return [np.stack(frames[i : i + f]) for i in range(0, len(frames) - f + 1, f)]


def to_tensor(batch: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255


@pytest.mark.parametrize("mode", ["none", "full", "self", "initialize"])
@pytest.mark.parametrize("f", [1, 2])
@pytest.mark.parametrize("t_index_list", [[25], [20, 40], [15, 30, 45], [12, 24, 36, 45]])
def test_stream_batch_equals_sequential(tiny_model, frames, mode: str, f: int, t_index_list: list[int]) -> None:
    """Frame k out of the staggered batch equals frame k denoised step by step (float32, max abs diff <= 1e-5).

    The residual difference is GEMM rounding that depends on the batch size (~1e-6 per U-Net call here); the
    analytic-U-Net version of this property in tests/core/test_step.py holds to 1e-12 over the whole timestep range.
    """
    pipes = []
    for use_denoising_batch in (True, False):
        pipe = make_pipe(
            tiny_model, t_index_list=t_index_list, cfg_type=mode, frame_buffer_size=f,
            use_denoising_batch=use_denoising_batch,
        )
        pipe.prepare("a watercolor portrait", negative_prompt="blurry", guidance_scale=1.6, delta=0.9, seed=5)
        pipes.append(pipe)
    batched, sequential = pipes
    inputs = [to_tensor(x) for x in as_batches(frames, f)]
    got = [out.images for out in (batched.step(x) for x in inputs) if out.images is not None]
    got += [out.images for out in batched.flush()]
    expected = [sequential.step(x).images for x in inputs]
    assert len(got) == len(expected) == len(inputs)
    worst = max((a - b).abs().max().item() for a, b in zip(got, expected))
    assert worst <= 1e-5


@pytest.mark.parametrize(
    "mode, per_call", [("none", lambda n, f: n * f), ("self", lambda n, f: n * f),
                       ("initialize", lambda n, f: (n + 1) * f), ("full", lambda n, f: 2 * n * f)]
)
@pytest.mark.parametrize("n, f", [(1, 1), (2, 1), (3, 2)])
def test_unet_batch_per_cfg_mode(tiny_model, frames, mode: str, per_call, n: int, f: int) -> None:
    pipe = make_pipe(tiny_model, t_index_list=list(range(10, 10 + 10 * n, 10)), cfg_type=mode, frame_buffer_size=f)
    pipe.prepare("p", guidance_scale=1.5)
    for x in as_batches(frames, f):
        pipe(x)
    assert pipe.unet.batches == [per_call(n, f)] * len(as_batches(frames, f))


def test_output_kinds_and_warmup(tiny_model, frames) -> None:
    pipe = make_pipe(tiny_model, t_index_list=[20, 30, 40])
    pipe.prepare("a cat")
    outs = [pipe(x) for x in frames[:4]]
    assert outs[0] is None and outs[1] is None
    assert outs[2].shape == (SIZE, SIZE, 3) and outs[2].dtype == np.uint8
    tensor_out = pipe(torch.rand(1, 3, SIZE, SIZE))
    assert isinstance(tensor_out, torch.Tensor) and tensor_out.shape == (1, 3, SIZE, SIZE)
    assert 0.0 <= tensor_out.min() and tensor_out.max() <= 1.0
    assert len(pipe.flush()) == 2
    assert pipe.stats.frames_out == 5


def test_same_seed_same_frames_other_seed_differs(tiny_model, frames) -> None:
    def run(seed: int) -> list[np.ndarray]:
        pipe = make_pipe(tiny_model, t_index_list=[20, 40])
        pipe.prepare("a cat", seed=seed)
        return [pipe(x) for x in frames[:4]][1:]

    a, b, c = run(3), run(3), run(4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert any(not np.array_equal(x, y) for x, y in zip(a, c))


def test_initial_noise_is_streamdiffusion_compatible(tiny_model) -> None:
    pipe = make_pipe(tiny_model, t_index_list=[10, 30], frame_buffer_size=2)
    pipe.prepare("a", seed=11)
    expected = torch.randn((4, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(11))
    assert torch.equal(pipe.state.buffers.init_noise, expected)


def test_prompt_encoder_runs_once_over_100_frames(tiny_model, frames) -> None:
    for mode in CfgMode:
        pipe = make_pipe(tiny_model, t_index_list=[30], cfg_type=mode)
        pipe.prepare("a watercolor portrait", negative_prompt="ugly")
        calls = pipe.prompts.encoder_calls
        assert calls == (2 if mode in (CfgMode.FULL, CfgMode.INITIALIZE) else 1)
        for i in range(100):
            pipe(frames[i % len(frames)])
        assert pipe.prompts.encoder_calls == calls


@pytest.mark.parametrize("mode", ["none", "full", "self", "initialize"])
def test_live_updates_in_every_mode(tiny_model, frames, mode: str) -> None:
    pipe = make_pipe(tiny_model, t_index_list=[20, 40], cfg_type=mode)
    pipe.prepare("a cat", negative_prompt="", guidance_scale=1.2, delta=1.0, seed=2)
    for x in frames[:3]:
        pipe(x)
    before = pipe(frames[3])
    changes = [
        {"prompt": "a dog"},
        {"negative_prompt": "blurry"},
        {"guidance_scale": 2.5},
        {"delta": 0.5},
        {"seed": 9},
        {"t_index_list": [10, 30]},
        {"t_index_list": [10, 25, 40]},
        {"num_inference_steps": 40, "t_index_list": [10, 30]},
        {"filter": {"enabled": True, "threshold": 0.99, "max_skip_frames": 2}},
        {"filter": {"enabled": False}},
        {"use_denoising_batch": False},
        {"use_denoising_batch": True},
        {"frame_buffer_size": 2},
        {"cfg_type": "full" if mode != "full" else "self"},
        {"width": SIZE + 8, "height": SIZE - 8},
    ]
    for change in changes:
        pipe.update(**change)
        f, h, w = pipe.config.frame_buffer_size, pipe.config.height, pipe.config.width
        batch = np.stack([np.resize(frames[0], (h, w, 3))] * f)
        outs = [pipe(batch) for _ in range(pipe.config.denoising_steps)]
        assert outs[-1] is not None and outs[-1].shape == (f, h, w, 3), change
    assert not np.array_equal(before, outs[-1][0][: SIZE - 8, :SIZE])


def test_update_prompt_changes_output_without_reload(tiny_model, frames) -> None:
    pipe = make_pipe(tiny_model, t_index_list=[30], cfg_type="full")
    pipe.prepare("a cat", negative_prompt="", guidance_scale=3.0)
    a = pipe(frames[0])
    unet_module = pipe.model.unet
    pipe.update(prompt="a neon city at night")
    b = pipe(frames[0])
    assert pipe.model.unet is unet_module
    assert not np.array_equal(a, b)


def test_txt2img_one_step_and_multi_step(tiny_model) -> None:
    pipe = make_pipe(tiny_model, t_index_list=[0], mode="txt2img", cfg_type="none")
    pipe.prepare("a castle")
    image = pipe.txt2img()
    assert image.shape == (1, 3, SIZE, SIZE)
    multi = make_pipe(tiny_model, t_index_list=[0, 25], mode="txt2img")
    multi.prepare("a castle")
    assert multi() is None
    assert multi().shape == (1, 3, SIZE, SIZE)


def test_similarity_filter_skips_static_input(tiny_model, frames) -> None:
    pipe = make_pipe(tiny_model, t_index_list=[30], filter={"enabled": True, "threshold": 0.9, "max_skip_frames": 3})
    pipe.prepare("a cat")
    first = pipe.step(torch.from_numpy(frames[0]).permute(2, 0, 1)[None].float() / 255)
    results = [pipe.step(torch.from_numpy(frames[0]).permute(2, 0, 1)[None].float() / 255) for _ in range(12)]
    skipped = [r.skipped for r in results]
    assert skipped == [True, True, True, False] * 3  # static input: skip up to the cap, then process one
    assert all(torch.equal(r.images, first.images) for r in results if r.skipped)
    assert pipe.unet.batches == [1] * 4
    assert pipe.stats.filter_skips == 9


def test_invalid_inputs_raise_clear_errors(tiny_model, frames) -> None:
    pipe = make_pipe(tiny_model)
    with pytest.raises(StreamDiffError, match="call prepare"):
        pipe(frames[0])
    with pytest.raises(ConfigError, match="prompt is missing"):
        pipe.prepare()
    pipe.prepare("x")
    with pytest.raises(FrameError, match=r"image shape \(1, 3, 32, 32\) does not match the stream's \[1, 3, 64, 64\]"):
        pipe(torch.rand(1, 3, 32, 32))
    with pytest.raises(FrameError, match="dtype float64 is not uint8"):
        pipe(np.zeros((SIZE, SIZE, 3)))
    with pytest.raises(FrameError, match="img2img mode needs an input frame"):
        pipe(None)
    with pytest.raises(ConfigError, match=r"width=60 is not a multiple of 8 \(the tiny-random model.s VAE factor 8\)"):
        StreamPipeline(tiny_model, StreamConfig(width=60, height=64))
    with pytest.raises(ConfigError, match="t_index_list entry 50"):
        pipe.update(t_index_list=[10, 50])
    with pytest.raises(ConfigError, match="height=20 is not a multiple"):
        pipe.update(height=20)
    assert pipe.config.height == SIZE  # a rejected update leaves the stream as it was
