"""TensorRT: everything up to the GPU runs here (profiles, build plan, errors); the GPU part is marked ``gpu``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from streamdiff import BackendUnavailable, StreamConfig
from streamdiff.errors import EngineBuildError
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


def test_a_multi_stream_profile_is_tuned_for_the_shapes_its_streams_use() -> None:
    """Not batch 4 × 512² whatever the engine: the full batch (max_batch_rows U-Net rows, max_streams VAE frames)
    at the largest of the engine's listed sizes; without a size list, at opt_resolution."""
    from streamdiff.backends.keys import EngineShapes, tuned_size

    sizes = ((320, 256), (768, 448), (512, 512))
    assert tuned_size(sizes) == (768, 448)  # 344064 px beats 512² = 262144
    shapes = EngineShapes.for_engine(12, 6, sizes, opt_size=tuned_size(sizes))
    options = EngineOptions(min_resolution=128, max_resolution=1024)
    unet = trt_profile(Component.UNET, shape_range(Component.UNET, shapes, options, 64), **SD21)
    assert unet[0] == TensorProfile("sample", (1, 4, 16, 16), (12, 4, 56, 96), (12, 4, 128, 128))
    assert unet[1] == TensorProfile("timestep", (1,), (12,), (12,))
    decoder = trt_profile(Component.VAE_DECODER, shape_range(Component.VAE_DECODER, shapes, options, 8), **SD21)
    assert decoder == (TensorProfile("latents", (1, 4, 16, 16), (6, 4, 56, 96), (6, 4, 128, 128)),)
    # An odd listed size is rounded down to the U-Net's multiple (64 px here) and kept inside the range.
    odd = EngineShapes.for_engine(8, 2, ((1000, 300),), opt_size=(1000, 300))
    ranged = shape_range(Component.UNET, odd, EngineOptions(min_resolution=256, max_resolution=1024), 64)
    assert (ranged.opt_width, ranged.opt_height, ranged.opt_batch) == (960, 256, 8)
    # No listed sizes: opt_resolution, square; an explicit opt_batch still wins.
    plain = EngineShapes.for_engine(16, 8, ((640, 480),), opt_batch=6)
    fallback = shape_range(Component.UNET, plain, EngineOptions(opt_resolution=384), 64)
    assert (fallback.opt_batch, fallback.opt_height, fallback.opt_width) == (6, 384, 384)


def test_a_tuned_batch_outside_the_range_is_refused() -> None:
    from streamdiff import ConfigError
    from streamdiff.backends.keys import EngineShapes, tuned_size

    with pytest.raises(ConfigError, match=r"opt_batch=20 is outside its batch range \[1, 16\]"):
        EngineShapes.for_engine(16, 4, ((512, 512),), opt_batch=20)
    with pytest.raises(ConfigError, match="tuned_size needs at least one"):
        tuned_size(())


def test_build_plan_of_the_tiny_model(tiny_model, tmp_path: Path) -> None:
    config = StreamConfig(width=256, height=256, t_index_list=(20, 40), cfg_type="self")
    shapes = shape_range(Component.UNET, config, EngineOptions(), spatial_multiple(tiny_model, Component.UNET))
    plan = build_plan(Component.UNET, tmp_path / "model.onnx", shapes, latent_channels=tiny_model.latent_channels,
                      vae_scale_factor=tiny_model.vae_scale_factor, text_dim=64)
    described = plan.describe()
    assert described["precision"] == "float16" and described["strongly_typed"] is True
    assert described["onnx"] == "model.onnx"
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
    options = EngineOptions(engine_dir=tmp_path)
    frames = [torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    outputs = {}
    for backend in ("torch", "tensorrt"):
        pipe = StreamPipeline.from_pretrained("tiny", config, device="cuda", dtype="float16", backend=backend,
                                              engine_options=options, cuda_graphs=True)
        pipe.prepare(prompt="a red fox", seed=3)
        outputs[backend] = [pipe.step(frame.cuda()).images for frame in frames][1:]
    for expected, actual in zip(outputs["torch"], outputs["tensorrt"]):
        assert float((actual - expected).abs().max()) <= 2e-2


# -- the build against a fake tensorrt of each major version (10.x and 11.x) ------------------------------------------


@pytest.fixture(scope="module")
def tiny_graphs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model's U-Net and VAE decoder exported in float16, and the decoder in float32 (not folded: fast)."""
    from streamdiff.backends.onnx_export import UNetExport, VaeDecoder, component_spec, export_module
    from streamdiff.testing import tiny_components

    folder = tmp_path_factory.mktemp("graphs")
    parts = tiny_components()
    shapes = shape_range(Component.UNET, StreamConfig(width=64, height=64), EngineOptions(min_resolution=64,
                         max_resolution=128, opt_resolution=64), 32)
    out = {}
    for name, module, component, dtype in (
        ("unet16", UNetExport(parts["unet"]), Component.UNET, torch.float16),
        ("decoder16", VaeDecoder(parts["vae"]), Component.VAE_DECODER, torch.float16),
        ("decoder32", VaeDecoder(parts["vae"]), Component.VAE_DECODER, torch.float32),
    ):
        import copy

        spec = component_spec(component, latent_channels=4, vae_scale_factor=8, text_dim=64, dtype=dtype)
        out[name] = export_module(copy.deepcopy(module).to(dtype), spec, shapes, folder / name / "model.onnx", 17,
                                  fold=False)
    return out


def _engine_plan(component: Component, onnx_path: Path, max_batch_rows: int = 8):
    """The plan a multi-stream engine of ``max_batch_rows`` rows (and 4 streams) would build, sizes 256 and 512."""
    from streamdiff.backends.keys import EngineShapes

    shapes = EngineShapes.for_engine(max_batch_rows, 4, ((256, 256), (512, 384)))
    multiple = 32 if component is Component.UNET else 8
    return build_plan(component, onnx_path, shape_range(component, shapes, EngineOptions(), multiple),
                      latent_channels=4, vae_scale_factor=8, text_dim=64)


def test_build_is_strongly_typed_with_one_profile_over_the_engine_batch_range(
    fake_trt, tiny_graphs: dict[str, Path], tmp_path: Path
) -> None:
    from streamdiff.backends.tensorrt_build import build_engine

    plan = _engine_plan(Component.UNET, tiny_graphs["unet16"], max_batch_rows=8)
    fake_trt.cuda.free_bytes = 30 << 30
    seconds = build_engine(plan, tmp_path / "model.plan", trt=fake_trt, cuda=fake_trt.cuda)
    assert seconds >= 0 and (tmp_path / "model.plan").stat().st_size > 0

    builder = fake_trt.builders[-1]
    strongly_typed = 1 << fake_trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    assert builder.network.flags == strongly_typed  # and nothing else: no EXPLICIT_BATCH
    assert builder.config.flags == []  # no precision flag: the graph's float16 types decide
    assert plan.workspace_bytes is None  # sized at build time: half the 30 GiB free
    assert builder.config.pool_limits == {fake_trt.MemoryPoolType.WORKSPACE: 15 << 30}
    assert builder.config.timing_cache is None  # the plan names no timing cache file
    assert builder.config.builder_optimization_level == 3
    (profile,) = builder.config.profiles
    # The multi-stream engine's whole batch range 1 … max_batch_rows, tuned for the full batch; sides 256 … 1024 px.
    assert profile.shapes["sample"] == ((1, 4, 32, 32), (8, 4, 64, 64), (8, 4, 128, 128))
    assert profile.shapes["timestep"] == ((1,), (8,), (8,))
    assert profile.shapes["encoder_hidden_states"] == ((1, 77, 64), (8, 77, 64), (8, 77, 64))
    assert fake_trt.touched_removed == []  # no API that TensorRT 11 removed was touched (recorded on 10.x)

    engine = fake_trt.Runtime(fake_trt.Logger()).deserialize_cuda_engine((tmp_path / "model.plan").read_bytes())
    assert engine.get_tensor_dtype("sample") == fake_trt.DataType.HALF  # the graph's own type
    assert engine.get_tensor_dtype("timestep") == fake_trt.DataType.FLOAT


def test_vae_profile_spans_one_to_max_streams(fake_trt, tiny_graphs: dict[str, Path], tmp_path: Path) -> None:
    from streamdiff.backends.tensorrt_build import build_engine

    build_engine(_engine_plan(Component.VAE_DECODER, tiny_graphs["decoder16"]), tmp_path / "model.plan",
                 trt=fake_trt, cuda=fake_trt.cuda)
    (profile,) = fake_trt.builders[-1].config.profiles
    assert profile.shapes == {"latents": ((1, 4, 32, 32), (4, 4, 64, 64), (4, 4, 128, 128))}  # tuned for 4 streams


def test_a_float32_graph_is_refused_before_building(fake_trt, tiny_graphs: dict[str, Path], tmp_path: Path) -> None:
    from streamdiff.backends.tensorrt_build import build_engine

    with pytest.raises(EngineBuildError, match=r"is not a float16 graph \(float32: \d+"):
        build_engine(_engine_plan(Component.VAE_DECODER, tiny_graphs["decoder32"]), tmp_path / "model.plan",
                     trt=fake_trt)
    assert fake_trt.builders == [] and not (tmp_path / "model.plan").exists()


def test_a_profile_that_does_not_match_the_graph_is_an_error(fake_trt, tiny_graphs: dict[str, Path],
                                                             tmp_path: Path) -> None:
    from streamdiff.backends.tensorrt_build import build_engine

    wrong = _engine_plan(Component.VAE_DECODER, tiny_graphs["unet16"])  # a VAE profile for the U-Net's graph
    with pytest.raises(EngineBuildError, match=r"has inputs \{'sample': 4, 'timestep': 1, 'encoder_hidden_states'"):
        build_engine(wrong, tmp_path / "model.plan", trt=fake_trt, cuda=fake_trt.cuda)


@pytest.mark.parametrize("version", ["10.0.1", "9.3.0"])
def test_tensorrt_older_than_10_1_is_refused(version: str, monkeypatch: pytest.MonkeyPatch,
                                             tiny_graphs: dict[str, Path], tmp_path: Path) -> None:
    import sys

    from fake_tensorrt import make_fake_tensorrt
    from streamdiff.backends.tensorrt_build import build_engine

    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_tensorrt(version))
    with pytest.raises(BackendUnavailable, match=rf"TensorRT {version} is too old: streamdiff needs TensorRT >= 10.1"):
        build_engine(_engine_plan(Component.UNET, tiny_graphs["unet16"]), tmp_path / "model.plan")


def test_workspace_is_sized_from_free_memory() -> None:
    from streamdiff.backends.tensorrt_build import MAX_WORKSPACE, MIN_WORKSPACE, workspace_size

    assert workspace_size(30 << 30) == 15 << 30  # half of what is free
    assert workspace_size((10 << 30) + 12345) == 5 << 30  # whole MiB
    assert workspace_size(100 << 20) == MIN_WORKSPACE == 256 << 20  # a nearly full GPU still gets 256 MiB
    assert workspace_size(180 << 30) == MAX_WORKSPACE == 32 << 30  # capped on large GPUs
    assert workspace_size(8 << 30, fraction=0.25) == 2 << 30
    with pytest.raises(EngineBuildError, match=r"workspace fraction 1.5 is outside \(0, 1\]"):
        workspace_size(8 << 30, fraction=1.5)


def test_an_explicit_workspace_wins(fake_trt, tiny_graphs: dict[str, Path], tmp_path: Path) -> None:
    import dataclasses

    from streamdiff.backends.tensorrt_build import build_engine

    plan = dataclasses.replace(_engine_plan(Component.VAE_DECODER, tiny_graphs["decoder16"]), workspace_bytes=1 << 30)
    build_engine(plan, tmp_path / "model.plan", trt=fake_trt, cuda=fake_trt.cuda)
    assert fake_trt.builders[-1].config.pool_limits == {fake_trt.MemoryPoolType.WORKSPACE: 1 << 30}
    with pytest.raises(EngineBuildError, match="workspace_bytes=1000 is below"):
        dataclasses.replace(plan, workspace_bytes=1000)


def test_timing_cache_is_written_after_the_first_build_and_passed_to_the_next(
    fake_trt, tiny_graphs: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import dataclasses
    import json
    import logging

    from streamdiff.backends.tensorrt_build import build_engine

    cache_file = tmp_path / "engines" / ".tensorrt-timing" / "sm_90-tensorrt.cache"
    decoder = dataclasses.replace(_engine_plan(Component.VAE_DECODER, tiny_graphs["decoder16"]),
                                  timing_cache=cache_file)
    build_engine(decoder, tmp_path / "decoder.plan", trt=fake_trt, cuda=fake_trt.cuda)
    first = fake_trt.builders[-1].config
    assert first.loaded_timings == []  # no file yet: an empty cache was set
    saved = json.loads(cache_file.read_bytes())
    assert saved == first.timing_cache.entries and saved[0][0] == "latents"  # written after the build

    unet = dataclasses.replace(_engine_plan(Component.UNET, tiny_graphs["unet16"]), timing_cache=cache_file)
    with caplog.at_level(logging.INFO, logger="streamdiff.backends.tensorrt_build"):
        build_engine(unet, tmp_path / "unet.plan", trt=fake_trt, cuda=fake_trt.cuda)
    second = fake_trt.builders[-1].config
    assert second.loaded_timings == saved  # the second build starts from the first one's timings
    assert f"uses the timing cache {cache_file}" in caplog.text
    grown = json.loads(cache_file.read_bytes())
    assert grown[: len(saved)] == saved and {entry[0] for entry in grown} >= {"latents", "sample", "timestep"}
    assert [p.name for p in cache_file.parent.iterdir()] == [cache_file.name]  # no temporary files left


@pytest.mark.parametrize("content", [b"\x00 written by another TensorRT", b"\x7fELF not a cache at all"],
                         ids=["refused", "raises"])
def test_a_refused_timing_cache_is_replaced(content: bytes, fake_trt, tiny_graphs: dict[str, Path], tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    import dataclasses
    import json
    import logging

    from streamdiff.backends.tensorrt_build import build_engine

    cache_file = tmp_path / "timing.cache"
    cache_file.write_bytes(content)
    plan = dataclasses.replace(_engine_plan(Component.VAE_DECODER, tiny_graphs["decoder16"]), timing_cache=cache_file)
    with caplog.at_level(logging.WARNING):
        build_engine(plan, tmp_path / "model.plan", trt=fake_trt, cuda=fake_trt.cuda)
    assert "TensorRT refused the timing cache" in caplog.text
    assert fake_trt.builders[-1].config.loaded_timings == [] and json.loads(cache_file.read_bytes())


def test_the_timing_cache_lives_beside_the_engine_cache_per_gpu_and_version(tmp_path: Path) -> None:
    from test_backends_cache import BASE

    from streamdiff.backends.builders import TIMING_CACHE_DIR, timing_cache_path
    from streamdiff.backends.cache import EngineCache

    cache = EngineCache(tmp_path)
    key = BASE.with_changes(backend="tensorrt", backend_version="10.8.0", target="sm_90:NVIDIA-H100-80GB-HBM3")
    path = timing_cache_path(cache, key)
    assert path == tmp_path / TIMING_CACHE_DIR / "sm_90_NVIDIA-H100-80GB-HBM3-tensorrt-10.8.0.cache"
    assert timing_cache_path(cache, key.with_changes(component=Component.VAE_DECODER)) == path  # shared
    assert timing_cache_path(cache, key.with_changes(backend_version="11.4.0")) != path
    path.parent.mkdir()
    path.write_bytes(b"[]")
    assert cache.entries() == []  # never taken for an engine entry
