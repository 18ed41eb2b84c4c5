"""The quality benchmark's table and plots: score vs decode latency, and the learning curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cbart.benchmarks.plotting import pyplot


def translation_table(rows: list[dict[str, Any]]) -> str:
    header = (
        "| model | decoder params | test BLEU beam 4 [95% CI] | Δ vs base [paired 95% CI] | test BLEU greedy "
        "| decode ms/token fp32 | int8 | training step s (base: full; others: stage 2) "
        "| RAM a training step adds, MiB |"
    )
    lines = [header, "|" + "---|" * 9]
    for row in rows:
        delta = row.get("beam_delta")
        lines.append(
            f"| {row['model']} | {row['decoder_parameters'] / 1e6:.2f}M | {_interval(row['beam'])} | "
            f"{_interval(delta) if delta else '—'} | {row['greedy']['value']:.2f} | "
            f"{row['ms_fp32']['median']:.2f} | {row['ms_int8']['median']:.2f} | "
            f"{row['finetune']['step_seconds']:.2f} | {row['finetune']['training_rss_mib']:.0f} |"
        )
    return "\n".join(lines)


def classification_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | test accuracy % [95% CI] | Δ vs base [paired 95% CI] |", "|---|---|---|"]
    for row in rows:
        delta = row.get("delta")
        lines.append(f"| {row['model']} | {_interval(row['accuracy'])} | {_interval(delta) if delta else '—'} |")
    return "\n".join(lines)


def _interval(value: dict[str, float]) -> str:
    return f"{value['value']:.2f} [{value['low']:.2f}, {value['high']:.2f}]"


MARKERS = {"base": "o", "plain": "o", "distilled": "s", "seqkd": "^"}
COLORS = {"base": "black", "plain": "tab:blue", "distilled": "tab:orange", "seqkd": "tab:green"}


def _kind(model: str) -> str:
    """base, the paper's stage 2 (plain), token-level KD (distilled) or sequence-level KD (seqkd)."""
    if model == "base":
        return "base"
    return "distilled" if model.endswith("-distilled") else "seqkd" if model.endswith("-seqkd") else "plain"


def plot_tradeoff(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Test BLEU (beam 4, with its 95% CI) against fp32 decode ms/token; distilled models marked."""
    plt = pyplot()
    if plt is None:
        return None
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    for row in rows:
        kind = _kind(row["model"])
        x, beam = row["ms_fp32"]["median"], row["beam"]
        axis.errorbar(
            x,
            beam["value"],
            yerr=[[beam["value"] - beam["low"]], [beam["high"] - beam["value"]]],
            fmt=MARKERS[kind],
            color=COLORS[kind],
            capsize=3,
        )
        axis.annotate(row["model"], (x, beam["value"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    axis.set_xlabel("decode ms/token (ONNX Runtime fp32, batch 1, greedy)")
    axis.set_ylabel("test BLEU, beam 4 (95% CI)")
    axis.set_title(
        "Multi30k En→De test 2016: quality vs decode latency\n(squares: token-level KD, triangles: sequence-level KD)"
    )
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_curves(records: dict[str, Any], path: Path) -> Path | None:
    """Validation BLEU (greedy) per epoch for every trained translation model."""
    plt = pyplot()
    if plt is None:
        return None
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    for name, record in records.items():
        points = [(e["epoch"], e["validation_bleu"]) for e in record["evaluations"] if "validation_bleu" in e]
        if points:
            axis.plot(*zip(*points, strict=True), marker="o", label=name)
    axis.set_xlabel("epoch")
    axis.set_ylabel("validation BLEU (greedy)")
    axis.set_title("Multi30k En→De: learning curves")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
