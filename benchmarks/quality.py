"""Quality in miniature on real data: BLEU vs decode latency on Multi30k En->De (the paper's trade-off).

Train a small BART from scratch on ``../shared/data/multi30k`` with the real BART tokenizer, then apply
the paper's method at several latent sizes (freeze its encoder, train the autoencoder, train the narrow
decoder), and report test BLEU (sacrebleu, greedy) against decode ms/token through the ONNX Runtime
runtime. ``--quick`` is a smoke run (minutes); the default budget targets about an hour on 2 cores.

    python -m benchmarks.quality [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CBART_SHARED_DATA", ROOT.parent / "shared" / "data"))


@dataclass(frozen=True)
class Budget:
    train_rows: int
    test_rows: int
    base_steps: int
    autoencoder_steps: int
    decoder_steps: int
    latents: tuple[tuple[int, ...], ...]


QUICK = Budget(512, 32, 40, 20, 40, ((192, 128),))
FULL = Budget(29000, 1000, 6000, 1500, 4000, ((224, 192), (192, 128), (128, 64)))


def run(budget: Budget, out: Path, threads: int = 2) -> list[dict]:
    import torch
    from transformers import BartConfig, BartForConditionalGeneration, BartTokenizer

    from compression import build_from_base, save_checkpoint
    from compression.data import Collator, load_records, tokenize_seq2seq
    from compression.metrics import bleu
    from compression.training import TrainingArguments, train_autoencoder, train_decoder
    from compression.training.loop import fit
    from exporter.export import ExportOptions, export_onnx
    from runtime.generator import Seq2SeqRuntime

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    tokenizer = BartTokenizer.from_pretrained(str(SHARED / "tokenizer" / "bart"))
    train_rows = load_records(SHARED / "multi30k" / "train.jsonl", limit=budget.train_rows)
    test_rows = load_records(SHARED / "multi30k" / "test_2016_flickr.jsonl", limit=budget.test_rows)
    train = tokenize_seq2seq(train_rows, tokenizer, "source", "target", 64, 64)
    config = BartConfig(
        vocab_size=len(tokenizer),
        d_model=256,
        encoder_layers=3,
        decoder_layers=3,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=1024,
        decoder_ffn_dim=1024,
        max_position_embeddings=64,
        dropout=0.1,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=2,
    )
    base = BartForConditionalGeneration(config)
    base.train()
    args = TrainingArguments(
        out / "base",
        max_steps=budget.base_steps,
        batch_size=32,
        learning_rate=1e-3,
        warmup_steps=min(200, budget.base_steps // 10),
    )
    fit(
        list(base.parameters()),
        lambda batch: base(**batch).loss,
        train,
        Collator(config.pad_token_id),
        args,
        lambda path, state: save_checkpoint(base, path, tokenizer, state),
        {"stage": "base"},
        description="base",
    )
    base.eval()
    models = {"full (256)": out / "base"}
    for sizes in budget.latents:
        model = build_from_base(base, sizes, "token")
        name = f"compressed-{sizes[-1]}"
        train_autoencoder(
            model,
            train,
            TrainingArguments(
                out / f"{name}-ae", max_steps=budget.autoencoder_steps, batch_size=32, learning_rate=1e-3
            ),
            tokenizer,
        )
        train_decoder(
            model,
            train,
            TrainingArguments(out / name, max_steps=budget.decoder_steps, batch_size=32, learning_rate=1e-3),
            tokenizer,
        )
        models[name] = out / name
    rows = []
    sources = [row["source"] for row in test_rows]
    references = [row["target"] for row in test_rows]
    for name, checkpoint in models.items():
        export = out / f"{name.split()[0]}-onnx"
        export_onnx(
            checkpoint, export, ExportOptions(verify=False, progress=False, overwrite=True), log=lambda *_: None
        )
        runtime = Seq2SeqRuntime.from_dir(export, threads=threads, check_files=False)
        hypotheses = []
        for start in range(0, len(sources), 32):
            hypotheses += runtime.generate(sources[start : start + 32], num_beams=1, max_new_tokens=48).texts or []
        probe = sources[:1]
        runtime.generate(probe, max_new_tokens=2, min_new_tokens=2)
        timings = {}
        for count in (1, 32):
            started = time.perf_counter()
            for _ in range(3):
                runtime.generate(probe, max_new_tokens=count, min_new_tokens=count)
            timings[count] = (time.perf_counter() - started) / 3
        rows.append(
            {
                "model": name,
                **bleu(hypotheses, references),
                "decode_ms_per_token": 1000 * (timings[32] - timings[1]) / 31,
            }
        )
        print(f"  {rows[-1]}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: a few steps on a few hundred rows")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--work", type=Path, default=None, help="where checkpoints go (default: a temp dir)")
    args = parser.parse_args(argv)
    if not (SHARED / "multi30k" / "train.jsonl").is_file():
        print(f"Multi30k not found under {SHARED} (set CBART_SHARED_DATA)", file=sys.stderr)
        return 2
    budget = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory() as temporary:
        rows = run(budget, args.work or Path(temporary))
    table = "\n".join(
        ["| model | test BLEU (greedy) | decode ms/token (ONNX Runtime) |", "|---|---|---|"]
        + [f"| {r['model']} | {r['bleu']:.2f} | {r['decode_ms_per_token']:.2f} |" for r in rows]
    )
    print(table)
    args.results.mkdir(parents=True, exist_ok=True)
    name = "quality-quick.json" if args.quick else "quality.json"
    (args.results / name).write_text(json.dumps({"budget": budget.__dict__, "rows": rows, "table": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
