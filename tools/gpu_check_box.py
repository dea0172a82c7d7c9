"""The parts of ``tools/gpu_check.py`` that make it fit a short, offline GPU box: the wheel plan, the import path and
the hard deadline.

The offline box (docs/engines.md) has torch with CUDA, transformers and the rest of streamdiff's needs except
diffusers, no network and room for 64 MiB of files brought along. ``tools/gpu_wheels.txt`` lists the wheels it lacks;
``tools/gpu_wheels.sh`` downloads them on a networked machine and calls this module to check the folder::

    python tools/gpu_check_box.py [gpu-wheels]     # the plan: wheels, sizes, < 64 MiB, the install and run commands

The deadline: :class:`Progress` is the report as the check's worker thread fills it, under one lock, and knows the
item in flight; :func:`run_until` runs the work on a daemon thread and stops waiting at the deadline, so that the
caller can mark what was cut, write its report and leave with ``os._exit`` (a hung CUDA call cannot be joined).
This module imports no torch: the wheel check runs with any Python 3.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WHEEL_LIST = REPO / "tools" / "gpu_wheels.txt"
WHEELS_DIR = "gpu-wheels"
TARGET = "/tmp/sd-wheels"
LIMIT_BYTES = 64 * 2**20
# What streamdiff imports on gpu_check's path; the box has all but diffusers (gpu_wheels.txt brings that).
NEEDED_MODULES = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "huggingface_hub", "numpy")
WORKER = "gpu-check-work"


@dataclass(frozen=True)
class Wheel:
    """One line of ``gpu_wheels.txt``: ``name==version  # bytes: N``."""

    name: str
    version: str
    recorded_bytes: int | None

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    def matches(self, file_name: str) -> bool:
        """Whether ``file_name`` is this wheel (names compared as wheel files spell them: lower case, ``_``)."""
        stem = re.sub(r"[-_.]+", "_", self.name).lower()
        return file_name.endswith(".whl") and file_name.lower().startswith(f"{stem}-{self.version}-")


def read_wheel_list(path: Path = WHEEL_LIST) -> list[Wheel]:
    wheels = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        requirement, _, comment = line.partition("#")
        if not requirement.strip():
            continue
        name, sep, version = requirement.strip().partition("==")
        if not sep or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or not version:
            raise ValueError(f"{path}:{number}: {line.strip()!r} is not a pinned requirement (name==version)")
        size = re.search(r"bytes:\s*(\d+)", comment)
        wheels.append(Wheel(name, version, int(size.group(1)) if size else None))
    return wheels


def offline_plan(folder: str | Path = WHEELS_DIR, target: str = TARGET,
                 wheel_list: Path = WHEEL_LIST) -> dict[str, Any]:
    """What the offline box needs: the wheels (sizes from ``folder`` where it exists, else as recorded), the total
    against 64 MiB, and the commands to prepare, install and run. ``problems`` lists what would stop it."""
    folder = Path(folder)
    present = sorted(p.name for p in folder.glob("*.whl")) if folder.is_dir() else []
    rows, problems = [], []
    for wheel in read_wheel_list(wheel_list):
        files = [name for name in present if wheel.matches(name)]
        if files:
            rows.append({"requirement": wheel.requirement, "file": files[0],
                         "bytes": (folder / files[0]).stat().st_size, "source": "folder"})
        else:
            rows.append({"requirement": wheel.requirement, "file": None, "bytes": wheel.recorded_bytes,
                         "source": "recorded"})
            if present:
                problems.append(f"{folder}: no wheel for {wheel.requirement}")
    listed = {row["file"] for row in rows}
    problems += [f"{folder}/{name} is not in {wheel_list.name}: `*.whl` would install it" for name in present
                 if name not in listed]
    total = sum(row["bytes"] or 0 for row in rows)
    if total >= LIMIT_BYTES:
        problems.append(f"the wheels hold {total / 2**20:.1f} MiB; the box takes less than 64 MiB")
    return {
        "wheel_list": str(wheel_list.relative_to(REPO) if wheel_list.is_relative_to(REPO) else wheel_list),
        "folder": str(folder), "folder_exists": folder.is_dir(), "wheels": rows, "total_bytes": total,
        "limit_bytes": LIMIT_BYTES, "fits": total < LIMIT_BYTES, "problems": problems,
        "prepare": "bash tools/gpu_wheels.sh",
        "install": f"python3 -m pip install --no-index --no-deps --target {target} {folder}/*.whl",
        "run": f"python3 tools/gpu_check.py --wheels-target {target}",
    }


def print_plan(plan: dict[str, Any]) -> None:
    print(f"offline GPU box plan ({plan['wheel_list']}):")
    for row in plan["wheels"]:
        size = "size unknown" if row["bytes"] is None else f"{row['bytes'] / 2**20:.1f} MiB"
        print(f"    {row['requirement']:<24} {size} ({row['file'] or 'as recorded: not in ' + plan['folder']})")
    print(f"    total {plan['total_bytes'] / 2**20:.1f} MiB of 64 MiB: {'fits' if plan['fits'] else 'TOO LARGE'}")
    for problem in plan["problems"]:
        print("    problem:", problem)
    for step in ("prepare", "install", "run"):
        print(f"    {step}: {plan[step]}")


# -- the import path ------------------------------------------------------------------------------------------------


def put_on_path(wheels_target: str | None) -> list[str]:
    """Put ``wheels_target`` (where the box's wheels were installed with ``--target``) and, unless ``streamdiff``
    already imports from this repository, the repository first on ``sys.path``: the box cannot ``pip install -e .``
    (no network, no venv), so this is the one tool that finds the package by path, and the check is of this
    checkout's code, not of another install. Returns what was added."""
    added = []
    if wheels_target:
        folder = Path(wheels_target).resolve()
        if not folder.is_dir():
            raise SystemExit(f"gpu_check: --wheels-target {folder} is not a folder; install the wheels there first: "
                             f"{offline_plan(target=str(folder))['install']}")
        sys.path.insert(0, str(folder))
        added.append(str(folder))
    found = importlib.util.find_spec("streamdiff")
    if found is None or not found.origin or not Path(found.origin).resolve().is_relative_to(REPO):
        sys.path.insert(len(added), str(REPO))
        added.append(str(REPO))
    return added


def missing_modules(names: tuple[str, ...] = NEEDED_MODULES) -> list[str]:
    missing = []
    for name in names:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except ImportError:  # a finder that refuses it, or a broken parent package
            missing.append(name)
    return missing


# -- the deadline ---------------------------------------------------------------------------------------------------


class Progress:
    """The report as the worker fills it. Every change goes through here under one lock, so that the main thread
    can take a consistent copy at the deadline while the worker is still running (or hung)."""

    def __init__(self, report: dict[str, Any]) -> None:
        self._report, self._lock = report, threading.Lock()
        self.current: dict[str, Any] | None = None  # the item in flight: {"model", "backend", "steps"?, "streams"?}

    def add(self, key: str, item: Any) -> None:
        with self._lock:
            self._report[key].append(item)

    def put(self, *keys: str, value: Any) -> None:
        """``report[k1][k2]…[kn] = value`` (the mappings on the way already exist)."""
        with self._lock:
            mapping = self._report
            for key in keys[:-1]:
                mapping = mapping[key]
            mapping[keys[-1]] = value

    def update(self, mapping: dict[str, Any], **values: Any) -> None:
        """Change a mapping already in the report (a build row, say)."""
        with self._lock:
            mapping.update(values)

    def start(self, **item: Any) -> None:
        with self._lock:
            self.current = dict(item, started=time.monotonic())

    def done(self) -> None:
        with self._lock:
            self.current = None

    def snapshot(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """A deep copy of the report (JSON-safe) and of the item in flight."""
        with self._lock:
            return json.loads(json.dumps(self._report, default=str)), (dict(self.current) if self.current else None)


def run_until(work: Callable[[], None], deadline_at: float, clock: Callable[[], float] = time.monotonic) -> bool:
    """Run ``work`` on a daemon thread named :data:`WORKER` and wait for it until ``deadline_at`` (``clock``'s time).
    True when it finished; False when the deadline came first and it was abandoned (still running: the caller
    reports and leaves with ``os._exit``)."""
    worker = threading.Thread(target=work, name=WORKER, daemon=True)
    worker.start()
    worker.join(timeout=max(0.0, deadline_at - clock()))
    return not worker.is_alive()


def worker_alive() -> bool:
    return any(thread.name == WORKER and thread.is_alive() for thread in threading.enumerate())


if __name__ == "__main__":
    plan = offline_plan(sys.argv[1] if len(sys.argv) > 1 else WHEELS_DIR)
    print_plan(plan)
    sys.exit(1 if plan["problems"] or not plan["folder_exists"] else 0)
