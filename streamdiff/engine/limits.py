"""What bounds an engine (:class:`EngineConfig`) and what it counts (:class:`EngineStats`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import check_bool, check_int, parse_size
from ..errors import ConfigError


GRAPH_SCOPES = ("tick", "call")


@dataclass(frozen=True)
class EngineConfig:
    """Limits and batching policy of a :class:`~streamdiff.engine.StreamEngine`.

    ``max_streams``: open streams at most (one more raises :class:`~streamdiff.errors.EngineFull`).
    ``max_batch_rows``: U-Net rows per call at most (compiled backends are built for 1 … this). ``batch_vae``: encode
    and decode all streams of a size in one VAE call; None batches on GPUs only (on the CPU a batch of frames cost
    no less per frame than single frames, measured). ``prompt_cache``: prompt embeddings kept. ``sizes``: the
    only frame sizes (width, height) streams may use (None: every size the model and backend run; see
    :mod:`.shapes`). ``image_prompt_cache``: reference-image embeddings kept (a model with an IP-Adapter).
    ``max_shapes``: frame sizes whose compiled per-shape state (kernels, buffers, arenas) a backend keeps; the least
    recently used one is released beyond it (also the CUDA graphs kept per engine call).
    ``cuda_graphs``: engine calls replay a CUDA graph per input shape — the torch backend's U-Net and VAE calls
    (:mod:`streamdiff.backends.cuda_graphs`) or TensorRT's shape slots; None: on for the torch backend on CUDA in
    float16, off elsewhere; True with another backend is a ConfigError. ``cuda_graph_scope`` (the torch backend's
    graphs): ``"tick"`` replays each U-Net call's whole tick — VAE encode, the batched U-Net call, every stream's
    step arithmetic and VAE decode — as one graph where its streams allow (:mod:`.tick_graph`), each engine call
    alone elsewhere; ``"call"`` graphs each engine call alone.
    """

    max_streams: int = 8
    max_batch_rows: int = 16
    batch_vae: bool | None = None
    prompt_cache: int = 64
    image_prompt_cache: int = 16
    sizes: tuple[tuple[int, int], ...] | None = None
    max_shapes: int = 8
    cuda_graphs: bool | None = None
    cuda_graph_scope: str = "tick"

    def __post_init__(self) -> None:
        if self.cuda_graph_scope not in GRAPH_SCOPES:
            raise ConfigError(f"cuda_graph_scope={self.cuda_graph_scope!r} must be one of {', '.join(GRAPH_SCOPES)}",
                              field="cuda_graph_scope", value=self.cuda_graph_scope, allowed=" or ".join(GRAPH_SCOPES))
        for name in ("max_streams", "max_batch_rows", "prompt_cache", "image_prompt_cache", "max_shapes"):
            object.__setattr__(self, name, check_int(name, getattr(self, name), 1))
        for name in ("batch_vae", "cuda_graphs"):
            if getattr(self, name) is not None:
                check_bool(name, getattr(self, name))
        if self.sizes is not None:
            if isinstance(self.sizes, (str, bytes)) or not hasattr(self.sizes, "__iter__"):
                raise ConfigError(f"sizes={self.sizes!r} must be a list of sizes (512, '320x240', (w, h))",
                                  field="sizes", value=self.sizes, allowed="a non-empty list of WIDTHxHEIGHT")
            sizes = tuple(dict.fromkeys(parse_size(size, "sizes entry") for size in self.sizes))
            if not sizes:
                raise ConfigError("sizes=() is empty; give at least one size or None for any", field="sizes",
                                  value=(), allowed="a non-empty list of WIDTHxHEIGHT")
            object.__setattr__(self, "sizes", sizes)


# The engine of one stream (StreamPipeline, ``streamdiff run``): every configuration the stream may switch to fits in
# one call, and compiled backends are built for exactly that stream's shapes.
SINGLE_STREAM = EngineConfig(max_streams=1, max_batch_rows=4096)


@dataclass
class EngineStats:
    """Counters of an engine: ticks, U-Net calls, rows per call (recent), padding, failed streams."""

    ticks: int = 0
    unet_calls: int = 0
    unet_rows: int = 0
    padded_rows: int = 0
    streams_failed: int = 0
    recent_rows: list[int] = field(default_factory=list)  # rows of the last calls (newest last, ≤ 1000)

    def record_call(self, rows: int, padding: int) -> None:
        self.unet_calls += 1
        self.unet_rows += rows
        self.padded_rows += padding
        self.recent_rows.append(rows)
        del self.recent_rows[:-1000]
