"""Native TensorRT backend: one execution context per engine, device buffers as torch CUDA tensors.

Engines only run on the TensorRT version and GPU architecture they were built for; both are
recorded in the manifest and checked here before anything is deserialized. Every CUDA operation the
backend issues (allocation, copy, reorder, engine launch) runs on the backend's one stream, so no step
reads a cache before the previous operation on it has finished and no freed block is reused early.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cbart.runtime.backends.base import EncodedBatch
from cbart.runtime.manifest import (
    AUTOENCODER,
    CROSS_KV,
    DECODER_STEP,
    ENCODER,
    PAST,
    ExportDirectoryError,
    GraphSpec,
    Manifest,
    ModelDims,
    cache_names,
)
from cbart.runtime.trt_support import check_request, cuda_compute_capability, import_tensorrt

import_tensorrt()  # a clear error when TensorRT is missing (or only its type stubs are installed)
import tensorrt as trt  # noqa: E402

PLACEHOLDER_BYTES = 256
"""An empty tensor (the decoder's past at step 0) has no memory, and its null address is not accepted by every
TensorRT 10 release: empty inputs are bound to this small, aligned buffer instead."""


def cuda_device(device: str) -> torch.device:
    """The CUDA device the engines run on; anything else is refused (TensorRT runs on NVIDIA GPUs only)."""
    resolved = torch.device(device)
    if resolved.type != "cuda":
        raise ValueError(f"the tensorrt backend runs on a CUDA device, not {device!r}; pass device='cuda' or 'cuda:N'")
    return resolved


class EngineRunner:
    """Runs one engine: checks input dtypes, sets input shapes and addresses, allocates outputs, executes on a
    stream. Call it with the backend's stream current (``torch.cuda.stream``): its allocations use it."""

    def __init__(self, runtime: trt.Runtime, path: Path, device: torch.device) -> None:
        self.device = device
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ExportDirectoryError(
                f"TensorRT could not deserialize {path.name}; rebuild it with `cbart export --to trt`"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(index) for index in range(self.engine.num_io_tensors)]
        modes = {name: self.engine.get_tensor_mode(name) for name in names}
        self.outputs = [name for name in names if modes[name] == trt.TensorIOMode.OUTPUT]
        self.engine_inputs = [name for name in names if modes[name] == trt.TensorIOMode.INPUT]
        self.dtypes = {
            name: torch.from_numpy(np.empty(0, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
            for name in names
        }
        self.placeholder = torch.empty(PLACEHOLDER_BYTES, dtype=torch.uint8, device=device)

    def __call__(self, stream: torch.cuda.Stream, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        self.set_shapes(self.context, inputs)
        results: dict[str, torch.Tensor] = {}
        for name in self.outputs:
            dims = self.context.get_tensor_shape(name)
            shape = tuple(dims[index] for index in range(len(dims)))
            results[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
        self.bind(self.context, {**inputs, **results})
        self.execute(self.context, stream)
        return results

    def set_shapes(self, context: trt.IExecutionContext, inputs: dict[str, torch.Tensor]) -> None:
        """Each input's shape, after checking its dtype against the engine's (TensorRT would read the bytes as
        whatever type the engine expects)."""
        for name, tensor in inputs.items():
            if tensor.dtype != self.dtypes[name]:
                raise TypeError(
                    f"{name} is {tensor.dtype} but the engine expects {self.dtypes[name]}; convert it first"
                )
            if not context.set_input_shape(name, tuple(tensor.shape)):
                raise ValueError(
                    f"TensorRT refused shape {tuple(tensor.shape)} for {name}: it is outside the engine's "
                    "optimization profile; rebuild the engines with larger limits (cbart export --to trt)"
                )

    def bind(self, context: trt.IExecutionContext, tensors: dict[str, torch.Tensor]) -> None:
        """Every tensor's address (TensorRT reads and writes them in place); input shapes must be set. Empty
        tensors get the placeholder's address, never null."""
        for name, tensor in tensors.items():
            context.set_tensor_address(name, tensor.data_ptr() if tensor.numel() else self.placeholder.data_ptr())

    @staticmethod
    def execute(context: trt.IExecutionContext, stream: torch.cuda.Stream) -> None:
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed; see the TensorRT log")


class EngineSession:
    """One engine behind ONNX Runtime's ``run(output_names, feeds)``, NumPy in and out: what export
    verification compares with PyTorch, exactly as it compares the ONNX graphs."""

    def __init__(self, runner: EngineRunner, spec: GraphSpec, stream: torch.cuda.Stream) -> None:
        self.runner, self.spec, self.stream = runner, spec, stream

    def run(self, names: Iterable[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with torch.cuda.stream(self.stream):
            inputs = {
                name: torch.from_numpy(np.ascontiguousarray(value)).to(self.runner.device)
                for name, value in feeds.items()
                if name in self.runner.engine_inputs
            }
            outputs = self.runner(self.stream, **inputs)
            wanted = list(names) if names is not None else [tensor.name for tensor in self.spec.outputs]
            results = [outputs[name].float().cpu() for name in wanted]
        self.stream.synchronize()
        return [result.numpy() for result in results]


class StepGraphs:
    """CUDA graphs of the decoder step for one request shape (rows, cross K/V shapes, max length).

    A graph replays fixed kernels on fixed addresses and fixed shapes. TensorRT keeps shape-dependent
    state in its execution context, so each step position t gets its own context, whose shapes are set
    once and never change (all of them share one scratch allocation, sized for this request's longest
    step rather than the profile's maximum: steps run one after another on one stream). Every buffer a step
    touches lives here at a fixed address: token ids, encoder mask, cross K/V, the logits, and two cache
    sides sized for ``max_length`` (step t reads its past from side t % 2 and writes its present into the
    other). Step t's graph is captured the first time a request of this shape reaches t, and replayed by
    every later request of the same shape. A step whose capture fails runs without a graph from then on.
    """

    def __init__(
        self,
        runner: EngineRunner,
        rows: int,
        cross: dict[str, torch.Tensor],
        mask_shape: tuple[int, ...],
        dims: ModelDims,
        capacity: int,
    ) -> None:
        self.runner = runner
        device = runner.device
        self.rows, self.heads, self.head_dim = rows, dims.decoder_attention_heads, dims.head_dim
        self.capacity = capacity
        self.past_names = cache_names(PAST, dims.decoder_layers)
        self.ids = torch.zeros((rows, 1), dtype=torch.int64, device=device)
        self.mask = torch.zeros(mask_shape, dtype=torch.int64, device=device)
        self.cross = {name: torch.empty_like(value) for name, value in cross.items()}
        slot = rows * self.heads * self.capacity * self.head_dim
        self.sides = [
            {name: torch.empty(slot, dtype=torch.float32, device=device) for name in self.past_names} for _ in range(2)
        ]
        self.logits = torch.empty((rows, 1, dims.vocab_size), dtype=runner.dtypes["logits"], device=device)
        scratch = max(self.scratch_size(position) for position in (0, capacity - 1))
        self.scratch = torch.empty(max(scratch, 1), dtype=torch.uint8, device=device)
        self.steps: dict[int, tuple[trt.IExecutionContext, torch.cuda.CUDAGraph | None]] = {}
        self.capturable = True  # until a capture fails: then every step of this shape runs without a graph

    def view(self, side: int, name: str, length: int) -> torch.Tensor:
        size = self.rows * self.heads * length * self.head_dim
        return self.sides[side][name][:size].view(self.rows, self.heads, length, self.head_dim)

    def load(self, encoded: EncodedBatch) -> None:
        """Copies one request's mask and cross K/V into the fixed buffers."""
        self.mask.copy_(torch.from_numpy(np.ascontiguousarray(encoded.attention_mask)))
        for name, value in encoded.cross_kv.items():
            self.cross[name].copy_(value)

    def inputs(self, position: int) -> dict[str, torch.Tensor]:
        past = {name: self.view(position % 2, name, position) for name in self.past_names}
        return {"input_ids": self.ids, "encoder_attention_mask": self.mask, **self.cross, **past}

    def scratch_size(self, position: int) -> int:
        """TensorRT's scratch memory for step ``position`` of this request shape."""
        context = self.runner.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        self.runner.set_shapes(context, self.inputs(position))
        return int(context.update_device_memory_size_for_shapes())

    def step(self, position: int, tokens: np.ndarray, stream: torch.cuda.Stream) -> torch.Tensor:
        self.ids.copy_(torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)).view(-1, 1))
        if position in self.steps:
            context, graph = self.steps[position]
            if graph is None:
                self.runner.execute(context, stream)
            else:
                graph.replay()
            return self.logits
        context = self.runner.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        inputs = self.inputs(position)
        present = {
            name.replace("past_", "present_", 1): self.view((position + 1) % 2, name, position + 1)
            for name in self.past_names
        }
        self.runner.set_shapes(context, inputs)
        context.set_device_memory(self.scratch.data_ptr(), self.scratch.numel())
        self.runner.bind(context, {**inputs, "logits": self.logits, **present})
        self.runner.execute(context, stream)  # this step's result; TensorRT also needs one launch before capture
        self.steps[position] = (context, self.capture(context, stream, position) if self.capturable else None)
        return self.logits

    def capture(self, context: trt.IExecutionContext, stream: torch.cuda.Stream, position: int) -> Any:
        """A graph of one launch of ``context``, or None when capture fails (then no step of this request shape
        is captured again). Thread-local capture mode: generation may run in a worker thread (streaming), and
        other threads' CUDA calls must not break the capture."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                self.runner.execute(context, stream)
        except RuntimeError as error:
            warnings.warn(
                f"CUDA graph capture of decoder step {position} failed ({error}); this request shape runs "
                "without CUDA graphs",
                RuntimeWarning,
                stacklevel=2,
            )
            self.capturable = False
            return None
        return graph

    def reorder(self, length: int, rows: np.ndarray) -> None:
        index = torch.from_numpy(rows).to(self.runner.device)
        for name in self.past_names:
            cache = self.view(length % 2, name, length)
            cache.copy_(cache.index_select(0, index))


class TensorRTBackend:
    def __init__(self, directory: Path, manifest: Manifest, device: str = "cuda", cuda_graphs: bool = False) -> None:
        if manifest.backend != "tensorrt":
            raise ValueError(f"{directory} holds ONNX graphs; load it with backend='onnxruntime'")
        self.device = cuda_device(device)
        capability = cuda_compute_capability()
        if manifest.engine is None:
            raise ExportDirectoryError(
                f"{directory} has no TensorRT engine section in its manifest; re-export --to trt"
            )
        built_with = manifest.engine.tensorrt_version
        if built_with != trt.__version__:
            raise ExportDirectoryError(
                f"the engines in {directory} were built with TensorRT {built_with}, this is TensorRT "
                f"{trt.__version__}; rebuild them here with `cbart export CKPT --to trt`"
            )
        if manifest.engine.compute_capability != capability:
            raise ExportDirectoryError(
                f"the engines in {directory} were built for GPU compute capability "
                f"{manifest.engine.compute_capability}, this GPU is {capability}; rebuild them on this GPU"
            )
        self.manifest = manifest
        self.limits = manifest.engine.limits
        self.stream = torch.cuda.Stream(self.device)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        with torch.cuda.stream(self.stream):
            self.engines = {
                name: EngineRunner(runtime, directory / spec.file, self.device)
                for name, spec in manifest.graphs.items()
            }
        self.cuda_graphs = cuda_graphs
        self.step_graphs: dict[tuple[Any, ...], StepGraphs] = {}

    def sessions(self) -> dict[str, EngineSession]:
        """Each engine behind ONNX Runtime's ``run`` call, for export verification."""
        return {
            name: EngineSession(runner, self.manifest.graphs[name], self.stream)
            for name, runner in self.engines.items()
        }

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> EncodedBatch:
        check_request(self.limits, sources=input_ids.shape[0], source_length=input_ids.shape[1])
        with torch.cuda.stream(self.stream):
            ids = torch.from_numpy(input_ids).to(self.device)
            mask = torch.from_numpy(attention_mask).to(self.device)
            states = next(iter(self.engines[ENCODER](self.stream, input_ids=ids, attention_mask=mask).values()))
            if AUTOENCODER in self.engines:
                states = self.engines[AUTOENCODER](self.stream, hidden_states=states)["memory"]
            cross = self.engines[CROSS_KV](self.stream, memory=states)
        self.stream.synchronize()
        return EncodedBatch(cross_kv=cross, attention_mask=attention_mask, input_ids=input_ids)

    def start(
        self, encoded: EncodedBatch, rows_per_source: int, max_length: int | None = None
    ) -> TensorRTDecoderSession | GraphedDecoderSession:
        rows = encoded.sources * rows_per_source
        check_request(self.limits, rows=rows, max_length=max_length)
        if not self.cuda_graphs or max_length is None:
            return TensorRTDecoderSession(self, encoded, rows)
        cross: dict[str, torch.Tensor] = encoded.cross_kv
        key = (rows, max_length, *((name, tuple(value.shape)) for name, value in cross.items()))
        if key not in self.step_graphs:
            with torch.cuda.stream(self.stream):  # every CUDA op of the backend runs on its stream
                self.step_graphs[key] = StepGraphs(
                    self.engines[DECODER_STEP],
                    rows,
                    cross,
                    tuple(encoded.attention_mask.shape),
                    self.manifest.model,
                    max_length,
                )
        return GraphedDecoderSession(self, self.step_graphs[key], encoded)


class TensorRTDecoderSession:
    """Per-layer caches as CUDA tensors; presents of one step are the pasts of the next."""

    def __init__(self, backend: TensorRTBackend, encoded: EncodedBatch, rows: int) -> None:
        dims = backend.manifest.model
        self.backend = backend
        self.cross: dict[str, torch.Tensor] = encoded.cross_kv
        self.past_names = backend.manifest.cache_names(PAST)
        empty = (rows, dims.decoder_attention_heads, 0, dims.head_dim)
        with torch.cuda.stream(backend.stream):  # every CUDA op of the backend runs on its stream
            self.mask = torch.from_numpy(encoded.attention_mask).to(backend.device)
            self.past = {
                name: torch.zeros(empty, dtype=torch.float32, device=backend.device) for name in self.past_names
            }

    def step(self, tokens: np.ndarray) -> np.ndarray:
        backend = self.backend
        with torch.cuda.stream(backend.stream):
            outputs = backend.engines[DECODER_STEP](
                backend.stream,
                input_ids=torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)).to(backend.device),
                encoder_attention_mask=self.mask,
                **self.past,
                **self.cross,
            )
            self.past = {name: outputs[name.replace("past_", "present_", 1)] for name in self.past_names}
            logits = outputs["logits"][:, -1, :].float().cpu()
        return logits.numpy()

    def reorder(self, rows: np.ndarray) -> None:
        # On the engine's stream: the next step must read the reordered cache, and the old cache's blocks
        # return to the allocator in that stream's order (no reuse while a kernel still reads them).
        with torch.cuda.stream(self.backend.stream):
            index = torch.from_numpy(rows).to(self.backend.device)
            self.past = {name: value.index_select(0, index) for name, value in self.past.items()}


class GraphedDecoderSession:
    """A decoder session that replays ``StepGraphs``: one request at a time per request shape."""

    def __init__(self, backend: TensorRTBackend, graphs: StepGraphs, encoded: EncodedBatch) -> None:
        self.backend = backend
        self.graphs = graphs
        self.length = 0
        with torch.cuda.stream(backend.stream):
            graphs.load(encoded)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        with torch.cuda.stream(self.backend.stream):
            logits = self.graphs.step(self.length, tokens, self.backend.stream)[:, -1, :].float().cpu()
        self.length += 1
        return logits.numpy()

    def reorder(self, rows: np.ndarray) -> None:
        if np.array_equal(rows, np.arange(len(rows))):
            return
        with torch.cuda.stream(self.backend.stream):
            self.graphs.reorder(self.length, rows)
