"""streamdiff: real-time streaming image-to-image diffusion.

Public API::

    from . import StreamConfig, StreamPipeline
    pipe = StreamPipeline.from_pretrained("tiny", StreamConfig(width=256, height=256, t_index_list=[32, 45]))
    pipe.prepare(prompt="a watercolor portrait", guidance_scale=1.2, delta=1.0, seed=2)
    out = pipe(frame)
"""

from __future__ import annotations

from ._version import __version__
from .config import (
    BackendKind, Calibration, CfgMode, ControlNetSpec, FilterConfig, Precision, PromptConfig, Quantization, StreamConfig,
    StreamMode,
)
from .errors import (
    BackendUnavailable,
    ConfigError,
    EngineFull,
    EngineBuildError,
    FrameError,
    ModelLoadError,
    ProtocolError,
    SinkError,
    SourceError,
    StreamClosed,
    StreamDiffError,
)
from .models import LoadedModel, LoraSpec, load_model
from .engine import EngineConfig, Stream, StreamEngine, StreamOutput
from .pipeline import StreamPipeline

__all__ = [
    "BackendKind",
    "BackendUnavailable",
    "CfgMode",
    "EngineConfig",
    "EngineFull",
    "Calibration",
    "ConfigError",
    "EngineBuildError",
    "FilterConfig",
    "FrameError",
    "LoadedModel",
    "LoraSpec",
    "ModelLoadError",
    "Precision",
    "PromptConfig",
    "ControlNetSpec",
    "ProtocolError",
    "Quantization",
    "SinkError",
    "SourceError",
    "Stream",
    "StreamClosed",
    "StreamConfig",
    "StreamDiffError",
    "StreamEngine",
    "StreamMode",
    "StreamOutput",
    "StreamPipeline",
    "__version__",
    "load_model",
]
