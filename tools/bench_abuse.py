"""Isolation under attack: victims' frames/s and latency while one hostile client attacks ``streamdiff serve``.

The server runs in its own process (``streamdiff serve``, the tiny model, the default backend). ``--victims`` good
clients stream the whole time (one event loop here). The attacker runs in its own process at nice 19, so that its
own CPU (a flood costs the sender too) does not take the victims' share of this small host, as if it were elsewhere. For each attack class (:data:`streamdiff.bench.abuse.ATTACKS`): a baseline window
(victims alone), the attack window (one attacker, reconnecting whenever it is closed), and the 5 s right after it.
Reported per attack: the victims' per-client frames/s and p95 end-to-end latency in each window and their ratio to
the same round's baseline (with ``--rounds``, attacks interleaved and the median over rounds), ``/healthz`` p95 round trip (polled every 100 ms on fresh connections), the server's RSS
and open file descriptors before and after, and what the attacker saw (closes, error codes, refusals).

``--soak SECONDS``: victims stream while the attacks rotate (each ``--seconds`` long) for that long; RSS and file
descriptors are sampled every 10 s (first, last, max, and the slope over the second half).

    python tools/bench_abuse.py                                   # every attack, 3 victims: table + JSON
    python tools/bench_abuse.py --attacks update_flood odd_sizes --seconds 5
    python tools/bench_abuse.py --soak 600 --json soak.json       # the 10-minute mixed soak
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import time
from typing import Any
from urllib.parse import urlsplit

from streamdiff.bench.abuse import (
    ATTACKS,
    HealthProbe,
    VictimLog,
    attack_in_process,
    probe_health,
    process_usage,
    watch_victims,
)
from streamdiff.bench.harness import write_json
from streamdiff.testing.serve import ServeProcess

AFTER_S = 5.0


async def _round(url: str, pid: int, name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Baseline, attack and after windows for one attack class, victims streaming throughout."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    log, health = VictimLog(), HealthProbe()
    now = time.perf_counter()
    base_start = now + args.warmup
    attack_start = base_start + args.seconds
    attack_end = attack_start + args.seconds
    end = attack_end + AFTER_S
    before = process_usage(pid)

    async def attacker() -> dict[str, Any]:
        return await attack_in_process(name, url, attack_start, attack_end)

    _, _, outcome = await asyncio.gather(watch_victims(url, args.victims, args.size, end, log),
                                         probe_health(host, port, end, health), attacker())
    after = process_usage(pid)
    # The attacker's own clean-up (e.g. closing 600 sockets) may run past attack_end: "after" starts when it ended.
    attack_done = max(attack_end, outcome["ended"])
    windows = {"baseline": log.window(base_start, attack_start, args.victims),
               "attack": log.window(attack_start, attack_end, args.victims),
               "after": log.window(attack_done, min(end, attack_done + AFTER_S), args.victims)}
    base = windows["baseline"]
    return {
        "attack": name, **{f"{w}_{k}": v for w, m in windows.items() for k, v in m.items()},
        "attack_fps_ratio": windows["attack"]["fps"] / base["fps"] if base["fps"] else float("nan"),
        "after_fps_ratio": windows["after"]["fps"] / base["fps"] if base["fps"] else float("nan"),
        "attack_p95_ratio": windows["attack"]["p95_ms"] / base["p95_ms"] if base["p95_ms"] else float("nan"),
        "healthz_baseline_p95_ms": health.p95(base_start, attack_start),
        "healthz_attack_p95_ms": health.p95(attack_start, attack_end),
        "healthz_failures": sum(1 for _, _, status in health.samples if status != 200),
        "rss_before_mb": before["rss_bytes"] / 2**20, "rss_after_mb": after["rss_bytes"] / 2**20,
        "fds_before": before["fds"], "fds_after": after["fds"],
        "victims_closed": log.closes, "attacker": outcome,
    }


async def _soak(url: str, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    """Victims stream for ``args.soak`` s while the attacks rotate; RSS and file descriptors sampled every 10 s."""
    log = VictimLog()
    start = time.perf_counter()
    end = start + args.soak
    samples: list[dict[str, float]] = []
    rotations: list[str] = []

    async def sample() -> None:
        while time.perf_counter() < end:
            samples.append({"t": time.perf_counter() - start, **process_usage(pid)})
            await asyncio.sleep(10)
        samples.append({"t": time.perf_counter() - start, **process_usage(pid)})

    async def rotate() -> None:
        names = args.attacks
        i = 0
        while time.perf_counter() + args.seconds + 3 < end:
            name = names[i % len(names)]
            rotations.append(name)
            start_at = time.perf_counter() + 3  # the child's imports
            await attack_in_process(name, url, start_at, start_at + args.seconds)
            i += 1

    await asyncio.gather(watch_victims(url, args.victims, args.size, end, log), sample(), rotate())
    half = [s for s in samples if s["t"] >= args.soak / 2]
    slope = ((half[-1]["rss_bytes"] - half[0]["rss_bytes"]) / 2**20 / max(1.0, half[-1]["t"] - half[0]["t"]) * 60
             if len(half) >= 2 else float("nan"))
    return {
        "soak_s": args.soak, "attacks_run": len(rotations), "victim_fps": log.window(start, end, args.victims)["fps"],
        "victims_closed": log.closes,
        "rss_first_mb": samples[0]["rss_bytes"] / 2**20, "rss_last_mb": samples[-1]["rss_bytes"] / 2**20,
        "rss_max_mb": max(s["rss_bytes"] for s in samples) / 2**20, "rss_slope_second_half_mb_per_min": slope,
        "fds_first": samples[0]["fds"], "fds_last": samples[-1]["fds"], "fds_max": max(s["fds"] for s in samples),
        "samples": samples,
    }


def _median_row(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One attack's rounds: the median of every figure (ratios are per round, then the median), the first RSS and
    file descriptors before and the last after, the attacker's outcome summed."""
    row = dict(rounds[-1])
    for key, value in rounds[0].items():
        if isinstance(value, float) and key not in ("rss_before_mb",):
            row[key] = statistics.median(r[key] for r in rounds)
    row["rss_before_mb"], row["fds_before"] = rounds[0]["rss_before_mb"], rounds[0]["fds_before"]
    attacker: dict[str, Any] = {}
    for r in rounds:
        for key, value in r["attacker"].items():
            if isinstance(value, dict):
                table = attacker.setdefault(key, {})
                for k, v in value.items():
                    table[k] = table.get(k, 0) + v
            elif isinstance(value, (int, float)) and key not in ("started", "ended"):
                attacker[key] = attacker.get(key, 0) + value
    row["attacker"], row["rounds"] = attacker, len(rounds)
    row["victims_closed"] = [c for r in rounds for c in r["victims_closed"]]
    return row


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["attack | victim fps base / attack / after (ratio) | victim p95 ms base / attack (ratio) | "
             "/healthz p95 ms base / attack | RSS MB before → after | fds | attacker",
             "--- | ---: | ---: | ---: | ---: | ---: | ---"]
    for r in rows:
        a = r["attacker"]
        seen = ", ".join(f"{k} {v}" for k, v in (("closes", a.get("closes")), ("errors", a.get("errors")),
                                                  ("refused", a.get("refused"))) if v)
        lines.append(
            f"{r['attack']} | {r['baseline_fps']:.1f} / {r['attack_fps']:.1f} / {r['after_fps']:.1f} "
            f"({r['attack_fps_ratio']:.2f}, {r['after_fps_ratio']:.2f}) | {r['baseline_p95_ms']:.0f} / "
            f"{r['attack_p95_ms']:.0f} ({r['attack_p95_ratio']:.2f}) | {r['healthz_baseline_p95_ms']:.1f} / "
            f"{r['healthz_attack_p95_ms']:.1f} | {r['rss_before_mb']:.0f} → {r['rss_after_mb']:.0f} | "
            f"{r['fds_before']} → {r['fds_after']} | {seen or '-'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", nargs="+", choices=sorted(ATTACKS), default=list(ATTACKS))
    parser.add_argument("--victims", type=int, default=3)
    parser.add_argument("--size", type=int, default=128, help="the victims' frame size (default 128)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before the baseline window")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds of the baseline and attack windows")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds per attack (medians reported)")
    parser.add_argument("--soak", type=float, default=0.0, help="run the mixed soak for this many seconds instead")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for streamdiff serve (repeatable)")
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON ('-': stdout)")
    args = parser.parse_args(argv)
    serve_args = ["--model", "tiny", "--size", f"{args.size}x{args.size}", "--max-streams", str(args.victims + 2),
                  "--stats-interval", "1",
                  *args.serve_arg]
    started = time.monotonic()
    report: dict[str, Any] = {"benchmark": "abuse", "victims": args.victims, "size": args.size,
                              "seconds": args.seconds, "python": platform.python_version(),
                              "machine": platform.machine(), "serve_args": serve_args}
    with ServeProcess(*serve_args) as server:
        if args.soak:
            soak = asyncio.run(_soak(server.url, server.pid, args))
            report["soak"] = soak
            print(f"soak {soak['soak_s']:.0f} s, {soak['attacks_run']} attacks: victims {soak['victim_fps']:.1f} "
                  f"frames/s each, closed {soak['victims_closed'] or 'never'}; RSS {soak['rss_first_mb']:.0f} → "
                  f"{soak['rss_last_mb']:.0f} MB (max {soak['rss_max_mb']:.0f}, second half "
                  f"{soak['rss_slope_second_half_mb_per_min']:+.1f} MB/min); fds {soak['fds_first']} → "
                  f"{soak['fds_last']} (max {soak['fds_max']})")
        else:
            rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in args.attacks}
            for r in range(args.rounds):  # interleaved: every attack once per round, the order reversed each round
                for name in args.attacks if r % 2 == 0 else args.attacks[::-1]:
                    row = asyncio.run(_round(server.url, server.pid, name, args))
                    rounds[name].append(row)
                    print(f"round {r + 1} {name}: victims {row['attack_fps_ratio']:.2f}x during, "
                          f"{row['after_fps_ratio']:.2f}x after", file=sys.stderr)
            rows = [_median_row(rounds[name]) for name in args.attacks]
            report["results"], report["rounds"] = rows, rounds
            print(format_table(rows))
    report["elapsed_s"] = time.monotonic() - started
    if args.json:
        write_json(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
