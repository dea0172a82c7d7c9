"""Run the original StreamDiffusion (``streamdiffusion==0.1.1``) over the fixture's cases and write golden frames.

Runs inside the reference venv (see make_golden.sh): ``python run_reference.py FIXTURE`` where ``FIXTURE`` holds the
``model`` and ``vae_kl`` folders written by build_model.py. Writes ``FIXTURE/golden.npz`` (the input frames and, per
case, the reference's output frames in its own [-1, 1] range, warm-up calls dropped) and ``FIXTURE/cases.json``
(versions, the settings of every case in streamdiff's terms, what it shows, how the reference was patched if at all,
and the error the reference raised where it cannot run the case).

Everything runs on the CPU in float32. The reference's ``__call__`` times itself with CUDA events; they are replaced
by a CPU stand-in below, which changes no result.
"""

from __future__ import annotations

import contextlib
import json
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import PIL.Image
import torch


class _CpuEvent:
    """Stands in for ``torch.cuda.Event``: wall-clock timestamps, elapsed time in milliseconds."""

    def __init__(self, enable_timing: bool = True) -> None:
        self.stamp = 0.0

    def record(self, stream: Any = None) -> None:
        self.stamp = time.perf_counter()

    def elapsed_time(self, end: _CpuEvent) -> float:
        return (end.stamp - self.stamp) * 1000.0


torch.cuda.Event = _CpuEvent  # type: ignore[assignment,misc]
torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]

import diffusers  # noqa: E402
import streamdiffusion.pipeline as reference  # noqa: E402
import transformers  # noqa: E402
from diffusers import AutoencoderKL, StableDiffusionPipeline  # noqa: E402
from streamdiffusion.pipeline import StreamDiffusion  # noqa: E402

SIZE = 32
VAE_FACTOR = 4  # the fixture VAEs have three levels (build_model.py)
FRAMES = 5
PROMPT = "a watercolor portrait of a cat"
NEW_PROMPT = "an oil painting of a city at night"
NEGATIVE = "dark sketch"
GUIDANCE = 1.4
DELTA = 0.8
SEED = 2
NUM_INFERENCE_STEPS = 50
T_INDEX = {1: [35], 2: [30, 42], 4: [30, 36, 41, 46]}
CFG_MODES = ("none", "full", "self", "initialize")


def input_frames() -> np.ndarray:
    """``FRAMES`` deterministic 32×32 RGB frames (uint8 ``[k, H, W, 3]``): drifting waves and a moving disc."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    out = []
    for i in range(FRAMES):
        r = 128 + 100 * np.sin((xx + 3 * i) / 5.0)
        g = 128 + 100 * np.cos((yy - 2 * i) / 6.0)
        disc = ((xx - 10 - 3 * i) ** 2 + (yy - 16) ** 2) < 36
        b = np.where(disc, 230.0, 40.0 + 4 * xx)
        out.append(np.stack([r, g, b], -1))
    return np.clip(np.rint(np.stack(out)), 0, 255).astype(np.uint8)


@dataclass
class Case:
    """One reference run. ``settings`` are streamdiff's names; ``expect`` is what the test checks against ours:
    ``match`` (≤ 1e-4), ``deviation`` (a documented difference, shown by a dedicated test) or ``reference-error``."""

    name: str
    settings: dict[str, Any]
    expect: str
    shows: str
    patch: str = ""
    before_call: Callable[[StreamDiffusion, int], None] | None = None
    call: Callable[[StreamDiffusion, Any], torch.Tensor] | None = None
    change_prompt: Callable[[StreamDiffusion, dict[str, Any]], None] | None = None
    context: Callable[[StreamDiffusion], contextlib.AbstractContextManager] | None = None
    keep_frames: bool = True  # False: only the skip pattern is kept (filter cases)


def settings(cfg: str, steps: int, **changes: Any) -> dict[str, Any]:
    base = dict(
        cfg_type=cfg,
        t_index_list=T_INDEX[steps],
        num_inference_steps=NUM_INFERENCE_STEPS,
        frame_buffer_size=1,
        use_denoising_batch=True,
        mode="img2img",
        width=SIZE,
        height=SIZE,
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        guidance_scale=GUIDANCE,
        delta=DELTA,
        seed=SEED,
        vae="tiny",
        update=None,  # a live change: {"at": call index, "prompt" and/or "guidance_scale": new value}
        global_seed=None,  # torch.manual_seed before the run (only matters where the reference draws unseeded noise)
        calls=FRAMES,  # calls of the stream (each takes F frames)
        frame_order=None,  # input frame of each call (F = 1), default 0, 1, 2, …
        filter=None,  # the similarity filter: {"threshold": η, "max_skip_frames": m}
    )
    base.update(changes)
    return base


def seed_noise(s: dict[str, Any]) -> torch.Tensor:
    """The seed's per-row noise as streamdiff (and the reference's Stream Batch) draws it: n·F rows."""
    rows = len(s["t_index_list"]) * s["frame_buffer_size"]
    generator = torch.Generator().manual_seed(s["seed"])
    shape = (rows, 4, s["height"] // VAE_FACTOR, s["width"] // VAE_FACTOR)
    return torch.randn(shape, generator=generator)


# -- patches: each replaces one piece of the reference's state or one library call, never its maths --------------


def reset_stock_to_seed_noise(stream: StreamDiffusion, index: int) -> None:
    stream.stock_noise = stream.init_noise[0:1].clone()


def reprepare(case: Case) -> Callable[[StreamDiffusion, int], None]:
    def before(stream: StreamDiffusion, index: int) -> None:
        prepare(stream, case.settings)

    return before


def txt2img_with_seed_noise(stream: StreamDiffusion, frame: Any) -> torch.Tensor:
    """The reference's txt2img call (predict_x0_batch, decode_image) with slot 0 = the seed's noise row 0."""
    return stream.decode_image(stream.predict_x0_batch(stream.init_noise[0:1].clone()))


def rebuild_negative_layout(stream: StreamDiffusion, s: dict[str, Any]) -> None:
    """update_prompt, then the prompt embeddings rebuilt in the layout prepare() makes for full/initialize."""
    cond, uncond = stream.pipe.encode_prompt(
        prompt=s["update"]["prompt"], device=stream.device, num_images_per_prompt=1,
        do_classifier_free_guidance=True, negative_prompt=s["negative_prompt"],
    )
    negatives = stream.batch_size if s["cfg_type"] == "full" else stream.frame_bff_size
    stream.prompt_embeds = torch.cat([uncond.repeat(negatives, 1, 1), cond.repeat(stream.batch_size, 1, 1)])


@contextlib.contextmanager
def kl_mode(stream: StreamDiffusion) -> Iterator[None]:
    """The KL encoder's mode instead of a sample (retrieve_latents' own ``argmax`` option)."""
    original = reference.retrieve_latents
    reference.retrieve_latents = lambda output, generator=None: original(output, generator, sample_mode="argmax")
    try:
        yield
    finally:
        reference.retrieve_latents = original


class SeedNoiseSequential:
    """Sequential mode with the seed's noise rows: init_noise restored to row 0 before each call (the reference
    overwrites it with the input latent), and each step's ``torch.randn_like`` (unseeded in the reference) giving
    rows 1, 2, … instead."""

    def __init__(self, s: dict[str, Any]) -> None:
        self.noise = seed_noise(s)
        self.rows: Iterator[torch.Tensor] = iter(())

    def before_call(self, stream: StreamDiffusion, index: int) -> None:
        stream.init_noise = self.noise[0:1].clone()
        self.rows = iter(self.noise[1:])

    def randn_like(self, like: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return next(self.rows).expand_as(like).clone()

    @contextlib.contextmanager
    def context(self, stream: StreamDiffusion) -> Iterator[None]:
        original = torch.randn_like
        torch.randn_like = self.randn_like  # type: ignore[assignment]
        try:
            yield
        finally:
            torch.randn_like = original  # type: ignore[assignment]


# -- running ------------------------------------------------------------------------------------------------------


def build_stream(pipe: StableDiffusionPipeline, kl_vae: AutoencoderKL, s: dict[str, Any]) -> StreamDiffusion:
    stream = StreamDiffusion(
        pipe, t_index_list=list(s["t_index_list"]), torch_dtype=torch.float32, width=s["width"], height=s["height"],
        do_add_noise=True, use_denoising_batch=s["use_denoising_batch"], frame_buffer_size=s["frame_buffer_size"],
        cfg_type=s["cfg_type"],
    )
    if s["vae"] == "kl":
        stream.vae = kl_vae
    return stream


def prepare(stream: StreamDiffusion, s: dict[str, Any]) -> None:
    stream.prepare(
        prompt=s["prompt"], negative_prompt=s["negative_prompt"], num_inference_steps=s["num_inference_steps"],
        guidance_scale=s["guidance_scale"], delta=s["delta"], generator=torch.Generator(), seed=s["seed"],
    )


def apply_update(stream: StreamDiffusion, case: Case) -> None:
    """A live change in the reference's own way: ``update_prompt`` for a prompt, the attribute for γ."""
    update = case.settings["update"]
    if "prompt" in update:
        stream.update_prompt(update["prompt"])
        if case.change_prompt:
            case.change_prompt(stream, case.settings)
    if "guidance_scale" in update:
        stream.guidance_scale = update["guidance_scale"]


def run(
    case: Case, pipe: StableDiffusionPipeline, kl_vae: AutoencoderKL, frames: np.ndarray
) -> tuple[np.ndarray, list[bool]]:
    """The reference's outputs for ``case`` (``[k, 3, H, W]`` in [-1, 1], warm-up calls dropped) and, per call,
    whether its similarity filter skipped the frame (returned the previous result)."""
    s = case.settings
    f = s["frame_buffer_size"]
    if s["global_seed"] is not None:
        torch.manual_seed(s["global_seed"])
    random.seed(0)  # the filter's draws (python's global random in the reference)
    stream = build_stream(pipe, kl_vae, s)
    prepare(stream, s)
    if s["filter"] is not None:
        stream.enable_similar_image_filter(s["filter"]["threshold"], s["filter"]["max_skip_frames"])
    order = s["frame_order"] or list(range(s["calls"] * f))
    outputs, skips = [], []
    context = case.context(stream) if case.context else contextlib.nullcontext()
    with context:
        for index in range(s["calls"]):
            if s["update"] is not None and index == s["update"]["at"]:
                apply_update(stream, case)
            if case.before_call:
                case.before_call(stream, index)
            if s["mode"] == "txt2img":
                x = None
            else:
                images = [PIL.Image.fromarray(frames[order[index * f + k]]) for k in range(f)]
                x = images[0] if f == 1 else images
            previous = stream.prev_image_result
            out = case.call(stream, x) if case.call else stream(x)
            skips.append(previous is not None and out is previous)
            outputs.append(out.detach().float().numpy())
    warmup = len(s["t_index_list"]) - 1 if s["use_denoising_batch"] else 0
    return np.concatenate(outputs[warmup:]).astype(np.float32), skips


def cases() -> list[Case]:
    out = []
    for cfg in CFG_MODES:
        for n in (1, 2, 4):
            carry = cfg == "self" and n == 1
            out.append(Case(
                f"{cfg}-n{n}", settings(cfg, n), "deviation" if carry else "match",
                "RCFG self with one step: the first frame's virtual negative is zero and each later frame's is the "
                "previous frame's residual noise" if carry else f"cfg {cfg}, {n} step(s), F = 1: the maths",
            ))
    n1_self = settings("self", 1)
    fresh = Case(
        "self-n1-fresh", n1_self, "deviation",
        "the reference prepared afresh before every frame: equal to self-n1 on the first frame only, so self-n1's "
        "later frames depend on the frame before", patch="prepare() again before every call",
    )
    fresh.before_call = reprepare(fresh)
    out.append(fresh)
    out.append(Case(
        "self-n1-reset", n1_self, "match",
        "RCFG self with one step when every frame starts from its own noise (streamdiff's behaviour)",
        patch="stock_noise = init_noise[0:1] before every call", before_call=reset_stock_to_seed_noise,
    ))
    out.append(Case(
        "none-n1-F2", settings("none", 1, frame_buffer_size=2, calls=2), "deviation",
        "frame_buffer_size 2: the reference noises every frame of the buffer with init_noise[0] (its frames equal "
        "none-n1's); streamdiff gives frame f its own row f, so only frame 0 of each pair agrees",
    ))
    for cfg in ("none", "self"):
        out.append(Case(
            f"{cfg}-n2-F2", settings(cfg, 2, frame_buffer_size=2, calls=2), "reference-error",
            "frame_buffer_size 2 with 2 steps: c_skip/c_out have n rows against n·F latents",
        ))
    for cfg in ("full", "initialize"):
        change = {"at": 2, "prompt": NEW_PROMPT}
        out.append(Case(
            f"{cfg}-n2-prompt-change", settings(cfg, 2, update=change), "reference-error",
            f"a prompt change in cfg {cfg}: update_prompt drops the negative rows of the U-Net batch",
        ))
        out.append(Case(
            f"{cfg}-n2-prompt-change-rebuilt", settings(cfg, 2, update=change), "match",
            f"a prompt change in cfg {cfg} with the embeddings rebuilt for the batch layout (streamdiff's behaviour)",
            patch="after update_prompt, prompt_embeds = [negatives, conditionals] as prepare() lays them out",
            change_prompt=rebuild_negative_layout,
        ))
    out.append(Case(
        "self-n2-prompt-change", settings("self", 2, update={"at": 2, "prompt": NEW_PROMPT}), "match",
        "a live prompt change (update_prompt) in cfg self: the frames inside the batch keep going",
    ))
    for name, global_seed in (("a", 0), ("b", 1)):
        out.append(Case(
            f"none-n2-sequential-{name}", settings("none", 2, use_denoising_batch=False, global_seed=global_seed),
            "deviation",
            "use_denoising_batch=False: init_noise is overwritten by the input latent and each step re-noises with "
            "unseeded randn_like, so the frames depend on torch's global RNG (runs a and b differ)",
        ))
    for cfg in ("none", "self"):
        seeded = SeedNoiseSequential(settings(cfg, 2))
        out.append(Case(
            f"{cfg}-n2-sequential-seeded", settings(cfg, 2, use_denoising_batch=False),
            "match" if cfg == "none" else "deviation",
            "use_denoising_batch=False with the seed's noise rows (streamdiff's noise)" if cfg == "none" else
            "use_denoising_batch=False in cfg self, seed's noise rows: the reference never updates the residual "
            "noise outside the Stream Batch, so its virtual negative stays zero",
            patch="init_noise restored to the seed's row 0 before every call; torch.randn_like gives rows 1, 2, …",
            before_call=seeded.before_call, context=seeded.context,
        ))
    out.append(Case(
        "full-n2-sequential", settings("full", 2, use_denoising_batch=False), "reference-error",
        "use_denoising_batch=False in cfg full: prepare() builds no negative embeddings",
    ))
    for name, global_seed in (("a", 0), ("b", 1)):
        out.append(Case(
            f"txt2img-self-n2-{name}", settings("self", 2, mode="txt2img", calls=4, global_seed=global_seed),
            "deviation", "txt2img: slot 0 is drawn from torch's global RNG on every call (runs a and b differ)",
        ))
    out.append(Case(
        "txt2img-self-n2-seeded", settings("self", 2, mode="txt2img", calls=4), "match",
        "txt2img with slot 0 = the seed's noise row 0 on every call (streamdiff's behaviour)",
        patch="slot 0 given init_noise[0:1] instead of torch.randn (predict_x0_batch + decode_image)",
        call=txt2img_with_seed_noise,
    ))
    for cfg in ("full", "initialize"):
        out.append(Case(
            f"{cfg}-n2-g1", settings(cfg, 2, guidance_scale=1.0), "reference-error",
            f"guidance_scale 1 in cfg {cfg}: no negative embeddings are encoded, prepare() fails",
        ))
        out.append(Case(
            f"{cfg}-n2-g1-live", settings(cfg, 2, update={"at": 2, "guidance_scale": 1.0}), "reference-error",
            f"guidance_scale lowered to 1 while streaming in cfg {cfg}: the U-Net batch shrinks, the embeddings don't",
        ))
    out.append(Case(
        "self-n2-g1", settings("self", 2, guidance_scale=1.0), "match",
        "guidance_scale 1 in cfg self: no guidance (equal to cfg none)",
    ))
    out.append(Case(
        "self-n2-g1-live", settings("self", 2, update={"at": 2, "guidance_scale": 1.0}), "match",
        "guidance_scale lowered to 1 while streaming in cfg self",
    ))
    out.append(Case(
        "kl-self-n2", settings("self", 2, vae="kl"), "deviation",
        "an AutoencoderKL: the reference encodes a sample of the latent distribution (drawn with prepare's generator)",
    ))
    out.append(Case(
        "kl-self-n2-mode", settings("self", 2, vae="kl"), "match",
        "an AutoencoderKL encoded to its distribution's mode (streamdiff's behaviour)",
        patch="retrieve_latents(..., sample_mode='argmax')", context=kl_mode,
    ))
    out.append(Case(
        "filter-none-n1", settings(
            "none", 1, calls=9, frame_order=[0, 0, 0, 1, 1, 1, 1, 1, 1],
            filter={"threshold": 0.98, "max_skip_frames": 2},
        ), "deviation",
        "the similarity filter on repeated frames (skip probability ~1): its skip counter survives a processed "
        "frame and its cap lets max_skip_frames + 1 frames in a row be skipped",
        keep_frames=False,
    ))
    return out


def check_weights(module: torch.nn.Module, folder: Path) -> None:
    """Stop unless ``module`` holds exactly the weights saved in ``folder`` (libraries of another age may skip
    keys they do not recognise and initialise those weights at random, with only a log line)."""
    from safetensors.torch import load_file

    saved = load_file(next(folder.glob("*.safetensors")))
    loaded = module.state_dict()
    if set(saved) != set(loaded) or any(not torch.equal(saved[k], loaded[k]) for k in saved):
        raise SystemExit(f"{folder}: the reference's libraries did not load the saved weights as they are")


def main(fixture: Path) -> None:
    torch.set_num_threads(1)
    started = time.perf_counter()
    frames = input_frames()
    pipe = StableDiffusionPipeline.from_pretrained(
        fixture / "model", safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        torch_dtype=torch.float32,
    )
    kl_vae = AutoencoderKL.from_pretrained(fixture / "vae_kl", torch_dtype=torch.float32).eval()
    for name in ("unet", "vae", "text_encoder"):
        check_weights(getattr(pipe, name), fixture / "model" / name)
    check_weights(kl_vae, fixture / "vae_kl")
    golden: dict[str, np.ndarray] = {"inputs": frames}
    described: dict[str, Any] = {}
    for case in cases():
        error = None
        skips: list[bool] = []
        try:
            outputs, skips = run(case, pipe, kl_vae, frames)
            if case.keep_frames:
                golden[case.name] = outputs
        except Exception as exc:  # noqa: BLE001 - the failure is the result of a reference-error case
            if case.expect != "reference-error":
                raise
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        if case.expect == "reference-error" and error is None:
            raise SystemExit(f"case {case.name}: the reference was expected to fail and did not")
        described[case.name] = dict(
            expect=case.expect, shows=case.shows, patch=case.patch, settings=case.settings,
            frames=int(golden[case.name].shape[0]) if case.name in golden else 0, reference_error=error,
            reference_skips=skips if case.settings["filter"] else None,
        )
        shown = error or (golden[case.name].shape if case.name in golden else f"skips {skips}")
        print(f"  {case.name:36s} {case.expect:16s} {shown}")
    tokens = {
        text: pipe.tokenizer(text, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True).input_ids
        for text in (PROMPT, NEW_PROMPT, NEGATIVE)
    }
    meta = dict(
        about="Golden frames of the original StreamDiffusion; regenerate with tools/reference/make_golden.sh",
        versions=dict(
            python=platform.python_version(), torch=torch.__version__, diffusers=diffusers.__version__,
            transformers=transformers.__version__, streamdiffusion="0.1.1",
        ),
        output_range="golden.npz holds the reference's raw decoder output in [-1, 1]; compare x / 2 + 0.5 clamped",
        warmup="batch mode: the first n-1 outputs of each run are dropped; sequential mode has none",
        device="cpu", dtype="float32", tokens=tokens, cases=described,
    )
    np.savez_compressed(fixture / "golden.npz", **golden)
    (fixture / "cases.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    print(f"{len(described)} cases, {sum(1 for c in described.values() if c['frames'])} with frames, "
          f"in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: run_reference.py FIXTURE_FOLDER")
    main(Path(sys.argv[1]))
