"""Count the device operations one engine tick queues, eager and with whole-tick CUDA graphs, on the CPU.

Usage::

    python tools/count_tick_ops.py                    # tiny model, 1 and 4 streams, 2-step RCFG self, 64²
    python tools/count_tick_ops.py --streams 1,4,8 --steps 1,2 --json

What a whole-tick graph (streamdiff/engine/tick_graph.py) saves on a GPU is launches and the Python that makes them:
every operation of a tick between the input copy and the output copy becomes one replay. A GPU is not needed to
count them. The engine runs the tiny model on the CPU; torch's dispatcher shows each operation of one filled tick
(a ``TorchDispatchMode``), split by where it comes from: the VAE encode, the U-Net call, the VAE decode, and the rest
(the step arithmetic of each stream, the batch assembly, the range conversions, the output copy). "Kernels" counts
the operations that write memory: those whose result is not an alias of an argument, and in-place writes (views
and reshapes launch nothing on a GPU, so they are left out; a reshape that has to copy is undercounted). With ``--graphs`` the same tick runs through a stand-in CUDA seam whose replay is not counted: what is left
is what the host still queues per tick.

The SD-2.1-size U-Net's and TAESD's own counts (one forward on the meta device, no weights) are printed beside the
tiny model's, since the rest does not depend on the model's size.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any, Callable

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from streamdiff import StreamConfig, StreamEngine, load_model
from streamdiff.backends.torch_backend import TorchUNet, TorchVae
from streamdiff.engine import EngineConfig
from streamdiff.testing.cuda_seam import CallableCuda


class _Counter(TorchDispatchMode):
    """Counts operations (and those that make new memory) under the current phase label."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "rest"
        self.paused = False
        self.ops: Counter[str] = Counter()
        self.kernels: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            self.ops[self.phase] += 1
            if _launches(func):
                self.kernels[self.phase] += 1
        return out


def _launches(func: Any) -> bool:
    """Whether an operation writes memory (a kernel on a GPU): a result that is not an alias of an argument, or an
    in-place write; views (and reshapes, which alias when they can) launch nothing."""
    returns = func._schema.returns
    return not returns or any(r.alias_info is None or r.alias_info.is_write for r in returns)


class _Phase:
    """An engine call counted under its own label."""

    def __init__(self, counter: _Counter, label: str, fn: Callable[..., Any]) -> None:
        self.counter, self.label, self.fn = counter, label, fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        previous, self.counter.phase = self.counter.phase, self.label
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.counter.phase = previous


class _Seam(CallableCuda):
    """The CPU seam whose replay is not counted (on a GPU it is one launch of the whole graph)."""

    def __init__(self, counter: _Counter) -> None:
        super().__init__()
        self.counter = counter

    def run(self, graph: Any) -> None:
        self.counter.paused = True
        try:
            super().run(graph)
        finally:
            self.counter.paused = False
        self.counter.ops["replay"] += 1
        self.counter.kernels["replay"] += 1


def count_tick(model: Any, streams: int, steps: int, size: int, graphs: bool) -> dict[str, dict[str, int]]:
    """Operations of one filled tick of ``streams`` img2img streams (RCFG self, ``steps`` steps) by phase."""
    counter = _Counter()
    vae = TorchVae(model.vae)
    vae.encode, vae.decode = _Phase(counter, "vae_encode", vae.encode), _Phase(counter, "vae_decode", vae.decode)
    config = EngineConfig(max_streams=streams, max_batch_rows=64, batch_vae=True, cuda_graphs=graphs)
    engine = StreamEngine(model, config, unet=_Phase(counter, "unet", TorchUNet(model.unet)), vae=vae,
                          cuda=_Seam(counter) if graphs else None)
    t_index = (20, 40) if steps == 2 else tuple(range(10, 50, 40 // steps))[:steps]
    handles = [engine.open_stream(StreamConfig(width=size, height=size, t_index_list=t_index, cfg_type="self"),
                                  prompt=f"prompt {i}", seed=i, guidance_scale=1.4) for i in range(streams)]
    rng = np.random.default_rng(0)
    frame = lambda: rng.integers(0, 256, (size, size, 3), dtype=np.uint8)  # noqa: E731
    for _ in range(steps + 3):  # fill the batches, see the call twice, capture (with graphs)
        engine.step({h: frame() for h in handles})
    counter.ops.clear()
    counter.kernels.clear()  # the replays of the ticks before
    with counter:
        engine.step({h: frame() for h in handles})
    return {"ops": dict(counter.ops), "kernels": dict(counter.kernels)}


def count_module(module: torch.nn.Module, *inputs: torch.Tensor) -> dict[str, int]:
    """Operations of one forward of ``module`` (on the meta device: no memory, no time)."""
    counter = _Counter()
    with torch.no_grad(), counter:
        module(*inputs)
    return {"ops": counter.ops["rest"], "kernels": counter.kernels["rest"]}


def sd21_counts(rows: int, size: int) -> dict[str, dict[str, int]]:
    from diffusers import AutoencoderTiny, UNet2DConditionModel

    from streamdiff.testing.components import SD21_UNET

    with torch.device("meta"):
        unet, taesd = UNet2DConditionModel(**SD21_UNET), AutoencoderTiny()
    latent = size // 8
    return {
        "unet": count_module(unet, torch.empty(rows, 4, latent, latent, device="meta"),
                             torch.empty(rows, device="meta"), torch.empty(rows, 77, 1024, device="meta")),
        "vae_encode": count_module(taesd.encoder, torch.empty(1, 3, size, size, device="meta")),
        "vae_decode": count_module(taesd.decoder, torch.empty(1, 4, latent, latent, device="meta")),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="1,4")
    parser.add_argument("--steps", default="2")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--no-sd21", action="store_true", help="skip the SD-2.1-size meta-device counts")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = load_model("tiny-random", device="cpu")
    rows = []
    for steps in [int(s) for s in args.steps.split(",")]:
        for streams in [int(s) for s in args.streams.split(",")]:
            eager = count_tick(model, streams, steps, args.size, graphs=False)
            graphed = count_tick(model, streams, steps, args.size, graphs=True)
            rows.append({"streams": streams, "steps": steps, "eager": eager, "graphed": graphed})
    report: dict[str, Any] = {"size": args.size, "rows": rows}
    if not args.no_sd21:
        report["sd21_per_call"] = sd21_counts(2, 512)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print("streams steps | eager kernels: encode unet decode rest = total | whole-tick graphs: queued per tick")
    for row in rows:
        k, g = row["eager"]["kernels"], row["graphed"]["kernels"]
        parts = [k.get(name, 0) for name in ("vae_encode", "unet", "vae_decode", "rest")]
        print(f"{row['streams']:>7} {row['steps']:>5} | {parts[0]:>6} {parts[1]:>4} {parts[2]:>6} {parts[3]:>4}"
              f" = {sum(parts):>5} | {sum(g.values()):>3} ({g.get('replay', 0)} replay, {g.get('rest', 0)} other)")
    if "sd21_per_call" in report:
        sd = report["sd21_per_call"]
        print("SD-2.1-size, one call (meta device): U-Net {unet[kernels]} kernels of {unet[ops]} ops (2 rows, "
              "512²); TAESD encode {vae_encode[kernels]}, decode {vae_decode[kernels]}".format(**sd))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
