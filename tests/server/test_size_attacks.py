"""Sizes a client may ask for, against a real ``streamdiff serve`` on its default backend (OpenVINO on this CPU).

The attack that once broke the shared engine for everyone: streams at 256², 128², 256², then one at 200² (a multiple
of 8, then accepted, failing inside the traced U-Net and leaving OpenVINO's compiled graph unable to run 256² until
restart), then 80². Now sizes the engine cannot run are refused at hello and in live updates (``not_allowed``, with
the allowed set), and 256² keeps working. A client cycling through 60 valid sizes leaves the server's memory within
the bound that ``EngineConfig.max_shapes`` sets (docs/PERF.md, "Isolation under attack").
"""

from __future__ import annotations

import time

from live import run

from streamdiff.bench.abuse import odd_sizes, size_cycling
from streamdiff.testing.serve import ServeProcess

#: RSS growth allowed while cycling 60 sizes (64-512 px) after the first 12: the per-size state of at most
#: EngineConfig.max_shapes (8) sizes is kept. Measured 27 MiB here (2026-12-06); unbounded, OpenVINO grew by ~750 MB
#: over 60 sizes up to 1024 px and never gave it back (docs/PERF.md).
MEMORY_BOUND_MB = 150


def test_sizes_the_engine_cannot_run_are_refused_and_256_keeps_working(tiny_model) -> None:
    with ServeProcess("--model", "tiny", "--size", "256x256", "--max-streams", "4") as server:
        outcome = run(odd_sizes(server.url, time.perf_counter()), timeout=120)  # the whole sequence, once
        log = "".join(server.log)
    served = outcome["frames_by_size"]
    assert served == {"256x256": 3, "128x128": 1, "200x200": 0, "80x80": 0}, (outcome, log[-3000:])
    assert outcome["refused"] == {"not_allowed": 2}, outcome  # 200x200 and 80x80 at hello
    assert outcome["errors"] == {"not_allowed": 2}, outcome  # and as live updates of a running stream
    assert outcome["closes"] == {}, outcome  # no stream of the sequence ended with an error
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]


def test_cycling_sixty_sizes_keeps_memory_within_the_bound(tiny_model) -> None:
    with ServeProcess("--model", "tiny", "--size", "256x256", "--max-streams", "2") as server:
        first = run(size_cycling(server.url, time.perf_counter() + 600, count=12), timeout=300)
        settled = server.rss_bytes()
        every = run(size_cycling(server.url, time.perf_counter() + 600, count=60), timeout=600)
        grown = (server.rss_bytes() - settled) / 2**20
        again = run(odd_sizes(server.url, time.perf_counter()), timeout=120)
    assert first["sizes_served"] == 12 and every["sizes_served"] == 60, (first, every)
    assert grown < MEMORY_BOUND_MB, f"RSS grew {grown:.0f} MiB after 60 sizes (bound {MEMORY_BOUND_MB})"
    assert again["frames_by_size"]["256x256"] == 3, again
