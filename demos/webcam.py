"""Webcam demo: webcam → engine → window (and optionally a virtual camera), with live prompt changes.

    python demos/webcam.py --prompt "a watercolor portrait"
    python demos/webcam.py --model stabilityai/sd-turbo --size 512x512 --virtualcam --prompt "an oil painting"

Type a new prompt in the terminal and press Enter to change it live; ``:strength 0.6`` changes the strength, ``q``
quits (so do Ctrl-C and the window's ``q`` key). Window keys: q quit, space pause, +/- strength, f similarity filter.
Uses only streamdiff's public API; the default model is the built-in random ``tiny`` one (noise art, but real time
on a CPU), so pass a real model for real pictures.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading

from streamdiff import PromptConfig, StreamConfig, StreamDiffError, StreamEngine
from streamdiff.config import t_index_list_for_strength
from streamdiff.io import VideoFileSink, VirtualCamSink, WindowSink, open_source, parse_size
from streamdiff.runtime import Controls, RuntimeConfig, StreamRunner


def read_prompts(controls: Controls, steps: int) -> None:
    """Terminal loop: each line is a new prompt (``:strength S`` a new strength, ``q`` quits)."""
    for line in sys.stdin:
        text = line.strip()
        if text in ("q", "quit", "exit"):
            controls.request_stop()
            return
        try:
            if text.startswith(":strength"):
                strength = float(text.split()[1])
                controls.update(t_index_list=t_index_list_for_strength(strength, steps))
                print(f"strength -> {strength}")
            elif text:
                controls.update(prompt=text)
                print(f"prompt -> {text!r}")
        except (IndexError, ValueError, StreamDiffError) as error:
            print(f"ignored: {error}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="webcam:0", help="webcam:INDEX|PATH (or any run source, e.g. testpattern)")
    parser.add_argument("--camera-size", default="640x480", help="requested webcam resolution")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--size", default="256x256", help="engine size WxH")
    parser.add_argument("--prompt", default="a watercolor portrait")
    parser.add_argument("--strength", type=float, default=0.4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--virtualcam", action="store_true", help="also send the output to a virtual camera")
    parser.add_argument("--no-window", action="store_true", help="no window (e.g. virtual camera only)")
    parser.add_argument("--record", metavar="OUT.mp4", help="also record the output")
    parser.add_argument("--frames", type=int, help="stop after this many input frames")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    width, height = parse_size(args.size)
    config = StreamConfig(width=width, height=height, t_index_list=t_index_list_for_strength(args.strength, args.steps))
    sinks = [] if args.no_window else [WindowSink("streamdiff webcam demo")]
    if args.virtualcam:
        sinks.append(VirtualCamSink())
    if args.record:
        sinks.append(VideoFileSink(args.record))
    if not sinks:
        parser.error("nothing to show: drop --no-window or add --virtualcam / --record")
    try:
        source = open_source(args.source, width=width, height=height, realtime=True,
                             camera_size=parse_size(args.camera_size))
        engine = StreamEngine.from_pretrained(args.model, max_streams=1)
        runner = StreamRunner(engine, source, sinks, RuntimeConfig(realtime=True, max_frames=args.frames),
                              stream_config=config, prompt=PromptConfig(args.prompt, guidance_scale=1.2, seed=2))
        runner.start()
    except StreamDiffError as error:
        logging.error("%s", error)
        return 1
    print("type a prompt and press Enter to change it; ':strength 0.6'; q to quit")
    threading.Thread(target=read_prompts, args=(runner.controls, args.steps), daemon=True).start()
    try:
        summary = runner.wait(status_interval=5.0, on_status=lambda s: logging.info("%s", s.status_line()))
    except StreamDiffError as error:
        logging.error("%s", error)
        return 1
    print(summary.format())
    return 130 if summary.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
