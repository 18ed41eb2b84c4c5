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


def section(results: Path) -> str:
    parts = []
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
