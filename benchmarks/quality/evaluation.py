"""Score trained models through cbart's own deployment path and time them there.

Every model is exported with ``cbart export`` (fp32, and dynamic int8), test translations come from
the ONNX Runtime runtime (what a user ships), and decode ms/token is measured for all models in the
same run, in interleaved rounds, at batch 1 and greedy -- the only way a latency ratio holds on a
machine that drifts 20-30% within minutes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cbart.benchmarks.quality.data import TranslationData
from cbart.benchmarks.quality.translation import MAX_NEW_TOKENS

BATCH = 32
TIMED_TOKENS = 32
ROUNDS = 7  # tiny models decode in ~1 ms/token: per-call noise needs more rounds than bart-base shapes


def export(checkpoint: Path, out: Path, quantize: str | None = None) -> Path:
    """``cbart export`` of a checkpoint (reused when already there); verification runs at export."""
    from cbart.exporter.export import ExportOptions, export_onnx

    if (out / "manifest.json").is_file():
        return out
    export_onnx(checkpoint, out, ExportOptions(quantize=quantize, progress=False), log=lambda *_: None)
    return out


def open_runtime(directory: Path, threads: int) -> Any:
    from cbart.runtime.generator import Seq2SeqRuntime

    return Seq2SeqRuntime.from_dir(directory, threads=threads, check_files=False)


def translate(runtime: Any, data: TranslationData, split: str, generation: dict[str, Any]) -> list[str]:
    """Translations of a split through the exported runtime (what a user ships)."""

    def generate(examples: list[Any]) -> list[list[int]]:
        ids = [example.input_ids for example in examples]
        return runtime.generate(ids, max_new_tokens=MAX_NEW_TOKENS, **generation).sequences

    return data.translate(split, BATCH, generate)


def decode_ms_per_token(
    runtimes: dict[str, Any], probes: Sequence[Sequence[int]], rounds: int = ROUNDS
) -> dict[str, dict]:
    """Batch-1 greedy decode ms/token, (T(32 tokens) - T(1 token)) / 31, interleaved across models.

    Each round times every model on every probe sentence with forced output lengths; the result is
    the median over rounds with min and max, so the spread is visible.
    """
    samples: dict[str, list[float]] = {name: [] for name in runtimes}
    for runtime in runtimes.values():  # warm-up: session arenas and caches
        runtime.generate([probes[0]], max_new_tokens=2, min_new_tokens=2)
    for _ in range(rounds):
        for name, runtime in runtimes.items():
            elapsed = {}
            for count in (1, TIMED_TOKENS):
                started = time.perf_counter()
                for probe in probes:
                    runtime.generate([probe], max_new_tokens=count, min_new_tokens=count)
                elapsed[count] = (time.perf_counter() - started) / len(probes)
            samples[name].append(1000 * (elapsed[TIMED_TOKENS] - elapsed[1]) / (TIMED_TOKENS - 1))
    return {
        name: {"median": statistics.median(values), "min": min(values), "max": max(values)}
        for name, values in samples.items()
    }


def decoder_parameters(checkpoint: Path) -> int:
    """Decoder parameters incl. its embedding (tied to the LM head), as the paper counts them."""
    from cbart.exporter.export import load_model

    model = load_model(checkpoint)
    return sum(p.numel() for p in model.model.decoder.parameters())
