"""streamdiff/server/web: the static pages have the stable ids tests drive, and protocol.js speaks the same bytes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from streamdiff.server import WEB_DIR
from streamdiff.protocol.images import ImageFormat
from streamdiff.protocol.wire import OutputHeader, ServerTimings, pack_input_header, pack_output_frame

STREAM_IDS = {"status", "latency", "fps", "output", "prompt", "negative-prompt", "strength", "guidance", "seed",
              "error", "start-camera", "start-screen", "stop", "size", "view-url", "frames-sent", "frames-received"}
STATE_FIELDS = {"state", "framesSent", "framesReceived", "lastLatencyMs", "lastError", "fps", "streamId", "viewUrl"}


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if values.get("id"):
            self.ids.append(values["id"])
        if tag == "script" and values.get("src"):
            self.refs.append(values["src"])
        if tag == "link" and values.get("href") and not values["href"].startswith("data:"):
            self.refs.append(values["href"])


def _page(name: str) -> _Page:
    page = _Page()
    page.feed((WEB_DIR / name).read_text(encoding="utf-8"))
    return page


def test_stream_page_has_stable_ids_and_its_files() -> None:
    page = _page("index.html")
    assert STREAM_IDS <= set(page.ids)
    assert len(page.ids) == len(set(page.ids))
    assert sorted(page.refs) == ["app.js", "style.css"]
    for ref in page.refs:
        assert (WEB_DIR / ref).is_file()


def test_stream_page_has_a_hidden_controlnet_picker() -> None:
    html = (WEB_DIR / "index.html").read_text(encoding="utf-8")
    ids = {"controlnet-picker", "controlnet", "controlnet-scale", "controlnet-scale-value"}
    assert ids <= set(_page("index.html").ids)
    assert '<div id="controlnet-picker" class="sliders" hidden>' in html  # shown when the server offers any
    assert '<input id="controlnet-scale" type="range" min="0" max="2" step="0.05" value="1">' in html
    assert "message.limits && message.limits.controlnets" in (WEB_DIR / "app.js").read_text(encoding="utf-8")


def test_view_page_is_output_only() -> None:
    page = _page("view.html")
    assert set(page.ids) == {"output", "status"}
    assert sorted(page.refs) == ["style.css", "view.js"]


def test_pages_expose_a_read_only_state_object() -> None:
    app = (WEB_DIR / "app.js").read_text(encoding="utf-8")
    block = re.search(r"const state = \{(.*?)\n\};", app, re.S).group(1)
    assert STATE_FIELDS <= set(re.findall(r"^\s+(\w+):", block, re.M))
    assert "window.streamdiff = Object.freeze(api)" in app
    view = (WEB_DIR / "view.js").read_text(encoding="utf-8")
    assert "window.streamdiff = Object.freeze(api)" in view and "framesReceived" in view


def test_pages_use_the_documented_urls() -> None:
    assert 'socketUrl("/ws")' in (WEB_DIR / "app.js").read_text(encoding="utf-8")
    assert "socketUrl(`/ws/view/${encodeURIComponent(viewToken)}`)" in (WEB_DIR / "view.js").read_text(encoding="utf-8")


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node")
def test_protocol_js_packs_and_parses_the_same_bytes_as_python(tmp_path) -> None:
    output = pack_output_frame(OutputHeader(9, 4321.75, ImageFormat.WEBP, ServerTimings(1.5, 2.5, 3.5, 4.5, 12.0),
                                            settings_version=65535), b"IMG")
    script = tmp_path / "check.mjs"
    script.write_text(f"""
import {{ packInputFrame, parseOutputFrame, describeClose }} from {json.dumps((WEB_DIR / "protocol.js").as_uri())};
const input = new Uint8Array(packInputFrame(4294967295, 1234.5, new Uint8Array([1, 2, 3]).buffer));
const out = parseOutputFrame(new Uint8Array({list(output)}).buffer);
let error = null;
try {{ parseOutputFrame(new Uint8Array(40).buffer); }} catch (e) {{ error = e.message; }}
console.log(JSON.stringify({{
  input: Buffer.from(input).toString("hex"),
  output: {{ ...out, body: Array.from(out.body) }},
  error,
  full: describeClose(1013, ""),
  inUse: describeClose(1013, "view_token_in_use: another stream uses this view_token"),
  token: describeClose(1008, "unauthorized: the token is wrong"),
}}));
""")
    result = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=60, check=True)
    data = json.loads(result.stdout)
    assert data["input"] == (pack_input_header(2**32 - 1, 1234.5) + b"\x01\x02\x03").hex()
    assert data["output"] == {"frameId": 9, "clientTs": 4321.75, "settingsVersion": 65535, "mimeType": "image/webp",
                              "body": [73, 77, 71],
                              "timings": {"decodeMs": 1.5, "queueMs": 2.5, "engineMs": 3.5, "encodeMs": 4.5,
                                          "serverMs": 12.0}}
    assert data["error"] == "output frame header is not SDFO version 1 with format 1 (JPEG) or 2 (WebP)"
    assert data["full"] == "The server is full: every stream slot is busy. Try again later."
    assert data["inUse"] == "Another tab or stream uses this page's viewer URL; this page made a new one: start again."
    assert data["token"] == "Bad or missing token: open this page with ?token=YOUR_TOKEN."


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node")
def test_protocol_js_packs_a_reference_image_as_python_does(tmp_path) -> None:
    from streamdiff.protocol.wire import pack_reference_header

    script = tmp_path / "reference.mjs"
    script.write_text(f"""
import {{ packReferenceImage }} from {json.dumps((WEB_DIR / "protocol.js").as_uri())};
console.log(Buffer.from(new Uint8Array(packReferenceImage(70000, new Uint8Array([9, 8]).buffer))).toString("hex"));
""")
    result = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == (pack_reference_header(70000) + b"\x09\x08").hex()
    page = _page("index.html")
    assert {"image-prompt", "reference", "ip-scale", "ip-scale-value"} <= set(page.ids)


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node")
def test_rtc_js_puts_the_page_settings_in_a_whip_url_the_server_reads_back(tmp_path) -> None:
    from urllib.parse import parse_qsl, urlsplit

    from multidict import MultiDict

    from streamdiff.server.rtc.signaling import query_settings

    settings = {"width": 256, "height": 256, "prompt": "a watercolor, soft & light 100%", "negative_prompt": "",
                "strength": 0.5, "guidance_scale": 1.2, "seed": 7, "t_index_list": [32, 45]}
    script = tmp_path / "whip.mjs"
    script.write_text(f"""
import {{ whipUrl }} from {json.dumps((WEB_DIR / "rtc.js").as_uri())};
console.log(whipUrl({{ ...{json.dumps(settings)}, output: {{ format: "jpeg", quality: 80 }} }}, "view-token-1234567890"));
""")
    result = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=60, check=True)
    url = urlsplit(result.stdout.strip())
    assert url.path == "/whip"
    parsed, view_token = query_settings(MultiDict(parse_qsl(url.query, keep_blank_values=True)))
    assert parsed == settings and view_token == "view-token-1234567890"  # output.* is left out: output is video
