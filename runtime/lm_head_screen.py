"""Exact greedy argmax from approximate (8-bit) logits: the runtime half of the screened LM head.

With ``exact_logits=False`` the decoder step (see :mod:`exporter.lm_head_screen`) splits its hidden
state ``h`` into a few outlier channels, multiplied in fp32, and the residual ``r`` (those channels
zeroed), multiplied by an 8-bit copy ``ŵ`` of each LM-head row ``w`` with ``r`` quantized to int8 on
the fly (``r̂``). The error of one approximate logit is then::

    |r·w − r̂·ŵ| <= ||r||₂ ||w − ŵ||₂ + ||r − r̂||∞ ||ŵ||₁    (+ fp32 rounding)

ONNX Runtime quantizes activations by their absolute maximum (per block or per tensor), so
``||r − r̂||∞ <= max|r| / 254``; the bound uses ``max|r| / 127``, twice that. fp32 rounding of all
the products and sums is bounded separately (``4 γ_width max|h| ||w||₁`` and ``4 u |bias|``).
``tests/test_lm_head_screen.py`` checks the bound against the installed kernel, outliers included.

Every approximate logit is thus an interval certain to hold the exact one. A token whose upper end
lies below the best lower end of its row cannot be the argmax; the others (a few hundred of 50k on
a random-weight bart-base, where logits are flat; a handful where one token stands out) are
recomputed in fp32 from the memory-mapped rows. The refined logits are exact where the argmax can
be and -inf elsewhere, so ``argmax`` returns what it returns on the full fp32 logits, ties included.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

ROWS_FILE = "lm_head_rows.npy"
BOUNDS_FILE = "lm_head_bounds.npy"
SWITCH = "exact_logits"
HIDDEN = "hidden"
RESIDUAL = "hidden_residual"
ACTIVATION_ERROR = 1.0 / 127.0  # twice the int8 rounding error of max|h|/127-scaled activations
MAX_CANDIDATE_FRACTION = 0.25  # past this, one pass over the whole head beats gathering its rows


class LogitScreen:
    """Turns a step's approximate logits (after masking processors) into argmax-exact logits."""

    def __init__(self, directory: Path, rows: np.ndarray | None = None) -> None:
        """``rows``: the backend's mapping of ``ROWS_FILE`` when its sessions share it (one mapping, not two)."""
        self.rows = np.load(directory / ROWS_FILE, mmap_mode="r") if rows is None else rows
        vocab, width = self.rows.shape
        unit = float(np.finfo(np.float32).eps) / 2
        self.rounding = 4 * width * unit / (1 - width * unit)
        bias, residual_l2, abs_l1 = np.load(directory / BOUNDS_FILE)
        self.bias = bias
        # radius = [||r||₂, max|r|/127 + rounding·max|h|, 1] @ terms: one pass over [3, vocab]
        self.terms = np.stack([residual_l2, abs_l1, 4 * unit * np.abs(bias)]).astype(np.float32)
        self.max_candidates = max(64, int(MAX_CANDIDATE_FRACTION * vocab))

    def radius(self, hidden: np.ndarray, residual: np.ndarray) -> np.ndarray:
        """[vocab]: how far each approximate logit of one row can be from the exact one.

        ``hidden`` [width] is the LM head's input, ``residual`` [width] the part of it that went
        through the 8-bit head.
        """
        activation = np.abs(residual).max() * ACTIVATION_ERROR + np.abs(hidden).max() * self.rounding
        weights = np.array([np.linalg.norm(residual), activation, 1.0], dtype=np.float32)
        return weights @ self.terms

    def refine(self, scores: np.ndarray, hidden: np.ndarray, residual: np.ndarray) -> np.ndarray:
        """``scores`` [rows, vocab]: approximate logits, masked entries -inf; ``hidden``/``residual`` [rows, width].

        Only processors that set entries to -inf (or force one token) may have run on ``scores``;
        a processor that rescales logits would invalidate the bound.
        """
        hidden = np.asarray(hidden, dtype=np.float32)
        exact = np.full_like(scores, -np.inf)
        for row in range(scores.shape[0]):
            radius = self.radius(hidden[row], residual[row])
            best_lower = (scores[row] - radius).max()
            candidates = np.flatnonzero(scores[row] + radius >= best_lower)
            if len(candidates) > self.max_candidates:  # a flat distribution: the whole head in one pass
                full = self.rows @ hidden[row] + self.bias
                exact[row] = np.where(np.isfinite(scores[row]), full, -np.inf)
            else:
                exact[row, candidates] = self.rows[candidates] @ hidden[row] + self.bias[candidates]
        return exact
