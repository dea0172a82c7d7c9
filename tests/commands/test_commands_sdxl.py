"""``streamdiff run`` and ``streamdiff serve`` with the built-in SDXL-architecture model ``tiny-sdxl``."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import av
import pytest

from streamdiff.cli import main
from streamdiff.testing.serve import ServeProcess


@pytest.fixture(scope="module")
def sdxl_model(cache_dir):
    from streamdiff import load_model

    return load_model("tiny-sdxl", device="cpu")  # built once into the session cache the commands read


def test_run_tiny_sdxl_writes_a_video(sdxl_model, tmp_path: Path) -> None:
    out, stats = tmp_path / "sdxl.mp4", tmp_path / "stats.json"
    code = main([
        "run", "--model", "tiny-sdxl", "--source", "testpattern", "--sink", f"file:{out}", "--frames", "5",
        "--size", "64x64", "--fps", "10", "--cfg-type", "full", "--guidance-scale", "1.5",
        "--stats-json", str(stats), "--status-interval", "0",
    ])
    assert code == 0
    with av.open(str(out)) as container:
        assert sum(1 for _ in container.decode(container.streams.video[0])) == 5
    data = json.loads(stats.read_text())
    assert data["frames_in"] == data["frames_out"] == 5 and data["error"] is None


def _decoded(path: Path) -> list:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(container.streams.video[0])]


def test_run_sdxl_checkpoint_file_with_model_config_gives_the_folders_video(tmp_path: Path) -> None:
    """``--model FILE --model-config DIR``: an LDM-layout SDXL file with a configs-only folder streams what the
    diffusers folder of the same weights streams."""
    from streamdiff.models.sdxl import build_tiny_sdxl_components, save_sdxl_folder
    from streamdiff.testing import save_ldm_checkpoint, small_kl_vae

    def components(seed: int) -> dict:
        return {**build_tiny_sdxl_components(seed), "vae": small_kl_vae(seed)}

    weights = components(0)
    save_sdxl_folder(weights, tmp_path / "folder")
    save_sdxl_folder(components(1), tmp_path / "config")
    for file in (tmp_path / "config").rglob("*.safetensors"):
        file.unlink()
    checkpoint = save_ldm_checkpoint(weights, tmp_path / "sdxl.safetensors")
    common = ["--source", "testpattern", "--frames", "4", "--size", "64x64", "--fps", "10", "--backend", "torch",
              "--prompt", "a cat", "--status-interval", "0"]
    videos = {}
    for name, model in (("file", ["--model", str(checkpoint), "--model-config", str(tmp_path / "config")]),
                        ("folder", ["--model", str(tmp_path / "folder")])):
        videos[name] = tmp_path / f"{name}.mp4"
        assert main(["run", *model, "--sink", f"file:{videos[name]}", *common]) == 0
    file_frames, folder_frames = _decoded(videos["file"]), _decoded(videos["folder"])
    assert len(file_frames) == len(folder_frames) == 4
    assert all((a == b).all() for a, b in zip(file_frames, folder_frames))


def test_serve_tiny_sdxl_streams_over_websocket(sdxl_model) -> None:
    from streamdiff.client import StreamClient
    from streamdiff.io.sources import pattern_frame

    served = ServeProcess("--model", "tiny-sdxl", "--size", "64x64", "--stats-interval", "0")

    async def session() -> int:
        async with await StreamClient.connect(served.url, {"prompt": "a cat"}) as client:
            for i in range(150):  # latest wins: keep sending until two frames came through (a busy CPU is slow)
                await client.send_frame(pattern_frame(i, 64, 64), frame_id=i)
                await asyncio.sleep(0.2)
                if len(client.outputs) >= 2:
                    break
            return len(client.outputs)

    try:
        assert asyncio.run(session()) >= 2
    finally:
        served.process.send_signal(signal.SIGTERM)
        assert served.process.wait(30) == 0
    assert "tiny-sdxl" in "".join(served.log)
