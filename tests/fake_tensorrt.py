"""A test double of the `tensorrt` module's builder API, for machines without TensorRT.

TensorRT needs NVIDIA's package index and a CUDA GPU, neither of which the test machines have.
This double stands in for the builder half only (`Builder`, `OnnxParser`, the builder config,
optimisation profiles, the timing cache), records every call, and checks what the real builder
checks before it builds:

- the ONNX file parses and passes `onnx.checker` (the real parser reads the same file);
- every network input has a shape in every profile, with min <= opt <= max per axis, the ONNX
  input's rank, and the ONNX input's fixed axes;
- at least one profile is given when an input has a dynamic axis.

`build_serialized_network` returns the recorded calls as JSON bytes in place of an engine, so a
test reads back what `hypersd.backends.tensorrt.build_engine` asked TensorRT to build. The
refit half (`Runtime`, `Refitter`, `Weights`) records which weights were written into an
"engine" (their SHA-256), and like TensorRT refuses names the engine does not have.
"""

from __future__ import annotations

import enum
import hashlib
import json
from pathlib import Path
from typing import Any

__version__ = "10.0.0-fake"


class Logger:
    WARNING = 2

    def __init__(self, level: int) -> None:
        self.level = level


class BuilderFlag(enum.Enum):
    FP16 = "FP16"
    BF16 = "BF16"
    REFIT = "REFIT"


class TimingCache:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def serialize(self) -> bytes:
        return self.data

    def combine(self, other: TimingCache, ignore_mismatch: bool) -> bool:
        """Add `other`'s entries that this cache lacks."""
        known = self.data.split(b";")
        for entry in other.data.split(b";"):
            if entry and entry not in known:
                self.data += entry + b";"
        return True


class Network:
    def __init__(self) -> None:
        # Input name -> dims, -1 for a dynamic axis (as `INetworkDefinition.get_input` gives).
        self.inputs: dict[str, tuple[int, ...]] = {}
        self.initializers: list[str] = []  # the weights a refit may name
        self.source = ""


class OnnxParser:
    num_errors = 0

    def __init__(self, network: Network, logger: Logger) -> None:
        self.network = network

    def parse_from_file(self, path: str) -> bool:
        import onnx

        model = onnx.load(path)
        onnx.checker.check_model(model)
        initializers = {initializer.name for initializer in model.graph.initializer}
        for value in model.graph.input:
            if value.name in initializers:
                continue
            dims = value.type.tensor_type.shape.dim
            self.network.inputs[value.name] = tuple(
                dim.dim_value if dim.HasField("dim_value") else -1 for dim in dims
            )
        self.network.source = Path(path).name
        self.network.initializers = sorted(initializers)
        return True

    def get_error(self, index: int) -> str:
        raise IndexError(index)


class OptimizationProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, list[list[int]]] = {}

    def set_shape(self, name: str, low: Any, opt: Any, high: Any) -> None:
        self.shapes[name] = [list(low), list(opt), list(high)]


class BuilderConfig:
    def __init__(self) -> None:
        self.flags: list[str] = []
        self.profiles: list[OptimizationProfile] = []
        self.timing_cache: TimingCache | None = None
        self.timing_cache_read = b""

    def set_flag(self, flag: BuilderFlag) -> None:
        self.flags.append(flag.value)

    def create_timing_cache(self, data: bytes) -> TimingCache:
        self.timing_cache_read = data
        return TimingCache(data)

    def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
        self.timing_cache = cache
        return True

    def get_timing_cache(self) -> TimingCache:
        assert self.timing_cache is not None, "the timing cache was never set"
        return self.timing_cache

    def add_optimization_profile(self, profile: OptimizationProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1


def _check_profile(network: Network, profile: OptimizationProfile) -> None:
    for name, dims in network.inputs.items():
        if name not in profile.shapes:
            raise ValueError(f"{network.source}: input {name!r} has no shape in a profile")
        low, opt, high = profile.shapes[name]
        for shape in (low, opt, high):
            if len(shape) != len(dims):
                raise ValueError(f"{network.source}: {name} has rank {len(dims)}, got {shape}")
            for axis, (fixed, value) in enumerate(zip(dims, shape, strict=True)):
                if fixed != -1 and fixed != value:
                    raise ValueError(f"{network.source}: {name} axis {axis} is {fixed}: {shape}")
        if not all(a <= b <= c for a, b, c in zip(low, opt, high, strict=True)):
            raise ValueError(f"{network.source}: {name} needs min <= opt <= max: {low, opt, high}")
    unknown = set(profile.shapes) - set(network.inputs)
    if unknown:
        raise ValueError(f"{network.source}: profile names unknown inputs {sorted(unknown)}")


class Builder:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def create_network(self, flags: int) -> Network:
        return Network()

    def create_builder_config(self) -> BuilderConfig:
        return BuilderConfig()

    def create_optimization_profile(self) -> OptimizationProfile:
        return OptimizationProfile()

    def build_serialized_network(self, network: Network, config: BuilderConfig) -> bytes:
        dynamic = any(-1 in dims for dims in network.inputs.values())
        if dynamic and not config.profiles:
            raise ValueError(f"{network.source}: dynamic inputs need an optimisation profile")
        for profile in config.profiles:
            _check_profile(network, profile)
        # The build "times" kernels: the timing cache grows by this network's entry.
        assert config.timing_cache is not None
        config.timing_cache.data += f"timed {network.source};".encode()
        record = {
            "source": network.source,
            "inputs": {name: list(dims) for name, dims in network.inputs.items()},
            "flags": config.flags,
            "profiles": [profile.shapes for profile in config.profiles],
            "timing_cache_read": config.timing_cache_read.decode(),
            "initializers": network.initializers,
        }
        return json.dumps(record).encode()


class Weights:
    def __init__(self, array: Any) -> None:
        self.array = array


class Engine:
    """A "deserialized engine": the build record, plus the weights refitted into it."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record

    def serialize(self) -> bytes:
        return json.dumps(self.record).encode()


class Runtime:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def deserialize_cuda_engine(self, data: bytes) -> Engine:
        return Engine(json.loads(data))


class Refitter:
    def __init__(self, engine: Engine, logger: Logger) -> None:
        if "REFIT" not in engine.record["flags"]:
            raise ValueError("the engine was not built refittable")
        self.engine = engine
        self.weights: dict[str, str] = {}

    def set_named_weights(self, name: str, weights: Weights) -> bool:
        if name not in self.engine.record["initializers"]:
            return False
        self.weights[name] = hashlib.sha256(weights.array.tobytes()).hexdigest()
        return True

    def get_missing_weights(self) -> list[str]:
        return []

    def refit_cuda_engine(self) -> bool:
        self.engine.record["refitted"] = self.weights
        return True
