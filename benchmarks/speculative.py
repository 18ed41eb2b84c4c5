"""Speculative decoding, measured: the trained Multi30k pair, and the overhead on random bart-base shapes.

``cbart bench speculative --work ../quality-work`` (or ``python -m cbart.benchmarks.speculative``), on the models
``python -m cbart.benchmarks.quality`` trained there. For every compressed draft found in the work folder, fp32
and int8, a pair export is written (``cbart export base --draft DRAFT``, verified at export) and every
Multi30k test sentence is translated at batch 1, greedy, by the full fp32 model alone (``cbart:fp32``)
and through each pair (``cbart:<draft precision>+spec``). Every speculative output is checked against the full model's,
sentence by sentence. Systems run in interleaved rounds in one process, so machine drift hits them
alike; decode ms/token is the median over rounds of decode time / generated tokens.

The random-weight sections export bart-base's shape with a random compressed-384 draft and time exactly
``NEW_TOKENS`` tokens per probe with and without ``speculative=True``: the cost structure at real shapes.
Random BARTs with tied embeddings mostly repeat their last token, so such a draft agrees often (``random``);
with untied embeddings and a larger init the draft never agrees (``random_never_agreeing``), which measures
what adaptive drafting costs when it does not pay.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from cbart.benchmarks.quality.translation import MAX_NEW_TOKENS

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp32", "int8")
NEW_TOKENS = 64
PROBES = 8
RANDOM_SECTIONS = {"random": False, "random_never_agreeing": True}  # section -> ModelSpec.varied


def pair_export(full: Path, draft: Path, out: Path, precision: str, threads: int) -> Path:
    """``cbart export FULL --draft DRAFT`` (reused when already there); the pair is verified at export."""
    from cbart.exporter.export import ExportOptions
    from cbart.exporter.pair import export_pair

    if not (out / "manifest.json").is_file():
        quantize = "int8" if precision == "int8" else None
        export_pair(full, draft, out, ExportOptions(progress=False, threads=threads), quantize, log=lambda *_: None)
    return out


def run_pass(runtime: Any, sources: list[list[int]], speculative: bool, **generation: Any) -> dict[str, Any]:
    """Batch-1 greedy over ``sources``: outputs, decode and total seconds, tokens, draft statistics."""
    outputs, decode_s, total_s, tokens = [], 0.0, 0.0, 0
    counts = {"proposed": 0, "accepted": 0, "full_calls": 0, "draft_s": 0.0, "verify_s": 0.0}
    for ids in sources:
        output = runtime.generate([ids], speculative=speculative, **generation)
        outputs.append(output.sequences[0])
        decode_s += output.timings["decode_s"]
        total_s += output.timings["total_s"]
        tokens += len(output.sequences[0]) - 1
        if output.speculation is not None:
            for key in counts:
                counts[key] += getattr(output.speculation, key)
    return {"outputs": outputs, "decode_s": decode_s, "total_s": total_s, "tokens": tokens, **counts}


def interleaved(
    systems: dict[str, tuple[Any, bool]], sources: list[list[int]], rounds: int, **generation: Any
) -> dict[str, list[dict[str, Any]]]:
    """``rounds`` passes of every system over ``sources``, systems interleaved within each round."""
    passes: dict[str, list[dict[str, Any]]] = {name: [] for name in systems}
    for runtime, speculative in systems.values():  # warm-up: session arenas
        runtime.generate([sources[0]], speculative=speculative, **generation)
    for round_index in range(rounds):
        for name, (runtime, speculative) in systems.items():
            passes[name].append(run_pass(runtime, sources, speculative, **generation))
        print(f"  round {round_index + 1}/{rounds} done", flush=True)
    return passes


def summarize(name: str, passes: list[dict[str, Any]], reference: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds; speed-ups against the full model's medians from the same rounds."""
    ms = [1000 * p["decode_s"] / p["tokens"] for p in passes]
    full_ms = [1000 * p["decode_s"] / p["tokens"] for p in reference]
    total = [p["total_s"] for p in passes]
    full_total = [p["total_s"] for p in reference]
    first = passes[0]
    expected = reference[0]["outputs"]
    row: dict[str, Any] = {
        "system": name,
        "sentences": len(first["outputs"]),
        "identical_to_full": sum(a == b for a, b in zip(first["outputs"], expected, strict=True)),
        "decode_ms_per_token": {"median": statistics.median(ms), "min": min(ms), "max": max(ms)},
        "decode_speedup": statistics.median(full_ms) / statistics.median(ms),
        "end_to_end_speedup": statistics.median(full_total) / statistics.median(total),
    }
    if first["proposed"]:
        row.update(
            acceptance_rate=first["accepted"] / first["proposed"],
            tokens_per_full_call=first["tokens"] / first["full_calls"],
            draft_share_of_decode=first["draft_s"] / first["decode_s"],
        )
    return row


def trained_drafts(work: Path) -> list[str]:
    """The stage-2 models ``python -m cbart.benchmarks.quality`` finished in ``work`` (not stage 1, not runs in
    progress)."""
    from cbart.benchmarks.quality.translation import RECORD

    return sorted(
        path.name for path in work.glob("compressed-*") if (path / RECORD).is_file() and not path.name.endswith("-ae")
    )


def trained_pair(work: Path, sentences: int | None, rounds: int, threads: int) -> dict[str, Any]:
    from cbart.benchmarks.quality.data import load_multi30k, read_vocabulary
    from cbart.runtime.generator import Seq2SeqRuntime

    data = load_multi30k(train_rows=1, vocabulary=read_vocabulary(work))
    sources = [example.input_ids for example in data.test[:sentences]]
    drafts = trained_drafts(work)
    if not drafts:
        raise SystemExit(f"error: no trained compressed model in {work}; run python -m cbart.benchmarks.quality first")
    systems: dict[str, tuple[Any, bool]] = {}
    for draft in drafts:
        for precision in PRECISIONS:
            print(f"[speculative] pair export base + {draft} ({precision})", flush=True)
            pair = pair_export(
                work / "base", work / draft, work / "exports" / f"pair-{draft}-{precision}", precision, threads
            )
            runtime = Seq2SeqRuntime.from_dir(pair, threads=threads, check_files=False)
            if not systems:
                systems["cbart:fp32"] = (runtime, False)  # the pair's full model decoding alone
            systems[f"cbart:{precision}+spec / {draft}"] = (runtime, True)
    print(f"[speculative] {len(sources)} test sentences x {len(systems)} systems x {rounds} rounds", flush=True)
    passes = interleaved(systems, sources, rounds, max_new_tokens=MAX_NEW_TOKENS)
    reference = passes["cbart:fp32"]
    return {
        "sentences": len(sources),
        "rounds": rounds,
        "rows": [summarize(name, runs, reference) for name, runs in passes.items()],
    }


def random_pair(cache: Path, rounds: int, threads: int, varied: bool) -> dict[str, Any]:
    """bart-base shapes, random compressed-384 int8 draft: adaptive drafting vs plain full decoding.

    ``varied=False``: tied embeddings, both models repeat their last token, so the draft mostly agrees.
    ``varied=True``: untied embeddings and a larger init, the draft never agrees: the overhead the adaptive
    draft length leaves when drafting does not pay.
    """
    import numpy as np
    from cbart.benchmarks.models import ModelSpec, checkpoint
    from cbart.runtime.generator import Seq2SeqRuntime

    full, draft = checkpoint(ModelSpec(None, varied), cache), checkpoint(ModelSpec(384, varied), cache)
    print(f"[speculative] random bart-base pair export {full.name} + {draft.name} (int8 draft)", flush=True)
    pair = pair_export(full, draft, cache / f"pair-{full.name}-{draft.name}-int8", "int8", threads)
    runtime = Seq2SeqRuntime.from_dir(pair, threads=threads, check_files=False)
    rng = np.random.default_rng(0)
    sources = [[0, *rng.integers(4, 50000, 62).tolist(), 2] for _ in range(PROBES)]
    systems = {"cbart:fp32": (runtime, False), f"cbart:int8+spec / random {draft.name}": (runtime, True)}
    passes = interleaved(systems, sources, rounds, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    rows = [summarize(name, runs, passes["cbart:fp32"]) for name, runs in passes.items()]
    return {"probes": PROBES, "new_tokens": NEW_TOKENS, "rounds": rounds, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    from cbart.benchmarks.machine import machine

    parser = argparse.ArgumentParser(prog="cbart bench speculative", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--work", type=Path, required=True, help="the work folder of python -m cbart.benchmarks.quality"
    )
    parser.add_argument("--sentences", type=int, default=None, help="only the first N test sentences")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / ".cache")
    parser.add_argument("--skip-random", action="store_true", help="no bart-base overhead section")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "speculative.json")
    args = parser.parse_args(argv)
    started = time.time()
    results: dict[str, Any] = {
        "command": "cbart bench speculative " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "threads": args.threads,
        "trained": trained_pair(args.work, args.sentences, args.rounds, args.threads),
    }
    if not args.skip_random:
        for section, varied in RANDOM_SECTIONS.items():
            results[section] = random_pair(args.cache, max(args.rounds, 5), args.threads, varied)
    results["minutes"] = round((time.time() - started) / 60, 1)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    for section in ("trained", *RANDOM_SECTIONS):
        for row in results.get(section, {}).get("rows", []):
            print(
                f"{section:8s} {row['system']:45s} {row['decode_ms_per_token']['median']:.3f} ms/token  "
                f"x{row['decode_speedup']:.2f} decode  x{row['end_to_end_speedup']:.2f} end to end  "
                f"identical {row['identical_to_full']}/{row['sentences']}  "
                f"acceptance {row.get('acceptance_rate', 0):.2f}"
            )
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
