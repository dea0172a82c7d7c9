"""streamdiff.server.app on real sockets: routes, limits and security, each against a live loopback server.

Every test starts a real server (the tiny model, the real engine) in a thread and talks to it over TCP with real
clients (streamdiff.client, the websockets library, raw sockets). Nothing of the server or the socket is mocked.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from live import SIZE, bodies, drive, frames, run, settings
from prometheus_client.parser import text_string_to_metric_families
from server_helpers import pattern, save
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from streamdiff.backends.torch_backend import TorchUNet
from streamdiff.client import ServerRefused, StreamClient, decode_output
from streamdiff.models.prompts import PromptEncoder
from streamdiff.protocol.limits import ServerLimits
from streamdiff.protocol.policy import OriginPolicy

JPEG = bodies(frames(1))[0]
BOMB = (b"\xff\xd8\xff\xc0\x00\x11\x08\xea\x60\xea\x60\x03" + b"\x01\x11\x00" * 3  # SOF declaring 60000 x 60000
        + b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00\xff\xd9")  # a scan, EOI: well-formed up to its size


def get(server, path: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(server.http_url + path, timeout=10) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def metrics(server) -> dict[tuple[str, tuple], float]:
    """The /metrics samples as {(name, sorted labels): value}, parsed by prometheus_client's own parser."""
    status, _, body = get(server, "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def settled_metrics(server, predicate, timeout: float = 10.0) -> dict:
    """/metrics once ``predicate(metrics)`` holds (the server finishes a closed session on its own loop)."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server)
        if predicate(m) or time.monotonic() > deadline:
            return m
        time.sleep(0.02)


async def refused(url: str, **kwargs) -> ServerRefused:
    with pytest.raises(ServerRefused) as info:
        await StreamClient.connect(url, settings(), **kwargs)
    return info.value


async def closed(client: StreamClient, timeout: float = 15.0) -> tuple[int | None, str | None]:
    await asyncio.wait_for(client.closed.wait(), timeout)
    return client.close_code, client.error.code if client.error else None


async def until_closed(ws) -> list:
    """Every message a raw websockets connection receives until it is closed (any close code)."""
    messages = []
    try:
        async for message in ws:
            messages.append(message)
    except ConnectionClosed:
        pass
    return messages


async def outputs(client: StreamClient, count: int, seconds: float = 20.0) -> list:
    """Stream until ``count`` outputs came back (window 3, as fast as allowed)."""
    result = await drive(client, lambda i: JPEG, until=time.perf_counter() + seconds, window=3, stop_after=count)
    assert len(result.outputs) >= count, (len(result.outputs), client.stats)
    return [o for _, o in result.outputs]


# -- HTTP ------------------------------------------------------------------------------------------------------------


def test_pages_health_readiness_metrics_and_nothing_else(live) -> None:
    server = live()
    status, headers, body = get(server, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b"<title>streamdiff" in body
    assert "connect-src 'self'" in headers["Content-Security-Policy"] and headers["X-Content-Type-Options"] == "nosniff"
    for path in ("/index.html", "/view.html", "/app.js", "/view.js", "/protocol.js", "/rtc.js", "/style.css"):
        assert get(server, path)[0] == 200, path
    assert get(server, "/healthz")[:3:2] == (200, b"ok\n")
    assert get(server, "/readyz")[:3:2] == (200, b"ready\n")
    assert get(server, "/metrics")[1]["Content-Type"].startswith("text/plain; version=")
    for path in ("/nope", "/web/app.js", "/..%2Fapp.py", "/app.py", "/ws/../app.js?x=1"):
        assert get(server, path)[0] == 404, path


def test_readyz_is_503_while_the_engine_does_not_run(tiny_model) -> None:
    from streamdiff.engine import EngineConfig, StreamEngine
    from streamdiff.server.app import BackgroundServer
    from streamdiff.server.hub import ServerConfig

    engine = StreamEngine(tiny_model, EngineConfig(max_streams=1))
    with BackgroundServer(engine, ServerConfig(port=0), own_engine=False) as server:
        assert get(server, "/readyz")[0] == 503 and get(server, "/healthz")[0] == 200


# -- who may connect -------------------------------------------------------------------------------------------------


def test_origin_allowlist_exact_match_and_loopback_pages(live) -> None:
    default, listed = live(), live(origins=OriginPolicy.of(["https://studio.example"], allow_loopback=False))

    async def main() -> None:
        error = await refused(default.url, origin="https://evil.example")
        assert (error.code, error.error.code) == (1008, "forbidden_origin")
        async with await StreamClient.connect(default.url, settings(), origin=default.http_url):
            pass
        async with await StreamClient.connect(listed.url, settings(), origin="https://studio.example"):
            pass
        for origin in ("https://studio.example:8443", "http://studio.example", listed.http_url, "null"):
            assert (await refused(listed.url, origin=origin)).code == 1008, origin
        async with await StreamClient.connect(listed.url, settings()):  # no Origin header: not a browser
            pass

    run(main())


def test_missing_or_wrong_token_is_refused_and_never_logged(live, caplog) -> None:
    token = "s3cret-Token-never-logged"
    server = live(token=token)
    caplog.set_level(logging.DEBUG)

    async def main() -> None:
        for given in (None, "wrong", token + "x", ""):
            error = await refused(server.url, token=given)
            assert (error.code, error.error.code, error.error.field) == (1008, "unauthorized", "token")
        async with await StreamClient.connect(server.url, settings(), token=token) as client:
            await outputs(client, 2)
        await asyncio.wait_for(_until(lambda: not server.hub.connections), 10)  # the server logged the close

    run(main())
    records = [r for r in caplog.records if r.name.startswith("streamdiff")]  # the server's (not the test client's)
    leaks = [(r.name, r.getMessage()) for r in records if token in r.getMessage()]
    assert leaks == []
    text = "\n".join(r.getMessage() for r in records)
    assert "connected from 127.0.0.1" in text and "closed: 1000 (by the client)" in text
    assert text.count("refused: 1008") == 4


def test_server_full_is_1013_and_the_running_streams_keep_running(live) -> None:
    server = live(max_streams=2)

    async def main() -> None:
        a = await StreamClient.connect(server.url, settings(prompt="a"))
        b = await StreamClient.connect(server.url, settings(prompt="b"))
        await asyncio.gather(outputs(a, 2), outputs(b, 2))
        error = await refused(server.url)
        assert (error.code, error.error.code) == (1013, "server_full")
        got = await asyncio.gather(outputs(a, 5), outputs(b, 5))  # never dropped
        assert all(len(g) >= 5 for g in got)
        await b.close()
        async with await StreamClient.connect(server.url, settings()) as c:  # a slot is free again
            await outputs(c, 1)
        await a.close()

    run(main())


def test_compression_is_refused(live) -> None:
    server = live()

    async def main() -> None:
        async with await StreamClient.connect(server.url, settings(), compression="deflate") as client:
            assert client.ws.response.headers.get("Sec-WebSocket-Extensions") is None
            assert client.ws.protocol.extensions == []

    run(main())


# -- sizes and time --------------------------------------------------------------------------------------------------


def test_oversize_messages_are_1009_and_bad_utf8_1007_with_coded_reasons(live) -> None:
    """Also the closes the WebSocket library starts itself give the documented "<error code>: <message>" reason."""
    server = live(limits=ServerLimits(max_message_bytes=64 << 10, max_text_bytes=8 << 10))

    async def main() -> None:
        client = await StreamClient.connect(server.url, settings())
        await client.ws.send(b"SDFI" + b"\0" * (100 << 10))  # over max_size: the library closes before reading it
        assert await closed(client) == (1009, None)
        assert client.close_reason == f"message_too_big: frame with {(100 << 10) + 4} bytes exceeds limit of " \
                                      f"{64 << 10} bytes"  # the documented "<error code>: <message>"
        client = await StreamClient.connect(server.url, settings())
        await client.ws.send(json.dumps({"type": "update", "settings": {"prompt": "x" * (10 << 10)}}))
        assert await closed(client) == (1009, "message_too_big")
        client = await StreamClient.connect(server.url, settings())
        await client.ws.send(b'{"type": "update", "settings": {"prompt": "\xff"}}', text=True)  # not UTF-8
        assert await closed(client) == (1007, None)
        assert client.close_reason.startswith("bad_json: ")

    run(main())


def test_slowloris_handshake_is_cut_off(live) -> None:
    server = live(limits=ServerLimits(handshake_timeout_s=1.0))
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    start = time.monotonic()
    lines = [b"GET /ws HTTP/1.1\r\n", b"Host: 127.0.0.1\r\n", b"Upgrade: websocket\r\n", b"Connection: Upgrade\r\n"]
    ended = None
    try:
        for i in range(40):  # one header line every 0.2 s, never the blank line that ends the request
            sock.sendall(lines[i] if i < len(lines) else f"X-Slow-{i}: 1\r\n".encode())
            sock.settimeout(0.2)
            try:
                if sock.recv(1024) == b"":
                    ended = time.monotonic() - start
                    break
            except socket.timeout:
                continue
    except OSError:  # reset by the server
        ended = time.monotonic() - start
    finally:
        sock.close()
    assert ended is not None and 0.9 <= ended <= 5.0, ended


def test_hello_timeout_and_idle_timeout(live) -> None:
    server = live(limits=ServerLimits(hello_timeout_s=0.5, idle_timeout_s=1.0))

    async def main() -> None:
        async with connect(server.url) as ws:  # never says hello
            start = time.monotonic()
            error = json.loads(await ws.recv())
            assert (error["code"], error["fatal"]) == ("hello_timeout", True)
            await ws.wait_closed()
            assert ws.close_code == 1008 and 0.4 <= time.monotonic() - start <= 3
        idle = await StreamClient.connect(server.url, settings())
        busy = await StreamClient.connect(server.url, settings())
        result = await drive(busy, lambda i: JPEG, until=time.perf_counter() + 2.5, fps=4)
        assert await closed(idle, 5) == (1001, "idle_timeout")
        assert not busy.closed.is_set() and len(result.outputs) > 3
        await busy.close()

    run(main())


# -- misbehaving clients ---------------------------------------------------------------------------------------------


def test_a_flood_stays_latest_wins_bounded_and_counted(live) -> None:
    server = live(limits=ServerLimits(max_input_fps=100_000, input_burst_frames=100_000), stats_interval_s=0.2)
    depths: list[tuple[int, int]] = []

    async def watch(stop: threading.Event) -> None:  # on the server's loop: sample the queues while flooded
        while not stop.is_set():
            for session in list(server.hub.sessions.values()):
                depths.append(session.queue_depths())
            await asyncio.sleep(0.001)

    async def main() -> None:
        stop = threading.Event()
        watcher = threading.Thread(target=server.call, args=(lambda: watch(stop), 120))
        async with await StreamClient.connect(server.url, settings()) as client:
            watcher.start()
            for i in range(400):
                await client.send_frame(JPEG, frame_id=i)
            await client.wait_for(lambda: client.stats.get("frames_received") == 400 and client.stats[
                "frames_taken"] + client.stats["frames_dropped"] == 400, timeout=30)
            stop.set()
            assert client.stats["frames_dropped"] > 100 and client.stats["frames_rate_limited"] == 0
            client.outputs.clear()
            late = [o.timings.server_ms for o in await outputs(client, 3)]
            assert max(late) < 1000, late  # nothing queued behind the flood: the newest frame is what runs
        watcher.join()

    run(main())
    assert len(depths) >= 10
    assert max(d[0] for d in depths) <= 1 and max(d[1] for d in depths) <= 1  # F = 1


def test_a_client_that_stops_reading_is_dropped_and_the_others_go_on(live) -> None:
    server = live(limits=ServerLimits(write_timeout_s=1.5, send_buffer_bytes=16 << 10, max_input_fps=60))
    noisy = [save((np.random.default_rng(i).random((128, 128, 3)) * 255).astype(np.uint8), "JPEG", quality=95)
             for i in range(4)]

    async def stuck_client() -> float:
        async with connect(server.url, max_queue=1, ping_interval=None) as ws:
            await ws.send(json.dumps({"type": "hello", "version": 1, "settings": settings(128)}))
            assert json.loads(await ws.recv())["type"] == "ready"
            ws.transport.pause_reading()  # stops reading for good: the server's sends back up
            start = time.monotonic()
            try:
                for i in range(2000):
                    await ws.send(b"SDFI\x01\0\0\0" + i.to_bytes(4, "big") + b"\0" * 8 + noisy[i % 4])
                    await asyncio.sleep(1 / 30)
            except Exception:  # noqa: BLE001 - the server dropped us: sending fails
                return time.monotonic() - start
            return -1.0

    async def main() -> None:
        good = await StreamClient.connect(server.url, settings())
        stuck = asyncio.ensure_future(stuck_client())
        result = await drive(good, lambda i: JPEG, until=time.perf_counter() + 40, window=3, stop_when=stuck.done)
        dropped_after = await stuck
        assert 1.5 <= dropped_after <= 30, dropped_after
        assert not good.closed.is_set() and len(result.outputs) > 20
        more = await outputs(good, 5)
        assert len(more) >= 5
        await good.close()

    run(main(), timeout=90)
    m = settled_metrics(server, lambda m: m.get(("streamdiff_closes_total", (("code", "1006"),)), 0) >= 1)
    assert m[("streamdiff_closes_total", (("code", "1006"),))] >= 1
    assert m[("streamdiff_frames_dropped_total", (("reason", "congested"),))] > 0


def test_a_dead_peer_is_cleaned_up(live) -> None:
    server = live(limits=ServerLimits(max_streams=1, ping_interval_s=0.3, ping_timeout_s=0.5, close_timeout_s=1))

    async def free_slot() -> None:
        await asyncio.wait_for(_until(lambda: not server.hub.sessions and not server.hub.engine.streams), 10)

    async def main() -> None:
        gone = await StreamClient.connect(server.url, settings())  # vanishes without a close frame
        await outputs(gone, 2)
        gone.ws.transport.abort()
        await free_slot()
        silent = await StreamClient.connect(server.url, settings())  # stops reading, answers no ping
        await outputs(silent, 2)
        silent.ws.transport.pause_reading()
        await free_slot()
        async with await StreamClient.connect(server.url, settings()) as client:  # the slot is free again
            await outputs(client, 2)

    run(main())
    m = settled_metrics(server, lambda m: m.get(("streamdiff_closes_total", (("code", "1000"),))) == 1)
    assert m[("streamdiff_streams_active", ())] == 0
    assert m[("streamdiff_closes_total", (("code", "1006"),))] == 1  # the vanished one: no close frame at all
    assert m[("streamdiff_closes_total", (("code", "1011"),))] == 1  # the silent one: no pong (keepalive timeout)


async def _until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.02)  # polls another thread's state (the server's); bounded by the caller's timeout


def test_graceful_shutdown_says_1001_to_everyone_and_drains_the_engine(live) -> None:
    server = live()

    async def main() -> None:
        a = await StreamClient.connect(server.url, settings(), view_token="V" * 16)
        b = await StreamClient.connect(server.url, settings())
        await asyncio.gather(outputs(a, 2), outputs(b, 2))
        viewer = await connect(server.url.replace("/ws", "/ws/view/" + "V" * 16))
        quiet = await connect(server.url)  # connected, no hello yet
        stopping = asyncio.get_running_loop().run_in_executor(None, server.stop)
        for client in (a, b):
            assert await closed(client) == (1001, "shutting_down")
        for ws in (viewer, quiet):
            messages = await until_closed(ws)
            assert json.loads(messages[-1])["code"] == "shutting_down" and ws.close_code == 1001
        await stopping

    run(main())
    assert not server.server.engine.running and server.server.engine.streams == []


# -- frames ----------------------------------------------------------------------------------------------------------


def test_a_decompression_bomb_is_rejected_before_any_decoder_sees_it(live, monkeypatch) -> None:
    from PIL import Image

    decoded: list[int] = []  # the bodies Pillow was asked to open
    real = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: decoded.append(len(fp.getvalue())) or real(fp, *a, **k))
    server = live()

    async def main() -> None:
        async with await StreamClient.connect(server.url, settings()) as client:
            await client.send_frame(BOMB, frame_id=7)
            await client.wait_for(lambda: client.errors, timeout=10)
            error = client.errors[0]
            assert (error.code, error.frame_id, error.value) == ("image_too_large", 7, "60000x60000")
            assert decoded == []
            await outputs(client, 2)
            assert decoded and BOMB.__len__() not in decoded

    run(main())


@pytest.mark.parametrize("body,code", [
    (JPEG[: len(JPEG) // 2], "bad_image"),
    (b"\x00garbage, not an image at all", "unsupported_format"),
    (save(pattern(), "PNG"), "unsupported_format"),
    (save(pattern(), "GIF"), "unsupported_format"),
    (save(pattern(), "TIFF"), "unsupported_format"),
    (save(pattern(), "BMP"), "unsupported_format"),
], ids=["truncated", "garbage", "png", "gif", "tiff", "bmp"])
def test_bad_bodies_get_an_error_and_the_stream_goes_on(live, body: bytes, code: str) -> None:
    server = live()

    async def main() -> None:
        async with await StreamClient.connect(server.url, settings()) as client:
            await client.send_frame(body, frame_id=3)
            await client.wait_for(lambda: client.errors, timeout=10)
            assert (client.errors[0].code, client.errors[0].frame_id, client.errors[0].fatal) == (code, 3, False)
            await outputs(client, 2)

    run(main())


def test_a_persistent_offender_is_closed_and_nobody_else_notices(live) -> None:
    server = live()

    async def main() -> None:
        good = await StreamClient.connect(server.url, settings(prompt="good"))
        bad = await StreamClient.connect(server.url, settings(prompt="bad"))
        before = await outputs(good, 3)
        for i in range(11):  # within the frame rate (frames over it are dropped silently, not errors)
            await bad.send_frame(b"\x00garbage", frame_id=i)
            await asyncio.sleep(0.05)
        assert await closed(bad) == (1008, "error_budget_exhausted")
        after = await outputs(good, 3)
        assert before and after and good.error is None and not good.errors
        await good.close()

    run(main())


def test_frames_of_any_size_are_resized_to_the_stream(live) -> None:
    server = live()

    async def main() -> None:
        async with await StreamClient.connect(server.url, settings()) as client:
            for shape in ((60, 100), (1080, 1920), (16, 24)):
                client.outputs.clear()
                body = save(pattern(shape[1], shape[0]), "JPEG")
                got = await drive(client, lambda i: body, until=time.perf_counter() + 20, stop_after=2)
                assert decode_output(got.outputs[-1][1]).shape == (SIZE, SIZE, 3), shape

    run(main())


# -- the engine has the last word -------------------------------------------------------------------------------------


def test_settings_the_engine_cannot_run_are_refused_naming_the_field(live) -> None:
    server = live(max_batch_rows=2)

    async def main() -> None:
        with pytest.raises(ServerRefused) as info:
            await StreamClient.connect(server.url, settings(t_index_list=[10, 20, 30]))
        assert (info.value.code, info.value.error.code) == (1008, "not_allowed")
        assert "max_batch_rows=2" in info.value.error.message
        async with await StreamClient.connect(server.url, settings()) as client:
            with pytest.raises(Exception) as failed:
                await client.update(t_index_list=[10, 20, 30])
            error = failed.value.error
            assert (error.code, error.field, error.fatal) == ("not_allowed", "settings.t_index_list", False)
            assert client.settings.stream.t_index_list == (32, 45)
            ack = await client.update(prompt="still here")
            assert ack.settings.stream.t_index_list == (32, 45) and ack.settings.prompt.prompt == "still here"
            await outputs(client, 2)

    run(main())


class FailOnPrompt:
    """The real U-Net, failing whenever a row is conditioned on one given prompt embedding."""

    def __init__(self, unet, embedding: torch.Tensor) -> None:
        self.unet, self.embedding = unet, embedding

    def __call__(self, sample, timestep, encoder_hidden_states):
        if any(torch.equal(row, self.embedding[0]) for row in encoder_hidden_states):
            raise RuntimeError("boom")
        return self.unet(sample, timestep, encoder_hidden_states)


def test_an_engine_error_ends_only_that_stream_with_1011(live, tiny_model) -> None:
    boom = PromptEncoder(tiny_model.tokenizer, tiny_model.text_encoder).encode("boom")
    server = live(unet=FailOnPrompt(TorchUNet(tiny_model.unet), boom))

    async def main() -> None:
        calm = await StreamClient.connect(server.url, settings(prompt="calm"))
        await outputs(calm, 2)
        doomed = await StreamClient.connect(server.url, settings(prompt="boom"))
        await drive(doomed, lambda i: JPEG, until=time.perf_counter() + 15, stop_when=doomed.closed.is_set)
        assert await closed(doomed) == (1011, "internal_error")
        await outputs(calm, 5)
        await calm.close()

    run(main())


# -- viewers ---------------------------------------------------------------------------------------------------------


def test_viewers_get_the_streams_own_frames(live) -> None:
    server = live(limits=ServerLimits(max_viewers_per_stream=1))
    token = "ViewToken_0123456789"

    async def main() -> None:
        client = await StreamClient.connect(server.url, settings(), view_token=token)
        assert client.ready.view_token == token and client.ready.view_url == f"/view.html?view={token}"
        view_url = server.url.replace("/ws", f"/ws/view/{token}")
        async with connect(view_url) as viewer:
            viewing = json.loads(await viewer.recv())
            assert viewing == {"type": "viewing", "version": 1, "stream_id": client.ready.stream_id,
                               "width": SIZE, "height": SIZE}
            async with connect(view_url) as second:  # one viewer per stream here
                assert json.loads(await second.recv())["code"] == "server_full"
                await second.wait_closed()
                assert second.close_code == 1013
            got = await drive(client, lambda i: JPEG, until=time.perf_counter() + 20, stop_after=6)
            seen = [await asyncio.wait_for(viewer.recv(), 10) for _ in range(3)]
            sent = {o.frame_id: o.body for _, o in got.outputs}
            for message in seen:  # the same bytes as the client got (header included)
                frame = client.conn.receive_bytes(message)
                assert frame.body == sent[frame.frame_id]
            await client.close()
            messages = await until_closed(viewer)
            assert json.loads(messages[-1])["code"] == "stream_ended" and viewer.close_code == 1000
        async with connect(server.url.replace("/ws", "/ws/view/" + "x" * 20)) as unknown:
            assert json.loads(await unknown.recv())["code"] == "unknown_view_token"
            await unknown.wait_closed()
            assert unknown.close_code == 1008

    run(main())


def test_a_view_token_in_use_is_refused_with_its_code(live) -> None:
    """A hello asking for another stream's view token is refused (view_token_in_use, 1013: it may be the client's own
    previous connection, closing); the token holder streams on; once it has left, the token is free again."""
    server = live()
    token = "InUse_0123456789abcdef"

    async def main() -> None:
        first = await StreamClient.connect(server.url, settings(), view_token=token)
        error = await refused(server.url, view_token=token)
        assert (error.code, error.error.code, error.error.field) == (1013, "view_token_in_use", None)
        assert error.error.fatal and token not in error.error.message
        other = await StreamClient.connect(server.url, settings())  # none asked for: the server picks one
        assert other.ready.view_token not in (None, token)
        assert len(await outputs(first, 2)) >= 2 and first.ready.view_token == token
        await first.close()
        await asyncio.wait_for(first.closed.wait(), 10)
        deadline = time.monotonic() + 10
        while True:  # the server unregisters the closed stream on its own loop
            try:
                again = await StreamClient.connect(server.url, settings(), view_token=token)
                break
            except ServerRefused as refusal:
                assert refusal.error.code == "view_token_in_use" and time.monotonic() < deadline
                await asyncio.sleep(0.05)
        assert again.ready.view_token == token
        await again.close()
        await other.close()

    run(main())


def test_a_viewer_that_talks_is_closed_1003(live) -> None:
    server = live()

    async def main() -> None:
        async with await StreamClient.connect(server.url, settings(), view_token="T" * 16):
            async with connect(server.url.replace("/ws", "/ws/view/" + "T" * 16)) as viewer:
                await viewer.recv()
                await viewer.send("hello?")
                messages = await until_closed(viewer)
                assert json.loads(messages[-1])["code"] == "view_only" and viewer.close_code == 1003

    run(main())


# -- metrics ---------------------------------------------------------------------------------------------------------


def test_metrics_parse_and_count_what_the_client_sent(live) -> None:
    server = live(limits=ServerLimits(max_input_fps=1000, input_burst_frames=1000))
    bad = [save(pattern(), "PNG"), b"\x00garbage", JPEG[:100]]

    async def main() -> int:
        async with await StreamClient.connect(server.url, settings()) as client:
            got = await drive(client, lambda i: JPEG, until=time.perf_counter() + 30, stop_after=12, window=2)
            for i, body in enumerate(bad):  # one by one: a bad frame is refused by the decode (latest-wins)
                await client.send_frame(body, frame_id=1000 + i)
                await client.wait_for(lambda i=i: len(client.errors) == i + 1, timeout=10)
            await client.ws.send(b"XXXX" + b"\0" * 30)  # bad header
            await client.wait_for(lambda: len(client.errors) == 4, timeout=10)
            live_metrics = metrics(server)
            assert live_metrics[("streamdiff_streams_active", ())] == 1
            return got.sent, len(got.outputs) + len(client.outputs)

    sent, received = run(main())
    m = settled_metrics(server, lambda m: m.get(("streamdiff_closes_total", (("code", "1000"),))) == 1)
    assert m[("streamdiff_streams_active", ())] == 0
    assert m[("streamdiff_connections_total", (("route", "stream"),))] == 1
    assert m[("streamdiff_frames_received_total", ())] == sent + len(bad)
    assert m[("streamdiff_frames_dropped_total", (("reason", "rejected"),))] == len(bad) + 1  # and the bad header
    assert m[("streamdiff_frames_dropped_total", (("reason", "rate_limited"),))] == 0
    assert m[("streamdiff_errors_total", (("code", "unsupported_format"),))] == 2
    assert m[("streamdiff_errors_total", (("code", "bad_image"),))] == 1
    assert m[("streamdiff_errors_total", (("code", "bad_frame_header"),))] == 1
    assert m[("streamdiff_frames_out_total", ())] == received
    taken, superseded = m[("streamdiff_frames_in_total", ())], m[("streamdiff_frames_dropped_total",
                                                                   (("reason", "superseded"),))]
    assert taken + superseded == sent and taken >= received
    assert m[("streamdiff_latency_seconds_count", (("stage", "server"),))] == received
    assert m[("streamdiff_closes_total", (("code", "1000"),))] == 1
    calls = m[("streamdiff_engine_unet_calls_total", ())]
    assert calls >= received and m[("streamdiff_unet_batch_rows_count", ())] == calls
    assert m[("streamdiff_engine_unet_rows_total", ())] == 2 * calls  # one stream, cfg self, 2 steps: 2 rows
