"""The ``cbart`` command line: one subcommand per job, each a thin layer over the library API.

Each subcommand imports only what it needs, inside its function: ``cbart generate`` runs on the ONNX
Runtime backend without importing torch (its start-up is then the runtime's, not torch's ~3 s).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("optimisation")
    group.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
    group.add_argument("--epochs", type=int, default=1)
    group.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    group.add_argument("--batch-size", type=int, default=8)
    group.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="length-bucketed batches of at most N padded tokens instead of --batch-size sentences",
    )
    group.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    group.add_argument("--lr", type=float, default=5e-4)
    group.add_argument("--weight-decay", type=float, default=0.0)
    group.add_argument("--warmup-steps", type=int, default=0)
    group.add_argument(
        "--lr-schedule",
        choices=("linear", "inverse_sqrt"),
        default="linear",
        help="linear: warm-up then linear decay to 0 at the last step; inverse_sqrt: warm-up then 1/sqrt(step)",
    )
    group.add_argument("--label-smoothing", type=float, default=0.0, help="e.g. 0.1 for translation")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    group.add_argument("--save-every", type=int, default=0, help="write OUT/checkpoints/step-N every N steps")
    group.add_argument("--save-each-epoch", action="store_true", help="write OUT/checkpoints/epoch-N after each epoch")
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
    from cbart.compression.training import TrainingArguments

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
        save_each_epoch=args.save_each_epoch,
        eval_every=args.eval_every,
        max_tokens=args.max_tokens,
        lr_schedule=args.lr_schedule,
        label_smoothing=args.label_smoothing,
        resume_from=args.resume,
        progress=not args.no_progress,
    )


def _load_tokenizer(name_or_path: str) -> Any:
    from cbart.compression.data import load_tokenizer

    try:
        return load_tokenizer(name_or_path)
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
    from cbart.compression import build_from_base, load_compressed_model
    from cbart.compression.checkpoint import is_compressed_checkpoint
    from cbart.compression.training.stages import to_classifier

    if args.resume is not None:
        return load_compressed_model(args.resume, task)
    if is_compressed_checkpoint(args.model):
        model = load_compressed_model(args.model)
    else:
        model = build_from_base(args.model, args.latent, args.variant, decoder_attention_heads=args.decoder_heads)
    return to_classifier(model, args.num_labels) if task == "classification" else model


def cmd_demo(args: argparse.Namespace) -> int:
    import tempfile

    from cbart.demo import run_demo

    if args.out is not None:
        return 0 if run_demo(args.out, seed=args.seed, progress=not args.no_progress).passed else 1
    with tempfile.TemporaryDirectory() as directory:
        passed = run_demo(Path(directory), seed=args.seed, progress=not args.no_progress).passed
    print("(the checkpoints were in a temporary directory, now removed: pass --out DIR to keep them)")
    return 0 if passed else 1


def cmd_compress(args: argparse.Namespace) -> int:
    from cbart.compression import build_from_base, save_checkpoint

    model = build_from_base(args.base, args.latent, args.variant, args.max_positions, args.decoder_heads)
    tokenizer = _load_tokenizer(args.tokenizer or args.base)
    save_checkpoint(model, args.out, tokenizer)
    print(
        f"wrote an untrained compressed model (latent {args.latent}, {args.variant} autoencoder) to {args.out}; "
        f"decoder parameters: {model.decoder_parameter_count():,}. Next: cbart train-ae {args.out} --data ..."
    )
    return 0


def cmd_import_original(args: argparse.Namespace) -> int:
    from cbart.compression import save_checkpoint
    from cbart.compression.importer import import_original_checkpoint

    model = import_original_checkpoint(args.source, args.latent, args.trust_pickle)
    tokenizer = _load_tokenizer(args.tokenizer) if args.tokenizer else None
    save_checkpoint(model, args.out, tokenizer)
    print(f"imported {args.source} (latent sizes {model.config.latent_sizes}) into {args.out}")
    return 0


def cmd_train_ae(args: argparse.Namespace) -> int:
    from cbart.compression.data import load_records, tokenize_seq2seq
    from cbart.compression.training import train_autoencoder

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
    from cbart.compression.config import PAPER_GENERATION
    from cbart.compression.data import load_records, tokenize_classification, tokenize_seq2seq
    from cbart.compression.training import Seq2SeqEvaluation, train_classifier, train_decoder

    if args.task == "classification" and args.distill_from:
        raise SystemExit("error: --distill-from distils a seq2seq decoder; drop it for --task classification")
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
            _distillation(args),
        )
    summary = f", final evaluation {result.evaluations[-1]}" if result.evaluations else ""
    print(f"stage 2 done: {result.steps} steps, final loss {result.losses[-1]:.4f}{summary}; checkpoint in {args.out}")
    return 0


def _distillation(args: argparse.Namespace) -> Any:
    """``--distill-from``'s teacher, loaded as a plain BART (the base the student was compressed from)."""
    if args.distill_from is None:
        return None
    from cbart.compression.build import load_base_model
    from cbart.compression.training import Distillation

    try:
        return Distillation(load_base_model(args.distill_from), args.distill_alpha, args.distill_temperature)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: --distill-from {args.distill_from}: {error}") from error


def cmd_export(args: argparse.Namespace) -> int:
    from cbart.exporter.export import ExportOptions, export_onnx, export_tensorrt
    from cbart.exporter.options import check_combination

    options = ExportOptions(
        opset=args.opset,
        fuse_encoder=args.fuse_encoder,
        attention=args.attention,
        lm_head_screen=args.lm_head_screen,
        optimize=args.optimize,
        dtype=args.dtype,
        quantize=args.quantize,
        verify=not args.no_verify,
        tokenizer=args.tokenizer,
        overwrite=args.overwrite,
        threads=args.threads,
        timing_cache=args.timing_cache,
        progress=not args.no_progress,
        with_torch=args.with_torch,
        torch_device=args.torch_device,
        inflight=args.inflight,
    )
    draft = args.draft is not None
    check_combination(options, args.to, draft, args.draft_quantize, engine_precision=args.fp16 or args.bf16)
    if args.to == "trt":
        from cbart.exporter.engine_profiles import EngineLimits

        limits = EngineLimits(
            max_batch=args.max_batch,
            opt_batch=args.opt_batch,
            max_source_length=args.max_source_length,
            opt_source_length=args.opt_source_length,
            max_new_tokens=args.max_new_tokens,
            opt_new_tokens=args.opt_new_tokens,
            beams=args.beams,
            fp16=args.fp16,
            bf16=args.bf16,
        )
        result = export_tensorrt(args.checkpoint, args.out, limits, options)
    elif draft:
        from cbart.exporter.pair import export_pair

        result = export_pair(args.checkpoint, args.draft, args.out, options, args.draft_quantize)
    else:
        result = export_onnx(args.checkpoint, args.out, options)
    _print_export_report(result)
    return 0


def _print_export_report(result: Any) -> None:
    verification = result.manifest.verification
    if verification is not None:
        for name, numbers in verification.outputs.items():
            print(f"  {name:32s} max abs {numbers['max_abs']:.2e}  max rel {numbers['max_rel']:.2e}")
        print(
            f"  greedy ids identical to PyTorch: {verification.greedy_identical}, "
            f"token agreement {100 * verification.token_agreement:.1f}%; onnx.checker {verification.onnx_checker}"
        )
    if verification is not None and verification.speculative_identical is not None:
        print(
            f"  speculative greedy identical to PyTorch: {verification.speculative_identical}, "
            f"draft acceptance {100 * (verification.draft_acceptance or 0.0):.1f}%"
        )
    for graph, counts in result.fused.items():
        fused = ", ".join(f"{op} x{n}" for op, n in sorted(counts.items())) or "nothing"
        print(f"  fused in {graph}: {fused}")
    draft = result.manifest.draft
    pair = f" with a {draft.precision} draft in {draft.directory}/" if draft else ""
    print(f"wrote {result.manifest.backend} export ({result.manifest.precision}){pair} to {result.directory}")


def cmd_verify(args: argparse.Namespace) -> int:
    from cbart.exporter.export import load_model
    from cbart.exporter.verify import verify_directory
    from cbart.runtime.generator import Seq2SeqRuntime
    from cbart.runtime.manifest import read_manifest

    manifest = read_manifest(args.directory)
    print(f"{args.directory}: format {manifest.format_version}, {len(manifest.files)} files, sha256 OK")
    if args.ckpt is None:
        runtime = Seq2SeqRuntime.from_dir(args.directory, check_files=False)
        out = runtime.generate([[manifest.tokens.bos, 4, 5, 6, manifest.tokens.eos]], max_new_tokens=4)
        print(f"graphs load and generate ({out.sequences[0]}); pass --ckpt CKPT to compare with PyTorch")
        return 0
    model = load_model(args.ckpt)
    report = verify_directory(model, args.directory)
    for name, numbers in report.summary().outputs.items():
        print(f"  {name:32s} max abs {numbers['max_abs']:.2e}  max rel {numbers['max_rel']:.2e}")
    print(f"  greedy ids identical to PyTorch: {report.greedy_identical}/{report.greedy_cases}")
    print(f"  onnx.checker (full_check): {'passed' if not report.checker_errors else 'FAILED'}")
    if not report.passed:
        print("verification FAILED:\n  " + "\n  ".join(report.failures()), file=sys.stderr)
        return 1
    print("verification passed")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import json

    from cbart.runtime.generator import Seq2SeqRuntime

    runtime = Seq2SeqRuntime.from_dir(
        args.directory, args.backend, args.device, args.threads, cuda_graphs=args.cuda_graphs
    )
    settings = {
        "max_new_tokens": args.max_new_tokens,
        "min_new_tokens": args.min_new_tokens,
        "num_beams": args.num_beams,
        "length_penalty": args.length_penalty,
        "no_repeat_ngram_size": args.no_repeat_ngram_size,
        "do_sample": args.do_sample or None,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "temperature": args.temperature,
        "seed": args.seed,
    }
    if args.speculative is not None:
        settings["speculative"] = True if args.speculative == 0 else args.speculative
    if args.input is None:
        if args.text is None:
            raise ValueError("give a TEXT argument or --input FILE.jsonl")
        output = runtime.generate(args.text, **settings)
        print(output.texts[0] if output.texts else output.sequences[0])
        _print_timing(args, output.timings)
        if args.timing and output.speculation is not None:
            stats = output.speculation.to_dict()
            print(" ".join(f"{key}={value}" for key, value in stats.items()), file=sys.stderr)
        return 0
    if args.output is not None:  # resumable, ids carried; --ray: an actor pool of runtimes (Ray Data)
        from cbart.serving.offline import OfflineJob, generate_file

        job = OfflineJob(
            args.directory, Path(args.input), Path(args.output), args.field, settings, args.batch_size, args.threads
        )
        written = generate_file(job, ray_actors=args.ray_actors if args.ray else None)
        print(f"wrote {written} generations to {args.output}")
        return 0
    if args.ray:
        raise ValueError("--ray writes to a file: add --output OUT.jsonl")
    rows = [json.loads(line) for line in Path(args.input).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{args.input} has no rows")
    if args.field not in rows[0]:
        raise KeyError(f"field {args.field!r} not in {args.input}; available fields: {sorted(rows[0])}")
    lines: list[str] = []
    totals = {"encode_s": 0.0, "decode_s": 0.0, "total_s": 0.0}
    for start in range(0, len(rows), args.batch_size):
        batch = rows[start : start + args.batch_size]
        output = runtime.generate([row[args.field] for row in batch], **settings)
        for key in totals:
            totals[key] += output.timings[key]
        results = output.texts or output.sequences
        for row, result in zip(batch, results, strict=True):
            lines.append(json.dumps({**row, "generated": result}, ensure_ascii=False))
    print("\n".join(lines))
    _print_timing(args, totals)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from cbart.serving.app import serve
    from cbart.serving.config import ServerConfig

    config = ServerConfig(
        args.directory, args.batching, args.max_rows, args.max_queue, args.request_timeout, args.threads
    )
    if not (config.export_dir / "manifest.json").is_file():
        raise FileNotFoundError(f"{config.export_dir} is not an export directory (no manifest.json); run cbart export")
    if args.ray:
        from cbart.serving.ray_deployment import RayServeOptions, serve_on_ray

        serve_on_ray(
            config, RayServeOptions(args.replicas, args.max_replicas, address=args.ray_address), args.host, args.port
        )
    else:
        serve(config, args.host, args.port)
    return 0


def _print_timing(args: argparse.Namespace, timings: dict[str, float]) -> None:
    if args.timing:
        print(" ".join(f"{key}={value:.3f}" for key, value in timings.items()), file=sys.stderr)


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
    importer.add_argument(
        "--trust-pickle",
        action="store_true",
        help="unpickle arbitrary Python objects in the release's .bin/.pth files; a crafted pickle runs code when "
        "loaded, so use this only for files from a source you trust (by default only tensors are loaded)",
    )
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
    distill = train.add_argument_group("distillation (token-level KD from the base model the student was built from)")
    distill.add_argument("--distill-from", default=None, help="the base BART checkpoint (teacher)")
    distill.add_argument("--distill-alpha", type=float, default=0.5, help="weight of the teacher's soft targets")
    distill.add_argument("--distill-temperature", type=float, default=1.0, help="softmax temperature of both models")
    generation = train.add_argument_group(
        "generation during evaluation (paper defaults: 4 beams, lp 2.0, no-repeat 3, min 55, max 144)"
    )
    generation.add_argument("--num-beams", type=int, default=None)
    generation.add_argument("--length-penalty", type=float, default=None)
    generation.add_argument("--no-repeat-ngram-size", type=int, default=None)
    generation.add_argument("--min-length", type=int, default=None)
    generation.add_argument("--max-length", type=int, default=None)
    train.set_defaults(run=cmd_train)

    # Choices and defaults come from the library (exporter/options.py, exporter/engine_profiles.py,
    # serving/config.py), which import neither torch, ONNX nor the web stack.
    from cbart.exporter import options as export_options
    from cbart.exporter.engine_profiles import EngineLimits
    from cbart.serving import config as serve_config

    export = commands.add_parser("export", help="export a checkpoint to verified ONNX graphs or TensorRT engines")
    export.add_argument("checkpoint", help="a compressed checkpoint (or a plain BART directory)")
    export.add_argument("--to", choices=export_options.TARGETS, default=export_options.TARGETS[0])
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    export.add_argument("--opset", type=int, default=export_options.ExportOptions.opset)
    export.add_argument("--fuse-encoder", action="store_true", help="encoder + autoencoder as one graph")
    export.add_argument(
        "--attention",
        choices=export_options.ATTENTION_CHOICES,
        default=export_options.ExportOptions.attention,
        help="encoder and decoder-step self-attention: ONNX Runtime's fused MultiHeadAttention or standard ops "
        "(auto: fused for --to onnx, plain for --to trt)",
    )
    export.add_argument(
        "--lm-head-screen",
        choices=export_options.LM_HEAD_SCREEN_CHOICES,
        default=export_options.ExportOptions.lm_head_screen,
        help="greedy search reads an 8-bit copy of the LM head and recomputes in fp32 only the tokens that can "
        "still be the argmax: same token ids, ~1/4 of the LM head's memory traffic (auto: on for fp32 --to onnx)",
    )
    export.add_argument("--optimize", action="store_true", help="ONNX Runtime transformer fusions")
    export.add_argument(
        "--dtype",
        choices=export_options.DTYPE_CHOICES,
        default=export_options.ExportOptions.dtype,
        help="ONNX precision",
    )
    export.add_argument(
        "--quantize", choices=export_options.QUANTIZE_CHOICES, default=None, help="dynamic int8 for CPU"
    )
    export.add_argument(
        "--draft",
        default=None,
        help="a compressed checkpoint sharing CHECKPOINT's encoder: export the pair for speculative decoding "
        "(generate --speculative gives CHECKPOINT's greedy output, verified token for token)",
    )
    export.add_argument(
        "--draft-quantize",
        choices=export_options.QUANTIZE_CHOICES,
        default=None,
        help="dynamic int8 for the draft only (output unchanged)",
    )
    export.add_argument("--no-verify", action="store_true", help="skip the parity checks against PyTorch")
    export.add_argument("--with-torch", action="store_true", help="also write TorchScript graphs (backend='torch')")
    export.add_argument(
        "--torch-device",
        choices=export_options.TORCH_DEVICE_CHOICES,
        default="cpu",
        help="where the TorchScript graphs are traced, and so where they run (default: cpu)",
    )
    export.add_argument(
        "--inflight",
        action="store_true",
        help="decoder step with per-row positions, so that `cbart serve` adds requests to a running batch "
        "(in-flight batching); other generation gives the same ids",
    )
    export.add_argument(
        "--tokenizer", default=None, help="tokenizer to copy into the export (default: the checkpoint's)"
    )
    export.add_argument("--threads", type=int, default=None)
    export.add_argument("--no-progress", action="store_true")
    trt = export.add_argument_group("TensorRT (--to trt)")
    for limit in ("max_batch", "opt_batch", "max_source_length", "opt_source_length", "max_new_tokens"):
        trt.add_argument(f"--{limit.replace('_', '-')}", type=int, default=getattr(EngineLimits, limit))
    trt.add_argument("--opt-new-tokens", type=int, default=EngineLimits.opt_new_tokens)
    trt.add_argument("--beams", type=int, default=EngineLimits.beams)
    trt.add_argument("--fp16", action="store_true")
    trt.add_argument("--bf16", action="store_true")
    trt.add_argument("--timing-cache", default=None, help="reuse/update this TensorRT timing cache file")
    export.set_defaults(run=cmd_export)

    verify = commands.add_parser("verify", help="re-check an export directory (and compare with PyTorch)")
    verify.add_argument("directory", type=Path)
    verify.add_argument("--ckpt", default=None, help="the checkpoint it was exported from")
    verify.set_defaults(run=cmd_verify)

    generate = commands.add_parser("generate", help="generate with an export directory")
    generate.add_argument("directory", type=Path)
    generate.add_argument("text", nargs="?", default=None)
    generate.add_argument("--input", default=None, help="JSON lines file (batched)")
    generate.add_argument("--output", default=None, help="JSON lines output (default: stdout)")
    generate.add_argument("--field", default="source", help="input field holding the text")
    generate.add_argument("--batch-size", type=int, default=8)
    generate.add_argument("--backend", choices=("onnxruntime", "tensorrt", "torch"), default="onnxruntime")
    generate.add_argument(
        "--device",
        default=None,
        help="cpu, cuda or tensorrt (ONNX Runtime providers); cuda or cuda:N for --backend tensorrt "
        "(default: cuda for --backend tensorrt, else cpu)",
    )
    generate.add_argument("--threads", type=int, default=None)
    generate.add_argument(
        "--cuda-graphs", action="store_true", help="TensorRT: replay each decoder step as a CUDA graph"
    )
    generate.add_argument("--timing", action="store_true", help="print encode/decode/total seconds to stderr")
    for flag, kind in (
        ("--max-new-tokens", int),
        ("--min-new-tokens", int),
        ("--num-beams", int),
        ("--length-penalty", float),
        ("--no-repeat-ngram-size", int),
        ("--top-k", int),
        ("--top-p", float),
        ("--temperature", float),
        ("--seed", int),
    ):
        generate.add_argument(flag, type=kind, default=None)
    generate.add_argument("--do-sample", action="store_true")
    generate.add_argument(
        "--speculative",
        type=int,
        nargs="?",
        const=0,
        default=None,
        metavar="K",
        help="a pair export (export --draft): the draft proposes, the full model verifies; the same output as "
        "greedy search (with --do-sample: the same distribution as sampling). K fixes the proposals per "
        "verification (default: adaptive)",
    )
    generate.add_argument(
        "--ray", action="store_true", help="with --input/--output: generate on a Ray cluster (Ray Data actor pool)"
    )
    generate.add_argument("--ray-actors", type=int, default=2, help="runtimes in the Ray actor pool (with --ray)")
    generate.set_defaults(run=cmd_generate)

    serve = commands.add_parser("serve", help="serve an export directory over HTTP (in-flight batching, metrics)")
    serve.add_argument("directory", type=Path)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--batching",
        choices=serve_config.BATCHING_CHOICES,
        default=serve_config.ServerConfig.batching,
        help="inflight: requests join the running batch at the next step (needs `cbart export --inflight`); "
        "static: waiting requests run as one batch; none: one at a time (auto: inflight when the export allows)",
    )
    defaults = serve_config.ServerConfig
    serve.add_argument("--max-rows", type=int, default=defaults.max_rows, help="decoder rows in flight (or per batch)")
    serve.add_argument("--max-queue", type=int, default=defaults.max_queue, help="waiting requests; more get 503")
    serve.add_argument(
        "--request-timeout", type=float, default=defaults.request_timeout_s, help="seconds before a request gets 504"
    )
    serve.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (per replica with --ray)")
    serve.add_argument("--ray", action="store_true", help="serve as a Ray Serve deployment")
    serve.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (the minimum with --max-replicas)")
    serve.add_argument("--max-replicas", type=int, default=None, help="autoscale up to this many replicas")
    serve.add_argument("--ray-address", default=None, help="a running Ray cluster (auto, ray://HOST:10001)")
    serve.set_defaults(run=cmd_serve)

    # `cbart bench ...` is forwarded to benchmarks.latency (`cbart bench speculative ...` to
    # benchmarks.speculative) before parsing (see main); listed here for --help.
    commands.add_parser(
        "bench",
        help="latency benchmark, side by side (cbart bench --help); speculative decoding on a trained pair "
        "(cbart bench speculative --help)",
        add_help=False,
    )
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
    parser.add_argument(
        "--decoder-heads", type=int, default=None, help="decoder attention heads (default: the base's; 8 for 256/128)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["bench", "speculative"]:
        from cbart.benchmarks.speculative import main as speculative_main

        return speculative_main(argv[2:])
    if argv[:1] == ["bench"]:
        from cbart.benchmarks.latency import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except Exception as error:
        if not isinstance(error, _input_errors()):
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"error: {message}", file=sys.stderr)
        return 2


def _input_errors() -> tuple[type[Exception], ...]:
    """The errors that mean bad input (one line on stderr, exit status 2).

    Only from modules this run imported: an error type cannot have been raised before its module was
    loaded, and importing ``compression`` just to catch its error would import torch.
    """
    errors: list[type[Exception]] = [FileNotFoundError, KeyError, ValueError]
    for module, name in (
        ("cbart.compression.checkpoint", "CheckpointError"),
        ("cbart.exporter.options", "ExportError"),
        ("cbart.runtime.manifest", "ExportDirectoryError"),
    ):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


if __name__ == "__main__":
    sys.exit(main())
