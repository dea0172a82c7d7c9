"""ONNX Runtime: the IO-binding output path (DLPack) on a real CPU session, the CUDA provider configuration, the
stream ordering of a bound run (fake CUDA seam) and the session options the factory derives for a GPU model."""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

import pytest
import torch

from fake_cuda import FakeCuda
from streamdiff.backends.keys import Component, EngineOptions, EngineShapes, ShapeRange
from streamdiff.backends.onnx_export import UNetExport, VaeDecoder, component_spec, export_module
from streamdiff.backends.onnxruntime_backend import (
    CPU_EP,
    CUDA_EP,
    TENSORRT_EP,
    OrtSession,
    check_providers,
    OrtUNet,
    provider_options,
)
from streamdiff.backends.tensorrt_build import TensorProfile
from streamdiff.errors import BackendUnavailable, ConfigError
from streamdiff.testing import tiny_components

CPU = torch.device("cpu")
SHAPES = ShapeRange((1, 4), (32, 128), (32, 128), 2, 64, 64)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """The tiny U-Net in float32 and the tiny VAE decoder in float16, exported (not folded: fast)."""
    folder = tmp_path_factory.mktemp("ort")
    parts = tiny_components()
    out = {}
    for name, module, component, dtype in (
        ("unet32", UNetExport(parts["unet"]), Component.UNET, torch.float32),
        ("decoder16", VaeDecoder(copy.deepcopy(parts["vae"]).half()), Component.VAE_DECODER, torch.float16),
    ):
        spec = component_spec(component, latent_channels=4, vae_scale_factor=8, text_dim=64, dtype=dtype)
        path = export_module(module, spec, SHAPES, folder / name / "model.onnx", 17, fold=False)
        out[name] = (path, module)
    return out


def test_io_binding_hands_the_output_to_torch_through_dlpack(graphs) -> None:
    path, module = graphs["unet32"]
    bound, plain = OrtSession(path, CPU, io_binding=True), OrtSession(path, CPU)
    assert bound.io_binding and not plain.io_binding
    spec = component_spec(Component.UNET, latent_channels=4, vae_scale_factor=8, text_dim=64)
    for batch, side in ((2, 64), (3, 96)):
        inputs = spec.make_inputs(batch, side, side)
        feeds = dict(zip(spec.inputs, inputs))
        out = bound.run(feeds)
        with torch.no_grad():
            expected = module(*inputs)
        assert out.shape == expected.shape and out.dtype == torch.float32
        assert torch.equal(out, plain.run(feeds))  # the same session maths either way
        assert float((out - expected).abs().max()) <= 1e-4 * float(expected.abs().max())
    first = bound.run(feeds)
    kept = first.clone()
    for _ in range(3):
        bound.run(feeds)  # later runs allocate new outputs: the earlier one stays valid
    assert torch.equal(first, kept)


def test_float16_graph_takes_and_gives_float16(graphs) -> None:
    path, module = graphs["decoder16"]
    session = OrtSession(path, CPU, io_binding=True)
    assert session.input_types["latents"][0] == torch.float16
    latents = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(1))
    out = session.run({"latents": latents})  # float32 in: cast to the graph's type on the way
    assert out.dtype == torch.float16 and out.shape == (2, 3, 64, 96)
    with torch.no_grad():
        expected = module(latents.half()).float()
    assert float((out.float() - expected).abs().max()) <= 2e-2 * float(expected.abs().max())


def test_unet_engine_returns_the_sample_dtype(graphs) -> None:
    path, module = graphs["unet32"]
    unet = OrtUNet(path, CPU, io_binding=True)
    sample = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16)
    out = unet(sample, torch.tensor([999, 500]), torch.randn(2, 77, 64))
    assert out.dtype == torch.bfloat16 and out.shape == sample.shape


PROFILE = (
    TensorProfile("sample", (1, 4, 32, 32), (4, 4, 64, 64), (8, 4, 128, 128)),
    TensorProfile("timestep", (1,), (4,), (8,)),
)


def test_gpu_providers_are_configured_tensorrt_first(tmp_path: Path) -> None:
    available = [TENSORRT_EP, CUDA_EP, CPU_EP]
    chosen = provider_options(torch.device("cuda:1"), available, graph_dtype=torch.float16,
                              tensorrt_cache=tmp_path / "trt", profile=PROFILE, stream_handle=0x7F00,
                              workspace_bytes=6 << 30)
    assert [name for name, _ in chosen] == [TENSORRT_EP, CUDA_EP, CPU_EP]
    assert chosen[0][1] == {
        "device_id": 1, "user_compute_stream": str(0x7F00), "trt_fp16_enable": True,
        "trt_engine_cache_enable": True, "trt_timing_cache_enable": True, "trt_engine_cache_path": str(tmp_path / "trt"),
        "trt_timing_cache_path": str(tmp_path / "trt"),
        "trt_builder_optimization_level": 3, "trt_max_workspace_size": 6 << 30,
        "trt_profile_min_shapes": "sample:1x4x32x32,timestep:1", "trt_profile_opt_shapes": "sample:4x4x64x64,timestep:4",
        "trt_profile_max_shapes": "sample:8x4x128x128,timestep:8",
    }
    assert chosen[1][1] == {"device_id": 1, "user_compute_stream": str(0x7F00)}
    fp32 = provider_options(torch.device("cuda"), available, graph_dtype=torch.float32)
    assert fp32[0][1]["trt_fp16_enable"] is False and fp32[0][1]["device_id"] == 0
    assert "user_compute_stream" not in fp32[1][1]


def test_provider_preference_and_what_is_missing() -> None:
    available = [TENSORRT_EP, CUDA_EP, CPU_EP]
    only_cuda = provider_options(torch.device("cuda"), available, preference=(CUDA_EP,))
    assert [name for name, _ in only_cuda] == [CUDA_EP, CPU_EP]
    assert provider_options(CPU, available) == [(CPU_EP, {})]
    # The default preference takes the GPU providers this build has; with none of them it refuses (no quiet CPU).
    assert [n for n, _ in provider_options(torch.device("cuda"), [CUDA_EP, CPU_EP])] == [CUDA_EP, CPU_EP]
    with pytest.raises(BackendUnavailable, match=(
        r"needs TensorrtExecutionProvider or CUDAExecutionProvider, but this onnxruntime build has only "
        r"AzureExecutionProvider, CPUExecutionProvider; install pip install 'streamdiff\[onnx-gpu\]'"
    )):
        provider_options(torch.device("cuda"), ["AzureExecutionProvider", CPU_EP])
    # An explicit preference is passed on as asked: the session's providers are checked after it is made.
    explicit = provider_options(torch.device("cuda"), [CPU_EP], preference=(CUDA_EP,))
    assert [name for name, _ in explicit] == [CUDA_EP, CPU_EP]
    assert provider_options(torch.device("cuda"), available, preference=(CPU_EP,)) == [(CPU_EP, {})]  # as asked
    with pytest.raises(ConfigError, match="onnx_providers \\['OpenVINOExecutionProvider'\\] are not among"):
        provider_options(torch.device("cuda"), available, preference=("OpenVINOExecutionProvider",))


def test_a_session_without_its_requested_gpu_provider_is_refused(graphs, monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime's CPU build has no CUDA provider: asked for it, ONNX Runtime makes a CPU session (and only warns);
    the backend refuses it, naming what was requested and what was obtained."""
    import onnxruntime

    assert CUDA_EP not in onnxruntime.get_available_providers()
    path, _ = graphs["decoder16"]
    with pytest.warns(UserWarning, match="CUDAExecutionProvider"), pytest.raises(BackendUnavailable, match=(
        r"ONNX Runtime did not load CUDAExecutionProvider for decoder16: requested CUDAExecutionProvider, "
        r"CPUExecutionProvider, obtained CPUExecutionProvider"
    )):
        OrtSession(path, torch.device("cuda"), providers=(CUDA_EP,), cuda=FakeCuda())
    # The TensorRT provider too, and its builder workspace comes from the GPU's free memory (20 GiB free -> 10).
    made = []
    real = onnxruntime.InferenceSession

    def recording(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        made.append(kwargs["providers"])
        return real(*args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", recording)
    with pytest.warns(UserWarning), pytest.raises(BackendUnavailable, match="did not load TensorrtExecutionProvider"):
        OrtSession(path, torch.device("cuda"), providers=(TENSORRT_EP,), cuda=FakeCuda(free_bytes=20 << 30))
    assert made[0][0][0] == TENSORRT_EP and made[0][0][1]["trt_max_workspace_size"] == 10 << 30
    cpu = OrtSession(path, CPU, providers=(CUDA_EP,))  # on the CPU device the preference does not apply
    assert cpu.providers == [CPU_EP] and cpu.run({"latents": torch.randn(1, 4, 8, 8)}).shape == (1, 3, 64, 64)


def test_the_provider_check_itself(caplog: pytest.LogCaptureFixture) -> None:
    both = [TENSORRT_EP, CUDA_EP, CPU_EP]
    check_providers(both, both, explicit=True, path="x/model.onnx")
    check_providers([CPU_EP], [CPU_EP], explicit=False, path="x/model.onnx")  # a CPU request is always fine
    with caplog.at_level(logging.WARNING):
        check_providers(both, [CUDA_EP, CPU_EP], explicit=False, path="unet-onnx-1/model.onnx")
    assert "did not load TensorrtExecutionProvider for unet-onnx-1 (obtained CUDAExecutionProvider" in caplog.text
    with pytest.raises(BackendUnavailable, match="did not load TensorrtExecutionProvider"):
        check_providers(both, [CUDA_EP, CPU_EP], explicit=True, path="unet-onnx-1/model.onnx")
    with pytest.raises(BackendUnavailable, match="did not load TensorrtExecutionProvider, CUDAExecutionProvider"):
        check_providers(both, [CPU_EP], explicit=False, path="unet-onnx-1/model.onnx")


def test_a_bound_gpu_run_is_ordered_after_torchs_stream_and_before_its_next_work(graphs) -> None:
    """The CUDA half of the bound run, with the device faked: the session's stream waits for torch's current stream
    before the run, and torch's stream waits for the session's after it."""
    path, _ = graphs["decoder16"]
    cuda = FakeCuda()
    session = OrtSession(path, CPU, io_binding=True, cuda=cuda)
    session.on_gpu, session.stream = True, cuda.new_stream(CPU)  # as on a CUDA device (the data stays on the CPU)
    real_run = session.session.run_with_iobinding

    class Recording:
        def __getattr__(self, name: str):  # noqa: ANN204
            return getattr(real_session, name)

        def run_with_iobinding(self, binding, run_options=None) -> None:  # noqa: ANN001
            cuda.events.append(("run",))
            real_run(binding)

    real_session, session.session = session.session, Recording()
    out = session.run({"latents": torch.randn(1, 4, 8, 8)})
    stream = session.stream.handle
    assert cuda.events == [("wait", stream, 0), ("run",), ("wait", 0, stream)]
    assert out.shape == (1, 3, 64, 64) and bool(torch.isfinite(out).all())


def test_factory_gives_a_float16_model_float16_graphs_and_the_tensorrt_provider_its_profile(
    tiny_model, tmp_path: Path
) -> None:
    from streamdiff.backends.builders import plan_builds
    from streamdiff.backends.cache import EngineCache
    from streamdiff.backends.factory import ORT_TENSORRT_CACHE, onnxruntime_session_options
    from streamdiff.config import BackendKind

    gpu_model = dataclasses.replace(tiny_model, device=torch.device("cuda"), dtype=torch.float16)
    options = EngineOptions(engine_dir=tmp_path, onnx_providers=(CUDA_EP,))
    shapes = EngineShapes.for_engine(12, 4, ((512, 512),))
    steps = plan_builds(BackendKind.ONNXRUNTIME, gpu_model, shapes, options, EngineCache(tmp_path))
    keys = {step.component: step.key for step in steps}
    assert {key.precision for key in keys.values()} == {"float16"}  # exported in float16 for float16 runs
    session = onnxruntime_session_options(gpu_model, options, keys)
    unet = session[Component.UNET]
    assert unet["graph_dtype"] == torch.float16 and unet["providers"] == (CUDA_EP,)
    assert unet["tensorrt_cache"] == tmp_path / ORT_TENSORRT_CACHE
    sample = unet["profile"][0]
    assert (sample.name, sample.min[0], sample.opt[0], sample.max[0]) == ("sample", 1, 12, 12)  # tuned: full
    assert session[Component.VAE_DECODER]["profile"][0].max[0] == 4  # one frame per stream at most
    cpu_keys = {s.component: s.key for s in plan_builds(BackendKind.ONNXRUNTIME, tiny_model, shapes, options,
                                                         EngineCache(tmp_path))}
    assert {key.precision for key in cpu_keys.values()} == {"float32"}


def test_offloading_moves_unet_and_vae_to_the_cpu_only(tiny_model) -> None:
    from streamdiff.backends.factory import offload_torch_modules

    moved = []

    class Module:
        def __init__(self, name: str) -> None:
            self.name = name

        def to(self, device: str) -> "Module":
            moved.append((self.name, device))
            return self

    model = dataclasses.replace(tiny_model, unet=Module("unet"), vae=Module("vae"), text_encoder=Module("text"))
    cuda = FakeCuda()
    offload_torch_modules(model, cuda)
    assert moved == [("unet", "cpu"), ("vae", "cpu")] and cuda.events == [("empty_cache",)]


@pytest.mark.parametrize("io_binding", [False, True])
def test_the_arena_shrinks_beyond_max_shapes_and_after_a_failed_run(graphs, io_binding: bool) -> None:
    """More than ``max_shapes`` frame sizes, or a failed run, make the next run shrink the arena (its memory for
    sizes no longer running goes back); the values never change."""
    path, module = graphs["unet32"]
    session = OrtSession(path, CPU, io_binding=io_binding, max_shapes=2)
    spec = component_spec(Component.UNET, latent_channels=4, vae_scale_factor=8, text_dim=64)

    def check(side: int) -> None:
        inputs = spec.make_inputs(2, side, side)
        with torch.no_grad():
            expected = module(*inputs)
        out = session.run(dict(zip(spec.inputs, inputs)))
        assert float((out - expected).abs().max()) <= 1e-4 * float(expected.abs().max())

    for side in (64, 96, 64):
        check(side)
    assert session.shrinks == 0 and list(session.sizes) == [((12, 12),), ((8, 8),)]
    check(128)  # a third size: this run shrinks the arena, only it is counted now
    assert session.shrinks == 1 and list(session.sizes) == [((16, 16),)]
    bad = dict(zip(spec.inputs, spec.make_inputs(2, 64, 64)))
    bad["sample"] = bad["sample"][..., :5, :5]  # a latent the traced graph cannot run: its skip concat fails
    with pytest.raises(Exception, match="(?i)concat"):
        session.run(bad)
    check(128)
    assert session.shrinks == 2  # the run after the failed one shrank the arena
