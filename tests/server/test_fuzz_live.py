"""10,000 fuzzed control messages and 10,000 fuzzed binary frames against a LIVE ``streamdiff serve`` process.

The messages are the sans-I/O fuzz's (fuzz_messages.py: Hypothesis strategies for near-valid JSON and frames,
multiplied by seeded mutators), sent over real WebSockets to a real server process on the tiny model. Afterwards
the process is alive, logged no traceback, holds no more memory than a bounded margin over its warmed-up size,
and still serves a well-behaved client.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.request

import pytest
from fuzz_messages import _binary_batches, _text_batches
from hypothesis import HealthCheck, given, settings
from live import bodies, drive, frames
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State
from websockets.sync.client import connect

from streamdiff.client import StreamClient
from streamdiff.protocol.wire import is_valid_unicode
from streamdiff.testing.serve import ServeProcess

COUNT = 10_000
_SETTINGS = settings(max_examples=COUNT // 16 + 1, deadline=None, derandomize=True, database=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
WARM_UP = 2_000  # messages of a phase before its memory baseline (code paths, caches and pools warmed up)
PHASE_MARGIN = 16 << 20  # growth allowed within a phase after its warm-up (measured: < 3 MiB)
MEMORY_MARGIN = 64 << 20  # growth allowed in all (measured: ~25 MiB, the binary phase's decoders and frames)


class Fuzzer:
    """One WebSocket at a time to the live server; reopened (with a hello, mostly) whenever the server closes it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ws = None
        self.sent = self.connections = self.closes = 0
        self.codes: dict[str, int] = {}

    def open(self, hello: bool) -> None:
        for attempt in range(100):
            self.ws = connect(self.url, compression=None, max_size=None, max_queue=None, open_timeout=30).__enter__()
            self.connections += 1
            if not hello:
                return
            self.ws.send(json.dumps({"type": "hello", "version": 1, "settings": {"width": 64, "height": 64}}))
            answer = json.loads(self.ws.recv(timeout=30))
            if answer["type"] == "ready":
                return
            assert answer["code"] == "server_full", answer  # closed connections are still being cleaned up
            self.ws.close()
            time.sleep(0.05 * attempt)  # 1013 means: try again later (with backoff)
        raise AssertionError("the server stayed full")

    def send(self, message: str | bytes) -> None:
        """Deliver ``message`` on an open connection (a new one if the server closed the last)."""
        for _ in range(2):
            if self.ws is None:
                self.open(hello=self.connections % 25 != 24)  # now and then the await-hello paths too
            try:
                if isinstance(message, str):  # as raw UTF-8, lone surrogates and all (invalid text frames too)
                    self.ws.send(message.encode("utf-8", "surrogatepass"), text=True)
                else:
                    self.ws.send(message)
            except ConnectionClosed:
                self.closed()
                continue
            self.sent += 1
            if isinstance(message, str) and not is_valid_unicode(message):
                self.closed()  # the server's WebSocket layer fails the connection (1007): go on at once on a new one
            else:
                self.drain()
            return

    def drain(self) -> None:
        """Read what the server sent (so that it never has to wait for this client)."""
        try:
            while True:
                reply = self.ws.recv(timeout=0)
                if isinstance(reply, str):
                    code = json.loads(reply).get("code")
                    if code:
                        self.codes[code] = self.codes.get(code, 0) + 1
        except TimeoutError:
            if self.ws.state is not State.OPEN:  # the server started closing (it waits for no one: neither do we)
                self.closed()
        except ConnectionClosed:
            self.closed()

    def closed(self) -> None:
        """The server closed the connection: drop the socket at once (after a protocol failure both ends would
        otherwise wait for the other to close TCP, until the server's close timeout)."""
        try:
            self.ws.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.ws.socket.close()
        self.ws = None
        self.closes += 1


@pytest.mark.slow
def test_fuzzed_messages_against_a_live_server(tiny_model) -> None:
    args = ["--size", "64x64", "--max-width", "256", "--max-height", "256", "--max-input-fps", "100000",
            "--input-burst-frames", "100000", "--max-errors", "1000000", "--idle-timeout-s", "600",
            "--stats-interval", "0", "--max-streams", "8", "--max-connects-per-address-per-s", "10000",
            "--connect-burst-per-address", "10000"]  # the fuzzer reconnects after every close: messages under test
    with ServeProcess(*args) as server:
        fuzzer = Fuzzer(server.url)
        rss: list[int] = []  # every 1000 messages

        def feed(batch: list) -> None:
            for message in batch:
                fuzzer.send(message)
                if fuzzer.sent % 1000 == 0:
                    rss.append(server.rss_bytes())

        @_SETTINGS
        @given(_text_batches())
        def texts(batch: list[str]) -> None:
            feed(batch)

        @_SETTINGS
        @given(_binary_batches())
        def binaries(batch: list[bytes]) -> None:
            feed(batch)

        started = time.perf_counter()
        texts()
        text_sent, text_time = fuzzer.sent, time.perf_counter() - started
        binaries()
        print(f"texts {text_time:.1f} s, binaries {time.perf_counter() - started - text_time:.1f} s, "
              f"{fuzzer.connections} connections, codes {fuzzer.codes}")
        assert text_sent >= COUNT and fuzzer.sent - text_sent >= COUNT
        assert {"invalid_value", "unknown_field", "bad_json", "unsupported_format", "bad_image",
                "bad_frame_header", "image_too_large"} <= set(fuzzer.codes), fuzzer.codes
        if fuzzer.ws is not None:
            fuzzer.ws.close()
        rss.append(server.rss_bytes())
        mib = [round(r / 2**20, 1) for r in rss]
        half = len(rss) // 2  # the text phase, then the binary phase: each levels off once warmed up
        for phase in (rss[:half], rss[half:]):
            assert phase[-1] - phase[WARM_UP // 1000] < PHASE_MARGIN, f"memory grows: {mib} MiB"
        assert rss[-1] - rss[0] < MEMORY_MARGIN, f"memory grows: {mib} MiB"
        assert server.process.poll() is None
        with urllib.request.urlopen(server.http_url + "/healthz", timeout=10) as reply:
            assert reply.status == 200

        async def well_behaved() -> int:
            body = bodies(frames(1))[0]
            async with await StreamClient.connect(server.url, {"width": 64, "height": 64}) as client:
                got = await drive(client, lambda i: body, until=time.perf_counter() + 60, stop_after=5)
                return len(got.outputs)

        assert asyncio.run(asyncio.wait_for(well_behaved(), 60)) >= 5
    log = "".join(server.log)
    assert server.returncode == 0, log[-3000:]
    assert "Traceback" not in log and "internal error" not in log
