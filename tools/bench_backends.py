"""Compare the CPU backends on one U-Net step: torch eager fp32/bf16, AOTInductor fp32/bf16, torch.compile, ORT,
OpenVINO bf16 (dynamic shapes, as the backend builds it, and static shapes).

Usage::

    python tools/bench_backends.py --model tiny                  # seconds
    python tools/bench_backends.py --model sd21 --rounds 7       # SD-2.1-size U-Net, random weights (~5 min first run)
    python tools/bench_backends.py --model sd21 --threads 1 --json

Every configuration runs the same U-Net call (batch ``--batch``, ``--size`` px, 77 text tokens) in interleaved
rounds (A B C … then … C B A); the table gives medians and speed-ups over eager float32, and the output quality
of each configuration against eager float32 (PSNR over the output's range, relative error). Compiled artifacts go
through the engine cache (``--engine-dir``), so a second run reuses them; the first run reports their build time.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from streamdiff.backends.cache import EngineCache
from streamdiff.backends.compiled import AotiModule, aoti_compile
from streamdiff.backends.keys import Component, EngineKey, ShapeRange, precision_name, target_id
from streamdiff.backends.onnx_export import UNetExport, component_spec, export_module, relative_error
from streamdiff.backends.onnxruntime_backend import OrtSession, onnxruntime_version
from streamdiff.backends.torch_backend import TorchUNet, compiled_unet
from streamdiff.bench.harness import Case, Check, Comparison, format_table, report_dict, run_interleaved

logger = logging.getLogger("bench_backends")
CONFIGS = ("eager-fp32", "eager-bf16", "compiled-fp32", "compiled-bf16", "jit-bf16", "onnxruntime-fp32",
           "openvino-bf16", "openvino-bf16-static", "matmul-peak")


def build_unet(name: str) -> torch.nn.Module:
    if name == "tiny":
        from streamdiff.testing import tiny_components

        return tiny_components()["unet"].eval().requires_grad_(False)
    from diffusers import UNet2DConditionModel

    from streamdiff.testing import SD21_UNET

    torch.manual_seed(0)
    return UNet2DConditionModel(**SD21_UNET).eval().requires_grad_(False)


def bench_key(model: str, backend: str, version: str, dtype: torch.dtype, shapes: ShapeRange) -> EngineKey:
    return EngineKey(
        model=f"bench:{model}", weights="random-seed0", loras=(), component=Component.UNET,
        precision=precision_name(dtype), shapes=shapes, opset=17 if backend == "onnx" else None, backend=backend,
        backend_version=version, target="portable" if backend == "onnx" else target_id(torch.device("cpu")),
    )


def measure(args: argparse.Namespace, model_name: str) -> Comparison | None:
    unet32 = build_unet(model_name)
    batch, size = args.batch, args.size
    shapes = ShapeRange((batch, batch), (size, size), (size, size), batch, size, size)
    spec = component_spec(Component.UNET, latent_channels=int(unet32.config.in_channels), vae_scale_factor=8,
                          text_dim=int(unet32.config.cross_attention_dim))
    inputs32 = spec.make_inputs(batch, size, size)
    inputs16 = tuple(t if t.dtype == torch.float32 and t.ndim == 1 else t.to(torch.bfloat16) for t in inputs32)
    cache = EngineCache(args.engine_dir)
    steps: dict[str, Callable[[], torch.Tensor]] = {}
    build_seconds: dict[str, float] = {}
    wanted = args.only or list(CONFIGS)
    params = sum(p.numel() for p in unet32.parameters())
    logger.info("%s U-Net: %.0fM parameters, batch %d at %d px", model_name, params / 1e6, batch, size)

    artifacts: dict[str, Path] = {}
    if "onnxruntime-fp32" in wanted:
        key = bench_key(model_name, "onnx", f"torch-{torch.__version__}", torch.float32, shapes)
        started, wall = time.perf_counter(), time.time()
        entry = cache.get_or_build(
            key, lambda folder: export_module(UNetExport(unet32), spec, shapes, folder / "model.onnx", 17).name,
            description=f"{model_name} onnx",
        )
        artifacts["onnxruntime-fp32"] = entry.artifact
        if entry.created >= wall:
            build_seconds["onnxruntime-fp32"] = round(time.perf_counter() - started, 1)
        gc.collect()
    for dtype, name in ((torch.float32, "compiled-fp32"), (torch.bfloat16, "compiled-bf16")):
        if name not in wanted:
            continue
        key = bench_key(model_name, "torch-aoti", torch.__version__, dtype, shapes)
        example = inputs32 if dtype == torch.float32 else inputs16
        started = time.perf_counter()
        if cache.load(key) is None:
            if dtype == torch.float32:
                source = unet32
            elif args.build_only:  # the last build: convert in place rather than hold two copies
                source = unet32.to(dtype)
            else:
                source = copy.deepcopy(unet32).to(dtype)
            module = UNetExport(source)
            cache.get_or_build(key, lambda folder, m=module, x=example: aoti_compile(m, x, folder),
                               description=f"{model_name} {name}")
            del module, source
            gc.collect()
            build_seconds[name] = round(time.perf_counter() - started, 1)
        artifacts[name] = cache.get_or_build(key, lambda folder: "").artifact
    if args.build_only:
        return None

    eager32 = TorchUNet(unet32)  # the baseline always runs
    steps["eager-fp32"] = lambda: eager32(*inputs32)
    if "eager-bf16" in wanted:
        eager16 = TorchUNet(copy.deepcopy(unet32).to(torch.bfloat16), channels_last=True)
        steps["eager-bf16"] = lambda: eager16(*inputs16)
    for name in ("compiled-fp32", "compiled-bf16"):
        if name in artifacts:
            compiled = AotiModule(artifacts[name])
            example = inputs32 if name.endswith("fp32") else inputs16
            steps[name] = lambda c=compiled, x=example: c(*x)
    if "jit-bf16" in wanted:  # in-process torch.compile (not cached): compiles in the first call
        jit = compiled_unet(copy.deepcopy(unet32).to(torch.bfloat16), channels_last=True)
        started = time.perf_counter()
        with torch.inference_mode():
            jit(*inputs16)
        build_seconds["jit-bf16"] = round(time.perf_counter() - started, 1)
        steps["jit-bf16"] = lambda: jit(*inputs16)
    for name in ("openvino-bf16", "openvino-bf16-static"):
        if name in wanted:
            steps[name] = openvino_step(unet32, inputs32, static=name.endswith("static"), build_seconds=build_seconds,
                                        name=name)
            gc.collect()
    if "matmul-peak" in wanted:  # bf16 2048² matmul: the machine's peak, same rounds (its TFLOP/s in the metrics)
        a = torch.randn(2048, 2048).to(torch.bfloat16)
        steps["matmul-peak"] = lambda: torch.matmul(a, a)
    if "onnxruntime-fp32" in artifacts:
        session = OrtSession(artifacts["onnxruntime-fp32"], torch.device("cpu"), threads=torch.get_num_threads())
        feeds = dict(zip(spec.inputs, inputs32))
        steps["onnxruntime-fp32"] = lambda: session.run(feeds)

    with torch.inference_mode():
        reference = steps["eager-fp32"]().float()
        metrics: dict[str, dict[str, float]] = {}
        span = float(reference.max() - reference.min())
        for name, step in steps.items():
            if name == "matmul-peak":
                metrics[name] = {"psnr_db": math.nan, "rel_err": math.nan}
                continue
            out = step().float()
            mse = float(((out - reference) ** 2).mean())
            metrics[name] = {
                "psnr_db": math.inf if mse == 0 else 10 * math.log10(span * span / mse),
                "rel_err": relative_error(out, reference),
            }
            if name in build_seconds:
                metrics[name]["build_s"] = build_seconds[name]
        cases = [Case(name, step) for name, step in steps.items()]
        results = run_interleaved(cases, rounds=args.rounds, calls=args.calls, warmup=args.warmup)
    comparison = Comparison(f"{model_name}/unet-{size}px-b{batch}", results, "eager-fp32", metrics)
    medians = {r.name: r.median for r in results}
    flops = unet_flops(unet32, inputs32)
    for name, median in medians.items():
        metrics[name]["tflops"] = (2.0 * 2048**3 if name == "matmul-peak" else flops) / median / 1e12
    if "matmul-peak" in medians:
        for name in medians:
            metrics[name]["of_peak"] = metrics[name]["tflops"] / metrics["matmul-peak"]["tflops"]
        medians.pop("matmul-peak")
    base = medians["eager-fp32"]
    fp32_best = min(v for k, v in medians.items() if k.endswith("fp32"))
    comparison.checks.append(Check("best fp32 speed-up over eager fp32", base / fp32_best, 2.0))
    if "eager-bf16" in medians:
        bf16_best = min(v for k, v in medians.items() if k.endswith("bf16"))
        comparison.checks.append(Check("best bf16 speed-up over eager bf16", medians["eager-bf16"] / bf16_best, 2.0))
    good = {k: v for k, v in medians.items() if metrics[k]["psnr_db"] >= 30.0}
    if "matmul-peak" in metrics:
        best = min(good, key=good.get)
        comparison.checks.append(Check(f"{best} TFLOP/s / matmul peak", metrics[best]["of_peak"], 0.85))
    best = min(good, key=good.get)
    comparison.checks.append(Check(f"best overall ({best}, PSNR >= 30 dB) over eager fp32", base / good[best], 5.0))
    return comparison


def unet_flops(unet: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> float:
    """FLOPs of one U-Net call (MATH attention, which FlopCounterMode counts; fused CPU attention counts 0)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), counter:
        UNetExport(unet)(*inputs)
    return float(counter.get_total_flops())


def openvino_step(unet32: torch.nn.Module, inputs32: tuple[torch.Tensor, ...], static: bool,
                  build_seconds: dict[str, float], name: str) -> Callable[[], torch.Tensor]:
    """The U-Net converted by OpenVINO (bf16 hint, float32 time embedding), dynamic or static shapes."""
    import openvino as ov

    from streamdiff.backends.openvino_backend import (
        OvUNetGraph, compile_config, unet_time_projection, unet_time_projection_input,
    )

    started = time.perf_counter()
    sample, timestep, hidden = inputs32
    projection = unet_time_projection(unet32, timestep)
    example = (sample, projection, hidden)
    shapes = [ov.PartialShape(list(t.shape)) if static else
              ov.PartialShape([-1, t.shape[1], -1, -1] if t.ndim == 4 else [-1, *t.shape[1:]]) for t in example]
    with unet_time_projection_input(unet32), torch.no_grad():
        converted = ov.convert_model(OvUNetGraph(unet32), example_input=example, input=shapes)
    compiled = ov.Core().compile_model(converted, "CPU", compile_config(torch.bfloat16))
    del converted
    build_seconds[name] = round(time.perf_counter() - started, 1)
    request = compiled.create_infer_request()
    arrays = [t.numpy() for t in example]

    def step() -> torch.Tensor:
        request.infer(arrays, share_inputs=True, share_outputs=True)
        return torch.from_numpy(request.get_output_tensor(0).data.copy())

    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "sd21", "both"], default="tiny")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--batch", type=int, default=1, help="U-Net batch (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch/ONNX Runtime threads (1 = steady timings)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--only", nargs="+", choices=CONFIGS, help="configurations to run (eager-fp32 always runs)")
    parser.add_argument("--engine-dir", type=Path, default=None, help="engine cache for the compiled artifacts")
    parser.add_argument("--json", action="store_true", help="print the JSON report after the table")
    parser.add_argument("--build-only", action="store_true",
                        help="only build the compiled artifacts (one at a time, to limit peak memory), then exit")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    models = ["tiny", "sd21"] if args.model == "both" else [args.model]
    comparisons = [c for c in (measure(args, name) for name in models) if c is not None]
    if args.build_only:
        print(f"built the artifacts of {', '.join(models)} in {args.engine_dir or 'engines/'}")
        return 0
    print(format_table(comparisons, title=f"U-Net step, CPU, {torch.get_num_threads()} thread(s)"))
    if args.json:
        meta: dict[str, Any] = {
            "command": "tools/bench_backends.py", "threads": torch.get_num_threads(), "torch": torch.__version__,
            "onnxruntime": onnxruntime_version(), "cpu": target_id(torch.device("cpu")),
        }
        print(json.dumps(report_dict(comparisons, **meta), indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
