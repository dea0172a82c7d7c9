"""Flags shared by the commands: one argparse converter per kind of value, one definition per shared flag.

``streamdiff run``, ``streamdiff serve``, ``streamdiff engines build`` and ``streamdiff bench`` take their sizes,
LoRAs, timestep lists and model / backend / dtype / engine flags from here; the values, their defaults and the
configs they describe are :mod:`streamdiff.options` (the same for TOML files and Ray Serve arguments).

The ``*_arg`` functions are argparse ``type=`` converters: they raise ``argparse.ArgumentTypeError`` with the text
of the ConfigError that the plain parsers raise for values from a config file.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

from ..config import CALIBRATION_SAMPLES, Calibration, CfgMode, parse_int_list, parse_size
from ..errors import ConfigError
from ..options import (
    BACKENDS, DTYPES, MODEL_DEFAULTS, PROMPT_DEFAULTS, QUANTIZATIONS, STREAM_DEFAULTS, output_size_value, parse_lora,
    parse_controlnet,
)

T = TypeVar("T")


def _arg(parse: Callable[[str], T], name: str) -> Callable[[str], T]:
    """An argparse ``type=`` converter that reports ``parse``'s ConfigError text (argparse hides a ValueError's)."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ConfigError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = name
    return convert


size_arg = _arg(parse_size, "size")
lora_arg = _arg(parse_lora, "lora")
int_list_arg = _arg(parse_int_list, "int_list")
output_size_arg = _arg(output_size_value, "output_size")
controlnet_arg = _arg(parse_controlnet, "controlnet")


class _Concat(argparse.Action):
    """``nargs="+"`` of tuples → one flat tuple: ``--t-index-list 32,45`` and ``--t-index-list 32 45`` agree."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, tuple(entry for part in values for entry in part))


# -- flags --------------------------------------------------------------------------------------------------------


def add_model_options(parser: argparse.ArgumentParser, backend_default: str = MODEL_DEFAULTS["backend"]) -> Any:
    """``--model --model-config --vae --lora --dtype --device --backend`` (defaults in :data:`MODEL_DEFAULTS`)."""
    group = parser.add_argument_group("model")
    add = group.add_argument
    add("--model", help="'tiny' (built-in, offline), a diffusers folder, a checkpoint file or a hub id (default tiny)")
    add("--model-config", metavar="DIR_OR_ID",
        help="architecture of a --model checkpoint file (.safetensors/.ckpt, SD 1.x/2.x or SDXL): a diffusers folder "
             "of the same family (configs and tokenizers suffice) or a cached hub id (default: the family's "
             "reference repo, offline only if cached)")
    add("--vae", help="replacement VAE folder or hub id, e.g. madebyollin/taesd")
    add("--lora", action="append", type=lora_arg, metavar="SOURCE[:SCALE]",
        help="LoRA file, folder or hub id fused at load, with an optional scale (default 1; negative and float "
             "scales work, e.g. style.safetensors:-0.5); repeatable")
    add("--dtype", choices=DTYPES, help="model precision (default float32 on the CPU, float16 on CUDA)")
    add("--device", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    add("--backend", choices=BACKENDS, help=f"engine backend (default {backend_default})")
    return group


def add_controlnet_options(group: Any, scale: bool) -> None:
    """``--controlnet NAME=ID_OR_PATH`` (repeatable) into the model ``group``; ``--control-scale`` with ``scale``."""
    group.add_argument("--controlnet", action="append", type=controlnet_arg, metavar="NAME=ID_OR_PATH",
                       help="a ControlNet the engine offers under NAME: a ControlNetModel folder, a cached hub id or "
                            "'tiny' (built-in, for the tiny model); every backend but torch with CUDA graphs; repeatable")
    if scale:
        group.add_argument("--control-scale", action="append", type=float, metavar="S",
                           help="conditioning scale of the ControlNets (Canny edges of each frame): one for all or "
                                "one per --controlnet, in order (default 1)")


def add_engine_dir_option(parser: Any) -> None:
    parser.add_argument("--engine-dir", help="engine cache folder (default $STREAMDIFF_ENGINE_DIR or ./engines)")


def add_engine_options(parser: argparse.ArgumentParser) -> Any:
    """``--engine-dir --compile --channels-last --min/max-resolution --batch-sizes --verify --quantize
    --calibration-samples --calibration-seed`` (→ EngineOptions)."""
    group = parser.add_argument_group("engines")
    add = group.add_argument
    add_engine_dir_option(group)
    add("--compile", action=argparse.BooleanOptionalAction,
        help="torch backend: AOTInductor-compiled U-Net, built once and cached")
    add("--channels-last", action=argparse.BooleanOptionalAction,
        help="torch backend: channels-last memory format (faster on CPUs)")
    add("--min-resolution", type=int, help="smallest image side the engines accept (default 256, lower to fit)")
    add("--max-resolution", type=int, help="largest image side the engines accept (default 1024, higher to fit)")
    add("--batch-sizes", nargs="+", type=int_list_arg, action=_Concat, metavar="B",
        help="extra U-Net batch sizes the engines cover")
    add("--verify", action=argparse.BooleanOptionalAction,
        help="check exported ONNX graphs against PyTorch (default on)")
    add("--quantize", choices=QUANTIZATIONS,
        help="openvino backend: int8-weights compresses the U-Net's weights to int8 with NNCF, int8 quantises its "
             "weights and activations, calibrated on the stream's own inputs (needs pip install "
             "'streamdiff[int8]'; default none)")
    add("--calibration-samples", type=int, metavar="N",
        help=f"--quantize int8: U-Net calls NNCF calibrates on, {CALIBRATION_SAMPLES[0]}–{CALIBRATION_SAMPLES[1]} "
             f"(default {Calibration.samples})")
    add("--calibration-seed", type=int, metavar="SEED",
        help=f"--quantize int8: seed of the calibration noise (default {Calibration.seed}); part of the cache key")
    return group


def add_stream_options(parser: argparse.ArgumentParser) -> Any:
    """``--size --t-index-list --strength --steps --num-inference-steps --frame-buffer-size --cfg-type``."""
    group = parser.add_argument_group("stream")
    add = group.add_argument
    add("--size", type=size_arg, metavar="WxH|N",
        help=f"engine frame size, WIDTHxHEIGHT or N for NxN (default {STREAM_DEFAULTS['size']})")
    add("--t-index-list", nargs="+", type=int_list_arg, action=_Concat, metavar="I",
        help="timestep indices, as 32,45 or 32 45 (default 32,45)")
    add("--strength", type=float, help="denoising strength in (0, 1] instead of --t-index-list")
    add("--steps", type=int, help=f"denoising steps used with --strength (default {STREAM_DEFAULTS['steps']})")
    add("--num-inference-steps", type=int, help="LCM schedule length (default 50)")
    add("--frame-buffer-size", type=int, help="frames per engine step (default 1)")
    add("--cfg-type", choices=[m.value for m in CfgMode], help="guidance mode (default self)")
    return group


def add_prompt_options(group: Any) -> None:
    """``--prompt --negative-prompt --guidance-scale --delta --seed --filter*`` into a stream option ``group``."""
    add = group.add_argument
    add("--prompt", help="what to turn the frames into")
    add("--negative-prompt", help="what to steer away from (cfg full/initialize)")
    add("--guidance-scale", type=float, help=f"guidance scale (default {PROMPT_DEFAULTS['guidance_scale']})")
    add("--delta", type=float, help=f"RCFG delta (default {PROMPT_DEFAULTS['delta']})")
    add("--seed", type=int, help=f"noise seed (default {PROMPT_DEFAULTS['seed']})")
    add("--filter", action=argparse.BooleanOptionalAction, help="stochastic similarity filter")
    add("--filter-threshold", type=float, help=f"similarity threshold (default {PROMPT_DEFAULTS['filter_threshold']})")
    add("--filter-max-skip", type=int,
        help=f"most frames skipped in a row (default {PROMPT_DEFAULTS['filter_max_skip']})")


def load_config_file(path: str, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The options in a TOML file, keys normalised to flag names with underscores; keys not in ``defaults`` are an
    error naming the allowed ones."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise ConfigError("--config needs Python 3.11+ (tomllib) or `pip install tomli`") from None
    file = Path(path).expanduser()
    try:
        data = tomllib.loads(file.read_text())
    except OSError as error:
        raise ConfigError(f"cannot read config file {str(file)!r}: {error}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {str(file)!r} is not valid TOML: {error}") from None
    options = {key.replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ConfigError(f"config file {str(file)!r} has unknown key(s) {unknown}; allowed: {sorted(defaults)}")
    return options


def resolve(args: argparse.Namespace, defaults: Mapping[str, Any], *layers: Mapping[str, Any]) -> dict[str, Any]:
    """``defaults``, then each of ``layers`` (e.g. a config file), then the flags given on the command line."""
    options = dict(defaults)
    for layer in layers:
        options.update(layer)
    options.update({k: v for k, v in vars(args).items() if k in defaults and v is not None})
    return options


def square_size(value: Sequence[int], what: str = "--size") -> int:
    """The side of a square size; a non-square one is a ConfigError (``bench`` measures square frames)."""
    width, height = value
    if width != height:
        raise ConfigError(f"{what}={width}x{height} must be square here (N or NxN)")
    return width
