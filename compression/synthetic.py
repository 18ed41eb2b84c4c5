"""A built-in synthetic seq2seq task, so the whole pipeline runs with no download.

The task is sequence reversal over a small symbol alphabet: it needs real cross-attention
(every output position reads a different source position), so a compressed memory that loses
information shows up directly as a drop in exact match.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from cbart.compression.data import Example
from transformers import BartConfig

BOS, PAD, EOS, UNK = 0, 1, 2, 3
FIRST_SYMBOL = 4


@dataclass(frozen=True)
class ReversalTask:
    symbols: int = 12
    min_length: int = 3
    max_length: int = 8

    @property
    def vocab_size(self) -> int:
        return FIRST_SYMBOL + self.symbols

    @property
    def max_source_tokens(self) -> int:
        return self.max_length + 2

    def sample(self, count: int, seed: int) -> list[Example]:
        rng = random.Random(seed)
        examples = []
        for _ in range(count):
            length = rng.randint(self.min_length, self.max_length)
            body = [rng.randrange(FIRST_SYMBOL, self.vocab_size) for _ in range(length)]
            examples.append(Example([BOS, *body, EOS], [BOS, *reversed(body), EOS]))
        return examples

    def base_config(self, width: int = 64, ffn: int = 128, layers: int = 2, heads: int = 4) -> BartConfig:
        """A small BART for this task (positions sized to the task, so the paper AE pads little)."""
        return BartConfig(
            vocab_size=self.vocab_size,
            d_model=width,
            encoder_layers=layers,
            decoder_layers=layers,
            encoder_attention_heads=heads,
            decoder_attention_heads=heads,
            encoder_ffn_dim=ffn,
            decoder_ffn_dim=ffn,
            max_position_embeddings=self.max_source_tokens + 6,
            dropout=0.0,
            attention_dropout=0.0,
            bos_token_id=BOS,
            pad_token_id=PAD,
            eos_token_id=EOS,
            decoder_start_token_id=EOS,
            forced_eos_token_id=EOS,
        )


def strip_specials(ids: list[int]) -> list[int]:
    """Generated ids without BOS/EOS/PAD, to compare with a reference body."""
    return [token for token in ids if token >= FIRST_SYMBOL]
