"""Engine shapes and keys derived from the configuration, the model and the options."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from streamdiff import ConfigError, LoraSpec, StreamConfig
from streamdiff.backends.keys import (
    Component,
    EngineOptions,
    ShapeRange,
    cpu_isa,
    default_engine_dir,
    engine_key,
    shape_range,
    target_id,
    unet_batch_sizes,
)


@pytest.mark.parametrize(
    ("cfg_type", "batching", "expected"),
    [
        ("none", True, (6,)),  # n·F
        ("self", True, (6,)),  # n·F
        ("initialize", True, (8,)),  # (n+1)·F
        ("full", True, (12,)),  # 2n·F
        ("self", False, (2,)),  # F per step
        ("initialize", False, (2, 4)),  # F, and F + F negatives at the first step
        ("full", False, (4,)),  # 2F
    ],
)
def test_unet_batch_sizes_follow_the_cfg_mode(cfg_type: str, batching: bool, expected: tuple[int, ...]) -> None:
    config = StreamConfig(t_index_list=(10, 20, 30), frame_buffer_size=2, cfg_type=cfg_type,
                          use_denoising_batch=batching)
    assert unet_batch_sizes(config) == expected


def test_shape_range_covers_the_configuration_and_defaults() -> None:
    config = StreamConfig(width=512, height=384, t_index_list=(20, 40), cfg_type="initialize")
    shapes = shape_range(Component.UNET, config, EngineOptions(), 64)
    assert shapes == ShapeRange(batch=(3, 3), height=(256, 1024), width=(256, 1024), opt_batch=3, opt_height=512,
                                opt_width=512)
    assert shapes.contains(3, 384, 512) and not shapes.contains(4, 384, 512)
    vae = shape_range(Component.VAE_DECODER, config, EngineOptions(batch_sizes=(8,)), 8)
    assert vae.batch == (1, 1)
    wide = shape_range(Component.UNET, config, EngineOptions(batch_sizes=(1, 8)), 64)
    assert wide.batch == (1, 8) and wide.opt_batch == 3
    small = shape_range(Component.UNET, StreamConfig(width=64, height=64), EngineOptions(), 32)
    assert small.height == (64, 1024) and small.opt_height == 512
    # Default bounds come in buckets: sizes inside one bucket share the engine.
    assert shape_range(Component.UNET, StreamConfig(width=128, height=96), EngineOptions(), 32).height == (64, 1024)
    assert shape_range(Component.UNET, StreamConfig(width=1280, height=720), EngineOptions(), 64).width == (256, 2048)


def test_size_outside_the_range_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="width=1024 is outside the engine resolution range"):
        shape_range(Component.UNET, StreamConfig(width=1024, height=512), EngineOptions(max_resolution=768), 64)
    with pytest.raises(ConfigError, match="opset=16"):
        EngineOptions(opset=16)
    with pytest.raises(ConfigError, match="min_resolution=900 > max_resolution=600"):
        EngineOptions(min_resolution=900, max_resolution=600)


def test_engine_dir_default_and_environment(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.delenv("STREAMDIFF_ENGINE_DIR", raising=False)
    assert str(default_engine_dir()) == "engines"
    monkeypatch.setenv("STREAMDIFF_ENGINE_DIR", str(tmp_path))
    assert EngineOptions().directory == tmp_path
    assert EngineOptions(engine_dir=tmp_path / "x").directory == tmp_path / "x"


def test_cpu_target_names_the_isa() -> None:
    target = target_id(torch.device("cpu"))
    assert target.startswith("cpu:") and cpu_isa() in target
    assert torch.backends.cpu.get_cpu_capability().lower() in target


def test_model_derived_key_changes_with_what_changes_the_result(tiny_model) -> None:
    options = EngineOptions()

    def key(model=tiny_model, config=StreamConfig(width=256, height=256), component=Component.UNET):
        shapes = shape_range(component, config, options, 32)
        return engine_key(model, component, shapes, backend="onnx", backend_version="x", dtype=torch.float32,
                          opset=options.opset)

    base = key()
    assert key() == base and key().digest() == base.digest()
    # A size change inside the resolution range reuses the engine; the batch (cfg mode) and LoRAs do not.
    assert key(config=StreamConfig(width=384, height=256)) == base
    assert key(config=StreamConfig(width=256, height=256, cfg_type="full")).digest() != base.digest()
    assert key(config=StreamConfig(width=2048, height=256)).digest() != base.digest()
    lora = dataclasses.replace(tiny_model, loras=(LoraSpec("style.safetensors", 0.5),))
    lora2 = dataclasses.replace(tiny_model, loras=(LoraSpec("style.safetensors", 0.7),))
    assert len({base.digest(), key(model=lora).digest(), key(model=lora2).digest()}) == 3
    weights = dataclasses.replace(tiny_model, fingerprint="another-weights")
    assert key(model=weights).digest() != base.digest()
    assert key(component=Component.VAE_ENCODER).name.startswith("vae_encoder-onnx-")


def test_gpu_target_names_the_exact_gpu_and_its_compute_capability(monkeypatch: pytest.MonkeyPatch) -> None:
    from streamdiff.backends.keys import target_id

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L4")
    l4 = target_id(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 4090")
    rtx = target_id(torch.device("cuda:0"))
    assert (l4, rtx) == ("sm_89:NVIDIA-L4", "sm_89:NVIDIA-GeForce-RTX-4090")  # one architecture, two engines


def test_cpu_flags_are_read_from_cpuinfo(tmp_path) -> None:
    from streamdiff.backends.keys import cpu_flags, cpu_has_native_bf16

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    flags = cpu_flags(cpuinfo)
    assert flags == frozenset({"fpu", "avx2", "avx512f", "avx512_bf16"})
    assert cpu_has_native_bf16(flags)
    assert cpu_has_native_bf16(frozenset({"amx_bf16", "amx_tile"}))
    assert not cpu_has_native_bf16(frozenset({"avx2", "avx512f", "avx512_vnni"}))
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_bfloat16_is_the_cpu_default_only_where_it_is_native() -> None:
    from streamdiff.backends.device import resolve_dtype

    cpu = torch.device("cpu")
    assert resolve_dtype(None, cpu, cpu_flags=frozenset({"avx512f", "avx512_bf16"})) is torch.bfloat16
    assert resolve_dtype(None, cpu, cpu_flags=frozenset({"amx_bf16"})) is torch.bfloat16
    assert resolve_dtype(None, cpu, cpu_flags=frozenset({"avx2", "avx512f"})) is torch.float32
    assert resolve_dtype(None, cpu, cpu_flags=frozenset()) is torch.float32
    assert resolve_dtype("float32", cpu, cpu_flags=frozenset({"avx512_bf16"})) is torch.float32
    assert resolve_dtype(None, torch.device("cuda"), cpu_flags=frozenset({"avx512_bf16"})) is torch.float16


def test_the_key_holds_the_engine_format_not_the_package_version(tiny_model, monkeypatch: pytest.MonkeyPatch) -> None:
    """A release that changes nothing in the artifacts keeps every engine; a change of the format rebuilds them."""
    import streamdiff
    from streamdiff.backends import keys

    shapes = shape_range(Component.UNET, StreamConfig(width=256, height=256), EngineOptions(), 32)

    def key():  # noqa: ANN202
        return engine_key(tiny_model, Component.UNET, shapes, backend="tensorrt", backend_version="10.8.0",
                          dtype=torch.float16, opset=17, target="sm_90:NVIDIA-H100")

    base = key()
    assert base.engine_format == keys.ENGINE_FORMAT and "streamdiff_version" not in base.to_dict()
    monkeypatch.setattr(streamdiff, "__version__", "9.9.9")
    assert key().digest() == base.digest()
    monkeypatch.setattr(keys, "ENGINE_FORMAT", keys.ENGINE_FORMAT + 1)
    bumped = key()
    assert bumped.digest() != base.digest() and bumped.to_dict()["engine_format"] == base.engine_format + 1
