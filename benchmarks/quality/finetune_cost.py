"""Fine-tuning cost on real batches: full fine-tuning of the base vs the paper's stage 2.

Each measurement runs in a fresh process (``python -m cbart.benchmarks.quality.finetune_cost``) so its
peak RSS (VmHWM) is its own. Full fine-tuning trains every weight of the base; stage 2 trains the
narrow decoder with the encoder and compressor frozen, which is where the paper's memory saving
comes from (no gradients or optimizer state for the encoder, no activations kept for it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

STEPS = 6
MAX_TOKENS = 5000


def measure(checkpoint: Path, mode: str, threads: int) -> dict[str, Any]:
    import torch
    from cbart.benchmarks.quality.data import load_multi30k, read_vocabulary
    from cbart.benchmarks.worker import peak_rss_mib
    from cbart.compression.data import Collator
    from cbart.compression.training import TrainingArguments
    from cbart.compression.training.loop import epoch_batches
    from cbart.compression.training.stages import label_loss, target_logits
    from cbart.exporter.export import load_model

    torch.set_num_threads(threads)
    data = load_multi30k(train_rows=4000, eval_rows=1, vocabulary=read_vocabulary(checkpoint.parent))
    args = TrainingArguments(Path("unused"), max_tokens=MAX_TOKENS)
    collate = Collator(1)
    batches = [collate([data.train[i] for i in rows]) for rows in epoch_batches(data.train, args, 0)[: STEPS + 1]]
    model = load_model(checkpoint).train()
    if mode == "stage2":
        model.model.encoder.requires_grad_(False).eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    before = peak_rss_mib()
    times = []
    for batch in batches:
        started = time.perf_counter()
        label_loss(target_logits(model, batch), batch["labels"], 0.1).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return {
        "mode": mode,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "step_seconds": sorted(times[1:])[len(times[1:]) // 2],
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "training_rss_mib": round(peak_rss_mib() - before, 1),
    }


def measure_in_subprocess(checkpoint: Path, mode: str, threads: int) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "cbart.benchmarks.quality.finetune_cost",
        str(checkpoint),
        mode,
        "--threads",
        str(threads),
    ]
    # Without the benchmark's tcmalloc: it keeps freed pages, so the peak RSS would count its cache, not the
    # memory the step needs.
    environment = {name: value for name, value in os.environ.items() if name != "LD_PRELOAD"}
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=environment).stdout
    return json.loads(output.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("mode", choices=("full", "stage2"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.checkpoint, args.mode, args.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
