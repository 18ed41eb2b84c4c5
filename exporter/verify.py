"""Proof that the exported graphs compute what PyTorch computes.

Every graph output is compared with its PyTorch module on several batch sizes, source lengths,
past lengths and rows-per-source; then a short greedy generation runs end to end through the
export directory and must yield exactly ``model.generate()``'s token ids (fp32) -- or, for
quantized exports, the token agreement is measured and reported. TensorRT engines go through the same
comparisons (``verify_engines``), on the cases that lie inside their optimization profiles.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx
import onnxruntime as ort
import torch
from cbart.exporter.graphs import AutoencoderGraph, CrossKVGraph, DecoderStepGraph, EncoderGraph, FusedEncoderGraph
from cbart.runtime.backends.onnxruntime import session_options
from cbart.runtime.generator import Seq2SeqRuntime
from cbart.runtime.lm_head_screen import HIDDEN, RESIDUAL, SWITCH
from cbart.runtime.manifest import (
    AUTOENCODER,
    CROSS,
    CROSS_KV,
    DECODER_STEP,
    ENCODER,
    PAST,
    STEP_POSITIONS,
    STEP_SELF_MASK,
    VerificationSummary,
    read_manifest,
)
from cbart.runtime.trt_support import check_request
from transformers import BartForConditionalGeneration

SOURCE_BATCHES = ((6,), (11, 4, 8))
GREEDY_NEW_TOKENS = 12


@dataclass(frozen=True)
class Tolerance:
    """Pass when ``max_abs <= atol + rtol * max|reference|`` for every output; ``exact_tokens``
    demands identical greedy ids end to end (fp32); otherwise agreement is only reported."""

    atol: float
    rtol: float
    exact_tokens: bool

    @classmethod
    def for_precision(cls, precision: str) -> Tolerance:
        """int8: outputs only reported (token agreement); fp16/bf16: loose; fp32: tight, identical greedy ids."""
        if precision == "int8":
            return cls(atol=float("inf"), rtol=float("inf"), exact_tokens=False)
        if precision in ("fp16", "bf16"):
            return cls(atol=5e-2, rtol=2e-2, exact_tokens=False)
        return cls(atol=1e-4, rtol=1e-4, exact_tokens=True)

    @classmethod
    def for_engines(cls, precision: str) -> Tolerance:
        """TensorRT engines: as ONNX, but fp32 within 1e-3 (GPU kernels sum in other orders than PyTorch's
        CPU kernels; TF32 is off) -- greedy ids must still be identical."""
        if precision == "fp32":
            return cls(atol=1e-3, rtol=1e-3, exact_tokens=True)
        return cls.for_precision(precision)


class GraphSession(Protocol):
    """What verification runs a graph through: ONNX Runtime's ``InferenceSession.run``, or a TensorRT engine
    behind the same call (``runtime.backends.tensorrt.EngineSession``)."""

    def run(self, output_names: Any, input_feed: dict[str, np.ndarray]) -> list[np.ndarray]: ...


Fits = Callable[..., bool]
"""Whether a case (sources, source_length, rows, max_length) lies inside the export's limits."""


def within(limits: dict[str, Any] | None) -> Fits:
    """A ``Fits`` for TensorRT engine limits (``None``: ONNX graphs, every case fits)."""

    def fits(**case: int) -> bool:
        if limits is None:
            return True
        try:
            check_request(limits, **case)
        except ValueError:
            return False
        return True

    return fits


EVERY_CASE = within(None)


@dataclass
class OutputComparison:
    graph: str
    output: str
    case: str
    max_abs: float
    max_rel: float
    reference_max: float
    passed: bool


@dataclass
class VerificationReport:
    comparisons: list[OutputComparison] = field(default_factory=list)
    greedy_cases: int = 0
    greedy_identical: int = 0
    token_agreement: float = 1.0
    draft_acceptance: float | None = None
    checker_errors: dict[str, str] = field(default_factory=dict)  # graph file -> onnx.checker's complaint
    passed: bool = True

    def failures(self) -> list[str]:
        lines = [f"{file} fails onnx.checker (full_check): {error}" for file, error in self.checker_errors.items()]
        lines += [
            f"{c.graph}.{c.output} [{c.case}]: max abs {c.max_abs:.3g}, max rel {c.max_rel:.3g} "
            f"(|ref| up to {c.reference_max:.3g})"
            for c in self.comparisons
            if not c.passed
        ]
        if self.greedy_identical < self.greedy_cases and not lines:
            lines.append(
                f"greedy generation differs from PyTorch on {self.greedy_cases - self.greedy_identical} of "
                f"{self.greedy_cases} inputs (token agreement {100 * self.token_agreement:.1f}%)"
            )
        return lines

    def summary(self) -> VerificationSummary:
        worst: dict[str, dict[str, float]] = {}
        for c in self.comparisons:
            key = f"{c.graph}.{c.output}"
            entry = worst.setdefault(key, {"max_abs": 0.0, "max_rel": 0.0})
            entry["max_abs"] = max(entry["max_abs"], c.max_abs)
            entry["max_rel"] = max(entry["max_rel"], c.max_rel)
        return VerificationSummary(
            passed=self.passed,
            onnx_checker="passed" if not self.checker_errors else "failed",
            outputs=worst,
            greedy_identical=f"{self.greedy_identical}/{self.greedy_cases}",
            token_agreement=round(self.token_agreement, 4),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_onnx_graphs(directory: Path, report: VerificationReport) -> None:
    """Every ONNX graph of ``directory`` through ``onnx.checker.check_model(full_check=True)``: other consumers
    of the graphs (checkers, simplifiers, other runtimes) are stricter than ONNX Runtime."""
    manifest = read_manifest(directory, check_files=False)
    for spec in manifest.graphs.values():
        if not spec.file.endswith(".onnx"):
            continue
        try:
            onnx.checker.check_model(str(directory / spec.file), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
            report.checker_errors[spec.file] = str(error).splitlines()[0]


def verify_directory(
    model: BartForConditionalGeneration,
    directory: Path,
    threads: int | None = None,
    graphs_only: bool = False,
) -> VerificationReport:
    """The one verification of an ONNX export directory, used by ``cbart export`` and ``cbart verify``: the ONNX
    checker on every graph, every graph output against PyTorch within the tolerance of the export's precision,
    then (unless ``graphs_only``) greedy generation through the directory against ``model.generate()`` --
    identical ids required for fp32."""
    manifest = read_manifest(directory, check_files=False)
    tolerance = Tolerance.for_precision(manifest.precision)
    report = compare_graphs(model, directory, tolerance, threads)
    check_onnx_graphs(directory, report)
    if not graphs_only:
        compare_generation(model, directory, report, threads)
    identical = report.greedy_identical == report.greedy_cases
    report.passed = report.passed and not report.checker_errors and (identical or not tolerance.exact_tokens)
    return report


def source_batches(vocab_size: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Right-padded random sources (BOS ... EOS) of mixed lengths."""
    rng = np.random.default_rng(seed)
    batches = []
    for lengths in SOURCE_BATCHES:
        ids = np.ones((len(lengths), max(lengths)), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, length in enumerate(lengths):
            ids[row, :length] = [0, *rng.integers(4, vocab_size, length - 2), 2]
            mask[row, :length] = 1
        batches.append((ids, mask))
    return batches


class _Comparer:
    def __init__(self, report: VerificationReport, tolerance: Tolerance) -> None:
        self.report = report
        self.tolerance = tolerance

    def __call__(self, graph: str, output: str, case: str, actual: np.ndarray, expected: torch.Tensor) -> None:
        reference = expected.detach().float().numpy()
        difference = np.abs(actual.astype(np.float32) - reference)
        max_abs = float(difference.max()) if difference.size else 0.0
        reference_max = float(np.abs(reference).max()) if reference.size else 0.0
        max_rel = max_abs / reference_max if reference_max else max_abs
        passed = bool(np.isfinite(max_abs)) and max_abs <= self.tolerance.atol + self.tolerance.rtol * reference_max
        self.report.comparisons.append(OutputComparison(graph, output, case, max_abs, max_rel, reference_max, passed))


def compare_graphs(
    model: BartForConditionalGeneration,
    directory: Path,
    tolerance: Tolerance,
    threads: int | None = None,
    sessions: Mapping[str, GraphSession] | None = None,
    fits: Fits = EVERY_CASE,
) -> VerificationReport:
    """Every graph output against its PyTorch module, through ``sessions`` (default: ONNX Runtime on the
    directory's graphs), on the cases that ``fits``."""
    manifest = read_manifest(directory, check_files=False)
    if sessions is None:
        options = session_options(threads)
        sessions = {
            name: ort.InferenceSession(str(directory / spec.file), options, providers=["CPUExecutionProvider"])
            for name, spec in manifest.graphs.items()
        }
    report = VerificationReport()
    compare = _Comparer(report, tolerance)
    fused = AUTOENCODER not in sessions
    encoder = FusedEncoderGraph(model) if fused else EncoderGraph(model)
    cross_graph = CrossKVGraph(model)
    step_graph = DecoderStepGraph(
        model, last_logits_only=manifest.last_position_logits, per_row_positions=manifest.per_row_positions
    )
    autoencoder = None if fused else AutoencoderGraph(model)
    dims = manifest.model
    with torch.no_grad():
        for ids, mask in source_batches(dims.vocab_size):
            if not fits(sources=ids.shape[0], source_length=ids.shape[1]):
                continue
            case = f"batch {ids.shape[0]}, source length {ids.shape[1]}"
            states = encoder(torch.from_numpy(ids), torch.from_numpy(mask))
            if ENCODER in sessions:  # a speculative pair's draft has none: it reads the full model's encoder
                actual = sessions[ENCODER].run(None, {"input_ids": ids, "attention_mask": mask})[0]
                compare(ENCODER, manifest.graphs[ENCODER].outputs[0].name, case, actual, states)
            if autoencoder is not None:
                hidden = states
                states = autoencoder(hidden)
                actual = sessions[AUTOENCODER].run(None, {"hidden_states": _float(hidden, manifest)})[0]
                compare(AUTOENCODER, "memory", case, actual, states)
            cross = cross_graph(states)
            actual_cross = sessions[CROSS_KV].run(None, {"memory": _float(states, manifest)})
            for spec, actual, expected in zip(manifest.graphs[CROSS_KV].outputs, actual_cross, cross, strict=True):
                compare(CROSS_KV, spec.name, case, actual, expected)
            for rows_per_source in (1, 2):
                if fits(rows=ids.shape[0] * rows_per_source):
                    _compare_steps(
                        sessions[DECODER_STEP], step_graph, cross, mask, rows_per_source, manifest, compare, case, fits
                    )
    report.passed = all(c.passed for c in report.comparisons)
    return report


def _float(tensor: torch.Tensor, manifest: Any) -> np.ndarray:
    """Graph inputs stay float32 in every variant (fp16 graphs keep float32 I/O)."""
    return tensor.numpy().astype(np.float32)


def _compare_steps(session, step_graph, cross, mask, rows_per_source, manifest, compare, case, fits) -> None:
    dims = manifest.model
    rows = cross[0].shape[0] * rows_per_source
    rng = np.random.default_rng(rows)
    past = [torch.zeros(rows, dims.decoder_attention_heads, 0, dims.head_dim) for _ in cross]
    mask_tensor = torch.from_numpy(mask)
    spec = manifest.graphs[DECODER_STEP]
    cache_inputs = [*manifest.cache_names(PAST), *manifest.cache_names(CROSS)]
    compared = [tensor.name for tensor in spec.outputs if tensor.name not in (HIDDEN, RESIDUAL)]  # screen inputs
    for past_length, steps in ((0, 1), (1, 3), (4, 1)):
        if not fits(max_length=past_length + steps):
            break  # the cases grow: later ones do not fit either
        tokens = rng.integers(4, dims.vocab_size, (rows, steps)).astype(np.int64)
        if past_length == 0:
            tokens[:, 0] = 2
        feeds = {"input_ids": tokens, "encoder_attention_mask": mask}
        row_inputs: list[torch.Tensor] = []
        if manifest.per_row_positions:  # each row as if it had joined a running batch `row % 2` steps late
            self_mask = np.ones((rows, past_length + steps), dtype=np.int64)
            self_mask[1::2, : min(past_length, 1)] = 0
            positions = np.arange(steps)[None, :] + self_mask[:, :past_length].sum(axis=1, keepdims=True)
            feeds[STEP_POSITIONS], feeds[STEP_SELF_MASK] = positions, self_mask
            row_inputs = [torch.from_numpy(positions), torch.from_numpy(self_mask)]
        expected = step_graph(torch.from_numpy(tokens), mask_tensor, *row_inputs, *past, *cross)
        if any(tensor.name == SWITCH for tensor in spec.inputs):
            feeds[SWITCH] = np.array(True)
        feeds.update(
            {name: _float(tensor, manifest) for name, tensor in zip(cache_inputs, [*past, *cross], strict=True)}
        )
        actual = session.run(compared, feeds)
        label = f"{case}, {rows_per_source} rows/source, past {past_length}, {steps} new"
        for name, got, want in zip(compared, actual, expected, strict=True):
            compare(DECODER_STEP, name, label, got, want)
        past = list(expected[1:])


def compare_generation(
    model: BartForConditionalGeneration,
    directory: Path,
    report: VerificationReport,
    threads: int | None = None,
    speculative: bool = False,
    runtime: Seq2SeqRuntime | None = None,
    fits: Fits = EVERY_CASE,
) -> None:
    """Greedy through the export directory (or ``runtime``) vs ``model.generate()``: identical ids and token
    agreement, on the inputs that ``fits``.

    ``speculative``: through a pair export's draft-and-verify loop; records the draft's acceptance rate.
    """
    runtime = runtime or Seq2SeqRuntime.from_dir(directory, threads=threads, check_files=False)
    new_tokens = next(n for n in range(GREEDY_NEW_TOKENS, -1, -1) if n == 0 or fits(max_length=n + 1))
    agree = total = proposed = accepted = 0
    for ids, mask in source_batches(runtime.manifest.model.vocab_size, seed=1):
        if new_tokens == 0 or not fits(sources=ids.shape[0], source_length=ids.shape[1]):
            continue
        with torch.no_grad():
            expected = model.generate(
                input_ids=torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask),
                num_beams=1,
                do_sample=False,
                max_new_tokens=new_tokens,
            ).tolist()
        sequences = [row[: int(m.sum())].tolist() for row, m in zip(ids, mask, strict=True)]
        output = runtime.generate(
            sequences, num_beams=1, do_sample=False, max_new_tokens=new_tokens, speculative=speculative
        )
        if output.speculation is not None:
            proposed += output.speculation.proposed
            accepted += output.speculation.accepted
        actual = output.sequences
        for got, want in zip(actual, expected, strict=True):
            report.greedy_cases += 1
            report.greedy_identical += int(got == want)
            width = max(len(got), len(want))
            got, want = got + [-1] * (width - len(got)), want + [-1] * (width - len(want))
            agree += sum(a == b for a, b in zip(got, want, strict=True))
            total += width
    report.token_agreement = agree / max(total, 1)
    if speculative:
        report.draft_acceptance = accepted / max(proposed, 1)


def verify_engines(model: BartForConditionalGeneration, directory: Path) -> VerificationReport:
    """A TensorRT export directory, as ``verify_directory`` checks ONNX ones: every engine's outputs against
    PyTorch, then greedy generation through the engines against ``model.generate()`` (identical ids for fp32
    engines), on the cases inside the engines' profiles."""
    runtime = Seq2SeqRuntime.from_dir(directory, backend="tensorrt", check_files=False)
    manifest = runtime.manifest
    assert manifest.engine is not None, "verify_engines reads TensorRT export directories"
    tolerance = Tolerance.for_engines(manifest.precision)
    fits = within(manifest.engine.limits)
    report = compare_graphs(model, directory, tolerance, sessions=runtime.backend.sessions(), fits=fits)
    compare_generation(model, directory, report, runtime=runtime, fits=fits)
    report.passed = report.passed and (report.greedy_identical == report.greedy_cases or not tolerance.exact_tokens)
    return report
