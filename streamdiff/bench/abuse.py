"""Hostile clients of ``streamdiff serve``, for the isolation benchmark (``tools/bench_abuse.py``) and live tests.

Every attack here is something a client may legally try, or a valid-looking input crafted to be expensive; each is
an ``async`` function ``attack(url, until) -> dict`` that keeps attacking until ``until`` (``time.perf_counter()``),
reconnecting when the server closes it (a persistent attacker), and returns what it saw (close codes, error codes,
refusals). Victims are good clients (:mod:`.clients`); :func:`watch_victims` records their outputs and
:func:`probe_health` the latency of ``/healthz``, so a benchmark compares each victim window with a baseline.

The hostile images (:func:`hostile_jpegs`) are made here from a real encoder's output:

- ``many_scans``: a progressive JPEG whose last scan is repeated until the file is ~1 MB (legal: a decoder applies
  each scan again); it decoded "fine" in ~24 s of CPU before the probe counted scans;
- ``fill_bytes``: 1 MB of 0xFF fill bytes before the first marker (legal padding);
- ``com_flood``: 250,000 empty COM segments after the frame header.
"""

from __future__ import annotations

import asyncio
import io
import os
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import numpy as np
from websockets.exceptions import WebSocketException

from ..client import ServerRefused, StreamClient
from ..io.sources import pattern_frame
from ..protocol.images import encode

__all__ = ["ATTACKS", "HealthProbe", "VictimLog", "hostile_jpegs", "probe_health", "process_usage", "watch_victims"]

Attack = Callable[[str, float], Awaitable[dict[str, Any]]]


# -- hostile images -------------------------------------------------------------------------------------------------


def _markers(data: bytes) -> list[tuple[int, int]]:
    """(offset, marker) of every segment marker of a JPEG made by Pillow, up to its first SOS and the scans after."""
    out, pos = [], 2
    while pos < len(data) - 1:
        if data[pos] != 0xFF:
            pos += 1
            continue
        marker = data[pos + 1]
        if marker in (0x00, 0xFF) or 0xD0 <= marker <= 0xD7:
            pos += 1 if marker == 0xFF else 2
            continue
        out.append((pos, marker))
        if marker == 0xD9:
            break
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return out


def progressive_with_repeated_scan(target_bytes: int = 1_000_000, size: int = 64) -> bytes:
    """A progressive JPEG of ``size``² whose last scan is repeated until the file is about ``target_bytes``."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pattern_frame(3, size, size)).save(out, "JPEG", quality=95, progressive=True)
    data = out.getvalue()
    scans = [pos for pos, marker in _markers(data) if marker == 0xDA]
    end = data.rindex(b"\xff\xd9")
    last = data[scans[-1]:end]
    repeat = max(1, (target_bytes - len(data)) // len(last))
    return data[:end] + last * repeat + data[end:]


def with_fill_bytes(count: int = 1_000_000, size: int = 64) -> bytes:
    """A baseline JPEG with ``count`` 0xFF fill bytes before its first marker after SOI (legal padding)."""
    data = encode(pattern_frame(5, size, size), "jpeg", 90)
    return data[:2] + b"\xff" * count + data[2:]


def with_comment_flood(count: int = 250_000, size: int = 64) -> bytes:
    """A baseline JPEG with ``count`` empty COM segments right after its frame header (SOF0)."""
    data = encode(pattern_frame(7, size, size), "jpeg", 90)
    sof = next(pos for pos, marker in _markers(data) if marker == 0xC0)
    after = sof + 2 + int.from_bytes(data[sof + 2:sof + 4], "big")
    return data[:after] + b"\xff\xfe\x00\x02" * count + data[after:]


def hostile_jpegs() -> dict[str, bytes]:
    """The crafted-but-valid JPEGs by name (each about 1 MB)."""
    return {"many_scans": progressive_with_repeated_scan(), "fill_bytes": with_fill_bytes(),
            "com_flood": with_comment_flood()}


async def attack_in_process(name: str, url: str, start: float, end: float, nice: int = 19) -> dict[str, Any]:
    """Run attack ``name`` from ``start`` to ``end`` (``time.perf_counter()``, the same clock in every process on
    Linux) in a child process at ``nice`` (the attacker's own CPU, like another machine's, must not be what slows
    the victims on a small host); its outcome, with ``started``/``ended`` (perf_counter). Start it early: the
    child's imports take a second or two."""
    import json
    import sys

    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamdiff.bench.abuse", name, url, repr(start), repr(end), str(nice),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"attacker {name} failed ({process.returncode}): {err.decode()[-2000:]}")
    return json.loads(out)


# -- attackers --------------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What an attacker saw: connections, closes by code, error messages by code, refusals at hello."""

    connections: int = 0
    closes: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)
    sent: int = 0
    outputs: int = 0

    def count(self, table: dict[str, int], key: Any) -> None:
        table[str(key)] = table.get(str(key), 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return {"connections": self.connections, "closes": self.closes, "errors": self.errors,
                "refused": self.refused, "sent": self.sent, "outputs": self.outputs}


async def _persist(url: str, until: float, settings: dict[str, Any], body: Callable[[StreamClient, Outcome],
                   Awaitable[None]], outcome: Outcome) -> None:
    """Connect with ``settings`` and run ``body`` until ``until``, reconnecting whenever the server closes us."""
    while time.perf_counter() < until:
        try:
            client = await StreamClient.connect(url, settings)
        except ServerRefused as refused:
            outcome.count(outcome.refused, _code(refused))
            await asyncio.sleep(0.2)
            continue
        except (OSError, asyncio.TimeoutError, WebSocketException) as error:
            outcome.count(outcome.refused, _code(error))
            await asyncio.sleep(0.2)
            continue
        outcome.connections += 1
        try:  # a send the server no longer reads (TCP pushing back) must not outlast the attack
            await asyncio.wait_for(body(client, outcome), max(0.01, until - time.perf_counter()))
        except asyncio.TimeoutError:
            pass
        except WebSocketException:  # the server closed us mid-send: counted below, then reconnect
            await asyncio.wait_for(client.closed.wait(), 5)
        finally:
            for error in client.errors:
                outcome.count(outcome.errors, error.code)
            outcome.outputs += len(client.outputs)
            if client.closed.is_set():
                outcome.count(outcome.closes, client.close_code)
            await _close(client)


def _code(error: BaseException) -> str:
    """The protocol's error code of a refusal or a failed request (else the close code, else the type)."""
    server_error = getattr(error, "error", None)
    if server_error is not None and getattr(server_error, "code", None):
        return str(server_error.code)
    response = getattr(error, "response", None)  # an HTTP refusal of the upgrade (503 when over a limit)
    if response is not None:
        return str(response.status_code)
    return str(getattr(error, "code", None) or type(error).__name__)


async def _close(client: StreamClient) -> None:
    """Close, or drop the connection when the closing handshake cannot get through a full socket within 1 s."""
    try:
        await asyncio.wait_for(client.close(), 1.0)
    except (asyncio.TimeoutError, WebSocketException):
        client.ws.transport.abort()


def _until(until: float) -> Callable[[StreamClient], bool]:
    return lambda client: time.perf_counter() >= until or client.closed.is_set()


async def _repeat(url: str, until: float, prompt: str, message: Callable[[StreamClient], str | bytes],
                  pause: float = 0.0, every: int = 1) -> dict[str, Any]:
    """A persistent attacker sending ``message(client)`` again and again until ``until``: ``pause`` seconds after
    every ``every`` messages (0: only a turn of the event loop, as fast as the socket takes them)."""
    outcome = Outcome()

    async def send(client: StreamClient, seen: Outcome) -> None:
        done = _until(until)
        while not done(client):
            await client.ws.send(message(client))
            seen.sent += 1
            if seen.sent % every == 0:
                await asyncio.sleep(pause)

    await _persist(url, until, {"width": 128, "height": 128, "prompt": prompt}, send, outcome)
    return outcome.as_dict()


def _image_attack(name: str) -> Attack:
    async def attack(url: str, until: float) -> dict[str, Any]:
        body = hostile_jpegs()[name]
        return await _repeat(url, until, name, lambda client: client.conn.frame(body), pause=0.02)

    attack.__name__ = name
    return attack


async def update_flood(url: str, until: float) -> dict[str, Any]:
    """Valid no-op updates (the same prompt again) as fast as the socket takes them."""
    return await _repeat(url, until, "flood", lambda client: client.conn.update(prompt="flood")[1], every=64)


async def frame_flood(url: str, until: float) -> dict[str, Any]:
    """Valid small frames as fast as the socket takes them (far above ``max_input_fps``)."""
    body = encode(pattern_frame(1, 128, 128), "jpeg", 80)
    return await _repeat(url, until, "frames", lambda client: client.conn.frame(body), every=16)


POISON_SIZES = ((256, 256), (128, 128), (256, 256), (200, 200), (80, 80), (256, 256))


async def odd_sizes(url: str, until: float) -> dict[str, Any]:
    """The sequence that once poisoned the shared engine (256, 128, 256, then 200 and 80, then 256), at hello and
    as live updates, each with a frame; records which sizes were refused and whether 256² still gives frames."""
    outcome = Outcome()
    frames = {size: encode(pattern_frame(2, *size), "jpeg", 85) for size in set(POISON_SIZES)}
    served: dict[str, int] = {}
    first = True
    while first or time.perf_counter() < until:  # the whole sequence at least once
        first = False
        for width, height in POISON_SIZES:
            got = await _one_frame(url, {"width": width, "height": height, "prompt": "odd"}, frames[width, height],
                                   outcome)
            served[f"{width}x{height}"] = served.get(f"{width}x{height}", 0) + got
        try:
            client = await StreamClient.connect(url, {"width": 128, "height": 128, "prompt": "odd update"})
        except (ServerRefused, OSError, asyncio.TimeoutError, WebSocketException) as refused:
            outcome.count(outcome.refused, _code(refused))
            continue
        outcome.connections += 1
        for width, height in ((200, 200), (80, 80)):
            try:
                await client.update(width=width, height=height)
            except Exception as error:  # noqa: BLE001 - RequestFailed carries the server's error
                outcome.count(outcome.errors, _code(error))
        await client.close()
    return {**outcome.as_dict(), "frames_by_size": served}


async def _one_frame(url: str, settings: dict[str, Any], body: bytes, outcome: Outcome, timeout: float = 10.0
                     ) -> int:
    """Open a stream (after a 503, again once per ``Retry-After`` second, as a client should), send frames until
    one output arrives (1) or the stream ends or times out (0)."""
    deadline = time.perf_counter() + timeout
    while True:
        try:
            client = await StreamClient.connect(url, settings)
            break
        except (ServerRefused, OSError, asyncio.TimeoutError, WebSocketException) as refused:
            outcome.count(outcome.refused, _code(refused))
            if _code(refused) != "503" or time.perf_counter() >= deadline:
                return 0
            await asyncio.sleep(1.0)
    outcome.connections += 1
    try:
        while not client.outputs and not client.closed.is_set() and time.perf_counter() < deadline:
            try:
                await client.send_frame(body)
            except WebSocketException:  # closed by the server (counted below)
                await asyncio.wait_for(client.closed.wait(), 5)
                break
            outcome.sent += 1
            client.changed.clear()
            try:
                await asyncio.wait_for(client.changed.wait(), 0.3)
            except asyncio.TimeoutError:
                pass
        got = int(bool(client.outputs))
        if client.closed.is_set():
            outcome.count(outcome.closes, client.close_code)
        return got
    finally:
        await client.close()


def valid_sizes(count: int = 60, multiple: int = 32, smallest: int = 64, largest: int = 512) -> list[tuple[int, int]]:
    """``count`` distinct sizes, multiples of ``multiple``, small first (what a size-cycling client asks for)."""
    sides = range(smallest, largest + 1, multiple)
    sizes = sorted({(w, h) for w in sides for h in sides}, key=lambda s: (s[0] * s[1], s))
    return sizes[:count]


async def size_cycling(url: str, until: float, multiple: int = 32, count: int = 60) -> dict[str, Any]:
    """One stream per distinct valid size (``count`` of them), a frame each: memory must stay within the bound."""
    outcome = Outcome()
    served = 0
    for width, height in valid_sizes(count, multiple=multiple):
        if time.perf_counter() >= until:
            break
        body = encode(pattern_frame(4, width, height), "jpeg", 80)
        served += await _one_frame(url, {"width": width, "height": height, "prompt": "sizes"}, body, outcome)
    return {**outcome.as_dict(), "sizes_served": served}


async def silent_connections(url: str, until: float, count: int = 600) -> dict[str, Any]:
    """``count`` WebSocket connections that never send hello, held until ``until`` (or until the server ends them)."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    from ..protocol.wire import SUBPROTOCOL

    outcome = Outcome()
    sockets = []

    async def open_one() -> None:
        try:
            sockets.append(await connect(url, subprotocols=[SUBPROTOCOL], open_timeout=5))
            outcome.connections += 1
        except InvalidStatus as refused:
            outcome.count(outcome.refused, refused.response.status_code)
        except (OSError, asyncio.TimeoutError, WebSocketException) as error:
            outcome.count(outcome.refused, type(error).__name__)

    for start in range(0, count, 50):
        await asyncio.gather(*(open_one() for _ in range(start, min(count, start + 50))))
    while time.perf_counter() < until and any(s.close_code is None for s in sockets):
        await asyncio.sleep(0.2)
    for socket in sockets:
        if socket.close_code is not None:
            outcome.count(outcome.closes, socket.close_code)
    await asyncio.gather(*(s.close() for s in sockets), return_exceptions=True)
    return outcome.as_dict()


async def polite_stream(url: str, until: float) -> dict[str, Any]:
    """Not an attack: one more good client, streaming at another valid size (192²). The victims' loss under it is
    the engine's fair share going to one more stream: the yardstick for the attacks that use valid streams (odd
    sizes' valid steps, size cycling)."""
    from .clients import stream_until

    outcome = Outcome()
    bodies = [encode(pattern_frame(i, 192, 192), "jpeg", 85) for i in range(4)]

    async def stream(client: StreamClient, seen: Outcome) -> None:
        def count(_: Any) -> None:
            seen.outputs += 1

        seen.sent += await stream_until(client, bodies, until, count)

    await _persist(url, until, {"width": 192, "height": 192, "prompt": "polite"}, stream, outcome)
    return outcome.as_dict()


ATTACKS: dict[str, Attack] = {
    "polite_stream": polite_stream,
    "many_scans_jpeg": _image_attack("many_scans"),
    "fill_bytes_jpeg": _image_attack("fill_bytes"),
    "com_flood_jpeg": _image_attack("com_flood"),
    "update_flood": update_flood,
    "frame_flood": frame_flood,
    "odd_sizes": odd_sizes,
    "size_cycling": size_cycling,
    "silent_connections": silent_connections,
}


# -- victims and probes -----------------------------------------------------------------------------------------------


@dataclass
class VictimLog:
    """Outputs of the victims: (arrival perf_counter, end-to-end latency ms, victim index); closes seen."""

    outputs: list[tuple[float, float, int]] = field(default_factory=list)
    closes: list[tuple[int, Any]] = field(default_factory=list)

    def window(self, start: float, end: float, victims: int) -> dict[str, float]:
        """Per-victim mean output frames/s and the p95 end-to-end latency between ``start`` and ``end``."""
        if end <= start:
            return {"fps": float("nan"), "p95_ms": float("nan")}
        inside = [(t, ms) for t, ms, _ in self.outputs if start <= t < end]
        latencies = sorted(ms for _, ms in inside)
        p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] if latencies else float("nan")
        return {"fps": len(inside) / (end - start) / victims, "p95_ms": p95}


async def watch_victims(url: str, count: int, size: int, until: float, log: VictimLog) -> None:
    """``count`` good clients streaming until ``until``; each output is logged (a victim that is closed is logged
    and reconnects: it should never happen)."""
    from .clients import stream_until

    bodies = [encode(pattern_frame(i, size, size), "jpeg", 85) for i in range(8)]

    async def victim(index: int) -> None:
        while time.perf_counter() < until:
            client = await StreamClient.connect(url, {"width": size, "height": size, "prompt": f"victim {index}",
                                                      "seed": index})
            await stream_until(client, bodies, until, lambda out: log.outputs.append(
                (time.perf_counter(), out.latency_ms, index)))
            if client.closed.is_set():
                log.closes.append((index, client.close_code))
            await client.close()

    await asyncio.gather(*(victim(i) for i in range(count)))


@dataclass
class HealthProbe:
    """``/healthz`` round trips: (perf_counter, milliseconds, HTTP status or 0 for a failure)."""

    samples: list[tuple[float, float, int]] = field(default_factory=list)

    def p95(self, start: float, end: float) -> float:
        values = sorted(ms for t, ms, _ in self.samples if start <= t < end)
        return values[min(len(values) - 1, int(0.95 * len(values)))] if values else float("nan")


async def probe_health(host: str, port: int, until: float, probe: HealthProbe, interval: float = 0.1) -> None:
    """GET ``/healthz`` every ``interval`` s on a fresh connection until ``until``."""
    request = f"GET /healthz HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
    while time.perf_counter() < until:
        start = time.perf_counter()
        status = 0
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
            writer.write(request)
            line = await asyncio.wait_for(reader.readline(), 5)
            status = int(line.split()[1]) if line.startswith(b"HTTP/") else 0
            writer.close()
        except (OSError, asyncio.TimeoutError, ValueError, IndexError):
            pass
        probe.samples.append((start, (time.perf_counter() - start) * 1000, status))
        await asyncio.sleep(max(0.0, interval - (time.perf_counter() - start)))


def process_usage(pid: int) -> dict[str, int]:
    """A process's resident memory (bytes) and open file descriptors (Linux ``/proc``)."""
    with open(f"/proc/{pid}/status") as status:
        rss = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
    return {"rss_bytes": rss, "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def rng_frame(seed: int, size: int) -> np.ndarray:
    """A noisy frame (expensive to encode well): for clients that should cost the encoder."""
    return (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)


def _main(argv: list[str]) -> int:
    """``python -m streamdiff.bench.abuse ATTACK URL START END [NICE]``: wait for START, attack until END
    (perf_counter), print the outcome (JSON)."""
    import json

    name, url, start, end = argv[0], argv[1], float(argv[2]), float(argv[3])
    os.nice(int(argv[4]) if len(argv) > 4 else 0)
    time.sleep(max(0.0, start - time.perf_counter()))
    started = time.perf_counter()
    outcome = asyncio.run(ATTACKS[name](url, end))
    outcome["started"], outcome["ended"] = started, time.perf_counter()
    print(json.dumps(outcome))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_main(sys.argv[1:]))
