"""``streamdiff engines``: build, list and clear compiled engines in the engine cache.

Examples::

    streamdiff engines build --model tiny --backend onnxruntime --size 256x256
    streamdiff engines build --model ./sd-turbo --dtype bfloat16 --backend torch --compile
    streamdiff engines build --model tiny --backend openvino --size 256x256
    streamdiff engines list
    streamdiff engines clear --backend onnx

``streamdiff run`` and :class:`~streamdiff.pipeline.StreamPipeline` build missing engines on first use; this command
builds them ahead of time (with a progress bar) so the first frame is not delayed. ``build`` takes the model, engine
and stream flags of ``streamdiff run`` (:mod:`.options`) with the same defaults (``--backend auto``: what ``run``
picks on this machine), so ``run`` with the same flags uses exactly the engines built here.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any

from ..config import StreamConfig
from ..options import (CONTROLNET_DEFAULTS, ENGINE_DEFAULTS, MODEL_DEFAULTS, STREAM_DEFAULTS, ModelOptions,
                       model_options, stream_config)
from . import options as shared

logger = logging.getLogger(__name__)

NAME = "engines"
HELP = "build, list or clear compiled engines (ONNX, ONNX Runtime, TensorRT, AOTInductor) in the engine cache"

# The options and defaults of `streamdiff run` (backend auto: what `run` would pick here).
BUILD_DEFAULTS: dict[str, Any] = {**MODEL_DEFAULTS, **CONTROLNET_DEFAULTS, **ENGINE_DEFAULTS, **STREAM_DEFAULTS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="engines_action", metavar="ACTION")
    actions.required = True
    build = actions.add_parser("build", help="build the engines a configuration needs (flags as in `run`)")
    shared.add_controlnet_options(shared.add_model_options(build, backend_default=BUILD_DEFAULTS["backend"]),
                                  scale=False)
    shared.add_engine_options(build)
    shared.add_stream_options(build)
    listing = actions.add_parser("list", help="show the cached engines")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.add_argument("--verify", action="store_true", help="also check every file's size and hash")
    shared.add_engine_dir_option(listing)
    clear = actions.add_parser("clear", help="delete cached engines (all, or those matching the filters)")
    clear.add_argument("--model", help="only engines of this model id")
    clear.add_argument("--backend", help="only engines of this backend (onnx, tensorrt, torch-aoti, openvino)")
    shared.add_engine_dir_option(clear)


def build_request(args: argparse.Namespace) -> tuple[ModelOptions, StreamConfig]:
    """What ``engines build`` builds for: the model options and the StreamConfig its flags describe."""
    options = shared.resolve(args, BUILD_DEFAULTS)
    return model_options(options), stream_config(options)


def _build(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    request, config = build_request(args)
    options = request.engine
    model = request.load()
    kind, steps = request.plan(model, config)
    if not steps:
        print(f"backend {kind.value} runs eagerly: nothing to build (add --compile for a compiled torch U-Net)")
        return 0
    started = time.monotonic()
    built = 0
    with tqdm(total=len(steps), unit="engine", desc="engines") as bar:
        for step in steps:
            from ..backends.cache import EngineCache

            bar.set_description(step.description)
            if not step.cached(EngineCache(options.directory)):
                built += 1
            entry = step.run()
            bar.write(f"{entry.path}  ({_human(entry.size)})")
            bar.update(1)
    print(f"{built} built, {len(steps) - built} reused, in {time.monotonic() - started:.1f} s ({options.directory})")
    return 0


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def _age(created: float) -> str:
    seconds = max(0.0, time.time() - created)
    for unit, span in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= span:
            return f"{seconds / span:.0f} {unit}"
    return f"{seconds:.0f} s"


def _shapes(key: dict[str, Any]) -> str:
    shapes = key.get("shapes", {})
    batch, height, width = shapes.get("batch", ["?"] * 2), shapes.get("height", ["?"] * 2), shapes.get("width", ["?"] * 2)
    b = f"{batch[0]}" if batch[0] == batch[1] else f"{batch[0]}-{batch[1]}"
    if height == width:
        side = f"{height[0]}" if height[0] == height[1] else f"{height[0]}-{height[1]}"
        return f"b{b} {side}px"
    return f"b{b} {height[0]}-{height[1]}x{width[0]}-{width[1]}px"


def _list(args: argparse.Namespace) -> int:
    from ..backends.cache import EngineCache

    cache = EngineCache(args.engine_dir)
    rows = []
    for path, manifest in cache.entries():
        status = "unreadable" if manifest is None else "ok"
        if manifest is not None and args.verify:
            status = cache.verify(path) or "ok"
        key = (manifest or {}).get("key", {})
        rows.append({
            "model": key.get("model", "?"), "component": key.get("component", "?"),
            "backend": key.get("backend", "?"), "precision": key.get("precision", "?"),
            "shapes": _shapes(key) if key else "?",
            "size": sum(f["size"] for f in (manifest or {}).get("files", {}).values()),
            "age": _age((manifest or {}).get("created", time.time())), "status": status, "path": str(path),
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no engines in {cache.root}")
        return 0
    header = ("model", "component", "backend", "precision", "shapes", "size", "age", "status")
    table = [header] + [tuple(_human(r[h]) if h == "size" else str(r[h]) for h in header) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print(f"{len(rows)} engine(s), {_human(sum(r['size'] for r in rows))} in {cache.root}")
    return 0


def _clear(args: argparse.Namespace) -> int:
    from ..backends.cache import EngineCache

    cache = EngineCache(args.engine_dir)
    if args.model is None and args.backend is None:
        removed = cache.clear()
    else:
        def matches(manifest: dict[str, Any] | None) -> bool:
            key = (manifest or {}).get("key", {})
            return (args.model is None or key.get("model") == args.model) and (
                args.backend is None or key.get("backend") == args.backend
            )

        removed = cache.clear(matches)
    print(f"removed {removed} engine(s) from {cache.root}")
    return 0


def run(args: argparse.Namespace) -> int:
    return {"build": _build, "list": _list, "clear": _clear}[args.engines_action](args)
