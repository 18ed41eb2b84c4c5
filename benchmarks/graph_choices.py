"""Measure export/runtime design choices on bart-base-shaped models.

1. ``--fuse-encoder``: encoder + autoencoder as one graph vs two graphs (encode time, 512 tokens).
2. ``--attention``: the full model's encoder self-attention as plain ONNX ops vs ONNX Runtime's fused
   MultiHeadAttention (encode time, batch 1 and 8, 512 tokens).
3. Beam-shared cross-attention K/V: one copy per input (cbart's default) vs one copy per beam (what
   the ONNX/TensorRT reference pipelines do): beam-4 generation time and cross-cache bytes.

The variants of each choice run alternately in one process, so drift hits them alike.

    python -m benchmarks.graph_choices
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.models import ModelSpec, checkpoint
from benchmarks.worker import source_ids

ROOT = Path(__file__).resolve().parents[1]


def _timed(function, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return times


def encode_times(
    spec: ModelSpec,
    cache: Path,
    variants: dict[str, dict[str, Any]],
    shape: tuple[int, int],
    threads: int,
    repeats: int,
) -> dict[str, float]:
    """Median encode time (encoder [+ autoencoder] + cross K/V) of each export variant on one input shape.

    ``variants`` maps a label to ``ExportOptions`` overrides; variants run alternately.
    """
    from exporter.export import ExportOptions, export_onnx
    from runtime.generator import Seq2SeqRuntime

    runtimes = {}
    for label, overrides in variants.items():
        directory = cache / f"{spec.name}-onnx-{label}"
        if not (directory / "manifest.json").is_file():
            options = ExportOptions(verify=False, progress=False, **overrides)
            export_onnx(checkpoint(spec, cache), directory, options, log=lambda *_: None)
        runtimes[label] = Seq2SeqRuntime.from_dir(directory, threads=threads, check_files=False)
    ids = source_ids(*shape).tolist()
    times: dict[str, list[float]] = {label: [] for label in runtimes}
    for runtime in runtimes.values():
        runtime.encode(ids)
    for _ in range(repeats):
        for label, runtime in runtimes.items():
            times[label] += _timed(lambda runtime=runtime: runtime.encode(ids), 1)
    return {label: statistics.median(values) for label, values in times.items()}


def encoder_choices(cache: Path, threads: int, repeats: int) -> dict[str, float]:
    """``--fuse-encoder`` on compressed-384, and ``--attention`` on the full model at batch 1 and 8."""
    graphs = encode_times(
        ModelSpec(384),
        cache,
        {"split": {"fuse_encoder": False}, "fused": {"fuse_encoder": True}},
        (1, 512),
        threads,
        repeats,
    )
    results = {"split_encode_s": graphs["split"], "fused_encode_s": graphs["fused"]}
    attention = {"attention-plain": {"attention": "plain"}, "attention-fused": {"attention": "fused"}}
    for batch in (1, 8):
        times = encode_times(ModelSpec(None), cache, attention, (batch, 512), threads, max(2, repeats // batch))
        results[f"plain_attention_b{batch}_encode_s"] = times["attention-plain"]
        results[f"fused_attention_b{batch}_encode_s"] = times["attention-fused"]
    return results


def beam_sharing(cache: Path, threads: int, repeats: int, beams: int = 4) -> dict[str, float]:
    import onnxruntime as ort

    from benchmarks.models import onnx_export
    from runtime.backends.base import EncodedBatch
    from runtime.generator import Seq2SeqRuntime
    from runtime.search import beam_search

    runtime = Seq2SeqRuntime.from_dir(onnx_export(ModelSpec(384), cache), threads=threads, check_files=False)
    settings = runtime.settings(num_beams=beams, min_new_tokens=64, max_new_tokens=64)
    encoded = runtime.encode(source_ids(1, 512).tolist())
    per_beam = EncodedBatch(
        cross_kv=[ort.OrtValue.ortvalue_from_numpy(np.repeat(v.numpy(), beams, axis=0)) for v in encoded.cross_kv],
        attention_mask=np.repeat(encoded.attention_mask, beams, axis=0),
        input_ids=np.repeat(encoded.input_ids, beams, axis=0),
    )

    def shared() -> None:
        beam_search(runtime.backend.start(encoded, beams), encoded.sources, settings)

    def copied() -> None:
        beam_search(runtime.backend.start(per_beam, 1), encoded.sources, settings)

    times: dict[str, list[float]] = {"shared": [], "per_beam": []}
    shared(), copied()
    for _ in range(repeats):
        times["shared"] += _timed(shared, 1)
        times["per_beam"] += _timed(copied, 1)
    cross_bytes = sum(v.numpy().nbytes for v in encoded.cross_kv)
    return {
        "shared_beam4_s": statistics.median(times["shared"]),
        "per_beam_beam4_s": statistics.median(times["per_beam"]),
        "shared_cross_cache_mib": cross_bytes / 2**20,
        "per_beam_cross_cache_mib": beams * cross_bytes / 2**20,
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / ".cache")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    results = {
        **encoder_choices(args.cache, args.threads, args.repeats),
        **beam_sharing(args.cache, args.threads, max(2, args.repeats // 2)),
    }
    table = "\n".join(
        [
            "| choice | variant A | variant B |",
            "|---|---|---|",
            f"| encoder graphs (512 tokens, encode s) | split: {results['split_encode_s']:.3f} | "
            f"fused: {results['fused_encode_s']:.3f} |",
            *(
                f"| full-model encoder self-attention (batch {batch}, 512 tokens, encode s) | "
                f"plain ops: {results[f'plain_attention_b{batch}_encode_s']:.3f} | "
                f"fused MultiHeadAttention: {results[f'fused_attention_b{batch}_encode_s']:.3f} |"
                for batch in (1, 8)
            ),
            f"| cross K/V at beam 4 (src 512, 64 new, s) | shared: {results['shared_beam4_s']:.3f} | "
            f"per beam: {results['per_beam_beam4_s']:.3f} |",
            f"| cross K/V cache (MiB) | shared: {results['shared_cross_cache_mib']:.1f} | "
            f"per beam: {results['per_beam_cross_cache_mib']:.1f} |",
        ]
    )
    print(table)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "graph-choices.json").write_text(json.dumps({"results": results, "table": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
