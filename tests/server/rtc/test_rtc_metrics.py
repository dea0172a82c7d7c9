"""/metrics counts WebRTC streams as it counts WebSocket streams: frames in and out, latency by stage (issue 15)."""

from __future__ import annotations

import asyncio

from aiohttp import ClientSession
from prometheus_client.parser import text_string_to_metric_families
from rtc_helpers import publish, serve, wait_for, watch

from streamdiff.protocol.limits import ServerLimits
from streamdiff.server.hub import ServerConfig

TOKEN = "metrics-token-for-tests"
QUERY = "?width=128&height=128&prompt=a%20watercolor&seed=7"


async def scrape(http: ClientSession, base: str) -> dict:
    async with http.get(f"{base}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        assert response.status == 200
        text = await response.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_a_sendrecv_peers_frames_are_counted_in_metrics_and_a_whep_viewers_are_not(tiny_model) -> None:
    """frames_out and the latency histograms count the frames the publisher's own track sends (as a WebSocket
    stream's socket), not those a WHEP viewer gets (as a WebSocket viewer's are not); the WHEP viewer counts in
    ``streamdiff_viewers_active`` while it watches."""

    async def main() -> None:
        config = ServerConfig(port=0, token=TOKEN, limits=ServerLimits(max_streams=2))
        async with serve(tiny_model, config) as served, ClientSession() as http:
            base = served.ws_url.replace("ws://", "http://").removesuffix("/ws")
            client = await publish(http, served.url, TOKEN, query=QUERY, sendrecv=True)
            assert client.status == 201, client.body
            viewer = await watch(http, served.url, client.headers["X-Streamdiff-View"])
            assert viewer.status == 201, viewer.body
            await wait_for(lambda: len(client.received.frames) >= 20 and len(viewer.received.frames) >= 20, 60,
                           "20 frames at the client and at the viewer")
            (session,) = served.hub.sessions.values()
            live = await scrape(http, base)
            assert live[("streamdiff_streams_active", ())] == 1
            assert live[("streamdiff_viewers_active", ())] == 1  # the WHEP viewer
            async with http.delete(served.url + client.location,
                                   headers={"Authorization": f"Bearer {TOKEN}"}) as response:
                assert response.status == 200
            received = len(client.received.frames)
            await client.close()
            await viewer.close()
            m = await scrape(http, base)
            out = m[("streamdiff_frames_out_total", ())]
            assert out == session.conn.stats.frames_out
            assert received <= out <= received + 8, (received, out)  # a few encoded, not delivered at the DELETE
            for stage in ("decode", "queue", "engine", "encode", "server"):
                assert m[("streamdiff_latency_seconds_count", (("stage", stage),))] == out, stage
            server_s = m[("streamdiff_latency_seconds_sum", (("stage", "server"),))] / out
            assert 0 < server_s < 2, server_s
            assert m[("streamdiff_frames_received_total", ())] == session.conn.stats.frames_received >= out
            assert m[("streamdiff_frames_in_total", ())] >= out
            assert m[("streamdiff_connections_total", (("route", "stream"),))] == 1
            assert m[("streamdiff_connections_total", (("route", "view"),))] == 1  # the WHEP viewer
            assert m[("streamdiff_streams_active", ())] == 0
            await wait_for(lambda: not served.hub.rtc_viewers, 30, "the WHEP viewer to be gone")
            assert (await scrape(http, base))[("streamdiff_viewers_active", ())] == 0

    asyncio.run(asyncio.wait_for(main(), 120))
