"""The GPU check: one short run, ready for the moment a CUDA machine is lent (device time is scarce).

    bash benchmarks/gpu_check.sh RESULTS_DIR             # on the GPU machine (sized for under 8 minutes on one H200)
    bash benchmarks/gpu_check.sh RESULTS_DIR --dry-run   # every step on CPU at small sizes (CI runs this)

It measures, full bart-base against compressed-384 (random weights of the real shapes, built here: no
download):
- generation latency: transformers in fp32 and bf16, and cbart's PyTorch backend (the exported TorchScript
  graphs, traced on CUDA) in fp32. Batch 1 (``--batches`` adds more), a 512-token source, exactly 64 new tokens,
  greedy. Encoder + first token is timed apart from the decode per token, as ``cbart bench`` does;
- fine-tuning peak memory of one training step (``torch.cuda.max_memory_allocated``). The full model trains
  every parameter; the compressed one trains its decoder with the encoder frozen (the paper's stage 2).

Each step runs in a fresh process and is written to ``RESULTS_DIR/gpu-check.json`` as soon as it ends, so a
run cut short keeps what it measured. A step that fails is recorded with its error, and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cbart.benchmarks.models import ModelSpec, checkpoint, onnx_export

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"full": ModelSpec(None), "compressed-384": ModelSpec(384)}
GENERATION = [("transformers", "fp32"), ("transformers", "bf16"), ("cbart-torch", "fp32")]
STEP_TIMEOUT_S = 300


@dataclass(frozen=True)
class Sizes:
    batch: int
    source: int
    new_tokens: int
    repeats: int
    train_batch: int
    train_source: int
    train_target: int


GPU_SIZES = Sizes(batch=1, source=512, new_tokens=64, repeats=3, train_batch=8, train_source=512, train_target=128)
DRY_RUN_SIZES = Sizes(batch=1, source=32, new_tokens=4, repeats=1, train_batch=1, train_source=32, train_target=8)


def _run(command: list[str]) -> dict[str, Any]:
    """A step in a fresh process; its last stdout line is a JSON object, or its error is recorded."""
    started = time.perf_counter()
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=STEP_TIMEOUT_S, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {STEP_TIMEOUT_S} s", "seconds": STEP_TIMEOUT_S}
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        return {"error": completed.stderr.strip().splitlines()[-1] if completed.stderr.strip() else "failed"}
    return {**json.loads(completed.stdout.strip().splitlines()[-1]), "seconds": seconds}


def generation_step(
    system: str, model: str, dtype: str, batch: int, device: str, sizes: Sizes, cache: Path
) -> dict[str, Any]:
    spec = MODELS[model]
    if system == "cbart-torch":  # TorchScript records the device it was traced on: trace where it runs
        path = onnx_export(spec, cache, with_torch=True, torch_device=device)
    else:
        path = checkpoint(spec, cache)
    threads = str(os.cpu_count() or 1)
    command = [
        sys.executable, "-m", "cbart.benchmarks.worker", "--system", system, "--path", str(path),
        "--batch", str(batch), "--source", str(sizes.source), "--new-tokens", str(sizes.new_tokens),
        "--repeats", str(sizes.repeats), "--threads", threads, "--device", device,
    ]  # fmt: skip
    if system == "transformers":  # cbart's PyTorch backend runs the exported fp32 graphs
        command += ["--dtype", dtype]
    row: dict[str, Any] = {"kind": "generation", "system": system, "model": model, "dtype": dtype, "batch": batch}
    measured = _run(command)
    if "error" in measured:
        return {**row, **measured}
    first, full = statistics.median(measured["t1"]), statistics.median(measured["tn"])
    return {
        **row,
        "encoder_and_first_token_s": first,
        "total_s": full,
        "decode_ms_per_token": 1000 * (full - first) / max(sizes.new_tokens - 1, 1),
        "gpu_peak_mib": measured.get("gpu_peak_mib"),
    }


def training_step(model: str, device: str, sizes: Sizes) -> dict[str, Any]:
    variant = "full" if MODELS[model].latent is None else str(MODELS[model].latent)
    command = [
        sys.executable, "-m", "cbart.benchmarks.train_memory", "--worker", variant, "--device", device,
        "--batch", str(sizes.train_batch), "--source", str(sizes.train_source), "--target", str(sizes.train_target),
    ]  # fmt: skip
    return {"kind": "training", "model": model, "dtype": "fp32", **_run(command)}


def summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Compressed-384 against full, per measurement: the figures the README may cite from a GPU run."""
    by = {(r["kind"], r.get("system"), r["dtype"], r.get("batch"), r["model"]): r for r in rows if "error" not in r}
    ratios: dict[str, float] = {}
    for batch in sorted({r["batch"] for r in rows if r["kind"] == "generation"}):
        for system, dtype in GENERATION:
            full, small = (
                by.get(("generation", system, dtype, batch, "full")),
                by.get(("generation", system, dtype, batch, "compressed-384")),
            )
            if full and small:
                name = f"{system} {dtype}, batch {batch}"
                ratios[f"{name}: decode speed-up"] = full["decode_ms_per_token"] / small["decode_ms_per_token"]
                ratios[f"{name}: end-to-end speed-up"] = full["total_s"] / small["total_s"]
    full, small = (
        by.get(("training", None, "fp32", None, "full")),
        by.get(("training", None, "fp32", None, "compressed-384")),
    )
    key = "cuda_max_allocated_mib" if full and "cuda_max_allocated_mib" in full else "peak_rss_mib"
    if full and small:
        ratios[f"training step memory, compressed / full ({key})"] = small[key] / full[key]
    return ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="folder for gpu-check.json (created)")
    parser.add_argument("--dry-run", action="store_true", help="every step on CPU at small sizes")
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / ".cache")
    parser.add_argument(
        "--batches", type=int, nargs="+", default=None, help="generation batch sizes (default: the sizes' batch)"
    )
    args = parser.parse_args(argv)
    import torch

    device = "cpu" if args.dry_run else "cuda"
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA GPU is visible; run with --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    sizes = DRY_RUN_SIZES if args.dry_run else GPU_SIZES
    args.results.mkdir(parents=True, exist_ok=True)
    output = args.results / "gpu-check.json"
    report: dict[str, Any] = {
        "command": "bash benchmarks/gpu_check.sh " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "dry_run": args.dry_run,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (dry run)",
        "torch": torch.__version__,
        "sizes": asdict(sizes),
        "rows": [],
    }
    started = time.perf_counter()
    steps = [
        (generation_step, (system, model, dtype, batch, device, sizes, args.cache))
        for batch in args.batches or [sizes.batch]
        for system, dtype in GENERATION
        for model in MODELS
    ]
    steps += [(training_step, (model, device, sizes)) for model in MODELS]
    for step, arguments in steps:
        row = step(*arguments)
        report["rows"].append(row)
        report["summary"] = summary(report["rows"])
        report["minutes"] = round((time.perf_counter() - started) / 60, 2)
        output.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(row), flush=True)
    failed = [row for row in report["rows"] if "error" in row]
    print(f"wrote {output} ({len(report['rows']) - len(failed)} steps measured, {len(failed)} failed)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
