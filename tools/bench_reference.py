"""streamdiff against the original StreamDiffusion on the CPU, side by side, interleaved, same frames.

Usage (one command; the model folder and the compiled engines are cached between runs)::

    python tools/bench_reference.py                          # SD-2.1 size, 256², 2 steps, RCFG self, 2 threads
    python tools/bench_reference.py --configs default eager-bf16 --rounds 7 --json
    python tools/bench_reference.py --reference-python /tmp/ref-venv/bin/python

What runs:

- the model: SD-2.1 architecture with random weights (``streamdiff.testing.sd21_components``, seed 0; TAESD
  rescaled to unit-spread latents as ``streamdiff bench`` does), saved once as a bfloat16 diffusers folder
  (``--work-dir``) that both sides load through their own loaders;
- ``reference``: ``streamdiffusion==0.1.1`` at its best CPU setting (bfloat16) in its own venv
  (``--reference-python``, default ``tools/reference/.venv/bin/python``), driven as a worker process
  (``tools/bench_reference_worker.py``, which replaces its CUDA events with CPU stand-ins);
- streamdiff, in this process: ``default`` (what ``streamdiff run`` does with no flags: ``--backend auto``, the
  dtype of ``resolve_dtype``), ``openvino-bf16``, ``eager-bf16`` (torch eager, channels-last), ``compiled-bf16``
  (torch with the AOTInductor U-Net, VAE eager; the first build takes minutes and ~10 GB of RAM);
- ``matmul-peak``: a bfloat16 2048² matmul in torch, the machine's measured peak in the same rounds.

All configurations (the reference included) run in interleaved rounds A B C …, … C B A; while one runs, the others
wait. Before timing, each configuration turns the same frames into outputs from a fresh stream, and each
streamdiff configuration's frames are compared with the reference's (PSNR, peak 1). Achieved TFLOP/s = FLOPs of one
frame (U-Net rows + TAESD encode + decode, counted by torch's FlopCounterMode) / seconds per frame.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamdiff import StreamConfig, StreamPipeline
from streamdiff.backends.keys import EngineOptions, target_id
from streamdiff.bench.harness import Case, Check, Comparison, format_table, report_dict, run_interleaved
from streamdiff.bench.suites import calibrate_tiny_vae, moving_frames
from streamdiff.core.image import psnr, tensor_to_frame
from streamdiff.models import load_model

logger = logging.getLogger("bench_reference")
REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("default", "openvino-bf16", "eager-bf16", "compiled-bf16")
PROMPT = "a watercolor portrait"
T_INDEX_LIST = (25, 37)  # 2 steps of 50 at strength 0.5 (as streamdiff bench)
MODEL_VERSION = "1"  # bump when the saved benchmark model changes


def save_model(folder: Path, seed: int = 0) -> None:
    """The SD-2.1-size random model as a bfloat16 diffusers folder (``model/``) plus its TAESD (``taesd/``)."""
    from streamdiff.models.tiny import save_diffusers_folder
    from streamdiff.testing import sd21_components

    parts = sd21_components(seed)
    calibrate_tiny_vae(parts["taesd"], seed)
    taesd = parts.pop("taesd")
    staging = Path(tempfile.mkdtemp(prefix=".model-", dir=folder.parent))
    for module in (parts["unet"], parts["vae"], parts["text_encoder"], taesd):
        module.to(torch.bfloat16)
    save_diffusers_folder(parts, staging / "model")
    taesd.save_pretrained(staging / "taesd")
    portable_text_encoder(staging / "model" / "text_encoder")
    (staging / "VERSION").write_text(MODEL_VERSION)
    os.replace(staging, folder)


def portable_text_encoder(folder: Path) -> None:
    """Prefix the CLIP weights with ``text_model.`` (transformers 5 saves without it; transformers 4.x, the
    reference's, would then initialise the text encoder at random). Both versions load the prefixed layout."""
    from safetensors.torch import load_file, save_file

    for path in folder.glob("*.safetensors"):
        state = load_file(path)
        save_file({k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}, path,
                  metadata={"format": "pt"})


class ReferenceWorker:
    """The reference in its own process: ``run(k)`` streams k frames, ``quality(k)`` returns fresh outputs."""

    def __init__(self, python: str, settings: dict[str, Any], work: Path) -> None:
        path = work / "reference-settings.json"
        path.write_text(json.dumps(settings))
        self.work = work
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
        env.pop("PYTHONPATH", None)
        self.process = subprocess.Popen(
            [python, str(REPO / "tools" / "bench_reference_worker.py"), str(path)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, env=env,
        )
        self.ready = self._read()
        logger.info("reference ready (torch %s, loaded in %.1f s)", self.ready["torch"], self.ready["load_seconds"])

    def _read(self) -> dict[str, Any]:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the reference worker exited with code {self.process.wait()}; see its stderr above")
        return json.loads(line)

    def request(self, **message: Any) -> dict[str, Any]:
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()
        answer = self._read()
        if "error" in answer:
            raise RuntimeError(f"reference worker: {answer['error']}")
        return answer

    def run(self, calls: int = 1) -> None:
        self.request(op="run", calls=calls)

    def quality(self, count: int) -> np.ndarray:
        path = self.work / "reference-outputs.npy"
        self.request(op="quality", count=count, path=str(path))
        return np.load(path)

    def close(self) -> None:
        try:
            self.request(op="quit")
        finally:
            self.process.wait(30)


class StreamdiffCase:
    """A prepared streamdiff pipeline fed the benchmark frames (uint8, as the reference gets them) in order."""

    def __init__(self, pipe: StreamPipeline, frames: list[np.ndarray], settings: dict[str, Any]) -> None:
        self.pipe, self.frames, self.settings = pipe, frames, settings
        self.calls = 0
        self.prepare()

    def prepare(self) -> None:
        s = self.settings
        self.pipe.prepare(prompt=s["prompt"], guidance_scale=s["guidance_scale"], delta=s["delta"], seed=s["seed"])
        self.calls = 0

    def step(self) -> None:
        self.pipe(self.frames[self.calls % len(self.frames)])
        self.calls += 1

    def quality(self, count: int) -> np.ndarray:
        self.prepare()
        with torch.inference_mode():
            outs = [self.pipe.step(torch.from_numpy(f).permute(2, 0, 1)[None].float() / 255) for f in
                    self.frames[:count]]
        self.prepare()
        return torch.cat([o.images for o in outs if o.images is not None]).float().numpy()


def matmul_case(size: int = 2048) -> tuple[Case, float]:
    """A bfloat16 ``size``² matmul (the machine's peak) and its FLOPs per call."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(torch.bfloat16)
    b = torch.randn(size, size, generator=generator).to(torch.bfloat16)
    out = torch.empty(size, size, dtype=torch.bfloat16)
    calls = 4

    def step() -> None:
        for _ in range(calls):
            torch.matmul(a, b, out=out)

    return Case("matmul-peak", step), 2.0 * size**3 * calls


def frame_flops(model: Any, config: StreamConfig) -> float:
    """FLOPs of one frame: the U-Net rows of one Stream Batch call plus one TAESD encode and decode (MATH attention,
    which FlopCounterMode counts; the CPU's fused attention counts as 0)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from streamdiff.backends.onnx_export import VaeDecoder, VaeEncoder

    rows = len(config.t_index_list)
    factor = model.vae_scale_factor
    latent = torch.randn(rows, model.latent_channels, config.height // factor, config.width // factor,
                         dtype=model.dtype)
    hidden = torch.randn(rows, 77, int(model.unet.config.cross_attention_dim), dtype=model.dtype)
    image = torch.rand(1, 3, config.height, config.width, dtype=model.dtype)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), counter:
        model.unet(latent, torch.tensor([500] * rows), encoder_hidden_states=hidden)
        VaeEncoder(model.vae)(image)
        VaeDecoder(model.vae)(latent[:1])
    return float(counter.get_total_flops())


def build_pipeline(name: str, folder: Path, config: StreamConfig, options: EngineOptions, models: dict[str, Any]
                   ) -> StreamPipeline:
    """The streamdiff configuration ``name`` (models are loaded once per dtype and shared)."""
    from streamdiff.backends.device import resolve_device, resolve_dtype

    def model(dtype: torch.dtype) -> Any:
        if dtype not in models:
            models[dtype] = load_model(str(folder / "model"), vae=str(folder / "taesd"), dtype=dtype, device="cpu")
        return models[dtype]

    if name == "default":  # `streamdiff run` without flags: --backend auto, --dtype per device
        dtype = resolve_dtype(None, resolve_device("auto"))
        return StreamPipeline(model(dtype), config, backend="auto", engine_options=options)
    if name == "openvino-bf16":
        return StreamPipeline(model(torch.bfloat16), config, backend="openvino", engine_options=options)
    if name == "eager-bf16":
        return StreamPipeline(model(torch.bfloat16), config, backend="torch",
                              engine_options=EngineOptions(engine_dir=options.engine_dir, channels_last=True))
    if name == "compiled-bf16":
        return StreamPipeline(model(torch.bfloat16), config, backend="torch",
                              engine_options=EngineOptions(engine_dir=options.engine_dir, compile=True,
                                                           channels_last=True))
    raise ValueError(name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-python", default=str(REPO / "tools" / "reference" / ".venv" / "bin" / "python"),
                        help="python of the reference's venv (default tools/reference/.venv/bin/python)")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=["default", "eager-bf16"],
                        help="streamdiff configurations (default: default eager-bf16; add compiled-bf16 for the "
                             "AOTInductor U-Net)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2, help="frames per configuration per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quality-frames", type=int, default=4)
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "streamdiff-bench-reference",
                        help="where the model folder and the engines are kept between runs")
    parser.add_argument("--no-reference", action="store_true", help="streamdiff only (no reference venv needed)")
    parser.add_argument("--json", action="store_true", help="print the JSON report after the table")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    folder = work / f"sd21-random-v{MODEL_VERSION}"
    if not (folder / "VERSION").is_file():
        started = time.perf_counter()
        logger.info("saving the SD-2.1-size random model to %s (once)", folder)
        save_model(folder)
        logger.info("saved in %.0f s", time.perf_counter() - started)

    config = StreamConfig(width=args.size, height=args.size, t_index_list=T_INDEX_LIST, cfg_type="self")
    settings = dict(prompt=PROMPT, guidance_scale=1.2, delta=1.0, seed=2)
    frames = [tensor_to_frame(f)[0] for f in moving_frames(16, args.size)]
    np.save(work / "frames.npy", np.stack(frames))

    reference = None
    cases: list[Case] = []
    outputs: dict[str, np.ndarray] = {}
    if not args.no_reference:
        if not Path(args.reference_python).exists():
            parser.error(f"--reference-python {args.reference_python} does not exist; create the reference venv "
                         "(tools/reference/make_golden.sh, or the recipe in its header) or pass --no-reference")
        reference = ReferenceWorker(args.reference_python, dict(
            settings, model=str(folder / "model"), taesd=str(folder / "taesd"), frames=str(work / "frames.npy"),
            dtype="bfloat16", threads=args.threads, width=args.size, height=args.size,
            t_index_list=list(T_INDEX_LIST), cfg_type="self", num_inference_steps=50), work)
        outputs["reference"] = reference.quality(args.quality_frames)
        cases.append(Case("reference", reference.run))

    options = EngineOptions(engine_dir=work / "engines")
    models: dict[str, Any] = {}
    metrics: dict[str, dict[str, float]] = {}
    for name in args.configs:
        torch.set_num_threads(args.threads)
        started = time.perf_counter()
        pipe = build_pipeline(name, folder, config, options, models)
        setup = time.perf_counter() - started
        case = StreamdiffCase(pipe, frames, settings)
        outputs[name] = case.quality(args.quality_frames)
        backend = pipe.engine.backend.value
        metrics[name] = {"setup_s": round(setup, 1)}
        logger.info("%s: backend %s, %s, ready in %.1f s", name, backend, pipe.model.dtype, setup)
        # OpenVINO takes the cores and leaves torch one thread (hand_cores_to_openvino); the torch backends run on
        # all of them: each configuration gets its own setting before its rounds.
        torch_threads = 1 if backend == "openvino" else args.threads
        cases.append(Case(name, case.step, setup=lambda n=torch_threads: torch.set_num_threads(n)))
        gc.collect()
    peak_case, peak_flops = matmul_case()
    cases.append(Case(peak_case.name, peak_case.step, setup=lambda: torch.set_num_threads(args.threads)))
    torch.set_num_threads(args.threads)
    flops = frame_flops(next(iter(models.values())), config)
    logger.info("one frame is %.3f TFLOP (U-Net %d rows + TAESD encode and decode)", flops / 1e12,
                len(T_INDEX_LIST))

    try:
        results = run_interleaved(cases, rounds=args.rounds, calls=args.calls, warmup=args.warmup)
    finally:
        if reference is not None:
            reference.close()
    medians = {r.name: r.median for r in results}
    peak = peak_flops / medians["matmul-peak"] / 1e12
    for name in args.configs:
        metrics[name]["tflops"] = flops / medians[name] / 1e12
        metrics[name]["of_peak"] = metrics[name]["tflops"] / peak
        if "reference" in outputs:
            metrics[name]["psnr_vs_reference_db"] = psnr(outputs[name], outputs["reference"])
    metrics["matmul-peak"] = {"tflops": peak}
    if "reference" in medians:
        metrics["reference"] = {"tflops": flops / medians["reference"] / 1e12}
        metrics["reference"]["of_peak"] = metrics["reference"]["tflops"] / peak
        # The host is shared: besides the ratio of medians, the median of per-round ratios (each round runs every
        # configuration within seconds, so a burst of load elsewhere hits one round, not one configuration).
        by_name = {r.name: r.seconds for r in results}
        for name in args.configs:
            ratios = [ref / mine for ref, mine in zip(by_name["reference"], by_name[name])]
            metrics[name]["x_ref_per_round"] = float(np.median(ratios))
    baseline = "reference" if "reference" in medians else args.configs[0]
    comparison = Comparison(f"sd21-{args.size}px-2steps-self", results, baseline, metrics,
                            note=f"matmul-peak row: s per 4 bf16 2048² matmuls ({peak:.3f} TFLOP/s)")
    streamdiff = {name: medians[name] for name in args.configs}
    fastest = min(streamdiff, key=streamdiff.get)
    if "reference" in medians:
        if "default" in streamdiff:
            comparison.checks.append(Check("default / reference (bf16) frames/s", medians["reference"]
                                           / streamdiff["default"], 1.4))
        comparison.checks.append(Check(f"fastest ({fastest}) / reference (bf16) frames/s",
                                       medians["reference"] / streamdiff[fastest], 1.5))
        for name in args.configs:
            comparison.checks.append(Check(f"{name} PSNR vs reference (dB)",
                                           metrics[name]["psnr_vs_reference_db"], 30.0))
    comparison.checks.append(Check(f"fastest ({fastest}) TFLOP/s / matmul peak", metrics[fastest]["of_peak"], 0.85))
    print(format_table([comparison], title=f"SD-2.1 size, {args.size}², 2 steps, RCFG self, CPU, "
                                           f"{args.threads} thread(s)"))
    if args.json:
        meta = {"command": " ".join(["tools/bench_reference.py", *sys.argv[1:]]), "threads": args.threads,
                "torch": torch.__version__, "cpu": target_id(torch.device("cpu")), "frame_tflop": flops / 1e12}
        print(json.dumps(report_dict([comparison], **meta), indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
