"""Many streams on one live server: isolation and exactness, fairness, a stalled client, latency over time.

Real clients over loopback (streamdiff.client and streamdiff.client.remote) against a real server on the tiny model. The
exactness test uses the lossless path: frames travel as WebP at quality 100 (lossless, VP8L) both ways, so a
client's decoded outputs can be compared with a single-stream StreamPipeline fed the same frames; they agree to
1/255 (the batched U-Net call of 8 streams and the single stream's own call round differently in float32).
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time

import numpy as np
import pytest
from live import bodies, drive, frames, run, settings

from streamdiff import StreamConfig, StreamPipeline
from streamdiff.client import StreamClient
from streamdiff.client.remote import RemoteEngine
from streamdiff.protocol.limits import ServerLimits

# Eight streams that differ in prompt, seed, steps, guidance mode and guidance scale.
EIGHT = [
    (StreamConfig(width=64, height=64, t_index_list=(20, 35), cfg_type=cfg), dict(prompt=p, seed=s, guidance_scale=g))
    for cfg, p, s, g in [
        ("self", "a watercolor portrait", 1, 1.2), ("none", "an oil painting", 2, 1.0),
        ("initialize", "charcoal sketch", 3, 1.6), ("self", "neon city", 4, 1.4),
        ("self", "a marble statue", 5, 2.0), ("none", "pixel art", 6, 1.0),
        ("initialize", "stained glass", 7, 1.3), ("self", "a watercolor portrait", 8, 1.2),  # same prompt, new seed
    ]
]
EIGHT[3] = (EIGHT[3][0].with_changes(t_index_list=(30,)), EIGHT[3][1])  # one step
EIGHT[4] = (EIGHT[4][0].with_changes(t_index_list=(10, 25, 40)), EIGHT[4][1])  # three steps


def single_stream(model, config: StreamConfig, prompt: dict, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """What a single-stream pipeline gives for ``inputs``, its Stream Batch run out at the end."""
    pipe = StreamPipeline(model, config)
    pipe.prepare(**prompt)
    outs = [out for out in (pipe(frame) for frame in inputs) if out is not None]
    return outs + [o.frames()[0] for o in pipe.flush()]


def test_eight_clients_each_get_exactly_their_own_frames(live, tiny_model) -> None:
    server = live(max_streams=8, max_batch_rows=64)
    remote = RemoteEngine(server.url, image_format="webp", quality=100)
    inputs = [frames(10, offset=17 * i) for i in range(8)]
    results: dict[int, list] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def client(i: int) -> None:
        try:
            config, prompt = EIGHT[i]
            stream = remote.open_stream(config, lossless=True, **prompt)
            start.wait(30)  # all eight stream at once: their rows share the U-Net calls
            got = []
            reader = threading.Thread(target=lambda: got.extend(iter(lambda: stream.get(timeout=30), None)))
            reader.start()  # outputs are read as they come, as the runner's output thread does
            for k, frame in enumerate(inputs[i]):
                stream.submit(frame, frame_id=(i, k), timeout=30)
            stream.end_input()
            reader.join(60)
            assert stream.error is None and stream.stats.dropped_inputs == 0
            results[i] = got
        except BaseException as error:  # noqa: BLE001 - reported by the test thread
            errors.append(error)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    remote.stop()
    assert errors == []
    calls = server.hub.engine.stats.recent_rows
    assert max(calls) >= 8, calls  # many streams' rows in one U-Net call
    for i, (config, prompt) in enumerate(EIGHT):
        got = results[i]
        assert [o.frame_ids[0] for o in got] == [(i, k) for k in range(10)]  # its own frames, all of them, in order
        expected = single_stream(tiny_model, config, prompt, inputs[i])
        assert len(expected) == 10
        worst = max(int(np.abs(o.frames()[0].astype(int) - e.astype(int)).max()) for o, e in zip(got, expected))
        assert worst <= 1, (i, worst)
        if i:  # and not another client's: the first client's frames differ from each other client's
            other = results[0][5].frames()[0].astype(int)
            assert np.abs(got[5].frames()[0].astype(int) - other).mean() > 2


FAST = ServerLimits(max_input_fps=1000, input_burst_frames=4)


async def _served(server, count: int, warmup: float, seconds: float, size: int = 128) -> tuple[list[int], list[int]]:
    """``count`` clients streaming at once, as fast as the protocol allows: the frames the engine made for each
    stream during the window, and the rows of each U-Net call it ran then (what the engine served, not wall-clock
    rates, so that a busy machine slows everyone alike and changes no verdict)."""
    body = bodies(frames(1, size))[0]
    clients = [await StreamClient.connect(server.url, settings(size, prompt=f"client {i}", seed=i))
               for i in range(count)]
    engine = server.hub.engine
    streams = [s for s in engine.streams if s.name in {c.ready.stream_id for c in clients}]
    assert len(streams) == count
    counts: dict[str, list[int]] = {}

    async def snapshot(at: float, key: str) -> None:
        await asyncio.sleep(max(0.0, at - time.perf_counter()))
        counts[key] = [s.stats.frames_out for s in streams] + [engine.stats.unet_calls]

    start = time.perf_counter() + warmup
    end = start + seconds
    calls_before = list(engine.stats.recent_rows)
    await asyncio.gather(*(drive(c, lambda i: body, until=end, window=3) for c in clients),
                         snapshot(start, "start"), snapshot(end, "end"))
    for client in clients:
        await client.close()
    served = [b - a for a, b in zip(counts["start"][:-1], counts["end"][:-1])]
    calls = counts["end"][-1] - counts["start"][-1]
    rows = list(engine.stats.recent_rows)[len(calls_before):][-calls:] if calls else []
    return served, rows


def test_four_clients_share_the_engine_fairly(live) -> None:
    server = live(limits=FAST)
    served, rows = run(_served(server, 4, 1.5, 8.0))
    fair = sum(served) / 4
    assert fair >= 5, served  # every stream made progress
    # Least-recently-served scheduling: no stream gets much more or less than its share of the engine's frames.
    assert all(0.8 * fair <= n <= 1.25 * fair for n in served), (served, fair)
    # Batching: one stream alone puts 2 rows (2 steps, cfg self) into a call; with four streams ready, most calls
    # carry several streams' rows (the engine ticks as soon as one stream is ready, so not all of them always).
    assert rows and sum(rows) / len(rows) >= 1.5 * 2, rows


def test_a_client_that_stops_reading_does_not_slow_the_others(live) -> None:
    server = live(limits=ServerLimits(max_input_fps=1000, write_timeout_s=120, send_buffer_bytes=16 << 10))
    body = bodies(frames(1, 128))[0]
    noisy = bodies([(np.random.default_rng(1).random((128, 128, 3)) * 255).astype(np.uint8)], quality=95)[0]

    async def main() -> tuple[list[float], list[float]]:
        others = [await StreamClient.connect(server.url, settings(128, prompt=f"c{i}", seed=i)) for i in range(3)]
        stalled = await StreamClient.connect(server.url, settings(128, prompt="stalled"))
        reading, stopped = [], []
        for phase in range(4):  # interleaved: reading, stopped, reading, stopped
            start = time.perf_counter() + 1.0
            end = start + 4.0
            if phase % 2:
                stalled.ws.transport.pause_reading()  # stops reading but keeps sending, as fast as allowed

                async def blind() -> None:
                    while time.perf_counter() < end:
                        await stalled.send_frame(noisy)
                        await asyncio.sleep(1 / 60)

                tasks = [blind()]
            else:
                stalled.ws.transport.resume_reading()
                tasks = [drive(stalled, lambda i: body, until=end)]
            results = await asyncio.gather(*(drive(c, lambda i: body, until=end) for c in others), *tasks)
            rates = [r.rate(start, end) for r in results[:3]]
            (stopped if phase % 2 else reading).append(sum(rates))
        return reading, stopped

    reading, stopped = run(main(), timeout=120)
    assert statistics.mean(stopped) >= 0.9 * statistics.mean(reading), (reading, stopped)


@pytest.mark.slow
def test_latency_stays_flat_for_two_minutes_at_30_fps(live) -> None:
    server = live()
    body = bodies(frames(1, 256))[0]

    async def main() -> list[tuple[float, float, float]]:
        async with await StreamClient.connect(server.url, settings(256)) as client:
            start = time.perf_counter()
            result = await drive(client, lambda i: body, until=start + 120, window=3, fps=30)
        return [(t - start, o.latency_ms, o.timings.server_ms) for t, o in result.outputs]

    samples = run(main(), timeout=180)
    assert len(samples) > 300

    def p95(values: list[float]) -> float:
        return statistics.quantiles(values, n=20)[-1]

    first = [s for s in samples if 10 <= s[0] < 50]
    last = [s for s in samples if 80 <= s[0] <= 120]
    e2e = p95([s[1] for s in first]), p95([s[1] for s in last])
    server_side = p95([s[2] for s in first]), p95([s[2] for s in last])
    assert e2e[1] <= 1.5 * e2e[0] + 50, (e2e, server_side)  # no growth: nothing queues up
    assert server_side[1] <= 1.5 * server_side[0] + 50, (e2e, server_side)
    slope = statistics.linear_regression([s[0] for s in samples if s[0] >= 10], [s[1] for s in samples if s[0] >= 10])
    assert slope.slope < 1.0, slope  # less than 1 ms more latency per second of streaming
