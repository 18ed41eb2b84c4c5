"""Where a replica's memory goes: one export laid out two ways, ONNX Runtime's arena shared or per session.

A replica's peak resident memory decides how many fit on a machine. Two choices set it (see
``exporter.external_weights`` and ``runtime.backends.onnxruntime.shared_cpu_arena``):

* **layout**: ``external`` is the export as ``cbart export`` writes it (weights memory-mapped, one copy of
  the tied embedding, shared mappings); ``inline`` is the same graphs with every weight inside its
  ``.onnx`` file, each graph holding its own copy, as exports were written before;
* **arena**: ``shared`` (one CPU arena for all sessions of the process, the default) or ``per-session``.

Every variant runs in a fresh worker process (``benchmarks.worker``), variants interleaved within each
round; the table gives peak RSS and latency beside each other, as ratios to the old setup (inline,
per-session).

    python -m cbart.benchmarks.replica_memory --precisions fp32,int8 --batches 1,8 --rounds 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import onnx
from cbart.benchmarks.latency import Cell, Engine, run_worker
from cbart.benchmarks.machine import machine
from cbart.benchmarks.models import ModelSpec, onnx_export
from cbart.exporter.external_weights import GATHER_ALIAS_SUFFIX, nested_graphs
from cbart.runtime.manifest import MANIFEST, file_entries, read_manifest

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ("inline", "external")
ARENAS = ("per-session", "shared")


@dataclass(frozen=True)
class Variant:
    layout: str
    arena: str

    @property
    def label(self) -> str:
        return f"{self.layout} weights, {self.arena} arena"


def inline_copy(directory: Path, destination: Path) -> Path:
    """``directory``'s graphs with their weights inside them again and no shared mappings: the earlier layout."""
    shutil.rmtree(destination, ignore_errors=True)  # made again each run: ``directory`` may have been re-exported
    staging = destination.with_name(destination.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(directory, staging, ignore=shutil.ignore_patterns("*.onnx.data"))
    manifest = read_manifest(directory, check_files=False)
    for spec in manifest.graphs.values():
        model = onnx.load(str(directory / spec.file))  # reads the external data in
        aliases = [t.name for t in model.graph.initializer if t.name.endswith(GATHER_ALIAS_SUFFIX)]
        for graph in nested_graphs(model.graph):
            for node in graph.node:
                node.input[:] = [name.removesuffix(GATHER_ALIAS_SUFFIX) for name in node.input]
        kept = [t for t in model.graph.initializer if t.name not in aliases]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        onnx.save(model, str(staging / spec.file))
    manifest.shared_weights = []
    manifest.files = file_entries(staging)
    (staging / MANIFEST).write_text(manifest.to_json())
    staging.rename(destination)
    return destination


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", default="fp32,int8", help="comma-separated: fp32, int8")
    parser.add_argument("--latent", type=int, default=None, help="a compressed model (e.g. 384); default: full")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--beams", default="1")
    parser.add_argument("--source", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / ".cache")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--name", default="replica-memory")
    args = parser.parse_args(argv)

    spec = ModelSpec(args.latent)
    variants = [Variant(layout, arena) for layout in LAYOUTS for arena in ARENAS]
    cells = [
        Cell(int(batch), args.source, int(beams), args.new_tokens)
        for batch, beams in itertools.product(args.batches.split(","), args.beams.split(","))
    ]
    paths = {}
    for precision in args.precisions.split(","):
        external = onnx_export(spec, args.cache, precision)
        paths[(precision, "external")] = external
        paths[(precision, "inline")] = inline_copy(external, external.with_name(external.name + "-inline"))
    started = time.time()
    measured: dict[tuple[str, Cell, Variant], list[dict]] = {}
    for round_index in range(args.rounds):
        for precision, cell, variant in itertools.product(args.precisions.split(","), cells, variants):
            extra = ("--per-session-arena",) if variant.arena == "per-session" else ()
            path = paths[(precision, variant.layout)]
            report = run_worker(Engine("cbart", spec, precision), path, cell, args.threads, 2, sys.executable, extra)
            measured.setdefault((precision, cell, variant), []).append(report)
            print(
                f"round {round_index + 1}: {precision} {cell.label}, {variant.label}: {report['peak_rss_mib']:.0f} MiB",
                flush=True,
            )
    rows = []
    for (precision, cell, variant), reports in measured.items():
        rows.append(
            {
                "precision": precision,
                "cell": cell.__dict__,
                "layout": variant.layout,
                "arena": variant.arena,
                "peak_rss_mib": max(r["peak_rss_mib"] for r in reports),
                "t1_s": statistics.median(t for r in reports for t in r["t1"]),
                "tn_s": statistics.median(t for r in reports for t in r["tn"]),
            }
        )
    table = markdown(rows, spec.name)
    print(table)
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"{args.name}.json"
    out.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "command": "python -m cbart.benchmarks.replica_memory " + " ".join(argv or sys.argv[1:]),
                "model": spec.name,
                "threads": args.threads,
                "machine": machine(),
                "minutes": round((time.time() - started) / 60, 1),
                "results": rows,
                "table": table,
            },
            indent=1,
        )
    )
    print(f"wrote {out}")
    return 0


def markdown(rows: list[dict], model: str) -> str:
    """One line per precision, cell and variant: peak RSS and latency, each also as a ratio to the old setup."""
    lines = [
        f"| {model} | weights | arena | peak RSS MiB | vs old | T(1) s | T(N) s | T(N) vs old |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        old = next(
            r
            for r in rows
            if r["precision"] == row["precision"]
            and r["cell"] == row["cell"]
            and (r["layout"], r["arena"]) == ("inline", "per-session")
        )
        cell = Cell(**row["cell"])
        lines.append(
            f"| {row['precision']}, {cell.label} | {row['layout']} | {row['arena']} | {row['peak_rss_mib']:.0f} | "
            f"{row['peak_rss_mib'] / old['peak_rss_mib']:.2f}x | {row['t1_s']:.3f} | {row['tn_s']:.3f} | "
            f"{row['tn_s'] / old['tn_s']:.2f}x |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
