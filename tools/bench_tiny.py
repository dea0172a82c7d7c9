"""The built-in tiny model's engine per backend and dtype: frames/s and where the time goes.

Usage::

    python tools/bench_tiny.py                    # 256², 2 threads, 7 interleaved rounds of 30 frames
    python tools/bench_tiny.py --json

Each configuration is a StreamPipeline fed uint8 frames (``pipe(frame)``, as ``streamdiff run``'s engine stage does),
measured in interleaved rounds (``run_interleaved``); the U-Net and VAE calls are timed inside, and "rest" is the
engine's own work per frame (image conversions, the step arithmetic, bookkeeping). OpenVINO configurations run
torch on 1 thread beside OpenVINO's pool (what the backend sets); torch configurations get ``--threads``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from streamdiff import StreamConfig, StreamPipeline
from streamdiff.backends.keys import EngineOptions
from streamdiff.bench.harness import Case, Comparison, format_table, report_dict, run_interleaved

CONFIGS = {
    "openvino-bf16": ("openvino", "bfloat16"),
    "openvino-fp32": ("openvino", "float32"),
    "torch-bf16": ("torch", "bfloat16"),
    "torch-fp32": ("torch", "float32"),
}


class TimedVae:
    """A VAE engine whose calls add their seconds to ``totals``."""

    def __init__(self, vae: Any, totals: dict[str, float]) -> None:
        self.encode = _timed(vae.encode, totals, "encode")
        self.decode = _timed(vae.decode, totals, "decode")


def _timed(fn: Callable[..., Any], totals: dict[str, float], key: str) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        started = time.perf_counter()
        out = fn(*args)
        totals[key] += time.perf_counter() - started
        return out

    return call


def pattern(size: int, count: int = 10) -> list[np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size]
    return [np.stack([(xx + 16 * i) % 256, yy, ((xx // 32 + yy // 32) % 2) * 255], -1).astype(np.uint8)
            for i in range(count)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--engine-dir", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    frames = pattern(args.size)
    cases, totals = [], {}
    for name in args.configs:
        backend, dtype = CONFIGS[name]
        torch.set_num_threads(args.threads)
        pipe = StreamPipeline.from_pretrained(
            "tiny", StreamConfig(width=args.size, height=args.size), backend=backend, dtype=dtype,
            engine_options=EngineOptions(engine_dir=args.engine_dir, channels_last=backend == "torch"),
        )
        pipe.prepare(prompt="")
        spent = {"unet": 0.0, "encode": 0.0, "decode": 0.0}
        per_frame = totals[name] = []
        pipe.engine.unet = _timed(pipe.engine.unet, spent, "unet")
        pipe.engine.vae = TimedVae(pipe.engine.vae, spent)
        counter = {"frames": 0}

        def step(pipe: StreamPipeline = pipe, counter: dict[str, int] = counter, spent: dict[str, float] = spent,
                 per_frame: list[dict[str, float]] = per_frame) -> None:
            for key in spent:
                spent[key] = 0.0
            pipe(frames[counter["frames"] % len(frames)])
            per_frame.append(dict(spent))
            counter["frames"] += 1

        threads = 1 if backend == "openvino" else args.threads
        cases.append(Case(name, step, setup=lambda n=threads: torch.set_num_threads(n)))
    results = run_interleaved(cases, rounds=args.rounds, calls=args.calls, warmup=args.warmup)
    metrics = {}
    for result in results:
        timed = totals[result.name][args.warmup:]
        spent = {k: float(np.median([frame[k] for frame in timed])) * 1000 for k in timed[0]}
        metrics[result.name] = {f"{k}_ms": v for k, v in spent.items()}
        metrics[result.name]["rest_ms"] = result.median * 1000 - sum(spent.values())
    comparison = Comparison(f"tiny-{args.size}px-engine", results, args.configs[-1], metrics,
                            note="component times: medians over the timed frames; rest = median frame − their sum "
                                 "(the engine's own work: image conversions, step arithmetic, bookkeeping)")
    print(format_table([comparison], title=f"tiny model engine, {args.size}², {args.threads} thread(s)"))
    if args.json:
        print(json.dumps(report_dict([comparison], command="tools/bench_tiny.py", threads=args.threads), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
