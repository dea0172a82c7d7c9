"""Benchmark the streaming runtime: engine alone vs file → engine → file, and latency with a paced source.

    python tools/bench_runtime.py --threads 1                 # tiny model, 256x256, 40 frames, 6 rounds
    python tools/bench_runtime.py --threads 1 --json out.json

A = the engine alone: ``pipe.step`` over frames already decoded into tensors, plus the flush (no I/O, no threads).
B = the whole path: an mp4 decoded by the source thread, the engine thread, an mp4 encoded by the sink thread.
A and B alternate (A B, B A, A B, ...); medians and the ratio B/A are reported. Then a paced test pattern (a camera
stand-in) runs at each ``--paced-fps`` into a null sink, reporting end-to-end latency p50/p95 and drops.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch


def decoded_tensors(path: Path) -> list[torch.Tensor]:
    from streamdiff.core.image import frame_to_tensor
    from streamdiff.io import VideoFileSource

    source = VideoFileSource(path)
    source.open()
    out = []
    while (frame := source.read()) is not None:
        out.append(frame_to_tensor(frame))
    source.close()
    return out


def engine_only(pipe, tensors: list[torch.Tensor], prompt: str) -> None:
    """A: the frames, already decoded into tensors, through the engine alone, synchronously (plus the flush)."""
    pipe.prepare(prompt=prompt)
    produced = sum(pipe.step(x, frame_id=i).images is not None for i, x in enumerate(tensors))
    produced += len(pipe.flush())
    assert produced == len(tensors), (produced, len(tensors))


def whole_path(pipe, source_path: Path, out_path: Path, prompt: str) -> dict:
    """B: file → engine (its worker thread) → file through the runtime; its summary as a dict."""
    from streamdiff import PromptConfig
    from streamdiff.io import VideoFileSink, VideoFileSource
    from streamdiff.runtime import StreamRunner

    runner = StreamRunner(pipe.engine, VideoFileSource(source_path), [VideoFileSink(out_path)],
                          stream_config=pipe.config, prompt=PromptConfig(prompt))
    return json.loads(runner.run().to_json())


def paced(pipe, fps: float, seconds: float, prompt: str) -> dict:
    from streamdiff import PromptConfig
    from streamdiff.io import NullSink, TestPatternSource
    from streamdiff.runtime import RuntimeConfig, StreamRunner

    width, height = pipe.config.width, pipe.config.height
    source = TestPatternSource(width, height, fps=fps, realtime=True)
    runner = StreamRunner(pipe.engine, source, [NullSink()], RuntimeConfig(max_frames=max(2, int(fps * seconds))),
                          stream_config=pipe.config, prompt=PromptConfig(prompt))
    return json.loads(runner.run().to_json())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--t-index-list", default="32,45")
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 for steady numbers)")
    parser.add_argument("--paced-fps", type=float, nargs="*", default=[8.0, 30.0])
    parser.add_argument("--paced-seconds", type=float, default=6.0)
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON ('-' for stdout)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)

    from streamdiff import StreamConfig, StreamPipeline
    from streamdiff.bench.harness import Case, run_interleaved, write_json

    t_index_list = tuple(int(v) for v in args.t_index_list.split(","))
    config = StreamConfig(width=args.size, height=args.size, t_index_list=t_index_list)
    pipe = StreamPipeline.from_pretrained(args.model, config)
    prompt = "a watercolor portrait"
    results: dict = {"model": args.model, "size": args.size, "t_index_list": list(t_index_list),
                     "frames": args.frames, "threads": torch.get_num_threads(), "rounds": []}
    with tempfile.TemporaryDirectory() as tmp:
        source_path, out_path = Path(tmp) / "in.mp4", Path(tmp) / "out.mp4"
        from streamdiff.testing import write_pattern_video

        write_pattern_video(source_path, args.frames, args.size, args.size, 30)
        tensors = decoded_tensors(source_path)
        summaries: list[dict] = []
        cases = [
            Case("engine", lambda: engine_only(pipe, tensors, prompt), items=len(tensors)),
            Case("path", lambda: summaries.append(whole_path(pipe, source_path, out_path, prompt)), items=len(tensors)),
        ]
        # Rounds alternate A B, B A: a load drift on the shared machine cancels out over pairs of rounds.
        engine, path = run_interleaved(cases, rounds=args.rounds, calls=1, warmup=1)
    for a_seconds, b_seconds, summary in zip(engine.seconds, path.seconds, summaries[1:]):
        results["rounds"].append({"engine_fps": 1 / a_seconds, "path_fps": 1 / b_seconds,
                                  "ratio": a_seconds / b_seconds, "path_latency_p50_ms": summary["latency_p50_ms"]})
    a_med, b_med = engine.per_second, path.per_second
    ratio_med = statistics.median(r["ratio"] for r in results["rounds"])
    results.update(engine_fps_median=a_med, path_fps_median=b_med, ratio=b_med / a_med, paired_ratio_median=ratio_med)
    results["paced"] = [dict(fps=fps, **paced(pipe, fps, args.paced_seconds, prompt)) for fps in args.paced_fps]

    print(f"streaming runtime, {args.model} {args.size}x{args.size} t_index_list={list(t_index_list)}, "
          f"{results['threads']} torch thread(s), {args.frames} frames, {args.rounds} rounds (A/B interleaved)")
    print(f"{'configuration':42} {'median fps':>10}")
    print(f"{'A engine only (pre-decoded tensors)':42} {a_med:10.1f}")
    print(f"{'B file -> engine -> file (3 threads)':42} {b_med:10.1f}")
    print(f"{'ratio of medians B/A':42} {results['ratio']:10.3f}")
    print(f"{'median of per-round ratios B/A':42} {ratio_med:10.3f}")
    print(f"\n{'paced source':14} {'in fps':>7} {'out fps':>8} {'p50 ms':>7} {'p95 ms':>7} {'max ms':>7} {'drops':>6}")
    for p in results["paced"]:
        print(f"{p['fps']:8.0f} fps   {p['fps_in'] or 0:7.1f} {p['fps_out'] or 0:8.1f} {p['latency_p50_ms']:7.1f} "
              f"{p['latency_p95_ms']:7.1f} {p['latency_max_ms']:7.1f} {sum(p['drops'].values()):6d}")
    if args.json:
        write_json(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
