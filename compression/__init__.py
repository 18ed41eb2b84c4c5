"""The latent-compressed BART model (Falaki & Gras, MAKE 2023), its training and its checkpoints.

A pretrained BART encoder feeds the encoder half of an autoencoder; a narrow BART decoder whose
width equals the latent size reads the compressed memory through cross-attention.
"""

from cbart.compression.autoencoder import LatentAutoencoder, ProjectionStack
from cbart.compression.build import build_from_base
from cbart.compression.checkpoint import CheckpointError, load_compressed_model, save_checkpoint
from cbart.compression.config import CompressedBartConfig
from cbart.compression.modeling import (
    CompressedBartForConditionalGeneration,
    CompressedBartForSequenceClassification,
    CompressedBartModel,
)
from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

# transformers integration, in both directions:
# - in this process, AutoModel*.from_pretrained(dir) knows the compressed architecture;
# - save_pretrained() copies modeling.py, config.py and autoencoder.py into the checkpoint and writes an
#   auto_map, so AutoModel*.from_pretrained(dir, trust_remote_code=True) loads it where cbart is not installed.
AutoConfig.register(CompressedBartConfig.model_type, CompressedBartConfig, exist_ok=True)
AutoModelForSeq2SeqLM.register(CompressedBartConfig, CompressedBartForConditionalGeneration, exist_ok=True)
AutoModelForSequenceClassification.register(
    CompressedBartConfig, CompressedBartForSequenceClassification, exist_ok=True
)
CompressedBartConfig.register_for_auto_class()
CompressedBartForConditionalGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")
CompressedBartForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

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
