"""Confidence intervals by bootstrap resampling of test items (Koehn, 2004).

A corpus score is a function of summed per-item statistics (BLEU's n-gram matches and lengths,
accuracy's hits), so a resample is a sum over resampled rows and thousands of resamples are cheap.
The *paired* interval resamples the same items for both systems: it answers "is the difference
real", which two separate intervals (that overlap easily on 1,000 sentences) do not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 1000
SEED = 12345


@dataclass(frozen=True)
class Interval:
    """A point estimate with its 95% percentile-bootstrap interval."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.2f} [{self.low:.2f}, {self.high:.2f}]"

    def as_dict(self) -> dict[str, float]:
        return {"value": round(self.value, 3), "low": round(self.low, 3), "high": round(self.high, 3)}


def bleu_statistics(hypotheses: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Per-sentence sufficient statistics of sacreBLEU's corpus BLEU, shape ``(sentences, 10)``."""
    import sacrebleu

    metric = sacrebleu.BLEU()
    return np.asarray(metric._extract_corpus_statistics(list(hypotheses), [list(references)]), dtype=np.int64)


def bleu_from_statistics(totals: np.ndarray) -> float:
    """Corpus BLEU of summed statistics (the same arithmetic as ``sacrebleu.corpus_bleu``)."""
    import sacrebleu

    return float(sacrebleu.BLEU()._compute_score_from_stats([int(x) for x in totals]).score)


def accuracy_from_statistics(totals: np.ndarray) -> float:
    return 100.0 * float(totals[0]) / max(int(totals[1]), 1)


def accuracy_statistics(predictions: Sequence[int], labels: Sequence[int]) -> np.ndarray:
    return np.asarray([[int(p == y), 1] for p, y in zip(predictions, labels, strict=True)], dtype=np.int64)


def _resampled_totals(statistics: np.ndarray, indices: np.ndarray) -> np.ndarray:
    return statistics[indices].sum(axis=1)


def _indices(items: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, items, size=(resamples, items))


def bootstrap(
    statistics: np.ndarray, score: Callable[[np.ndarray], float], resamples: int = RESAMPLES, seed: int = SEED
) -> Interval:
    """The score of all items with the 95% interval of its resampled distribution."""
    totals = _resampled_totals(statistics, _indices(len(statistics), resamples, seed))
    samples = np.array([score(row) for row in totals])
    return Interval(score(statistics.sum(axis=0)), *np.percentile(samples, [2.5, 97.5]))


def paired_bootstrap(
    system: np.ndarray,
    baseline: np.ndarray,
    score: Callable[[np.ndarray], float],
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Interval:
    """``score(system) - score(baseline)`` with the 95% interval over shared resamples of the items."""
    if len(system) != len(baseline):
        raise ValueError(f"paired bootstrap needs the same items: {len(system)} vs {len(baseline)} rows")
    indices = _indices(len(system), resamples, seed)
    ours = _resampled_totals(system, indices)
    theirs = _resampled_totals(baseline, indices)
    samples = np.array([score(a) - score(b) for a, b in zip(ours, theirs, strict=True)])
    point = score(system.sum(axis=0)) - score(baseline.sum(axis=0))
    return Interval(point, *np.percentile(samples, [2.5, 97.5]))
