"""The real data of the quality benchmark: Multi30k En->De and AG News from ``../shared/data``.

Everything is tokenized with the real BART BPE tokenizer. Models train on a *trimmed* vocabulary:
only the BPE ids the training data uses (~13.5k of 50k), as small-scale MT setups do; this makes
the embedding and LM head ~4x cheaper. Ids the training data never uses map to ``<unk>``.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("CBART_SHARED_DATA", ROOT.parent / "shared" / "data"))
MAX_SOURCE_TOKENS = 128
MAX_TARGET_TOKENS = 128


def shared_file(*parts: str) -> Path:
    """A file under the shared data folder, with an error that says how to point at it."""
    path = SHARED.joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the quality benchmark reads ../shared/data (set CBART_SHARED_DATA)")
    return path


def load_tokenizer() -> Any:
    from transformers import BartTokenizer

    return BartTokenizer.from_pretrained(str(shared_file("tokenizer", "bart", "vocab.json").parent))


@dataclass(frozen=True)
class TrimmedVocabulary:
    """Maps the tokenizer's ids to a dense range over the ids the training data uses.

    Special tokens keep their ids (they are the smallest), so a model's ``pad``/``eos``/``bos`` ids
    are the tokenizer's. Ids outside the kept set map to ``unk``.
    """

    kept: tuple[int, ...]
    unk: int = 3

    @classmethod
    def from_examples(cls, examples: Sequence[Any], specials: Sequence[int], unk: int = 3) -> TrimmedVocabulary:
        used = set(specials)
        for example in examples:
            used.update(example.input_ids)
            if isinstance(example.labels, list):
                used.update(example.labels)
        kept = tuple(sorted(used))
        if kept[: len(specials)] != tuple(sorted(specials)):
            raise ValueError(f"special ids {sorted(specials)} must be the smallest ids to keep their positions")
        return cls(kept, unk)

    @cached_property
    def _index(self) -> dict[int, int]:
        return {original: position for position, original in enumerate(self.kept)}

    def compact(self, ids: Sequence[int]) -> list[int]:
        return [self._index.get(i, self._index[self.unk]) for i in ids]

    def original(self, ids: Sequence[int]) -> list[int]:
        return [self.kept[i] for i in ids]


VOCABULARY_FILE = "trimmed-vocabulary.json"


def save_vocabulary(vocabulary: TrimmedVocabulary, work: Path) -> None:
    (work / VOCABULARY_FILE).write_text(json.dumps({"kept": vocabulary.kept, "unk": vocabulary.unk}))


def read_vocabulary(work: Path) -> TrimmedVocabulary:
    """The trimmed vocabulary the models in ``work`` were trained on (their token ids index it)."""
    fields = json.loads((work / VOCABULARY_FILE).read_text())
    return TrimmedVocabulary(tuple(fields["kept"]), fields["unk"])


@dataclass
class TranslationData:
    """Multi30k En->De: tokenized splits on the trimmed vocabulary, and raw German references."""

    tokenizer: Any
    vocabulary: TrimmedVocabulary
    train: list[Any]
    validation: list[Any]
    test: list[Any]
    validation_references: list[str]
    test_references: list[str]

    def generate(self, split: str, batch: int, generate: Callable[[list[Any]], list[list[int]]]) -> list[list[int]]:
        """``generate(examples)`` over a split in length-sorted batches; the outputs in split order.

        Sorting by length keeps padding (and wasted decoder rows) small; the order is restored after.
        """
        examples = getattr(self, split)
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
        outputs: dict[int, list[int]] = {}
        for start in range(0, len(order), batch):
            rows = order[start : start + batch]
            outputs.update(zip(rows, generate([examples[i] for i in rows]), strict=True))
        return [outputs[i] for i in range(len(examples))]

    def translate(self, split: str, batch: int, generate: Callable[[list[Any]], list[list[int]]]) -> list[str]:
        """Detokenized outputs of ``generate(examples)`` over a split, in split order (see ``generate``)."""
        return self.decode(self.generate(split, batch, generate))

    def decode(self, sequences: Sequence[Sequence[int]]) -> list[str]:
        """Detokenized text of generated (trimmed-vocabulary) ids, as sacreBLEU expects."""
        return [
            text.strip()
            for text in self.tokenizer.batch_decode(
                [self.vocabulary.original(ids) for ids in sequences], skip_special_tokens=True
            )
        ]


def load_multi30k(
    train_rows: int | None = None, eval_rows: int | None = None, vocabulary: TrimmedVocabulary | None = None
) -> TranslationData:
    """Train (29k), validation (1,014; model selection) and test_2016_flickr (1,000; reported).

    ``vocabulary`` maps onto an existing model's trimmed vocabulary instead of deriving one.
    """
    from cbart.compression.data import Example, load_records, tokenize_seq2seq

    tokenizer = load_tokenizer()

    def split(name: str, limit: int | None) -> tuple[list[Example], list[str]]:
        rows = load_records(shared_file("multi30k", name), limit=limit)
        examples = tokenize_seq2seq(rows, tokenizer, "source", "target", MAX_SOURCE_TOKENS, MAX_TARGET_TOKENS)
        return examples, [row["target"] for row in rows]

    train, _ = split("train.jsonl", train_rows)
    validation, validation_references = split("validation.jsonl", eval_rows)
    test, test_references = split("test_2016_flickr.jsonl", eval_rows)
    specials = [tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id]
    vocabulary = vocabulary or TrimmedVocabulary.from_examples(train, specials, tokenizer.unk_token_id)

    def compact(examples: list[Example]) -> list[Example]:
        return [Example(vocabulary.compact(e.input_ids), vocabulary.compact(e.labels)) for e in examples]

    return TranslationData(
        tokenizer,
        vocabulary,
        compact(train),
        compact(validation),
        compact(test),
        validation_references,
        test_references,
    )


@dataclass
class ClassificationData:
    """AG News (4 topics): the official test split is all that is shared, so it is split here."""

    train: list[Any]
    test: list[Any]
    vocabulary: TrimmedVocabulary
    labels: tuple[str, ...]


AG_NEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")


def stratified_split(labels: Sequence[int], test_per_class: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Row indices of a deterministic stratified train/test split (``test_per_class`` rows of each label in test)."""
    by_label: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_label.setdefault(label, []).append(index)
    rng = random.Random(seed)
    train: list[int] = []
    test: list[int] = []
    for label in sorted(by_label):
        rows = by_label[label][:]
        rng.shuffle(rows)
        if len(rows) <= test_per_class:
            raise ValueError(f"label {label} has only {len(rows)} rows; cannot hold out {test_per_class}")
        test += rows[:test_per_class]
        train += rows[test_per_class:]
    return sorted(train), sorted(test)


def load_ag_news(
    test_per_class: int = 400, max_tokens: int = MAX_SOURCE_TOKENS, limit: int | None = None
) -> ClassificationData:
    """AG News test.jsonl (7,600 rows), split stratified and seeded: 6,000 train / 1,600 test by default."""
    from cbart.compression.data import Example, load_records, tokenize_classification

    tokenizer = load_tokenizer()
    rows = load_records(shared_file("ag_news", "test.jsonl"))
    train_index, test_index = stratified_split([int(row["label"]) for row in rows], test_per_class)
    if limit:
        train_index, test_index = train_index[:limit], test_index[: max(limit // 4, 8)]
    examples = tokenize_classification(rows, tokenizer, "text", "label", max_tokens)
    specials = [tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id]
    train = [examples[i] for i in train_index]
    vocabulary = TrimmedVocabulary.from_examples(train, specials, tokenizer.unk_token_id)

    def compact(selected: list[Example]) -> list[Example]:
        return [Example(vocabulary.compact(e.input_ids), e.labels) for e in selected]

    return ClassificationData(compact(train), compact([examples[i] for i in test_index]), vocabulary, AG_NEWS_LABELS)
