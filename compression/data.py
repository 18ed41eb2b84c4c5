"""Datasets for training: local jsonl/csv files or HF ``datasets`` by name, tokenized and padded."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


def load_tokenizer(name_or_path: str | Path) -> Any:
    """``AutoTokenizer``, or a BART byte-level BPE from a bare ``vocab.json`` + ``merges.txt`` folder.

    A bare BPE folder (what the GPT-2/BART releases ship) has no config saying which tokenizer it
    is, so ``AutoTokenizer`` cannot build it; the BART tokenizer reads those two files directly.
    """
    from transformers import AutoTokenizer, BartTokenizer

    path = Path(name_or_path)
    bare = (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
    if bare and not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return BartTokenizer.from_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(name_or_path))


def load_records(
    source: str | Path, split: str = "train", subset: str | None = None, limit: int | None = None
) -> list[dict[str, Any]]:
    """Rows of a local ``.jsonl``/``.json``/``.csv`` file, or of a hub dataset ``name[:subset]``.

    Hub names need network access to the hub; local files work everywhere.
    """
    path = Path(source)
    if path.is_file():
        rows = _read_local(path)
    elif path.suffix in (".jsonl", ".json", ".csv") or path.is_dir():
        raise FileNotFoundError(f"data file {path} does not exist (expected a .jsonl, .json or .csv file)")
    else:
        rows = _read_hub(str(source), split, subset)
    if not rows:
        raise ValueError(f"{source} holds no rows")
    return rows[:limit] if limit else rows


def _read_local(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        return list(json.loads(text))
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number} is not valid JSON: {error}") from error
    return rows


def _read_hub(name: str, split: str, subset: str | None) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError as error:
        raise ImportError("loading hub datasets needs the `datasets` package: pip install 'cbart[train]'") from error
    return list(datasets.load_dataset(name, subset, split=split))


def column(rows: Sequence[dict[str, Any]], name: str) -> list[Any]:
    """One field of every row, with an error that lists the fields that do exist."""
    if name not in rows[0]:
        raise KeyError(f"field {name!r} not in the data; available fields: {sorted(rows[0])}")
    return [row[name] for row in rows]


@dataclass
class Example:
    """One tokenized example: source ids and either target ids (seq2seq) or a class label."""

    input_ids: list[int]
    labels: list[int] | int


def tokenize_seq2seq(
    rows: Sequence[dict[str, Any]],
    tokenizer: Any,
    source_field: str,
    target_field: str,
    max_source_length: int,
    max_target_length: int,
) -> list[Example]:
    sources = tokenizer(column(rows, source_field), truncation=True, max_length=max_source_length)["input_ids"]
    targets = tokenizer(column(rows, target_field), truncation=True, max_length=max_target_length)["input_ids"]
    return [Example(list(s), list(t)) for s, t in zip(sources, targets, strict=True)]


def tokenize_classification(
    rows: Sequence[dict[str, Any]], tokenizer: Any, text_field: str, label_field: str, max_source_length: int
) -> list[Example]:
    texts = tokenizer(column(rows, text_field), truncation=True, max_length=max_source_length)["input_ids"]
    return [Example(list(t), int(label)) for t, label in zip(texts, column(rows, label_field), strict=True)]


@dataclass
class Collator:
    """Pads a list of examples into tensors.

    ``pad_source_to`` fixes the source length (the ``paper`` autoencoder's BatchNorm runs over
    positions and is trained on sources padded to its max length). Target pads become -100 so
    the loss ignores them.
    """

    pad_token_id: int
    pad_source_to: int | None = None

    def __call__(self, batch: Sequence[Example]) -> dict[str, torch.Tensor]:
        width = self.pad_source_to or max(len(example.input_ids) for example in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, example in enumerate(batch):
            ids = example.input_ids[:width]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        tensors = {"input_ids": input_ids, "attention_mask": attention_mask}
        first = batch[0].labels
        if isinstance(first, int):
            tensors["labels"] = torch.tensor([example.labels for example in batch], dtype=torch.long)
        else:
            length = max(len(example.labels) for example in batch)  # type: ignore[arg-type]
            labels = torch.full((len(batch), length), -100, dtype=torch.long)
            for row, example in enumerate(batch):
                labels[row, : len(example.labels)] = torch.tensor(example.labels)  # type: ignore[arg-type]
            tensors["labels"] = labels
        return tensors
