"""The engine cache: reuse, key sensitivity, validation on load, atomic writes, and an OS lock between processes."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamdiff.backends.cache import MANIFEST, EngineCache
from streamdiff.backends.keys import Component, EngineKey, ShapeRange

WORKER = Path(__file__).with_name("cache_worker.py")
BASE = EngineKey(
    model="some/model",
    weights="0123456789abcdef",
    loras=(("style.safetensors", 0.8),),
    component=Component.UNET,
    precision="float32",
    shapes=ShapeRange((2, 2), (256, 1024), (256, 1024), 2, 512, 512),
    opset=17,
    backend="onnx",
    backend_version="1.0",
    target="cpu:x86_64+avx512",
)
# One changed value per key field: every field must change the entry.
VARIANTS = {
    "model": "other/model",
    "weights": "fedcba9876543210",
    "loras": (("style.safetensors", 0.9),),
    "component": Component.VAE_DECODER,
    "precision": "bfloat16",
    "shapes": ShapeRange((2, 4), (256, 1024), (256, 1024), 2, 512, 512),
    "opset": 18,
    "backend": "tensorrt",
    "backend_version": "1.1",
    "target": "sm_86",
    "engine_format": 99,
    "extra": (("freezing", "1"),),
}


class Builder:
    """A real builder writing a small artifact; counts its builds."""

    def __init__(self, payload: bytes = b"engine" * 1000) -> None:
        self.payload = payload
        self.calls = 0

    def __call__(self, folder: Path) -> str:
        self.calls += 1
        (folder / "model.bin").write_bytes(self.payload)
        (folder / "extra.json").write_text("{}")
        return "model.bin"


def test_unchanged_key_reuses_the_entry(tmp_path: Path) -> None:
    cache, build = EngineCache(tmp_path), Builder()
    first = cache.get_or_build(BASE, build)
    second = EngineCache(tmp_path).get_or_build(dataclasses.replace(BASE), build)
    assert build.calls == 1
    assert first.path == second.path and second.artifact.read_bytes() == build.payload
    manifest = json.loads((first.path / MANIFEST).read_text())
    assert manifest["key"]["shapes"]["height"] == [256, 1024] and manifest["key"]["loras"] == [["style.safetensors", 0.8]]
    assert set(manifest["files"]) == {"model.bin", "extra.json"}


def test_every_key_field_changes_the_entry(tmp_path: Path) -> None:
    assert set(VARIANTS) == {f.name for f in dataclasses.fields(EngineKey)}, "a key field has no variant"
    cache, build = EngineCache(tmp_path), Builder()
    paths = {cache.get_or_build(BASE, build).path}
    for name, value in VARIANTS.items():
        paths.add(cache.get_or_build(dataclasses.replace(BASE, **{name: value}), build).path)
    assert build.calls == len(VARIANTS) + 1
    assert len(paths) == len(VARIANTS) + 1
    cache.get_or_build(dataclasses.replace(BASE, opset=18), build)
    assert build.calls == len(VARIANTS) + 1


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest", "delete"])
def test_damaged_entry_is_rebuilt_not_loaded(tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    cache, build = EngineCache(tmp_path), Builder()
    entry = cache.get_or_build(BASE, build)
    artifact = entry.artifact
    if damage == "truncate":
        artifact.write_bytes(artifact.read_bytes()[:100])
    elif damage == "flip":
        data = bytearray(artifact.read_bytes())
        data[len(data) // 2] ^= 0xFF
        artifact.write_bytes(bytes(data))
    elif damage == "manifest":
        (entry.path / MANIFEST).write_text('{"version": 1, "digest": ')
    else:
        artifact.unlink()
    with caplog.at_level(logging.WARNING, logger="streamdiff.backends.cache"):
        assert cache.load(BASE) is None
    assert "invalid" in caplog.text
    rebuilt = cache.get_or_build(BASE, build)
    assert build.calls == 2 and rebuilt.artifact.read_bytes() == build.payload


def test_entry_of_another_key_under_the_same_name_is_not_loaded(tmp_path: Path) -> None:
    cache, build = EngineCache(tmp_path), Builder()
    entry = cache.get_or_build(BASE, build)
    manifest = json.loads((entry.path / MANIFEST).read_text())
    manifest["key"]["opset"] = 99
    (entry.path / MANIFEST).write_text(json.dumps(manifest))
    assert cache.load(BASE) is None


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)

    def broken(folder: Path) -> str:
        (folder / "model.bin").write_bytes(b"half")
        raise RuntimeError("exporter crashed")

    with pytest.raises(RuntimeError, match="exporter crashed"):
        cache.get_or_build(BASE, broken)
    assert cache.load(BASE) is None
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".locks")] == []


def _worker(root: Path, mode: str, work: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(root), mode, str(work)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_for(path: Path, process: subprocess.Popen, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_builder_killed_mid_write_leaves_no_loadable_entry(tmp_path: Path) -> None:
    root, work = tmp_path / "engines", tmp_path / "work"
    work.mkdir()
    worker = _worker(root, "hang", work)
    try:
        _wait_for(work / "hanging", worker)
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert worker.returncode == -signal.SIGKILL
    from cache_worker import KEY  # noqa: E402 - the worker's key

    cache = EngineCache(root)
    assert list(root.glob(".tmp-*")), "the killed build should have left its temporary folder"
    assert cache.load(KEY) is None and not cache.entry_path(KEY).exists()
    build = Builder()
    entry = cache.get_or_build(KEY, build)  # the dead builder's lock is gone with it
    assert build.calls == 1 and cache.load(KEY) is not None and entry.artifact.read_bytes() == build.payload
    assert not list(root.glob(".tmp-*")), "the stale temporary folder should be cleaned up"


def test_two_concurrent_builders_produce_one_valid_entry(tmp_path: Path) -> None:
    root, work = tmp_path / "engines", tmp_path / "work"
    work.mkdir()
    first = _worker(root, "first", work)
    try:
        _wait_for(work / "first-building", first)
        second = _worker(root, "second", work)
        out1, err1 = first.communicate(timeout=120)
        out2, err2 = second.communicate(timeout=120)
    finally:
        for process in (first, locals().get("second")):
            if process is not None and process.poll() is None:
                process.kill()
    assert first.returncode == 0, err1
    assert second.returncode == 0, err2
    assert "waiting for another process" in err2
    assert (work / "builds.log").read_text().count("\n") == 1
    assert out1.strip() == out2.strip() != ""
    from cache_worker import KEY

    assert EngineCache(root).load(KEY) is not None


def test_entries_and_clear(tmp_path: Path) -> None:
    cache, build = EngineCache(tmp_path), Builder()
    cache.get_or_build(BASE, build)
    cache.get_or_build(dataclasses.replace(BASE, component=Component.VAE_ENCODER), build)
    entries = cache.entries()
    assert [m["key"]["component"] for _, m in entries] == ["unet", "vae_encoder"]
    assert all(cache.verify(path) is None for path, _ in entries)
    assert cache.clear(lambda m: m is not None and m["key"]["component"] == "unet") == 1
    assert cache.load(BASE) is None
    assert cache.clear() == 1 and cache.entries() == []
