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
