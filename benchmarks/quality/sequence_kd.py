"""Sequence-level distillation data: the training sources with the base model's own translations as targets.

A draft for speculative decoding is accepted when it predicts the base model's *greedy* choices, so the
targets are the base's greedy outputs (Kim & Rush (2016) use beam outputs for quality; greedy ones are
what the verifier emits). They come from the base's fp32 export through the runtime -- fast and,
being the export's verified greedy ids, identical to ``model.generate()`` -- and are cached in the work folder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cbart.benchmarks.quality import evaluation
from cbart.benchmarks.quality.data import TranslationData
from cbart.benchmarks.quality.translation import MAX_NEW_TOKENS

CACHE = "base-train-greedy.json"
BATCH = 64


def as_labels(sequence: Sequence[int], decoder_start: int, pad: int) -> list[int]:
    """A generated sequence (decoder start, tokens, EOS, pads) in the layout of tokenized targets."""
    tokens = list(sequence[1:]) if sequence and sequence[0] == decoder_start else list(sequence)
    while tokens and tokens[-1] == pad:
        tokens.pop()
    return tokens


def base_translations(data: TranslationData, work: Path, threads: int) -> list[Any]:
    """``data.train`` with the base model's greedy translations as labels (computed once, then read)."""
    from cbart.compression.data import Example

    cache = work / CACHE
    if cache.is_file():
        labels = json.loads(cache.read_text())
    else:
        print(f"[seqkd] translating {len(data.train)} training sources with the base model", flush=True)
        runtime = evaluation.open_runtime(evaluation.export(work / "base", work / "exports" / "base-fp32"), threads)
        tokens = runtime.manifest.tokens

        def generate(examples: list[Any]) -> list[list[int]]:
            ids = [example.input_ids for example in examples]
            return runtime.generate(ids, max_new_tokens=MAX_NEW_TOKENS).sequences

        translations = data.generate("train", BATCH, generate)
        labels = [as_labels(sequence, tokens.decoder_start, tokens.pad) for sequence in translations]
        partial = cache.with_suffix(".partial")
        partial.write_text(json.dumps(labels))
        partial.replace(cache)
    if len(labels) != len(data.train):
        raise SystemExit(f"error: {cache} holds {len(labels)} targets for {len(data.train)} sources; delete it")
    return [Example(example.input_ids, label) for example, label in zip(data.train, labels, strict=True)]
