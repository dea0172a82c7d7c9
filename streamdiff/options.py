"""Named options: what an engine, its streams and a server are, as a flat dictionary of plain values.

The same names come from command-line flags (:mod:`streamdiff.commands`), TOML ``--config`` files and ``serve run
streamdiff.deploy:app key=value`` arguments (:mod:`streamdiff.deploy`); this module holds their defaults, parses
their values and builds the config objects they describe, so the same options give the same
:class:`~streamdiff.config.StreamConfig`, the same :class:`~streamdiff.models.LoraSpec` list and so the same engine
cache keys whichever front end reads them: an engine built by ``engines build`` is the one ``run`` looks up.

Values, in flags and in TOML files alike:

- **size**: ``WIDTHxHEIGHT`` (``640x480``; also ``640X480``, ``640*480``) or a bare ``N`` meaning ``NxN``
  (``--size 512`` is ``512x512``); see :func:`streamdiff.config.parse_size`.
- **LoRA**: ``SOURCE[:SCALE]``, a ``.safetensors`` file, a folder or a hub id, then an optional scale after the
  last colon: any finite number, negative and exponents included (``style.safetensors:-0.5``, ``org/lcm:1e-1``);
  default 1. A Windows drive colon belongs to the path (``C:\\loras\\x.safetensors``,
  ``C:\\loras\\x.safetensors:0.8``); a path with any other colon needs an explicit scale after it.
- **t_index_list**: ``32,45`` or separate integers ``32 45`` (or a mix, ``10,20 30``).
- **controlnet**: ``NAME=SOURCE``, the name streams use and a ``ControlNetModel`` folder, a cached hub id or ``tiny``
  (``canny=lllyasviel/sd-controlnet-canny``); repeatable.

Next: :func:`model_options` and :func:`stream_config` of the resolved options.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from .config import (
    BackendKind,
    Calibration,
    CfgMode,
    ControlNetSpec,
    FilterConfig,
    Precision,
    PromptConfig,
    Quantization,
    StreamConfig,
    check_int,
    check_number,
    parse_int_list,
    parse_size,
    t_index_list_for_strength,
    to_enum,
)
from .errors import ConfigError
from .models.loading import LoraSpec

if TYPE_CHECKING:
    from .backends.builders import BuildStep
    from .backends.keys import EngineOptions
    from .engine import StreamEngine
    from .models import LoadedModel


DTYPES = tuple(p.value for p in Precision)
BACKENDS = tuple(b.value for b in BackendKind)
QUANTIZATIONS = tuple(q.value for q in Quantization)
DEFAULT_T_INDEX_LIST = (32, 45)

# Defaults of the shared options. A command may override some (``engines build`` defaults to onnxruntime); all
# commands share the ones that shape an engine, so that defaults, too, lead to the same cache entries.
MODEL_DEFAULTS: dict[str, Any] = {
    "model": "tiny", "model_config": None, "vae": None, "lora": (), "dtype": None, "device": "auto",
    "backend": BackendKind.AUTO.value,
}
ENGINE_DEFAULTS: dict[str, Any] = {
    "engine_dir": None, "compile": False, "channels_last": False, "min_resolution": None, "max_resolution": None,
    "batch_sizes": (), "verify": True, "quantize": Quantization.NONE.value,
    "calibration_samples": Calibration.samples, "calibration_seed": Calibration.seed,
}
STREAM_DEFAULTS: dict[str, Any] = {
    "size": "256x256", "t_index_list": None, "strength": None, "steps": 2, "num_inference_steps": 50,
    "frame_buffer_size": 1, "cfg_type": CfgMode.SELF.value,
}
# A stream's prompt and filter (``run``: its stream; ``serve``: the default settings of its streams).
PROMPT_DEFAULTS: dict[str, Any] = {
    "prompt": "", "negative_prompt": "", "guidance_scale": 1.2, "delta": 1.0, "seed": 2,
    "filter": False, "filter_threshold": 0.98, "filter_max_skip": 10,
}

# The ControlNets an engine offers (``run``: its stream uses them all, with Canny; ``serve``: clients choose by name).
CONTROLNET_DEFAULTS: dict[str, Any] = {"controlnet": ()}

# The environment variable that carries a server's token (``serve`` and ``run --engine``): flags show in process
# lists, the environment does not.
TOKEN_ENV = "STREAMDIFF_TOKEN"


_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[+-]?(?:nan|inf|infinity)", re.IGNORECASE)
_DRIVE = re.compile(r"[A-Za-z]:[\\/]")


# -- values -----------------------------------------------------------------------------------------------------


def parse_lora(value: Any) -> LoraSpec:
    """``SOURCE[:SCALE]`` (see the module docstring) → :class:`LoraSpec`; a LoraSpec passes through."""
    if isinstance(value, LoraSpec):
        return value
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"LoRA {value!r} must be SOURCE or SOURCE:SCALE (e.g. style.safetensors:0.8)")
    text = value.strip()
    source, colon, scale = text.rpartition(":")
    if not colon:
        return LoraSpec(text)
    if _NUMBER.fullmatch(scale.strip()):
        if not source:
            raise ConfigError(f"LoRA {text!r} has a scale but no source; give SOURCE:SCALE")
        return LoraSpec(source, float(scale))
    if _DRIVE.match(text) and text.count(":") == 1:  # C:\loras\x.safetensors: the colon is the drive's
        return LoraSpec(text)
    raise ConfigError(
        f"LoRA {text!r}: scale {scale!r} after the last ':' is not a number; give SOURCE or SOURCE:SCALE "
        f"(e.g. style.safetensors:0.8; a path with a colon needs an explicit scale, e.g. {text}:1)"
    )


def lora_specs(values: Any) -> list[LoraSpec]:
    """A list of ``SOURCE[:SCALE]`` entries (or one) → LoRA specs."""
    if values is None:
        return []
    if isinstance(values, (str, LoraSpec)):
        values = [values]
    return [parse_lora(value) for value in values]


def parse_controlnet(value: Any) -> tuple[str, str]:
    """``NAME=SOURCE`` (a ``--controlnet`` value) → ``(name, source)``."""
    from .models.controlnet import check_name

    if isinstance(value, (list, tuple)) and len(value) == 2:
        name, source = value
    elif isinstance(value, str) and "=" in value:
        name, source = value.split("=", 1)
    else:
        raise ConfigError(f"controlnet={value!r} is not NAME=ID_OR_PATH (e.g. canny=lllyasviel/sd-controlnet-canny)",
                          field="controlnet", value=value, allowed="NAME=ID_OR_PATH")
    if not isinstance(source, str) or not source.strip():
        raise ConfigError(f"controlnet={value!r} names no model after '='", field="controlnet", value=value,
                          allowed="NAME=ID_OR_PATH")
    return check_name(name.strip()), source.strip()


def controlnet_sources(values: Any) -> tuple[tuple[str, str], ...]:
    """The ``--controlnet`` values (one or a list) as ``(name, source)`` pairs with distinct names."""
    if values is None or isinstance(values, str):
        values = [] if values is None else [values]
    pairs = tuple(parse_controlnet(value) for value in values)
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise ConfigError(f"controlnet names {names} repeat a name", field="controlnet", value=names)
    return pairs


def run_controlnets(options: Mapping[str, Any]) -> tuple[ControlNetSpec, ...]:
    """``run``'s stream uses every ``--controlnet`` of the engine, in order, with Canny, at ``--control-scale``
    (one value for all, or one per ControlNet; default 1)."""
    names = [name for name, _ in controlnet_sources(options.get("controlnet"))]
    scales = options.get("control_scale") or ()
    scales = [scales] if not isinstance(scales, (list, tuple)) else list(scales)
    if len(scales) not in (0, 1, len(names)):
        raise ConfigError(f"{len(scales)} --control-scale values for {len(names)} ControlNets: give one for all or "
                          "one per --controlnet", field="control_scale", value=scales)
    scales = [check_number("control_scale", s, 0, 10) for s in scales]
    return tuple(ControlNetSpec(name, scales[i] if len(scales) > 1 else scales[0] if scales else 1.0)
                 for i, name in enumerate(names))


def output_size_value(value: Any, what: str = "output_size") -> tuple[int, int] | str:
    """A size, or ``"source"`` (the input's own size)."""
    return "source" if isinstance(value, str) and value.strip().lower() == "source" else parse_size(value, what)


# -- what the options describe ----------------------------------------------------------------------------------


def stream_config(options: Mapping[str, Any]) -> StreamConfig:
    """The :class:`StreamConfig` the options describe (``strength`` → t_index_list; filter keys are optional)."""
    width, height = parse_size(options["size"], "size")
    schedule = check_int("num_inference_steps", options["num_inference_steps"], 1, 1000)
    strength, t_index_list = options.get("strength"), options.get("t_index_list")
    if strength is not None and t_index_list is not None:
        raise ConfigError("give either t_index_list or strength, not both")
    if strength is not None:
        t_index_list = t_index_list_for_strength(strength, options["steps"], schedule)
    else:
        t_index_list = parse_int_list(DEFAULT_T_INDEX_LIST if t_index_list is None else t_index_list)
    filter_config = FilterConfig(
        *(options.get(key, PROMPT_DEFAULTS[key]) for key in ("filter", "filter_threshold", "filter_max_skip"))
    )
    return StreamConfig(
        width=width, height=height, t_index_list=t_index_list, num_inference_steps=schedule,
        frame_buffer_size=options["frame_buffer_size"], cfg_type=options["cfg_type"], filter=filter_config,
    )


def prompt_config(options: Mapping[str, Any]) -> PromptConfig:
    """The :class:`PromptConfig` the options describe."""
    return PromptConfig(
        options["prompt"], options["negative_prompt"], options["guidance_scale"], options["delta"], options["seed"],
        options.get("ip_adapter_scale", 1.0),
    )


@dataclass(frozen=True)
class ModelOptions:
    """What to load and which engines run it: the same from every command. Next: :meth:`load`, then build a
    pipeline (``StreamPipeline(model, config, backend=..., engine_options=...)``) or :meth:`plan` the engines."""

    model: str
    vae: str | None
    loras: tuple[LoraSpec, ...]
    dtype: str | None
    device: str
    backend: BackendKind
    engine: EngineOptions
    ip_adapter: str | None = None  # an IP-Adapter to install (image prompts): "tiny", a folder or a file
    ip_adapter_name: str | None = None  # the name clients choose it by (serve); None: the source
    controlnets: tuple[tuple[str, str], ...] = ()  # (name, source): the ControlNets the engine offers
    model_config: str | None = None  # a checkpoint file's architecture: a diffusers config folder or cached hub id

    def load(self) -> LoadedModel:
        from .models import load_model

        model = load_model(self.model, vae=self.vae, loras=self.loras, dtype=self.dtype, device=self.device,
                           model_config=self.model_config, ip_adapter=self.ip_adapter)
        if model.ip_adapter is not None:
            model.ip_adapter.name = self.ip_adapter_name or str(self.ip_adapter)
        return model

    def plan(self, model: LoadedModel, config: StreamConfig) -> tuple[BackendKind, list[BuildStep]]:
        """The resolved backend and the engine cache entries it needs for ``config`` (keys without building).

        With ControlNets, as the engine that offers them: a U-Net with residual inputs, and the ControlNets compiled
        by a backend that compiles them (OpenVINO)."""
        from .backends.factory import engine_steps

        if not self.controlnets:
            return engine_steps(self.backend, model, config, self.engine)
        from .models.controlnet import check_family, load_controlnet

        sdxl = model.sdxl is not None
        controlnets = {name: check_family(name, load_controlnet(source, model.device, model.dtype, sdxl=sdxl), sdxl)
                       for name, source in self.controlnets}
        return engine_steps(self.backend, model, config, self.engine, controlnets)

    def stream_engine(self, max_streams: int, max_batch_rows: int,
                      sizes: tuple[tuple[int, int], ...] | None = None, max_shapes: int = 8) -> StreamEngine:
        """Load the model into a :class:`~streamdiff.engine.StreamEngine` (not started) for this many streams.

        ``sizes``: the only frame sizes its streams may use (None: every size the model and backend run);
        ``max_shapes``: frame sizes whose compiled state the backends keep (EngineConfig.max_shapes).
        """
        from .engine import EngineConfig, StreamEngine

        config = EngineConfig(max_streams=max_streams, max_batch_rows=max_batch_rows, sizes=sizes,
                              max_shapes=max_shapes)
        return StreamEngine(self.load(), config, backend=self.backend, engine_options=self.engine,
                            controlnets=dict(self.controlnets))


def parse_sizes(value: Any) -> tuple[tuple[int, int], ...] | None:
    """``--sizes 256,320x240,512`` (or a TOML list) as (width, height) pairs; None or empty: no list."""
    if value is None or value == "" or value == ():
        return None
    entries = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
    return tuple(dict.fromkeys(parse_size(entry, "sizes entry") for entry in entries)) or None


def _text(options: Mapping[str, Any], name: str, optional: bool = True) -> str | None:
    value = options.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name}={value!r} must be a non-empty string")
    return value


def model_options(options: Mapping[str, Any]) -> ModelOptions:
    """The :class:`ModelOptions` the options describe (engine options included)."""
    from .backends.keys import EngineOptions

    batch_sizes = options.get("batch_sizes") or ()
    engine = EngineOptions(
        engine_dir=options.get("engine_dir"), compile=options.get("compile", False),
        channels_last=options.get("channels_last", False), min_resolution=options.get("min_resolution"),
        max_resolution=options.get("max_resolution"),
        batch_sizes=parse_int_list(batch_sizes, "batch_sizes") if batch_sizes else (),
        verify=options.get("verify", True), quantize=options.get("quantize", Quantization.NONE.value),
        calibration=Calibration(samples=options.get("calibration_samples", Calibration.samples),
                                seed=options.get("calibration_seed", Calibration.seed)),
    )
    dtype = _text(options, "dtype")
    if dtype is not None:
        dtype = to_enum(Precision, dtype, "dtype").value
    return ModelOptions(
        model=_text(options, "model", optional=False),  # type: ignore[arg-type]
        vae=_text(options, "vae"),
        loras=tuple(lora_specs(options.get("lora"))),
        dtype=dtype,
        device=_text(options, "device", optional=False),  # type: ignore[arg-type]
        backend=to_enum(BackendKind, options["backend"], "backend"),
        engine=engine,
        **dict(zip(("ip_adapter_name", "ip_adapter"), parse_ip_adapter(_text(options, "ip_adapter")))),
        controlnets=controlnet_sources(options.get("controlnet")),
        model_config=_text(options, "model_config"),
    )


_ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def parse_ip_adapter(value: str | None) -> tuple[str | None, str | None]:
    """``[NAME=]ID_OR_PATH`` → (name or None, source or None): ``--ip-adapter style=/adapters/ip.safetensors``."""
    if value is None:
        return None, None
    name, equals, source = value.partition("=")
    if equals and _ADAPTER_NAME.fullmatch(name):
        if not source:
            raise ConfigError(f"ip_adapter={value!r} names no source after '='; give NAME=ID_OR_PATH",
                              field="ip_adapter", value=value, allowed="NAME=ID_OR_PATH or ID_OR_PATH")
        return name, source
    return None, value
