"""streamdiff.client.remote: an engine on a server behind the local engine's interface (what `run --engine` uses)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from streamdiff import ConfigError, StreamClosed, StreamConfig, StreamDiffError, StreamPipeline
from streamdiff.client import ServerRefused
from streamdiff.io.sources import pattern_frame
from streamdiff.client.remote import RemoteEngine, settings_json
from streamdiff.runtime.controls import Controls
from streamdiff.protocol.limits import ServerLimits
from streamdiff.protocol.settings import OutputConfig

CONFIG = StreamConfig(width=64, height=64, t_index_list=(20, 35))


def test_settings_the_protocol_cannot_express_are_refused_locally() -> None:
    out = OutputConfig()
    with pytest.raises(ConfigError, match="mode=.*txt2img.* is not available through a streamdiff server"):
        settings_json(CONFIG.with_changes(mode="txt2img"), __import__("streamdiff").PromptConfig(), out)
    with pytest.raises(ConfigError, match="use_denoising_batch=False"):
        settings_json(CONFIG.with_changes(use_denoising_batch=False), __import__("streamdiff").PromptConfig(), out)


def test_a_lossless_remote_stream_equals_the_local_pipeline(live, tiny_model) -> None:
    server = live()
    remote = RemoteEngine(server.url.removesuffix("/ws"), image_format="webp", quality=100)
    stream = remote.open_stream(CONFIG, "a watercolor", seed=5, lossless=True)
    frames = [pattern_frame(i, 64, 64) for i in range(9)]
    got: list = []
    reader = threading.Thread(target=lambda: got.extend(iter(lambda: stream.get(timeout=30), None)))
    reader.start()
    for i, frame in enumerate(frames):
        stream.submit(frame, frame_id=("frame", i), timeout=30)
    stream.end_input()
    reader.join(60)
    remote.stop()
    pipe = StreamPipeline(tiny_model, CONFIG)
    pipe.prepare(prompt="a watercolor", seed=5)
    expected = [o for o in (pipe(f) for f in frames) if o is not None] + [o.frames()[0] for o in pipe.flush()]
    assert [o.frame_ids[0] for o in got] == [("frame", i) for i in range(9)]
    assert max(int(np.abs(o.frames()[0].astype(int) - e.astype(int)).max()) for o, e in zip(got, expected)) <= 1
    assert stream.finished and stream.error is None
    assert (stream.stats.frames_in, stream.stats.frames_out, stream.stats.dropped_inputs) == (9, 9, 0)
    with pytest.raises(StreamClosed):
        stream.submit(frames[0])


@pytest.mark.parametrize("frame_buffer_size", [2, 3])
def test_lossless_pacing_loses_nothing_with_several_frames_per_group(live, frame_buffer_size: int) -> None:
    """The documented lossless rule (fewer than F frames sent and not yet taken or lost) with F > 1: the client has
    up to F frames on their way at once, and the server hands each to the engine without replacing any."""
    server = live(limits=ServerLimits(max_frame_buffer_size=3, max_input_fps=120.0, input_burst_frames=8))
    remote = RemoteEngine(server.url.removesuffix("/ws"), image_format="webp", quality=100)
    config = CONFIG.with_changes(frame_buffer_size=frame_buffer_size)
    stream = remote.open_stream(config, "a watercolor", seed=5, lossless=True)
    count = 8 * frame_buffer_size
    got: list = []
    reader = threading.Thread(target=lambda: got.extend(iter(lambda: stream.get(timeout=30), None)))
    reader.start()
    for i in range(count):
        stream.submit(pattern_frame(i, 64, 64), frame_id=i, timeout=30)
    stream.end_input()
    reader.join(60)
    remote.stop()
    assert [o.frame_ids[0] for o in got] == list(range(count))
    assert (stream.stats.frames_in, stream.stats.frames_out, stream.stats.dropped_inputs) == (count, count, 0)


def test_live_updates_through_controls_and_refusals(live) -> None:
    server = live(max_batch_rows=4)
    remote = RemoteEngine(server.url)
    stream = remote.open_stream(CONFIG, "a cat")
    controls = Controls()
    controls.bind(stream)
    assert controls.strength == pytest.approx(0.6)
    controls.change_strength(0.1)
    assert stream.config.t_index_list == (15, 32) and stream.version == 1
    controls.update(prompt="a dog", seed=9)
    assert (stream.prompt.prompt, stream.prompt.seed) == ("a dog", 9)
    assert controls.toggle_filter() is True and stream.config.filter.enabled
    with pytest.raises(ConfigError, match="not_allowed: 5 denoising steps are more than this server's 4"):
        stream.update(t_index_list=(5, 15, 25, 35, 45))  # the server's cap
    with pytest.raises(ConfigError, match="engine cannot run these settings.*max_batch_rows=4"):
        stream.update(cfg_type="initialize", t_index_list=(5, 15, 25, 35))  # 5 rows: its engine's limit
    with pytest.raises(ConfigError):
        stream.update(width=7)  # refused locally by StreamConfig
    assert stream.config.t_index_list == (15, 32)
    stream.close()
    assert stream.finished and stream.error is None
    remote.stop()


def test_realtime_streams_drop_the_oldest_and_report_a_server_side_end(live) -> None:
    server = live()
    remote = RemoteEngine(server.url)
    stream = remote.open_stream(CONFIG, "a cat", output_capacity=2)
    for i in range(60):  # much faster than the server's 30 frames/s: latest wins, nothing waits
        stream.submit(pattern_frame(i, 64, 64), frame_id=i)
    out = stream.get(timeout=30)
    assert out is not None and out.images.shape == (1, 3, 64, 64)
    assert stream.stats.dropped_inputs > 0
    server.stop()  # the server goes away: the stream ends with its reason
    while stream.get(timeout=30) is not None:
        pass
    assert isinstance(stream.error, StreamDiffError) and "1001" in str(stream.error)
    with pytest.raises(StreamClosed):
        stream.submit(pattern_frame(0, 64, 64))
    remote.stop()


def test_refusals_raise_in_open_stream(live, monkeypatch) -> None:
    server = live(token="s3cret")
    with RemoteEngine(server.url) as refused, pytest.raises(ServerRefused, match="unauthorized"):
        refused.open_stream(CONFIG)
    assert not any(t.name == "streamdiff-remote" for t in threading.enumerate())  # leaving stopped its loop
    monkeypatch.setenv("STREAMDIFF_TOKEN", "s3cret")
    engine = RemoteEngine(server.url)
    assert "s3cret" not in repr(engine)
    engine.open_stream(CONFIG).close()
    engine.stop()
