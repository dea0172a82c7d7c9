"""Prove streamdiff's GPU path on a machine that has an NVIDIA GPU, in one unattended command.

Usage::

    python tools/gpu_check.py                       # on a GPU machine: venv, builds, runs, table + gpu_check.json
    python tools/gpu_check.py --dry-run             # anywhere: everything up to the GPU, on the CPU (~30 s)
    python tools/gpu_check.py --no-venv --models tiny --backends torch-fp16,tensorrt

What it does, in order:

1. **venv** — creates ``.venv-gpu-check`` (``--venv``) with the package index's default ``torch`` (a CUDA build on
   Linux x86-64) and ``streamdiff[onnx-gpu,tensorrt]`` (onnxruntime-gpu, TensorRT 10.1–11.x), then runs itself
   again inside it. Nothing but the package index is contacted. ``--no-venv`` uses the current interpreter.
2. **models** — the built-in tiny model and an SD-2.1-size model with random weights
   (:func:`streamdiff.testing.sd21_components`: 866M-parameter U-Net, TAESD, SD-2.1 text encoder), each in float32
   (the reference) and float16.
3. **backends** — every one available: ``torch-fp32`` (reference), ``torch-fp16`` (eager), ``torch-compile``
   (``torch.compile`` of the float16 U-Net), ``onnxruntime-cuda`` and ``onnxruntime-tensorrt`` (ONNX Runtime's CUDA
   and TensorRT providers on float16 graphs), ``tensorrt`` (strongly typed float16 engines, CUDA graphs). Engines
   are built through the engine cache (``--engine-dir``; a second run reuses them) and their build time is kept.
4. **runs** — every backend through the multi-stream :class:`~streamdiff.engine.StreamEngine` at 512² (``--size``)
   with 1 and 2 denoising steps and 1, 4 and 8 streams (RCFG self, strength 0.5), ``--ticks`` measured ticks after
   warm-up. Each stream gets its own moving test pattern, prompt and seed.
5. **checks** — every backend's frames against torch float32's frames of the same case (PSNR, ``--min-psnr`` dB).
6. **report** — a table and a JSON file (``--json``): frames/s (all streams), per-stream frames/s, tick time and
   per-frame latency p50/p95 (a frame's latency is the sum of the ticks it spends in the Stream Batch), peak and
   device-wide GPU memory, engine build times, achieved TFLOP/s (U-Net and VAE FLOPs counted with torch's
   FlopCounterMode on a meta-device copy) and the share of the GPU's dense fp16 peak (a table of known GPUs, and a
   measured 8192³ fp16 matmul).

JSON fields: ``ok``, ``dry_run``, ``seconds``, ``environment`` (python, torch, cuda, gpu, capability, memory,
tensorrt, onnxruntime and its providers), ``venv`` (path, commands, created), ``peak_fp16_tflops`` (table,
measured_matmul, used), ``models`` (per model: U-Net parameters, FLOPs per U-Net row and per VAE frame at the run
size and at 256 and 512 px, the TensorRT build plans with their profiles; in a dry run the exported float16 graphs),
``phases`` (seconds per phase), ``builds`` (model, backend, seconds, status, first_warmup_seconds: the first case's
warm-up, where ONNX Runtime's TensorRT provider builds its engines and torch.compile compiles), ``results`` (one per
model × backend × steps × streams: fps, fps_per_stream, tick_ms_p50/p95, latency_ms_p50/p95, warmup_seconds,
gpu_mem_peak_mb, gpu_mem_used_mb, tflops, peak_share, psnr_db, psnr_ok, unet_calls_per_tick, status, error) and
``failures``. The exit status is 0 when every case that ran matched the reference and nothing failed.

Without a GPU it says so and runs the dry run: the venv plan is printed (not run), the tiny model is built, its
float16 ONNX graphs (what TensorRT and ONNX Runtime CUDA use) are exported, the TensorRT build plans and profiles of
both models (the SD-2.1-size one on the meta device) are computed, the FLOPs counted, and the StreamEngine runs
torch float32 against ONNX Runtime (CPU provider) over the case grid at ``--size`` (64 px by default in a dry run).
``--budget`` seconds bound the GPU runs (the remaining backends are reported as skipped).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:  # the interpreter that starts the check may have no torch yet: the venv brings it
    import torch
except ImportError:
    torch = None  # type: ignore[assignment]

REPO = Path(__file__).resolve().parents[1]
IN_VENV_ENV = "STREAMDIFF_GPU_CHECK_IN_VENV"
EXTRAS = "onnx-gpu,tensorrt"
BACKENDS = ("torch-fp32", "tensorrt", "onnxruntime-cuda", "torch-fp16", "torch-compile", "onnxruntime-tensorrt")
# Dense (no sparsity) fp16 tensor-core peaks with fp32 accumulation, TFLOP/s, from the vendors' data sheets.
PEAK_FP16_TFLOPS = {
    "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H200": 989.0,
    "A100": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0, "V100": 125.0, "T4": 65.0,
}
PROMPTS = ("a watercolor portrait", "an oil painting of a harbour", "a charcoal sketch", "a neon city at night")
logger = logging.getLogger("gpu_check")


# -- the venv -----------------------------------------------------------------------------------------------------


def venv_commands(venv: Path, python: str = sys.executable) -> list[list[str]]:
    """The commands that make the check's venv: CUDA torch from the index, then streamdiff with the GPU extras."""
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    return [
        [python, "-m", "venv", str(venv)],
        [*pip, "--upgrade", "pip"],
        [*pip, "torch"],  # the index's default Linux x86-64 wheel is the CUDA build
        [*pip, "-e", f"{REPO}[{EXTRAS}]"],
    ]


def enter_venv(args: argparse.Namespace, report: dict[str, Any]) -> None:
    """Create (once) and re-run inside the venv; in a dry run only record and print the plan."""
    venv = Path(args.venv).resolve()
    commands = venv_commands(venv)
    inside = bool(os.environ.get(IN_VENV_ENV))
    report["venv"] = {"path": str(venv), "commands": [" ".join(c) for c in commands], "created": inside}
    if inside:
        print(f"running inside {venv}")
        return
    if args.dry_run or args.no_venv:
        print("venv plan" + (" (not run: dry run)" if args.dry_run else " (not run: --no-venv)") + ":")
        for command in report["venv"]["commands"]:
            print("   ", command)
        return
    python = venv / "bin" / "python"
    ready = python.exists() and subprocess.run(
        [str(python), "-c", "import torch, streamdiff, onnxruntime; assert torch.cuda.is_available()"],
        capture_output=True,
    ).returncode == 0
    if not ready:
        for command in commands[0 if not python.exists() else 1:]:
            print("$", " ".join(command), flush=True)
            if subprocess.run(command).returncode == 0:
                continue
            if command is not commands[-1]:
                raise SystemExit(f"gpu_check: {' '.join(command)} failed")
            fallback = [*command[:-1], f"{REPO}[onnx-gpu]"]  # without TensorRT: its backend is reported missing
            print("TensorRT did not install; going on without it\n$", " ".join(fallback), flush=True)
            subprocess.run(fallback, check=True)
    os.environ[IN_VENV_ENV] = "1"
    os.execv(str(python), [str(python), str(Path(__file__).resolve()), *sys.argv[1:], "--no-venv"])


# -- environment and peaks ------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda": torch.version.cuda, "platform": platform.platform()}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        out.update(gpu=torch.cuda.get_device_name(device), capability=".".join(map(str, torch.cuda.get_device_capability(
            device))), gpu_memory_gb=round(total / 2**30, 1))
    for name in ("tensorrt", "onnxruntime"):
        try:
            module = __import__(name)
            out[name] = str(module.__version__)
            if name == "onnxruntime":
                out["onnxruntime_providers"] = list(module.get_available_providers())
        except Exception as error:  # noqa: BLE001 - reported, not fatal
            out[name] = f"unavailable ({type(error).__name__}: {error})"
    return out


def table_peak(gpu_name: str) -> float | None:
    for key, value in PEAK_FP16_TFLOPS.items():
        if key in gpu_name:
            return value
    return None


def measured_peak(device: torch.device, size: int = 8192, calls: int = 20) -> float:
    """fp16 matmul TFLOP/s of a large square product (timing code: synchronises)."""
    a = torch.randn(size, size, device=device, dtype=torch.float16)
    b = torch.randn(size, size, device=device, dtype=torch.float16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(calls):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * size**3 * calls / (time.perf_counter() - started) / 1e12


# -- models ---------------------------------------------------------------------------------------------------------


class CheckModel:
    """One model: a float32 master on the CPU and fresh device copies in any dtype (compiled backends move theirs)."""

    def __init__(self, name: str, components: dict[str, Any], meta_unet: torch.nn.Module, meta_vae: torch.nn.Module,
                 fingerprint: str) -> None:
        self.name, self.components, self.fingerprint = name, components, fingerprint
        self.meta_unet, self.meta_vae = meta_unet, meta_vae

    def loaded(self, device: torch.device, dtype: torch.dtype) -> Any:
        from streamdiff.bench.suites import cast_copy
        from streamdiff.models import model_from_components

        parts = dict(self.components)
        for key in ("unet", "vae", "text_encoder"):
            parts[key] = cast_copy(parts[key], dtype).to(device)
        return model_from_components(parts, dtype=dtype, device=device, model_id=f"gpu-check:{self.name}",
                                     fingerprint=self.fingerprint)


def build_tiny() -> CheckModel:
    from streamdiff.models import load_model
    from streamdiff.models.tiny import SD_SCHEDULER

    model = load_model("tiny", device="cpu")
    parts = dict(unet=model.unet, vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                 scheduler=dict(SD_SCHEDULER))
    meta_unet, meta_vae = copy.deepcopy(model.unet).to("meta"), copy.deepcopy(model.vae).to("meta")
    return CheckModel("tiny", parts, meta_unet, meta_vae, model.fingerprint)


def build_sd21(weights: bool) -> CheckModel:
    """SD-2.1 size with random weights (``weights=False``: only the meta-device copies, for plans and FLOPs)."""
    from diffusers import AutoencoderTiny, UNet2DConditionModel

    from streamdiff.testing import SD21_UNET

    with torch.device("meta"):
        meta_unet, meta_vae = UNet2DConditionModel(**SD21_UNET).eval(), AutoencoderTiny().eval()
    if not weights:
        return CheckModel("sd21", {}, meta_unet, meta_vae, "sd21-random-0")
    from transformers import CLIPTokenizer

    from streamdiff.bench.suites import calibrate_tiny_vae
    from streamdiff.models.tokenizer_vocab import write_tokenizer_files
    from streamdiff.testing import sd21_components

    parts = sd21_components(0)
    calibrate_tiny_vae(parts["taesd"], 0)
    with tempfile.TemporaryDirectory() as folder:
        write_tokenizer_files(Path(folder))
        tokenizer = CLIPTokenizer.from_pretrained(folder)
    components = dict(unet=parts["unet"], vae=parts["taesd"], text_encoder=parts["text_encoder"],
                      tokenizer=tokenizer, scheduler=parts["scheduler"])
    return CheckModel("sd21", components, meta_unet, meta_vae, "sd21-random-0")


def count_flops(model: CheckModel, size: int) -> dict[str, float]:
    """U-Net FLOPs per row and VAE encode+decode FLOPs per frame at ``size``² (meta device: nothing is computed)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    unet, vae = model.meta_unet, model.meta_vae
    factor = 2 ** (len(getattr(vae.config, "block_out_channels", None) or vae.config.encoder_block_out_channels) - 1)
    latent = torch.empty(1, unet.config.in_channels, size // factor, size // factor, device="meta")
    hidden = torch.empty(1, 77, unet.config.cross_attention_dim, device="meta")
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        unet(latent, torch.empty(1, device="meta"), encoder_hidden_states=hidden)
    unet_flops = counter.get_total_flops()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        vae.decode(vae.encode(torch.empty(1, 3, size, size, device="meta"))[0])
    return {"unet_per_row": float(unet_flops), "vae_per_frame": float(counter.get_total_flops()),
            "unet_params": float(sum(p.numel() for p in unet.parameters()))}


def tensorrt_plans(model: Any, max_streams: int, max_rows: int, size: int) -> dict[str, Any]:
    """The TensorRT build plans (profiles) the multi-stream engine of this check would build. Pure."""
    from streamdiff.backends.builders import COMPONENTS, ONNX_FILE, spatial_multiple, tensorrt_plan
    from streamdiff.backends.keys import EngineOptions, EngineShapes, shape_range

    shapes = EngineShapes.for_engine(max_rows, max_streams, ((size, size),))
    out = {}
    for component in COMPONENTS:
        shape = shape_range(component, shapes, EngineOptions(), spatial_multiple(model, component))
        out[component.value] = tensorrt_plan(model, component, shape, Path(ONNX_FILE)).describe()
    return out


class _MetaModel:
    """Enough of a LoadedModel (configs of the meta-device copies) for :func:`tensorrt_plans`: no weights needed."""

    def __init__(self, model: CheckModel) -> None:
        import types

        from streamdiff.models.loading import unet_down_factor

        self.unet, self.vae = model.meta_unet, model.meta_vae
        self.text_encoder = types.SimpleNamespace(config=types.SimpleNamespace(max_position_embeddings=77))
        self.latent_channels = int(self.unet.config.in_channels)
        blocks = getattr(self.vae.config, "block_out_channels", None) or self.vae.config.encoder_block_out_channels
        self.vae_scale_factor = 2 ** (len(blocks) - 1)
        self.unet_down_factor = unet_down_factor(self.unet)
        self.dtype = torch.float16


# -- runs -----------------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] if ordered else math.nan


def moving_frames(count: int, size: int, seed: int) -> list[torch.Tensor]:
    from streamdiff.bench.suites import moving_frames as frames

    return [f[0] for f in frames(count, size, seed)]


def run_case(engine: Any, size: int, steps: int, streams: int, ticks: int, device: torch.device) -> dict[str, Any]:
    """Open ``streams`` streams, warm up, time ``ticks`` ticks; outputs by stream and tick for the PSNR check."""
    from streamdiff import StreamConfig
    from streamdiff.backends.device import synchronize
    from streamdiff.config import t_index_list_for_strength

    config = StreamConfig(width=size, height=size, t_index_list=t_index_list_for_strength(0.5, steps),
                          cfg_type="self")
    handles = [engine.open_stream(config, prompt=PROMPTS[i % len(PROMPTS)], seed=100 + i) for i in range(streams)]
    warmup = steps + 2
    frames = {i: moving_frames(warmup + ticks, size, seed=i) for i in range(streams)}
    outputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(streams)}
    tick_seconds: list[float] = []
    calls_before = engine.stats.unet_calls
    rows_before = engine.stats.unet_rows + engine.stats.padded_rows
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warmup_started = time.perf_counter()
    for tick in range(warmup + ticks):
        feed = {h: frames[i][tick] for i, h in enumerate(handles)}
        synchronize(device)
        started = time.perf_counter()
        produced = engine.step(feed)
        synchronize(device)
        if tick == warmup - 1:
            warmup_seconds = time.perf_counter() - warmup_started
            calls_before = engine.stats.unet_calls
            rows_before = engine.stats.unet_rows + engine.stats.padded_rows
        if tick >= warmup:
            tick_seconds.append(time.perf_counter() - started)
        for i, handle in enumerate(handles):
            out = produced.get(handle)
            if out is not None and out.images is not None:
                outputs[i].append(out.images)
    for handle in handles:
        handle.close()
    engine.step({})  # applies the closes
    total = sum(tick_seconds)
    latencies = [sum(tick_seconds[k:k + steps]) for k in range(len(tick_seconds) - steps + 1)]
    result = {
        "frames": streams * ticks, "fps": streams * ticks / total, "fps_per_stream": ticks / total,
        "tick_ms_p50": 1e3 * statistics.median(tick_seconds), "tick_ms_p95": 1e3 * percentile(tick_seconds, 0.95),
        "latency_ms_p50": 1e3 * statistics.median(latencies), "latency_ms_p95": 1e3 * percentile(latencies, 0.95),
        "unet_calls_per_tick": (engine.stats.unet_calls - calls_before) / ticks,
        "unet_rows": engine.stats.unet_rows + engine.stats.padded_rows - rows_before, "seconds": total,
        "warmup_seconds": warmup_seconds,
    }
    if device.type == "cuda":
        free, total_memory = torch.cuda.mem_get_info(device)
        result["gpu_mem_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["gpu_mem_used_mb"] = (total_memory - free) / 2**20
    return {"metrics": result, "outputs": outputs}


def make_engine(backend: str, model: CheckModel, device: torch.device, args: argparse.Namespace,
                max_streams: int, max_rows: int) -> Any:
    """The StreamEngine of ``backend`` on a fresh copy of ``model`` (its engines built or loaded here)."""
    from streamdiff.backends.keys import EngineOptions
    from streamdiff.engine import EngineConfig, StreamEngine

    config = EngineConfig(max_streams=max_streams, max_batch_rows=max_rows)
    engine_dir = Path(args.engine_dir)
    if backend == "torch-fp32":
        return StreamEngine(model.loaded(device, torch.float32), config, backend="torch")
    if backend == "onnxruntime-cpu":  # the dry run: the float16 graphs of the GPU path, on ONNX Runtime's CPU provider
        return StreamEngine(model.loaded(device, torch.float16), config, backend="onnxruntime",
                            engine_options=EngineOptions(engine_dir=engine_dir, opt_resolution=args.size))
    loaded = model.loaded(device, torch.float16)
    if backend == "torch-fp16":
        return StreamEngine(loaded, config, backend="torch")
    if backend == "torch-compile":
        from streamdiff.backends.torch_backend import TorchVae, compiled_unet

        return StreamEngine(loaded, config, unet=compiled_unet(loaded.unet, channels_last=False),
                            vae=TorchVae(loaded.vae))
    if backend == "tensorrt":
        return StreamEngine(loaded, config, backend="tensorrt",
                            engine_options=EngineOptions(engine_dir=engine_dir, cuda_graph=True))
    providers = ("CUDAExecutionProvider",) if backend == "onnxruntime-cuda" else (
        "TensorrtExecutionProvider", "CUDAExecutionProvider")
    return StreamEngine(loaded, config, backend="onnxruntime",
                        engine_options=EngineOptions(engine_dir=engine_dir, onnx_providers=providers))


def available_backends(device: torch.device, env: dict[str, Any]) -> list[str]:
    if device.type != "cuda":
        return ["torch-fp32", "onnxruntime-cpu"]
    out = ["torch-fp32", "torch-fp16", "torch-compile"]
    if not str(env.get("tensorrt", "unavailable")).startswith("unavailable"):
        out.append("tensorrt")
    providers = env.get("onnxruntime_providers") or []
    if "CUDAExecutionProvider" in providers:
        out.append("onnxruntime-cuda")
    if "TensorrtExecutionProvider" in providers and "tensorrt" in out:
        out.append("onnxruntime-tensorrt")
    return [b for b in BACKENDS if b in out] + [b for b in out if b not in BACKENDS]


def psnr_against(reference: dict[int, list[torch.Tensor]], outputs: dict[int, list[torch.Tensor]]) -> float:
    """The lowest PSNR (dB) over every stream's frames against the reference's frames of the same stream and tick."""
    from streamdiff.core.image import psnr

    values = [psnr(a.float().clamp(0, 1), b.float().clamp(0, 1))
              for i in reference for a, b in zip(outputs.get(i, []), reference[i])]
    return min(values) if values else math.nan


def check_model(model: CheckModel, device: torch.device, args: argparse.Namespace, report: dict[str, Any],
                deadline: float) -> None:
    """Every backend × steps × streams case of one model; fills report['results'] and report['builds']."""
    flops = report["models"][model.name]["flops"]
    peak = report["peak_fp16_tflops"]["used"]
    max_streams, max_rows = max(args.streams), max(args.streams) * max(args.steps)
    reference: dict[tuple[int, int], dict[int, list[torch.Tensor]]] = {}
    for backend in args.backends:
        if time.monotonic() > deadline:
            report["builds"].append({"model": model.name, "backend": backend, "status": "skipped: time budget"})
            continue
        started = time.perf_counter()
        try:
            engine = make_engine(backend, model, device, args, max_streams, max_rows)
            engine.prepare_backends(_config(args.size, 1))
        except Exception as error:  # noqa: BLE001 - one backend failing must not hide the others
            logger.exception("%s on %s could not be built", backend, model.name)
            report["builds"].append({"model": model.name, "backend": backend, "status": f"failed: {error}"})
            report["failures"].append(f"{model.name}/{backend}: build failed: {type(error).__name__}: {error}")
            continue
        build = {"model": model.name, "backend": backend, "status": "ok",
                 "seconds": round(time.perf_counter() - started, 2)}
        report["builds"].append(build)
        for steps in args.steps:
            for streams in args.streams:
                row: dict[str, Any] = {"model": model.name, "backend": backend, "size": args.size, "steps": steps,
                                       "streams": streams}
                try:
                    case = run_case(engine, args.size, steps, streams, args.ticks, device)
                except Exception as error:  # noqa: BLE001
                    logger.exception("%s failed", row)
                    row.update(status="failed", error=f"{type(error).__name__}: {error}")
                    report["failures"].append(f"{model.name}/{backend}/{steps} steps/{streams} streams: {error}")
                    report["results"].append(row)
                    continue
                metrics = case["metrics"]
                # The first warm-up includes lazy builds: ONNX Runtime's TensorRT provider, torch.compile.
                build.setdefault("first_warmup_seconds", round(metrics["warmup_seconds"], 2))
                work = metrics.pop("unet_rows") * flops["unet_per_row"] + metrics["frames"] * flops["vae_per_frame"]
                metrics["tflops"] = work / metrics.pop("seconds") / 1e12
                metrics["peak_share"] = metrics["tflops"] / peak if peak else None
                row.update(metrics, status="ok")
                if backend == args.backends[0]:
                    reference[(steps, streams)] = case["outputs"]
                    row["psnr_db"], row["psnr_ok"] = None, True
                else:
                    value = psnr_against(reference.get((steps, streams), {}), case["outputs"])
                    row["psnr_db"] = value
                    row["psnr_ok"] = bool(value >= args.min_psnr)
                    if not row["psnr_ok"]:
                        report["failures"].append(f"{model.name}/{backend}/{steps} steps/{streams} streams: PSNR "
                                                  f"{value:.1f} dB < {args.min_psnr} dB against {args.backends[0]}")
                report["results"].append(row)
                print(format_row(row), flush=True)
        del engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _config(size: int, steps: int) -> Any:
    from streamdiff import StreamConfig
    from streamdiff.config import t_index_list_for_strength

    return StreamConfig(width=size, height=size, t_index_list=t_index_list_for_strength(0.5, steps), cfg_type="self")


# -- report ---------------------------------------------------------------------------------------------------------

COLUMNS = (("model", "{}"), ("backend", "{}"), ("steps", "{}"), ("streams", "{}"), ("fps", "{:.1f}"),
           ("fps_per_stream", "{:.1f}"), ("latency_ms_p50", "{:.1f}"), ("latency_ms_p95", "{:.1f}"),
           ("gpu_mem_peak_mb", "{:.0f}"), ("tflops", "{:.2f}"), ("peak_share", "{:.1%}"), ("psnr_db", "{:.1f}"))


def format_row(row: dict[str, Any]) -> str:
    cells = []
    for name, fmt in COLUMNS:
        value = row.get(name)
        cells.append("-" if value is None else (fmt.format(value) if not isinstance(value, str) else value))
    return " | ".join(f"{c:>10}" for c in cells) + ("" if row.get("status") == "ok" else f"  {row.get('error')}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="everything up to the GPU, on the CPU")
    parser.add_argument("--no-venv", action="store_true", help="use this interpreter (no venv of its own)")
    parser.add_argument("--venv", default=str(REPO / ".venv-gpu-check"))
    parser.add_argument("--json", default="gpu_check.json", help="where the report goes")
    parser.add_argument("--engine-dir", default=str(REPO / "gpu_check_engines"))
    parser.add_argument("--models", default=None, help="comma-separated: tiny, sd21 (default: both)")
    parser.add_argument("--backends", default=None, help="comma-separated; the first is the reference")
    parser.add_argument("--size", type=int, default=None, help="frame side in px (512; 64 in a dry run)")
    parser.add_argument("--steps", default="1,2")
    parser.add_argument("--streams", default=None, help="stream counts (1,4,8; 1,3 in a dry run)")
    parser.add_argument("--ticks", type=int, default=None, help="measured ticks per case (20; 2 in a dry run)")
    parser.add_argument("--min-psnr", type=float, default=30.0)
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for builds and runs before skipping")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 in a dry run: steadier)")
    args = parser.parse_args(argv)
    args.steps = [int(s) for s in args.steps.split(",")]
    args.streams = [int(s) for s in (args.streams or ("1,3" if args.dry_run else "1,4,8")).split(",")]
    args.size = args.size or (64 if args.dry_run else 512)
    args.ticks = args.ticks or (2 if args.dry_run else 20)
    return args


def gpu_present() -> bool:
    """torch sees a CUDA GPU; without torch in this interpreter, ``nvidia-smi -L`` lists one."""
    if torch is not None:
        return bool(torch.cuda.is_available())
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return listed.returncode == 0 and "GPU" in listed.stdout


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    args = parse_args(argv)
    has_gpu = gpu_present()
    if not has_gpu and not args.dry_run:
        print("no CUDA GPU visible to torch: running the dry run (everything up to the GPU, on the CPU)")
        args = parse_args([*(argv if argv is not None else sys.argv[1:]), "--dry-run"])
    report: dict[str, Any] = {"dry_run": args.dry_run, "builds": [], "results": [], "failures": [], "models": {}}
    enter_venv(args, report)
    if torch is None:
        print("torch is not installed in this interpreter: pip install -e '.[dev]' (or run without --dry-run/--no-venv "
              "on a GPU machine, which makes its own venv)")
        return 1
    device = torch.device("cuda") if has_gpu and not args.dry_run else torch.device("cpu")
    if args.threads or args.dry_run:
        torch.set_num_threads(args.threads or 1)
    from streamdiff import __version__

    report["streamdiff"] = __version__
    report["environment"] = env = environment(device)
    peak_table = table_peak(env.get("gpu", ""))
    peak_measured = measured_peak(device) if device.type == "cuda" else None
    report["peak_fp16_tflops"] = {"table": peak_table, "measured_matmul": peak_measured,
                                  "used": peak_table or peak_measured}
    names = (args.models or "tiny,sd21").split(",")
    args.backends = (args.backends.split(",") if args.backends else available_backends(device, env))
    print(f"streamdiff gpu_check on {env.get('gpu', 'the CPU')}: models {names}, backends {args.backends}, "
          f"{args.size}px, steps {args.steps}, streams {args.streams}, {args.ticks} ticks")
    max_rows = max(args.streams) * max(args.steps)
    models = {}
    report["phases"] = phases = {"setup": round(time.monotonic() - started, 1)}
    for name in names:
        real = name == "tiny" or device.type == "cuda"
        model = build_tiny() if name == "tiny" else build_sd21(weights=real)
        plans_model = _MetaModel(model)
        report["models"][name] = {
            "flops": count_flops(model, args.size),
            "flops_by_side": {str(side): count_flops(model, side) for side in (256, 512)},
            "tensorrt_plans": tensorrt_plans(plans_model, max(args.streams), max_rows, max(args.size, 256)),
        }
        if real:
            models[name] = model
        phases[f"model {name}"] = round(time.monotonic() - started - sum(phases.values()), 1)
    if args.dry_run and "tiny" in models:
        export_float16_graphs(models["tiny"], args, max_rows, report)
        phases["float16 export"] = round(time.monotonic() - started - sum(phases.values()), 1)
    print(" | ".join(f"{name:>10}" for name, _ in COLUMNS))
    deadline = started + args.budget
    for model in models.values():
        check_model(model, device, args, report, deadline)
        phases[f"runs {model.name}"] = round(time.monotonic() - started - sum(phases.values()), 1)
    report["seconds"] = round(time.monotonic() - started, 1)
    report["ok"] = not report["failures"] and any(r.get("status") == "ok" for r in report["results"])
    Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    print(f"{'OK' if report['ok'] else 'FAILED'} in {report['seconds']} s; report: {args.json}")
    for failure in report["failures"]:
        print("  failure:", failure)
    return 0 if report["ok"] else 1


def export_float16_graphs(model: CheckModel, args: argparse.Namespace, max_rows: int, report: dict[str, Any]) -> None:
    """Dry run: export the float16 graphs TensorRT and ONNX Runtime CUDA would use, through the engine cache."""
    from streamdiff.backends.builders import COMPONENTS, onnx_step, tensorrt_plan
    from streamdiff.backends.cache import EngineCache
    from streamdiff.backends.keys import EngineOptions, EngineShapes

    loaded = model.loaded(torch.device("cpu"), torch.float32)
    options = EngineOptions(engine_dir=args.engine_dir, opt_resolution=args.size)
    shapes = EngineShapes.for_engine(max_rows, max(args.streams), ((args.size, args.size),))
    exported = {}
    for component in COMPONENTS:
        started = time.perf_counter()
        step = onnx_step(loaded, shapes, options, EngineCache(options.directory), component, dtype=torch.float16)
        entry = step.run()
        plan = tensorrt_plan(loaded, component, step.key.shapes, entry.artifact)
        from streamdiff.backends.tensorrt_build import check_graph_precision

        exported[component.value] = {"onnx": str(entry.artifact), "seconds": round(time.perf_counter() - started, 2),
                                     "weights": check_graph_precision(entry.artifact, plan.precision),
                                     "plan": plan.describe()}
    report["models"][model.name]["float16_graphs"] = exported


if __name__ == "__main__":
    sys.exit(main())
