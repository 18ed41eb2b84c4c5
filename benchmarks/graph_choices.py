"""Measure export/runtime design choices on bart-base-shaped models.

1. ``--fuse-encoder``: encoder + autoencoder as one graph vs two graphs (encode time, 512 tokens).
2. ``--attention``: the full model's encoder self-attention as plain ONNX ops vs ONNX Runtime's fused
   MultiHeadAttention (encode time, batch 1 and 8, 512 tokens).
3. Beam-shared cross-attention K/V: one copy per input (cbart's default) vs one copy per beam (what
   the ONNX/TensorRT reference pipelines do): beam-4 generation time and cross-cache bytes.
4. ``--lm-head-screen``: greedy decode time per token with the exact fp32 LM head vs the screened one
   (full model and compressed-384, batch 1, 512 source tokens, 64 new tokens).
5. ``--attention`` in the decoder step: greedy decode time per token with the cached self-attention as
   plain ONNX ops vs ONNX Runtime's fused MultiHeadAttention (same models and cell as 4).

The variants of each choice run alternately in one process, so drift hits them alike.

    python -m cbart.benchmarks.graph_choices
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from cbart.benchmarks.models import ModelSpec, checkpoint
from cbart.benchmarks.worker import source_ids

ROOT = Path(__file__).resolve().parents[1]


def _timed(function, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return times


def _variant_runtimes(spec: ModelSpec, cache: Path, variants: dict[str, dict[str, Any]], threads: int) -> dict:
    """One runtime per export variant (``ExportOptions`` overrides), exported once into ``cache``."""
    from cbart.exporter.export import ExportOptions, export_onnx
    from cbart.runtime.generator import Seq2SeqRuntime

    runtimes = {}
    for label, overrides in variants.items():
        directory = cache / f"{spec.name}-onnx-{label}"
        if not (directory / "manifest.json").is_file():
            options = ExportOptions(verify=False, progress=False, **overrides)
            export_onnx(checkpoint(spec, cache), directory, options, log=lambda *_: None)
        runtimes[label] = Seq2SeqRuntime.from_dir(directory, threads=threads, check_files=False)
    return runtimes


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
    runtimes = _variant_runtimes(spec, cache, variants, threads)
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


def decode_ms_per_token(
    variants: dict[str, dict[str, Any]], cache: Path, threads: int, repeats: int, new_tokens: int = 64
) -> dict[str, float]:
    """Greedy decode ms/token of export variants on the full model and compressed-384 (batch 1, src 512).

    Keys are ``<model>_<label>_ms_per_token``. The variants must give the same token ids (checked here):
    these choices change speed, never the output.
    """
    results = {}
    for spec in (ModelSpec(None), ModelSpec(384)):
        runtimes = _variant_runtimes(spec, cache, variants, threads)
        ids = source_ids(1, 512).tolist()
        encoded = {label: runtime.encode(ids) for label, runtime in runtimes.items()}
        settings = {"num_beams": 1, "min_new_tokens": new_tokens, "max_new_tokens": new_tokens}
        outputs = [runtimes[label].generate(encoded=encoded[label], **settings).sequences for label in runtimes]
        if any(sequences != outputs[0] for sequences in outputs):
            raise AssertionError(f"{spec.name}: the variants {', '.join(variants)} gave different greedy tokens")
        times: dict[str, list[float]] = {label: [] for label in runtimes}
        for _ in range(repeats):
            for label, runtime in runtimes.items():
                decode_s = runtime.generate(encoded=encoded[label], **settings).timings["decode_s"]
                times[label].append(1000 * decode_s / new_tokens)
        for label, values in times.items():
            results[f"{spec.name}_{label}_ms_per_token"] = statistics.median(values)
    return results


def lm_head_screen(cache: Path, threads: int, repeats: int) -> dict[str, float]:
    """Greedy decode with the exact fp32 LM head vs the screened one."""
    variants = {"lm-head-exact": {"lm_head_screen": "off"}, "lm-head-screened": {"lm_head_screen": "on"}}
    return decode_ms_per_token(variants, cache, threads, repeats)


def decoder_attention(cache: Path, threads: int, repeats: int) -> dict[str, float]:
    """Greedy decode with the decoder step's cached self-attention as plain ops vs one fused node per layer."""
    variants = {"attention-plain": {"attention": "plain"}, "attention-fused": {"attention": "fused"}}
    return decode_ms_per_token(variants, cache, threads, repeats)


def beam_sharing(cache: Path, threads: int, repeats: int, beams: int = 4) -> dict[str, float]:
    import onnxruntime as ort
    from cbart.benchmarks.models import onnx_export
    from cbart.runtime.backends.base import EncodedBatch
    from cbart.runtime.generator import Seq2SeqRuntime
    from cbart.runtime.search import beam_search

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


def table(results: dict[str, float]) -> str:
    """One row per measured choice (rows whose numbers are missing are left out)."""
    rows = [
        ("encoder graphs (512 tokens, encode s)", "split", "split_encode_s", "fused", "fused_encode_s", 3),
        *(
            (
                f"full-model encoder self-attention (batch {batch}, 512 tokens, encode s)",
                "plain ops",
                f"plain_attention_b{batch}_encode_s",
                "fused MultiHeadAttention",
                f"fused_attention_b{batch}_encode_s",
                3,
            )
            for batch in (1, 8)
        ),
        ("cross K/V at beam 4 (src 512, 64 new, s)", "shared", "shared_beam4_s", "per beam", "per_beam_beam4_s", 3),
        ("cross K/V cache (MiB)", "shared", "shared_cross_cache_mib", "per beam", "per_beam_cross_cache_mib", 1),
        *(
            (
                f"{model} greedy decode, LM head (batch 1, src 512, ms/token)",
                "exact fp32",
                f"{model}_lm-head-exact_ms_per_token",
                "screened",
                f"{model}_lm-head-screened_ms_per_token",
                1,
            )
            for model in ("full", "compressed-384")
        ),
        *(
            (
                f"{model} greedy decode, decoder self-attention (batch 1, src 512, ms/token)",
                "plain ops",
                f"{model}_attention-plain_ms_per_token",
                "fused MultiHeadAttention",
                f"{model}_attention-fused_ms_per_token",
                1,
            )
            for model in ("full", "compressed-384")
        ),
    ]
    lines = ["| choice | variant A | variant B |", "|---|---|---|"]
    for label, name_a, key_a, name_b, key_b, digits in rows:
        if key_a in results and key_b in results:
            lines.append(f"| {label} | {name_a}: {results[key_a]:.{digits}f} | {name_b}: {results[key_b]:.{digits}f} |")
    return "\n".join(lines)


CHOICES = {
    "encoder": encoder_choices,
    "beam": beam_sharing,
    "lm-head": lm_head_screen,
    "decoder-attention": decoder_attention,
}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / ".cache")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--choices",
        default=",".join(CHOICES),
        help=f"comma-separated subset of {', '.join(CHOICES)}; their rows replace those of an earlier run",
    )
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.choices.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(CHOICES))
    if unknown:
        parser.error(f"unknown choice(s) {', '.join(unknown)}; pick from {', '.join(CHOICES)}")
    path = args.results / "graph-choices.json"
    results = json.loads(path.read_text())["results"] if path.is_file() else {}
    for name in chosen:
        repeats = max(2, args.repeats // 2) if name == "beam" else args.repeats
        results.update(CHOICES[name](args.cache, args.threads, repeats))
    text = table(results)
    print(text)
    args.results.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"results": results, "table": text}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
