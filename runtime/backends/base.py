"""The small interface every backend implements: encode once, then decode step by step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
from cbart.runtime.manifest import Manifest
from cbart.runtime.search import DecoderSession


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
    draft: EncodedBatch | None = None
    """A speculative pair's draft decoder's view of the same sources (its own cross-K/V), or None."""

    @property
    def sources(self) -> int:
        return int(self.attention_mask.shape[0])


def uniform_positions(rows: int, past_length: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """An ``--inflight`` step's ``positions`` [rows, steps] and ``self_attention_mask`` [rows, past + steps]
    when every row has the same length: what the step computes by itself in other exports."""
    positions = np.broadcast_to(np.arange(past_length, past_length + steps, dtype=np.int64), (rows, steps))
    return np.ascontiguousarray(positions), np.ones((rows, past_length + steps), dtype=np.int64)


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


@runtime_checkable
class SharedEncoderBackend(Backend, Protocol):
    """A backend whose encoder output can feed another model's decoder side (a speculative pair's draft)."""

    def encoder_states(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> Any:
        """The encoder graph alone (backend-owned array or tensor)."""
        ...

    def encode_states(self, states: Any, input_ids: np.ndarray, attention_mask: np.ndarray) -> EncodedBatch:
        """This model's autoencoder (if any) and cross-K/V graphs on ``states``."""
        ...
