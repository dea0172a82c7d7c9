"""tools/count_tick_ops.py counts a tick's operations by phase, eager and with whole-tick graphs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

TOOL = Path(__file__).parents[2] / "tools" / "count_tick_ops.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("count_tick_ops", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_graphed_tick_queues_one_replay_where_eager_queues_every_kernel(tiny_model) -> None:
    tool = load_tool()
    one = tool.count_tick(tiny_model, streams=1, steps=2, size=64, graphs=False)["kernels"]
    two = tool.count_tick(tiny_model, streams=2, steps=2, size=64, graphs=False)["kernels"]
    assert all(one[phase] > 0 for phase in ("vae_encode", "unet", "vae_decode", "rest"))
    assert two["rest"] > one["rest"]  # each stream's step arithmetic is its own kernels
    assert two["unet"] == one["unet"]  # both streams' rows in ONE U-Net call
    graphed = tool.count_tick(tiny_model, streams=2, steps=2, size=64, graphs=True)["kernels"]
    assert graphed["replay"] == 1 and set(graphed) <= {"replay", "rest"}  # no engine call outside the replay
    assert graphed.get("rest", 0) < two["rest"] / 2  # what the host still queues: copies in and out


def test_the_meta_device_counts_need_no_weights() -> None:
    counts = load_tool().sd21_counts(rows=2, size=256)
    assert counts["unet"]["kernels"] > 500 and counts["vae_decode"]["kernels"] > 20
