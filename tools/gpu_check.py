"""Prove streamdiff's GPU path on a machine that has an NVIDIA GPU, in one unattended command.

Usage::

    python tools/gpu_check.py --wheels-target /tmp/sd-wheels   # the offline GPU box: this interpreter, ≤ 6 min
    python tools/gpu_check.py --venv .venv-gpu-check           # a networked GPU box: its own venv with TensorRT
    python tools/gpu_check.py --dry-run                        # anywhere: everything up to the GPU, on the CPU
    python tools/gpu_check.py --models tiny --backends torch-fp16,tensorrt

The offline box (docs/engines.md) has torch with CUDA and all of streamdiff's needs but diffusers; ``bash
tools/gpu_wheels.sh`` prepares the missing wheels (``tools/gpu_wheels.txt``, < 64 MiB) on a networked machine, they
are installed there with ``pip install --no-index --no-deps --target DIR`` and ``--wheels-target DIR`` puts them on
``sys.path``, with this repository when ``streamdiff`` is not installed. ``--deadline`` seconds (330) after the
start, whatever still runs is abandoned: the items it cut are reported and the table and JSON still written.

What it does, in order:

1. **interpreter** — by default this one (``--wheels-target`` and the repository put on ``sys.path`` where needed;
   a module streamdiff needs that is still missing stops it with the commands that bring it). ``--venv DIR`` instead
   creates DIR with the package index's default ``torch`` (a CUDA build on Linux x86-64) and
   ``streamdiff[onnx-gpu,tensorrt]`` (onnxruntime-gpu, TensorRT 10.1–11.x), then runs itself again inside it;
   nothing but the package index is contacted.
2. **models** — the built-in tiny model and an SD-2.1-size model with random weights
   (:func:`streamdiff.testing.sd21_components`: 866M-parameter U-Net, TAESD, SD-2.1 text encoder), each in float32
   (the reference) and float16.
3. **backends** — every one installed: ``torch-fp32`` (reference), ``torch-fp16`` (the default: whole-tick CUDA
   graphs), ``torch-fp16-eager`` (no graphs), ``torch-fp16-calls`` (a graph per engine call), ``torch-compile``
   (``torch.compile`` of the float16 U-Net, under the graphs), ``onnxruntime-cuda`` and ``onnxruntime-tensorrt`` (ONNX Runtime's CUDA
   and TensorRT providers on float16 graphs), ``tensorrt`` (strongly typed float16 engines, CUDA graphs). Engines
   are built through the engine cache (``--engine-dir``; a second run reuses them) and their build time is kept.
   One whose software is missing (TensorRT, onnxruntime-gpu and its providers) is a row ``not installed here``, not
   a failure. They run backend by backend, each over both models, in this order: the reference first and the
   costly compiles last, so that a short deadline cuts what matters least. ``hang`` is a stand-in (torch float32
   whose ticks never return) that shows the deadline at work.
4. **runs** — every backend through the multi-stream :class:`~streamdiff.engine.StreamEngine` at 512² (``--size``)
   with 1 and 2 denoising steps and 1, 4 and 8 streams (RCFG self, strength 0.5), ``--ticks`` measured ticks after
   warm-up. Each stream gets its own moving test pattern, prompt and seed.
5. **checks** — every backend's frames against torch float32's frames of the same case (PSNR, ``--min-psnr`` dB);
   ``torch-fp16-eager``'s and ``torch-fp16-calls``' also against ``torch-fp16``'s (``psnr_vs_graphs_db``,
   ``--min-psnr-graphs`` dB: whole-tick graphs against eager float16).
6. **report** — a table and a JSON file (``--json``): frames/s (all streams), per-stream frames/s, tick time and
   per-frame latency p50/p95 (a frame's latency is the sum of the ticks it spends in the Stream Batch), peak and
   device-wide GPU memory, engine build times, achieved TFLOP/s (U-Net and VAE FLOPs counted with torch's
   FlopCounterMode on a meta-device copy) and the share of the GPU's dense fp16 peak (a table of known GPUs, and a
   measured 8192³ fp16 matmul).

JSON fields: ``ok``, ``dry_run``, ``seconds``, ``deadline`` (seconds, budget_seconds, reached, cut: the items
abandoned), ``offline_box`` (the wheel plan: wheels with their sizes, total_bytes, limit_bytes, fits, problems, and
the prepare/install/run commands), ``sys_path_added``, ``streamdiff`` and ``streamdiff_from`` (version and folder),
``backends`` (each one considered: status ``run``, ``not installed here`` or ``not run here``, and why),
``environment`` (python, torch, cuda, gpu, capability, memory, tensorrt, onnxruntime and its providers), ``venv``
(path, commands, created), ``peak_fp16_tflops`` (table, measured_matmul, used), ``models`` (per model: U-Net
parameters, FLOPs per U-Net row and per VAE frame at the run size and at 256 and 512 px, the TensorRT build plans
with their profiles; in a dry run the exported float16 graphs),
``phases`` (seconds per phase), ``builds`` (model, backend, seconds, status, first_warmup_seconds: the first case's
warm-up, where ONNX Runtime's TensorRT provider builds its engines and torch.compile compiles), ``results`` (one per
model × backend × steps × streams: fps, fps_per_stream, tick_ms_p50/p95, latency_ms_p50/p95, warmup_seconds,
gpu_mem_peak_mb (torch's allocator), gpu_mem_used_mb (device-wide, sampled), gpu_mem_outside_torch_mb, tflops,
peak_share, psnr_db, psnr_ok, psnr_vs_graphs_db, unet_calls_per_tick, cuda_graphs (the torch backend's graph
captures and replays in the case: whole-tick and per-call, and keys that ran eagerly), status, error; status
is ``ok``, ``failed``, ``skipped: time budget`` or ``cut: deadline``) and ``failures``. The exit status is 0 when
every case that ran matched the reference and nothing failed; cut and not-installed items are not failures.

Without a GPU it says so and runs the dry run (``torch-fp32-graphs`` runs the whole-tick and per-call CUDA-graph
code through a CPU stand-in seam, and must equal torch float32 exactly): the offline box's wheel plan and the venv plan are printed (not run),
the tiny model is built, its float16
ONNX graphs (what TensorRT and ONNX Runtime CUDA use) are exported, the TensorRT build plans and profiles of both
models (the SD-2.1-size one on the meta device) are computed, the FLOPs counted, and the StreamEngine runs
torch float32 against ONNX Runtime (CPU provider) over the case grid at ``--size`` (64 px by default in a dry run).
``--budget`` seconds (the deadline less 60) bound the start of new builds and cases (the rest are reported as
skipped); ``--deadline`` is the hard limit.
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
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from gpu_check_box import (TARGET, WHEELS_DIR, Progress, missing_modules, offline_plan, print_plan, put_on_path,
                           run_until, worker_alive)

try:  # the interpreter that starts the check may have no torch yet: the venv brings it
    import torch
except ImportError:
    torch = None  # type: ignore[assignment]

REPO = Path(__file__).resolve().parents[1]
IN_VENV_ENV = "STREAMDIFF_GPU_CHECK_IN_VENV"
EXTRAS = "onnx-gpu,tensorrt"
BACKENDS = ("torch-fp32", "torch-fp16", "torch-fp16-eager", "tensorrt", "onnxruntime-cuda", "torch-compile",
            "torch-fp16-calls", "onnxruntime-tensorrt")
# Backends whose frames are also checked against torch-fp16's (whole-tick CUDA graphs) at --min-psnr-graphs dB.
GRAPH_COMPANIONS = ("torch-fp16-eager", "torch-fp16-calls")
# The dry run's (torch-fp32-graphs: the CUDA-graph code paths through a CPU stand-in seam), and the deadline's
# stand-in.
CPU_BACKENDS = ("torch-fp32", "torch-fp32-graphs", "onnxruntime-cpu", "hang")
DEFAULT_VENV = REPO / ".venv-gpu-check"
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
    """With ``--venv``: create it (once) and re-run inside it. Otherwise, and in a dry run, only record the plan."""
    venv = Path(args.venv or DEFAULT_VENV).resolve()
    commands = venv_commands(venv)
    inside = bool(os.environ.get(IN_VENV_ENV))
    report["venv"] = {"path": str(venv), "commands": [" ".join(c) for c in commands], "created": inside}
    if inside:
        print(f"running inside {venv}")
        return
    if args.dry_run or args.venv is None:
        if args.dry_run:
            print("networked GPU box plan, --venv (not run: dry run):")
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
    os.execv(str(python), [str(python), str(Path(__file__).resolve()), *sys.argv[1:]])


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
        self.unet_extras: tuple[str, ...] = ()  # the checked models are SD-architecture: no SDXL added conditions
        self.pooled_size = 0


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
    memory = []  # device-wide samples (TensorRT's and ONNX Runtime's allocations count too)
    if device.type == "cuda":
        from streamdiff.backends.device import gpu_memory

        torch.cuda.reset_peak_memory_stats(device)
        memory.append(gpu_memory(device))
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
            if memory:
                memory.append(gpu_memory(device))
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
    if memory:  # the driver keeps no device-wide peak: the largest of the samples (start, after warm-up, end)
        memory.append(gpu_memory(device))
        result["gpu_mem_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20  # torch's allocator only
        result["gpu_mem_used_mb"] = max(m.used for m in memory) / 2**20
        result["gpu_mem_outside_torch_mb"] = max(m.outside_torch for m in memory) / 2**20
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
    if backend == "torch-fp32-graphs":  # the dry run: whole-tick and per-call graphs' bookkeeping, without a GPU
        from streamdiff.testing.cuda_seam import CallableCuda

        return StreamEngine(model.loaded(device, torch.float32), replace(config, cuda_graphs=True), backend="torch",
                            cuda=CallableCuda())
    if backend == "hang":
        return _Hang(StreamEngine(model.loaded(device, torch.float32), config, backend="torch"))
    if backend == "onnxruntime-cpu":  # the dry run: the float16 graphs of the GPU path, on ONNX Runtime's CPU provider
        return StreamEngine(model.loaded(device, torch.float16), config, backend="onnxruntime",
                            engine_options=EngineOptions(engine_dir=engine_dir, opt_resolution=args.size))
    loaded = model.loaded(device, torch.float16)
    if backend == "torch-fp16":
        return StreamEngine(loaded, config, backend="torch")
    if backend == "torch-fp16-eager":
        return StreamEngine(loaded, replace(config, cuda_graphs=False), backend="torch")
    if backend == "torch-fp16-calls":
        return StreamEngine(loaded, replace(config, cuda_graph_scope="call"), backend="torch")
    if backend == "torch-compile":
        from streamdiff.backends.torch_backend import TorchVae, compiled_unet

        return StreamEngine(loaded, config, unet=compiled_unet(loaded.unet, channels_last=False),
                            vae=TorchVae(loaded.vae))
    if backend == "tensorrt":
        return StreamEngine(loaded, replace(config, cuda_graphs=True), backend="tensorrt",
                            engine_options=EngineOptions(engine_dir=engine_dir))
    providers = ("CUDAExecutionProvider",) if backend == "onnxruntime-cuda" else (
        "TensorrtExecutionProvider", "CUDAExecutionProvider")
    return StreamEngine(loaded, config, backend="onnxruntime",
                        engine_options=EngineOptions(engine_dir=engine_dir, onnx_providers=providers))


class _Hang:
    """The ``hang`` backend: a torch float32 engine whose ticks never return, like a GPU call that hangs."""

    def __init__(self, engine: Any) -> None:
        self._engine, self._never = engine, threading.Event()

    def step(self, feed: dict[Any, Any]) -> dict[Any, Any]:
        self._never.wait()  # nothing sets it: only the deadline ends this
        raise AssertionError("unreachable")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def graph_counts(engine: Any) -> dict[str, int] | None:
    """The torch backend's CUDA-graph counters (whole-tick and per-call captures and replays, keys that fell back
    to eager), or None without them: a case's row shows whether its ticks really replayed graphs."""
    graphs = getattr(engine, "graphs", None)
    if graphs is None:
        return None
    calls = graphs.calls()
    counts = {"call_captures": sum(c.captures for c in calls), "call_replays": sum(c.replays for c in calls),
              "call_eager": sum(len(c.eager) for c in calls)}
    if graphs.ticks is not None:
        counts.update(tick_captures=graphs.ticks.captures, tick_replays=graphs.ticks.replays,
                      tick_eager=len(graphs.ticks.eager))
    return counts


def backend_status(backend: str, device: torch.device, env: dict[str, Any]) -> str | None:
    """Why ``backend`` cannot run here (``not installed here: …`` or ``not run here: …``), or None when it can."""
    if backend in CPU_BACKENDS:
        return None
    providers = env.get("onnxruntime_providers") or []
    has_tensorrt = not str(env.get("tensorrt", "unavailable")).startswith("unavailable")
    if backend in ("tensorrt", "onnxruntime-tensorrt") and not has_tensorrt:
        detail = str(env.get("tensorrt", "")).removeprefix("unavailable").strip(" ()")
        return f"not installed here: tensorrt ({detail or 'no module'})"
    wanted = {"onnxruntime-cuda": "CUDAExecutionProvider", "onnxruntime-tensorrt": "TensorrtExecutionProvider"}
    if backend in wanted and wanted[backend] not in providers:
        return (f"not installed here: onnxruntime-gpu (ONNX Runtime {env.get('onnxruntime')} has "
                f"{', '.join(providers) or 'no providers'}; no {wanted[backend]})")
    if device.type != "cuda":
        return "not run here: needs a CUDA GPU"
    return None


def default_backends(device: torch.device) -> list[str]:
    """A dry run runs torch float32 against ONNX Runtime on the CPU and reports on the GPU backends; a GPU run
    tries every GPU backend (those not installed become rows that say so)."""
    if device.type != "cuda":
        return ["torch-fp32", "torch-fp32-graphs", "onnxruntime-cpu", *BACKENDS[1:]]
    return list(BACKENDS)


def psnr_against(reference: dict[int, list[torch.Tensor]], outputs: dict[int, list[torch.Tensor]]) -> float:
    """The lowest PSNR (dB) over every stream's frames against the reference's frames of the same stream and tick."""
    from streamdiff.core.image import psnr

    values = [psnr(a.float().clamp(0, 1), b.float().clamp(0, 1))
              for i in reference for a, b in zip(outputs.get(i, []), reference[i])]
    return min(values) if values else math.nan


def check_backend(model: CheckModel, backend: str, device: torch.device, args: argparse.Namespace,
                  progress: Progress, flops: dict[str, float], peak: float | None, budget_at: float,
                  reference: dict[tuple[int, int], dict[int, list[torch.Tensor]]],
                  graphed: dict[tuple[int, int], dict[int, list[torch.Tensor]]] | None = None) -> None:
    """Every steps × streams case of one model on one backend, recorded through ``progress``; the reference
    backend's outputs go into ``reference``, the others' are checked against it (torch-fp16's go into ``graphed``,
    and :data:`GRAPH_COMPANIONS`' are checked against those too). Nothing new starts after
    ``budget_at`` (the rest is ``skipped: time budget``), and the deadline may abandon this at any point."""
    max_streams, max_rows = max(args.streams), max(args.streams) * max(args.steps)
    if time.monotonic() > budget_at:
        progress.add("builds", {"model": model.name, "backend": backend, "status": "skipped: time budget"})
        return
    progress.start(model=model.name, backend=backend, phase="build")
    started = time.perf_counter()
    try:
        engine = make_engine(backend, model, device, args, max_streams, max_rows)
        engine.prepare_backends(_config(args.size, 1))
    except Exception as error:  # noqa: BLE001 - one backend failing must not hide the others
        logger.exception("%s on %s could not be built", backend, model.name)
        progress.add("builds", {"model": model.name, "backend": backend, "status": f"failed: {error}"})
        progress.add("failures", f"{model.name}/{backend}: build failed: {type(error).__name__}: {error}")
        return
    build = {"model": model.name, "backend": backend, "status": "ok",
             "seconds": round(time.perf_counter() - started, 2)}
    progress.add("builds", build)
    for steps in args.steps:
        for streams in args.streams:
            row: dict[str, Any] = {"model": model.name, "backend": backend, "size": args.size, "steps": steps,
                                   "streams": streams}
            if time.monotonic() > budget_at:
                row["status"] = "skipped: time budget"
                progress.add("results", row)
                print(format_row(row), flush=True)
                continue
            progress.start(model=model.name, backend=backend, steps=steps, streams=streams, phase="case")
            graphs_before = graph_counts(engine)
            try:
                if backend == "torch-fp32":  # the reference is true float32: TF32 off for matmuls and cuDNN
                    from streamdiff.backends.device import strict_float32

                    with strict_float32():
                        case = run_case(engine, args.size, steps, streams, args.ticks, device)
                else:
                    case = run_case(engine, args.size, steps, streams, args.ticks, device)
            except Exception as error:  # noqa: BLE001
                logger.exception("%s failed", row)
                row.update(status="failed", error=f"{type(error).__name__}: {error}")
                progress.add("failures", f"{model.name}/{backend}/{steps} steps/{streams} streams: {error}")
                progress.add("results", row)
                continue
            metrics = case["metrics"]
            if "first_warmup_seconds" not in build:
                # The first warm-up includes lazy builds: ONNX Runtime's TensorRT provider, torch.compile.
                progress.update(build, first_warmup_seconds=round(metrics["warmup_seconds"], 2))
            counted = metrics.pop("unet_rows") * flops["unet_per_row"] + metrics["frames"] * flops["vae_per_frame"]
            metrics["tflops"] = counted / metrics.pop("seconds") / 1e12
            metrics["peak_share"] = metrics["tflops"] / peak if peak else None
            row.update(metrics, status="ok")
            if graphs_before is not None:
                row["cuda_graphs"] = {k: v - graphs_before[k] for k, v in graph_counts(engine).items()}
            if backend == args.backends[0]:
                reference[(steps, streams)] = case["outputs"]
                row["psnr_db"], row["psnr_ok"] = None, True
            else:
                value = psnr_against(reference.get((steps, streams), {}), case["outputs"])
                row["psnr_db"] = value
                row["psnr_ok"] = bool(value >= args.min_psnr)
                if not row["psnr_ok"]:
                    progress.add("failures", f"{model.name}/{backend}/{steps} steps/{streams} streams: PSNR "
                                             f"{value:.1f} dB < {args.min_psnr} dB against {args.backends[0]}")
            if graphed is not None and backend == "torch-fp16":
                graphed[(steps, streams)] = case["outputs"]
            if graphed is not None and backend in GRAPH_COMPANIONS and (steps, streams) in graphed:
                value = psnr_against(graphed[(steps, streams)], case["outputs"])
                row["psnr_vs_graphs_db"] = value
                if not value >= args.min_psnr_graphs:
                    row["psnr_ok"] = False
                    progress.add("failures", f"{model.name}/{backend}/{steps} steps/{streams} streams: PSNR "
                                             f"{value:.1f} dB < {args.min_psnr_graphs} dB against torch-fp16")
            progress.add("results", row)
            progress.done()
            print(format_row(row), flush=True)
    progress.done()
    del engine
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _config(size: int, steps: int) -> Any:
    from streamdiff import StreamConfig
    from streamdiff.config import t_index_list_for_strength

    return StreamConfig(width=size, height=size, t_index_list=t_index_list_for_strength(0.5, steps), cfg_type="self")


# -- the work and the deadline --------------------------------------------------------------------------------------


def work(names: list[str], device: torch.device, args: argparse.Namespace, progress: Progress,
         budget_at: float) -> None:
    """Everything that may take long or hang on the device, on the worker thread: the matmul peak, the models, the
    dry run's float16 export and every case."""
    mark = [time.monotonic()]

    def phase(name: str) -> None:
        now = time.monotonic()
        progress.put("phases", name, value=round(now - mark[0], 1))
        mark[0] = now

    try:
        progress.start(phase="peak")
        peak_table = table_peak(args.gpu_name)
        peak_measured = measured_peak(device) if device.type == "cuda" else None
        peak = peak_table or peak_measured
        for key, value in (("table", peak_table), ("measured_matmul", peak_measured), ("used", peak)):
            progress.put("peak_fp16_tflops", key, value=value)
        max_rows = max(args.streams) * max(args.steps)
        models, flops = {}, {}
        for name in names:
            progress.start(model=name, phase="model")
            real = name == "tiny" or device.type == "cuda"
            model = build_tiny() if name == "tiny" else build_sd21(weights=real)
            flops[name] = count_flops(model, args.size)
            progress.put("models", name, value={
                "flops": flops[name],
                "flops_by_side": {str(side): count_flops(model, side) for side in (256, 512)},
                "tensorrt_plans": tensorrt_plans(_MetaModel(model), max(args.streams), max_rows, max(args.size, 256)),
            })
            if real:
                models[name] = model
            phase(f"model {name}")
        if args.dry_run and "tiny" in models and args.export:
            progress.start(model="tiny", phase="float16 export")
            export_float16_graphs(models["tiny"], args, max_rows, progress)
            phase("float16 export")
        print(" | ".join(f"{name:>10}" for name, _ in COLUMNS), flush=True)
        # Backend by backend over the models: the reference first, the costly compiles last, so that what a short
        # deadline cuts is what matters least.
        references: dict[str, dict[tuple[int, int], dict[int, list[torch.Tensor]]]] = {n: {} for n in models}
        graphed: dict[str, dict[tuple[int, int], dict[int, list[torch.Tensor]]]] = {n: {} for n in models}
        for backend in args.backends:
            for model in models.values():
                check_backend(model, backend, device, args, progress, flops[model.name], peak, budget_at,
                              references[model.name], graphed[model.name])
            phase(f"runs {backend}")
    except Exception as error:  # noqa: BLE001 - reported, with what finished before it
        logger.exception("gpu_check stopped")
        progress.add("failures", f"stopped: {type(error).__name__}: {error}")
    progress.done()


def cut_rows(report: dict[str, Any], current: dict[str, Any] | None, names: list[str],
             args: argparse.Namespace) -> list[dict[str, Any]]:
    """The cases the deadline cut, in run order: the one running (``was running``) and every one not started,
    except those of a backend whose build failed or was skipped."""
    done = {(r["model"], r["backend"], r["steps"], r["streams"]) for r in report["results"]}
    not_built = {(b["model"], b["backend"]) for b in report["builds"] if b["status"] != "ok"}
    running = current and current.get("phase") == "case" and tuple(
        current[k] for k in ("model", "backend", "steps", "streams"))
    rows = []
    for backend in args.backends:
        for name in names:
            if (name, backend) in not_built:
                continue
            for steps in args.steps:
                for streams in args.streams:
                    if (name, backend, steps, streams) not in done:
                        was = running == (name, backend, steps, streams)
                        rows.append({"model": name, "backend": backend, "size": args.size, "steps": steps,
                                     "streams": streams, "status": "cut: deadline",
                                     "error": "was running" if was else "not started"})
    return rows


# -- report ---------------------------------------------------------------------------------------------------------

COLUMNS = (("model", "{}"), ("backend", "{}"), ("steps", "{}"), ("streams", "{}"), ("fps", "{:.1f}"),
           ("fps_per_stream", "{:.1f}"), ("latency_ms_p50", "{:.1f}"), ("latency_ms_p95", "{:.1f}"),
           ("gpu_mem_peak_mb", "{:.0f}"), ("tflops", "{:.2f}"), ("peak_share", "{:.1%}"), ("psnr_db", "{:.1f}"),
           ("psnr_vs_graphs_db", "{:.1f}"))


def format_row(row: dict[str, Any]) -> str:
    cells = []
    for name, fmt in COLUMNS:
        value = row.get(name)
        cells.append("-" if value is None else (fmt.format(value) if not isinstance(value, str) else value))
    line = " | ".join(f"{c:>10}" for c in cells)
    return line if row.get("status") == "ok" else f"{line}  {row.get('status')}" + (
        f": {row['error']}" if row.get("error") else "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="everything up to the GPU, on the CPU")
    parser.add_argument("--wheels-target", default=None,
                        help=f"put this folder on sys.path first: where the box's wheels were installed with pip "
                             f"--target (e.g. {TARGET})")
    parser.add_argument("--wheels", default=WHEELS_DIR, help="the folder gpu_wheels.sh filled (for the plan)")
    parser.add_argument("--venv", default=None,
                        help="a networked GPU box: make this venv (CUDA torch, TensorRT, onnxruntime-gpu) and run in "
                             "it; default: this interpreter")
    parser.add_argument("--json", default="gpu_check.json", help="where the report goes")
    parser.add_argument("--engine-dir", default=str(REPO / "gpu_check_engines"))
    parser.add_argument("--models", default=None, help="comma-separated: tiny, sd21 (default: both)")
    parser.add_argument("--backends", default=None,
                        help="comma-separated, the first is the reference: "
                             f"{', '.join((*BACKENDS, *CPU_BACKENDS[1:]))}")
    parser.add_argument("--size", type=int, default=None, help="frame side in px (512; 64 in a dry run)")
    parser.add_argument("--steps", default="1,2")
    parser.add_argument("--streams", default=None, help="stream counts (1,4,8; 1,3 in a dry run)")
    parser.add_argument("--ticks", type=int, default=None, help="measured ticks per case (20; 2 in a dry run)")
    parser.add_argument("--min-psnr", type=float, default=30.0)
    parser.add_argument("--min-psnr-graphs", type=float, default=40.0,
                        help="dB: eager float16 and per-call graphs against the whole-tick graphs (torch-fp16)")
    parser.add_argument("--deadline", type=float, default=330.0,
                        help="seconds from the start after which whatever runs is abandoned and the report written")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds from the start after which no new build or case starts (the deadline less 60, or "
                             "less a fifth when shorter)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 in a dry run: steadier)")
    args = parser.parse_args(argv)
    args.steps = [int(s) for s in args.steps.split(",")]
    args.streams = [int(s) for s in (args.streams or ("1,3" if args.dry_run else "1,4,8")).split(",")]
    args.size = args.size or (64 if args.dry_run else 512)
    args.ticks = args.ticks or (2 if args.dry_run else 20)
    args.budget = args.budget if args.budget is not None else args.deadline - min(60.0, args.deadline / 5)
    known = (*BACKENDS, *CPU_BACKENDS)
    unknown = [b for b in (args.backends or "").split(",") if b and b not in known]
    if unknown:
        parser.error(f"--backends: {', '.join(unknown)} unknown; choose from {', '.join(known)}")
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


def write_report(report: dict[str, Any], path: str, started: float) -> int:
    report["seconds"] = round(time.monotonic() - started, 1)
    report["ok"] = not report["failures"] and any(r.get("status") == "ok" for r in report["results"])
    Path(path).write_text(json.dumps(report, indent=2, default=str))
    print(f"{'OK' if report['ok'] else 'FAILED'} in {report['seconds']} s; report: {path}")
    for failure in report["failures"]:
        print("  failure:", failure)
    return 0 if report["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    args = parse_args(argv)
    has_gpu = gpu_present()
    if not has_gpu and not args.dry_run:
        print("no CUDA GPU visible to torch: running the dry run (everything up to the GPU, on the CPU)")
        args = parse_args([*(argv if argv is not None else sys.argv[1:]), "--dry-run"])
    report: dict[str, Any] = {"dry_run": args.dry_run, "builds": [], "results": [], "failures": [], "models": {},
                              "phases": {}, "peak_fp16_tflops": {}, "backends": []}
    report["offline_box"] = offline_plan(args.wheels, target=args.wheels_target or TARGET)
    if args.dry_run:
        print_plan(report["offline_box"])
    enter_venv(args, report)
    report["sys_path_added"] = put_on_path(args.wheels_target)
    missing = missing_modules()
    if missing:
        plan = report["offline_box"]
        report["failures"].append(f"not installed in this interpreter: {', '.join(missing)}")
        print(f"gpu_check: {', '.join(missing)} not installed in this interpreter ({sys.executable}). On the offline "
              f"GPU box: {plan['prepare']} on a networked machine, bring {plan['folder']}/ along, then "
              f"{plan['install']} && {plan['run']}; elsewhere: --venv DIR, or pip install -e '.[dev]'")
        return write_report(report, args.json, started)
    device = torch.device("cuda") if has_gpu and not args.dry_run else torch.device("cpu")
    if args.threads or args.dry_run:
        torch.set_num_threads(args.threads or 1)
    import streamdiff

    report["streamdiff"], report["streamdiff_from"] = streamdiff.__version__, str(Path(streamdiff.__file__).parent)
    report["environment"] = env = environment(device)
    args.gpu_name = env.get("gpu", "")
    names = (args.models or "tiny,sd21").split(",")
    wanted = args.backends.split(",") if args.backends else default_backends(device)
    args.export = any("onnx" in b or "tensorrt" in b for b in wanted)  # the dry run's float16 graphs: for these
    args.backends = choose_backends(wanted, device, env, report)
    print(f"streamdiff gpu_check on {env.get('gpu', 'the CPU')}: models {names}, backends {args.backends}, "
          f"{args.size}px, steps {args.steps}, streams {args.streams}, {args.ticks} ticks; new work until "
          f"{args.budget:.0f} s, deadline {args.deadline:.0f} s")
    report["phases"]["setup"] = round(time.monotonic() - started, 1)
    progress = Progress(report)
    finished = run_until(lambda: work(names, device, args, progress, started + args.budget), started + args.deadline)
    final, current = progress.snapshot()
    final["deadline"] = {"seconds": args.deadline, "budget_seconds": args.budget, "reached": not finished, "cut": []}
    if not finished:
        record_cut(final, current, [name for name in names if name == "tiny" or device.type == "cuda"], args)
    return write_report(final, args.json, started)


def choose_backends(wanted: list[str], device: torch.device, env: dict[str, Any],
                    report: dict[str, Any]) -> list[str]:
    """The backends of ``wanted`` that can run here; each one considered becomes a ``report['backends']`` row."""
    runnable = []
    for backend in wanted:
        why = backend_status(backend, device, env)
        report["backends"].append({"backend": backend, "status": why.split(":")[0] if why else "run",
                                   "reason": why.partition(": ")[2] if why else None})
        if why is None:
            runnable.append(backend)
        else:
            print(f"{backend:>20}: {why}")
    return runnable


def record_cut(final: dict[str, Any], current: dict[str, Any] | None, run_names: list[str],
               args: argparse.Namespace) -> None:
    """The deadline came: the phase it interrupted and every case it cut go into ``final`` and the table."""
    print(f"DEADLINE: {args.deadline:.0f} s reached; the work still running is abandoned")
    rows = cut_rows(final, current, run_names, args)  # before the cut build's row, which would hide its cases
    if current and current.get("phase") != "case":  # a build, a model, the export or the peak
        where = "/".join(str(current[k]) for k in ("model", "backend") if k in current)
        final["deadline"]["cut"].append(f"{where or 'setup'}: was in {current['phase']}")
        print(f"  cut: {final['deadline']['cut'][-1]}")
        if current.get("phase") == "build":
            final["builds"].append({"model": current["model"], "backend": current["backend"],
                                    "status": "cut: deadline"})
    for row in rows:
        final["results"].append(row)
        final["deadline"]["cut"].append(f"{row['model']}/{row['backend']}/{row['steps']} steps/"
                                        f"{row['streams']} streams: {row['error']}")
        print(format_row(row), flush=True)


def export_float16_graphs(model: CheckModel, args: argparse.Namespace, max_rows: int, progress: Progress) -> None:
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
    progress.put("models", model.name, "float16_graphs", value=exported)


if __name__ == "__main__":
    code = main()
    if worker_alive():  # abandoned at the deadline, perhaps inside a CUDA call that never returns: no join, no atexit
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
