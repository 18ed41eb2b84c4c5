"""Task metrics used during evaluation: ROUGE (summarization), BLEU (translation), accuracy."""

from __future__ import annotations

from collections.abc import Sequence


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """ROUGE-1/2/L F1 (x100) with stemming, via ``rouge-score`` (pip install 'cbart[train]')."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeLsum": 0.0}
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)
        for name in totals:
            totals[name] += scores[name].fmeasure
    return {name: 100.0 * total / max(len(predictions), 1) for name, total in totals.items()}


def bleu(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU via ``sacrebleu`` (pip install 'cbart[train]')."""
    import sacrebleu

    return {"bleu": float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)}


def exact_match(predictions: Sequence[object], references: Sequence[object]) -> dict[str, float]:
    """Fraction of predictions equal to their reference, as a percentage."""
    hits = sum(p == r for p, r in zip(predictions, references, strict=True))
    return {"exact_match": 100.0 * hits / max(len(predictions), 1)}


def accuracy(predictions: Sequence[int], references: Sequence[int]) -> dict[str, float]:
    return {"accuracy": exact_match(predictions, references)["exact_match"]}


TEXT_METRICS = {"rouge": rouge, "bleu": bleu, "exact_match": exact_match}
