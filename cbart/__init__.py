"""cbart: latent-space compression for BART, with export to ONNX Runtime / TensorRT.

The public PyTorch API lives in :mod:`compression`; it is re-exported here, loaded on first use, so
that ``import cbart`` (and the ``cbart generate`` command) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "CheckpointError": "cbart.compression",
    "CompressedBartConfig": "cbart.compression",
    "CompressedBartForConditionalGeneration": "cbart.compression",
    "CompressedBartForSequenceClassification": "cbart.compression",
    "build_from_base": "cbart.compression",
    "import_original_checkpoint": "cbart.compression.importer",
    "load_compressed_model": "cbart.compression",
    "save_checkpoint": "cbart.compression",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cbart' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
