"""Training of the compressed model: stage 1 (autoencoder) and stage 2 (narrow decoder / classifier),
and the full-model fine-tuning they are compared against."""

from cbart.compression.training.loop import TrainingArguments, TrainResult
from cbart.compression.training.stages import (
    Distillation,
    Seq2SeqEvaluation,
    evaluate_generation,
    freeze_for_stage2,
    train_autoencoder,
    train_classifier,
    train_decoder,
    train_full_model,
)

__all__ = [
    "Distillation",
    "Seq2SeqEvaluation",
    "TrainResult",
    "TrainingArguments",
    "evaluate_generation",
    "freeze_for_stage2",
    "train_autoencoder",
    "train_classifier",
    "train_decoder",
    "train_full_model",
]
