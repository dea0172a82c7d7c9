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

