"""A CPU stand-in for the TensorRT and CUDA calls cbart makes, so that the TensorRT path's control flow is
tested where no GPU is: an "engine" is the ONNX graph it was built from, run by ONNX Runtime on the bytes at
the addresses TensorRT would read, its outputs written where TensorRT would write them. Streams and CUDA
graphs are recorded rather than run (a captured launch runs at replay), and every call that matters is kept
in ``State`` for the tests to inspect. Only what cbart calls is faked; anything else fails loudly.
"""

from __future__ import annotations

import contextlib
import ctypes
import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort

ORT_TYPES = {"tensor(float)": np.dtype(np.float32), "tensor(int64)": np.dtype(np.int64)}


@dataclass
class State:
    current_stream: Any = None
    capturing: Any = None
    events: list[tuple[str, Any]] = field(default_factory=list)
    builds: list[FakeConfig] = field(default_factory=list)
    refuse_shapes: bool = False
    timing_cache_accepted: bool = True
    fail_capture: bool = False
    output_noise: float = 0.0
    placeholder_binds: int = 0


STATE = State()


# --------------------------------------------------------------------------------------------- torch.cuda
class FakeStream:
    def __init__(self, device: Any = None) -> None:
        self.cuda_stream = id(self)

    def synchronize(self) -> None:
        STATE.events.append(("synchronize", self))


@contextlib.contextmanager
def stream(selected: FakeStream):
    previous, STATE.current_stream = STATE.current_stream, selected
    try:
        yield
    finally:
        STATE.current_stream = previous


class FakeGraph:
    def __init__(self) -> None:
        self.launches: list[Any] = []

    def replay(self) -> None:
        STATE.events.append(("replay", self))
        for launch in self.launches:
            launch()


@contextlib.contextmanager
def graph(captured: FakeGraph, stream: FakeStream | None = None, capture_error_mode: str = "global"):
    STATE.events.append(("capture", (stream, capture_error_mode)))
    STATE.capturing = captured
    try:
        yield
    finally:
        STATE.capturing = None
    if STATE.fail_capture:
        raise RuntimeError("operation not permitted when stream is capturing (fake)")


# --------------------------------------------------------------------------------------------- engines
def _read(address: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    size = int(np.prod(shape)) * dtype.itemsize
    if size == 0:
        return np.empty(shape, dtype)
    buffer = (ctypes.c_char * size).from_address(address)
    return np.frombuffer(buffer, dtype=dtype).reshape(shape).copy()


class FakeEngine:
    def __init__(self, onnx_bytes: bytes) -> None:
        self.session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
        self.inputs = {value.name: value for value in self.session.get_inputs()}
        self.outputs = {value.name: value for value in self.session.get_outputs()}
        self.names = [*self.inputs, *self.outputs]
        self.num_io_tensors = len(self.names)
        self.device_memory_size_v2 = 1 << 30

    def get_tensor_name(self, index: int) -> str:
        return self.names[index]

    def get_tensor_mode(self, name: str) -> str:
        return TensorIOMode.INPUT if name in self.inputs else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> np.dtype:
        return ORT_TYPES[(self.inputs.get(name) or self.outputs[name]).type]

    def create_execution_context(self, strategy: Any = None) -> FakeContext:
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.device_memory = 0

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        if STATE.refuse_shapes:
            return False
        self.shapes[name] = tuple(shape)
        return True

    def _symbols(self) -> dict[str, int]:
        values: dict[str, int] = {}
        for name, shape in self.shapes.items():
            for symbol, size in zip(self.engine.inputs[name].shape, shape, strict=True):
                if isinstance(symbol, str):
                    values[symbol] = size
        return values

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        symbols = self._symbols()
        return tuple(d if isinstance(d, int) else eval(d, {}, symbols) for d in self.engine.outputs[name].shape)

    def set_tensor_address(self, name: str, address: int) -> bool:
        if address == 0:
            raise ValueError(f"null address bound to {name} (TensorRT 10.0-10.3 reject it)")
        self.addresses[name] = address
        return True

    def update_device_memory_size_for_shapes(self) -> int:
        return 64 * sum(int(np.prod(shape)) for shape in self.shapes.values())

    def set_device_memory(self, address: int, size: int) -> None:
        if size < self.update_device_memory_size_for_shapes():
            raise ValueError("device memory smaller than the shapes need")
        self.device_memory = size

    def execute_async_v3(self, stream_handle: int) -> bool:
        STATE.events.append(("execute", stream_handle))
        if STATE.capturing is not None:
            STATE.capturing.launches.append(self._run)
        else:
            self._run()
        return True

    def _run(self) -> None:
        feeds = {
            name: _read(self.addresses[name], self.shapes[name], self.engine.get_tensor_dtype(name))
            for name in self.engine.inputs
        }
        for name, value in zip(self.engine.outputs, self.engine.session.run(None, feeds), strict=True):
            assert tuple(value.shape) == self.get_tensor_shape(name), name
            value = np.ascontiguousarray(value + STATE.output_noise if value.dtype == np.float32 else value)
            ctypes.memmove(self.addresses[name], value.ctypes.data, value.nbytes)


class Runtime:
    def __init__(self, logger: Any) -> None:
        pass

    def deserialize_cuda_engine(self, data: bytes) -> FakeEngine:
        return FakeEngine(data)


# --------------------------------------------------------------------------------------------- builder
class Logger:
    WARNING = "warning"

    def __init__(self, level: str = WARNING) -> None:
        pass


class FakeLayer:
    def __init__(self, kind: str, inputs: list[str], outputs: list[str], op: str | None = None) -> None:
        self.type, self.op = kind, op
        self.inputs, self.outputs = inputs, outputs
        self.num_outputs = len(outputs)
        self.precision: Any = None
        self.output_types: dict[int, Any] = {}

    def get_input(self, index: int) -> types.SimpleNamespace:
        return types.SimpleNamespace(name=self.inputs[index])

    def get_output(self, index: int) -> types.SimpleNamespace:
        return types.SimpleNamespace(name=self.outputs[index])

    def set_output_type(self, index: int, dtype: Any) -> None:
        self.output_types[index] = dtype


class FakeNetwork:
    def __init__(self, layers: list[FakeLayer] | None = None) -> None:
        self.layers = layers or []
        self.onnx_bytes = b""

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def get_layer(self, index: int) -> FakeLayer:
        return self.layers[index]


class OnnxParser:
    num_errors = 0

    def __init__(self, network: FakeNetwork, logger: Logger) -> None:
        self.network = network

    def parse_from_file(self, path: str) -> bool:
        with open(path, "rb") as handle:
            self.network.onnx_bytes = handle.read()
        return True


class FakeTimingCache:
    def serialize(self) -> bytes:
        return b"timing cache"


class FakeConfig:
    def __init__(self) -> None:
        self.flags = {BuilderFlag.TF32}  # on by default, as in TensorRT
        self.profiles: list[dict[str, tuple[Any, ...]]] = []

    def set_memory_pool_limit(self, pool: str, size: int) -> None:
        self.workspace = size

    def set_flag(self, flag: str) -> None:
        self.flags.add(flag)

    def clear_flag(self, flag: str) -> None:
        self.flags.discard(flag)

    def create_timing_cache(self, data: bytes) -> FakeTimingCache:
        return FakeTimingCache()

    def set_timing_cache(self, cache: FakeTimingCache, ignore_mismatch: bool) -> bool:
        return STATE.timing_cache_accepted

    def get_timing_cache(self) -> FakeTimingCache:
        return FakeTimingCache()

    def add_optimization_profile(self, profile: FakeProfile) -> int:
        self.profiles.append(profile.shapes)
        return 0


class FakeProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[Any, ...]] = {}

    def set_shape(self, name: str, low: Any, typical: Any, high: Any) -> None:
        self.shapes[name] = (low, typical, high)


class Builder:
    def __init__(self, logger: Logger) -> None:
        pass

    def create_network(self, flags: int = 0) -> FakeNetwork:
        return FakeNetwork()

    def create_builder_config(self) -> FakeConfig:
        return FakeConfig()

    def create_optimization_profile(self) -> FakeProfile:
        return FakeProfile()

    def build_serialized_network(self, network: FakeNetwork, config: FakeConfig) -> bytes:
        STATE.builds.append(config)
        return network.onnx_bytes


def Dims(values: Any) -> tuple[int, ...]:  # noqa: N802 -- TensorRT's name
    return tuple(values)


def nptype(dtype: np.dtype) -> np.dtype:
    return dtype


class TensorIOMode:
    INPUT, OUTPUT = "input", "output"


class ExecutionContextAllocationStrategy:
    USER_MANAGED = "user managed"


class MemoryPoolType:
    WORKSPACE = "workspace"


class BuilderFlag:
    FP16, BF16, TF32, OBEY_PRECISION_CONSTRAINTS = "fp16", "bf16", "tf32", "obey precision constraints"


class LayerType:
    NORMALIZATION, SOFTMAX, REDUCE = "normalization", "softmax", "reduce"
    ELEMENTWISE, MATRIX_MULTIPLY = "elementwise", "matrix multiply"


class ElementWiseOperation:
    SUM, PROD = "sum", "prod"


class IElementWiseLayer(FakeLayer):
    pass


def module() -> types.ModuleType:
    """This file's fakes as a module named ``tensorrt``, of a supported version."""
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.13.0"
    for name in (
        "Builder", "Runtime", "Logger", "OnnxParser", "Dims", "nptype", "TensorIOMode",
        "ExecutionContextAllocationStrategy", "MemoryPoolType", "BuilderFlag", "LayerType",
        "ElementWiseOperation", "IElementWiseLayer",
    ):  # fmt: skip
        setattr(fake, name, globals()[name])
    fake.float32 = "float32"
    return fake
