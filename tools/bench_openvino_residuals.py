"""What ControlNet inputs cost a compiled OpenVINO U-Net, per row: the U-Net without residual inputs against the same
U-Net built with them and fed zeros (a call where no row has control), at batch 2 and 8, and the ControlNet itself.

Runs on the SD-2.1-size engines ``streamdiff bench --only controlnet`` leaves in its engine cache (give the blobs'
entry folders); calls are interleaved (A B A B …), medians over rounds, seconds per row::

    python tools/bench_openvino_residuals.py --plain ENGINES/unet-openvino-… --residual ENGINES/unet-openvino-… \\
        --controlnet ENGINES/controlnet-openvino-… --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from streamdiff.backends.openvino_backend import BLOB_FILE, OvUNet
from streamdiff.backends.openvino_controlnet import OvControlNet
from streamdiff.backends.unet_inputs import controlnet_residual_inputs
from streamdiff.testing.components import SD21_UNET


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plain", type=Path, required=True, help="entry folder of the U-Net without residual inputs")
    parser.add_argument("--residual", type=Path, required=True, help="entry folder of the U-Net with them")
    parser.add_argument("--controlnet", type=Path, required=True, help="entry folder of the ControlNet")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2)
    args = parser.parse_args()
    from diffusers import UNet2DConditionModel
    from diffusers.models.embeddings import Timesteps

    time_proj = Timesteps(SD21_UNET["block_out_channels"][0], True, 0)
    with torch.device("meta"):  # the module structure only: the residual inputs' channels and strides
        inputs = controlnet_residual_inputs(UNet2DConditionModel(**SD21_UNET))
    plain = OvUNet(args.plain / BLOB_FILE, time_proj, torch.bfloat16)
    residual = OvUNet(args.residual / BLOB_FILE, time_proj, torch.bfloat16, inputs=inputs)
    controlnet = OvControlNet(args.controlnet / BLOB_FILE, time_proj, torch.bfloat16)
    side = args.size // 8
    generator = torch.Generator().manual_seed(0)

    def inputs(batch: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch, 4, side, side, generator=generator), torch.full((batch,), 500),
                torch.randn(batch, 77, SD21_UNET["cross_attention_dim"], generator=generator))

    cases = {}
    for batch in (2, 8):
        sample, timestep, hidden = inputs(batch)
        image = torch.rand(batch, 3, args.size, args.size, generator=generator)
        cases[f"unet-plain-b{batch}"] = (batch, lambda s=sample, t=timestep, h=hidden: plain(s, t, h))
        cases[f"unet-zero-residuals-b{batch}"] = (batch, lambda s=sample, t=timestep, h=hidden: residual(s, t, h))
        cases[f"controlnet-b{batch}"] = (batch, lambda s=sample, t=timestep, h=hidden, c=image: controlnet(s, t, h, c))
    for _, call in cases.values():
        call()  # warm-up: the first call at a shape prepares its kernels
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    for round_index in range(args.rounds):
        order = list(cases.items()) if round_index % 2 == 0 else list(reversed(cases.items()))
        for name, (batch, call) in order:
            started = time.perf_counter()
            for _ in range(args.calls):
                call()
            seconds[name].append((time.perf_counter() - started) / (args.calls * batch))
    report = {name: {"seconds_per_row": statistics.median(values), "rounds": values}
              for name, values in seconds.items()}
    for name, item in report.items():
        print(f"{name:26s} {item['seconds_per_row']:.3f} s/row  "
              f"({min(item['rounds']):.3f}–{max(item['rounds']):.3f})")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
