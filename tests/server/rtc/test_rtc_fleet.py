"""WHIP/WHEP through the Ray Serve fleet (issue 15 item 7), live: a local Ray cluster, two CPU replicas of the tiny
model (one stream each), real aiortc peers over loopback through the fleet's HTTP ingress. Signalling reaches a
replica with room (503 when the fleet is full); a resource's update and DELETE reach the replica that holds it (its
id names the replica); a WHEP viewer reaches the replica of its stream; the media flows straight to that replica's
node (``rtc_host``: 127.0.0.1 here). Lives beside the other WebRTC tests for their helpers; ~40 s."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiohttp import ClientSession
from rtc_helpers import publish, wait_for, watch

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")

from streamdiff.deploy.routing import replica_of_resource  # noqa: E402
from streamdiff.testing.ray_fleet import local_fleet  # noqa: E402

pytestmark = pytest.mark.slow

APP = "streamdiff-rtc-test"
TOKEN = "fleet-token-for-tests"


@pytest.fixture(scope="module")
def fleet(cache_dir: Any) -> Any:
    """Ray (4 logical CPUs, a 300 MB object store), Serve on a free port, 2 replicas of 1 stream each."""
    with local_fleet({"model": "tiny-random", "size": 64, "max_streams": 1, "token": TOKEN,
                      "rtc_host": ["127.0.0.1"]}, APP) as port:
        yield f"http://127.0.0.1:{port}"


def test_whip_and_whep_through_the_fleet_reach_the_right_replicas_and_a_full_fleet_is_503(fleet: str) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}

    async def main() -> None:
        async with ClientSession() as http:
            first = await publish(http, fleet, TOKEN, size=128)
            assert first.status == 201, first.body
            tag = first.headers["X-Streamdiff-Replica"]
            assert replica_of_resource(first.location.removeprefix("/whip/")) == tag
            assert "a=candidate:" in first.body and "127.0.0.1" in first.body  # the replica's node, rtc_host
            # Replicas report their view tokens with their load (each routing_stats_period_s): until the stream's
            # replica has, a WHEP POST may reach the other one (404, try again), as a viewer socket may.
            deadline = time.monotonic() + 20
            while True:
                viewer = await watch(http, fleet, first.headers["X-Streamdiff-View"])
                if viewer.status != 404 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert viewer.status == 201, viewer.body
            assert viewer.headers["X-Streamdiff-Replica"] == tag  # routed to the replica of its stream
            await wait_for(lambda: len(viewer.received.frames) >= 5, 60, "5 frames at the WHEP viewer")
            assert all(pts in first.track.sent for _, pts, _ in viewer.received.frames)

            second = await publish(http, fleet, TOKEN, size=128)
            assert second.status == 201, second.body
            assert second.headers["X-Streamdiff-Replica"] != tag  # the replica with room
            full = await publish(http, fleet, TOKEN, size=128)
            assert full.status == 503 and full.headers["Retry-After"] == "1", full.body

            for _ in range(5):  # the resource's requests reach the replica that holds it, every time
                async with http.post(f"{fleet}{first.location}/update", json={"settings": {"prompt": "neon"}},
                                     headers=auth) as response:
                    assert response.status == 200, await response.text()
                    assert response.headers["X-Streamdiff-Replica"] == tag
                    assert (await response.json())["type"] == "ack"
            async with http.delete(fleet + first.location, headers=auth) as response:
                assert response.status == 200 and response.headers["X-Streamdiff-Replica"] == tag
            await wait_for(lambda: viewer.pc.connectionState == "closed" or viewer.received.task.done(), 10,
                           "the viewer to see the end of its stream")
            # The freed slot: the router sees it free from the replica's next report; before, a publisher may be
            # told 503 + Retry-After: 1, and tries again (as OBS does).
            deadline = time.monotonic() + 20
            while True:
                again = await publish(http, fleet, TOKEN, size=128)
                if again.status != 503 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(float(again.headers["Retry-After"]))
            assert again.status == 201 and again.headers["X-Streamdiff-Replica"] == tag, again.body
            for client in (first, second, again):
                async with http.delete(fleet + client.location, headers=auth):
                    pass
                await client.close()
            await viewer.close()

    asyncio.run(asyncio.wait_for(main(), 150))
