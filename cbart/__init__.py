"""cbart: latent-space compression for BART, with export to ONNX Runtime / TensorRT.

The public PyTorch API lives in :mod:`compression`; it is re-exported here, loaded on first use, so
that ``import cbart`` (and the ``cbart generate`` command) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "CheckpointError": "compression",
    "CompressedBartConfig": "compression",
    "CompressedBartForConditionalGeneration": "compression",
    "CompressedBartForSequenceClassification": "compression",
    "build_from_base": "compression",
    "import_original_checkpoint": "compression.importer",
    "load_compressed_model": "compression",
    "save_checkpoint": "compression",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cbart' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
