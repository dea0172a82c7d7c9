"""``streamdiff serve --ray``: the serve command's options on a fleet of one replica, in a real child process with its
own local Ray cluster; a real client streams, then SIGTERM drains the fleet (1001; a second SIGTERM meanwhile is
only logged) and the process exits 0. And Ray's own ``serve run`` with a config file."""

from __future__ import annotations

import asyncio
import signal

import pytest

pytest.importorskip("ray.serve")

from streamdiff.client import ServerRefused, StreamClient  # noqa: E402
from streamdiff.deploy.launch import free_port  # noqa: E402
from streamdiff.deploy.routing import replica_of_stream  # noqa: E402
from streamdiff.io.sources import pattern_frame  # noqa: E402
from streamdiff.testing.serve import ServeProcess, default_sigint  # noqa: E402

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
                served.process.send_signal(signal.SIGTERM)  # impatient: again while the fleet shuts down
                return client.close_code, client.error.code if client.error else None

        assert asyncio.run(main()) == (1001, "shutting_down")
        assert served.process.wait(90) == 0, "".join(served.log)
        log = "".join(served.log)
        assert "shutting down the fleet" in log and "SIGTERM again: the fleet is already shutting down" in log
    finally:
        served.stop()  # already exited: only what its process group left behind is killed


def test_serve_run_with_a_config_file_serves_the_same_protocol(tiny_model, tmp_path) -> None:
    """Ray's own launcher: ``serve run CONFIG.yaml`` with ``import_path: streamdiff.deploy:app`` and string
    arguments (as Serve passes them), a real client through Serve's proxy, SIGINT ends it."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    config = tmp_path / "fleet.yaml"
    config.write_text(f"""\
proxy_location: EveryNode
http_options:
  host: 127.0.0.1
  port: {port}
applications:
  - name: streamdiff
    route_prefix: /
    import_path: streamdiff.deploy:app
    args:
      model: tiny
      backend: torch
      size: "64"
      max_streams: "1"
      replicas: "1"
      num_cpus: "0.5"
      torch_threads: "1"
      prompt: fleet default
""")
    serve_cli = os.path.join(os.path.dirname(sys.executable), "serve")
    process = subprocess.Popen([serve_cli, "run", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True, preexec_fn=default_sigint)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, process.stderr.read()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "serve run never became ready"
            time.sleep(1)

        async def main() -> None:
            async with await StreamClient.connect(f"ws://127.0.0.1:{port}/ws") as client:
                assert client.settings.prompt.prompt == "fleet default" and client.settings.stream.width == 64
                for i in range(6):
                    await client.send_frame(pattern_frame(i, 64, 64), frame_id=i)
                    await asyncio.sleep(0.05)
                await client.wait_for(lambda: len(client.outputs) >= 2, timeout=60)
            with pytest.raises(ServerRefused) as refused:  # max_streams=1 and one replica: the fleet is full
                async with await StreamClient.connect(f"ws://127.0.0.1:{port}/ws"), \
                        await StreamClient.connect(f"ws://127.0.0.1:{port}/ws"):
                    pass
            assert refused.value.code == 1013

        asyncio.run(main())
        process.send_signal(signal.SIGINT)
        assert process.wait(120) == 0
    finally:
        if process.poll() is None:
            process.kill()
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

