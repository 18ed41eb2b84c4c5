"""Search algorithms (greedy, beam search, sampling) and logits processors, written once in NumPy.

They drive any backend through :class:`DecoderSession` and reproduce transformers'
``generate()`` semantics -- processor order, length penalty, early stopping heuristics, padding
after EOS, output trimming -- so that fp32 graphs yield exactly the token ids of
``model.generate()``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol, runtime_checkable

import numpy as np
from cbart.runtime.lm_head_screen import LogitScreen
from cbart.runtime.processors import LogitsProcessor, logits_processors, masks_only, sampling_warpers

BIG_NEGATIVE = np.float32(-1.0e9)


class DecoderSession(Protocol):
    """The decoder state of one request batch, owned by a backend.

    Rows are grouped by source: with ``N`` sources and ``K`` rows per source, rows
    ``[n*K, (n+1)*K)`` decode source ``n`` (the cross-attention K/V is stored once per source).
    """

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Feed ``tokens`` [rows, 1]; return next-token logits [rows, vocab] (float32)."""
        ...

    def reorder(self, rows: np.ndarray) -> None:
        """Keep the self-attention cache of ``rows`` (beam search), in that order."""
        ...


@runtime_checkable
class ScreenedDecoderSession(DecoderSession, Protocol):
    """A session whose decoder can return approximate logits for :class:`LogitScreen` to make argmax-exact."""

    screen: LogitScreen

    def step_screened(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Feed ``tokens``; return approximate logits [rows, vocab] and ``refine``'s two [rows, width] inputs."""
        ...


@dataclass
class GenerationSettings:
    """transformers' generation parameters; lengths count the decoder start token, as there."""

    max_length: int
    eos_token_id: int
    pad_token_id: int
    decoder_start_token_id: int
    min_length: int = 0
    min_new_tokens: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    do_sample: bool = False
    top_k: int = 50
    top_p: float = 1.0
    temperature: float = 1.0
    num_return_sequences: int = 1
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None
    seed: int | None = None

    @cached_property
    def processors(self) -> list[LogitsProcessor]:
        """The logits processors these settings switch on, in transformers' order (``runtime.processors``)."""
        return logits_processors(self)

    @property
    def screenable(self) -> bool:
        """Greedy steps may read a screened LM head: no sampling, and every processor masks only."""
        return not self.do_sample and masks_only(self.processors)

    def validate(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"max_length must allow at least one new token, got {self.max_length}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise ValueError(
                f"num_return_sequences ({self.num_return_sequences}) cannot exceed num_beams ({self.num_beams})"
            )
        if self.num_beams == 1 and not self.do_sample and self.num_return_sequences > 1:
            raise ValueError("greedy search returns one sequence per input; use num_beams or do_sample")
        if self.do_sample and self.num_beams > 1:
            raise ValueError("beam sampling (do_sample with num_beams > 1) is not supported; pick one of them")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def process_scores(
    scores: np.ndarray, sequences: np.ndarray, settings: GenerationSettings, owned: bool = False
) -> np.ndarray:
    """Apply ``settings.processors`` in order, in place on a float32 copy.

    ``owned``: ``scores`` is a float32 array the caller hands over (log-probs it just computed), so
    the processors edit it directly instead of copying ~200 KB per row and step.
    """
    if not (owned and scores.dtype == np.float32):
        scores = np.array(scores, dtype=np.float32, copy=True)
    for processor in settings.processors:
        processor(scores, sequences)
    return scores


def sampling_distribution(scores: np.ndarray, settings: GenerationSettings) -> np.ndarray:
    """The distribution sampling draws from [rows, vocab] (float64, rows sum to 1): processed scores, warped."""
    for warper in sampling_warpers(settings):
        scores = warper(scores)
    probabilities = _softmax(scores).astype(np.float64)
    return probabilities / probabilities.sum(axis=-1, keepdims=True)


def sample_tokens(probabilities: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One token per row of ``probabilities`` [rows, vocab]."""
    return np.array([rng.choice(len(p), p=p) for p in probabilities], dtype=np.int64)


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """A new float32 array; shifted and normalised in place, so a beam step makes one temporary, not three."""
    scores = np.array(logits, dtype=np.float32, copy=True)
    scores -= scores.max(axis=-1, keepdims=True)
    scores -= np.log(np.exp(scores).sum(axis=-1, keepdims=True))
    return scores


class TokenChoice:
    """One token per row from processed scores, kept apart from the search loop that produces the scores:
    the argmax (greedy), or a draw from the warped distribution (sampling, seeded by ``settings.seed``)."""

    def __init__(self, settings: GenerationSettings) -> None:
        self.settings = settings
        self.rng = np.random.default_rng(settings.seed)

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        if self.settings.do_sample:
            return sample_tokens(sampling_distribution(scores, self.settings), self.rng)
        return scores.argmax(axis=-1).astype(np.int64)


class DecodingRows:
    """The rows of greedy search or sampling: their tokens so far, which are still open, and how each next
    token is chosen. ``greedy_or_sample`` drives one batch of them; ``runtime.inflight`` one per request."""

    def __init__(self, rows: int, settings: GenerationSettings) -> None:
        self.settings = settings
        self.choose = TokenChoice(settings)
        self.sequences = np.full((rows, 1), settings.decoder_start_token_id, dtype=np.int64)
        self.unfinished = np.ones(rows, dtype=bool)

    def advance(self, scores: np.ndarray) -> np.ndarray:
        """Append one token per row chosen from processed ``scores`` (pad once a row has ended); return them."""
        tokens = np.where(self.unfinished, self.choose(scores), self.settings.pad_token_id)
        self.sequences = np.concatenate([self.sequences, tokens[:, None]], axis=1)
        self.unfinished &= tokens != self.settings.eos_token_id
        return tokens

    @property
    def done(self) -> bool:
        return not self.unfinished.any() or self.sequences.shape[1] >= self.settings.max_length


def greedy_or_sample(
    session: DecoderSession,
    rows: int,
    settings: GenerationSettings,
    on_step: Callable[[np.ndarray], None] | None = None,
) -> np.ndarray:
    """Greedy search or multinomial sampling; ``on_step`` receives each new column of tokens."""
    state = DecodingRows(rows, settings)
    # The screen needs every processor to mask or force tokens only (settings.screenable).
    screened = session if isinstance(session, ScreenedDecoderSession) and settings.screenable else None
    while True:
        if screened is not None:
            approximate, hidden, residual = screened.step_screened(state.sequences[:, -1:])
            masked = process_scores(approximate, state.sequences, settings, owned=True)
            scores = screened.screen.refine(masked, hidden, residual)
        else:
            scores = process_scores(session.step(state.sequences[:, -1:]), state.sequences, settings)
        tokens = state.advance(scores)
        if on_step is not None:
            on_step(tokens)
        if state.done:
            return state.sequences


def _top_k(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Descending top-k along the last axis of a 2-D array; ties keep the lower index first.

    ``np.partition`` finds the k-th largest value in linear time; everything above it plus the lowest
    indices equal to it are exactly the entries a stable full sort would put first.
    """
    rows, count = values.shape
    if k >= count:
        order = np.argsort(-values, axis=-1, kind="stable")[:, :k]
        return np.take_along_axis(values, order, axis=-1), order
    chosen = np.empty((rows, k), dtype=np.int64)
    for row in range(rows):
        line = values[row]
        kth = np.partition(line, count - k)[count - k]
        greater = np.flatnonzero(line > kth)
        candidates = np.concatenate([greater, np.flatnonzero(line == kth)[: k - len(greater)]])
        chosen[row] = candidates[np.argsort(-line[candidates], kind="stable")]
    return np.take_along_axis(values, chosen, axis=-1), chosen


def _gather(values: np.ndarray, indices: np.ndarray) -> np.ndarray:
    return np.take_along_axis(values, indices.reshape(indices.shape + (1,) * (values.ndim - 2)), axis=1)


@dataclass
class BeamState:
    """transformers' beam search state: per source, ``num_beams`` running and ``num_beams`` finished
    hypotheses with their scores and the flattened beam index each step came from (-1: none)."""

    running: np.ndarray  # [sources, beams, max_length]
    running_scores: np.ndarray  # [sources, beams]
    running_indices: np.ndarray  # [sources, beams, max_length - 1]
    finished: np.ndarray
    finished_scores: np.ndarray
    finished_indices: np.ndarray
    is_finished: np.ndarray  # [sources, beams]
    improvable: np.ndarray  # [sources, 1]: the early-stop heuristic has not closed the source
    cur_len: int = 1

    @classmethod
    def start(cls, sources: int, settings: GenerationSettings) -> BeamState:
        beams, max_length = settings.num_beams, settings.max_length
        fill = settings.pad_token_id if settings.pad_token_id else settings.eos_token_id
        running = np.full((sources, beams, max_length), fill, dtype=np.int64)
        running[:, :, 0] = settings.decoder_start_token_id
        running_scores = np.zeros((sources, beams), dtype=np.float32)
        running_scores[:, 1:] = BIG_NEGATIVE  # all beams start identical: only the first may continue
        indices = np.full((sources, beams, max_length - 1), -1, dtype=np.int64)
        return cls(
            running=running,
            running_scores=running_scores,
            running_indices=indices,
            finished=running.copy(),
            finished_scores=np.full((sources, beams), BIG_NEGATIVE, dtype=np.float32),
            finished_indices=indices.copy(),
            is_finished=np.zeros((sources, beams), dtype=bool),
            improvable=np.ones((sources, 1), dtype=bool),
        )


@dataclass
class Continuations:
    """The ``2 * num_beams`` best one-token continuations of each source's running beams."""

    scores: np.ndarray  # [sources, keep] summed log-probs
    sequences: np.ndarray  # [sources, keep, max_length]
    indices: np.ndarray  # [sources, keep, max_length - 1]
    hits: np.ndarray  # [sources, keep]: ends here (EOS or max_length)


# The named steps of one beam search iteration, in order; runtime/cpp/src/search.cpp has the same
# functions, called in the same order (tests/test_search_steps.py compares the two).
BEAM_STEPS = (
    "beam_log_probs",
    "top_k_continuations",
    "update_running_beams",
    "update_finished_beams",
    "check_early_stop_heuristic",
    "has_unfinished_sequences",
)


def beam_log_probs(session: DecoderSession, state: BeamState, settings: GenerationSettings) -> np.ndarray:
    """Step the decoder on each running beam's last token; processed log-probs plus the beam's score,
    flattened per source to [sources, beams * vocab]."""
    sources, beams, _ = state.running.shape
    flat = state.running[:, :, : state.cur_len].reshape(sources * beams, state.cur_len)
    log_probs = process_scores(log_softmax(session.step(flat[:, -1:])), flat, settings, owned=True)
    log_probs = log_probs.reshape(sources, beams, -1)
    log_probs += state.running_scores[:, :, None]
    return log_probs.reshape(sources, -1)


def top_k_continuations(state: BeamState, log_probs: np.ndarray, settings: GenerationSettings) -> Continuations:
    """Keep ``2 * num_beams`` candidates per source, so that ``num_beams`` remain after the ones that end."""
    beams, cur_len = settings.num_beams, state.cur_len
    vocab = log_probs.shape[-1] // beams
    scores, flat = _top_k(log_probs, 2 * beams)  # beams_to_keep = max(2, 1 + number of EOS ids) * num_beams
    from_beams, tokens = flat // vocab, flat % vocab
    sequences = _gather(state.running, from_beams)
    sequences[:, :, cur_len] = tokens
    indices = _gather(state.running_indices, from_beams)
    indices[:, :, cur_len - 1] = from_beams + (np.arange(len(flat)) * beams)[:, None]
    hits = (tokens == settings.eos_token_id) | (cur_len + 1 >= settings.max_length)
    return Continuations(scores, sequences, indices, hits)


def update_running_beams(state: BeamState, continuations: Continuations, beams: int) -> None:
    """The best ``num_beams`` continuations that did not end keep running."""
    masked = continuations.scores + continuations.hits.astype(np.float32) * BIG_NEGATIVE
    _, chosen = _top_k(masked, beams)
    state.running = _gather(continuations.sequences, chosen)
    state.running_scores = _gather(masked, chosen)
    state.running_indices = _gather(continuations.indices, chosen)


def update_finished_beams(state: BeamState, continuations: Continuations, settings: GenerationSettings) -> None:
    """Continuations that ended among the top ``num_beams`` compete, length-penalised, with the finished ones.

    A source's new candidates are refused when it already holds ``num_beams`` finished hypotheses under
    ``early_stopping=True``, or when the early-stop heuristic has closed it.
    """
    beams = settings.num_beams
    just_finished = continuations.hits & (np.arange(2 * beams) < beams)[None, :]
    new_tokens = state.cur_len  # the candidate's generated length: cur_len + 1 tokens less the start token
    candidate = continuations.scores / np.float32(new_tokens**settings.length_penalty)
    full = state.is_finished.all(axis=-1, keepdims=True) & (settings.early_stopping is True)
    candidate = candidate + full.astype(np.float32) * BIG_NEGATIVE
    candidate = candidate + (~state.improvable).astype(np.float32) * BIG_NEGATIVE
    candidate = candidate + (~just_finished).astype(np.float32) * BIG_NEGATIVE
    merged_scores = np.concatenate([state.finished_scores, candidate], axis=1)
    _, chosen = _top_k(merged_scores, beams)
    state.finished = _gather(np.concatenate([state.finished, continuations.sequences], axis=1), chosen)
    state.finished_scores = _gather(merged_scores, chosen)
    state.finished_indices = _gather(np.concatenate([state.finished_indices, continuations.indices], axis=1), chosen)
    state.is_finished = _gather(np.concatenate([state.is_finished, just_finished], axis=1), chosen)


def check_early_stop_heuristic(state: BeamState, settings: GenerationSettings) -> None:
    """Close a source once its best running beam, length-penalised, cannot beat its worst finished one.

    With ``early_stopping="never"`` and a positive length penalty, the running beam is credited with the
    longest length it could still reach (the canonical beam search); otherwise with its current length.
    """
    if settings.early_stopping == "never" and settings.length_penalty > 0.0:
        best_length = settings.max_length - 1
    else:
        best_length = state.cur_len - 1
    best_running = state.running_scores[:, :1] / np.float32(best_length**settings.length_penalty)
    worst_finished = np.where(state.is_finished, state.finished_scores.min(axis=1, keepdims=True), BIG_NEGATIVE)
    state.improvable &= (best_running > worst_finished).any(axis=-1, keepdims=True)


def has_unfinished_sequences(state: BeamState, continuations: Continuations, settings: GenerationSettings) -> bool:
    """Go on while some source can improve, ``early_stopping=True`` has not filled every source, and not
    every continuation ended."""
    filled = state.is_finished.all() and settings.early_stopping is True
    return bool(state.improvable.any()) and not filled and not continuations.hits.all()


def finalize_beams(state: BeamState, settings: GenerationSettings) -> np.ndarray:
    """The best ``num_return_sequences`` finished hypotheses per source, trimmed to the longest one."""
    sources, returned = state.finished.shape[0], settings.num_return_sequences
    sequences = state.finished[:, :returned].reshape(sources * returned, settings.max_length)
    indices = state.finished_indices[:, :returned].reshape(sources * returned, -1)
    generated = int((indices + 1).astype(bool).sum(axis=1).max())
    return sequences[:, : 1 + generated]


def beam_search(session: DecoderSession, sources: int, settings: GenerationSettings) -> np.ndarray:
    """transformers' vectorised beam search, step for step (see ``GenerationMixin._beam_search``): the
    ``BEAM_STEPS`` in order, the cache reordered to the surviving beams between them."""
    state = BeamState.start(sources, settings)
    while True:
        log_probs = beam_log_probs(session, state, settings)
        continuations = top_k_continuations(state, log_probs, settings)
        update_running_beams(state, continuations, settings.num_beams)
        update_finished_beams(state, continuations, settings)
        session.reorder(state.running_indices[:, :, state.cur_len - 1].reshape(-1))
        state.cur_len += 1
        check_early_stop_heuristic(state, settings)
        if not has_unfinished_sequences(state, continuations, settings):
            return finalize_beams(state, settings)
