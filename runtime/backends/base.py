"""The small interface every backend implements: encode once, then decode step by step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from runtime.manifest import Manifest
from runtime.search import DecoderSession


@dataclass
class EncodedBatch:
    """What the decoder needs from the encoder side of one request batch.

    ``cross_kv`` is backend-owned (a NumPy array, an ORT value or a device tensor), stacked as
    ``[layers, 2, sources, heads, source_length, head_dim]``; it is computed once and shared by all
    rows (beams, samples) decoding the same source.
    """

    cross_kv: Any
    attention_mask: np.ndarray
    input_ids: np.ndarray

    @property
    def sources(self) -> int:
        return int(self.attention_mask.shape[0])


class Backend(Protocol):
    manifest: Manifest

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> EncodedBatch:
        """Run encoder, autoencoder and cross-K/V graphs."""
        ...

    def start(self, encoded: EncodedBatch, rows_per_source: int, max_length: int | None = None) -> DecoderSession:
        """A decoder session with an empty self-attention cache and ``rows_per_source`` rows per source.

        ``max_length`` bounds the sequence length (decoder start included), for backends that size
        buffers ahead; None means unknown.
        """
        ...
