"""Logits processors and sampling warpers as named objects, one per generation rule.

They are built in one place, in a fixed order -- transformers' ``_get_logits_processor`` order, which the
token-exact contract with ``model.generate()`` depends on -- as CTranslate2's ``make_logits_processors``
does. ``runtime/cpp/src/processors.*`` mirrors the processors one to one (same names, same order), and a
test compares the lists both runtimes report for the same settings.

``masks_only``: the processor only sets scores to -inf or forces one token, never rescales them. That is
the condition under which a greedy step may read the screened LM head (``runtime/lm_head_screen.py``):
its refinement keeps the exact argmax of masked scores, not of rescaled ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np

if TYPE_CHECKING:
    from cbart.runtime.search import GenerationSettings

NEG_INF = np.float32(-np.inf)


class LogitsProcessor(Protocol):
    name: ClassVar[str]
    masks_only: ClassVar[bool]

    def __call__(self, scores: np.ndarray, sequences: np.ndarray) -> None:
        """Edit ``scores`` [rows, vocab] in place, given each row's tokens so far ``sequences`` [rows, length]."""
        ...


@dataclass(frozen=True)
class RepetitionPenalty:
    """Divides positive and multiplies negative scores of every token already generated (CTRL's penalty)."""

    penalty: float
    name: ClassVar[str] = "repetition_penalty"
    masks_only: ClassVar[bool] = False

    def __call__(self, scores: np.ndarray, sequences: np.ndarray) -> None:
        for row in range(scores.shape[0]):
            tokens = np.unique(sequences[row])
            values = scores[row, tokens]
            scores[row, tokens] = np.where(values < 0, values * self.penalty, values / self.penalty)


@dataclass(frozen=True)
class NoRepeatNGram:
    """Bans every token that would repeat an n-gram already in the row."""

    size: int
    name: ClassVar[str] = "no_repeat_ngram"
    masks_only: ClassVar[bool] = True

    def __call__(self, scores: np.ndarray, sequences: np.ndarray) -> None:
        size, cur_len = self.size, sequences.shape[1]
        if cur_len + 1 < size:
            return
        for row in range(scores.shape[0]):
            tokens = sequences[row].tolist()
            prefix = tuple(tokens[cur_len - size + 1 :])
            banned = [
                tokens[start + size - 1]
                for start in range(cur_len - size + 1)
                if tuple(tokens[start : start + size - 1]) == prefix
            ]
            if banned:
                scores[row, banned] = NEG_INF


@dataclass(frozen=True)
class MinLength:
    """Bans EOS while the sequence (decoder start included) is shorter than ``min_length``."""

    min_length: int
    eos: int
    name: ClassVar[str] = "min_length"
    masks_only: ClassVar[bool] = True

    def __call__(self, scores: np.ndarray, sequences: np.ndarray) -> None:
        if sequences.shape[1] < self.min_length:
            scores[:, self.eos] = NEG_INF


@dataclass(frozen=True)
class MinNewTokens:
    """Bans EOS until ``min_new_tokens`` tokens follow the decoder start token."""

    min_new_tokens: int
    eos: int
    name: ClassVar[str] = "min_new_tokens"
    masks_only: ClassVar[bool] = True

    def __call__(self, scores: np.ndarray, sequences: np.ndarray) -> None:
        if sequences.shape[1] - 1 < self.min_new_tokens:
            scores[:, self.eos] = NEG_INF


@dataclass(frozen=True)
class ForcedBOS:
    """The first generated token is ``token``."""

    token: int
    name: ClassVar[str] = "forced_bos"
    masks_only: ClassVar[bool] = True

    def __call__(self, scores: np.ndarray, sequences: np.ndarray) -> None:
        if sequences.shape[1] == 1:
            scores[:] = NEG_INF
            scores[:, self.token] = 0


@dataclass(frozen=True)
class ForcedEOS:
    """The last token the length limit allows is ``token``."""

    token: int
    max_length: int
    name: ClassVar[str] = "forced_eos"
    masks_only: ClassVar[bool] = True

    def __call__(self, scores: np.ndarray, sequences: np.ndarray) -> None:
        if sequences.shape[1] == self.max_length - 1:
            scores[:] = NEG_INF
            scores[:, self.token] = 0


def logits_processors(settings: GenerationSettings) -> list[LogitsProcessor]:
    """The processors ``settings`` switch on, in transformers' order."""
    processors: list[LogitsProcessor] = []
    if settings.repetition_penalty != 1.0:
        processors.append(RepetitionPenalty(settings.repetition_penalty))
    if settings.no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGram(settings.no_repeat_ngram_size))
    if settings.min_length > 0:
        processors.append(MinLength(settings.min_length, settings.eos_token_id))
    if settings.min_new_tokens > 0:
        processors.append(MinNewTokens(settings.min_new_tokens, settings.eos_token_id))
    if settings.forced_bos_token_id is not None:
        processors.append(ForcedBOS(settings.forced_bos_token_id))
    if settings.forced_eos_token_id is not None:
        processors.append(ForcedEOS(settings.forced_eos_token_id, settings.max_length))
    return processors


def masks_only(processors: list[LogitsProcessor]) -> bool:
    """Whether every processor only masks or forces tokens: the screened LM head may serve greedy steps."""
    return all(processor.masks_only for processor in processors)


@dataclass(frozen=True)
class Temperature:
    temperature: float
    name: ClassVar[str] = "temperature"
    masks_only: ClassVar[bool] = False

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        return scores / np.float32(self.temperature)


@dataclass(frozen=True)
class TopK:
    """Keeps the ``k`` best scores of each row."""

    k: int
    name: ClassVar[str] = "top_k"
    masks_only: ClassVar[bool] = True

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        k = min(self.k, scores.shape[-1])
        kth = np.partition(scores, -k, axis=-1)[:, -k][:, None]
        return np.where(scores < kth, NEG_INF, scores)


@dataclass(frozen=True)
class TopP:
    """Keeps the smallest set of best tokens whose probability reaches ``p`` (nucleus sampling)."""

    p: float
    name: ClassVar[str] = "top_p"
    masks_only: ClassVar[bool] = True

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        order = np.argsort(scores, axis=-1, kind="stable")
        ordered = np.take_along_axis(scores, order, axis=-1)
        shifted = np.exp(ordered - ordered.max(axis=-1, keepdims=True))
        cumulative = np.cumsum(shifted / shifted.sum(axis=-1, keepdims=True), axis=-1)
        remove = cumulative <= (1 - self.p)
        remove[:, -1] = False
        ordered = np.where(remove, NEG_INF, ordered)
        warped = np.empty_like(scores)
        np.put_along_axis(warped, order, ordered, axis=-1)
        return warped


Warper = Temperature | TopK | TopP


def sampling_warpers(settings: GenerationSettings) -> list[Warper]:
    """What sampling applies after the processors, in transformers' order (temperature, top-k, top-p)."""
    warpers: list[Warper] = []
    if settings.temperature != 1.0:
        warpers.append(Temperature(settings.temperature))
    if settings.top_k:
        warpers.append(TopK(settings.top_k))
    if settings.top_p < 1.0:
        warpers.append(TopP(settings.top_p))
    return warpers
