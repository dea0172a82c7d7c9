"""The sans-I/O parts of WHIP/WHEP: offer checks, the WHIP URL's query, bearer tokens, resources, RtcConfig and its
serve options. No sockets, no aiortc."""

from __future__ import annotations

import pytest

from streamdiff.cli import build_parser
from streamdiff.commands import serve as serve_command
from streamdiff.errors import ConfigError
from streamdiff.server.rtc import RtcConfig
from streamdiff.server.rtc.signaling import (
    ResourceTable,
    SignalingError,
    bearer_token,
    check_offer,
    query_settings,
    summarize,
    token_matches,
)
from streamdiff.server.options import rtc_config

HEAD = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
VIDEO = ("m=video 9 UDP/TLS/RTP/SAVPF 96 97 98\r\na=rtpmap:96 H264/90000\r\na=rtpmap:97 rtx/90000\r\n"
         "a=rtpmap:98 VP8/90000\r\n")


def _refused(body: str, status: int, publish: bool = True, content_type: str = "application/sdp",
             config: RtcConfig | None = None) -> str:
    with pytest.raises(SignalingError) as error:
        check_offer(body.encode(), content_type, config or RtcConfig(), publish=publish)
    assert error.value.status == status, error.value
    return str(error.value)


def test_offers_are_summarized_and_checked() -> None:
    obs = HEAD + VIDEO + "a=sendonly\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\na=sendonly\r\n"
    text, summary = check_offer(obs.encode(), "application/sdp; charset=utf-8", RtcConfig(), publish=True)
    assert text == obs and summary.sends_video() and not summary.receives_video() and not summary.data_channel
    assert summary.video[0].codecs == ("H264", "RTX", "VP8")
    browser = HEAD + "a=sendrecv\r\n" + VIDEO + "m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n"
    summary = summarize(browser)
    assert summary.sends_video() and summary.receives_video() and summary.data_channel  # session-level direction
    assert "application/sdp" in _refused(obs, 415, content_type="text/plain")
    assert "16384" in _refused(obs + "a=x:" + "y" * 16384 + "\r\n", 413)
    assert "v=0" in _refused("hello", 400)
    assert "no video" in _refused(HEAD + "m=audio 9 RTP/AVP 0\r\n", 400)
    assert "sends no video" in _refused(HEAD + VIDEO + "a=recvonly\r\n", 400)
    assert "receives no video" in _refused(HEAD + VIDEO + "a=sendonly\r\n", 400, publish=False)
    check_offer((HEAD + VIDEO + "a=sendonly\r\n").encode(), "application/sdp", RtcConfig(video_codecs=("VP8",)),
                publish=True)
    vp8 = HEAD + "m=video 9 UDP/TLS/RTP/SAVPF 98\r\na=rtpmap:98 VP8/90000\r\na=sendonly\r\n"
    assert "(VP8) are not allowed; allowed: H264" in _refused(vp8, 406, config=RtcConfig(video_codecs=("H264",)))
    av1 = HEAD + "m=video 9 UDP/TLS/RTP/SAVPF 45 46\r\na=rtpmap:45 AV1/90000\r\na=rtpmap:46 rtx/90000\r\n"
    assert "(AV1) are not allowed; allowed: H264, VP8" in _refused(av1, 406)


def test_query_parameters_become_hello_settings() -> None:
    settings, view = query_settings({"prompt": "a cat", "width": "128", "guidance_scale": "1.5",
                                     "t_index_list": "20,35", "view_token": "abcdefghijklmnop"})
    assert settings == {"prompt": "a cat", "width": 128, "guidance_scale": 1.5, "t_index_list": [20, 35]}
    assert view == "abcdefghijklmnop"
    assert query_settings({}) == ({}, None)
    for query, expected in (({"width": "12.5"}, "must be an integer"), ({"seed": "1e3"}, "must be an integer"),
                            ({"delta": "nan"}, "must be a number"), ({"token": "x"}, "'token' is not known"),
                            ({"t_index_list": "1,,2"}, "integers separated by commas")):
        with pytest.raises(SignalingError, match=expected) as error:
            query_settings(query)
        assert error.value.status == 400


def test_bearer_tokens_and_resources_bound_to_them() -> None:
    assert bearer_token("Bearer abc") == "abc" and bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None and bearer_token(None) is None and bearer_token("Bearer") is None
    assert token_matches(None, None) and token_matches("x", None)
    assert token_matches("abc", "abc") and not token_matches("abd", "abc") and not token_matches(None, "abc")
    table: ResourceTable[str] = ResourceTable()
    first, second = table.add("one", "t1"), table.add("two", None)
    assert first != second and len(first) >= 32 and len(table) == 2
    assert table.find(first, "t1") == "one" and table.find(second, None) == "two"
    for resource, token, status in ((first, "t2", 401), (first, None, 401), ("nope", "t1", 404)):
        with pytest.raises(SignalingError) as error:
            table.find(resource, token)
        assert error.value.status == status
    assert table.remove(first) == "one" and table.remove(first) is None and table.values() == ["two"]


def test_rtc_config_is_validated_and_comes_from_serve_options(monkeypatch) -> None:
    config = RtcConfig(hosts=("127.0.0.1", "[::1]", "127.0.0.1"), video_codecs=("vp8", "h264"))
    assert config.hosts == ("127.0.0.1", "::1") and config.video_codecs == ("VP8", "H264")
    for kwargs, expected in (({"hosts": ("eth0",)}, "'eth0' is not an IP address"),
                             ({"hosts": "127.0.0.1"}, "must be a list"),
                             ({"video_codecs": ("VP9",)}, "give one or more of H264, VP8"),
                             ({"max_sdp_bytes": 10}, r"outside \[1024, 1048576\]"),
                             ({"connect_timeout_s": 0}, "must be a finite number > 0"),
                             ({"ports": "50100-50000"}, "'50100-50000' is not a UDP port range FIRST-LAST"),
                             ({"ports": "80-90"}, "1024 <= FIRST <= LAST <= 65535"),
                             ({"ports": "5000-x"}, "is not a UDP port range"),
                             ({"ports": (50000, 50001, 50002)}, "is not a UDP port range")):
        with pytest.raises(ConfigError, match=expected):
            RtcConfig(**kwargs)
    monkeypatch.delenv("STREAMDIFF_TOKEN", raising=False)

    def options(*argv: str) -> dict:
        return serve_command.resolve_options(build_parser().parse_args(["serve", *argv]))

    assert rtc_config(options()) == RtcConfig()
    assert rtc_config(options("--rtc-host", "127.0.0.1", "--rtc-host", "10.0.0.2", "--rtc-codecs", "vp8",
                              "--rtc-max-sdp-bytes", "4096", "--rtc-connect-timeout", "3",
                              "--rtc-port-range", "50000-50100")) == RtcConfig(
        hosts=("127.0.0.1", "10.0.0.2"), video_codecs=("VP8",), max_sdp_bytes=4096, connect_timeout_s=3.0,
        ports=(50000, 50100))
    assert RtcConfig(ports="6000").ports == (6000, 6000) and RtcConfig(ports=[6000, 6001]).ports == (6000, 6001)


def test_rtc_quality_comes_from_serve_options_and_the_config_file(tmp_path, monkeypatch) -> None:
    """``rtc_quality``: the output encoder's crf (default 26), or ``aiortc`` for aiortc's own encoder; from a
    ``--config`` TOML file like every server option."""
    from streamdiff.server.rtc.encoder import EncoderConfig

    monkeypatch.delenv("STREAMDIFF_TOKEN", raising=False)

    def options(*argv: str) -> dict:
        return serve_command.resolve_options(build_parser().parse_args(["serve", *argv]))

    assert rtc_config(options()).encoder == EncoderConfig(crf=26)
    for value, expected in (("24", EncoderConfig(crf=24)), ('"aiortc"', None)):
        path = tmp_path / "serve.toml"
        path.write_text(f"rtc_quality = {value}\n")
        assert rtc_config(options("--config", str(path))).encoder == expected
    path.write_text("rtc_quality = 60\n")
    with pytest.raises(ConfigError, match=r"rtc_quality=60 is not a crf in \[0, 51\]"):
        rtc_config(options("--config", str(path)))
    assert rtc_config(options("--rtc-quality", "30")).encoder == EncoderConfig(crf=30)  # the flag, as a string
    assert rtc_config(options("--rtc-quality", "aiortc")).encoder is None
    with pytest.raises(ConfigError, match=r"rtc_quality='best' is not a crf"):
        rtc_config(options("--rtc-quality", "best"))
