"""A fake ``tensorrt`` module of a given version (10.x or 11.x), for the build and runtime code on the CPU.

It follows the documented Python API closely enough to catch misuse:

- **API surface per version.** 11.x has no ``BuilderFlag.FP16/BF16/INT8/FP8``, no
  ``NetworkDefinitionCreationFlag.EXPLICIT_BATCH``, no ``Builder.platform_has_fast_fp16`` and no
  ``ICudaEngine.device_memory_size``: touching them raises AttributeError, as the real 11 does. The 10.x fake has
  them but records every access in ``module.touched_removed``, so a test on 10.x also proves none of them is used.
- **Builder.** ``OnnxParser.parse_from_file`` reads the real ONNX file (input/output names, element types, ranks);
  the builder records the network flags, builder flags, memory pool limits, optimization level and profiles, and
  refuses a network that is not strongly typed. The "plan" is JSON describing the engine's tensors and profile.
- **Runtime.** Engines deserialised from such a plan check what a context is given: device memory set before a run
  (USER_MANAGED contexts), input shapes inside the profile (``set_input_shape`` returns False otherwise), every
  tensor bound, the stream handle an int. A run computes an analytic function of the bound inputs — read from and
  written to the fake CUDA memory at the bound addresses — so tests compare values, not just calls:
  U-Net ``ε = x·t/(t+1) + 0.01·mean(hidden)`` (as :class:`streamdiff.testing.AnalyticUNet`), VAE encoder an 8×8
  average pool (channel c from image channel c mod 3, scaled by c+1), VAE decoder a nearest 8× upsampling of the
  first three latent channels. While the fake CUDA is capturing, a run is recorded instead, with its addresses.
"""

from __future__ import annotations

import enum
import json
import types
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fake_cuda import FakeCuda

SCALE = 8  # the VAE factor of every model these tests build


class DataType(enum.Enum):
    FLOAT = "float32"
    HALF = "float16"
    BF16 = "bfloat16"
    INT32 = "int32"
    INT64 = "int64"
    BOOL = "bool"


_ONNX_TYPES = {1: DataType.FLOAT, 10: DataType.HALF, 16: DataType.BF16, 6: DataType.INT32, 7: DataType.INT64,
               9: DataType.BOOL}
_TORCH = {DataType.FLOAT: torch.float32, DataType.HALF: torch.float16, DataType.BF16: torch.bfloat16,
          DataType.INT32: torch.int32, DataType.INT64: torch.int64, DataType.BOOL: torch.bool}


class TensorIOMode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


class ExecutionContextAllocationStrategy(enum.Enum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


class _Enum:
    """An enum namespace whose ``removed`` members raise on 11.x and are recorded on 10.x."""

    def __init__(self, module: types.ModuleType, kind: str, values: dict[str, int], removed: dict[str, int]) -> None:
        self._module, self._kind, self._values = module, kind, dict(values)
        self._removed = removed if module.major < 11 else {}

    def __getattr__(self, name: str) -> int:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self._values:
            return self._values[name]
        if name in self._removed:
            self._module.touched_removed.append(f"{self._kind}.{name}")
            return self._removed[name]
        raise AttributeError(f"type object 'tensorrt.{self._kind}' has no attribute '{name}'")


# -- building ---------------------------------------------------------------------------------------------------------


class Logger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self, severity: int = 2) -> None:
        self.severity = severity


class _Tensor:
    def __init__(self, name: str, dtype: DataType, shape: list[int]) -> None:
        self.name, self.dtype, self.shape = name, dtype, tuple(shape)


class Network:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.inputs: list[_Tensor] = []
        self.outputs: list[_Tensor] = []

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    @property
    def num_outputs(self) -> int:
        return len(self.outputs)

    def get_input(self, index: int) -> _Tensor:
        return self.inputs[index]

    def get_output(self, index: int) -> _Tensor:
        return self.outputs[index]


class OnnxParser:
    def __init__(self, network: Network, logger: Logger) -> None:
        self.network = network
        self.flags: list[Any] = []
        self.errors: list[str] = []

    def set_flag(self, flag: Any) -> None:
        self.flags.append(flag)

    def parse_from_file(self, path: str) -> bool:
        import onnx

        if not Path(path).is_file():
            self.errors.append(f"cannot open {path}")
            return False
        graph = onnx.load(path, load_external_data=False).graph
        for values, into in ((graph.input, self.network.inputs), (graph.output, self.network.outputs)):
            for value in values:
                tensor = value.type.tensor_type
                dims = [d.dim_value if d.dim_value else -1 for d in tensor.shape.dim]
                into.append(_Tensor(value.name, _ONNX_TYPES[tensor.elem_type], dims))
        return True

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, index: int) -> str:
        return self.errors[index]


class OptimizationProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

    def set_shape(self, name: str, min: Any, opt: Any, max: Any) -> None:  # noqa: A002 - TensorRT's names
        self.shapes[name] = (tuple(min), tuple(opt), tuple(max))


class TimingCache:
    """Kernel timings as a JSON list; ``create_timing_cache`` of bytes that are not such a list gives a cache that
    ``set_timing_cache`` refuses (as TensorRT refuses one of another version or GPU)."""

    def __init__(self, data: bytes) -> None:
        try:
            self.entries = list(json.loads(data)) if data else []
            self.valid = True
        except ValueError:
            self.entries, self.valid = [], False

    def serialize(self) -> bytes:
        return json.dumps(self.entries).encode()


class BuilderConfig:
    def __init__(self) -> None:
        self.flags: list[Any] = []
        self.pool_limits: dict[Any, int] = {}
        self.profiles: list[OptimizationProfile] = []
        self.builder_optimization_level = 3
        self.timing_cache: TimingCache | None = None
        self.loaded_timings: list[Any] | None = None  # what the cache held when it was set

    def create_timing_cache(self, data: bytes) -> TimingCache:
        if bytes(data).startswith(b"\x7fELF"):
            raise RuntimeError("TensorRT cannot deserialize this timing cache")  # as a real one may, on garbage
        return TimingCache(bytes(data))

    def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
        if not cache.valid and not ignore_mismatch:
            return False
        self.timing_cache, self.loaded_timings = cache, list(cache.entries)
        return True

    def get_timing_cache(self) -> TimingCache | None:
        return self.timing_cache

    def set_flag(self, flag: Any) -> None:
        self.flags.append(flag)

    def set_memory_pool_limit(self, pool: Any, size: int) -> None:
        self.pool_limits[pool] = int(size)

    def add_optimization_profile(self, profile: OptimizationProfile) -> int:
        for low, opt, high in profile.shapes.values():
            if len({len(low), len(opt), len(high)}) != 1 or not all(a <= b <= c for a, b, c in zip(low, opt, high)):
                return -1
        self.profiles.append(profile)
        return len(self.profiles) - 1


def _builder_class(module: types.ModuleType) -> type:
    class Builder:
        def __init__(self, logger: Logger) -> None:
            self.logger = logger
            module.builders.append(self)
            self.network: Network | None = None
            self.config: BuilderConfig | None = None

        if module.major < 11:

            @property
            def platform_has_fast_fp16(self) -> bool:
                module.touched_removed.append("Builder.platform_has_fast_fp16")
                return True

        def create_network(self, flags: int = 0) -> Network:
            self.network = Network(int(flags))
            return self.network

        def create_builder_config(self) -> BuilderConfig:
            self.config = BuilderConfig()
            return self.config

        def create_optimization_profile(self) -> OptimizationProfile:
            return OptimizationProfile()

        def build_serialized_network(self, network: Network, config: BuilderConfig) -> bytes | None:
            strongly = 1 << module.NetworkDefinitionCreationFlag.STRONGLY_TYPED
            if not network.flags & strongly:
                return None  # this fake, like TensorRT 11, builds strongly typed networks only
            if len(config.profiles) != 1:
                return None
            profile = config.profiles[0].shapes
            dynamic = [t.name for t in network.inputs if -1 in t.shape]
            if sorted(profile) != sorted(dynamic):
                return None
            if config.timing_cache is not None:  # this build's "kernel timings": one entry per input and profile
                for name in sorted(profile):
                    entry = [name, [list(s) for s in profile[name]]]
                    if entry not in config.timing_cache.entries:
                        config.timing_cache.entries.append(entry)
            plan = {
                "inputs": [{"name": t.name, "dtype": t.dtype.name, "profile": profile[t.name]} for t in network.inputs],
                "outputs": [{"name": t.name, "dtype": t.dtype.name, "shape": list(t.shape)} for t in network.outputs],
                "version": module.__version__,
            }
            return json.dumps(plan).encode()

    return Builder


# -- running ----------------------------------------------------------------------------------------------------------


def analytic(inputs: dict[str, torch.Tensor], latent_channels: int = 4) -> dict[str, torch.Tensor]:
    """What a fake engine computes (in the inputs' dtypes), given its inputs by name."""
    if "sample" in inputs:
        sample = inputs["sample"]
        t = inputs["timestep"].to(sample.dtype).view(-1, 1, 1, 1) / 1000.0
        cond = inputs["encoder_hidden_states"].mean(dim=(1, 2)).view(-1, 1, 1, 1)
        for name in sorted(set(inputs) - {"sample", "timestep", "encoder_hidden_states"}):  # extras (SDXL)
            extra = inputs[name]
            cond = cond + extra.reshape(extra.shape[0], -1).to(sample.dtype).mean(dim=1).view(-1, 1, 1, 1)
        return {"noise_pred": sample * t / (t + 1) + 0.01 * cond}
    if "images" in inputs:
        pooled = F.avg_pool2d(inputs["images"].float(), SCALE)
        channels = [pooled[:, c % 3] * (c + 1) for c in range(latent_channels)]
        return {"latents": torch.stack(channels, 1).to(inputs["images"].dtype)}
    latents = inputs["latents"]
    return {"images": F.interpolate(latents[:, :3].float(), scale_factor=SCALE, mode="nearest").to(latents.dtype)}


class ExecutionContext:
    def __init__(self, engine: Any, strategy: Any) -> None:
        self.engine = engine
        self.strategy = strategy
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.device_memory: tuple[int, int] | None = None
        self.runs = 0

    def set_device_memory(self, memory: int, size: int) -> None:
        self.device_memory = (int(memory), int(size))

    def set_input_shape(self, name: str, shape: Any) -> bool:
        low, _, high = self.engine.profiles[name]
        shape = tuple(int(d) for d in shape)
        if len(shape) != len(low) or not all(a <= s <= b for a, s, b in zip(low, shape, high)):
            return False
        self.shapes[name] = shape
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self.engine.profiles:
            return self.shapes.get(name, tuple(-1 for _ in self.engine.profiles[name][0]))
        static = self.engine.outputs[name]["shape"]
        if name == "noise_pred" and "sample" in self.shapes:
            return self.shapes["sample"]
        if name == "latents" and "images" in self.shapes:
            b, _, h, w = self.shapes["images"]
            return (b, static[1], h // SCALE, w // SCALE)
        if name == "images" and "latents" in self.shapes:
            b, _, h, w = self.shapes["latents"]
            return (b, 3, h * SCALE, w * SCALE)
        return tuple(-1 for _ in static)

    def set_tensor_address(self, name: str, address: int) -> bool:
        if name not in self.engine.dtypes:
            return False
        self.addresses[name] = int(address)
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        engine = self.engine
        if not isinstance(stream_handle, int):
            raise TypeError("execute_async_v3(): incompatible function arguments (stream_handle must be an int)")
        if self.strategy == ExecutionContextAllocationStrategy.USER_MANAGED and self.device_memory is None:
            return False
        if self.device_memory is not None and self.device_memory[1] < engine.device_memory_size_v2:
            return False
        if set(self.shapes) != set(engine.profiles) or set(self.addresses) != set(engine.dtypes):
            return False
        addresses = dict(self.addresses)
        shapes = {name: self.get_tensor_shape(name) for name in engine.dtypes}

        memory = self.device_memory

        def run() -> None:
            if memory is not None and memory[1]:
                assert engine.cuda.tensor_at(memory[0]).numel() >= engine.device_memory_size_v2, "scratch too small"
            tensors = {name: engine.cuda.tensor_at(address) for name, address in addresses.items()}
            for name, tensor in tensors.items():
                assert tuple(tensor.shape) == shapes[name], (name, tuple(tensor.shape), shapes[name])
                assert tensor.dtype == _TORCH[engine.dtypes[name]], (name, tensor.dtype)
            outputs = analytic({n: tensors[n] for n in engine.profiles}, engine.latent_channels)
            for name, value in outputs.items():
                tensors[name].copy_(value)
            engine.module.runs.append((stream_handle, tuple(shapes[n] for n in engine.profiles)))

        self.runs += 1
        if engine.cuda.capturing is not None:
            engine.cuda.capturing.append(run)
        else:
            run()
        return True


def _engine_class(module: types.ModuleType) -> type:
    class CudaEngine:
        def __init__(self, plan: dict[str, Any]) -> None:
            self.module = module
            self.cuda: FakeCuda = module.cuda
            self.inputs = plan["inputs"]
            self.outputs = {t["name"]: t for t in plan["outputs"]}
            self.profiles = {t["name"]: tuple(tuple(s) for s in t["profile"]) for t in self.inputs}
            self.dtypes = {t["name"]: DataType[t["dtype"]] for t in [*self.inputs, *plan["outputs"]]}
            self.names = [t["name"] for t in self.inputs] + [t["name"] for t in plan["outputs"]]
            self.latent_channels = int(plan["outputs"][0]["shape"][1]) if "latents" in self.outputs else 4
            self.contexts: weakref.WeakSet[ExecutionContext] = weakref.WeakSet()
            self.device_memory_size_v2 = 4096

        if module.major < 11:

            @property
            def device_memory_size(self) -> int:
                module.touched_removed.append("ICudaEngine.device_memory_size")
                return self.device_memory_size_v2

        @property
        def num_io_tensors(self) -> int:
            return len(self.names)

        def get_tensor_name(self, index: int) -> str:
            return self.names[index]

        def get_tensor_mode(self, name: str) -> TensorIOMode:
            return TensorIOMode.INPUT if name in self.profiles else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name: str) -> DataType:
            return self.dtypes[name]

        def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
            assert profile_index == 0
            return list(self.profiles[name])

        def create_execution_context(self, strategy: Any = ExecutionContextAllocationStrategy.STATIC
                                     ) -> ExecutionContext:
            context = ExecutionContext(self, strategy)
            self.contexts.add(context)
            module.contexts_created += 1
            return context

    return CudaEngine


def make_fake_tensorrt(version: str, cuda: FakeCuda | None = None) -> types.ModuleType:
    """A fresh fake ``tensorrt`` module of ``version`` (``"10.8.0"``, ``"11.4.0"``…) on the fake ``cuda``."""
    module = types.ModuleType("tensorrt")
    module.__version__ = version
    module.major = int(version.split(".")[0])
    module.cuda = cuda or FakeCuda()
    module.touched_removed = []
    module.builders = []
    module.runs = []
    module.contexts_created = 0
    module.Logger = Logger
    module.DataType = DataType
    module.TensorIOMode = TensorIOMode
    module.ExecutionContextAllocationStrategy = ExecutionContextAllocationStrategy
    module.NetworkDefinitionCreationFlag = _Enum(
        module, "NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 1}, {"EXPLICIT_BATCH": 0}
    )
    module.BuilderFlag = _Enum(
        module, "BuilderFlag", {"TF32": 5, "REFIT": 3, "SPARSE_WEIGHTS": 6},
        {"FP16": 0, "BF16": 17, "INT8": 1, "FP8": 13, "OBEY_PRECISION_CONSTRAINTS": 10},
    )
    module.MemoryPoolType = _Enum(module, "MemoryPoolType", {"WORKSPACE": 0}, {})
    module.OnnxParserFlag = _Enum(module, "OnnxParserFlag", {"NATIVE_INSTANCENORM": 0}, {})
    module.OnnxParser = OnnxParser
    module.Builder = _builder_class(module)
    engine_class = _engine_class(module)

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, data: bytes) -> Any:
            try:
                plan = json.loads(bytes(data))
            except ValueError:
                return None
            return engine_class(plan) if plan.get("version") == module.__version__ else None

    module.Runtime = Runtime
    return module


def fake_plan(version: str, component: str, profile: dict[str, tuple[tuple[int, ...], ...]], dtype: str = "HALF",
              latent_channels: int = 4) -> bytes:
    """A serialised fake engine without going through ONNX (runtime tests)."""
    timestep = {"name": "timestep", "dtype": "FLOAT", "profile": profile.get("timestep")}
    if component == "unet":
        inputs = [{"name": "sample", "dtype": dtype, "profile": profile["sample"]}, timestep,
                  {"name": "encoder_hidden_states", "dtype": dtype, "profile": profile["encoder_hidden_states"]}]
        inputs += [{"name": name, "dtype": dtype, "profile": shapes} for name, shapes in profile.items()
                   if name not in ("sample", "timestep", "encoder_hidden_states")]  # extras (SDXL)
        outputs = [{"name": "noise_pred", "dtype": dtype, "shape": [-1, latent_channels, -1, -1]}]
    elif component == "vae_encoder":
        inputs = [{"name": "images", "dtype": dtype, "profile": profile["images"]}]
        outputs = [{"name": "latents", "dtype": dtype, "shape": [-1, latent_channels, -1, -1]}]
    else:
        inputs = [{"name": "latents", "dtype": dtype, "profile": profile["latents"]}]
        outputs = [{"name": "images", "dtype": dtype, "shape": [-1, 3, -1, -1]}]
    return json.dumps({"inputs": inputs, "outputs": outputs, "version": version}).encode()
