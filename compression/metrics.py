"""Task metrics used during evaluation: ROUGE (summarization), BLEU (translation), accuracy."""

from __future__ import annotations

import re
from collections.abc import Sequence

# A sentence ends at . ! or ? (optionally followed by closing quotes/brackets) before whitespace and
# the next sentence's first character; abbreviations like "U.S. officials" stay whole because the
# next character is lower case. This is what nltk's punkt does for summaries, without its download.
_SENTENCE_END = re.compile(r"""(?<=[.!?])["')\]]*\s+(?=["'(\[]?[A-Z0-9])""")


_ABBREVIATION = re.compile(r"(?:^|\s)(?:Mr|Mrs|Ms|Dr|Prof|St|Jr|Sr|Gen|Gov|Sen|Rep|Lt|Col|Capt|No|vs)\.$")


def split_sentences(text: str) -> list[str]:
    """Split a summary into sentences (newlines always split; then sentence-final punctuation)."""
    sentences: list[str] = []
    for line in text.splitlines():
        merge = False
        for part in _SENTENCE_END.split(line.strip()):
            if not part.strip():
                continue
            if merge:
                sentences[-1] += " " + part.strip()
            else:
                sentences.append(part.strip())
            merge = bool(_ABBREVIATION.search(sentences[-1]))
    return sentences


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """ROUGE-1/2/Lsum F1 (x100) with stemming, via ``rouge-score`` (pip install 'cbart[train]').

    ROUGE-Lsum is computed over sentences, which ``rouge-score`` reads as lines. Generated
    summaries contain no newlines, so both sides are split into sentences first -- as
    transformers' ``run_summarization`` does with nltk -- or Lsum silently degrades to ROUGE-L
    over one long "sentence" and is not comparable with published numbers.
    """
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeLsum": 0.0}
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score("\n".join(split_sentences(reference)), "\n".join(split_sentences(prediction)))
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
