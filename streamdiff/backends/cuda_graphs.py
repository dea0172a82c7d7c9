"""CUDA graphs for the eager torch backend: each U-Net and VAE call replayed from a graph captured per shape.

:class:`GraphedCall` wraps one engine call (``unet(sample, timestep, embeddings)``, ``vae.encode``, ``vae.decode``).
The first call with a new input signature (shapes and dtypes: batch rows, size, cfg layout all show there) allocates
static input buffers, warms the call up :data:`WARMUP` times on a side stream (cuDNN autotuning, lazy inits and the
allocator settle there, outside the capture), captures it into a CUDA graph whose last op copies the result into a
static output buffer, and replays it. Every later call with that signature copies its inputs into the static buffers,
replays the graph and returns a copy of the static output (a device→device copy: the caller may keep it while the
graph runs again). At most ``max_shapes`` graphs are kept; the least recently used one is released beyond that.
A capture that raises is logged once and that signature runs eagerly from then on (it is not retried every tick).

Everything device-specific goes through the :mod:`.cuda_ops` seam, so the bookkeeping — what is captured, refilled,
replayed and released — is tested on the CPU with a fake whose "graph" is the recorded callable.

:class:`GraphedPrograms` captures a whole *program* instead: a closure over static buffers that an owner built
(the engine's whole tick of one U-Net call: :mod:`streamdiff.engine.tick_graph`), one per key, with the same warm-up,
LRU and fallback rules. A program mutates state that outlives it (a stream's Stream Batch), so the tensors it
mutates are restored after the warm-up and after the capture: a capture leaves the state as it found it, and only
the replay that follows advances it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .base import recover
from .cuda_ops import DEFAULT_CUDA
from .torch_backend import TorchUNet, TorchVae

logger = logging.getLogger(__name__)

WARMUP = 2  # eager runs on a side stream before a capture (what torch's docs ask for)

Signature = tuple[tuple[tuple[int, ...], torch.dtype], ...]


@dataclass(eq=False)
class Captured:
    """One captured call: its graph and the static buffers it reads and writes."""

    graph: Any
    inputs: list[torch.Tensor]
    output: torch.Tensor


class GraphedCall:
    """``fn(*inputs)`` replayed from a CUDA graph per input signature; see the module docstring.

    ``captures``/``replays``/``evictions`` count what happened (tests, logs); ``eager`` holds the signatures whose
    capture failed.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], name: str, device: torch.device, cuda: Any = None,
                 max_shapes: int = 8) -> None:
        self.fn = fn
        self.name = name
        self.device = device
        self.cuda = cuda or DEFAULT_CUDA
        self.max_shapes = max_shapes
        self.graphs: OrderedDict[Signature, Captured] = OrderedDict()
        self.eager: set[Signature] = set()
        self.captures = self.replays = self.evictions = 0

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        key: Signature = tuple((tuple(x.shape), x.dtype) for x in inputs)
        if key in self.eager:
            return self.fn(*inputs)
        captured = self.graphs.get(key)
        if captured is None:
            captured = self._capture(key, inputs)
            if captured is None:
                return self.fn(*inputs)
        else:
            self.graphs.move_to_end(key)
            for static, x in zip(captured.inputs, inputs):
                static.copy_(x)
        self.cuda.replay(captured.graph)
        self.replays += 1
        return captured.output.clone()

    def _capture(self, key: Signature, inputs: tuple[torch.Tensor, ...]) -> Captured | None:
        """Warm up and capture ``fn`` for ``key``'s shapes (static inputs filled with ``inputs``); None if the
        capture fails. A warm-up that fails raises: that is the call's own error (the executor finds its stream)."""
        while len(self.graphs) >= self.max_shapes:
            self.release_oldest()
        cuda = self.cuda
        static = [cuda.empty(tuple(x.shape), x.dtype, self.device) for x in inputs]
        for buffer, x in zip(static, inputs):
            buffer.copy_(x)
        side, current = cuda.new_stream(self.device), cuda.current_stream(self.device)
        cuda.wait(side, current)
        with cuda.use(side):
            for _ in range(WARMUP):
                out = self.fn(*static)
        cuda.wait(current, side)
        output = cuda.empty(tuple(out.shape), out.dtype, self.device)
        try:
            graph = cuda.capture(side, lambda: output.copy_(self.fn(*static)))
        except Exception as error:  # noqa: BLE001 - not capturable: this shape runs eagerly, logged once
            self.eager.add(key)
            logger.warning("CUDA graph capture of the %s for %s failed (%s: %s); that shape runs eagerly",
                           self.name, [shape for shape, _ in key], type(error).__name__, error)
            return None
        captured = Captured(graph, static, output)
        self.graphs[key] = captured
        self.captures += 1
        logger.info("captured a CUDA graph of the %s for %s", self.name, [shape for shape, _ in key])
        return captured

    def release_oldest(self) -> None:
        _, captured = self.graphs.popitem(last=False)
        self.cuda.release(captured.graph)
        self.evictions += 1

    def release(self) -> None:
        """Release every graph (the engines are being replaced)."""
        while self.graphs:
            self.release_oldest()


@dataclass(eq=False)
class Program:
    """A capturable program: ``run()`` queues device work only (no host reads, no Python state that the replay
    would skip), reading and writing tensors that stay where they are; ``mutable`` lists those whose contents must
    survive a warm-up or a capture unchanged. ``graph`` is set once captured."""

    run: Callable[[], None]
    mutable: list[torch.Tensor]
    graph: Any = None


class GraphedPrograms:
    """Programs captured as CUDA graphs, one per key (the owner's key names everything the program reads: shapes,
    tensor identities, the host values it bakes in); see the module docstring.

    :meth:`capture` warms ``program.run`` up :data:`WARMUP` times on a side stream and captures it, restoring the
    ``mutable`` tensors after both; a capture that raises marks the key eager (logged once; :meth:`is_eager`). At
    most ``max_programs`` graphs are kept, least recently used released.
    """

    def __init__(self, name: str, device: torch.device, cuda: Any = None, max_programs: int = 8) -> None:
        self.name, self.device, self.cuda, self.max_programs = name, device, cuda or DEFAULT_CUDA, max_programs
        self.programs: OrderedDict[Any, Program] = OrderedDict()
        self.eager: set[Any] = set()
        self.captures = self.replays = self.evictions = 0

    def get(self, key: Any) -> Program | None:
        program = self.programs.get(key)
        if program is not None:
            self.programs.move_to_end(key)
        return program

    def is_eager(self, key: Any) -> bool:
        return key in self.eager

    def capture(self, key: Any, program: Program) -> bool:
        """Warm up and capture ``program`` under ``key``; False (the key runs eagerly from now on) if the capture
        raises. A warm-up that raises raises: that is the program's own error, its state restored first."""
        while len(self.programs) >= self.max_programs:
            self.release_oldest()
        cuda = self.cuda
        saved = [t.clone() for t in program.mutable]
        side, current = cuda.new_stream(self.device), cuda.current_stream(self.device)
        cuda.wait(side, current)
        try:
            with cuda.use(side):
                for _ in range(WARMUP):
                    program.run()
            cuda.wait(current, side)
            try:
                program.graph = cuda.capture(side, program.run)
            except Exception as error:  # noqa: BLE001 - not capturable: this key runs eagerly, logged once
                self.eager.add(key)
                logger.warning("CUDA graph capture of %s failed (%s: %s); it runs eagerly", self.name,
                               type(error).__name__, error)
                return False
        finally:
            cuda.wait(current, side)  # also when a warm-up raised: its queued work ends before the state is restored
            for tensor, before in zip(program.mutable, saved):
                tensor.copy_(before)
        self.programs[key] = program
        self.captures += 1
        logger.info("captured a CUDA graph of %s (%d kept)", self.name, len(self.programs))
        return True

    def replay(self, program: Program) -> None:
        self.cuda.replay(program.graph)
        self.replays += 1

    def release_oldest(self) -> None:
        _, program = self.programs.popitem(last=False)
        self.cuda.release(program.graph)
        self.evictions += 1

    def release_where(self, predicate: Callable[[Any], bool]) -> None:
        """Release the graphs whose key matches ``predicate`` (what they read is gone)."""
        for key in [k for k in self.programs if predicate(k)]:
            self.cuda.release(self.programs.pop(key).graph)

    def release(self) -> None:
        """Release every graph (the engines are being replaced)."""
        while self.programs:
            self.release_oldest()


class GraphedUNet:
    """A U-Net engine whose calls replay CUDA graphs; other attributes are the wrapped engine's."""

    def __init__(self, unet: Any, device: torch.device, cuda: Any = None, max_shapes: int = 8) -> None:
        self.inner = unet
        self.call = GraphedCall(unet, "U-Net", device, cuda, max_shapes)

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
                 ) -> torch.Tensor:
        return self.call(sample, timestep, encoder_hidden_states)

    def recover(self) -> None:
        recover(self.inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class GraphedVae:
    """A VAE engine whose encode and decode calls replay CUDA graphs; other attributes are the wrapped engine's."""

    def __init__(self, vae: Any, device: torch.device, cuda: Any = None, max_shapes: int = 8) -> None:
        self.inner = vae
        self.encode = GraphedCall(vae.encode, "VAE encoder", device, cuda, max_shapes)
        self.decode = GraphedCall(vae.decode, "VAE decoder", device, cuda, max_shapes)

    def recover(self) -> None:
        recover(self.inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class CudaGraphs:
    """The graphed engines of a :class:`~streamdiff.engine.StreamEngine`: wraps the current (U-Net, VAE) once and
    wraps again (releasing the old graphs) when the engine's backends are replaced. ``ticks``: the whole-tick
    programs (``scope="tick"``, :mod:`streamdiff.engine.tick_graph`), released with the rest; None with
    ``scope="call"``."""

    def __init__(self, device: torch.device, cuda: Any = None, max_shapes: int = 8, scope: str = "tick") -> None:
        self.device, self.cuda, self.max_shapes = device, cuda or DEFAULT_CUDA, max_shapes
        self._inner: tuple[Any, Any] | None = None
        self._graphed: tuple[GraphedUNet, GraphedVae] | None = None
        self.ticks = (GraphedPrograms("a tick's U-Net call", device, self.cuda, max_shapes)
                      if scope == "tick" else None)

    def engines(self, unet: Any, vae: Any) -> tuple[GraphedUNet, GraphedVae]:
        if self._graphed is None or self._inner is None or self._inner[0] is not unet or self._inner[1] is not vae:
            self.release()
            self._inner = (unet, vae)
            self._graphed = (GraphedUNet(unet, self.device, self.cuda, self.max_shapes),
                             GraphedVae(vae, self.device, self.cuda, self.max_shapes))
        return self._graphed

    def calls(self) -> list[GraphedCall]:
        """The graphed calls (U-Net, encode, decode), empty before the first tick."""
        if self._graphed is None:
            return []
        unet, vae = self._graphed
        return [unet.call, vae.encode, vae.decode]

    def release(self) -> None:
        for call in self.calls():
            call.release()
        if self.ticks is not None:
            self.ticks.release()
        self._inner = self._graphed = None


def tune_torch_cuda(unet: Any, vae: Any) -> None:
    """The torch CUDA path's settings: cuDNN autotuning and channels-last eager engines (fp16 is the model's dtype).

    Attention needs nothing: diffusers (≥ 0.20; verified on 0.42) gives every ``Attention`` the SDPA processor
    (``AttnProcessor2_0``) when ``torch.nn.functional.scaled_dot_product_attention`` exists.
    """
    torch.backends.cudnn.benchmark = True
    if isinstance(unet, TorchUNet) and not unet.channels_last:
        unet.channels_last = True
        unet.unet.to(memory_format=torch.channels_last)
    if isinstance(vae, TorchVae) and not vae.channels_last:
        vae.channels_last = True
        vae.vae.to(memory_format=torch.channels_last)
