"""ONNX Runtime backend: CPU here; CUDA and TensorRT execution providers with onnxruntime-gpu.

The decoder step runs through IO binding: the self-attention cache produced by one step stays an
``OrtValue`` and is bound as the next step's input without a round trip through NumPy; the
cross-attention K/V is bound once per request and shared by every row of the same source.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort
from cbart.runtime.backends.base import EncodedBatch, uniform_positions
from cbart.runtime.lm_head_screen import HIDDEN, RESIDUAL, SWITCH, LogitScreen
from cbart.runtime.manifest import (
    AUTOENCODER,
    CROSS,
    CROSS_KV,
    DECODER_STEP,
    ENCODER,
    PAST,
    PRESENT,
    STEP_POSITIONS,
    STEP_SELF_MASK,
    Manifest,
)

if TYPE_CHECKING:
    from cbart.runtime.backends.ort_inflight import InflightOrtSession

DEVICE_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


SHARE_CPU_ARENA = True
"""One CPU memory arena for every session in the process (``shared_cpu_arena``); ``benchmarks.replica_memory``
turns it off to measure what it saves."""
_arena_registered = False


def shared_cpu_arena() -> None:
    """Register one CPU arena with ONNX Runtime's environment, once per process.

    Each session otherwise grows an arena of its own to the peak of its own activations and keeps it: the
    encoder's (batch x source x width, attention scores) beside the decoder step's. With one arena, what
    the encoder freed serves the decoder steps that follow it: about 230 MiB less at batch 8, 512 source
    tokens on bart-base, latency within the run's noise (``benchmarks/results/replica-memory.json``).
    """
    global _arena_registered
    if not _arena_registered:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))  # ONNX Runtime's defaults
        _arena_registered = True


def session_options(threads: int | None, spinning: bool = True) -> ort.SessionOptions:
    """Sequential execution, ``threads`` intra-op threads.

    Idle intra-op threads spin for a while to catch the next op quickly: good for the decoder step,
    run back to back; bad for the once-per-request graphs, whose spinning threads would steal the
    cores from the graph that runs next. Those get ``spinning=False``.
    """
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
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


class SharedWeights:
    """One read-only mapping of each of the manifest's shared tensors, handed to every session that reads it.

    ONNX Runtime would otherwise map the same bytes once per session, and each mapping counts in full
    against the process's resident memory (``exporter.external_weights``). The sessions read the arrays
    for as long as they live: the backend keeps this object.
    """

    def __init__(self, directory: Path, manifest: Manifest) -> None:
        self.specs = manifest.shared_weights
        self.arrays = [
            np.memmap(directory / spec.file, dtype=spec.dtype, mode="r", offset=spec.offset, shape=tuple(spec.shape))
            for spec in self.specs
        ]
        self.values = [ort.OrtValue.ortvalue_from_numpy(array) for array in self.arrays]

    def options_for(self, graph: str, options: ort.SessionOptions) -> ort.SessionOptions:
        for spec, value in zip(self.specs, self.values, strict=True):
            for name in spec.initializers.get(graph, []):
                options.add_initializer(name, value)
        return options

    def array(self, file: str) -> np.ndarray | None:
        """The mapping of ``file``'s tensor (the screened head's rows), if it is shared."""
        return next((array for spec, array in zip(self.specs, self.arrays, strict=True) if spec.file == file), None)


class OnnxRuntimeBackend:
    def __init__(self, directory: Path, manifest: Manifest, device: str = "cpu", threads: int | None = None) -> None:
        self.manifest = manifest
        self.device = device
        providers = providers_for(device)
        self.shared = SharedWeights(directory, manifest) if device == "cpu" else None
        self.sessions = {
            name: ort.InferenceSession(
                str(directory / spec.file),
                self._options(name, threads),
                providers=providers,
            )
            for name, spec in manifest.graphs.items()
        }
        self._ort_device = "cuda" if device != "cpu" else "cpu"
        step = manifest.graphs[DECODER_STEP]
        self.past_names = manifest.cache_names(PAST)
        self.cross_names = manifest.cache_names(CROSS)
        self.present_names = manifest.cache_names(PRESENT)
        self.has_switch = any(t.name == SWITCH for t in step.inputs)
        if manifest.lm_head_screen and self.has_switch:
            rows = self.shared.array(manifest.lm_head_screen.rows) if self.shared else None
            self.screen: LogitScreen | None = LogitScreen(directory, rows)
        else:
            self.screen = None
        self.per_row_positions = manifest.per_row_positions

    def _options(self, graph: str, threads: int | None) -> ort.SessionOptions:
        options = session_options(threads, spinning=graph == DECODER_STEP)
        if self.device == "cpu" and SHARE_CPU_ARENA:
            shared_cpu_arena()
            options.add_session_config_entry("session.use_env_allocators", "1")
        return self.shared.options_for(graph, options) if self.shared else options

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> EncodedBatch:
        return self.encode_states(self.encoder_states(input_ids, attention_mask), input_ids, attention_mask)

    def encoder_states(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """The encoder graph alone: what a speculative pair's two decoders share."""
        return self.sessions[ENCODER].run(None, {"input_ids": input_ids, "attention_mask": attention_mask})[0]

    def encode_states(self, states: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray) -> EncodedBatch:
        """Autoencoder (when the model has one) and cross-attention K/V from the encoder's output."""
        if AUTOENCODER in self.sessions:
            states = self.sessions[AUTOENCODER].run(None, {"hidden_states": states})[0]
        binding = self.sessions[CROSS_KV].io_binding()
        binding.bind_cpu_input("memory", states)
        for name in self.cross_names:
            binding.bind_output(name, self._ort_device)
        self.sessions[CROSS_KV].run_with_iobinding(binding)
        return EncodedBatch(cross_kv=binding.get_outputs(), attention_mask=attention_mask, input_ids=input_ids)

    def start(self, encoded: EncodedBatch, rows_per_source: int, max_length: int | None = None) -> OrtDecoderSession:
        rows = encoded.sources * rows_per_source
        if self.screen is not None:
            return ScreenedOrtDecoderSession(self, encoded, rows, self.screen)
        return OrtDecoderSession(self, encoded, rows)

    def inflight(self) -> InflightOrtSession:
        """An empty decoder session that requests join and leave between steps (needs an ``--inflight`` export)."""
        from cbart.runtime.backends.ort_inflight import InflightOrtSession

        return InflightOrtSession(self)


class OrtDecoderSession:
    """Decoder state of one request: caches live in OrtValues between steps (no NumPy round trip)."""

    def __init__(self, backend: OnnxRuntimeBackend, encoded: EncodedBatch, rows: int) -> None:
        self.backend = backend
        self.session = backend.sessions[DECODER_STEP]
        self.device = backend._ort_device
        dims = backend.manifest.model
        empty = np.zeros((rows, dims.decoder_attention_heads, 0, dims.head_dim), dtype=np.float32)
        self.past = [ort.OrtValue.ortvalue_from_numpy(empty, self.device) for _ in backend.past_names]
        self.cross = list(encoded.cross_kv)
        self.mask = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(encoded.attention_mask), self.device)
        self.binding = self.session.io_binding()
        self.binding.bind_ortvalue_input("encoder_attention_mask", self.mask)
        for name, value in zip(backend.cross_names, self.cross, strict=True):
            self.binding.bind_ortvalue_input(name, value)  # once per request; rebinding by name replaces

    def step(self, tokens: np.ndarray) -> np.ndarray:
        return self._run(tokens, exact=True, last_only=True)[0]

    def step_all(self, tokens: np.ndarray) -> np.ndarray:
        return self._run(tokens, exact=True, last_only=False)[0]

    def _run(self, tokens: np.ndarray, exact: bool, last_only: bool) -> list[np.ndarray]:
        """One step; the logits (and the screen's inputs when not ``exact``) as owned float32 arrays.

        ``last_only``: [rows, width] at the last new position; otherwise [rows, new tokens, width].
        """
        backend, binding = self.backend, self.binding
        binding.clear_binding_outputs()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(tokens, dtype=np.int64))
        if backend.per_row_positions:
            positions, self_mask = self._row_inputs(tokens.shape[1])
            binding.bind_cpu_input(STEP_POSITIONS, positions)
            binding.bind_cpu_input(STEP_SELF_MASK, self_mask)
        if backend.has_switch:
            binding.bind_cpu_input(SWITCH, np.array(exact))
        for name, value in zip(backend.past_names, self.past, strict=True):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in backend.present_names:
            binding.bind_output(name, self.device)
        if not exact:
            binding.bind_output(HIDDEN, "cpu")
            binding.bind_output(RESIDUAL, "cpu")
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        self.past = list(outputs[1 : 1 + len(backend.present_names)])
        extra = outputs[1 + len(backend.present_names) :]
        # owned copies: the OrtValues are reused by the next step
        if last_only:
            return [np.array(value.numpy()[:, -1, :], dtype=np.float32) for value in (outputs[0], *extra)]
        return [np.array(value.numpy(), dtype=np.float32) for value in (outputs[0], *extra)]

    def _row_inputs(self, steps: int) -> tuple[np.ndarray, np.ndarray]:
        """An ``--inflight`` export's per-row positions and self-attention mask: here all rows are alike."""
        return uniform_positions(self.past[0].shape()[0], self.past[0].shape()[2], steps)

    def reorder(self, rows: np.ndarray) -> None:
        if np.array_equal(rows, np.arange(len(rows))):
            return
        self.past = [
            ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value.numpy()[rows]), self.device)
            for value in self.past
        ]

    def truncate(self, length: int) -> None:
        """Drop cache positions from ``length`` on (rejected speculative proposals).

        The step graph concatenates a new cache every step, so the kept prefix is copied once into a
        contiguous buffer here -- the same traffic as one step's concatenation, and only on rejection.
        """
        self.past = [
            ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value.numpy()[:, :, :length]), self.device)
            for value in self.past
        ]


class ScreenedOrtDecoderSession(OrtDecoderSession):
    """A decoder session over a screened LM head: greedy steps read its 8-bit copy (see ``LogitScreen``)."""

    def __init__(self, backend: OnnxRuntimeBackend, encoded: EncodedBatch, rows: int, screen: LogitScreen) -> None:
        super().__init__(backend, encoded, rows)
        self.screen = screen

    def step_screened(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Approximate logits [rows, vocab], the LM head's input and its 8-bit part [rows, width]."""
        logits, hidden, residual = self._run(tokens, exact=False, last_only=True)
        return logits, hidden, residual

    def step_all_screened(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As ``step_screened`` at every new position: [rows, new tokens, vocab or width]."""
        logits, hidden, residual = self._run(tokens, exact=False, last_only=False)
        return logits, hidden, residual
