"""The options every command shares: value parsers, their error texts, and `run` / `engines build` agreeing."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest

from streamdiff import ConfigError, LoraSpec, StreamConfig
from streamdiff.cli import build_parser, main
from streamdiff.commands import engines as engines_command
from streamdiff.commands import run as run_command
from streamdiff.commands.options import lora_arg, size_arg
from streamdiff.options import parse_lora, stream_config
from streamdiff.config import parse_int_list


@pytest.mark.parametrize(
    "text, source, scale",
    [
        ("style.safetensors", "style.safetensors", 1.0),
        ("w.safetensors:-0.5", "w.safetensors", -0.5),
        ("w.safetensors:+2", "w.safetensors", 2.0),
        ("w.safetensors:0", "w.safetensors", 0.0),
        ("org/lcm-lora:1e-1", "org/lcm-lora", 0.1),
        ("org/lcm-lora:.5", "org/lcm-lora", 0.5),
        ("org/lcm-lora:-2.5E+0", "org/lcm-lora", -2.5),
        (" loras/x.safetensors:0.8 ", "loras/x.safetensors", 0.8),
        ("C:\\loras\\x.safetensors", "C:\\loras\\x.safetensors", 1.0),
        ("C:\\loras\\x.safetensors:0.8", "C:\\loras\\x.safetensors", 0.8),
        ("d:/loras/x.safetensors:-1", "d:/loras/x.safetensors", -1.0),
        ("\\\\server\\share\\x.safetensors:0.5", "\\\\server\\share\\x.safetensors", 0.5),
        ("odd:name/x.safetensors:1", "odd:name/x.safetensors", 1.0),
    ],
)
def test_lora_source_and_scale(text: str, source: str, scale: float) -> None:
    assert parse_lora(text) == LoraSpec(source, scale)
    assert lora_arg(text) == LoraSpec(source, scale)


@pytest.mark.parametrize(
    "text, message",
    [
        ("x:nan", "LoRA 'x' scale=nan must be a finite number"),
        ("x:-inf", "LoRA 'x' scale=-inf must be a finite number"),
        (":0.5", "LoRA ':0.5' has a scale but no source; give SOURCE:SCALE"),
        ("x:", "LoRA 'x:': scale '' after the last ':' is not a number"),
        ("x:half", "LoRA 'x:half': scale 'half' after the last ':' is not a number; give SOURCE or SOURCE:SCALE"),
        ("odd:name/x.safetensors", "a path with a colon needs an explicit scale, e.g. odd:name/x.safetensors:1"),
        ("C:\\a:b\\x.safetensors", "scale 'b\\\\x.safetensors' after the last ':' is not a number"),
        ("", "LoRA '' must be SOURCE or SOURCE:SCALE"),
        (0.5, "LoRA 0.5 must be SOURCE or SOURCE:SCALE"),
    ],
)
def test_lora_errors(text: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_lora(text)
    assert message in str(info.value)
    if isinstance(text, str):
        with pytest.raises(argparse.ArgumentTypeError) as arg_info:
            lora_arg(text)
        assert str(arg_info.value) == str(info.value)  # the flag reports the same text


@pytest.mark.parametrize(
    "value, expected",
    [("32,45", (32, 45)), (" 32 , 45 ", (32, 45)), ("7", (7,)), (7, (7,)), ([32, 45], (32, 45)), ((1,), (1,)),
     ("-1", (-1,))],
)
def test_int_lists(value: object, expected: tuple[int, ...]) -> None:
    assert parse_int_list(value) == expected


@pytest.mark.parametrize(
    "value, message",
    [
        ("32,x", "t_index_list='32,x' is not a comma-separated list of integers (e.g. 32,45)"),
        ("32,,45", "t_index_list='32,,45' is not a comma-separated list"),
        ("32;45", "is not a comma-separated list"),
        ("", "t_index_list='' is not a comma-separated list"),
        ("1.5", "is not a comma-separated list"),
        ([32, 4.5], "t_index_list entry=4.5 must be an integer, not float"),
        ([True], "t_index_list entry=True must be an integer, not bool"),
        (1.5, "t_index_list=1.5 is not a list of integers"),
    ],
)
def test_int_list_errors(value: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_int_list(value)
    assert message in str(info.value)


def _parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


@pytest.mark.parametrize("command", [["run"], ["engines", "build"]])
def test_every_spelling_of_sizes_and_timesteps_means_the_same(command: list[str]) -> None:
    spellings = [
        ["--size", "512", "--t-index-list", "20,40"],
        ["--size", "512x512", "--t-index-list", "20", "40"],
        ["--size", "512X512", "--t-index-list", "20", "40"],
    ]
    parsed = [_parse(command + spelling) for spelling in spellings]
    assert all(args.size == (512, 512) and args.t_index_list == (20, 40) for args in parsed)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--size", "64by64"], "argument --size: size='64by64' is not WIDTHxHEIGHT or a single N for NxN"),
        (["engines", "build", "--size", "0x64"], "argument --size: size='0x64' must have positive sides"),
        (["run", "--lora", "x:half"], "argument --lora: LoRA 'x:half': scale 'half' after the last ':' is not a"),
        (["engines", "build", "--lora", ":1"], "argument --lora: LoRA ':1' has a scale but no source"),
        (["run", "--t-index-list", "32,x"], "argument --t-index-list: t_index_list='32,x' is not a comma-separated"),
        (["run", "--output-size", "big"], "argument --output-size: output_size='big' is not WIDTHxHEIGHT"),
        (["run", "--camera-size", "1280x"], "argument --camera-size: size='1280x' is not WIDTHxHEIGHT"),
        (["engines", "build", "--batch-sizes", "4,b"], "argument --batch-sizes: t_index_list='4,b' is not a"),
    ],
)
def test_bad_flags_are_usage_errors_with_the_parser_message(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        _parse(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_size_arg_reports_the_parser_text() -> None:
    assert size_arg("640x480") == (640, 480) and size_arg("96") == (96, 96)
    with pytest.raises(argparse.ArgumentTypeError, match="is not WIDTHxHEIGHT or a single N"):
        size_arg("x")


def test_config_file_values_go_through_the_same_parsers(tmp_path: Path) -> None:
    """`size = 512` and `t_index_list = [20, 40]` in TOML mean what --size 512 --t-index-list 20,40 mean; wrong
    types fail instead of being coerced (`filter = "no"` used to switch the filter on)."""
    config = tmp_path / "run.toml"
    config.write_text('size = 512\nt_index_list = [20, 40]\nlora = "w.safetensors:-0.5"\n')
    from_file = run_command.build_request(run_command.resolve_options(_parse(["run", "--config", str(config)])))
    from_flags = run_command.build_request(run_command.resolve_options(_parse(
        ["run", "--size", "512", "--t-index-list", "20,40", "--lora", "w.safetensors:-0.5"])))
    assert from_file == from_flags
    for text, message in [('filter = "no"', "enabled='no' must be True or False"),
                          ('size = "big"', "size='big' is not WIDTHxHEIGHT"),
                          ("t_index_list = [20.5]", "t_index_list entry=20.5 must be an integer"),
                          ('frame_buffer_size = "2"', "frame_buffer_size='2' must be an integer"),
                          ('lora = ["x:half"]', "scale 'half' after the last ':' is not a number"),
                          ("verify = 1", "verify=1 must be True or False")]:
        config.write_text(text + "\n")
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
            run_command.build_request(run_command.resolve_options(_parse(["run", "--config", str(config)])))


def test_strength_and_t_index_list_are_exclusive_and_strength_is_checked() -> None:
    options = run_command.resolve_options(_parse(["run", "--strength", "0.5"]))
    assert stream_config(options).t_index_list == (25, 37)
    with pytest.raises(ConfigError, match="strength=nan must be a finite number"):
        stream_config({**options, "strength": math.nan})


@pytest.fixture()
def lora_in_cwd(tiny_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A real LoRA file for the tiny model as ./w.safetensors (kohya layout, like most community LoRAs)."""
    from streamdiff.testing.lora import random_lora, save_kohya_lora

    monkeypatch.chdir(tmp_path)
    return save_kohya_lora(random_lora(tiny_model.unet, seed=3), tmp_path / "w.safetensors")


def test_run_and_engines_build_derive_the_same_config_loras_and_engine_keys(lora_in_cwd: Path, tmp_path: Path):
    """Equivalent arguments, spelled differently, give one StreamConfig, one LoRA list and one set of engine cache
    keys in both commands (engines build used to read `w.safetensors:-0.5` as a file named so, scale 1)."""
    common = ["--model", "tiny", "--backend", "onnxruntime", "--engine-dir", str(tmp_path / "engines")]
    run_request, run_config = run_command.build_request(run_command.resolve_options(_parse(
        ["run", *common, "--lora", "w.safetensors:-0.5", "--size", "512", "--t-index-list", "20,40"])))
    build_request, build_config = engines_command.build_request(_parse(
        ["engines", "build", *common, "--lora", "w.safetensors:-0.5", "--size", "512x512", "--t-index-list", "20",
         "40"]))
    assert run_config == build_config == StreamConfig(width=512, height=512, t_index_list=(20, 40))
    assert run_request.loras == build_request.loras == (LoraSpec("w.safetensors", -0.5),)
    assert run_request == build_request
    keys = []
    for request, config in ((run_request, run_config), (build_request, build_config)):
        model = request.load()
        kind, steps = request.plan(model, config)
        assert kind.value == "onnxruntime" and len(steps) == 3
        assert all(step.key.loras == (("w.safetensors", -0.5),) for step in steps)
        keys.append([step.key.digest() for step in steps])
    assert keys[0] == keys[1]


def test_engines_built_by_engines_build_are_the_ones_run_uses(lora_in_cwd: Path, tmp_path: Path, capsys) -> None:
    engines = tmp_path / "engines"
    shared = ["--model", "tiny", "--lora", "w.safetensors:-0.5", "--engine-dir", str(engines),
              "--min-resolution", "32", "--max-resolution", "128", "--no-verify"]
    assert main(["engines", "build", *shared, "--size", "64", "--t-index-list", "20", "40"]) == 0
    assert "3 built, 0 reused" in capsys.readouterr().out
    manifests = {p: p.stat().st_mtime_ns for p in engines.glob("*/manifest.json")}
    assert len(manifests) == 3
    assert main(["run", *shared, "--size", "64x64", "--t-index-list", "20,40",
                 "--frames", "3", "--status-interval", "0"]) == 0
    assert {p: p.stat().st_mtime_ns for p in engines.glob("*/manifest.json")} == manifests  # reused, none added


def test_bench_takes_the_shared_size(capsys) -> None:
    assert main(["-q", "bench", "--size", "96x128"]) == 1
    assert main(["-q", "bench", "--size", "100x100"]) == 1
    with pytest.raises(SystemExit):
        main(["bench", "--size", "big"])
    assert "argument --size: size='big' is not WIDTHxHEIGHT" in capsys.readouterr().err


def test_engines_build_with_a_controlnet_plans_the_residual_unet_and_the_compiled_controlnet(tmp_path: Path) -> None:
    """``engines build --controlnet`` builds what an engine offering that ControlNet runs: on OpenVINO a U-Net whose
    key names the residual inputs (a different entry from the plain U-Net's) and the ControlNet itself; the VAE
    entries are the plain ones."""
    common = ["--model", "tiny", "--backend", "openvino", "--engine-dir", str(tmp_path / "engines"), "--size", "64"]
    plain, config = engines_command.build_request(_parse(["engines", "build", *common]))
    with_controlnet, _ = engines_command.build_request(_parse(["engines", "build", *common,
                                                               "--controlnet", "edges=tiny"]))
    assert with_controlnet.controlnets == (("edges", "tiny"),)
    model = plain.load()
    _, plain_steps = plain.plan(model, config)
    kind, steps = with_controlnet.plan(model, config)
    by_component = {step.component.value: step.key for step in steps}
    assert kind.value == "openvino" and sorted(by_component) == ["controlnet", "unet", "vae_decoder", "vae_encoder"]
    extras = dict(by_component["unet"].extra)["unet_extras"].split(",")
    assert extras[-1] == "mid_residual" and extras[:-1] == [f"down_residual_{i}" for i in range(len(extras) - 1)]
    plain_keys = {step.component.value: step.key.digest() for step in plain_steps}
    assert by_component["unet"].digest() != plain_keys["unet"]
    assert {c: by_component[c].digest() for c in ("vae_encoder", "vae_decoder")} == {
        c: plain_keys[c] for c in ("vae_encoder", "vae_decoder")}
