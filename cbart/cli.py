"""The ``cbart`` command line: one subcommand per job, each a thin layer over the library API."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PAPER_GENERATION = {
    "num_beams": 4,
    "length_penalty": 2.0,
    "no_repeat_ngram_size": 3,
    "min_length": 55,
    "max_length": 144,
    "early_stopping": True,
}


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("optimisation")
    group.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
    group.add_argument("--epochs", type=int, default=1)
    group.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    group.add_argument("--batch-size", type=int, default=8)
    group.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    group.add_argument("--lr", type=float, default=5e-4)
    group.add_argument("--weight-decay", type=float, default=0.0)
    group.add_argument("--warmup-steps", type=int, default=0)
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    group.add_argument("--save-every", type=int, default=0, help="write OUT/checkpoints/step-N every N steps")
    group.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (and at the end)")
    group.add_argument("--resume", type=Path, default=None, help="continue from a checkpoint written by this stage")
    group.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data", required=True, help="a local .jsonl/.json/.csv file or a hub dataset name")
    group.add_argument("--subset", default=None, help="hub dataset configuration, e.g. 3.0.0 for cnn_dailymail")
    group.add_argument("--split", default="train")
    group.add_argument("--limit", type=int, default=None, help="use only the first N rows")
    group.add_argument("--source-field", default="source")
    group.add_argument("--max-source-length", type=int, default=1024)
    group.add_argument("--tokenizer", default=None, help="tokenizer directory or name (default: the model's)")


def _training_args(args: argparse.Namespace) -> Any:
    from compression.training import TrainingArguments

    return TrainingArguments(
        output_dir=args.out,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        seed=args.seed,
        mixed_precision=args.mixed_precision,
        device=args.device,
        save_every=args.save_every,
        eval_every=args.eval_every,
        resume_from=args.resume,
        progress=not args.no_progress,
    )


def _load_tokenizer(name_or_path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise SystemExit(
            f"error: no tokenizer found at {name_or_path} ({error}); "
            "pass --tokenizer DIR with vocab.json and merges.txt"
        ) from error


def _model_for_training(args: argparse.Namespace, task: str = "seq2seq") -> Any:
    """A compressed model from a resume directory, a compressed checkpoint, or a base BART + --latent.

    A classifier starts from a seq2seq (or stage-1) checkpoint and gets a fresh classification head;
    only a resumed classification run loads one.
    """
    from compression import build_from_base, load_compressed_model
    from compression.checkpoint import is_compressed_checkpoint
    from compression.training.stages import to_classifier

    if args.resume is not None:
        return load_compressed_model(args.resume, task)
    if is_compressed_checkpoint(args.model):
        model = load_compressed_model(args.model)
    else:
        model = build_from_base(args.model, args.latent, args.variant)
    return to_classifier(model, args.num_labels) if task == "classification" else model


def cmd_demo(args: argparse.Namespace) -> int:
    import tempfile

    from cbart.demo import run_demo

    if args.out is not None:
        return 0 if run_demo(args.out, seed=args.seed, progress=not args.no_progress).passed else 1
    with tempfile.TemporaryDirectory() as directory:
        return 0 if run_demo(Path(directory), seed=args.seed, progress=not args.no_progress).passed else 1


def cmd_compress(args: argparse.Namespace) -> int:
    from compression import build_from_base, save_checkpoint

    model = build_from_base(args.base, args.latent, args.variant, args.max_positions)
    tokenizer = _load_tokenizer(args.tokenizer or args.base)
    save_checkpoint(model, args.out, tokenizer)
    print(
        f"wrote an untrained compressed model (latent {args.latent}, {args.variant} autoencoder) to {args.out}; "
        f"decoder parameters: {model.decoder_parameter_count():,}. Next: cbart train-ae {args.out} --data ..."
    )
    return 0


def cmd_import_original(args: argparse.Namespace) -> int:
    from compression import save_checkpoint
    from compression.importer import import_original_checkpoint

    model = import_original_checkpoint(args.source, args.latent)
    tokenizer = _load_tokenizer(args.tokenizer) if args.tokenizer else None
    save_checkpoint(model, args.out, tokenizer)
    print(f"imported {args.source} (latent sizes {model.config.latent_sizes}) into {args.out}")
    return 0


def cmd_train_ae(args: argparse.Namespace) -> int:
    from compression.data import load_records, tokenize_seq2seq
    from compression.training import train_autoencoder

    model = _model_for_training(args)
    tokenizer = _load_tokenizer(args.tokenizer or str(args.model))
    rows = load_records(args.data, args.split, args.subset, args.limit)
    examples = tokenize_seq2seq(
        rows,
        tokenizer,
        args.source_field,
        args.source_field,
        min(args.max_source_length, model.config.autoencoder_max_positions),
        1,
    )
    result = train_autoencoder(model, examples, _training_args(args), tokenizer)
    print(
        f"stage 1 done: {result.steps} steps, final reconstruction loss {result.losses[-1]:.4f}; "
        f"checkpoint in {args.out}. Next: cbart train {args.out} --data ..."
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from compression.data import load_records, tokenize_classification, tokenize_seq2seq
    from compression.training import Seq2SeqEvaluation, train_classifier, train_decoder

    model = _model_for_training(args, "classification" if args.task == "classification" else "seq2seq")
    tokenizer = _load_tokenizer(args.tokenizer or str(args.model))
    rows = load_records(args.data, args.split, args.subset, args.limit)
    eval_rows = load_records(args.eval_data, args.eval_split, args.subset, args.eval_limit) if args.eval_data else None
    max_source = min(args.max_source_length, model.config.max_position_embeddings)
    if args.task == "classification":
        examples = tokenize_classification(rows, tokenizer, args.source_field, args.label_field, max_source)
        held_out = (
            tokenize_classification(eval_rows, tokenizer, args.source_field, args.label_field, max_source)
            if eval_rows
            else None
        )
        result = train_classifier(
            model, examples, _training_args(args), tokenizer, held_out, args.unfreeze_encoder, args.unfreeze_compressor
        )
    else:
        examples = tokenize_seq2seq(
            rows, tokenizer, args.source_field, args.target_field, max_source, args.max_target_length
        )
        evaluation = None
        if eval_rows:
            generation = {
                **PAPER_GENERATION,
                **{
                    k: v
                    for k, v in {
                        "num_beams": args.num_beams,
                        "min_length": args.min_length,
                        "max_length": args.max_length,
                        "length_penalty": args.length_penalty,
                        "no_repeat_ngram_size": args.no_repeat_ngram_size,
                    }.items()
                    if v is not None
                },
            }
            evaluation = Seq2SeqEvaluation(
                examples=tokenize_seq2seq(
                    eval_rows, tokenizer, args.source_field, args.target_field, max_source, args.max_target_length
                ),
                references=[row[args.target_field] for row in eval_rows],
                decode=lambda ids: tokenizer.batch_decode(ids, skip_special_tokens=True),
                metric=args.metric or ("bleu" if args.task == "translation" else "rouge"),
                batch_size=args.batch_size,
                generation=generation,
            )
        result = train_decoder(
            model,
            examples,
            _training_args(args),
            tokenizer,
            evaluation,
            args.unfreeze_encoder,
            args.unfreeze_compressor,
        )
    summary = f", final evaluation {result.evaluations[-1]}" if result.evaluations else ""
    print(f"stage 2 done: {result.steps} steps, final loss {result.losses[-1]:.4f}{summary}; checkpoint in {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cbart", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train, compress and check a small model on a built-in task")
    demo.add_argument("--out", type=Path, default=None, help="keep the checkpoints here (default: a temp dir)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(run=cmd_demo)

    compress = commands.add_parser("compress", help="build an (untrained) compressed model from a base BART")
    compress.add_argument("base", help="base BART: hub name or local directory")
    compress.add_argument("--out", type=Path, required=True)
    _add_latent_arguments(compress)
    compress.add_argument("--max-positions", type=int, default=None, help="paper AE BatchNorm size (default: 1024)")
    compress.add_argument("--tokenizer", default=None)
    compress.set_defaults(run=cmd_compress)

    importer = commands.add_parser("import-original", help="convert the original release (ae-checkpoint.pth etc.)")
    importer.add_argument("source", type=Path)
    importer.add_argument("--out", type=Path, required=True)
    importer.add_argument(
        "--latent",
        type=int,
        nargs="+",
        default=None,
        help="the three projection sizes (--first --second --third of the original)",
    )
    importer.add_argument("--tokenizer", default=None, help="tokenizer to store with the model (e.g. bart-base's)")
    importer.set_defaults(run=cmd_import_original)

    train_ae = commands.add_parser("train-ae", help="stage 1: train the autoencoder on frozen encoder outputs")
    train_ae.add_argument("model", help="a compressed checkpoint, or a base BART together with --latent")
    _add_latent_arguments(train_ae)
    _add_data_arguments(train_ae)
    _add_training_arguments(train_ae)
    train_ae.set_defaults(run=cmd_train_ae)

    train = commands.add_parser("train", help="stage 2: train the narrow decoder (or a classifier) on a task")
    train.add_argument("model", help="a compressed checkpoint (normally the output of train-ae)")
    _add_latent_arguments(train)
    _add_data_arguments(train)
    _add_training_arguments(train)
    task = train.add_argument_group("task")
    task.add_argument("--task", choices=("summarization", "translation", "classification"), default="summarization")
    task.add_argument("--target-field", default="target")
    task.add_argument("--label-field", default="label")
    task.add_argument("--num-labels", type=int, default=2)
    task.add_argument("--max-target-length", type=int, default=144)
    task.add_argument("--eval-data", default=None, help="held-out data evaluated during and after training")
    task.add_argument("--eval-split", default="validation")
    task.add_argument("--eval-limit", type=int, default=None)
    task.add_argument("--metric", choices=("rouge", "bleu", "exact_match"), default=None)
    task.add_argument("--unfreeze-encoder", action="store_true", help="also train the BART encoder")
    task.add_argument("--unfreeze-compressor", action="store_true", help="also train the autoencoder's encoder half")
    generation = train.add_argument_group(
        "generation during evaluation (paper defaults: 4 beams, lp 2.0, no-repeat 3, min 55, max 144)"
    )
    generation.add_argument("--num-beams", type=int, default=None)
    generation.add_argument("--length-penalty", type=float, default=None)
    generation.add_argument("--no-repeat-ngram-size", type=int, default=None)
    generation.add_argument("--min-length", type=int, default=None)
    generation.add_argument("--max-length", type=int, default=None)
    train.set_defaults(run=cmd_train)
    return parser


def _add_latent_arguments(parser: argparse.ArgumentParser) -> None:
    if any(action.dest == "latent" for action in parser._actions):
        return
    parser.add_argument(
        "--latent",
        type=int,
        nargs="+",
        default=[576, 480, 384],
        help="autoencoder projection sizes, decreasing (default: 576 480 384, the paper's 384 model)",
    )
    parser.add_argument(
        "--variant",
        choices=("paper", "token"),
        default="paper",
        help="autoencoder normalisation: paper (BatchNorm over positions) or token (LayerNorm)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from compression.checkpoint import CheckpointError

    try:
        return int(args.run(args))
    except (CheckpointError, FileNotFoundError, KeyError, ValueError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
