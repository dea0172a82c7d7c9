"""Fixtures of the server tests (helpers live in server_helpers.py)."""

from __future__ import annotations

import pytest
from server_helpers import FakeClock, pattern, save


@pytest.fixture()
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
def jpeg() -> bytes:
    return save(pattern(), "JPEG", quality=85)


@pytest.fixture(scope="session")
def webp() -> bytes:
    return save(pattern(), "WEBP", quality=80)


@pytest.fixture()
def live(tiny_model):
    """Real servers on loopback on the tiny model: ``live(max_streams=…, max_batch_rows=…, unet=…, limits=…,
    **ServerConfig fields)`` → a started :class:`BackgroundServer`; all are stopped (gracefully) at teardown."""
    from streamdiff.engine import EngineConfig, StreamEngine
    from streamdiff.server.app import BackgroundServer
    from streamdiff.server.hub import ServerConfig
    from streamdiff.server.limits import ServerLimits

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
