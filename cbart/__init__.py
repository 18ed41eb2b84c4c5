"""cbart: latent-space compression for BART, with export to ONNX Runtime / TensorRT.

The public PyTorch API lives in :mod:`compression`; it is re-exported here for convenience.
"""

from compression import (
    CheckpointError,
    CompressedBartConfig,
    CompressedBartForConditionalGeneration,
    CompressedBartForSequenceClassification,
    build_from_base,
    load_compressed_model,
    save_checkpoint,
)
from compression.importer import import_original_checkpoint

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CompressedBartConfig",
    "CompressedBartForConditionalGeneration",
    "CompressedBartForSequenceClassification",
    "__version__",
    "build_from_base",
    "import_original_checkpoint",
    "load_compressed_model",
    "save_checkpoint",
]
