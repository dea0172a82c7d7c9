"""``streamdiff serve``: every limit is a flag with its safe default, run's model options and TOML config, and a real
process that serves clients and shuts down gracefully on SIGTERM/SIGINT (1001 to every client, exit status 0)."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
from pathlib import Path

import pytest

from streamdiff import ConfigError
from streamdiff.cli import build_parser
from streamdiff.commands import serve as serve_command
from streamdiff.protocol.limits import ServerLimits
from streamdiff.server.options import server_config
from streamdiff.testing.serve import ServeProcess


def _options(argv: list[str]) -> dict:
    return serve_command.resolve_options(build_parser().parse_args(["serve", *argv]))


def test_every_limit_is_a_flag_with_its_safe_default(monkeypatch) -> None:
    monkeypatch.delenv("STREAMDIFF_TOKEN", raising=False)
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()  # noqa: SLF001
    flags = {"controlnets": "--controlnet"}  # NAME=ID_OR_PATH, repeatable: the limit lists the names it loaded
    for f in dataclasses.fields(ServerLimits):
        assert flags.get(f.name, f"--{f.name.replace('_', '-')}") in help_text, f.name
    config = server_config(_options([]))
    assert config.limits == ServerLimits() and config.host == "127.0.0.1" and config.token is None
    assert config.origins.allow_loopback and not config.origins.allowed
    config = server_config(_options([
        "--max-streams", "2", "--max-input-fps", "12.5", "--allowed-cfg-types", "self,none", "--hello-timeout-s", "3",
        "--allowed-origin", "https://a.example", "--no-loopback-origins", "--port", "0", "--prompt", "house style",
        "--size", "128x128"]))
    assert (config.limits.max_streams, config.limits.max_input_fps, config.limits.hello_timeout_s) == (2, 12.5, 3.0)
    assert [c.value for c in config.limits.allowed_cfg_types] == ["self", "none"]
    assert config.origins.allowed == {"https://a.example"} and not config.origins.allow_loopback
    assert config.defaults.prompt.prompt == "house style" and config.defaults.stream.width == 128



def test_host_allowlist_and_metrics_token_flags(monkeypatch) -> None:
    monkeypatch.delenv("STREAMDIFF_TOKEN", raising=False)
    config = server_config(_options([]))
    assert not config.hosts.allowed and not config.metrics_token_required
    config = server_config(_options(["--allowed-hosts", "Studio.example.com, 127.0.0.1,[::1]",
                                                   "--token", "s3cret", "--metrics-token-required"]))
    assert config.hosts.allowed == {"studio.example.com", "127.0.0.1", "::1"} and config.metrics_token_required
    with pytest.raises(ConfigError, match="metrics_token_required=True needs a token"):
        server_config(_options(["--metrics-token-required"]))

def test_toml_config_environment_token_and_clear_errors(tmp_path: Path, monkeypatch) -> None:
    file = tmp_path / "serve.toml"
    file.write_text('model = "tiny"\nmax-streams = 3\nmax_input_fps = 20\nprompt = "ink"\nstrength = 0.5\n'
                    'allowed_origin = ["https://studio.example"]\n')
    monkeypatch.setenv("STREAMDIFF_TOKEN", "from-env")
    options = _options(["--config", str(file), "--max-streams", "5"])
    config = server_config(options)
    assert config.limits.max_streams == 5 and config.limits.max_input_fps == 20 and config.token == "from-env"
    assert config.defaults.stream.t_index_list == (25, 37) and config.origins.allowed == {"https://studio.example"}
    assert "from-env" not in repr(config)
    bad = tmp_path / "bad.toml"
    bad.write_text("max_streems = 3\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['max_streems'\]"):
        _options(["--config", str(bad)])
    with pytest.raises(ConfigError, match="max_streams=0 must be an integer >= 1"):
        server_config(_options(["--max-streams", "0"]))
    with pytest.raises(ConfigError, match=r"^max_batch_rows=0 must be >= 1$"):  # refused before any model loads
        serve_command.run(build_parser().parse_args(["serve", "--max-batch-rows", "0"]))
    with pytest.raises(ConfigError, match="break the server's limits"):
        server_config(_options(["--size", "2048x2048"]))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_real_server_streams_then_shuts_down_gracefully(tiny_model, sig: int) -> None:
    from streamdiff.client import StreamClient
    from streamdiff.io.sources import pattern_frame

    served = ServeProcess("--size", "64x64", "--stats-interval", "0")

    async def main() -> tuple:
        url = f"ws://127.0.0.1:{served.port}/ws"
        async with await StreamClient.connect(url, {"prompt": "a cat"}) as client:
            assert client.settings.stream.width == 64  # the server's default size
            for i in range(6):
                await client.send_frame(pattern_frame(i, 64, 64), frame_id=i)
                await asyncio.sleep(0.05)
            await client.wait_for(lambda: len(client.outputs) >= 2, timeout=30)
            served.process.send_signal(sig)
            await asyncio.wait_for(client.closed.wait(), 30)
            return client.close_code, client.error.code if client.error else None

    assert asyncio.run(main()) == (1001, "shutting_down")
    assert served.process.wait(30) == 0
    log = "".join(served.log)
    assert "closed: 1001 (shutting_down: the server is shutting down)" in log and "engine worker stopped" in log


def test_sizes_restrict_the_engine_and_the_limits_clients_see(tiny_model) -> None:
    from streamdiff.engine import EngineConfig, StreamEngine

    with pytest.raises(ConfigError, match=r"^sizes entry 200x200: width=200 is not a multiple of 32 \(the tiny "
                                          r"model's VAE factor 8 × U-Net down factor 4\)"):  # at start, nothing built
        serve_command.run(build_parser().parse_args(["serve", "--backend", "openvino", "--sizes", "256,200"]))
    listed = StreamEngine(tiny_model, EngineConfig(max_streams=4, sizes=((256, 256), (512, 384))), backend="openvino")
    limits = ServerLimits().for_engine(listed)
    assert (limits.size_multiple, limits.max_width, limits.max_height) == (32, 512, 384)
    assert limits.sizes == ("256x256", "512x384") and limits.to_json()["sizes"] == ["256x256", "512x384"]
    ranged = StreamEngine(tiny_model, EngineConfig(max_streams=4), backend="openvino")
    assert ServerLimits(size_multiple=16, max_width=600).for_engine(ranged) == ServerLimits(
        size_multiple=32, max_width=576, max_height=1024)
    eager = StreamEngine(tiny_model, EngineConfig(max_streams=4))
    assert ServerLimits().for_engine(eager) == ServerLimits()


def test_ip_adapter_flag_names_the_adapter_clients_choose(cache_dir) -> None:
    from streamdiff.options import model_options, parse_ip_adapter

    options = model_options(_options(["--ip-adapter", "style=tiny", "--model", "tiny-random"]))
    assert (options.ip_adapter_name, options.ip_adapter) == ("style", "tiny")
    engine = options.stream_engine(2, 8)
    # auto picks as for any model: OpenVINO on the CPU takes the image prompt's inputs (docs/models.md)
    assert engine.backend.value == "openvino" and ServerLimits().for_engine(engine).ip_adapter == "style"
    assert parse_ip_adapter("/adapters/ip.safetensors") == (None, "/adapters/ip.safetensors")
    assert parse_ip_adapter("/a=b/ip.safetensors") == (None, "/a=b/ip.safetensors")
    with pytest.raises(ConfigError, match="NAME=ID_OR_PATH"):
        parse_ip_adapter("style=")

def test_controlnet_flags_name_what_the_server_offers(tiny_model, monkeypatch) -> None:
    from streamdiff.options import model_options

    monkeypatch.delenv("STREAMDIFF_TOKEN", raising=False)
    options = _options(["--controlnet", "edges=tiny", "--controlnet", "lines=/models/cn-lineart"])
    assert model_options(options).controlnets == (("edges", "tiny"), ("lines", "/models/cn-lineart"))
    assert server_config(options).defaults.prompt.controlnets == ()  # clients choose; nothing is on by default
    assert model_options(_options([])).controlnets == ()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--controlnet", "no-name-given"])
