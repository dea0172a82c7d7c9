"""``streamdiff serve --ray``: the serve command's options on a fleet of one replica, in a real child process with its
own local Ray cluster; a real client streams, then SIGTERM drains the fleet (1001) and the process exits 0."""

from __future__ import annotations

import asyncio
import signal

import pytest

pytest.importorskip("ray.serve")

from streamdiff.client import StreamClient  # noqa: E402
from streamdiff.deploy.routing import replica_of_stream  # noqa: E402
from streamdiff.io.sources import pattern_frame  # noqa: E402
from streamdiff.testing.serve import ServeProcess  # noqa: E402

pytestmark = pytest.mark.slow


def test_serve_ray_streams_through_a_replica_then_shuts_down_gracefully(tiny_model) -> None:
    served = ServeProcess("--ray", "--replicas", "1", "--cpus-per-replica", "0.5", "--torch-threads", "1",
                          "--backend", "torch", "--size", "64x64", "--stats-interval", "0", "--prompt", "house style",
                          start_timeout=240)
    try:
        assert "fleet 'streamdiff' on Ray Serve, 1 replica(s)" in "".join(served.log)

        async def main() -> tuple:
            async with await StreamClient.connect(served.url, {"prompt": "a cat"}) as client:
                assert client.settings.stream.width == 64 and client.settings.prompt.prompt == "a cat"
                assert replica_of_stream(client.ready.stream_id) is not None, client.ready.stream_id
                for i in range(6):
                    await client.send_frame(pattern_frame(i, 64, 64), frame_id=i)
                    await asyncio.sleep(0.05)
                await client.wait_for(lambda: len(client.outputs) >= 2, timeout=60)
                assert all(0 <= out.frame_id < 6 for out in client.outputs)
                served.process.send_signal(signal.SIGTERM)
                await asyncio.wait_for(client.closed.wait(), 60)
                return client.close_code, client.error.code if client.error else None

        assert asyncio.run(main()) == (1001, "shutting_down")
        assert served.process.wait(90) == 0, "".join(served.log)
    finally:
        served.stop()  # already exited: only what its process group left behind is killed
