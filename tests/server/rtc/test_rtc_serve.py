"""WebRTC on a real ``streamdiff serve`` process: WHIP, WHEP and WebSocket routes on its one HTTP stack."""

from __future__ import annotations

import asyncio

from aiohttp import ClientSession
from rtc_helpers import publish, wait_for, watch

from streamdiff.testing.serve import ServeProcess

TOKEN = "rtc-serve-token-0123456789"


def test_streamdiff_serve_takes_whip_and_serves_whep_beside_the_websocket_routes(tiny_model) -> None:
    """An OBS-like publisher (sendonly H.264, non-trickle, bearer token) and a WHEP viewer on the serve command's own
    port; the page and /healthz answer on the same port; DELETE ends the stream and /readyz still answers."""
    with ServeProcess("--model", "tiny-random", "--size", "128x128", "--rtc-host", "127.0.0.1", "--max-streams", "2",
                      env={"STREAMDIFF_TOKEN": TOKEN}) as served:
        base = f"http://127.0.0.1:{served.port}"

        async def main() -> None:
            async with ClientSession() as http:
                for path in ("/", "/healthz"):
                    async with http.get(base + path) as reply:
                        assert reply.status == 200, path
                wrong = await publish(http, base, "not-the-token")
                assert wrong.status == 401
                publisher = await publish(http, base, TOKEN)
                assert publisher.status == 201, publisher.body
                assert "127.0.0.1" in publisher.body and "a=candidate:" in publisher.body
                viewer = await watch(http, base, publisher.headers["X-Streamdiff-View"])
                assert viewer.status == 201, viewer.body
                await wait_for(lambda: len(viewer.received.frames) >= 3, 60, "frames at the WHEP viewer")
                assert viewer.received.frames[-1][2].shape[:2] == (128, 128)
                async with http.delete(base + publisher.location,
                                       headers={"Authorization": f"Bearer {TOKEN}"}) as reply:
                    assert reply.status == 200
                await viewer.close()
                await publisher.close()
                async with http.get(base + "/readyz") as reply:
                    assert reply.status == 200

        asyncio.run(asyncio.wait_for(main(), 120))
    assert served.returncode == 0
    assert TOKEN not in "".join(served.log)
