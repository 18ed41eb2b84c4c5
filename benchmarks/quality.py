"""Quality in miniature on real data: BLEU vs decode latency on Multi30k En->De (the paper's trade-off).

Train a small BART from scratch on ``../shared/data/multi30k`` with the real BART tokenizer, then apply
the paper's method at several latent sizes (freeze its encoder, train the autoencoder, train the narrow
decoder), and report test BLEU (sacrebleu, greedy, through the ONNX Runtime runtime) against decode
ms/token. The embedding and LM head keep only the ~13.6k BPE ids that occur in Multi30k (a trimmed
vocabulary, as small-scale MT setups do), which makes a training step ~2.7x cheaper than with all 50k.

``--quick`` is a smoke run (minutes); the default budget runs in about an hour on 2 cores. With ``--work``
the trained checkpoints are kept and reused, so ``--work DIR`` again re-measures without retraining.

    python -m benchmarks.quality [--quick] [--work DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from benchmarks.plotting import pyplot

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CBART_SHARED_DATA", ROOT.parent / "shared" / "data"))
TRAIN_FILE = "train.jsonl"
TEST_FILE = "test_2016_flickr.jsonl"


@dataclass(frozen=True)
class Budget:
    train_rows: int
    test_rows: int
    base_steps: int
    autoencoder_steps: int
    decoder_steps: int
    latents: tuple[tuple[int, ...], ...]


STEP_FIELDS = ("base_steps", "autoencoder_steps", "decoder_steps")
QUICK = Budget(512, 32, 40, 20, 40, ((192, 128),))
FULL = Budget(29000, 1000, 1000, 150, 700, ((192, 128), (128, 64)))


@dataclass(frozen=True)
class TrimmedVocabulary:
    """Maps the tokenizer's ids to a dense range over the ids the data uses (specials keep their ids)."""

    kept: tuple[int, ...]

    @classmethod
    def from_examples(cls, examples: Sequence[Any], specials: Sequence[int]) -> TrimmedVocabulary:
        used = set(specials)
        for example in examples:
            used.update(example.input_ids)
            used.update(example.labels)
        kept = tuple(sorted(used))
        if kept[: len(specials)] != tuple(sorted(specials)):
            raise ValueError(f"special ids {sorted(specials)} must be the smallest ids to keep their positions")
        return cls(kept)

    @cached_property
    def _index(self) -> dict[int, int]:
        return {original: position for position, original in enumerate(self.kept)}

    def compact(self, ids: Sequence[int]) -> list[int]:
        return [self._index[i] for i in ids]

    def original(self, ids: Sequence[int]) -> list[int]:
        return [self.kept[i] for i in ids]


def _train_or_reuse(directory: Path, train: Callable[[], None]) -> None:
    if (directory / "config.json").is_file():
        print(f"reusing {directory}", flush=True)
        return
    train()


def train_models(budget: Budget, out: Path, threads: int) -> tuple[dict[str, Path], Any, TrimmedVocabulary, list]:
    """Trains (or reuses) the full model and one compressed model per latent size; returns their dirs."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration, BartTokenizer

    from compression import build_from_base
    from compression.data import Example, load_records, tokenize_seq2seq
    from compression.training import TrainingArguments, train_autoencoder, train_decoder, train_full_model

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    tokenizer = BartTokenizer.from_pretrained(str(SHARED / "tokenizer" / "bart"))
    train_rows = load_records(SHARED / "multi30k" / TRAIN_FILE, limit=budget.train_rows)
    test_rows = load_records(SHARED / "multi30k" / TEST_FILE, limit=budget.test_rows)
    train = tokenize_seq2seq(train_rows, tokenizer, "source", "target", 64, 64)
    test = tokenize_seq2seq(test_rows, tokenizer, "source", "target", 64, 64)
    specials = [tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id]
    vocabulary = TrimmedVocabulary.from_examples(train + test, specials)
    train = [Example(vocabulary.compact(e.input_ids), vocabulary.compact(e.labels)) for e in train]
    sources = [vocabulary.compact(e.input_ids) for e in test]
    references = [row["target"] for row in test_rows]
    config = BartConfig(
        vocab_size=len(vocabulary.kept),
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

    def arguments(directory: Path, steps: int) -> TrainingArguments:
        return TrainingArguments(
            directory, max_steps=steps, batch_size=32, learning_rate=1e-3, warmup_steps=min(200, steps // 10)
        )

    def train_base() -> None:
        train_full_model(BartForConditionalGeneration(config), train, arguments(out / "base", budget.base_steps))

    _train_or_reuse(out / "base", train_base)
    models = {"full (256)": out / "base"}
    for sizes in budget.latents:
        name = f"compressed-{sizes[-1]}"

        def train_compressed(sizes: tuple[int, ...] = sizes, name: str = name) -> None:
            base = BartForConditionalGeneration.from_pretrained(out / "base").eval()
            model = build_from_base(base, sizes, "token")
            train_autoencoder(model, train, arguments(out / f"{name}-ae", budget.autoencoder_steps))
            train_decoder(model, train, arguments(out / name, budget.decoder_steps))

        _train_or_reuse(out / name, train_compressed)
        models[name] = out / name
    return models, tokenizer, vocabulary, [sources, references]


def evaluate(
    models: dict[str, Path], tokenizer: Any, vocabulary: TrimmedVocabulary, test: list, out: Path, threads: int
) -> list[dict]:
    """Exports each model, scores test BLEU through ONNX Runtime, then times decode per token.

    Timing runs after all BLEU decoding, one model at a time, so it sees a quiet machine.
    """
    from compression.metrics import bleu
    from exporter.export import ExportOptions, export_onnx
    from runtime.generator import Seq2SeqRuntime

    sources, references = test
    runtimes = {}
    rows = []
    for name, checkpoint in models.items():
        export = out / f"{name.split()[0]}-onnx"
        export_onnx(
            checkpoint, export, ExportOptions(verify=False, progress=False, overwrite=True), log=lambda *_: None
        )
        runtime = Seq2SeqRuntime.from_dir(export, threads=threads, check_files=False)
        hypotheses: list[str] = []
        for start in range(0, len(sources), 32):
            output = runtime.generate(sources[start : start + 32], num_beams=1, max_new_tokens=48)
            hypotheses += tokenizer.batch_decode(
                [vocabulary.original(ids) for ids in output.sequences], skip_special_tokens=True
            )
        runtimes[name] = runtime
        rows.append({"model": name, **bleu(hypotheses, references), "example": hypotheses[0]})
        print(f"  {rows[-1]}", flush=True)
    probe = sources[:1]
    for row in rows:
        runtime = runtimes[row["model"]]
        runtime.generate(probe, max_new_tokens=2, min_new_tokens=2)
        timings = {}
        for count in (1, 32):
            started = time.perf_counter()
            for _ in range(5):
                runtime.generate(probe, max_new_tokens=count, min_new_tokens=count)
            timings[count] = (time.perf_counter() - started) / 5
        row["decode_ms_per_token"] = 1000 * (timings[32] - timings[1]) / 31
    return rows


def plot(rows: list[dict], path: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    figure, axis = plt.subplots(figsize=(6, 4.5))
    axis.plot([r["decode_ms_per_token"] for r in rows], [r["bleu"] for r in rows], marker="o")
    for row in rows:
        point = (row["decode_ms_per_token"], row["bleu"])
        axis.annotate(row["model"], point, textcoords="offset points", xytext=(5, 5))
    axis.set_xlabel("decode ms / token (ONNX Runtime, batch 1)")
    axis.set_ylabel("test BLEU (greedy)")
    axis.set_title("Multi30k En->De: quality vs latency")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: a few steps on a few hundred rows")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--work", type=Path, default=None, help="where checkpoints go and are reused from")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiply every stage's steps (the default budget is ~1 epoch)"
    )
    args = parser.parse_args(argv)
    if not (SHARED / "multi30k" / TRAIN_FILE).is_file():
        print(f"Multi30k not found under {SHARED} (set CBART_SHARED_DATA)", file=sys.stderr)
        return 2
    budget = QUICK if args.quick else FULL
    if args.scale <= 0:
        parser.error("--scale must be positive")
    if args.scale != 1.0:
        steps = {name: max(1, round(getattr(budget, name) * args.scale)) for name in STEP_FIELDS}
        budget = replace(budget, **steps)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as temporary:
        work = args.work or Path(temporary)
        models, tokenizer, vocabulary, test = train_models(budget, work, args.threads)
        rows = evaluate(models, tokenizer, vocabulary, test, work, args.threads)
    table = "\n".join(
        ["| model | test BLEU (greedy) | decode ms/token (ONNX Runtime) |", "|---|---|---|"]
        + [f"| {r['model']} | {r['bleu']:.2f} | {r['decode_ms_per_token']:.2f} |" for r in rows]
    )
    print(table)
    args.results.mkdir(parents=True, exist_ok=True)
    stem = "quality-quick" if args.quick else "quality"
    payload = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python -m benchmarks.quality", *(argv if argv is not None else sys.argv[1:])]),
        "minutes": round((time.perf_counter() - started) / 60, 1),
        "budget": asdict(budget),
        "vocabulary": len(vocabulary.kept),
        "rows": rows,
        "table": table,
    }
    (args.results / f"{stem}.json").write_text(json.dumps(payload, indent=2))
    figure = plot(rows, args.results / f"{stem}.png")
    print(f"results: {args.results / (stem + '.json')}" + (f", plot: {figure}" if figure else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
