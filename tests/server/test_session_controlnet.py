"""ControlNet through a live server: clients choose the operator's ControlNets by name in hello and update; an
unknown name is refused with the names offered; scale changes apply live."""

from __future__ import annotations

import threading

import pytest
from live import bodies, frames, run, settings

from streamdiff.client import ServerRefused, StreamClient
from streamdiff.engine import EngineConfig, StreamEngine
from streamdiff.models.controlnet import build_tiny_controlnet
from streamdiff.server.app import BackgroundServer
from streamdiff.server.hub import ServerConfig
from streamdiff.protocol.limits import ServerLimits


@pytest.fixture()
def server(tiny_model):
    engine = StreamEngine(tiny_model, EngineConfig(max_streams=2, max_batch_rows=16),
                          controlnets={"edges": build_tiny_controlnet()})
    background = BackgroundServer(engine, ServerConfig(port=0, limits=ServerLimits(max_streams=2))).start()
    yield background
    background.stop()


def test_clients_choose_controlnets_by_name(server) -> None:
    async def scenario() -> None:
        with pytest.raises(ServerRefused, match=r"'depth' is not one this engine offers: edges") as info:
            await StreamClient.connect(server.url, settings(controlnets=[{"name": "depth"}]))
        assert info.value.error.field == "settings.controlnets"
        async with await StreamClient.connect(server.url, settings(controlnets=[{"name": "edges", "scale": 0.5}])
                                              ) as client:
            assert client.settings.prompt.controlnets[0].scale == 0.5
            images = bodies(frames(6))
            await client.send_frame(images[0])  # two steps: the first output comes with the second frame
            for i in range(1, 3):
                await client.send_frame(images[i])
                assert (await client.next_output(timeout=30)).settings_version == 0
            ack = await client.update(controlnets=[{"name": "edges", "scale": 1.5, "low_threshold": 20}])
            assert ack.settings.prompt.controlnets[0].scale == 1.5
            versions = []
            for i in range(3, 6):
                await client.send_frame(images[i])
                versions.append((await client.next_output(timeout=30)).settings_version)
            assert versions[-1] == 1  # applied in place: outputs go on

    run(scenario())


def test_a_remote_controlnet_stream_equals_the_in_process_engine(server, tiny_model) -> None:
    import numpy as np

    from streamdiff import ControlNetSpec, StreamConfig
    from streamdiff.client.remote import RemoteEngine

    config = StreamConfig(width=64, height=64, t_index_list=(20, 35), cfg_type="self")
    prompt = dict(prompt="ink", seed=3, controlnets=[ControlNetSpec("edges", scale=0.7, low_threshold=40)])
    inputs = frames(5)
    remote = RemoteEngine(server.url, image_format="webp", quality=100)
    try:
        stream = remote.open_stream(config, lossless=True, **prompt)
        outputs: list = []
        reader = threading.Thread(target=lambda: outputs.extend(iter(lambda: stream.get(timeout=30), None)))
        reader.start()  # lossless: outputs are read as they come, or the stream waits for room
        for frame in inputs:
            stream.submit(frame, timeout=30)
        stream.end_input()
        reader.join(60)
        assert stream.error is None
        got = [np.asarray(image) for out in outputs for image in out.frames()]
    finally:
        remote.stop()
    local = StreamEngine(tiny_model, EngineConfig(max_streams=1), controlnets={"edges": build_tiny_controlnet()})
    mine = local.open_stream(config, **prompt)
    expected = [o.frames()[0] for o in (local.step({mine: f})[mine] for f in inputs) if o.images is not None]
    expected += [o.frames()[0] for o in local.flush(mine)]
    assert len(got) == len(expected) == 5
    assert max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(got, expected)) <= 1
