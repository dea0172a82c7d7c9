"""streamdiff.protocol.versions: which ack's settings made an output; then on a live server, the outputs' versions."""

from __future__ import annotations

import time

from live import SIZE, Drive, bodies, drive, frames, run, settings

from streamdiff.client import StreamClient, decode_output
from streamdiff.protocol.images import ImageFormat
from streamdiff.protocol.settings import StreamSettings, apply_settings
from streamdiff.protocol.versions import MAX_PENDING, SettingsVersions

BASE = StreamSettings()
WEBP = apply_settings(BASE, {"output": {"format": "webp"}}, None)


def test_an_output_belongs_to_the_newest_ack_of_its_engine_version() -> None:
    versions = SettingsVersions(BASE)
    versions.acked(0, 1, WEBP)  # an output-only update: the engine's version stays 0
    versions.acked(1, 2, BASE)  # a prompt: engine version 1
    versions.acked(1, 3, WEBP)  # {} or output only, after it
    versions.acked(4, 7, BASE)  # the engine's versions may jump (its own updates coalesce)
    assert versions.of(0) == (1, WEBP)  # finished before the engine had version 1: that's ack 1's
    assert versions.of(1) == (3, WEBP)
    assert versions.of(3) == (3, WEBP)
    assert versions.of(4) == (7, BASE)
    assert versions.of(0) == (7, BASE)  # outputs come in engine order: the older acks are gone


def test_acks_never_seen_in_an_output_stay_bounded() -> None:
    versions = SettingsVersions(BASE)
    for engine_version in range(1, 3 * MAX_PENDING):
        versions.acked(engine_version, engine_version % 2**16, BASE)
    assert len(versions._acks) == MAX_PENDING
    assert versions.of(3 * MAX_PENDING)[0] == 3 * MAX_PENDING - 1


def test_outputs_say_which_ack_made_them(live) -> None:
    """After the ack of version v, outputs come to carry v; every output before the first one carrying v carries
    an older version, and the first one carrying v is made with v's settings: a new size (the stream is rebuilt,
    so every output carrying it has it), then a new output format, then nothing new ({})."""
    server = live()
    body = bodies(frames(1))[0]

    async def main() -> None:
        client = await StreamClient.connect(server.url, settings())
        assert client.ready.settings_version == 0
        got = Drive()

        def carrying(version: int) -> int:
            return sum(o.settings_version >= version for _, o in got.outputs)

        async def until_version(version: int, count: int = 2) -> None:  # count outputs carrying it (or later)
            await drive(client, lambda i: body, until=time.perf_counter() + 30, window=3,
                        stop_when=lambda: carrying(version) >= count, result=got)
            assert carrying(version) >= count, [o.settings_version for _, o in got.outputs]

        await until_version(0)
        wider = await client.update(width=2 * SIZE)
        webp = await client.update(output={"format": "webp", "quality": 90})
        await until_version(webp.settings_version)
        nothing = await client.update()
        await until_version(nothing.settings_version)
        await client.close()
        assert (wider.settings_version, webp.settings_version, nothing.settings_version) == (1, 2, 3)
        versions = [o.settings_version for _, o in got.outputs]
        assert versions == sorted(versions) and versions[0] == 0 and versions[-1] == 3, versions
        for _, output in got.outputs:
            width = decode_output(output).shape[1]
            assert width == (SIZE if output.settings_version == 0 else 2 * SIZE), (output.settings_version, width)
            assert output.format is (ImageFormat.JPEG if output.settings_version < 2 else ImageFormat.WEBP)

    run(main())


def test_with_one_step_the_first_output_of_a_version_is_made_with_it(live) -> None:
    """An update applied in place (a prompt) with one step: every output carrying the old version is the old
    prompt's image of the (constant) input, every output carrying the new one the new prompt's."""
    server = live()
    body = bodies(frames(1))[0]

    async def main() -> None:
        client = await StreamClient.connect(server.url, settings(t_index_list=[30], prompt="a watercolor"))
        got = Drive()
        await drive(client, lambda i: body, until=time.perf_counter() + 30, window=2, stop_after=3, result=got)
        ack = await client.update(prompt="an oil painting, thick strokes", seed=9)
        await drive(client, lambda i: body, until=time.perf_counter() + 30, window=2, result=got,
                    stop_when=lambda: sum(o.settings_version == ack.settings_version for _, o in got.outputs) >= 3)
        await client.close()
        images = {0: set(), 1: set()}
        for _, output in got.outputs:
            images[output.settings_version].add(decode_output(output).tobytes())
        assert len(images[0]) == 1 and len(images[1]) == 1 and images[0] != images[1]

    run(main())
