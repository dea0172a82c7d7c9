"""WHIP ingest and WHEP playback end to end: real aiortc peers over loopback, the tiny model through the real engine."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import numpy as np
import pytest
from aiohttp import ClientSession
from rtc_helpers import LOOPBACK, publish, run, serve, wait_for, watch

from streamdiff.server.hub import ServerConfig
from streamdiff.server.rtc import RtcConfig
from streamdiff.protocol.limits import ServerLimits

TOKEN = "s3cret-token-for-tests"
QUERY = "?width=128&height=128&prompt=a%20watercolor&seed=7"


def config(**limits) -> ServerConfig:
    return ServerConfig(port=0, token=TOKEN, limits=ServerLimits(**{"max_streams": 2, **limits}))


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_an_obs_like_publisher_is_watched_by_a_whep_viewer(tiny_model) -> None:
    """OBS-like: non-trickle offer, sendonly H.264, bearer token, no data channel; the viewer gets the engine's
    outputs at the stream's size (128², not the 256² sent), each with the RTP timestamp of an input it came from,
    unlike that input, and changing as the input moves."""

    async def main() -> None:
        async with serve(tiny_model, config()) as served, ClientSession() as http:
            publisher = await publish(http, served.url, TOKEN, query=QUERY)
            assert publisher.status == 201, publisher.body
            assert publisher.headers["Content-Type"].startswith("application/sdp")
            assert publisher.location.startswith("/whip/") and len(publisher.location) > 30
            assert "a=candidate:" in publisher.body and "127.0.0.1" in publisher.body  # complete, non-trickle
            (session,) = served.hub.sessions.values()
            view = publisher.headers["X-Streamdiff-View"]
            assert view == f"/whep/{session.view_token}"
            viewer = await watch(http, served.url, view)
            assert viewer.status == 201, viewer.body
            await wait_for(lambda: len(viewer.received.frames) >= 20, 60, "20 frames at the WHEP viewer")
            frames = viewer.received.frames
            sent = publisher.track.images
            assert all(image.shape == (128, 128, 3) for _, _, image in frames)
            assert all(pts in sent for _, pts, _ in frames), "every output carries the RTP timestamp of an input"
            from streamdiff.core.image import fit_frame

            unlike_input = [_diff(image, fit_frame(sent[pts], 128, 128)) for _, pts, image in frames[-10:]]
            assert min(unlike_input) > 10, unlike_input  # stylised, not the input passed through
            moving = [_diff(a[2], b[2]) for a, b in zip(frames[-10:], frames[-9:])]
            assert np.median(moving) > 1, moving
            await viewer.close()
            await publisher.close()

    run(main())


def test_a_sendrecv_client_gets_its_frames_and_changes_the_prompt_over_the_data_channel(tiny_trained) -> None:
    """The trained tiny model paints the style its prompt names: a still input, watercolor, then neon."""

    async def main() -> None:
        async with serve(tiny_trained, config()) as served, ClientSession() as http:
            client = await publish(http, served.url, TOKEN, query=QUERY, sendrecv=True, data_channel=True, still=True)
            assert client.status == 201, client.body
            await wait_for(lambda: len(client.received.frames) >= 15, 60, "15 frames back on the peer's own track")
            await wait_for(lambda: client.messages, 10, "ready on the data channel")
            ready = json.loads(client.messages[0])
            assert ready["type"] == "ready" and ready["settings"]["width"] == 128 and ready["settings_version"] == 0
            before = [image for _, _, image in client.received.frames[-5:]]
            client.channel.send(json.dumps({"type": "update", "request_id": 1, "settings": {"prompt": "neon"}}))
            await wait_for(lambda: any(json.loads(m)["type"] == "ack" for m in client.messages), 10, "the ack")
            ack = next(json.loads(m) for m in client.messages if json.loads(m)["type"] == "ack")
            assert ack["request_id"] == 1 and ack["settings_version"] == 1 and ack["settings"]["prompt"] == "neon"
            count = len(client.received.frames)
            await wait_for(lambda: len(client.received.frames) >= count + 15, 60, "15 frames after the ack")
            after = [image for _, _, image in client.received.frames[-5:]]
            still_noise = max(_diff(a, b) for frames in (before, after) for a, b in zip(frames, frames[1:]))
            changed = min(_diff(a, b) for a in before for b in after)
            assert changed > 5 * still_noise + 5, (changed, still_noise)
            await client.close()

    run(main())


def test_tokens_admission_and_delete(tiny_model) -> None:
    """401 without the right token; 503 + Retry-After when max_streams are served (WebRTC and WebSocket streams
    count together: the Hub's); DELETE ends the stream and frees its slot, so a new publish succeeds."""

    async def main() -> None:
        async with serve(tiny_model, config(max_streams=1)) as served, ClientSession() as http:
            for token in (None, "wrong"):
                refused = await publish(http, served.url, token, query=QUERY)
                assert refused.status == 401 and "Bearer" in refused.headers["WWW-Authenticate"], refused.body
            first = await publish(http, served.url, TOKEN, query=QUERY)
            assert first.status == 201, first.body
            full = await publish(http, served.url, TOKEN, query=QUERY)
            assert full.status == 503 and full.headers["Retry-After"] == "1", full.body
            assert "1 streams" in full.body
            async with http.delete(served.url + first.location) as response:
                assert response.status == 401  # bound to the token
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with http.patch(served.url + first.location, headers=headers) as response:
                assert response.status == 405
            async with http.delete(served.url + first.location, headers=headers) as response:
                assert response.status == 200
            assert not served.hub.sessions
            async with http.delete(served.url + first.location, headers=headers) as response:
                assert response.status == 404
            again = await publish(http, served.url, TOKEN, query=QUERY)
            assert again.status == 201, again.body
            await first.close()
            await again.close()

    run(main())


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _candidate_ports(sdp: str) -> set[int]:
    """The ports of an SDP's ICE candidates (``a=candidate:F C udp PRIORITY ADDRESS PORT typ host``)."""
    return {int(line.split()[5]) for line in sdp.splitlines() if line.startswith("a=candidate:")}


def test_the_port_range_bounds_the_media_sockets_and_a_full_range_is_503(tiny_model) -> None:
    """``--rtc-port-range P-P``: the answer's candidate is on port P and the stream runs; a second offer while P is
    taken gets 503 + Retry-After (its slot freed, no session left); after DELETE the port serves again."""
    port = _free_udp_port()

    async def main() -> None:
        rtc = RtcConfig(hosts=LOOPBACK, ports=(port, port))
        async with serve(tiny_model, config(max_streams=2), rtc) as served, ClientSession() as http:
            first = await publish(http, served.url, TOKEN, query=QUERY, sendrecv=True)
            assert first.status == 201, first.body
            assert _candidate_ports(first.body) == {port}
            await wait_for(lambda: len(first.received.frames) >= 3, 60.0, "3 stylised frames back")
            full = await publish(http, served.url, TOKEN, query=QUERY)
            assert full.status == 503 and full.headers["Retry-After"] == "1", full.body
            assert f"no free UDP port in --rtc-port-range {port}-{port}" in full.body
            assert len(served.hub.sessions) == 1
            await full.close()
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with http.delete(served.url + first.location, headers=headers) as response:
                assert response.status == 200
            await first.close()
            await wait_for(lambda: not served.hub.sessions, 10.0, "the deleted stream to end")
            again = await publish(http, served.url, TOKEN, query=QUERY)
            assert again.status == 201 and _candidate_ports(again.body) == {port}, again.body
            await again.close()

    run(main())


def test_a_peer_that_vanishes_is_cleaned_up_within_the_idle_timeout(tiny_model) -> None:
    async def main() -> None:
        async with serve(tiny_model, config(idle_timeout_s=1.5)) as served, ClientSession() as http:
            client = await publish(http, served.url, TOKEN, query=QUERY)
            assert client.status == 201, client.body
            (session,) = served.hub.sessions.values()
            await wait_for(lambda: session.conn.stats.frames_accepted >= 5, 30, "frames at the server")
            # The client vanishes: its UDP sockets go away without a DTLS close or anything else sent.
            for transceiver in client.pc.getTransceivers():
                connection = transceiver.sender.transport.transport.iceGatherer._connection
                for protocol in connection._protocols:
                    protocol.transport.abort()
            gone = time.monotonic()
            await wait_for(lambda: not served.hub.sessions and not len(served.front.publishers), 10,
                           "the server to drop the vanished peer")
            assert time.monotonic() - gone < 1.5 + 2.0
            assert session.close_reason and "idle_timeout" in session.close_reason, session.close_reason

    run(main())


def test_oversized_sdp_and_disallowed_codecs_are_refused(tiny_model) -> None:
    async def main() -> None:
        async with serve(tiny_model, config()) as served, ClientSession() as http:
            headers = {"Content-Type": "application/sdp", "Authorization": f"Bearer {TOKEN}"}
            big = "v=0\r\n" + "a=x-padding:" + "x" * (16 << 10) + "\r\n"
            async with http.post(served.url + "/whip", data=big.encode(), headers=headers) as response:
                assert response.status == 413 and "16384" in await response.text()
            vp9 = ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 98 99\r\n"
                   "c=IN IP4 0.0.0.0\r\na=rtpmap:98 VP9/90000\r\na=rtpmap:99 AV1/90000\r\na=sendonly\r\n")
            async with http.post(served.url + "/whip", data=vp9.encode(), headers=headers) as response:
                text = await response.text()
                assert response.status == 406 and "VP9, AV1" in text and "H264, VP8" in text, text
            async with http.post(served.url + "/whip?width=100", data=vp9.encode(), headers=headers) as response:
                assert response.status == 406  # the offer is checked first
            assert not served.hub.sessions

    run(main())


@pytest.mark.parametrize("query, expected", [
    ("?width=100", "query parameter width=100"),
    ("?colour=red", "'colour' is not known"),
    ("?width=12.5", "must be an integer"),
])
def test_bad_query_parameters_are_400_naming_the_parameter(tiny_model, query: str, expected: str) -> None:
    async def main() -> None:
        async with serve(tiny_model, config()) as served, ClientSession() as http:
            client = await publish(http, served.url, TOKEN, query=query)
            assert client.status == 400 and expected in client.body, client.body
            assert not served.hub.sessions

    run(main())


def test_the_control_endpoint_takes_update_messages_with_the_token(tiny_model) -> None:
    async def main() -> None:
        async with serve(tiny_model, config()) as served, ClientSession() as http:
            publisher = await publish(http, served.url, TOKEN, query=QUERY)
            assert publisher.status == 201, publisher.body
            url, auth = f"{served.url}{publisher.location}/update", {"Authorization": f"Bearer {TOKEN}"}
            async with http.post(url, json={"type": "update", "settings": {"prompt": "neon"}}, headers=auth) as r:
                ack = await r.json()
                assert r.status == 200 and ack["type"] == "ack" and ack["settings_version"] == 1, ack
                assert ack["settings"]["prompt"] == "neon"
            (session,) = served.hub.sessions.values()
            assert session.stream.prompt.prompt == "neon"
            async with http.post(url, json={"settings": {"width": 100}}, headers=auth) as r:
                error = await r.json()
                assert r.status == 400 and error["type"] == "error" and error["field"] == "settings.width", error
            async with http.post(url, json={"settings": {"prompt": "x"}}) as r:
                assert r.status == 401
            async with http.post(url, data=b"{not json", headers=auth) as r:
                assert r.status == 400 and "JSON" in await r.text()
            await publisher.close()

    run(main())


def test_whep_viewers_unknown_tokens_limits_and_the_end_of_the_stream(tiny_model) -> None:
    async def main() -> None:
        async with serve(tiny_model, config(max_viewers_per_stream=1)) as served, ClientSession() as http:
            unknown = await watch(http, served.url, "/whep/no-such-view-token-123")
            assert unknown.status == 404, unknown.body
            publisher = await publish(http, served.url, TOKEN, query=QUERY + "&view_token=my-stable-view-token")
            assert publisher.headers["X-Streamdiff-View"] == "/whep/my-stable-view-token"
            viewer = await watch(http, served.url, "/whep/my-stable-view-token", codec="vp8")
            assert viewer.status == 201 and "VP8/90000" in viewer.body, viewer.body
            second = await watch(http, served.url, "/whep/my-stable-view-token")
            assert second.status == 503 and second.headers["Retry-After"] == "1", second.body
            await wait_for(lambda: len(viewer.received.frames) >= 3, 60, "frames at the VP8 viewer")
            async with http.delete(served.url + publisher.location,
                                   headers={"Authorization": f"Bearer {TOKEN}"}) as response:
                assert response.status == 200
            await wait_for(lambda: not len(served.front.viewers), 10, "the viewer's peer to close with the stream")
            await wait_for(lambda: viewer.pc.connectionState == "closed" or viewer.received.task.done(), 10,
                           "the viewer to see the end")
            await viewer.close()
            await publisher.close()

    run(main())


def test_whip_to_whep_latency_on_loopback(tiny_model) -> None:
    """WHIP → engine → WHEP, pts-matched: p50/p95 of (viewer decoded − publisher captured) over ~100 frames,
    printed (``-s``); the bound only catches a pipeline that queues."""

    async def main() -> list[float]:
        async with serve(tiny_model, config()) as served, ClientSession() as http:
            publisher = await publish(http, served.url, TOKEN, query=QUERY)
            viewer = await watch(http, served.url, publisher.headers["X-Streamdiff-View"])
            await wait_for(lambda: len(viewer.received.frames) >= 130, 90, "130 frames at the viewer")
            frames = viewer.received.frames[30:]  # after the warm-up
            latencies = [arrived - publisher.track.sent[pts] for arrived, pts, _ in frames]
            await viewer.close()
            await publisher.close()
            return latencies

    latencies = run(main(), timeout=150)
    p50, p95 = np.percentile(latencies, 50) * 1000, np.percentile(latencies, 95) * 1000
    print(f"\nWHIP -> WHEP latency on loopback, tiny-random 128x128 from 256x256 H.264 at 30 fps: "
          f"p50 {p50:.0f} ms, p95 {p95:.0f} ms over {len(latencies)} frames")
    assert p95 < 2000, (p50, p95)


class _MemoryTransport:
    """The Transport seam of a WebSocket viewer, in memory (what a viewer socket would be sent)."""

    remote, origin = "127.0.0.1:1", None

    def __init__(self) -> None:
        self.sent: list = []
        self._closed = asyncio.Event()

    async def receive(self):
        from streamdiff.server.transport import TransportClosed

        await self._closed.wait()
        raise TransportClosed(1000)

    async def send(self, data) -> None:
        self.sent.append(data)

    async def close(self, code: int, reason: str) -> None:
        self.close_reason = (code, reason)
        self._closed.set()

    def abort(self) -> None:
        self._closed.set()


def test_whep_and_websocket_viewers_share_the_per_stream_viewer_cap(tiny_model) -> None:
    """``max_viewers_per_stream`` counts WHEP viewers and view sockets together, whichever came first: with one of
    each, a third of either kind is refused (WHEP 503, socket closed with server_full); when the WHEP viewer leaves,
    a view socket fits again."""
    from streamdiff.server.viewing import ViewerSession

    async def main() -> None:
        async with serve(tiny_model, config(max_viewers_per_stream=2)) as served, ClientSession() as http:
            publisher = await publish(http, served.url, TOKEN, query=QUERY)
            (session,) = served.hub.sessions.values()
            whep = await watch(http, served.url, publisher.headers["X-Streamdiff-View"])
            assert whep.status == 201, whep.body
            first = _MemoryTransport()
            socket_viewer = asyncio.ensure_future(ViewerSession(served.hub, first, session.view_token).run())
            await wait_for(lambda: len(session.viewers) == 1, 10, "the view socket admitted")
            assert served.hub.viewer_count(session) == 2
            refused = await watch(http, served.url, publisher.headers["X-Streamdiff-View"])
            assert refused.status == 503 and "its 2 viewers" in refused.body, refused.body
            await refused.close()
            third = _MemoryTransport()
            await asyncio.wait_for(ViewerSession(served.hub, third, session.view_token).run(), 10)
            assert third.close_reason[1].startswith("server_full"), third.close_reason
            await whep.close()  # the WHEP viewer goes: its place is free
            await wait_for(lambda: served.hub.viewer_count(session) == 1, 30, "the WHEP viewer to be gone")
            fourth = _MemoryTransport()
            admitted = asyncio.ensure_future(ViewerSession(served.hub, fourth, session.view_token).run())
            await wait_for(lambda: len(session.viewers) == 2, 10, "the second view socket admitted")
            await publisher.close()
            await asyncio.wait_for(asyncio.gather(socket_viewer, admitted), 15)  # end with the stream

    run(main())


def test_websocket_viewers_watch_a_whip_stream_too(tiny_model) -> None:
    from streamdiff.server.viewing import ViewerSession
    from streamdiff.protocol.wire import unpack_output_frame

    async def main() -> None:
        async with serve(tiny_model, config()) as served, ClientSession() as http:
            publisher = await publish(http, served.url, TOKEN, query=QUERY)
            (session,) = served.hub.sessions.values()
            transport = _MemoryTransport()
            viewer = asyncio.ensure_future(ViewerSession(served.hub, transport, session.view_token).run())
            await wait_for(lambda: sum(isinstance(m, bytes) for m in transport.sent) >= 3, 60, "viewer frames")
            header, body = unpack_output_frame(next(m for m in transport.sent if isinstance(m, bytes)))
            assert body[:3] == b"\xff\xd8\xff"  # JPEG, the stream's output format
            await publisher.close()
            await asyncio.wait_for(viewer, 15)  # ends with the stream

    run(main())


def test_a_video_over_max_frame_pixels_ends_the_stream(tiny_model) -> None:
    async def main() -> None:
        async with serve(tiny_model, config(max_frame_pixels=200 * 200)) as served, ClientSession() as http:
            publisher = await publish(http, served.url, TOKEN, query=QUERY)  # 256x256
            assert publisher.status == 201, publisher.body
            (session,) = served.hub.sessions.values()
            await wait_for(lambda: not served.hub.sessions and not len(served.front.publishers), 30, "the end")
            assert "image_too_large" in session.close_reason and "256x256" in session.close_reason
            await publisher.close()

    run(main())


def test_a_stream_that_ends_during_the_negotiation_is_503_not_a_server_error(tiny_model) -> None:
    """The session is admitted, then ends (here its idle timeout, 1 ms) while aiortc is still answering: the peer
    connection is closed under the negotiation; the publisher is told 503 (never 500), nothing is left behind."""

    async def main() -> None:
        async with serve(tiny_model, config(idle_timeout_s=0.001)) as served, ClientSession() as http:
            statuses = []
            for _ in range(3):
                client = await publish(http, served.url, TOKEN, query=QUERY)
                statuses.append(client.status)
                assert client.status in (201, 503), client.body
                if client.status == 503:
                    assert "ended before it was answered" in client.body and "idle_timeout" in client.body
                await client.close()
            assert 503 in statuses, statuses
            await wait_for(lambda: not served.hub.sessions and not len(served.front.publishers), 10, "no stream left")

    run(main())
