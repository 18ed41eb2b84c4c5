"""The paper's training stages on top of the shared loop.

Stage 1 trains the autoencoder to reconstruct frozen encoder states. Stage 2 trains the narrow
decoder (or a classification head on it) from the compressed memory, encoder and compressor
frozen by default -- which is where the paper's fine-tuning memory saving comes from.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn
from transformers import PreTrainedModel

from compression.autoencoder import LatentAutoencoder, reconstruction_loss
from compression.checkpoint import save_checkpoint
from compression.data import Collator, Example
from compression.metrics import TEXT_METRICS, accuracy
from compression.modeling import (
    CompressedBartForConditionalGeneration,
    CompressedBartForSequenceClassification,
)
from compression.training.loop import CHECKPOINTS, TrainingArguments, TrainResult, fit

AUTOENCODER_FILE = "autoencoder.safetensors"
CompressedModel = CompressedBartForConditionalGeneration | CompressedBartForSequenceClassification


def _set_trainable(module: nn.Module, trainable: bool) -> None:
    module.requires_grad_(trainable)
    module.train(trainable)


def _pad_source_to(model: CompressedModel, compressor_trains: bool) -> int | None:
    """The paper AE's BatchNorm needs full-length inputs only while its statistics are trained."""
    config = model.config
    return config.autoencoder_max_positions if compressor_trains and config.autoencoder_variant == "paper" else None


def _saver(
    model: PreTrainedModel, tokenizer: Any, extra: Callable[[], dict[str, bytes]] | None = None
) -> Callable[[Path, dict[str, Any]], None]:
    def write(directory: Path, state: dict[str, Any]) -> None:
        save_checkpoint(model, directory, tokenizer, state, extra() if extra else None, keep=(CHECKPOINTS,))

    return write


def train_autoencoder(
    model: CompressedBartForConditionalGeneration,
    examples: Sequence[Example],
    args: TrainingArguments,
    tokenizer: Any = None,
) -> TrainResult:
    """Stage 1: fit the autoencoder on the frozen encoder's outputs; the model's compressor is updated.

    The full autoencoder (both halves) is saved as ``autoencoder.safetensors`` beside the model so
    that ``--resume`` continues exactly; the compressed model itself only keeps the encoder half.
    """
    config = model.config
    model.to(args.device)
    encoder = model.model.encoder.base
    _set_trainable(model, False)
    autoencoder = LatentAutoencoder(
        config.encoder_d_model, config.latent_sizes, config.autoencoder_variant, config.autoencoder_max_positions
    ).to(args.device)
    if args.resume_from is not None:
        autoencoder.load_state_dict(load_file(Path(args.resume_from) / AUTOENCODER_FILE))
    autoencoder.train()

    def compute_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            hidden = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        _, reconstruction = autoencoder(hidden.float())
        return reconstruction_loss(reconstruction.float(), hidden.float(), batch["attention_mask"])

    def extra_files() -> dict[str, bytes]:
        model.model.encoder.compressor.load_state_dict(autoencoder.encoder.state_dict())
        return {AUTOENCODER_FILE: save({k: v.detach().cpu().contiguous() for k, v in autoencoder.state_dict().items()})}

    compatibility = _compatibility(model, "autoencoder", [autoencoder])
    pad_to = config.autoencoder_max_positions if config.autoencoder_variant == "paper" else None
    result = fit(
        list(autoencoder.parameters()),
        compute_loss,
        examples,
        Collator(config.pad_token_id, pad_to),
        args,
        _saver(model, tokenizer, extra_files),
        compatibility,
        description="stage 1: autoencoder",
    )
    model.eval()
    return result


@dataclass
class Seq2SeqEvaluation:
    """Held-out examples and how to score generations of them during stage 2.

    ``decode`` turns generated ids into what ``references`` hold (text for ROUGE/BLEU, id lists for
    exact match); ``generation`` holds ``generate()`` keyword arguments (the paper's by default).
    """

    examples: Sequence[Example]
    references: Sequence[Any]
    decode: Callable[[list[list[int]]], list[Any]]
    metric: str = "rouge"
    batch_size: int = 8
    generation: dict[str, Any] = field(default_factory=dict)


def evaluate_generation(model: PreTrainedModel, evaluation: Seq2SeqEvaluation) -> dict[str, float]:
    """Generate for every held-out example and score it with ``evaluation.metric``."""
    if evaluation.metric not in TEXT_METRICS:
        raise ValueError(f"unknown metric {evaluation.metric!r}; choose from {sorted(TEXT_METRICS)}")
    modes = {name: module.training for name, module in model.named_modules()}
    model.eval()
    collate = Collator(model.config.pad_token_id)
    predictions: list[Any] = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(evaluation.examples), evaluation.batch_size):
            batch = collate(evaluation.examples[start : start + evaluation.batch_size])
            generated = model.generate(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                **evaluation.generation,
            )
            predictions.extend(evaluation.decode(generated.tolist()))
    for name, module in model.named_modules():
        module.train(modes[name])
    return TEXT_METRICS[evaluation.metric](predictions, list(evaluation.references))


def train_decoder(
    model: CompressedBartForConditionalGeneration,
    examples: Sequence[Example],
    args: TrainingArguments,
    tokenizer: Any = None,
    evaluation: Seq2SeqEvaluation | None = None,
    train_encoder: bool = False,
    train_compressor: bool = False,
) -> TrainResult:
    """Stage 2: train the narrow decoder on a seq2seq task from the compressed memory."""
    model.to(args.device)
    _freeze_for_stage2(model, train_encoder, train_compressor)

    def compute_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    evaluate = (lambda: evaluate_generation(model, evaluation)) if evaluation is not None else None
    result = fit(
        list(model.parameters()),
        compute_loss,
        examples,
        Collator(model.config.pad_token_id, _pad_source_to(model, train_compressor)),
        args,
        _saver(model, tokenizer),
        _compatibility(model, "decoder", [model]),
        evaluate,
        description="stage 2: decoder",
    )
    model.eval()
    return result


def train_full_model(
    model: PreTrainedModel,
    examples: Sequence[Example],
    args: TrainingArguments,
    tokenizer: Any = None,
    evaluation: Seq2SeqEvaluation | None = None,
) -> TrainResult:
    """The baseline the paper compares against: fine-tune every weight of the uncompressed BART."""
    model.to(args.device)
    _set_trainable(model, True)
    shapes = {name: list(p.shape) for name, p in model.named_parameters()}
    result = fit(
        list(model.parameters()),
        lambda batch: model(**batch).loss,
        examples,
        Collator(model.config.pad_token_id),
        args,
        _saver(model, tokenizer),
        {"stage": "full", "trainable_parameters": sorted(shapes)},
        (lambda: evaluate_generation(model, evaluation)) if evaluation is not None else None,
        description="full model",
    )
    model.eval()
    return result


def to_classifier(
    model: CompressedBartForConditionalGeneration, num_labels: int
) -> CompressedBartForSequenceClassification:
    """A classification model sharing the trained encoder, compressor and decoder of ``model``."""
    config = copy.deepcopy(model.config)
    config.num_labels = num_labels  # the setter also rebuilds id2label/label2id
    classifier = CompressedBartForSequenceClassification(config)
    classifier.model.load_state_dict(model.model.state_dict())
    return classifier


def train_classifier(
    model: CompressedBartForSequenceClassification,
    examples: Sequence[Example],
    args: TrainingArguments,
    tokenizer: Any = None,
    held_out: Sequence[Example] | None = None,
    train_encoder: bool = False,
    train_compressor: bool = False,
) -> TrainResult:
    """Stage 2 for classification: the decoder and a BART classification head on its EOS state."""
    model.to(args.device)
    _freeze_for_stage2(model, train_encoder, train_compressor)
    evaluate = (lambda: classification_accuracy(model, held_out, args.batch_size)) if held_out else None
    return fit(
        list(model.parameters()),
        lambda batch: model(**batch).loss,
        examples,
        Collator(model.config.pad_token_id, _pad_source_to(model, train_compressor)),
        args,
        _saver(model, tokenizer),
        _compatibility(model, "classifier", [model]),
        evaluate,
        description="stage 2: classifier",
    )


def classification_accuracy(
    model: CompressedBartForSequenceClassification, examples: Sequence[Example], batch_size: int = 16
) -> dict[str, float]:
    modes = {name: module.training for name, module in model.named_modules()}
    model.eval()
    collate = Collator(model.config.pad_token_id)
    device = next(model.parameters()).device
    predictions: list[int] = []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size])
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits
            predictions.extend(logits.argmax(-1).tolist())
    for name, module in model.named_modules():
        module.train(modes[name])
    return accuracy(predictions, [int(example.labels) for example in examples])  # type: ignore[arg-type]


def _freeze_for_stage2(model: CompressedModel, train_encoder: bool, train_compressor: bool) -> None:
    _set_trainable(model, True)
    _set_trainable(model.model.encoder.base, train_encoder)
    _set_trainable(model.model.encoder.compressor, train_compressor)


def _compatibility(model: CompressedModel, stage: str, trained: Sequence[nn.Module]) -> dict[str, Any]:
    """What must match for ``--resume`` to continue the same run."""
    config = model.config
    shapes = {name: list(p.shape) for module in trained for name, p in module.named_parameters() if p.requires_grad}
    return {
        "stage": stage,
        "latent_sizes": list(config.latent_sizes),
        "autoencoder_variant": config.autoencoder_variant,
        "trainable_parameters": sorted(shapes),
        "parameter_count": sum(int(torch.tensor(s).prod()) for s in shapes.values()),
    }
