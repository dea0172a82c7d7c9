"""A separate process that builds one engine cache entry (used by the cache tests for kill and race scenarios).

Usage: ``python cache_worker.py ROOT MODE WORKDIR`` with MODE ``hang`` (write part of the artifact, signal, then
wait to be killed), ``first`` (build; wait for the second worker to start before finishing) or ``second`` (signal
its start, then ask for the same entry). Prints the entry path on success.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from streamdiff.backends.cache import EngineCache
from streamdiff.backends.keys import Component, EngineKey, ShapeRange

KEY = EngineKey(
    model="worker-model",
    weights="0123456789abcdef",
    loras=(),
    component=Component.UNET,
    precision="float32",
    shapes=ShapeRange((2, 2), (64, 128), (64, 128), 2, 64, 64),
    opset=17,
    backend="test",
    backend_version="1",
    target="cpu:test",
)


def wait_for(path: Path, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.02)


def main() -> int:
    root, mode, work = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)

    def build(folder: Path) -> str:
        with open(work / "builds.log", "a") as log:
            log.write(f"{os.getpid()} {mode}\n")
        with open(folder / "model.bin", "wb") as handle:
            handle.write(b"\x01" * 100_000)
            handle.flush()
            if mode == "hang":
                (work / "hanging").touch()
                time.sleep(600)
        if mode == "first":
            (work / "first-building").touch()
            wait_for(work / "second-started")
            time.sleep(1.0)  # let the second worker reach the lock
        return "model.bin"

    if mode == "second":
        (work / "second-started").touch()
    entry = EngineCache(root).get_or_build(KEY, build)
    print(entry.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
