"""Speculative greedy decoding: a cheap draft decoder proposes tokens, the full decoder verifies them.

A compressed model is built on its base model's frozen encoder, so one encoder pass serves both
decoders. Each iteration the draft proposes ``k`` tokens greedily, one step each; the full decoder
then reads the last accepted token and the ``k`` proposals in *one* step (its step graph takes several
new tokens under a causal mask) and yields its own greedy choice at every one of those ``k + 1``
positions. The full model's choices are appended for as long as they equal the proposals, plus its
choice at the first disagreement. Every appended token is therefore the full model's greedy token
after the full model's own prefix: the output is exactly plain greedy decoding with the full model,
whatever the draft proposes; the draft only decides how many tokens one full-decoder call yields.

Rows of a batch advance in lockstep (by the shortest accepted run among them), so the caches keep one
length for all rows; rows that accepted more simply keep the full model's tokens, which equal the draft's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from runtime.lm_head_screen import LogitScreen
from runtime.search import DecoderSession, GenerationSettings, process_scores


@runtime_checkable
class VerifyingSession(DecoderSession, Protocol):
    """A decoder session that can score several new tokens at once and drop cache positions."""

    def step_all(self, tokens: np.ndarray) -> np.ndarray:
        """Feed ``tokens`` [rows, n]; return the logits at every new position [rows, n, vocab] (float32)."""
        ...

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions of the self-attention cache (rejected proposals are dropped)."""
        ...


@runtime_checkable
class ScreenedVerifyingSession(VerifyingSession, Protocol):
    """A verifying session over a screened LM head (see :class:`LogitScreen`)."""

    screen: LogitScreen

    def step_all_screened(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Approximate logits [rows, n, vocab] and ``refine``'s two inputs [rows, n, width]."""
        ...


@dataclass
class DraftLength:
    """How many tokens the draft proposes per verification, adapted to how many were accepted.

    All accepted: propose one more next time (up to ``maximum``). None accepted: one fewer. At zero the
    runtime decodes with the full model alone -- a draft that never agrees (random weights, a
    mismatched pair) then costs almost nothing -- and probes with one draft token after
    ``probe_interval`` plain steps, doubling the interval (up to ``max_probe_interval``) after each
    failed probe. ``adaptive=False`` always proposes ``start`` tokens.
    """

    start: int = 2
    maximum: int = 8
    adaptive: bool = True
    probe_interval: int = 4
    max_probe_interval: int = 64
    current: int = field(init=False)
    _wait: int = field(init=False, default=0)
    _interval: int = field(init=False)

    def __post_init__(self) -> None:
        if not 1 <= self.start <= self.maximum:
            raise ValueError(f"the draft length must be between 1 and {self.maximum}, got {self.start}")
        self.current = self.start
        self._interval = self.probe_interval

    def propose(self) -> int:
        """Draft tokens for the next iteration (0: a plain full-decoder step)."""
        if self.current > 0:
            return self.current
        if self._wait > 0:
            self._wait -= 1
            return 0
        return 1

    def update(self, proposed: int, accepted: int) -> None:
        if not self.adaptive or proposed == 0:
            return
        if accepted == proposed:
            self.current = min(proposed + 1, self.maximum)
            self._interval = self.probe_interval
        elif accepted == 0:
            self.current = proposed - 1
            if self.current == 0:
                self._wait = self._interval
                self._interval = min(2 * self._interval, self.max_probe_interval)
        else:
            self.current = proposed


@dataclass
class SpeculationStats:
    """What the draft bought (proposals made and accepted, tokens per full-decoder call) and what it cost.

    ``draft_s`` is the time spent proposing, ``verify_s`` the full decoder's calls and choosing its tokens.
    """

    full_calls: int = 0
    draft_calls: int = 0
    proposed: int = 0
    accepted: int = 0
    steps: int = 0
    draft_s: float = 0.0
    verify_s: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_full_call(self) -> float:
        return self.steps / self.full_calls if self.full_calls else 0.0

    def to_dict(self) -> dict[str, float]:
        return {
            "full_calls": self.full_calls,
            "draft_calls": self.draft_calls,
            "proposed": self.proposed,
            "accepted": self.accepted,
            "steps": self.steps,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "tokens_per_full_call": round(self.tokens_per_full_call, 4),
            "draft_s": round(self.draft_s, 4),
            "verify_s": round(self.verify_s, 4),
        }


class _FullChoices:
    """The full model's greedy choice at each verified position, computed only up to the first rejection.

    ``screen``: the session's screened LM head, usable when every processor only masks or forces tokens.
    """

    def __init__(
        self, session: VerifyingSession, tokens: np.ndarray, settings: GenerationSettings, screen: LogitScreen | None
    ) -> None:
        self.settings = settings
        self.screen = screen
        if screen is not None:
            self.logits, self.hidden, self.residual = session.step_all_screened(tokens)  # type: ignore[attr-defined]
        else:
            self.logits = session.step_all(tokens)

    def at(self, position: int, prefix: np.ndarray) -> np.ndarray:
        """The full model's token after ``prefix`` [rows, length], from the logits of ``position``."""
        scores = process_scores(self.logits[:, position], prefix, self.settings, owned=True)
        if self.screen is not None:
            scores = self.screen.refine(scores, self.hidden[:, position], self.residual[:, position])
        return scores.argmax(axis=-1).astype(np.int64)


def speculative_greedy(
    full: VerifyingSession,
    draft: VerifyingSession,
    rows: int,
    settings: GenerationSettings,
    draft_length: DraftLength | None = None,
    on_step: Callable[[np.ndarray], None] | None = None,
) -> tuple[np.ndarray, SpeculationStats]:
    """The full model's greedy token ids [rows, length], ``full`` verifying what ``draft`` proposes."""
    if settings.do_sample or settings.num_beams > 1:
        raise ValueError("speculative decoding is greedy: drop do_sample / num_beams > 1, or drop speculative")
    controller = draft_length or DraftLength()
    stats = SpeculationStats()
    pad, eos = settings.pad_token_id, settings.eos_token_id
    # The screen needs every processor to mask or force tokens only: no repetition penalty. It pays for
    # one position (a plain step at k = 0); over k + 1 positions the exact head reads its weights once
    # for all of them, cheaper than refining each position's candidates.
    screened = isinstance(full, ScreenedVerifyingSession) and settings.repetition_penalty == 1.0
    screen = full.screen if screened else None  # type: ignore[attr-defined]
    sequences = np.full((rows, 1), settings.decoder_start_token_id, dtype=np.int64)
    unfinished = np.ones(rows, dtype=bool)
    draft_fed = 0  # tokens of ``sequences`` in the draft's cache; the full cache always holds all but the last
    while True:
        length = sequences.shape[1]
        k = min(controller.propose(), settings.max_length - length - 1)
        started = time.perf_counter()
        proposal = sequences
        proposing = unfinished.copy()
        for _ in range(k):
            logits = draft.step(proposal[:, draft_fed:])
            draft_fed = proposal.shape[1]
            scores = process_scores(logits, proposal, settings, owned=True)
            tokens = np.where(proposing, scores.argmax(axis=-1), pad).astype(np.int64)
            proposing &= tokens != eos
            proposal = np.concatenate([proposal, tokens[:, None]], axis=1)
        drafted = time.perf_counter()
        choices = _FullChoices(full, proposal[:, length - 1 :], settings, screen if k == 0 else None)
        appended: list[np.ndarray] = []
        accepted = 0
        for position in range(k + 1):
            tokens = np.where(unfinished, choices.at(position, proposal[:, : length + position]), pad)
            appended.append(tokens)
            unfinished &= tokens != eos
            agrees = position < k and np.array_equal(tokens, proposal[:, length + position])
            accepted += int(agrees)
            if not agrees or not unfinished.any():
                break
        new = np.stack(appended, axis=1)
        sequences = np.concatenate([sequences, new], axis=1)
        stats.draft_s += drafted - started
        stats.verify_s += time.perf_counter() - drafted
        if on_step is not None:
            for column in new.T:
                on_step(column)
        stats.full_calls += 1
        stats.draft_calls += k
        stats.proposed += k
        stats.accepted += accepted
        stats.steps += new.shape[1]
        controller.update(k, accepted)
        kept = sequences.shape[1] - 1
        if length + k > kept:  # the full cache holds the proposals' positions; drop the rejected ones
            full.truncate(kept)
        if draft_fed > kept:
            draft.truncate(kept)
            draft_fed = kept
        if not unfinished.any() or sequences.shape[1] >= settings.max_length:
            return sequences, stats
