"""``python -m cbart.benchmarks.quality``: train, export, score and time every model of the quality benchmark.

Stages (each reused from ``--work`` when finished, resumed from its latest epoch when not):

1. Multi30k base: a small BART trained from scratch (validation BLEU per epoch, checkpoint averaging).
2. Per latent size: stage 1 autoencoder on the frozen base encoder, stage 2 narrow decoder, and the
   same stage 2 distilled from the base (token-level KD).
3. AG News: a base classifier and the compressed classifier.
4. Evaluation: every translation model exported (fp32 and int8) and run through the ONNX Runtime
   runtime on the test set (greedy and beam 4) with bootstrap CIs and paired differences to the
   base; decode ms/token for all models in one interleaved run; fine-tuning step time and memory.

``--quick`` is the CI smoke run (tiny models, a few hundred rows, about two minutes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cbart.benchmarks.machine import machine
from cbart.benchmarks.quality import classification, evaluation, report, sequence_kd, stats, translation
from cbart.benchmarks.quality.data import ROOT, SHARED, TranslationData, load_ag_news, load_multi30k, save_vocabulary
from cbart.benchmarks.quality.finetune_cost import measure_in_subprocess

RECIPE_FILE = "recipe.json"
EPOCH_FIELDS = ("base_epochs", "decoder_epochs", "autoencoder_epochs")


def check_recipe(work: Path, recipe: translation.Recipe) -> None:
    """A work folder holds models of one recipe; refuse to mix (epoch counts may grow: training resumes)."""
    path = work / RECIPE_FILE
    current = {k: v for k, v in json.loads(json.dumps(asdict(recipe))).items() if k not in EPOCH_FIELDS}
    if path.is_file():
        saved = {k: v for k, v in json.loads(path.read_text()).items() if k not in EPOCH_FIELDS}
        different = sorted(k for k in current.keys() | saved.keys() if current.get(k) != saved.get(k))
        if different:
            raise SystemExit(
                f"error: {work} holds models trained with another recipe (differs in {', '.join(different)}); "
                "use a new --work folder, or delete that one to retrain"
            )
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(recipe), indent=2))


def train_translation(
    data: TranslationData,
    recipe: translation.Recipe,
    latent_sizes: tuple[tuple[int, ...], ...],
    work: Path,
    variants: list[str],
    progress: bool,
    threads: int,
    trained_only: bool = False,
) -> dict[str, Any]:
    """Train (or resume, or reuse) every requested model; ``trained_only`` skips the ones not trained yet."""
    records = {"base": translation.train_base(data, recipe, work, progress)}
    for latents in latent_sizes:
        name = translation.latent_name(latents)
        for variant, suffix in translation.VARIANTS.items():
            if trained_only and not (work / (name + suffix) / "config.json").is_file():
                continue
            if variant in variants:
                examples = sequence_kd.base_translations(data, work, threads) if variant == "seqkd" else None
                records[name + suffix] = translation.train_compressed(
                    data, recipe, work, latents, variant, progress, examples
                )
    return records


def _cached_texts(path: Path, produce: Any) -> list[str]:
    if path.is_file():
        return json.loads(path.read_text())
    texts = produce()
    path.write_text(json.dumps(texts, ensure_ascii=False))
    return texts


def evaluate_translation(
    names: list[str], data: TranslationData, work: Path, threads: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Test scores through the exported runtime, CIs, latency (one interleaved run) and fine-tuning cost."""
    outputs = work / "test-outputs"
    outputs.mkdir(exist_ok=True)
    rows = []
    statistics: dict[str, dict[str, Any]] = {}
    fp32: dict[str, Any] = {}
    int8: dict[str, Any] = {}
    for name in names:
        checkpoint = work / name
        fp32[name] = evaluation.open_runtime(evaluation.export(checkpoint, work / "exports" / f"{name}-fp32"), threads)
        int8[name] = evaluation.open_runtime(
            evaluation.export(checkpoint, work / "exports" / f"{name}-int8", "int8"), threads
        )
        print(f"[evaluate] {name}: test translations", flush=True)
        greedy = _cached_texts(
            outputs / f"{name}-greedy.json",
            lambda name=name: evaluation.translate(fp32[name], data, "test", translation.GREEDY),
        )
        beam = _cached_texts(
            outputs / f"{name}-beam4.json",
            lambda name=name: evaluation.translate(fp32[name], data, "test", translation.BEAM4),
        )
        statistics[name] = {
            "greedy": stats.bleu_statistics(greedy, data.test_references),
            "beam": stats.bleu_statistics(beam, data.test_references),
        }
        row: dict[str, Any] = {
            "model": name,
            "decoder_parameters": evaluation.decoder_parameters(checkpoint),
            "greedy": stats.bootstrap(statistics[name]["greedy"], stats.bleu_from_statistics).as_dict(),
            "beam": stats.bootstrap(statistics[name]["beam"], stats.bleu_from_statistics).as_dict(),
            "example": beam[0],
        }
        if name != "base":
            for search in ("greedy", "beam"):
                row[f"{search}_delta"] = stats.paired_bootstrap(
                    statistics[name][search], statistics["base"][search], stats.bleu_from_statistics
                ).as_dict()
        plain = name.removesuffix("-distilled").removesuffix("-seqkd")
        if plain != name and plain in statistics:  # distilled vs the same size trained with the paper's loss
            row["beam_delta_vs_plain"] = stats.paired_bootstrap(
                statistics[name]["beam"], statistics[plain]["beam"], stats.bleu_from_statistics
            ).as_dict()
        rows.append(row)
    print("[evaluate] decode ms/token, all models interleaved", flush=True)
    probes = [example.input_ids for example in data.test[:8]]
    timed = evaluation.decode_ms_per_token(
        {**{f"{n}|fp32": r for n, r in fp32.items()}, **{f"{n}|int8": r for n, r in int8.items()}}, probes
    )
    print("[evaluate] fine-tuning step time and memory (fresh processes)", flush=True)
    for row in rows:
        row["ms_fp32"] = timed[f"{row['model']}|fp32"]
        row["ms_int8"] = timed[f"{row['model']}|int8"]
        mode = "full" if row["model"] == "base" else "stage2"
        row["finetune"] = measure_in_subprocess(work / row["model"], mode, threads)
    return rows, {"probes": len(probes), "rounds": evaluation.ROUNDS}


def run_classification(
    recipe: translation.Recipe, latents: tuple[int, ...], work: Path, quick: bool, progress: bool
) -> list[dict[str, Any]]:
    data = load_ag_news(limit=200 if quick else None)
    epochs = 1 if quick else classification.CLASSIFIER_EPOCHS
    classification.train_base_classifier(data, recipe, work, epochs, progress)
    record = classification.train_compressed_classifier(data, recipe, work, latents, epochs, progress)
    labels = [int(example.labels) for example in data.test]
    base = stats.accuracy_statistics(classification.predict(work / "agnews-base", data, False), labels)
    compressed = stats.accuracy_statistics(classification.predict(work / record.name, data, True), labels)
    return [
        {"model": "base", "accuracy": stats.bootstrap(base, stats.accuracy_from_statistics).as_dict()},
        {
            "model": record.name.removeprefix("agnews-"),
            "accuracy": stats.bootstrap(compressed, stats.accuracy_from_statistics).as_dict(),
            "delta": stats.paired_bootstrap(compressed, base, stats.accuracy_from_statistics).as_dict(),
        },
    ]


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI smoke run: tiny models on a few hundred rows")
    parser.add_argument("--work", type=Path, default=None, help="where models are trained, resumed and reused")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-only", action="store_true", help="train (or resume) every model, then stop")
    parser.add_argument(
        "--trained-only",
        action="store_true",
        help="report only the requested models already trained in --work (e.g. one size has no seqkd model)",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=tuple(translation.VARIANTS),
        default=["plain", "distilled"],
        help="which stage-2 models per latent size: the paper's (plain), token-level KD (distilled), "
        "sequence-level KD on the base's greedy translations (seqkd)",
    )
    parser.add_argument(
        "--latents", type=int, nargs="+", default=None, help="only these latent sizes of the recipe (e.g. 128)"
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=("translation", "classification"),
        default=["translation", "classification"],
        help="train only these (with --train-only, two processes can train the two tasks side by side)",
    )
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if "translation" not in args.tasks and not args.train_only:
        raise SystemExit("error: the report needs the translation models; use --tasks classification with --train-only")
    if not (SHARED / "multi30k" / "train.jsonl").is_file():
        print(f"Multi30k not found under {SHARED} (set CBART_SHARED_DATA)", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    recipe = translation.QUICK if args.quick else translation.Recipe()
    if args.latents:
        unknown = set(args.latents) - {latents[-1] for latents in recipe.latents}
        if unknown:
            raise SystemExit(f"error: --latents {sorted(unknown)} not in the recipe's {recipe.latents}")
        recipe_latents = tuple(latents for latents in recipe.latents if latents[-1] in args.latents)
    else:
        recipe_latents = recipe.latents
    if machine()["bf16_training"] and not args.quick:
        recipe = translation.replace(recipe, mixed_precision="bf16")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as temporary:
        work = args.work or Path(temporary)
        check_recipe(work, recipe)
        data = load_multi30k(recipe.train_rows, recipe.eval_rows)
        save_vocabulary(data.vocabulary, work)
        progress = not args.no_progress
        records = (
            train_translation(
                data, recipe, recipe_latents, work, args.variants, progress, args.threads, args.trained_only
            )
            if "translation" in args.tasks
            else {}
        )
        classification_rows = []
        if "classification" in args.tasks:
            classification_rows = run_classification(recipe, recipe_latents[0], work, args.quick, progress)
        if args.train_only:
            print(f"trained: {', '.join(records)} in {work}")
            return 0
        rows, timing = evaluate_translation(list(records), data, work, args.threads)
    payload = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python -m cbart.benchmarks.quality", *(argv if argv is not None else sys.argv[1:])]),
        "minutes": round((time.perf_counter() - started) / 60, 1),
        "machine": machine(),
        "recipe": asdict(recipe),
        "vocabulary": len(data.vocabulary.kept),
        "training": {name: asdict(record) for name, record in records.items()},
        "translation": rows,
        "timing": timing,
        "classification": classification_rows,
        "translation_table": report.translation_table(rows),
        "classification_table": report.classification_table(classification_rows) if classification_rows else "",
    }
    args.results.mkdir(parents=True, exist_ok=True)
    stem = "quality-quick" if args.quick else "quality"
    (args.results / f"{stem}.json").write_text(json.dumps(payload, indent=2, ensure_ascii=False))
    report.plot_tradeoff(rows, args.results / f"{stem}.png")
    report.plot_curves(payload["training"], args.results / f"{stem}-curves.png")
    print(payload["translation_table"])
    print(payload["classification_table"])
    print(f"results: {args.results / (stem + '.json')}")
    return 0
