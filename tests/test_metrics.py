"""Task metrics: ROUGE-Lsum over sentences (comparable with published numbers), sentence splitting."""

from __future__ import annotations

import pytest
from cbart.compression.metrics import rouge, split_sentences


def test_sentences_split_at_final_punctuation_but_not_inside_abbreviations() -> None:
    text = 'The U.S. team won. "It was great!" he said. Mr. Smith left? Yes.\nA new line'
    assert split_sentences(text) == [
        "The U.S. team won.",
        '"It was great!" he said.',
        "Mr. Smith left?",
        "Yes.",
        "A new line",
    ]
    assert split_sentences("Locke 's house was sold . Police said £ 2,100 was taken .") == [
        "Locke 's house was sold .",
        "Police said £ 2,100 was taken .",
    ]


def test_rouge_lsum_matches_sentences_by_hand_computed_union_lcs() -> None:
    # Reference sentences r1 = "the cat sat", r2 = "a dog ran"; the summary has them in the other order.
    # Lsum: LCS(r1, p2) = 3 and LCS(r2, p1) = 3 -> 6 of 6 tokens on both sides -> F1 = 100.
    # Without sentence splitting the LCS of the two 6-token strings is 3 -> F1 = 50 (what ROUGE-L gives).
    scores = rouge(["A dog ran. The cat sat."], ["The cat sat. A dog ran."])
    assert scores["rougeLsum"] == pytest.approx(100.0)
    assert scores["rouge1"] == pytest.approx(100.0)
    # rouge2: bigrams (the cat, cat sat, sat a, a dog, dog ran) vs (a dog, dog ran, ran the, the cat, cat sat):
    # 4 of 5 shared -> 80.
    assert scores["rouge2"] == pytest.approx(80.0)
