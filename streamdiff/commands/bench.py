"""``streamdiff bench``: measure the core engine's speed-ups side by side in one run.

Comparisons (``--only`` picks some): ``stream-batch`` (Stream Batch vs sequential), ``rcfg`` (RCFG self and
initialize vs full CFG), ``filter`` (U-Net calls per frame with the similarity filter on a static and a moving input),
``dtype`` (float32 vs bfloat16, with PSNR against float32), ``diffusers`` (diffusers' img2img pipeline per frame vs
streamdiff on the same U-Net), and on request ``rcfg-compiled`` (the RCFG comparison on the in-process compiled U-Net
and VAE, one U-Net compile per guidance mode) and ``streams`` (1, 2, 4 and 8 streams on one model: the engine's
cross-stream batching against the streams taking turns, aggregate frames/s and per-stream latency) and ``controlnet``
(a ControlNet stream's cost per frame against a plain stream's, and four ControlNet streams batched against taking
turns, on ``--backend``, default auto: OpenVINO on the CPU). Models: the built-in ``tiny`` one and ``sd21``, an SD-2.1-size model with random
weights built in memory. Configurations are interleaved; figures are medians over rounds. Example::

    streamdiff bench --model sd21 --threads 1 --json > bench.json

``--quality`` measures the trained ``tiny`` model's output instead of speed (:mod:`streamdiff.bench.quality_suite`):
structure kept (SSIM at strength 0.5), style reached, prompt sensitivity, and temporal stability (warp error) of
Stream Batch vs per-frame img2img, with and without the similarity filter.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
import warnings
from typing import Any

import torch

from ..bench.harness import Comparison, format_table, report_dict
from ..config import Precision, to_enum
from ..errors import ConfigError
from ..options import DTYPES
from .options import size_arg, square_size

NAME = "bench"
HELP = "benchmark Stream Batch, RCFG, the similarity filter, bfloat16 and diffusers' img2img side by side"

logger = logging.getLogger(__name__)

_DEFAULT_DTYPE = {"tiny": Precision.FLOAT32, "sd21": Precision.BFLOAT16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..bench.suites import COMPARISONS

    parser.add_argument("--model", choices=("tiny", "sd21", "both"), default="tiny", help="model(s) to measure")
    parser.add_argument("--size", type=size_arg, default=(256, 256), metavar="N|NxN",
                        help="square frame size in pixels, N or NxN (default 256)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 = steady single-thread timings)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per comparison (default 5)")
    parser.add_argument("--slow-rounds", type=int, default=None, help="rounds of the diffusers comparison (default 3)")
    parser.add_argument("--calls", type=int, default=None, help="frames per configuration and round (default 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up calls per configuration (default 2)")
    parser.add_argument(
        "--dtype", choices=[d for d in DTYPES if d != Precision.FLOAT16.value], default=None,
        help="precision of the stream-batch, rcfg and filter comparisons (default: float32 tiny, bfloat16 sd21)",
    )
    parser.add_argument(
        "--only", nargs="+", choices=COMPARISONS, default=None, metavar="NAME",
        help=f"run only these comparisons ({', '.join(COMPARISONS)})",
    )
    parser.add_argument("--backend", default="auto",
                        help="backend of the controlnet comparison (default auto: OpenVINO on the CPU)")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run: 2 rounds of 1 call, 1 warm-up")
    parser.add_argument("--no-compile", action="store_true", help="leave the compiled U-Net out of 'diffusers'")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument("--quality", action="store_true",
                        help="measure output quality of the trained tiny model (SSIM, styles, warp error), not speed")


def _settings(args: argparse.Namespace) -> Any:
    from ..bench.suites import Settings

    settings = Settings(rounds=2, calls=1, warmup=1, slow_rounds=2) if args.quick else Settings()
    for name in ("rounds", "slow_rounds", "calls", "warmup"):
        value = getattr(args, name)
        if value is not None:
            minimum = 0 if name == "warmup" else 1
            if value < minimum:
                raise ConfigError(f"--{name.replace('_', '-')}={value} must be >= {minimum}")
            setattr(settings, name, value)
    return settings


def _compiled_unet(model: Any) -> Any:
    """The torch backend's in-process compiled U-Net (inductor, frozen weights) when this build has one, else None.

    It compiles on its first call (~90 s for the SD-2.1-size U-Net), which falls in the warm-up.
    """
    from ..backends import torch_backend

    factory = getattr(torch_backend, "compiled_unet", None)
    return factory(model.unet, channels_last=True) if factory is not None else None


def _run_model(name: str, size: int, args: argparse.Namespace, settings: Any, only: list[str]) -> list[Comparison]:
    from ..bench import suites

    precision = to_enum(Precision, args.dtype, "dtype") if args.dtype else _DEFAULT_DTYPE[name]
    dtype = torch.bfloat16 if precision is Precision.BFLOAT16 else torch.float32
    bench_model = None
    if any(c != "controlnet" for c in only):  # controlnet builds its own model, in one precision only
        started = time.perf_counter()
        bench_model = suites.tiny_bench_model() if name == "tiny" else suites.sd21_bench_model()
        logger.info("built the %s model in %.1f s", name, time.perf_counter() - started)
    comparisons = []
    for comparison_name in only:
        started = time.perf_counter()
        if comparison_name == "controlnet":
            from ..bench.controlnet import compare_controlnet

            model, controlnet = suites.controlnet_bench_model(name, dtype)
            logger.info("built the %s model and its ControlNet in %.1f s", name, time.perf_counter() - started)
            comparison = compare_controlnet(model, controlnet, suites.base_config(size),
                                            suites.moving_frames(8, size), settings.rounds, settings.warmup,
                                            backend=args.backend)
        elif comparison_name == "diffusers":
            compiled = None if args.no_compile else _compiled_unet(bench_model.bf16)
            comparison = suites.compare_diffusers(bench_model, size, settings, compiled)
        elif comparison_name == "streams":
            from ..bench.streams import compare_streams

            comparison = compare_streams(bench_model.model(dtype), suites.base_config(size),
                                         suites.moving_frames(8, size), settings.rounds, settings.warmup)
        elif comparison_name == "rcfg-compiled":
            from ..backends.torch_backend import compiled_vae

            model = bench_model.model(dtype)
            compiled = _compiled_unet(model)
            if compiled is None:
                raise ConfigError("rcfg-compiled needs the torch backend's compiled U-Net, not in this build")
            vae = compiled_vae(model.vae, channels_last=dtype == torch.bfloat16)
            comparison = suites.compare_rcfg(bench_model, size, dtype, settings, compiled, vae)
        else:
            runner = {
                "stream-batch": suites.compare_stream_batch,
                "rcfg": suites.compare_rcfg,
                "filter": suites.compare_filter,
                "dtype": suites.compare_dtype,
            }[comparison_name]
            comparison = runner(bench_model, size, dtype, settings)
        comparison.name = f"{name}/{comparison_name}"
        logger.info("%s took %.0f s", comparison.name, time.perf_counter() - started)
        comparisons.append(comparison)
    return comparisons


def run(args: argparse.Namespace) -> int:
    from ..bench.suites import COMPARISONS, DEFAULT_COMPARISONS

    size = square_size(args.size)
    if size < 64 or size % 8:
        raise ConfigError(f"--size={size} must be a multiple of 8 and at least 64")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads={args.threads} must be >= 1")
        torch.set_num_threads(args.threads)
    if args.quality:
        return _run_quality(args)
    settings = _settings(args)
    # diffusers' modules call an lru_cache'd version check that dynamo warns about on every compile.
    warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
    only = [c for c in COMPARISONS if c in (args.only or DEFAULT_COMPARISONS)]
    models = ["tiny", "sd21"] if args.model == "both" else [args.model]
    started = time.perf_counter()
    comparisons: list[Comparison] = []
    for name in models:
        comparisons.extend(_run_model(name, size, args, settings, only))
    meta = {
        "command": "streamdiff " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "streamdiff bench",
        "size": size,
        "threads": torch.get_num_threads(),
        "settings": vars(settings),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    table = format_table(comparisons, title=f"{meta['command']}  ({meta['threads']} threads, {size} px)")
    if args.json:
        print(table, file=sys.stderr)  # for the person watching; stdout stays machine-readable
        print(json.dumps(report_dict(comparisons, **meta), indent=2))
    else:
        print(table)
    return 0


def _run_quality(args: argparse.Namespace) -> int:
    from ..bench.quality_suite import format_quality, quality_figures
    from ..models import load_model

    if args.model != "tiny":
        raise ConfigError(f"--quality measures the trained tiny model only, not --model {args.model}")
    started = time.perf_counter()
    figures = quality_figures(load_model("tiny", device="cpu"))
    figures["seconds"] = round(time.perf_counter() - started, 1)
    table = format_quality(figures)
    if args.json:
        print(table, file=sys.stderr)
        print(json.dumps(figures, indent=2))
    else:
        print(table)
    return 0
