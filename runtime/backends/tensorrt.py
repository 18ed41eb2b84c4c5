"""Native TensorRT backend: one execution context per engine, device buffers as torch CUDA tensors.

Engines only run on the TensorRT version and GPU architecture they were built for; both are
recorded in the manifest and checked here before anything is deserialized.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from runtime.backends.base import EncodedBatch
from runtime.manifest import ExportDirectoryError, Manifest
from runtime.trt_support import cuda_compute_capability, import_tensorrt

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
        self.output_dtypes = {name: trt.nptype(self.engine.get_tensor_dtype(name)) for name in self.outputs}

    def __call__(self, stream: torch.cuda.Stream, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        for name, tensor in inputs.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        results: dict[str, torch.Tensor] = {}
        for name in self.outputs:
            dims = self.context.get_tensor_shape(name)
            shape = tuple(dims[index] for index in range(len(dims)))
            dtype = torch.from_numpy(np.empty(0, dtype=self.output_dtypes[name])).dtype
            results[name] = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, results[name].data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed; see the TensorRT log")
        return results


class TensorRTBackend:
    def __init__(self, directory: Path, manifest: Manifest, device: str = "cuda") -> None:
        if manifest.backend != "tensorrt":
            raise ValueError(f"{directory} holds ONNX graphs; load it with backend='onnxruntime'")
        capability = cuda_compute_capability()
        built_with = manifest.engine.get("tensorrt_version")
        if built_with != trt.__version__:
            raise ExportDirectoryError(
                f"the engines in {directory} were built with TensorRT {built_with}, this is TensorRT "
                f"{trt.__version__}; rebuild them here with `cbart export CKPT --to trt`"
            )
        if manifest.engine.get("compute_capability") != capability:
            raise ExportDirectoryError(
                f"the engines in {directory} were built for GPU compute capability "
                f"{manifest.engine.get('compute_capability')}, this GPU is {capability}; rebuild them on this GPU"
            )
        self.manifest = manifest
        self.stream = torch.cuda.Stream()
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines = {name: EngineRunner(runtime, directory / spec.file) for name, spec in manifest.graphs.items()}

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> EncodedBatch:
        with torch.cuda.stream(self.stream):
            ids = torch.from_numpy(input_ids).cuda()
            mask = torch.from_numpy(attention_mask).cuda()
            states = next(iter(self.engines["encoder"](self.stream, input_ids=ids, attention_mask=mask).values()))
            if "autoencoder" in self.engines:
                states = self.engines["autoencoder"](self.stream, hidden_states=states)["memory"]
            cross = self.engines["cross_kv"](self.stream, memory=states)
        self.stream.synchronize()
        return EncodedBatch(cross_kv=cross, attention_mask=attention_mask, input_ids=input_ids)

    def start(self, encoded: EncodedBatch, rows_per_source: int) -> TensorRTDecoderSession:
        return TensorRTDecoderSession(self, encoded, encoded.sources * rows_per_source)


class TensorRTDecoderSession:
    """Per-layer caches as CUDA tensors; presents of one step are the pasts of the next."""

    def __init__(self, backend: TensorRTBackend, encoded: EncodedBatch, rows: int) -> None:
        dims = backend.manifest.model
        step = backend.manifest.graphs["decoder_step"]
        self.backend = backend
        self.cross: dict[str, torch.Tensor] = encoded.cross_kv
        self.past_names = [t.name for t in step.inputs if t.name.startswith("past_")]
        self.mask = torch.from_numpy(encoded.attention_mask).cuda()
        empty = (rows, dims.decoder_attention_heads, 0, dims.head_dim)
        self.past = {name: torch.zeros(empty, dtype=torch.float32, device="cuda") for name in self.past_names}

    def step(self, tokens: np.ndarray) -> np.ndarray:
        backend = self.backend
        with torch.cuda.stream(backend.stream):
            outputs = backend.engines["decoder_step"](
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
        index = torch.from_numpy(rows).cuda()
        self.past = {name: value.index_select(0, index) for name, value in self.past.items()}
