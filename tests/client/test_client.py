"""streamdiff.client: the asyncio client of the protocol against a live loopback server (tiny model)."""

from __future__ import annotations

import asyncio

import pytest

from streamdiff.client import RequestFailed, ServerRefused, StreamClient, decode_output, stream_url
from streamdiff.errors import ConfigError
from streamdiff.io.sources import pattern_frame


def test_stream_url() -> None:
    assert stream_url("ws://h:1") == "ws://h:1/ws" and stream_url("wss://h/ws") == "wss://h/ws"
    assert stream_url("ws://h:1/custom") == "ws://h:1/custom"
    with pytest.raises(ConfigError, match="must start with ws:// or wss://"):
        stream_url("http://h:1")


def test_connect_stream_update_and_close(live) -> None:
    server = live(token="tok-123", stats_interval_s=0.2)

    async def main() -> None:
        with pytest.raises(ServerRefused) as refused:
            await StreamClient.connect(server.url, {"width": 64, "height": 64}, token="nope")
        assert refused.value.code == 1008 and refused.value.error.code == "unauthorized"
        async with await StreamClient.connect(server.url, {"width": 64, "height": 64, "seed": 5},
                                              token="tok-123") as client:
            assert client.ready.stream_id.startswith("st-") and client.settings.prompt.seed == 5
            assert client.ready.limits["max_input_fps"] == 30.0
            for i in range(4):
                sent = await client.send_frame(pattern_frame(i, 80, 60), frame_id=100 + i)  # encoded for us
                assert sent == 100 + i
                await asyncio.sleep(0.05)
            out = await client.next_output(timeout=20)
            assert out.frame_id in range(100, 104) and out.latency_ms > 0 and out.timings.server_ms > 0
            assert decode_output(out).shape == (64, 64, 3)
            ack = await client.update(prompt="ink", guidance_scale=1.5)
            assert ack.settings.prompt.prompt == "ink" and client.settings.prompt.guidance_scale == 1.5
            with pytest.raises(RequestFailed) as failed:
                await client.update(width=4000)
            assert (failed.value.error.code, failed.value.error.field) == ("not_allowed", "settings.width")
            assert isinstance(failed.value, ConfigError)
            await client.wait_for(lambda: client.stats.get("frames_taken", 0) >= 1, timeout=10)
        assert client.closed.is_set() and client.close_code == 1000

    asyncio.run(main())
