"""Text <-> ids for the runtime, from the tokenizer files stored in the export directory.

Uses the ``tokenizers`` library directly (``tokenizer.json``), so the runtime needs neither torch
nor transformers.
"""

from __future__ import annotations

from pathlib import Path

from cbart.runtime.manifest import ExportDirectoryError
from tokenizers import Tokenizer


class TextTokenizer:
    def __init__(self, path: Path) -> None:
        file = path / "tokenizer.json"
        if not file.is_file():
            raise ExportDirectoryError(
                f"{path} has no tokenizer.json; export with a tokenizer (the checkpoint's tokenizer files or "
                "`cbart export --tokenizer DIR`) or pass token ids instead of text"
            )
        self._tokenizer = Tokenizer.from_file(str(file))

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self._tokenizer.encode_batch(texts)]

    def decode(self, sequences: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        return self._tokenizer.decode_batch(sequences, skip_special_tokens=skip_special_tokens)
