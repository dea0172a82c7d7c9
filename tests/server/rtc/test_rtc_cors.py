"""CORS for browser WHIP/WHEP clients on other origins: preflight answered for the origins the server's
OriginPolicy allows (as for WebSocket Origin checks), refused for others (issue 15)."""

from __future__ import annotations

import asyncio

from aiohttp import ClientSession
from rtc_helpers import offer, publish, serve, watch
from aiortc import RTCConfiguration, RTCPeerConnection

from streamdiff.protocol.limits import ServerLimits
from streamdiff.protocol.policy import OriginPolicy
from streamdiff.server.hub import ServerConfig

TOKEN = "cors-token-for-tests"
QUERY = "?width=128&height=128"
STUDIO = "https://studio.example.com"


def config() -> ServerConfig:
    return ServerConfig(port=0, token=TOKEN, limits=ServerLimits(max_streams=2),
                        origins=OriginPolicy.of([STUDIO], allow_loopback=True))


def preflight(origin: str | None, method: str = "POST") -> dict[str, str]:
    headers = {"Access-Control-Request-Method": method, "Access-Control-Request-Headers": "authorization,content-type"}
    if origin is not None:
        headers["Origin"] = origin
    return headers


def test_preflight_is_answered_for_allowed_origins_only(tiny_model) -> None:
    async def main() -> None:
        async with serve(tiny_model, config()) as served, ClientSession() as http:
            for origin in (STUDIO, "http://127.0.0.1:8000"):  # listed; a loopback page
                async with http.options(served.url + "/whip", headers=preflight(origin)) as r:
                    assert r.status == 204, await r.text()
                    assert r.headers["Access-Control-Allow-Origin"] == origin
                    assert r.headers["Access-Control-Allow-Headers"] == "Authorization, Content-Type"
                    assert "Location" in r.headers["Access-Control-Expose-Headers"].split(", ")
                    assert "POST" in r.headers["Access-Control-Allow-Methods"]
                    assert r.headers["Vary"] == "Origin"
            async with http.options(served.url + "/whip/some-resource", headers=preflight(STUDIO, "DELETE")) as r:
                assert r.status == 204 and "DELETE" in r.headers["Access-Control-Allow-Methods"]
            async with http.options(served.url + "/whep/a-view-token", headers=preflight(STUDIO)) as r:
                assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == STUDIO
            async with http.options(served.url + "/whip", headers=preflight("https://evil.example")) as r:
                assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
            async with http.options(served.url + "/whip", headers=preflight(None)) as r:  # not a browser
                assert r.status == 204 and "Access-Control-Allow-Origin" not in r.headers
                assert r.headers["Allow"] == "POST, OPTIONS"

    asyncio.run(asyncio.wait_for(main(), 60))


def test_requests_from_an_allowed_origin_carry_cors_headers_others_are_refused(tiny_model) -> None:
    async def main() -> None:
        async with serve(tiny_model, config()) as served, ClientSession() as http:
            refused = await publish(http, served.url, TOKEN, query=QUERY, origin="https://evil.example")
            assert refused.status == 403 and "Access-Control-Allow-Origin" not in refused.headers, refused.body
            assert not served.hub.sessions
            client = await publish(http, served.url, TOKEN, query=QUERY, origin=STUDIO)
            assert client.status == 201, client.body
            assert client.headers["Access-Control-Allow-Origin"] == STUDIO
            assert "Location" in client.headers["Access-Control-Expose-Headers"]
            view = client.headers["X-Streamdiff-View"]
            pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            pc.addTransceiver("video", direction="recvonly")
            headers = {"Content-Type": "application/sdp", "Origin": "https://evil.example"}
            async with http.post(served.url + view, data=(await offer(pc)).encode(), headers=headers) as r:
                assert r.status == 403  # WHEP too: a page of a refused origin may not watch
            await pc.close()
            viewer = await watch(http, served.url, view)  # not a browser: no Origin, allowed
            assert viewer.status == 201, viewer.body
            await viewer.close()
            await client.close()

    asyncio.run(asyncio.wait_for(main(), 60))
