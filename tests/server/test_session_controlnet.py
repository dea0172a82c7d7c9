"""ControlNet through a live server: clients choose the operator's ControlNets by name in hello and update; an
unknown name is refused with the names offered; scale changes apply live."""

from __future__ import annotations

import pytest
from live import bodies, frames, run, settings

from streamdiff.client import ServerRefused, StreamClient
from streamdiff.engine import EngineConfig, StreamEngine
from streamdiff.models.controlnet import build_tiny_controlnet
from streamdiff.server.app import BackgroundServer
from streamdiff.server.hub import ServerConfig
from streamdiff.server.limits import ServerLimits


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
