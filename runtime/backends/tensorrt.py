"""Native TensorRT backend: one execution context per engine, device buffers as torch CUDA tensors.

Engines only run on the TensorRT version and GPU architecture they were built for; both are
recorded in the manifest and checked here before anything is deserialized.
"""

from __future__ import annotations

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
    Manifest,
    ModelDims,
    cache_names,
)
from cbart.runtime.trt_support import check_request, cuda_compute_capability, import_tensorrt

import_tensorrt()  # a clear error when TensorRT is missing (or only its type stubs are installed)
import tensorrt as trt  # noqa: E402

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32}


class EngineRunner:
    """Runs one engine: sets input shapes and addresses, allocates outputs, executes on a stream."""

    def __init__(self, runtime: trt.Runtime, path: Path) -> None:
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ExportDirectoryError(
                f"TensorRT could not deserialize {path.name}; rebuild it with `cbart export --to trt`"
            )
        self.context = self.engine.create_execution_context()
        self.outputs = [
            self.engine.get_tensor_name(index)
            for index in range(self.engine.num_io_tensors)
            if self.engine.get_tensor_mode(self.engine.get_tensor_name(index)) == trt.TensorIOMode.OUTPUT
        ]
        self.engine_inputs = [
            self.engine.get_tensor_name(index)
            for index in range(self.engine.num_io_tensors)
            if self.engine.get_tensor_mode(self.engine.get_tensor_name(index)) == trt.TensorIOMode.INPUT
        ]
        self.output_dtypes = {name: trt.nptype(self.engine.get_tensor_dtype(name)) for name in self.outputs}

    def __call__(self, stream: torch.cuda.Stream, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        self.set_shapes(self.context, inputs)
        results: dict[str, torch.Tensor] = {}
        for name in self.outputs:
            dims = self.context.get_tensor_shape(name)
            shape = tuple(dims[index] for index in range(len(dims)))
            results[name] = torch.empty(shape, dtype=self.torch_dtype(name), device="cuda")
        self.bind(self.context, {**inputs, **results})
        self.execute(self.context, stream)
        return results

    def torch_dtype(self, name: str) -> torch.dtype:
        return torch.from_numpy(np.empty(0, dtype=self.output_dtypes[name])).dtype

    @staticmethod
    def set_shapes(context: trt.IExecutionContext, inputs: dict[str, torch.Tensor]) -> None:
        for name, tensor in inputs.items():
            if not context.set_input_shape(name, tuple(tensor.shape)):
                raise ValueError(
                    f"TensorRT refused shape {tuple(tensor.shape)} for {name}: it is outside the engine's "
                    "optimization profile; rebuild the engines with larger limits (cbart export --to trt)"
                )

    @staticmethod
    def bind(context: trt.IExecutionContext, tensors: dict[str, torch.Tensor]) -> None:
        """Every tensor's address (TensorRT reads and writes them in place); input shapes must be set."""
        for name, tensor in tensors.items():
            context.set_tensor_address(name, tensor.data_ptr())

    @staticmethod
    def execute(context: trt.IExecutionContext, stream: torch.cuda.Stream) -> None:
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed; see the TensorRT log")


class StepGraphs:
    """CUDA graphs of the decoder step for one request shape (rows, cross K/V shapes, max length).

    A graph replays fixed kernels on fixed addresses and fixed shapes. TensorRT keeps shape-dependent
    state in its execution context, so each step position t gets its own context, whose shapes are set
    once and never change (all of them share one scratch allocation: steps run one after another on one
    stream). Every buffer a step touches lives here at a fixed address: token ids, encoder mask, cross
    K/V, the logits, and two cache sides sized for ``max_length`` (step t reads its past from side t % 2
    and writes its present into the other). Step t's graph is captured the first time a request of
    this shape reaches t, and replayed by every later request of the same shape.
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
        self.rows, self.heads, self.head_dim = rows, dims.decoder_attention_heads, dims.head_dim
        self.capacity = capacity
        self.past_names = cache_names(PAST, dims.decoder_layers)
        self.ids = torch.zeros((rows, 1), dtype=torch.int64, device="cuda")
        self.mask = torch.zeros(mask_shape, dtype=torch.int64, device="cuda")
        self.cross = {name: torch.empty_like(value) for name, value in cross.items()}
        slot = rows * self.heads * self.capacity * self.head_dim
        self.sides = [
            {name: torch.empty(slot, dtype=torch.float32, device="cuda") for name in self.past_names} for _ in range(2)
        ]
        self.logits = torch.empty((rows, 1, dims.vocab_size), dtype=runner.torch_dtype("logits"), device="cuda")
        self.scratch = torch.empty(runner.engine.device_memory_size_v2, dtype=torch.uint8, device="cuda")
        self.steps: dict[int, tuple[trt.IExecutionContext, torch.cuda.CUDAGraph]] = {}

    def view(self, side: int, name: str, length: int) -> torch.Tensor:
        size = self.rows * self.heads * length * self.head_dim
        return self.sides[side][name][:size].view(self.rows, self.heads, length, self.head_dim)

    def load(self, encoded: EncodedBatch) -> None:
        """Copies one request's mask and cross K/V into the fixed buffers."""
        self.mask.copy_(torch.from_numpy(np.ascontiguousarray(encoded.attention_mask)))
        for name, value in encoded.cross_kv.items():
            self.cross[name].copy_(value)

    def step(self, position: int, tokens: np.ndarray, stream: torch.cuda.Stream) -> torch.Tensor:
        self.ids.copy_(torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)).view(-1, 1))
        if position in self.steps:
            self.steps[position][1].replay()
            return self.logits
        context = self.runner.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        context.set_device_memory(self.scratch.data_ptr(), self.scratch.numel())
        past = {name: self.view(position % 2, name, position) for name in self.past_names}
        present = {
            name.replace("past_", "present_", 1): self.view((position + 1) % 2, name, position + 1)
            for name in self.past_names
        }
        inputs = {"input_ids": self.ids, "encoder_attention_mask": self.mask, **self.cross, **past}
        self.runner.set_shapes(context, inputs)
        self.runner.bind(context, {**inputs, "logits": self.logits, **present})
        self.runner.execute(context, stream)  # this step's result; TensorRT also needs one launch before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            self.runner.execute(context, stream)
        self.steps[position] = (context, graph)
        return self.logits

    def reorder(self, length: int, rows: np.ndarray) -> None:
        index = torch.from_numpy(rows).cuda()
        for name in self.past_names:
            cache = self.view(length % 2, name, length)
            cache.copy_(cache.index_select(0, index))


class TensorRTBackend:
    def __init__(self, directory: Path, manifest: Manifest, device: str = "cuda", cuda_graphs: bool = False) -> None:
        if manifest.backend != "tensorrt":
            raise ValueError(f"{directory} holds ONNX graphs; load it with backend='onnxruntime'")
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
        self.stream = torch.cuda.Stream()
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines = {name: EngineRunner(runtime, directory / spec.file) for name, spec in manifest.graphs.items()}
        self.cuda_graphs = cuda_graphs
        self.step_graphs: dict[tuple[Any, ...], StepGraphs] = {}

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> EncodedBatch:
        check_request(self.limits, sources=input_ids.shape[0], source_length=input_ids.shape[1])
        with torch.cuda.stream(self.stream):
            ids = torch.from_numpy(input_ids).cuda()
            mask = torch.from_numpy(attention_mask).cuda()
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
            self.mask = torch.from_numpy(encoded.attention_mask).cuda()
            self.past = {name: torch.zeros(empty, dtype=torch.float32, device="cuda") for name in self.past_names}

    def step(self, tokens: np.ndarray) -> np.ndarray:
        backend = self.backend
        with torch.cuda.stream(backend.stream):
            outputs = backend.engines[DECODER_STEP](
                backend.stream,
                input_ids=torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)).cuda(),
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
            index = torch.from_numpy(rows).cuda()
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
