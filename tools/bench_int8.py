"""The OpenVINO engine with the float, int8-weights and full int8 U-Net (``--quantize``): frames/s, PSNR, per-op profile.

Usage::

    python tools/bench_int8.py                          # tiny model, 256², 2 threads, 5 interleaved rounds
    python tools/bench_int8.py --model sd21 --rounds 5 --calls 2    # SD-2.1-size U-Net, random weights (minutes)
    python tools/bench_int8.py --profile --json
    python tools/bench_int8.py --modes int8 --calibration-samples 16    # float against full int8 only
    python tools/bench_int8.py --profile-blobs engines/unet-openvino-*/model.blob   # profile only, no model loaded

Both configurations are StreamPipelines on the same loaded model (float32 unless ``--dtype``), fed the same moving
frames (``pipe.step``), timed in interleaved rounds (``run_interleaved``); PSNR compares each int8 engine's output
frames with the float engine's, frame by frame (after the warm-up frames). The build time of each engine (for full
int8: calibration set, NNCF quantisation and compilation) is printed; pass a fresh ``--engine-dir`` to see it. ``--profile`` imports each compiled
U-Net and VAE half again with OpenVINO's ``PERF_COUNT`` on, runs it on inputs of its own shapes and prints where
its time goes, summed per node type (``ProfilingInfo.node_type``) over ``--profile-calls`` calls.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamdiff import Calibration, StreamConfig, StreamPipeline, load_model
from streamdiff.backends.keys import EngineOptions
from streamdiff.bench.harness import Case, Comparison, format_table, report_dict, run_interleaved
from streamdiff.bench.suites import moving_frames, sd21_model, sd21_parts
from streamdiff.core.image import psnr

QUANTIZE = {"openvino-float": "none", "openvino-int8-weights": "int8-weights", "openvino-int8": "int8"}


def load(name: str, dtype: str) -> Any:
    if name == "sd21":  # only the dtype benchmarked: the SD-2.1-size model in both dtypes is ~5 GB
        parts, tokenizer = sd21_parts()
        return sd21_model(parts, tokenizer, getattr(torch, dtype))
    return load_model(name, dtype=dtype, device="cpu")


def profile(compiled_path: Path, dtype: torch.dtype, calls: int) -> dict[str, float]:
    """Milliseconds per call per node type of the compiled model at ``compiled_path`` (PERF_COUNT on)."""
    import openvino as ov

    from streamdiff.backends.openvino_backend import compile_config

    config = {**compile_config(dtype), "PERF_COUNT": True}
    compiled = ov.Core().import_model(compiled_path.read_bytes(), "CPU", config)
    request = compiled.create_infer_request()
    inputs = [np.random.default_rng(0).standard_normal(tuple(i.get_shape())).astype(np.float32)
              for i in compiled.inputs]
    request.infer(inputs)  # first call: kernels prepared
    totals: dict[str, float] = {}
    for _ in range(calls):
        request.infer(inputs)
        for info in request.profiling_info:
            if str(info.status).endswith("EXECUTED"):
                key = info.node_type
                totals[key] = totals.get(key, 0.0) + info.real_time.total_seconds() * 1000 / calls
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def print_profile(name: str, ms: dict[str, float], top: int = 12) -> None:
    total = sum(ms.values())
    print(f"\n{name}: {total:.1f} ms per call (sum of node times)")
    for node_type, value in list(ms.items())[:top]:
        print(f"  {node_type:<28} {value:8.2f} ms  {100 * value / total:5.1f} %")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny, tiny-random, sd21 (random SD-2.1-size) or a folder")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20, help="frames per configuration and round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--engine-dir", type=Path, default=None)
    parser.add_argument("--profile", action="store_true", help="per-op profile of each compiled model")
    parser.add_argument("--profile-calls", type=int, default=5)
    parser.add_argument("--profile-blobs", nargs="+", type=Path, metavar="BLOB",
                        help="only profile these compiled models (engine cache entries' model.blob), loading no model")
    parser.add_argument("--modes", nargs="+", choices=["int8-weights", "int8"], default=["int8-weights", "int8"],
                        help="the quantised engines timed against the float one")
    parser.add_argument("--calibration-samples", type=int, default=Calibration.samples)
    parser.add_argument("--build-only", action="store_true",
                        help="build each configuration's engines, one at a time (each released before the next: an "
                             "SD-2.1-size float pipeline beside a quantisation in progress needs over 20 GB), and exit")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.profile_blobs:
        dtype = getattr(torch, args.dtype)
        blobs = {str(path): profile(path, dtype, args.profile_calls) for path in args.profile_blobs}
        for name, ms in blobs.items():
            print_profile(name, ms)
        if args.json:
            print(json.dumps({"command": "tools/bench_int8.py", "profiles_ms": blobs}, indent=2))
        return 0
    torch.set_num_threads(args.threads)
    model = load(args.model, args.dtype)
    config = StreamConfig(width=args.size, height=args.size, t_index_list=(25, 37), cfg_type="self")
    frames = moving_frames(8, args.size)
    pipes: dict[str, StreamPipeline] = {}
    outputs: dict[str, list[torch.Tensor]] = {}
    cases = []
    modes = {name: quantize for name, quantize in QUANTIZE.items() if quantize == "none" or quantize in args.modes}
    calibration = Calibration(samples=args.calibration_samples)
    build_s: dict[str, float] = {}
    for name, quantize in modes.items():
        start = time.perf_counter()
        pipe = StreamPipeline(model, config, backend="openvino", engine_options=EngineOptions(
            engine_dir=args.engine_dir, quantize=quantize, calibration=calibration))
        build_s[name] = time.perf_counter() - start
        print(f"{name}: engines ready in {build_s[name]:.1f} s (built, or loaded from the cache)", flush=True)
        if args.build_only:
            del pipe
            gc.collect()
            continue
        pipes[name] = pipe
        pipe.prepare(prompt="a watercolor portrait", seed=2)
        outputs[name] = [pipe.step(frame).images for frame in frames]  # same frames, same seed: comparable
        counter = {"frames": 0}

        def step(pipe: StreamPipeline = pipe, counter: dict[str, int] = counter) -> None:
            pipe.step(frames[counter["frames"] % len(frames)])
            counter["frames"] += 1

        cases.append(Case(name, step))
    if args.build_only:
        return 0
    results = run_interleaved(cases, rounds=args.rounds, calls=args.calls, warmup=args.warmup)
    float_frames = outputs["openvino-float"][config.denoising_steps:]
    metrics = {}
    for name in modes:
        values = [psnr(a, b) for a, b in zip(float_frames, outputs[name][config.denoising_steps:])]
        if name != "openvino-float":
            metrics[name] = {"psnr_db_min": min(values), "psnr_db_median": statistics.median(values)}
        metrics.setdefault(name, {})["ready_s"] = build_s[name]
    rounds = {r.name: r.seconds for r in results}
    for name in modes:  # speed-up in each round (float time / this time), the spread the medians hide
        ratios = [f / q for f, q in zip(rounds["openvino-float"], rounds[name])]
        metrics[name].update(speedup_median=statistics.median(ratios), speedup_min=min(ratios),
                             speedup_max=max(ratios))
    comparison = Comparison(f"{args.model}-{args.size}px-int8", results, "openvino-float", metrics,
                            note=f"PSNR: each int8 engine's frames against the float engine's, same inputs and seed; "
                                 f"int8 calibrated on {args.calibration_samples} U-Net calls")
    print(format_table([comparison], title=f"OpenVINO float vs {' / '.join(args.modes)} U-Net, {args.model}, "
                                            f"{args.dtype}, {args.size}², {args.threads} thread(s)"))
    profiles = {}
    if args.profile:
        for name, pipe in pipes.items():
            parts = {"unet": pipe.unet.model, "vae_encoder": pipe.vae.encoder, "vae_decoder": pipe.vae.decoder}
            for part, ov_model in parts.items():
                if name != "openvino-float" and part != "unet":
                    continue  # the VAE is the same entry in both
                profiles[f"{name}/{part}"] = ms = profile(ov_model.path, model.dtype, args.profile_calls)
                print_profile(f"{name} {part}", ms)
    if args.json:
        report = report_dict([comparison], command="tools/bench_int8.py", threads=args.threads, model=args.model,
                             dtype=args.dtype, size=args.size)
        report["profiles_ms"] = profiles
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
