"""The original StreamDiffusion (``streamdiffusion==0.1.1``) as a worker process of ``tools/bench_reference.py``.

Runs in the reference's own venv (it does not import streamdiff)::

    REFERENCE_PYTHON tools/bench_reference_worker.py SETTINGS.json

``SETTINGS.json`` names the diffusers model folder, the TAESD folder, the input frames (``.npy``, uint8
``[k, H, W, 3]``) and the stream settings. The worker loads the model in the requested dtype, answers ``{"ready":
...}`` and then serves one JSON request per line on stdin, one JSON answer per line on stdout:

- ``{"op": "run", "calls": k}``: the next k frames through the stream (the caller times the round trip);
- ``{"op": "quality", "count": k, "path": OUT.npy}``: a fresh ``prepare()``, frames 0 … k−1, the outputs that leave
  the Stream Batch saved as float32 ``[k−n+1, 3, H, W]`` in [0, 1] (clipped like streamdiff's);
- ``{"op": "quit"}``.

The reference's ``__call__`` times itself with ``torch.cuda.Event`` and ``torch.cuda.synchronize`` unconditionally;
both are replaced below by CPU stand-ins, which change no result.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np
import torch


class CpuEvent:
    """Stands in for ``torch.cuda.Event``: wall-clock stamps, elapsed time in milliseconds."""

    def __init__(self, enable_timing: bool = True) -> None:
        self.stamp = 0.0

    def record(self, stream: Any = None) -> None:
        self.stamp = time.perf_counter()

    def elapsed_time(self, end: CpuEvent) -> float:
        return (end.stamp - self.stamp) * 1000.0


torch.cuda.Event = CpuEvent  # type: ignore[assignment,misc]
torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]

import PIL.Image  # noqa: E402
from diffusers import AutoencoderTiny, StableDiffusionPipeline  # noqa: E402
from streamdiffusion import StreamDiffusion  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main(settings_path: str) -> None:
    protocol = sys.stdout
    sys.stdout = sys.stderr  # library chatter must not reach the protocol stream
    s = json.loads(open(settings_path, encoding="utf-8").read())
    torch.set_num_threads(int(s["threads"]))
    dtype = DTYPES[s["dtype"]]
    started = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(s["model"], torch_dtype=dtype, safety_checker=None)
    pipe.to("cpu")
    stream = StreamDiffusion(
        pipe, t_index_list=list(s["t_index_list"]), torch_dtype=dtype, width=s["width"], height=s["height"],
        do_add_noise=True, use_denoising_batch=True, frame_buffer_size=1, cfg_type=s["cfg_type"],
    )
    stream.vae = AutoencoderTiny.from_pretrained(s["taesd"], torch_dtype=dtype).to("cpu")
    frames = [PIL.Image.fromarray(frame) for frame in np.load(s["frames"])]

    def prepare() -> None:
        stream.prepare(
            prompt=s["prompt"], negative_prompt="", num_inference_steps=s["num_inference_steps"],
            guidance_scale=s["guidance_scale"], delta=s["delta"], generator=torch.Generator(), seed=s["seed"],
        )

    prepare()
    calls = 0

    def answer(message: dict[str, Any]) -> None:
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    answer({"ready": True, "load_seconds": time.perf_counter() - started, "torch": torch.__version__})
    with torch.inference_mode():
        for line in sys.stdin:
            request = json.loads(line)
            if request["op"] == "run":
                for _ in range(int(request["calls"])):
                    stream(frames[calls % len(frames)])
                    calls += 1
                answer({"ok": True})
            elif request["op"] == "quality":
                prepare()
                outputs = [stream(frames[i]) for i in range(int(request["count"]))]
                warmup = len(s["t_index_list"]) - 1
                images = torch.cat([o.float().reshape(-1, *o.shape[-3:]) for o in outputs[warmup:]])
                np.save(request["path"], (images / 2 + 0.5).clamp(0, 1).numpy())
                prepare()
                calls = 0
                answer({"ok": True})
            elif request["op"] == "quit":
                answer({"ok": True})
                return
            else:
                answer({"error": f"unknown op {request['op']!r}"})


if __name__ == "__main__":
    main(sys.argv[1])
