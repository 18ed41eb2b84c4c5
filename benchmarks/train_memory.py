"""Peak memory of one fine-tuning step: full bart-base vs compressed variants (the paper's memory claim).

Each configuration runs in a fresh process: CPU peak RSS here (VmHWM), and
``torch.cuda.max_memory_allocated`` with ``--device cuda``. The full model trains every parameter
(ordinary fine-tuning); compressed models train the narrow decoder with encoder and compressor frozen
(the paper's stage 2).

    python -m cbart.benchmarks.train_memory [--batch 4 --source 512 --target 64 --device cpu]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from cbart.benchmarks.plotting import pyplot

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["full", "504", "384", "256", "128"]


def measure(variant: str, batch: int, source: int, target: int, device: str) -> dict[str, float]:
    import torch
    from cbart.benchmarks.models import HEADS, LATENTS
    from cbart.benchmarks.worker import peak_rss_mib
    from cbart.compression import build_from_base
    from cbart.compression.build import bart_base_config
    from transformers import BartForConditionalGeneration

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = BartForConditionalGeneration(bart_base_config())
    if variant != "full":
        model = build_from_base(model, LATENTS[int(variant)], "paper", decoder_attention_heads=HEADS.get(int(variant)))
        model.model.encoder.requires_grad_(False)
    model.to(device).train()
    if variant != "full":
        model.model.encoder.eval()  # frozen: no dropout, BatchNorm uses its running statistics
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.randint(4, 50000, (batch, source), device=device)
    labels = torch.randint(4, 50000, (batch, target), device=device)
    before = peak_rss_mib()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):  # the second step has the optimizer state allocated
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    result = {
        "variant": variant,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "peak_rss_mib": peak_rss_mib(),
        "rss_before_training_mib": before,
    }
    if device.startswith("cuda"):
        result["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--source", type=int, default=512)
    parser.add_argument("--target", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.worker, args.batch, args.source, args.target, args.device)))
        return 0
    rows = []
    for variant in args.variants.split(","):
        command = [
            sys.executable,
            "-m",
            "cbart.benchmarks.train_memory",
            "--worker",
            variant,
            "--batch",
            str(args.batch),
            "--source",
            str(args.source),
            "--target",
            str(args.target),
            "--device",
            args.device,
        ]
        completed = subprocess.run(
            command,
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
            env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
        )
        rows.append(json.loads(completed.stdout.strip().splitlines()[-1]))
        print(f"  {variant}: {rows[-1]}", flush=True)
    full = rows[0] if rows and rows[0]["variant"] == "full" else None
    key = "cuda_max_allocated_mib" if args.device.startswith("cuda") else "peak_rss_mib"
    lines = [
        f"\nOne training step, batch {args.batch}, source {args.source}, target {args.target}, {args.device}\n",
        f"| model | trainable params | peak memory MiB ({key}) | vs full |",
        "|---|---|---|---|",
    ]
    for row in rows:
        ratio = f"{row[key] / full[key]:.2f}" if full else "-"
        name = "full bart-base" if row["variant"] == "full" else f"compressed-{row['variant']}"
        lines.append(f"| {name} | {row['trainable_parameters'] / 1e6:.1f}M | {row[key]:.0f} | {ratio} |")
    table = "\n".join(lines)
    print(table)
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / f"train-memory-{args.device.split(':')[0]}"
    stem.with_suffix(".json").write_text(
        json.dumps({"settings": vars(args) | {"results": str(args.results)}, "rows": rows, "table": table}, indent=2)
    )
    plot(rows, key, stem.with_suffix(".png"), f"one training step, batch {args.batch}, source {args.source}")
    return 0


def plot(rows: list[dict], key: str, path: Path, title: str) -> None:
    """Peak memory per model as bars, each labelled with its share of the full model's."""
    plt = pyplot()
    if plt is None:
        return
    names = ["full (768)" if row["variant"] == "full" else str(row["variant"]) for row in rows]
    values = [row[key] for row in rows]
    figure, axis = plt.subplots(figsize=(7, 4))
    bars = axis.bar(names, values)
    for bar, value in zip(bars, values, strict=True):
        axis.annotate(f"{value / values[0]:.2f}x", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom")
    axis.set_xlabel("decoder width (compressed latent size)")
    axis.set_ylabel(f"peak memory MiB ({key})")
    axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
