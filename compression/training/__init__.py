"""Training of the compressed model: stage 1 (autoencoder) and stage 2 (narrow decoder / classifier)."""

from compression.training.loop import TrainingArguments, TrainResult
from compression.training.stages import (
    Seq2SeqEvaluation,
    evaluate_generation,
    train_autoencoder,
    train_classifier,
    train_decoder,
)

__all__ = [
    "Seq2SeqEvaluation",
    "TrainResult",
    "TrainingArguments",
    "evaluate_generation",
    "train_autoencoder",
    "train_classifier",
    "train_decoder",
]
