"""Regenerate the README's "Performance" section from ``benchmarks/results/*.json`` (never hand-edited).

python -m benchmarks.readme
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- performance:start -->", "<!-- performance:end -->"
LATENCY_FILES = ("latency-greedy.json", "latency-beam.json", "latency-quick.json")


def _find(data: dict, system: str, model: str, precision: str = "fp32") -> dict | None:
    for row in data["results"]:
        if (row["system"], row["model"], row["precision"]) == (system, model, precision):
            return row
    return None


TARGETS = [
    # (file, description, numerator engine, denominator engine, metric, required ratio)
    (
        "latency-greedy.json",
        "compressed-384 fp32 vs transformers full (end to end)",
        ("transformers", "full", "fp32"),
        ("cbart", "compressed-384", "fp32"),
        "median_s",
        2.0,
    ),
    (
        "latency-greedy.json",
        "compressed-384 int8 vs CTranslate2 int8 full (end to end)",
        ("ctranslate2", "full", "int8"),
        ("cbart", "compressed-384", "int8"),
        "median_s",
        2.0,
    ),
    (
        "latency-beam.json",
        "beam 4: compressed-384 int8 vs CTranslate2 int8 full",
        ("ctranslate2", "full", "int8"),
        ("cbart", "compressed-384", "int8"),
        "median_s",
        2.0,
    ),
    (
        "latency-greedy.json",
        "full model, cbart fp32 vs transformers (end to end)",
        ("transformers", "full", "fp32"),
        ("cbart", "full", "fp32"),
        "median_s",
        2.0,
    ),
    (
        "latency-greedy.json",
        "full model, cbart fp32 vs Optimum fp32",
        ("optimum", "full", "fp32"),
        ("cbart", "full", "fp32"),
        "median_s",
        1.0,
    ),
    (
        "latency-greedy.json",
        "full model, cbart fp32 vs CTranslate2 fp32",
        ("ctranslate2", "full", "fp32"),
        ("cbart", "full", "fp32"),
        "median_s",
        1.0,
    ),
    (
        "latency-greedy.json",
        "full model, cbart int8 vs CTranslate2 int8",
        ("ctranslate2", "full", "int8"),
        ("cbart", "full", "int8"),
        "median_s",
        1.0,
    ),
    (
        "latency-greedy.json",
        "per token: cbart compressed-384 vs cbart full (fp32)",
        ("cbart", "full", "fp32"),
        ("cbart", "compressed-384", "fp32"),
        "per_token_ms",
        1.8,
    ),
    (
        "latency-greedy.json",
        "C++ vs Python runtime, compressed-384 fp32 (end to end)",
        ("cbart", "compressed-384", "fp32"),
        ("cbart-cpp", "compressed-384", "fp32"),
        "median_s",
        1.0,
    ),
]


def targets(results: Path) -> str:
    lines = ["| target | required | measured (same run) | met |", "|---|---|---|---|"]
    for file, description, slower, faster, metric, required in TARGETS:
        path = results / file
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        a, b = _find(data, *slower), _find(data, *faster)
        if a is None or b is None:
            lines.append(f"| {description} | {required:.1f}x | not measured | - |")
            continue
        ratio = a[metric] / b[metric]
        lines.append(f"| {description} | {required:.1f}x | {ratio:.2f}x | {'yes' if ratio >= required else 'no'} |")
    greedy = results / "latency-greedy.json"
    if greedy.is_file():
        data = json.loads(greedy.read_text())
        for precision in ("fp32", "int8"):
            row = _find(data, "cbart", "compressed-384", precision)
            if row and row.get("floor_ms"):
                ratio = row["per_token_ms"] / row["floor_ms"]
                measured = f"{ratio:.2f}x ({row['per_token_ms']:.1f} vs {row['floor_ms']:.1f} ms)"
                met = "yes" if ratio <= 1.3 else "no"
                lines.append(
                    f"| decode ms/token within 1.3x of the bandwidth floor (compressed-384 {precision}) "
                    f"| <= 1.30x | {measured} | {met} |"
                )
    return "\n".join(lines)


def section(results: Path) -> str:
    parts = ["#### Targets (ratios measured in the same run)\n", targets(results), ""]
    for name in LATENCY_FILES:
        path = results / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        parts.append(
            f"#### `{data['command']}` ({data['date']}, {data['machine']}, {data['threads']} threads, "
            f"matrix-vector bandwidth {data['bandwidth_gb_s']:.1f} GB/s)\n{data['table']}\n"
        )
        plot = path.with_suffix(".png")
        if plot.is_file():
            parts.append(f"![{plot.stem}](benchmarks/results/{plot.name})\n")
    choices = results / "graph-choices.json"
    if choices.is_file():
        parts.append(
            f"#### `python -m benchmarks.graph_choices` (compressed-384)\n{json.loads(choices.read_text())['table']}\n"
        )
    memory = results / "train-memory-cpu.json"
    if memory.is_file():
        data = json.loads(memory.read_text())
        parts.append(f"#### `python -m benchmarks.train_memory`\n{data['table']}\n")
    return "\n".join(parts) if parts else "No benchmark results yet: run `cbart bench`.\n"


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        print(f"README.md lacks the {START} ... {END} markers", file=sys.stderr)
        return 1
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{section(ROOT / 'benchmarks' / 'results')}\n{END}{tail}")
    print("README.md performance section regenerated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
