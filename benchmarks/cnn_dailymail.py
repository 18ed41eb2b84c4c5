"""The paper's CNN/DailyMail protocol: full bart-base vs the compressed models, ROUGE-1/2/L.

For each model the same data, schedule and generation settings (the paper's: 4 beams, length
penalty 2.0, no-repeat-ngram 3, min 55, max 144 tokens):

- ``full``: bart-base fine-tuned end to end (the baseline the paper compares against);
- ``compressed-384`` / ``compressed-504``: the pretrained encoder frozen, stage 1 trains the
  autoencoder on its outputs, stage 2 trains the narrow decoder from the compressed memory.

The table reports ROUGE on the test split, decoder parameters and the ROUGE-1 change against the
full model (the paper: -4.5% at latent 384). The real run needs the hub (``facebook/bart-base``,
``cnn_dailymail`` 3.0.0) and a GPU::

    python -m cbart.benchmarks.cnn_dailymail --device cuda --mixed-precision bf16

``--smoke`` runs the same code end to end in minutes on a CPU, with no download: a tiny random BART
(latent sizes scaled to its width), the real BART tokenizer, and the 250 CNN/DM test pairs in
``../shared/data/cnn_dailymail`` (first 200 to train, up to 16 of the rest to score).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cbart.compression.config import PAPER_GENERATION

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CBART_SHARED_DATA", ROOT.parent / "shared" / "data"))
SMOKE_DATA = SHARED / "cnn_dailymail" / "test_frank250.jsonl"


@dataclass(frozen=True)
class Protocol:
    """Where the data and base model come from, and each stage's schedule."""

    base: str = "facebook/bart-base"
    data: str = "cnn_dailymail"
    subset: str | None = "3.0.0"
    train_split: str = "train"
    test_split: str = "test"
    source_field: str = "article"
    target_field: str = "highlights"
    train_limit: int | None = None
    test_limit: int | None = None
    latents: tuple[int, ...] = (384, 504)
    max_source_length: int = 1024
    max_target_length: int = 144
    batch_size: int = 16
    full_epochs: int = 3
    autoencoder_epochs: int = 1
    decoder_epochs: int = 3
    max_steps: int | None = None
    learning_rate: float = 5e-5
    autoencoder_learning_rate: float = 1e-3
    decoder_learning_rate: float = 5e-4
    eval_batch_size: int = 16


SMOKE = Protocol(
    base="tiny",
    data=str(SMOKE_DATA),
    subset=None,
    source_field="source",
    target_field="target",
    train_limit=200,
    test_limit=16,
    batch_size=4,
    max_steps=12,
    learning_rate=1e-3,
    eval_batch_size=8,
)


def tiny_base(tokenizer: Any) -> Any:
    """A 2-layer, 128-wide random BART with the real vocabulary and 1024 positions (smoke runs only)."""
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        vocab_size=len(tokenizer),
        d_model=128,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=256,
        decoder_ffn_dim=256,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
        forced_eos_token_id=tokenizer.eos_token_id,
    )
    return BartForConditionalGeneration(config).eval()


def latent_sizes(latent: int, width: int) -> tuple[int, ...]:
    """The paper's projection sizes for ``latent``, scaled from bart-base's 768 to ``width``."""
    from cbart.compression.build import PAPER_LATENT_SIZES

    if latent not in PAPER_LATENT_SIZES:
        raise ValueError(f"the paper's latent sizes are {sorted(PAPER_LATENT_SIZES)}, not {latent}")
    return tuple(round(size * width / 768) for size in PAPER_LATENT_SIZES[latent])


def run(protocol: Protocol, work: Path, device: str, mixed_precision: str, progress: bool) -> list[dict[str, Any]]:
    import torch
    from cbart.compression import build_from_base
    from cbart.compression.build import load_base_model
    from cbart.compression.data import load_records, load_tokenizer, tokenize_seq2seq
    from cbart.compression.training import (
        Seq2SeqEvaluation,
        TrainingArguments,
        evaluate_generation,
        train_autoencoder,
        train_decoder,
        train_full_model,
    )

    torch.manual_seed(0)
    smoke = protocol.base == "tiny"
    tokenizer = load_tokenizer(str(SHARED / "tokenizer" / "bart") if smoke else protocol.base)
    train_rows = load_records(protocol.data, protocol.train_split, protocol.subset, protocol.train_limit)
    if smoke:
        test_rows = load_records(protocol.data)[protocol.train_limit :][: protocol.test_limit]
    else:
        test_rows = load_records(protocol.data, protocol.test_split, protocol.subset, protocol.test_limit)

    def tokenize(rows: list[dict[str, Any]]) -> list[Any]:
        fields = (protocol.source_field, protocol.target_field)
        return tokenize_seq2seq(rows, tokenizer, *fields, protocol.max_source_length, protocol.max_target_length)

    train, test = tokenize(train_rows), tokenize(test_rows)
    evaluation = Seq2SeqEvaluation(
        examples=test,
        references=[row[protocol.target_field] for row in test_rows],
        decode=lambda ids: tokenizer.batch_decode(ids, skip_special_tokens=True),
        metric="rouge",
        batch_size=protocol.eval_batch_size,
        generation=dict(PAPER_GENERATION),
    )

    def arguments(name: str, epochs: int, learning_rate: float) -> TrainingArguments:
        return TrainingArguments(
            work / name,
            epochs=epochs,
            max_steps=protocol.max_steps,
            batch_size=protocol.batch_size,
            learning_rate=learning_rate,
            device=device,
            mixed_precision=mixed_precision,
            progress=progress,
        )

    def pretrained() -> Any:
        return tiny_base(tokenizer) if smoke else load_base_model(protocol.base)

    rows = []

    def record(name: str, model: Any, decoder_parameters: int, started: float) -> None:
        scores = evaluate_generation(model, evaluation)
        rows.append({"model": name, **scores, "decoder_parameters": decoder_parameters})
        rows[-1]["minutes"] = round((time.perf_counter() - started) / 60, 2)
        print(f"  {rows[-1]}", flush=True)

    started = time.perf_counter()
    full = pretrained()
    if smoke:
        full.save_pretrained(work / "tiny-base")
    train_full_model(full, train, arguments("full", protocol.full_epochs, protocol.learning_rate), tokenizer)
    record("full", full, sum(p.numel() for p in full.model.decoder.parameters()), started)
    for latent in protocol.latents:
        started = time.perf_counter()
        base = load_base_model(work / "tiny-base") if smoke else pretrained()
        model = build_from_base(
            base, latent_sizes(latent, base.config.d_model), "paper", decoder_attention_heads=4 if smoke else None
        )
        name = f"compressed-{latent}"
        ae_arguments = arguments(f"{name}-ae", protocol.autoencoder_epochs, protocol.autoencoder_learning_rate)
        train_autoencoder(model, train, ae_arguments, tokenizer)
        train_decoder(model, train, arguments(name, protocol.decoder_epochs, protocol.decoder_learning_rate), tokenizer)
        record(name, model, model.decoder_parameter_count(), started)
    reference = rows[0]["rouge1"]
    rows[0]["rouge1_change_percent"] = None
    for row in rows[1:]:
        row["rouge1_change_percent"] = 100 * (row["rouge1"] - reference) / reference if reference else None
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | ROUGE-1 | ROUGE-2 | ROUGE-Lsum | ROUGE-1 vs full | decoder params |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        change = row["rouge1_change_percent"]
        lines.append(
            f"| {row['model']} | {row['rouge1']:.2f} | {row['rouge2']:.2f} | {row['rougeLsum']:.2f} | "
            f"{'-' if change is None else f'{change:+.1f}%'} | {row['decoder_parameters'] / 1e6:.1f}M |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny random model on the 250 shared pairs (CPU)")
    parser.add_argument("--base", default=None, help="base BART: hub name or local directory")
    parser.add_argument("--latents", default=None, help="comma-separated paper latents (default: 384,504)")
    parser.add_argument("--train-limit", type=int, default=None, help="use only the first N training rows")
    parser.add_argument("--test-limit", type=int, default=None, help="score only the first N test rows")
    parser.add_argument("--max-steps", type=int, default=None, help="cap every stage at N optimizer steps")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    parser.add_argument("--work", type=Path, default=None, help="where checkpoints go (default: a temp dir)")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    protocol = SMOKE if args.smoke else Protocol()
    if args.smoke and not SMOKE_DATA.is_file():
        print(f"{SMOKE_DATA} not found (set CBART_SHARED_DATA to the shared data folder)", file=sys.stderr)
        return 2
    overrides = {
        "base": args.base,
        "latents": tuple(int(v) for v in args.latents.split(",")) if args.latents else None,
        "train_limit": args.train_limit,
        "test_limit": args.test_limit,
        "max_steps": args.max_steps,
    }
    protocol = Protocol(**{**asdict(protocol), **{k: v for k, v in overrides.items() if v is not None}})
    with tempfile.TemporaryDirectory() as temporary:
        rows = run(protocol, args.work or Path(temporary), args.device, args.mixed_precision, not args.no_progress)
    text = table(rows)
    print(text)
    stem = "cnn-dailymail-smoke" if args.smoke else "cnn-dailymail"
    args.results.mkdir(parents=True, exist_ok=True)
    payload = {
        "date": datetime.date.today().isoformat(),
        "protocol": asdict(protocol),
        "generation": PAPER_GENERATION,
        "rows": rows,
        "table": text,
    }
    (args.results / f"{stem}.json").write_text(json.dumps(payload, indent=2))
    print(f"results: {args.results / (stem + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
