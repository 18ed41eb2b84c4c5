"""The latent-compressed BART model (Falaki & Gras, MAKE 2023), its training and its checkpoints.

A pretrained BART encoder feeds the encoder half of an autoencoder; a narrow BART decoder whose
width equals the latent size reads the compressed memory through cross-attention.
"""

from compression.autoencoder import LatentAutoencoder, ProjectionStack
from compression.build import build_from_base
from compression.checkpoint import CheckpointError, load_compressed_model, save_checkpoint
from compression.config import CompressedBartConfig
from compression.modeling import (
    CompressedBartForConditionalGeneration,
    CompressedBartForSequenceClassification,
    CompressedBartModel,
)

__all__ = [
    "CheckpointError",
    "CompressedBartConfig",
    "CompressedBartForConditionalGeneration",
    "CompressedBartForSequenceClassification",
    "CompressedBartModel",
    "LatentAutoencoder",
    "ProjectionStack",
    "build_from_base",
    "load_compressed_model",
    "save_checkpoint",
]
