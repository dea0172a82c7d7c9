"""The stream page and the view page in real headless Chromium, driven by Playwright, against a live server.

Chromium's fake camera plays a Y4M clip of one still picture, so the stream's output is still too (cfg "none":
every output is a pure function of its input frame) and a prompt change is seen as a new, again still, output.
The WebRTC test plays a moving clip to a server with WHIP mounted (ICE on 127.0.0.1 only).
Chromium is Debian's (``/usr/bin/chromium``; Playwright's own browsers are never downloaded). Without it the tests
skip, unless ``STREAMDIFF_REQUIRE_BROWSER=1`` (CI) makes that a failure.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from streamdiff import StreamConfig
from streamdiff.io.sources import pattern_frame
from streamdiff.protocol.settings import StreamSettings

CHROMIUM = os.environ.get("STREAMDIFF_CHROMIUM", "/usr/bin/chromium")
REQUIRED = os.environ.get("STREAMDIFF_REQUIRE_BROWSER") == "1"


def _browser_or_skip() -> None:
    reason = None
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        reason = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "playwright is not installed (pip install playwright; never `playwright install`)"
    if reason is not None:
        if REQUIRED:
            pytest.fail(f"STREAMDIFF_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)


def y4m_frame(rgb: np.ndarray) -> bytes:
    """One 4:2:0 Y4M frame (BT.601 studio range) of an RGB uint8 image."""
    height, width = rgb.shape[:2]
    rgb = rgb.astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 16 + 0.257 * r + 0.504 * g + 0.098 * b
    u = 128 - 0.148 * r - 0.291 * g + 0.439 * b
    v = 128 + 0.439 * r - 0.368 * g - 0.071 * b
    half = (height // 2, 2, width // 2, 2)
    planes = [y, u.reshape(half).mean((1, 3)), v.reshape(half).mean((1, 3))]
    return b"FRAME\n" + b"".join(np.clip(p.round(), 0, 255).astype(np.uint8).tobytes() for p in planes)


def write_y4m(path: Path, width: int = 320, height: int = 240, frames: int = 10, moving: bool = False) -> None:
    """A Y4M clip (4:2:0) at 30 fps that Chromium's fake camera plays in a loop: one still test picture, or
    (``moving``) the moving test pattern."""
    body = b"".join(y4m_frame(pattern_frame(i if moving else 7, width, height)) for i in range(frames))
    path.write_bytes(f"YUV4MPEG2 W{width} H{height} F30:1 Ip A1:1 C420jpeg\n".encode() + body)


@pytest.fixture()
def chromium(tmp_path: Path):
    clip = tmp_path / "clip.y4m"
    write_y4m(clip)
    yield from launch_chromium(clip)


@pytest.fixture()
def chromium_moving(tmp_path: Path):
    clip = tmp_path / "moving.y4m"
    write_y4m(clip, frames=60, moving=True)
    yield from launch_chromium(clip)


def launch_chromium(clip: Path):
    """Headless Chromium whose camera plays ``clip``; yields a browser context allowed to use it (tools use it too)."""
    _browser_or_skip()
    from playwright.sync_api import sync_playwright

    args = ["--no-sandbox", "--disable-gpu", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
            f"--use-file-for-fake-video-capture={clip}", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run",
            "--autoplay-policy=no-user-gesture-required"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        context = browser.new_context(permissions=["camera"])
        yield context
        context.close()
        browser.close()


_CANVAS_DIGEST = """() => {
  const c = document.getElementById("output");
  const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  let h = 0, sum = 0;
  for (let i = 0; i < d.length; i += 1) { h = (h * 31 + d[i]) >>> 0; sum += d[i]; }
  return [c.width, c.height, h, sum];
}"""


def _digest_when_still(page, different_from=None, timeout: float = 30.0) -> list:
    """The output canvas's digest once three readings 0.2 s apart agree (and differ from ``different_from``)."""
    deadline = time.monotonic() + timeout
    readings: list = []
    while time.monotonic() < deadline:
        readings = (readings + [page.evaluate(_CANVAS_DIGEST)])[-3:]
        if len(readings) == 3 and readings[0] == readings[1] == readings[2] and readings[0][3] > 0 \
                and readings[0] != different_from:
            return readings[0]
        page.wait_for_timeout(200)  # sampling a canvas that only the page's own frames change
    raise AssertionError(f"the output did not settle: {readings}")


def test_the_stream_page_and_the_view_page_in_headless_chromium(live, chromium) -> None:
    defaults = StreamSettings(StreamConfig(width=256, height=256, cfg_type="none"))
    server = live(defaults=defaults)
    page = chromium.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(server.http_url + "/?transport=ws")
    assert page.input_value("#transport") == "ws"
    page.select_option("#size", "256")
    page.click("#start-camera")
    page.wait_for_function("() => window.streamdiff.state === 'streaming'", timeout=30_000)
    page.wait_for_function("() => window.streamdiff.framesReceived >= 5", timeout=60_000)
    assert page.evaluate("() => window.streamdiff.transport") == "ws"

    state = page.evaluate("() => ({...window.streamdiff})")
    assert state["framesSent"] >= state["framesReceived"] >= 5 and state["lastError"] is None
    assert 0 < state["lastLatencyMs"] < 10_000 and page.text_content("#latency").strip().isdigit()
    assert float(page.text_content("#fps")) > 0 and page.text_content("#frames-received").strip() != "0"
    first = _digest_when_still(page)
    assert first[:2] == [256, 256]  # stylised frames are drawn, at the stream's size

    page.fill("#prompt", "an oil painting of a lighthouse")  # the page sends an update; the output changes
    changed = _digest_when_still(page, different_from=first)
    assert changed != first

    view = chromium.new_page()
    view.goto(state["viewUrl"])
    view.wait_for_function("() => window.streamdiff.framesReceived >= 3", timeout=30_000)
    assert view.evaluate("() => window.streamdiff.streamId") == state["streamId"]
    assert _digest_when_still(view) == _digest_when_still(page)  # the same stream, the same picture
    assert errors == []
    hub = server.hub
    session = next(iter(hub.sessions.values()))
    assert session.conn.settings.prompt.prompt == "an oil painting of a lighthouse" and len(session.viewers) == 1


def test_the_stream_page_sends_an_image_prompt(cache_dir, chromium, tmp_path: Path) -> None:
    import time

    import numpy as np
    from PIL import Image

    from streamdiff import load_model
    from streamdiff.engine import EngineConfig, StreamEngine
    from streamdiff.server.app import BackgroundServer
    from streamdiff.server.hub import ServerConfig
    from streamdiff.protocol.limits import ServerLimits

    model = load_model("tiny-random", device="cpu", ip_adapter="tiny")
    model.ip_adapter.name = "style"
    engine = StreamEngine(model, EngineConfig(max_streams=1))
    defaults = StreamSettings(StreamConfig(width=256, height=256, cfg_type="none"))
    limits = ServerLimits(max_streams=1).for_engine(engine)
    server = BackgroundServer(engine, ServerConfig(port=0, limits=limits, defaults=defaults)).start()
    try:
        page = chromium.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(server.http_url + "/")
        page.select_option("#size", "256")
        page.click("#start-camera")
        page.wait_for_function("() => window.streamdiff.state === 'streaming'", timeout=30_000)
        # WebRTC is the page's default; this server has no WHIP route (404), so the page fell back to the WebSocket
        assert page.evaluate("() => window.streamdiff.transport") == "ws"
        assert page.is_visible("#image-prompt")
        assert not page.is_visible("#controlnet-picker")  # this server offers no ControlNet
        reference = tmp_path / "reference.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8)).save(reference)
        page.set_input_files("#reference", str(reference))
        session = next(iter(server.hub.sessions.values()))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            extras = session.stream.state.extras if session.stream.state is not None else None
            if extras is not None and abs(float(extras.batch["ip_scale"][0]) - 0.6) < 1e-6:
                break
            time.sleep(0.1)
        assert session.conn.settings.ip_adapter == "style" and session.stream.prompt.reference_image is not None
        assert float(session.stream.state.extras.batch["ip_scale"][0]) == pytest.approx(0.6)  # the page's weight
        assert engine.images.encoder_calls == 1
        assert errors == [] and page.evaluate("() => window.streamdiff.lastError") is None
    finally:
        server.stop()


def test_the_stream_page_chooses_a_controlnet(tiny_model, chromium) -> None:
    """The page lists the server's ControlNets (ready.limits.controlnets) in its picker; choosing one sends an update
    with the slider's weight, the server's stream uses it, and the output goes on; "none" sends []."""
    from streamdiff import ControlNetSpec
    from streamdiff.engine import EngineConfig, StreamEngine
    from streamdiff.protocol.limits import ServerLimits
    from streamdiff.server.app import BackgroundServer
    from streamdiff.server.hub import ServerConfig

    engine = StreamEngine(tiny_model, EngineConfig(max_streams=1), controlnets={"edges": "tiny"})
    defaults = StreamSettings(StreamConfig(width=256, height=256, cfg_type="none"))
    limits = ServerLimits(max_streams=1).for_engine(engine)
    assert limits.controlnets == ("edges",)
    server = BackgroundServer(engine, ServerConfig(port=0, limits=limits, defaults=defaults)).start()
    try:
        page = chromium.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(server.http_url + "/?transport=ws")
        assert not page.is_visible("#controlnet-picker")  # until the server says what it offers
        page.select_option("#size", "256")
        page.click("#start-camera")
        page.wait_for_function("() => window.streamdiff.state === 'streaming'", timeout=30_000)
        page.wait_for_function("() => window.streamdiff.framesReceived >= 3", timeout=60_000)
        assert page.is_visible("#controlnet-picker") and page.input_value("#controlnet") == ""
        options = page.eval_on_selector_all("#controlnet option", "options => options.map(o => [o.value, o.text])")
        assert options == [["", "none"], ["edges", "edges"]]
        (session,) = server.hub.sessions.values()
        assert session.conn.settings.prompt.controlnets == () and page.evaluate(
            "() => window.streamdiff.settingsVersion") == 0

        page.fill("#controlnet-scale", "0.7")  # no update while none is chosen
        assert page.text_content("#controlnet-scale-value") == "0.70"
        page.select_option("#controlnet", "edges")
        page.wait_for_function("() => window.streamdiff.settingsVersion >= 1", timeout=30_000)
        assert page.evaluate("() => window.streamdiff.settingsVersion") == 1  # one update: the choice
        assert session.conn.settings.prompt.controlnets == (ControlNetSpec("edges", 0.7),)
        received = page.evaluate("() => window.streamdiff.framesReceived")
        page.wait_for_function(f"() => window.streamdiff.framesReceived >= {received + 5}", timeout=60_000)

        page.select_option("#controlnet", "")  # none: the stream's list is emptied
        page.wait_for_function("() => window.streamdiff.settingsVersion >= 2", timeout=30_000)
        assert session.conn.settings.prompt.controlnets == ()
        received = page.evaluate("() => window.streamdiff.framesReceived")
        page.wait_for_function(f"() => window.streamdiff.framesReceived >= {received + 3}", timeout=60_000)
        assert errors == [] and page.evaluate("() => window.streamdiff.lastError") is None
    finally:
        server.stop()


_VIDEO_PIXELS = """() => {
  const v = document.getElementById("output-video");
  const c = document.createElement("canvas");
  c.width = v.videoWidth; c.height = v.videoHeight;
  const ctx = c.getContext("2d");
  ctx.drawImage(v, 0, 0);
  const d = ctx.getImageData(0, 0, c.width, c.height).data;
  let h = 0, sum = 0;
  for (let i = 0; i < d.length; i += 1) { h = (h * 31 + d[i]) >>> 0; sum += d[i]; }
  return [c.width, c.height, h, sum / d.length];
}"""


def test_the_stream_page_streams_over_webrtc(chromium_moving) -> None:
    """WebRTC is the page's default: the camera's track to POST /whip, the output track into the output <video>,
    the protocol's messages on a data channel; the page measures latency by RTP timestamp; Stop DELETEs the
    resource and frees the stream's slot."""
    from streamdiff import load_model
    from streamdiff.engine import EngineConfig, StreamEngine
    from streamdiff.protocol.limits import ServerLimits
    from streamdiff.server.app import BackgroundServer
    from streamdiff.server.hub import ServerConfig
    from streamdiff.server.rtc import RtcConfig

    engine = StreamEngine(load_model("tiny-random", device="cpu"), EngineConfig(max_streams=2))
    defaults = StreamSettings(StreamConfig(width=256, height=256, cfg_type="none"))
    config = ServerConfig(port=0, token="page-token-1234", limits=ServerLimits(max_streams=2), defaults=defaults)
    server = BackgroundServer(engine, config, rtc=RtcConfig(hosts=("127.0.0.1",))).start()
    try:
        page = chromium_moving.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(server.http_url + "/?token=page-token-1234")
        assert page.input_value("#transport") == "webrtc"
        page.select_option("#size", "256")
        page.click("#start-camera")
        page.wait_for_function("() => window.streamdiff.state === 'streaming'", timeout=30_000)
        page.wait_for_function("() => window.streamdiff.framesReceived >= 10", timeout=60_000)
        state = page.evaluate("() => ({...window.streamdiff})")
        assert state["transport"] == "webrtc" and state["settingsVersion"] == 0 and state["lastError"] is None
        assert page.is_visible("#output-video") and not page.is_visible("#output")
        (session,) = server.hub.sessions.values()
        assert session.stream_id == state["streamId"] and session.conn.settings.stream.width == 256

        # stylised frames are shown at the stream's size, not black, and they move with the camera
        first = page.evaluate(_VIDEO_PIXELS)
        page.wait_for_timeout(500)  # the clip moves at 30 fps: the next reading shows later frames
        second = page.evaluate(_VIDEO_PIXELS)
        assert first[:2] == [256, 256] and first[3] > 10 and second[3] > 10, (first, second)
        assert first[2] != second[2], "the output video does not change"

        # end-to-end latency, matched by RTP timestamp, on the page and in its state
        page.wait_for_function("() => window.streamdiff.lastLatencyMs !== null", timeout=30_000)
        state = page.evaluate("() => ({...window.streamdiff})")
        assert 0 < state["lastLatencyMs"] < 10_000 and state["latencyMeasure"] == "end-to-end"
        assert page.text_content("#latency").strip().isdigit() and float(page.text_content("#fps")) > 0

        # a live prompt change goes over the data channel and is acknowledged
        page.fill("#prompt", "an oil painting of a lighthouse")
        page.wait_for_function("() => window.streamdiff.settingsVersion >= 1", timeout=30_000)
        assert session.conn.settings.prompt.prompt == "an oil painting of a lighthouse"

        page.click("#stop")  # DELETE /whip/RESOURCE: the stream ends and its slot is free
        deadline = time.monotonic() + 15
        while server.hub.sessions and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not server.hub.sessions
        assert errors == [] and page.evaluate("() => window.streamdiff.lastError") is None
    finally:
        server.stop()
