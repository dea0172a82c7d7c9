"""Train the built-in ``tiny`` model here, offline, from procedural images: a reproducible recipe.

    nice -n 19 python tools/train_tiny.py          # the full recipe: writes streamdiff/models/weights/tiny/
    python tools/train_tiny.py --steps 20 --vae-steps 10 --pool 64 --out /tmp/tiny-weights   # a short run
    python tools/train_tiny.py --eval-only         # measure the shipped weights again (manifest["metrics"])

Data: ``--pool`` procedurally generated scenes (gradients, value-noise fields, stripes, discs, boxes, and crops of
the test pattern ``streamdiff.io.sources.pattern_frame``) drawn once from the seed at ``--size``², then sampled (with
horizontal flips) at every step; the style targets are ``streamdiff.models.tiny_styles``. Nothing is downloaded.

Wall time of the full recipe on this 2-core host (1 thread, nice 19, beside other work): see ``manifest.json``
(``wall_time_s``) and docs/models.md. Use 1 thread: with 2 on a busy 2-core host the threads stall each other
(a U-Net step took 1.5–3.9 s instead of 0.4–0.6 s).

Recipe (same seed → same weights, on the same torch build and thread count):

1. Architecture and initial weights: ``build_tiny_components(seed)`` (the ``tiny-random`` recipe). The text
   encoder stays as it is (random, frozen; its fp16 rounding is what the U-Net learns from).
2. VAE: the pass-through TAESD-style autoencoder is trained as an autoencoder (L1 + MSE reconstruction, plus a pull
   of latent channels 0–2 towards the 8×-averaged RGB so the latents stay image-like), then rounded to fp16 and frozen.
3. U-Net: few-step img2img as streamdiff runs it. Per sample: a style s (one of ``STYLES``, or none with probability
   ``--uncond``; the prompt is then ``""``), a prompt sentence naming s, a timestep t of the 50-step LCM schedule
   (index ``--min-index``…49, the range Stream Batch uses), a source latent (the encoded input, or with probability
   1/2 a point between it and the target: what a later Stream Batch step sees), and
   ``x_t = √ᾱ·z_src + √(1−ᾱ)·ε``. The U-Net's ε gives the LCM consistency prediction
   ``x̂0 = c_out·(x_t − √(1−ᾱ)·ε̂)/√ᾱ + c_skip·x_t``; the loss is ``|x̂0 − z_target|²`` with ``z_target`` the
   encoded style transform of the input (the source itself for the empty prompt). So one step lands on the style,
   a later step keeps it, and classifier-free guidance extrapolates from "as it is" to "styled".
4. Everything is rounded to fp16 and written as safetensors with ``manifest.json`` (recipe, seed, hashes, times,
   the quality figures of the saved weights measured through the normal loading path).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from streamdiff.core.schedule import NoiseSchedule, boundary_scalings, lcm_timesteps
from streamdiff.io.sources import pattern_frame
from streamdiff.models.tiny import (
    SD_SCHEDULER,
    TINY_SEED,
    TINY_WEIGHTS_DIR,
    build_tiny_components,
    save_trained_folder,
)
from streamdiff.models.tiny_styles import STYLES, apply_style

SUBJECTS = ("portrait", "city", "cat", "dog", "tree", "face", "landscape", "street", "house", "flower", "car", "sea",
            "man", "woman", "sky", "light")
TEMPLATES = (
    "{style}", "a {style} {subject}", "a {style} painting of a {subject}", "{style} photo of a {subject}",
    "a {subject} in {style} style", "{subject}, {style}", "a {style} picture", "the {subject} as a {style}",
    "{style} art of the {subject}", "a {subject}, {style} style, detailed", "a {subject} at {style}",
    "the {subject} in the {style}", "a photo of the {subject}, {style}", "{style} style", "{style} {subject}",
)
PATTERN_SIZE = 256


def prompts_for(style: str) -> list[str]:
    """Every training sentence for ``style`` (templates × subjects)."""
    out = sorted({t.format(style=style, subject=s) for t in TEMPLATES for s in SUBJECTS})
    return out


# -- procedural data ------------------------------------------------------------------------------------------------


def _rand(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=g)


def _palette(g: torch.Generator, n: int) -> torch.Tensor:
    """``n`` random colours ``[n, 3, 1, 1]``, some saturated, some muted."""
    colours = _rand(g, n, 3)
    muted = _rand(g, n, 1) < 0.3
    colours = torch.where(muted, 0.5 * colours + 0.25, colours)
    return colours.view(n, 3, 1, 1)


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    return xx, yy


def _background(g: torch.Generator, size: int) -> torch.Tensor:
    """One ``[3, S, S]`` background: a linear gradient, a value-noise field or stripes."""
    xx, yy = _grid(size)
    kind = int(torch.randint(0, 3, (1,), generator=g))
    a, b = _palette(g, 2)
    if kind == 0:
        angle = float(_rand(g, 1)) * 2 * math.pi
        ramp = (math.cos(angle) * xx + math.sin(angle) * yy)
        ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min() + 1e-6)
    elif kind == 1:
        cells = int(torch.randint(2, 9, (1,), generator=g))
        noise = _rand(g, 1, 1, cells, cells)
        ramp = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)[0, 0].clamp(0, 1)
    else:
        angle = float(_rand(g, 1)) * math.pi
        freq = 2 + float(_rand(g, 1)) * 10
        ramp = 0.5 + 0.5 * torch.sin(2 * math.pi * freq * (math.cos(angle) * xx + math.sin(angle) * yy))
        if float(_rand(g, 1)) < 0.5:
            ramp = (ramp > 0.5).float()
    return a[:, 0, 0].view(3, 1, 1) * (1 - ramp) + b[:, 0, 0].view(3, 1, 1) * ramp


def _shapes(g: torch.Generator, image: torch.Tensor) -> torch.Tensor:
    """Draw 0–5 discs and boxes in random colours onto ``[3, S, S]``."""
    size = image.shape[-1]
    xx, yy = _grid(size)
    for _ in range(int(torch.randint(0, 6, (1,), generator=g))):
        colour = _palette(g, 1)[0]
        cx, cy, r = (float(v) for v in _rand(g, 3))
        r = 0.05 + 0.25 * r
        if float(_rand(g, 1)) < 0.5:
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        else:
            mask = ((xx - cx).abs() <= r) & ((yy - cy).abs() <= r * (0.3 + float(_rand(g, 1))))
        image = torch.where(mask, colour, image)
    return image


class SceneSource:
    """Seeded batches of procedural scenes ``[B, 3, S, S]`` in [0, 1]; a quarter are crops of the test pattern."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.g = torch.Generator().manual_seed(seed)
        rng = np.random.default_rng(seed)
        indices = rng.integers(0, 1000, 48)
        patterns = np.stack([pattern_frame(int(i), PATTERN_SIZE, PATTERN_SIZE) for i in indices])
        self.patterns = torch.from_numpy(patterns).permute(0, 3, 1, 2).float() / 255.0

    def batch(self, n: int) -> torch.Tensor:
        out = []
        for _ in range(n):
            if float(_rand(self.g, 1)) < 0.25:
                out.append(self._pattern_crop())
            else:
                out.append(_shapes(self.g, _background(self.g, self.size)))
        images = torch.stack(out)
        gain = 0.7 + 0.6 * _rand(self.g, n, 1, 1, 1)
        flip = _rand(self.g, n, 1, 1, 1) < 0.5
        images = torch.where(flip, images.flip(-1), images)
        return (images * gain).clamp(0, 1)

    def _pattern_crop(self) -> torch.Tensor:
        pattern = self.patterns[int(torch.randint(0, len(self.patterns), (1,), generator=self.g))]
        if self.size >= PATTERN_SIZE:
            return F.interpolate(pattern[None], size=(self.size, self.size), mode="bilinear")[0]
        x, y = (int(v) for v in torch.randint(0, PATTERN_SIZE - self.size + 1, (2,), generator=self.g))
        return pattern[:, y : y + self.size, x : x + self.size]


# -- training -------------------------------------------------------------------------------------------------------


def round_fp16_(module: torch.nn.Module) -> None:
    """Round every parameter to float16 and back: what ships is what is used from now on."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())


def _schedule_of(lr: float, steps: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))) * 0.95 + 0.05
    return factor


def make_pool(scenes: SceneSource, count: int, batch: int) -> torch.Tensor:
    """``count`` scenes as uint8 ``[N, 3, S, S]`` (drawn once; the steps then sample from them)."""
    return torch.cat([(scenes.batch(min(batch, count - i)) * 255).round().to(torch.uint8)
                      for i in range(0, count, batch)])


def _images(pool: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return pool[index].float() / 255.0


def _optimise(module: torch.nn.Module, name: str, steps: int, lr: float, weight_decay: float, warmup: int,
              loss_at: Callable[[int], torch.Tensor], log) -> None:
    """AdamW with warm-up and cosine decay over ``steps`` of ``loss_at(step)``; then frozen and rounded to fp16."""
    module.train()
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule_of(lr, steps, warmup))
    for step in range(steps):
        loss = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"{name} step {step}: loss {loss.item():.4f}")
    module.eval().requires_grad_(False)
    round_fp16_(module)


def train_vae(vae, pool: torch.Tensor, args, log) -> None:
    g = torch.Generator().manual_seed(args.seed + 50)

    def loss_at(step: int) -> torch.Tensor:
        images = _images(pool, torch.randint(0, len(pool), (args.batch,), generator=g))
        if step % 2 == 1:  # styled images are decoded too: the VAE must carry them
            images = apply_style(STYLES[step // 2 % len(STYLES)], images)
        latents = vae.encode(images * 2 - 1).latents  # [B, 4, S/8, S/8]
        recon = (vae.decode(latents).sample + 1) / 2
        anchor = F.avg_pool2d(images, 8) * 2 - 1
        loss = (recon - images).abs().mean() + (recon - images).square().mean() * 2
        return loss + 0.1 * (latents[:, :3] - anchor).square().mean()

    _optimise(vae, "vae", args.vae_steps, args.vae_lr, 0.0, 50, loss_at, log)


@torch.no_grad()
def encode_pool(vae, pool: torch.Tensor, batch: int) -> torch.Tensor:
    """Scaled latents of every pool image as it is (index 0) and in each style (1…): ``[N, 1 + len(STYLES), C, h, w]``."""
    scaling = vae.config.scaling_factor
    out = []
    for i in range(0, len(pool), batch):
        images = _images(pool, torch.arange(i, min(i + batch, len(pool))))
        variants = [images] + [apply_style(style, images) for style in STYLES]
        out.append(torch.stack([vae.encode(v * 2 - 1).latents * scaling for v in variants], 1))
    return torch.cat(out)


def train_unet(unet, latents: torch.Tensor, text_encoder, tokenizer, args, log) -> None:
    schedule = NoiseSchedule.from_betas(**{k: SD_SCHEDULER[k] for k in ("beta_start", "beta_end", "beta_schedule")})
    timesteps = lcm_timesteps(schedule, 50)[args.min_index :]
    acp = torch.tensor([schedule.alphas_cumprod[t] for t in timesteps])
    scal = torch.tensor([boundary_scalings(t, schedule.timestep_scaling) for t in timesteps])
    with torch.no_grad():
        def embed(texts: list[str]) -> torch.Tensor:
            ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            return text_encoder(ids)[0]  # [N, 77, D]
        embeddings = [embed([""])] + [embed(prompts_for(s)) for s in STYLES]  # per variant: its prompts
    g = torch.Generator().manual_seed(args.seed + 100)
    n = args.batch

    def loss_at(step: int) -> torch.Tensor:
        index = torch.randint(0, len(latents), (n,), generator=g)
        variant = torch.randint(1, 1 + len(STYLES), (n,), generator=g)
        variant = torch.where(torch.rand(n, generator=g) < args.uncond, 0, variant)  # CFG dropout: the empty prompt
        z_in = latents[index, 0]
        z_target = latents[index, variant]
        flip = torch.rand(n, 1, 1, 1, generator=g) < 0.5
        z_in = torch.where(flip, z_in.flip(-1), z_in)
        z_target = torch.where(flip, z_target.flip(-1), z_target)
        cond = torch.stack([embeddings[int(v)][int(torch.randint(0, len(embeddings[int(v)]), (1,), generator=g))]
                            for v in variant])
        mix = torch.rand(n, 1, 1, 1, generator=g) * (torch.rand(n, 1, 1, 1, generator=g) < 0.5)
        z_src = z_in + mix * (z_target - z_in)  # a later Stream Batch step starts part way
        z_target = torch.where((variant == 0).view(n, 1, 1, 1), z_src, z_target)
        k = torch.randint(0, len(timesteps), (n,), generator=g)
        alpha, beta = acp[k].sqrt().view(n, 1, 1, 1), (1 - acp[k]).sqrt().view(n, 1, 1, 1)
        c_skip, c_out = scal[k, 0].view(n, 1, 1, 1), scal[k, 1].view(n, 1, 1, 1)
        noise = torch.randn(z_src.shape, generator=g)
        x_t = alpha * z_src + beta * noise
        t = torch.tensor([timesteps[int(i)] for i in k])
        eps = unet(x_t, t, encoder_hidden_states=cond).sample
        x0 = c_out * (x_t - beta * eps) / alpha + c_skip * x_t  # LCM Eq. 9, as streamdiff.core.step.lcm_x0
        return (x0 - z_target).square().mean()

    _optimise(unet, "unet", args.steps, args.lr, 1e-4, 100, loss_at, log)


def save_weights(components: dict, out: Path) -> dict[str, str]:
    """fp16 safetensors of the three trained parts; their SHA-256."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    hashes = {}
    for name in ("unet", "vae", "text_encoder"):
        state = {k: v.detach().half().contiguous() for k, v in components[name].state_dict().items()
                 if v.is_floating_point()}
        path = out / f"{name}.safetensors"
        save_file(state, str(path), metadata={"format": "pt"})
        hashes[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def evaluate(out: Path, log) -> dict:
    """The quality figures of the weights in ``out``, loaded through the normal path."""
    from streamdiff import load_model
    from streamdiff.bench.quality_suite import quality_figures

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_trained_folder(out, Path(tmp) / "tiny")
        model = load_model(str(folder), device="cpu")
        figures = quality_figures(model)
    log(f"quality: {json.dumps(figures)}")
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6000, help="U-Net training steps")
    parser.add_argument("--vae-steps", type=int, default=300, help="VAE (autoencoder) training steps")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=128, help="training crop size in pixels (multiple of 16)")
    parser.add_argument("--pool", type=int, default=2048, help="procedural images drawn once and sampled from")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--uncond", type=float, default=0.15, help="probability of the empty prompt (CFG dropout)")
    parser.add_argument("--min-index", type=int, default=20, help="first LCM step index (of 50) trained on")
    parser.add_argument("--seed", type=int, default=TINY_SEED)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: steady on a busy 2-core host, where 2 threads stall each other)")
    parser.add_argument("--out", type=Path, default=TINY_WEIGHTS_DIR)
    parser.add_argument("--no-eval", action="store_true", help="skip measuring the quality figures")
    parser.add_argument("--eval-only", action="store_true", help="measure the weights in --out and update its manifest")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    start = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - start:7.1f} s] {message}", flush=True)

    manifest_path = args.out / "manifest.json"
    if args.eval_only:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        manifest["metrics"] = evaluate(args.out, log)
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        return 0

    from transformers import CLIPTokenizer

    from streamdiff.models.tokenizer_vocab import write_tokenizer_files

    torch.manual_seed(args.seed)
    components = build_tiny_components(args.seed)
    text_encoder = components["text_encoder"].requires_grad_(False)
    round_fp16_(text_encoder)
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    pool = make_pool(SceneSource(args.size, args.seed), args.pool, 64)
    log(f"{len(pool)} procedural images of {args.size}²")
    train_vae(components["vae"], pool, args, log)
    vae_time = time.monotonic() - start
    latents = encode_pool(components["vae"], pool, 64)
    log(f"encoded {tuple(latents.shape)} latents")
    train_unet(components["unet"], latents, text_encoder, tokenizer, args, log)
    train_time = time.monotonic() - start
    hashes = save_weights(components, args.out)
    manifest = {
        "model": "tiny",
        "description": "The built-in tiny model, trained by tools/train_tiny.py on procedural images (no download).",
        "architecture": "streamdiff.models.tiny: TINY_UNET, TINY_VAE, TINY_TEXT, SD_SCHEDULER, built-in tokenizer",
        "data": "procedural scenes (gradients, value noise, stripes, discs, boxes) and crops of the test pattern "
                "(streamdiff.io.sources.pattern_frame), drawn from the seed; targets: streamdiff.models.tiny_styles",
        "styles": list(STYLES),
        "recipe": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                   if k not in ("out", "no_eval", "eval_only")},
        "seed": args.seed,
        "files": hashes,
        "dtype": "float16",
        "trained_with": {"torch": torch.__version__, "python": platform.python_version(),
                         "machine": platform.machine(), "threads": args.threads},
        "wall_time_s": {"vae": round(vae_time, 1), "total": round(train_time, 1)},
    }
    if not args.no_eval:
        manifest["metrics"] = evaluate(args.out, log)
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {args.out} (training {train_time:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
