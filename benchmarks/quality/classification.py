"""AG News topic classification: a base classifier and the compressed one, as the original code builds it.

The base is a small BART classifier trained from scratch on a stratified split of the shared AG
News test file (it stands in for a fine-tuned bart-base). The compressed classifier keeps the
base's frozen encoder, adds the paper's autoencoder (stage 1 on AG News text) and trains a narrow
decoder with BART's classification head on its EOS state (stage 2).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from cbart.benchmarks.quality.data import MAX_SOURCE_TOKENS, ClassificationData
from cbart.benchmarks.quality.translation import Recipe, StageRecord, base_config, run_stage, training_arguments

CLASSIFIER_EPOCHS = 4
WARMUP_STEPS = 60  # ~1 epoch of 6,000 texts in ~5k-token batches


def _arguments(recipe: Recipe, work: Path, epochs: int, progress: bool) -> Any:
    arguments = training_arguments(recipe, work, epochs, progress)
    return replace(
        arguments, eval_each_epoch=False, label_smoothing=0.0, warmup_steps=min(recipe.warmup_steps, WARMUP_STEPS)
    )


def train_base_classifier(
    data: ClassificationData, recipe: Recipe, work: Path, epochs: int, progress: bool
) -> StageRecord:
    from cbart.compression.training import train_full_model
    from transformers import BartForSequenceClassification

    def build() -> Any:
        config = base_config(recipe, len(data.vocabulary.kept))
        config.num_labels = len(data.labels)
        return BartForSequenceClassification(config)

    return run_stage(
        "agnews-base",
        work,
        build,
        BartForSequenceClassification.from_pretrained,
        lambda model, args, _: train_full_model(model, data.train, args),
        _arguments(recipe, work, epochs, progress),
        None,
    )


def train_compressed_classifier(
    data: ClassificationData, recipe: Recipe, work: Path, latents: tuple[int, ...], epochs: int, progress: bool
) -> StageRecord:
    from cbart.compression import build_from_base, load_compressed_model
    from cbart.compression.training import train_autoencoder, train_classifier
    from cbart.compression.training.stages import to_classifier
    from transformers import BartForConditionalGeneration, BartForSequenceClassification

    name = f"agnews-compressed-{latents[-1]}"

    def from_base() -> Any:
        classifier = BartForSequenceClassification.from_pretrained(work / "agnews-base")
        seq2seq = BartForConditionalGeneration(classifier.config)
        seq2seq.model.load_state_dict(classifier.model.state_dict())
        return build_from_base(seq2seq, latents, "paper", MAX_SOURCE_TOKENS)

    autoencoder_examples = [type(e)(e.input_ids, e.input_ids) for e in data.train]
    run_stage(
        f"{name}-ae",
        work,
        from_base,
        load_compressed_model,
        lambda model, args, _: train_autoencoder(model, autoencoder_examples, args),
        _arguments(recipe, work, recipe.autoencoder_epochs, progress),
        None,
    )
    return run_stage(
        name,
        work,
        lambda: to_classifier(load_compressed_model(work / f"{name}-ae"), len(data.labels)),
        lambda path: load_compressed_model(path, "classification"),
        lambda model, args, _: train_classifier(model, data.train, args),
        _arguments(recipe, work, epochs, progress),
        None,
    )


def predict(checkpoint: Path, data: ClassificationData, compressed: bool) -> list[int]:
    """Test-set predictions of a trained classifier (PyTorch; classification has no export path yet)."""
    from cbart.compression import load_compressed_model
    from cbart.compression.training.stages import classify
    from transformers import BartForSequenceClassification

    model = (
        load_compressed_model(checkpoint, "classification")
        if compressed
        else BartForSequenceClassification.from_pretrained(checkpoint)
    )
    return classify(model, data.test, batch_size=64)
