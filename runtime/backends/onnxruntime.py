"""ONNX Runtime backend: CPU here; CUDA and TensorRT execution providers with onnxruntime-gpu.

The decoder step runs through IO binding: the self-attention cache produced by one step stays an
``OrtValue`` and is bound as the next step's input without a round trip through NumPy; the
cross-attention K/V is bound once per request and shared by every row of the same source.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from runtime.backends.base import EncodedBatch
from runtime.manifest import Manifest

DEVICE_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def session_options(threads: int | None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads:
        options.intra_op_num_threads = threads
    return options


def providers_for(device: str) -> list[str]:
    if device not in DEVICE_PROVIDERS:
        raise ValueError(f"unknown device {device!r} for ONNX Runtime; use one of {sorted(DEVICE_PROVIDERS)}")
    wanted = DEVICE_PROVIDERS[device]
    available = ort.get_available_providers()
    if wanted[0] not in available:
        raise RuntimeError(
            f"ONNX Runtime here has no {wanted[0]} (available: {available}); "
            "install onnxruntime-gpu (pip install 'cbart[gpu]') on a machine with an NVIDIA GPU, or use device='cpu'"
        )
    return [provider for provider in wanted if provider in available]


class OnnxRuntimeBackend:
    def __init__(self, directory: Path, manifest: Manifest, device: str = "cpu", threads: int | None = None) -> None:
        self.manifest = manifest
        self.device = device
        providers = providers_for(device)
        options = session_options(threads)
        self.sessions = {
            name: ort.InferenceSession(str(directory / spec.file), options, providers=providers)
            for name, spec in manifest.graphs.items()
        }
        self._ort_device = "cuda" if device != "cpu" else "cpu"
        dims = manifest.model
        self._empty_cache_shape = (dims.decoder_layers, 2, 0, dims.decoder_attention_heads, 0, dims.head_dim)

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> EncodedBatch:
        states = self.sessions["encoder"].run(None, {"input_ids": input_ids, "attention_mask": attention_mask})[0]
        if "autoencoder" in self.sessions:
            states = self.sessions["autoencoder"].run(None, {"hidden_states": states})[0]
        cross_kv = self.sessions["cross_kv"].run(None, {"memory": states})[0]
        return EncodedBatch(cross_kv=cross_kv, attention_mask=attention_mask, input_ids=input_ids)

    def start(self, encoded: EncodedBatch, rows_per_source: int) -> OrtDecoderSession:
        return OrtDecoderSession(self, encoded, encoded.sources * rows_per_source)


class OrtDecoderSession:
    """Decoder state of one request: the cache lives in OrtValues between steps."""

    def __init__(self, backend: OnnxRuntimeBackend, encoded: EncodedBatch, rows: int) -> None:
        self.session = backend.sessions["decoder_step"]
        self.device = backend._ort_device
        shape = list(backend._empty_cache_shape)
        shape[2] = rows
        self.past = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=np.float32), self.device)
        self.binding = self.session.io_binding()
        self.cross = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(encoded.cross_kv), self.device)
        self.mask = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(encoded.attention_mask), self.device)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        binding = self.binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(tokens, dtype=np.int64))
        binding.bind_ortvalue_input("past_kv", self.past)
        binding.bind_ortvalue_input("cross_kv", self.cross)
        binding.bind_ortvalue_input("encoder_attention_mask", self.mask)
        binding.bind_output("logits", "cpu")
        binding.bind_output("present_kv", self.device)
        self.session.run_with_iobinding(binding)
        logits, present = binding.get_outputs()
        self.past = present
        return logits.numpy()[:, -1, :].astype(np.float32, copy=False)

    def reorder(self, rows: np.ndarray) -> None:
        past = self.past.numpy()
        if np.array_equal(rows, np.arange(past.shape[2])):
            return
        self.past = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(past[:, :, rows]), self.device)
