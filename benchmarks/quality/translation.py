"""Multi30k En->De: train the base, the paper's compressed models and the distilled ones, resumably.

Each model lives in its own folder under ``--work``; a folder with ``config.json`` is finished and
reused, one with ``checkpoints/epoch-N`` resumes from its latest epoch. The base recipe is a plain
small-data NMT recipe (d=256, 3+3 layers, tied embeddings, label smoothing 0.1, AdamW with
inverse-sqrt warm-up, length-bucketed batches of ~5k tokens, dropout), and the final base is the
average of its last epochs' weights (checkpoint averaging, as fairseq's ``average_checkpoints``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from cbart.benchmarks.quality.data import MAX_SOURCE_TOKENS, TranslationData

GREEDY = {"num_beams": 1}
BEAM4 = {"num_beams": 4, "length_penalty": 1.0, "early_stopping": True}
MAX_NEW_TOKENS = 100
AUTOENCODER_WARMUP = 100  # stage 1 is a short regression (2 epochs): reach the peak rate early
RECORD = "quality-record.json"


@dataclass(frozen=True)
class Recipe:
    """Architecture and optimisation of the base and of every compressed stage (one place, one record)."""

    d_model: int = 256
    layers: int = 3
    heads: int = 4
    ffn: int = 1024
    dropout: float = 0.1
    attention_dropout: float = 0.0
    max_tokens: int = 5000
    learning_rate: float = 1e-3
    warmup_steps: int = 500
    label_smoothing: float = 0.1
    weight_decay: float = 1e-4
    base_epochs: int = 6
    average_last: int = 3
    autoencoder_epochs: int = 1
    decoder_epochs: int = 4
    latents: tuple[tuple[int, ...], ...] = ((192, 128), (128, 64))
    distill_alpha: float = 0.5
    distill_temperature: float = 1.0
    train_rows: int | None = None
    eval_rows: int | None = None
    mixed_precision: str = "no"


QUICK = Recipe(
    d_model=64,
    layers=1,
    heads=2,
    ffn=128,
    max_tokens=1500,
    warmup_steps=10,
    base_epochs=2,
    average_last=2,
    autoencoder_epochs=1,
    decoder_epochs=2,  # two: the second epoch runs after a validation pass (a regression once broke there)
    latents=((32,),),
    train_rows=400,
    eval_rows=24,
)


def base_config(recipe: Recipe, vocab_size: int) -> Any:
    from transformers import BartConfig

    return BartConfig(
        vocab_size=vocab_size,
        d_model=recipe.d_model,
        encoder_layers=recipe.layers,
        decoder_layers=recipe.layers,
        encoder_attention_heads=recipe.heads,
        decoder_attention_heads=recipe.heads,
        encoder_ffn_dim=recipe.ffn,
        decoder_ffn_dim=recipe.ffn,
        max_position_embeddings=MAX_SOURCE_TOKENS,
        dropout=recipe.dropout,
        attention_dropout=recipe.attention_dropout,
        scale_embedding=True,
        tie_word_embeddings=True,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=2,
    )


def training_arguments(recipe: Recipe, directory: Path, epochs: int, progress: bool) -> Any:
    from cbart.compression.training import TrainingArguments

    return TrainingArguments(
        directory,
        epochs=epochs,
        max_tokens=recipe.max_tokens,
        learning_rate=recipe.learning_rate,
        warmup_steps=recipe.warmup_steps,
        lr_schedule="inverse_sqrt",
        label_smoothing=recipe.label_smoothing,
        weight_decay=recipe.weight_decay,
        save_each_epoch=True,
        eval_each_epoch=True,
        mixed_precision=recipe.mixed_precision,
        progress=progress,
    )


def generate_texts(
    model: Any, data: TranslationData, split: str, generation: dict[str, Any], batch: int = 64
) -> list[str]:
    """PyTorch ``generate()`` over a split (the per-epoch validation; test scores come from the runtime)."""
    import torch
    from cbart.compression.data import Collator
    from cbart.compression.training.stages import evaluation_mode

    collate = Collator(model.config.pad_token_id)

    def generate(examples: list[Any]) -> list[list[int]]:
        tensors = collate(examples)
        with torch.no_grad():
            output = model.generate(
                input_ids=tensors["input_ids"],
                attention_mask=tensors["attention_mask"],
                max_new_tokens=MAX_NEW_TOKENS,
                **generation,
            )
        return output.tolist()

    with evaluation_mode(model):
        return data.translate(split, batch, generate)


def validation_bleu(model: Any, data: TranslationData) -> Callable[[], dict[str, float]]:
    """The per-epoch evaluation: greedy BLEU on the validation split (model selection never sees test)."""
    from cbart.compression.metrics import bleu

    def evaluate() -> dict[str, float]:
        translations = generate_texts(model, data, "validation", GREEDY)
        return {"validation_bleu": bleu(translations, data.validation_references)["bleu"]}

    return evaluate


def latest_epoch(directory: Path) -> Path | None:
    from cbart.compression.training.loop import CHECKPOINTS

    epochs = sorted((directory / CHECKPOINTS).glob("epoch-*"), key=lambda p: int(p.name.split("-")[1]))
    return epochs[-1] if epochs else None


def average_weights(directories: Sequence[Path]) -> dict[str, Any]:
    """The element-wise mean of the floating-point weights of several checkpoints of one model."""
    from safetensors.torch import load_file

    total: dict[str, Any] = {}
    for directory in directories:
        for name, tensor in load_file(directory / "model.safetensors").items():
            if tensor.is_floating_point():
                total[name] = total[name] + tensor.double() if name in total else tensor.double()
            else:
                total.setdefault(name, tensor)
    return {name: t.float() / len(directories) if t.is_floating_point() else t for name, t in total.items()}


@dataclass
class StageRecord:
    """What a finished training stage reports: its validation curve, time and which weights were kept."""

    name: str
    minutes: float
    epochs: int
    steps: int
    evaluations: list[dict[str, float]] = field(default_factory=list)
    selected: str = "last"
    validation_bleu: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def read_record(directory: Path) -> StageRecord | None:
    path = directory / RECORD
    return StageRecord(**json.loads(path.read_text())) if path.is_file() else None


class EpochClock:
    """Adds each epoch's wall time to its evaluation, so a resumed run still reports its training time."""

    def __init__(self, evaluate: Callable[[], dict[str, float]]) -> None:
        self._evaluate = evaluate
        self._since = time.perf_counter()

    def __call__(self) -> dict[str, float]:
        seconds = time.perf_counter() - self._since
        scores = self._evaluate()
        self._since = time.perf_counter()
        return {"train_seconds": round(seconds, 1), **scores}


def run_stage(
    name: str,
    work: Path,
    build: Callable[[], Any],
    load: Callable[[Path], Any],
    train: Callable[[Any, Any, Callable[[], dict[str, float]] | None], Any],
    args: Any,
    evaluate: Callable[[Any], Callable[[], dict[str, float]]] | None,
    average_last: int = 1,
) -> StageRecord:
    """Train one stage into ``work/name`` (resuming ``work/name-run``) unless it is already there.

    ``evaluate(model)`` makes the per-epoch validation callback. At the end the stage keeps the mean
    of the last ``average_last`` epochs' weights, or the single best epoch if that scores higher on
    validation.
    """
    from cbart.compression.checkpoint import save_checkpoint

    final = work / name
    if (final / "config.json").is_file():
        record = read_record(final)
        if record is not None:
            print(f"[{name}] reusing {final}", flush=True)
            return record
    run = work / f"{name}-run"
    resume = latest_epoch(run)
    model = load(resume) if resume is not None else build()
    args = replace(args, output_dir=run, resume_from=resume)
    print(f"[{name}] training in {run}" + (f" (resuming {resume.name})" if resume else ""), flush=True)
    callback = EpochClock(evaluate(model)) if evaluate is not None else None
    started = time.perf_counter()
    result = train(model, args, callback)
    seconds = sum(e.get("train_seconds", 0.0) for e in result.evaluations) or time.perf_counter() - started
    record = StageRecord(
        name=name,
        minutes=round(seconds / 60, 1),
        epochs=args.epochs,
        steps=result.steps,
        evaluations=result.evaluations,
    )
    if callback is not None:
        record.selected, record.validation_bleu = select_weights(
            model, run, result.evaluations, average_last, evaluate(model)
        )
    save_checkpoint(model, final, extra_files={RECORD: json.dumps(asdict(record), indent=2).encode()})
    print(f"[{name}] done: {record.selected}, validation BLEU {record.validation_bleu}", flush=True)
    return record


def select_weights(
    model: Any,
    run: Path,
    evaluations: list[dict[str, float]],
    average_last: int,
    evaluate: Callable[[], dict[str, float]],
) -> tuple[str, float]:
    """Load the better (on validation BLEU) of: the last epochs' mean, or the best single epoch."""
    from cbart.compression.training.loop import CHECKPOINTS
    from safetensors.torch import load_file

    per_epoch = {int(e["epoch"]): e["validation_bleu"] for e in evaluations if "validation_bleu" in e}
    best_epoch = max(per_epoch, key=lambda epoch: per_epoch[epoch])
    last = sorted(per_epoch)[-average_last:]
    candidates: list[tuple[str, float, dict[str, Any]]] = []
    if len(last) > 1:
        averaged = average_weights([run / CHECKPOINTS / f"epoch-{epoch}" for epoch in last])
        model.load_state_dict(averaged, strict=False)
        candidates.append((f"mean of epochs {last[0]}-{last[-1]}", evaluate()["validation_bleu"], averaged))
    best = load_file(run / CHECKPOINTS / f"epoch-{best_epoch}" / "model.safetensors")
    candidates.append((f"epoch {best_epoch}", per_epoch[best_epoch], best))
    label, score, weights = max(candidates, key=lambda candidate: candidate[1])
    model.load_state_dict(weights, strict=False)
    return label, score


def train_base(data: TranslationData, recipe: Recipe, work: Path, progress: bool = True) -> StageRecord:
    """The full-width model trained from scratch (stands in for the paper's fine-tuned bart-base)."""
    from cbart.compression.training import train_full_model
    from transformers import BartForConditionalGeneration

    return run_stage(
        "base",
        work,
        lambda: BartForConditionalGeneration(base_config(recipe, len(data.vocabulary.kept))),
        BartForConditionalGeneration.from_pretrained,
        lambda model, args, evaluate: train_full_model(model, data.train, args, evaluation_callback=evaluate),
        training_arguments(recipe, work / "base", recipe.base_epochs, progress),
        lambda model: validation_bleu(model, data),
        recipe.average_last,
    )


def latent_name(latents: Sequence[int]) -> str:
    return f"compressed-{latents[-1]}"


VARIANTS = {
    "plain": "",
    "distilled": "-distilled",
    "seqkd": "-seqkd",
}
"""Stage-2 variants and their name suffixes: the paper's loss; token-level KD from the base
(``Distillation``); sequence-level KD -- the base's own greedy translations as targets (Kim & Rush, 2016)."""


def train_compressed(
    data: TranslationData,
    recipe: Recipe,
    work: Path,
    latents: Sequence[int],
    variant: str = "plain",
    progress: bool = True,
    examples: Sequence[Any] | None = None,
) -> StageRecord:
    """The paper's method on the trained base: frozen encoder -> stage 1 autoencoder -> stage 2 narrow decoder.

    Every variant starts from the same stage-1 autoencoder, so they differ only in stage 2: its loss
    (``distilled``) or its targets (``seqkd`` trains on ``examples``, the base's translations).
    """
    from cbart.compression import build_from_base, load_compressed_model
    from cbart.compression.training import Distillation, train_autoencoder, train_decoder
    from transformers import BartForConditionalGeneration

    if variant not in VARIANTS:
        raise ValueError(f"unknown stage-2 variant {variant!r}; choose one of {sorted(VARIANTS)}")
    if (variant == "seqkd") != (examples is not None):
        raise ValueError("the seqkd variant trains on the base's translations: pass them as examples (and only then)")
    stem = latent_name(latents)
    autoencoder = run_stage(
        f"{stem}-ae",
        work,
        lambda: build_from_base(
            BartForConditionalGeneration.from_pretrained(work / "base"), latents, "paper", MAX_SOURCE_TOKENS
        ),
        load_compressed_model,
        lambda model, args, _: train_autoencoder(model, data.train, args),
        replace(
            training_arguments(recipe, work, recipe.autoencoder_epochs, progress),
            eval_each_epoch=False,
            warmup_steps=min(recipe.warmup_steps, AUTOENCODER_WARMUP),
        ),
        None,
    )
    distillation = None
    if variant == "distilled":
        teacher = BartForConditionalGeneration.from_pretrained(work / "base")
        distillation = Distillation(teacher, recipe.distill_alpha, recipe.distill_temperature)
    train_examples = data.train if examples is None else examples
    record = run_stage(
        stem + VARIANTS[variant],
        work,
        lambda: load_compressed_model(work / f"{stem}-ae"),
        load_compressed_model,
        lambda model, args, evaluate: train_decoder(
            model, train_examples, args, evaluation_callback=evaluate, distillation=distillation
        ),
        training_arguments(recipe, work, recipe.decoder_epochs, progress),
        lambda model: validation_bleu(model, data),
        recipe.average_last,
    )
    record.extra["autoencoder_minutes"] = autoencoder.minutes
    return record
