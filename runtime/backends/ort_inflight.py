"""An ONNX Runtime decoder session whose rows come and go between steps: in-flight batching.

Requests of different lengths share one decoder step. Each row carries its own position and a mask over
the shared self-attention cache: a row that joins gets as many cache columns as the batch already has,
masked, so it attends to its own tokens only (``--inflight`` exports take ``positions`` and
``self_attention_mask``; see ``exporter.graphs.DecoderStepGraph``). Every row is its own source, with its
own copy of the cross-attention K/V, padded to the longest source in the batch and masked beyond its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort
from cbart.runtime.backends.base import EncodedBatch
from cbart.runtime.backends.onnxruntime import ScreenedOrtDecoderSession
from cbart.runtime.manifest import DECODER_STEP, STEP_ENCODER_MASK

if TYPE_CHECKING:
    from cbart.runtime.backends.onnxruntime import OnnxRuntimeBackend


def _pad_axis(array: np.ndarray, axis: int, length: int) -> np.ndarray:
    """Zeros appended along ``axis`` up to ``length`` (masked positions: they never reach a softmax)."""
    missing = length - array.shape[axis]
    if missing <= 0:
        return array
    widths = [(0, 0)] * array.ndim
    widths[axis] = (0, missing)
    return np.pad(array, widths)


class InflightOrtSession(ScreenedOrtDecoderSession):
    """Starts empty; ``join`` adds rows, ``keep`` drops the others, ``step``/``step_screened`` feed one token
    per row. ``screen`` is the export's screened LM head, or None when it has none."""

    def __init__(self, backend: OnnxRuntimeBackend) -> None:
        if not backend.per_row_positions:
            raise ValueError(
                "in-flight batching needs a decoder step with per-row positions; re-export with `cbart export "
                "--inflight`, or serve with static batching"
            )
        self.backend = backend
        self.session = backend.sessions[DECODER_STEP]
        self.device = backend._ort_device
        self.screen = backend.screen  # type: ignore[assignment]  # None: no screened head in this export
        dims = backend.manifest.model
        self._cache_shape = (dims.decoder_attention_heads, dims.head_dim)
        self._reset()

    def _reset(self) -> None:
        heads, head_dim = self._cache_shape
        self.past_arrays = [np.zeros((0, heads, 0, head_dim), np.float32) for _ in self.backend.past_names]
        self.cross_arrays: list[np.ndarray] = []
        self.encoder_mask = np.zeros((0, 0), dtype=np.int64)
        self.valid = np.zeros((0, 0), dtype=bool)  # [rows, cache columns]: the row may attend there
        self.lengths = np.zeros(0, dtype=np.int64)  # tokens each row has fed
        self.past = []

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def join(self, encoded: EncodedBatch, rows_per_source: np.ndarray) -> None:
        """Append ``rows_per_source[n]`` rows for each source of ``encoded``, with empty caches."""
        self._materialize()
        cross = [np.repeat(value.numpy(), rows_per_source, axis=0) for value in encoded.cross_kv]
        mask = np.repeat(encoded.attention_mask.astype(np.int64), rows_per_source, axis=0)
        added = len(mask)
        if self.rows == 0:
            self.cross_arrays, self.encoder_mask = cross, mask
        else:
            width = max(self.encoder_mask.shape[1], mask.shape[1])
            self.encoder_mask = np.concatenate([_pad_axis(self.encoder_mask, 1, width), _pad_axis(mask, 1, width)])
            self.cross_arrays = [
                np.concatenate(
                    [_pad_axis(old, self._source_axis(index), width), _pad_axis(new, self._source_axis(index), width)]
                )
                for index, (old, new) in enumerate(zip(self.cross_arrays, cross, strict=True))
            ]
        columns = self.valid.shape[1]
        self.past_arrays = [
            np.concatenate([old, np.zeros((added, *old.shape[1:]), np.float32)]) for old in self.past_arrays
        ]
        self.valid = np.concatenate([self.valid, np.zeros((added, columns), dtype=bool)])
        self.lengths = np.concatenate([self.lengths, np.zeros(added, dtype=np.int64)])
        self._bind()

    def keep(self, rows: np.ndarray) -> None:
        """Keep ``rows`` (in that order) and drop the others; cache columns and source positions no kept row
        reads are dropped too, so the step's cost follows the rows still decoding."""
        self._materialize()
        if len(rows) == 0:
            self._reset()
            return
        valid = self.valid[rows]
        first = int(np.argmax(valid.any(axis=0))) if valid.size else 0
        mask = self.encoder_mask[rows]
        width = int(np.flatnonzero(mask.any(axis=0)).max()) + 1
        self.valid = valid[:, first:]
        self.lengths = self.lengths[rows]
        self.past_arrays = [value[rows][:, :, first:] for value in self.past_arrays]
        self.encoder_mask = mask[:, :width]
        self.cross_arrays = [
            np.take(value[rows], np.arange(width), axis=self._source_axis(index))
            for index, value in enumerate(self.cross_arrays)
        ]
        self._bind()

    def _source_axis(self, index: int) -> int:
        """Cross keys are stored transposed ([rows, heads, head_dim, source]), values as [rows, heads, source, hd]."""
        return 3 if index % 2 == 0 else 2

    def _materialize(self) -> None:
        """The cache as NumPy arrays (after steps it lives in the step's output OrtValues)."""
        if self.past:
            self.past_arrays = [value.numpy() for value in self.past]

    def _bind(self) -> None:
        """New OrtValues over the arrays (which they read in place on CPU, so the arrays stay referenced)."""
        self.past_arrays = [np.ascontiguousarray(value) for value in self.past_arrays]
        self.cross_arrays = [np.ascontiguousarray(value) for value in self.cross_arrays]
        self.encoder_mask = np.ascontiguousarray(self.encoder_mask)
        self.past = [ort.OrtValue.ortvalue_from_numpy(value, self.device) for value in self.past_arrays]
        self.binding = self.session.io_binding()
        self.mask = ort.OrtValue.ortvalue_from_numpy(self.encoder_mask, self.device)
        self.binding.bind_ortvalue_input(STEP_ENCODER_MASK, self.mask)
        self.cross = [ort.OrtValue.ortvalue_from_numpy(value, self.device) for value in self.cross_arrays]
        for name, value in zip(self.backend.cross_names, self.cross, strict=True):
            self.binding.bind_ortvalue_input(name, value)

    def _row_inputs(self, steps: int) -> tuple[np.ndarray, np.ndarray]:
        positions = self.lengths[:, None] + np.arange(steps, dtype=np.int64)[None, :]
        self_mask = np.concatenate([self.valid, np.ones((self.rows, steps), dtype=bool)], axis=1)
        return positions, self_mask.astype(np.int64)

    def _run(self, tokens: np.ndarray, exact: bool, last_only: bool) -> list[np.ndarray]:
        if self.rows == 0:
            raise ValueError("no rows to decode: join requests first")
        outputs = super()._run(tokens, exact, last_only)
        steps = tokens.shape[1]
        self.valid = np.concatenate([self.valid, np.ones((self.rows, steps), dtype=bool)], axis=1)
        self.lengths = self.lengths + steps
        return outputs
