"""Isolation: WebRTC and WebSocket clients streaming at once through one server and one engine each get only their
own frames back (issue 15). Every client sends its own colour; the trained ``tiny`` model with an empty prompt keeps
the input as it is, so an output's colour says whose input it came from."""

from __future__ import annotations

import asyncio
import time

import numpy as np
from aiohttp import ClientSession
from rtc_helpers import PatternTrack, publish, serve, wait_for

from streamdiff.client import StreamClient
from streamdiff.protocol.limits import ServerLimits
from streamdiff.server.hub import ServerConfig

TOKEN = "isolation-token-for-tests"
SIZE = 128
# Eight colours far apart (RGB); each client owns one.
COLOURS = np.array([(220, 40, 40), (40, 200, 40), (40, 60, 220), (230, 220, 40),
                    (210, 50, 210), (40, 210, 210), (235, 235, 235), (30, 30, 30)], dtype=np.float32)
RTC_CLIENTS, WS_CLIENTS, FRAMES_EACH = 4, 4, 12


def moving(colour: np.ndarray, index: int) -> np.ndarray:
    """``colour`` with a darker band that moves down one row band per frame: a moving input of one colour."""
    image = np.empty((SIZE, SIZE, 3), np.uint8)
    image[:] = colour.astype(np.uint8)
    row = (index * 8) % SIZE
    image[row:row + 8] = (colour * 0.7).astype(np.uint8)
    return image


class ColourTrack(PatternTrack):
    def __init__(self, colour: np.ndarray) -> None:
        super().__init__(SIZE, fps=10.0)
        self.colour = colour

    def image(self, index: int) -> np.ndarray:
        return moving(self.colour, index)


def owner(image: np.ndarray) -> int:
    """The index of the colour nearest the image's median colour."""
    median = np.median(image.reshape(-1, 3).astype(np.float32), axis=0)
    return int(np.argmin(np.linalg.norm(COLOURS - median, axis=1)))


def test_webrtc_and_websocket_clients_each_get_only_their_own_frames(tiny_trained) -> None:
    config = ServerConfig(port=0, token=TOKEN, limits=ServerLimits(max_streams=RTC_CLIENTS + WS_CLIENTS))
    query = f"?width={SIZE}&height={SIZE}&prompt=&seed=3"

    async def websocket_client(url: str, index: int) -> list[int]:
        from streamdiff.client.connection import decode_output

        colour = COLOURS[RTC_CLIENTS + index]
        owners = []
        async with await StreamClient.connect(url, {"width": SIZE, "height": SIZE, "prompt": "", "seed": 3},
                                              token=TOKEN) as client:
            sent, i, deadline = set(), 0, time.monotonic() + 90
            while len(owners) < FRAMES_EACH and time.monotonic() < deadline:  # 10 frames/s; outputs read as they come
                sent.add(await client.send_frame(moving(colour, i), frame_id=(index + 1) * 10000 + i))
                i += 1
                await asyncio.sleep(0.1)
                while client.outputs:
                    output = client.outputs.popleft()
                    assert output.frame_id in sent, (output.frame_id, sent)  # ids of this client's frames only
                    owners.append(owner(decode_output(output)))
        return owners

    async def main() -> None:
        async with serve(tiny_trained, config) as served, ClientSession() as http:
            rtc = [await publish(http, served.url, TOKEN, query=query, sendrecv=True, track=ColourTrack(COLOURS[i]))
                   for i in range(RTC_CLIENTS)]
            assert [c.status for c in rtc] == [201] * RTC_CLIENTS, [c.body for c in rtc]
            ws = [asyncio.ensure_future(websocket_client(served.ws_url, i)) for i in range(WS_CLIENTS)]
            await wait_for(lambda: len(served.hub.sessions) == RTC_CLIENTS + WS_CLIENTS or any(t.done() for t in ws),
                           30, "all eight streams at once")
            assert len(served.hub.sessions) == RTC_CLIENTS + WS_CLIENTS
            ws_owners = await asyncio.wait_for(asyncio.gather(*ws), 150)
            await wait_for(lambda: all(len(c.received.frames) >= FRAMES_EACH for c in rtc), 60,
                           f"{FRAMES_EACH} frames back at every WebRTC client")
            for i, client in enumerate(rtc):
                frames = client.received.frames
                assert all(pts in client.track.sent for _, pts, _ in frames), "a pts this client never sent"
                owners = [owner(image) for _, _, image in frames]
                assert owners == [i] * len(owners), (i, owners)
            for i, owners in enumerate(ws_owners):
                assert len(owners) >= FRAMES_EACH and owners == [RTC_CLIENTS + i] * len(owners), (i, owners)
            for client in rtc:
                await client.close()

    asyncio.run(asyncio.wait_for(main(), 240))
