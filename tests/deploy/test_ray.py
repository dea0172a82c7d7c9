"""The Ray Serve fleet, live: a local Ray cluster started here, two CPU replicas of the tiny model, real WebSocket
clients over loopback. One cluster for the module (~30 s to start); the tests run in order, the failover and the
shutdown last. Every wait has a deadline; the cluster is shut down even when a test fails."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")

from streamdiff.client import ServerRefused, StreamClient  # noqa: E402
from streamdiff.deploy.routing import replica_of_stream  # noqa: E402
from streamdiff.client.reconnect import ReconnectingClient  # noqa: E402
from streamdiff.testing.ray_fleet import local_fleet  # noqa: E402

pytestmark = pytest.mark.slow

SIZE = 64
MAX_STREAMS = 2
APP = "streamdiff-test"



@pytest.fixture(scope="module")
def fleet(cache_dir: Any) -> Any:
    """Ray (4 logical CPUs, a 300 MB object store), Serve on a free port, the app of 2 replicas."""
    with local_fleet({"model": "tiny", "size": SIZE, "max_streams": MAX_STREAMS, "stats_interval": 0.5},
                     APP) as port:
        yield f"ws://127.0.0.1:{port}/ws"


def replica_tags(app: str = APP) -> list[str]:
    prefix = f"SERVE_REPLICA::{app}#"
    return sorted(n["name"].rsplit("#", 1)[1] for n in ray.util.list_named_actors(all_namespaces=True)
                  if n["name"].startswith(prefix))


def replica_metrics(fleet: str, replica: str) -> tuple[str, str]:
    """``/metrics`` of one replica through the fleet's endpoint (the X-Streamdiff-Replica header pins it)."""
    base = fleet.replace("ws://", "http://").removesuffix("/ws")
    request = urllib.request.Request(base + "/metrics", headers={"X-Streamdiff-Replica": replica})
    with urllib.request.urlopen(request, timeout=10) as reply:
        return reply.headers["X-Streamdiff-Replica"], reply.read().decode()


@pytest.fixture(autouse=True)
def idle_fleet(fleet: str) -> None:
    """Start every test on an idle fleet: no stream left on any replica (closing ones take a moment to go)."""
    deadline = time.monotonic() + 10
    for replica in replica_tags():
        while True:
            answered, text = replica_metrics(fleet, replica)
            if answered != replica or "streamdiff_streams_active 0.0" in text:  # (not running: dead or starting)
                break
            assert time.monotonic() < deadline, f"replica {replica} still has streams"
            time.sleep(0.05)


def run(coro: Any, timeout: float = 60.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def frame(i: int, offset: int = 0) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    return np.stack([(xx + 8 * i + offset) % 256, (yy * 3 + offset) % 256, (xx * yy + 17 * i) % 256],
                    -1).astype(np.uint8)


class Pump:
    """Feeds one client a frame every 40 ms with ids from ``first_id`` up and records what comes back."""

    def __init__(self, client: Any, first_id: int) -> None:
        self.client, self.next_id, self.first_id = client, first_id, first_id
        self.outputs: list[tuple[float, Any]] = []  # (arrival, OutputFrame)
        self._task: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None

    def start(self) -> Pump:
        self._task = asyncio.ensure_future(self._send())
        self._reader = asyncio.ensure_future(self._read())
        return self

    async def _send(self) -> None:
        while True:
            frame_id = self.next_id
            self.next_id += 1
            await self.client.send_frame(frame(frame_id), frame_id=frame_id, client_ts=float(frame_id))
            await asyncio.sleep(0.04)

    async def _read(self) -> None:
        while True:
            out = await self.client.next_output()
            if out is None:
                return
            self.outputs.append((time.monotonic(), out))

    async def wait_outputs(self, count: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.outputs) < count:
            assert time.monotonic() < deadline, f"{len(self.outputs)} outputs after {timeout} s, wanted {count}"
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        for task in (self._task, self._reader):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (self._task, self._reader) if t is not None), return_exceptions=True)


def tag(client: Any) -> str | None:
    return replica_of_stream(client.ready.stream_id)


async def connect(url: str, **options: Any) -> StreamClient:
    return await StreamClient.connect(url, {"width": SIZE, "height": SIZE}, **options)


def test_streams_spread_over_both_replicas_and_each_client_gets_only_its_frames(fleet: str) -> None:
    async def main() -> None:
        a, b = await connect(fleet), await connect(fleet)
        pumps = [Pump(a, 1000).start(), Pump(b, 5000).start()]
        try:
            assert tag(a) != tag(b), (a.ready.stream_id, b.ready.stream_id)
            for pump in pumps:
                await pump.wait_outputs(4)
            for pump in pumps:
                ids = [out.frame_id for _, out in pump.outputs]
                assert all(pump.first_id <= i < pump.next_id for i in ids), (pump.first_id, ids)
                assert all(out.client_ts == float(out.frame_id) for _, out in pump.outputs)
                assert ids == sorted(ids)
        finally:
            for pump in pumps:
                await pump.stop()
            await a.close()
            await b.close()

    run(main())


def test_the_ray_ingress_serves_the_page_health_and_metrics(fleet: str) -> None:
    base = fleet.replace("ws://", "http://").removesuffix("/ws")
    for path, expected in (("/healthz", b"ok"), ("/readyz", b"ready"), ("/", b"<!doctype html"),
                           ("/metrics", b"streamdiff_")):
        with urllib.request.urlopen(base + path, timeout=10) as reply:
            assert reply.status == 200
            assert reply.headers["X-Streamdiff-Replica"]
            assert expected in reply.read().lower()


def test_the_ray_ingress_is_streamdiff_serves_application(fleet: str) -> None:
    """The replicas answer with ``streamdiff serve``'s own application (:class:`ServerApp`): a plain GET of the
    stream socket is 426, another method 405, and an upgrade it refuses (a query string on ``/ws``) is answered 400."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    base = fleet.replace("ws://", "http://").removesuffix("/ws")
    for method, path, status in (("GET", "/ws", 426), ("DELETE", "/healthz", 405)):
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(urllib.request.Request(base + path, method=method), timeout=10)
        assert answer.value.code == status

    async def refused() -> int:
        with pytest.raises(InvalidStatus) as error:
            async with connect(fleet + "?x=1"):
                pass
        return error.value.response.status_code

    assert run(refused()) == 400  # a real HTTP answer: Serve's proxy passes ASGI's websocket.http.response on


def test_a_reconnect_with_its_stream_id_lands_on_the_same_replica(fleet: str) -> None:
    async def main() -> None:
        homes, placeholders = [], []
        try:
            for _ in range(2):  # a first stream on each replica (a new stream goes to the emptier one)
                first = await connect(fleet)
                previous, home = first.ready.stream_id, tag(first)
                assert home not in homes
                homes.append(home)
                await first.close()
                for _ in range(4):
                    again = await connect(fleet, session=previous)
                    try:
                        assert tag(again) == home, (previous, again.ready.stream_id)
                        previous = again.ready.stream_id
                    finally:
                        await again.close()
                placeholders.append(await connect(fleet, session=previous))  # keeps this replica the fuller one
                assert tag(placeholders[-1]) == home
        finally:
            for client in placeholders:
                await client.close()

    run(main())


def test_a_full_fleet_refuses_a_new_stream_with_1013_and_keeps_the_others_running(fleet: str) -> None:
    async def main() -> None:
        clients = [await connect(fleet) for _ in range(2 * MAX_STREAMS)]
        pumps = [Pump(c, 1000 * (i + 1)).start() for i, c in enumerate(clients)]
        try:
            tags = [tag(c) for c in clients]
            assert sorted(tags.count(t) for t in set(tags)) == [MAX_STREAMS, MAX_STREAMS], tags
            for pump in pumps:
                await pump.wait_outputs(2)
            start = time.monotonic()
            with pytest.raises(ServerRefused) as refused:
                await connect(fleet, open_timeout=5.0)
            assert refused.value.code == 1013
            assert refused.value.error is not None and refused.value.error.code == "server_full"
            assert time.monotonic() - start < 3.0
            counts = [len(p.outputs) for p in pumps]
            for pump, count in zip(pumps, counts):
                await pump.wait_outputs(count + 3)
            assert all(not c.closed.is_set() for c in clients)
        finally:
            for pump in pumps:
                await pump.stop()
            for client in clients:
                await client.close()

    run(main(), timeout=90)


def test_a_viewer_is_routed_to_the_replica_of_its_stream(fleet: str) -> None:
    from websockets.asyncio.client import connect as ws_connect

    view_url = fleet + "/view/"

    async def view_once(token: str) -> bool:
        async with ws_connect(view_url + token, open_timeout=10) as ws:
            first = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if first.get("type") != "viewing":
                return False
            return isinstance(await asyncio.wait_for(ws.recv(), 10), bytes)

    async def main() -> None:
        owners = [await connect(fleet, view_token=f"viewer-test-token-{i:04d}") for i in range(2)]
        pumps = [Pump(c, 1000 * (i + 1)).start() for i, c in enumerate(owners)]
        try:
            assert tag(owners[0]) != tag(owners[1])
            for owner in owners:
                token = owner.ready.view_token
                # the replicas report their view tokens with their load (every second or so, plus Serve's
                # broadcast): wait until five viewers in a row reach the stream (by luck: 1 in 32)
                deadline, streak = time.monotonic() + 20, 0
                while streak < 5:
                    assert time.monotonic() < deadline, "viewers do not reliably reach their stream's replica"
                    streak = streak + 1 if await view_once(token) else 0
        finally:
            for pump in pumps:
                await pump.stop()
            for owner in owners:
                await owner.close()

    run(main(), timeout=90)


def test_killing_a_replica_moves_its_clients_to_the_other_one_and_leaves_its_streams_alone(fleet: str) -> None:
    async def main() -> None:
        settings = {"width": SIZE, "height": SIZE, "prompt": "kept across reconnects", "seed": 7}
        a = await ReconnectingClient.connect(fleet, settings)
        b = await ReconnectingClient.connect(fleet, settings)
        pumps = [Pump(a, 1000).start(), Pump(b, 5000).start()]
        try:
            dead, survivor = replica_of_stream(a.stream_id), replica_of_stream(b.stream_id)
            assert dead != survivor
            await a.update(prompt="changed live", guidance_scale=1.5)
            for pump in pumps:
                await pump.wait_outputs(3)
            name = next(n["name"] for n in ray.util.list_named_actors(all_namespaces=True)
                        if n["name"].endswith(f"#{dead}"))
            killed = time.monotonic()
            ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
            while len(a.stream_ids) < 2:
                assert time.monotonic() - killed < 10, "no reconnect within 10 s"
                await asyncio.sleep(0.05)
            moved_at = len(pumps[0].outputs)
            await pumps[0].wait_outputs(moved_at + 2, timeout=10 - (time.monotonic() - killed) + 2)
            assert time.monotonic() - killed < 12
            assert replica_of_stream(a.stream_id) == survivor, a.stream_ids
            assert a.settings["prompt"] == "changed live" and a.settings["guidance_scale"] == 1.5
            assert a.settings["seed"] == 7
            # the survivor's stream never stopped: one stream id, no gap between its outputs
            await asyncio.sleep(1.0)
            assert b.stream_ids == [b.stream_id] and b.reconnects == 0
            arrivals = [t for t, _ in pumps[1].outputs if t >= killed - 1.0]
            gaps = np.diff([killed - 1.0, *arrivals, time.monotonic()])
            assert gaps.max() < 3.0, gaps
        finally:
            for pump in pumps:
                await pump.stop()
            await a.close()
            await b.close()

    run(main(), timeout=90)


def test_the_app_shuts_down_cleanly_telling_its_clients(fleet: str) -> None:
    from ray import serve

    from streamdiff.deploy.launch import shutdown

    async def main() -> None:
        client = await connect(fleet)
        try:
            loop = asyncio.get_running_loop()
            start = time.monotonic()
            await loop.run_in_executor(None, shutdown, APP, 20.0)
            await asyncio.wait_for(client.closed.wait(), 5)
            assert client.close_code == 1001
            assert client.error is not None and client.error.code == "shutting_down"
            assert time.monotonic() - start < 25
        finally:
            await client.close()

    run(main(), timeout=60)
    assert APP not in serve.status().applications
