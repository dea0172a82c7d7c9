"""Shared fixtures: a per-session cache folder for the built-in tiny models, one torch thread for steady timings."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
torch.set_num_threads(int(os.environ.get("STREAMDIFF_TEST_THREADS", "1")))
if "STREAMDIFF_ENGINE_DIR" not in os.environ:  # engines built by default runs (backend auto) stay out of the repo
    os.environ["STREAMDIFF_ENGINE_DIR"] = tempfile.mkdtemp(prefix="streamdiff-test-engines-")
    atexit.register(shutil.rmtree, os.environ["STREAMDIFF_ENGINE_DIR"], True)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private STREAMDIFF_CACHE for the whole session (the tiny model is built once into it)."""
    path = tmp_path_factory.mktemp("streamdiff-cache")
    os.environ["STREAMDIFF_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(cache_dir: Path):
    """The built-in ``tiny-random`` model (random weights from a seed: what the engine, server and runtime tests need
    is the architecture and exact, seeded numbers), loaded once per session on the CPU in float32 (read-only)."""
    from streamdiff import load_model

    return load_model("tiny-random", device="cpu")


@pytest.fixture(scope="session")
def tiny_trained(cache_dir: Path):
    """The built-in trained ``tiny`` model (the shipped weights), loaded once per session on the CPU in float32."""
    from streamdiff import load_model

    return load_model("tiny", device="cpu")


@pytest.fixture()
def frames() -> list:
    """Eight distinct deterministic 64×64 RGB frames (a moving gradient)."""
    import numpy as np

    yy, xx = np.mgrid[0:64, 0:64]
    return [np.stack([(xx + 8 * i) % 256, yy * 3 % 256, (xx * yy + 17 * i) % 256], -1).astype(np.uint8) for i in range(8)]


@pytest.fixture()
def live(tiny_model):
    """Real servers on loopback on the tiny model: ``live(max_streams=…, max_batch_rows=…, unet=…, limits=…,
    **ServerConfig fields)`` → a started :class:`BackgroundServer`; all are stopped (gracefully) at teardown."""
    from streamdiff.engine import EngineConfig, StreamEngine
    from streamdiff.server.app import BackgroundServer
    from streamdiff.server.hub import ServerConfig
    from streamdiff.protocol.limits import ServerLimits

    servers = []

    def start(*, max_streams: int = 4, max_batch_rows: int = 32, unet=None, limits=None, **config):
        limits = limits or ServerLimits(max_streams=max_streams)
        engine = StreamEngine(tiny_model, EngineConfig(max_streams=limits.max_streams, max_batch_rows=max_batch_rows),
                              unet=unet)
        server = BackgroundServer(engine, ServerConfig(port=0, limits=limits, **config)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
