"""Speculative decoding: a cheap draft decoder proposes tokens, the full decoder verifies them.

A compressed model is built on its base model's frozen encoder, so one encoder pass serves both
decoders. Each iteration the draft proposes ``k`` tokens, one step each; the full decoder then reads
the last accepted token and the ``k`` proposals in *one* step (its step graph takes several new tokens
under a causal mask) and yields its own choice at every one of those ``k + 1`` positions.

Greedy (``speculative_greedy``): the full model's argmax is appended for as long as it equals the
proposal, plus its choice at the first disagreement. Every appended token is therefore the full model's
greedy token after the full model's own prefix: the output is exactly plain greedy decoding with the
full model, whatever the draft proposes; the draft only decides how many tokens one full-decoder call
yields. Sampling (``speculative_sample``): proposals are accepted or resampled so that every kept token
is distributed as the full model's sampling distribution (see ``_SampledChoice``).

Rows of a batch advance in lockstep (by the shortest accepted run among them), so the caches keep one
length for all rows; rows that accepted more keep their accepted tokens, which are the full model's too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
from cbart.runtime.lm_head_screen import LogitScreen
from cbart.runtime.search import (
    DecoderSession,
    GenerationSettings,
    process_scores,
    sample_tokens,
    sampling_distribution,
)


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


class _GreedyChoice:
    """Greedy speculation: the draft proposes its argmax; the full model's argmax decides every position.

    The screen (the full session's screened LM head) needs every processor to mask or force tokens only
    (``settings.screenable``). It pays for a plain step (k = 0) and a one-token probe (k = 1, where at most two
    positions are refined): at bart-base shapes a failed probe then costs the draft step plus ~2 ms instead
    of ~8 ms. Over longer runs the exact head reads its weights once for all k + 1 positions, cheaper than
    refining each position's candidates.
    """

    def __init__(self, full: VerifyingSession, settings: GenerationSettings) -> None:
        self.settings = settings
        screened = isinstance(full, ScreenedVerifyingSession) and settings.screenable
        self.screen: LogitScreen | None = full.screen if screened else None  # type: ignore[attr-defined]

    def propose(self, scores: np.ndarray) -> np.ndarray:
        return scores.argmax(axis=-1)

    def verify(self, full: VerifyingSession, tokens: np.ndarray) -> None:
        """One full-decoder call over ``tokens`` [rows, k + 1]: the last accepted token and k proposals."""
        self.screened = self.screen is not None and tokens.shape[1] <= 2
        if self.screened:
            self.logits, self.hidden, self.residual = full.step_all_screened(tokens)  # type: ignore[attr-defined]
        else:
            self.logits = full.step_all(tokens)

    def choose(self, position: int, prefix: np.ndarray, proposed: np.ndarray | None) -> np.ndarray:
        """The full model's token after ``prefix`` [rows, length], from the logits of ``position``."""
        scores = process_scores(self.logits[:, position], prefix, self.settings, owned=True)
        if self.screened:
            assert self.screen is not None
            scores = self.screen.refine(scores, self.hidden[:, position], self.residual[:, position])
        return scores.argmax(axis=-1).astype(np.int64)


class _SampledChoice:
    """Speculative sampling (Leviathan et al. 2023, Chen et al. 2023): the draft samples each proposal ``x``
    from its own distribution ``q``; the full model keeps ``x`` with probability min(1, p(x) / q(x)) and
    otherwise samples from the residual max(0, p - q), renormalised. Either way the kept token is
    distributed exactly as ``p`` -- the full model's sampling distribution (processors, then temperature,
    top-k, top-p) after its prefix -- so the output is distributed as plain sampling with the full model.
    """

    def __init__(self, settings: GenerationSettings, rng: np.random.Generator) -> None:
        self.settings = settings
        self.rng = rng
        self.proposing: list[np.ndarray] = []  # q at each proposal of the current iteration

    def propose(self, scores: np.ndarray) -> np.ndarray:
        q = sampling_distribution(scores, self.settings)
        self.proposing.append(q)
        return sample_tokens(q, self.rng)

    def verify(self, full: VerifyingSession, tokens: np.ndarray) -> None:
        self.logits = full.step_all(tokens)
        self.q, self.proposing = self.proposing, []

    def choose(self, position: int, prefix: np.ndarray, proposed: np.ndarray | None) -> np.ndarray:
        scores = process_scores(self.logits[:, position], prefix, self.settings, owned=True)
        p = sampling_distribution(scores, self.settings)
        if proposed is None:  # past the last proposal: the full model's own sample
            return sample_tokens(p, self.rng)
        q = self.q[position]
        rows = np.arange(len(proposed))
        p_x, q_x = p[rows, proposed], q[rows, proposed]
        ratio = np.divide(p_x, q_x, out=np.ones_like(p_x), where=q_x > 0)  # q_x = 0 only on finished rows
        keep = self.rng.random(len(rows)) < ratio
        tokens = proposed.astype(np.int64)
        if not keep.all():
            residual = np.maximum(p[~keep] - q[~keep], 0.0)
            total = residual.sum(axis=-1, keepdims=True)
            # total = 0 only when p equals q, where the proposal is always kept; guard rounding anyway
            residual = np.where(total > 0, residual / np.where(total > 0, total, 1.0), p[~keep])
            tokens[~keep] = sample_tokens(residual, self.rng)
        return tokens


_Choice = _GreedyChoice | _SampledChoice


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
        raise ValueError("speculative_greedy is greedy: drop do_sample / num_beams > 1, or use speculative_sample")
    return _speculate(full, draft, rows, settings, _GreedyChoice(full, settings), draft_length, on_step)


def speculative_sample(
    full: VerifyingSession,
    draft: VerifyingSession,
    rows: int,
    settings: GenerationSettings,
    draft_length: DraftLength | None = None,
    on_step: Callable[[np.ndarray], None] | None = None,
) -> tuple[np.ndarray, SpeculationStats]:
    """Token ids [rows, length] distributed as sampling with the full model (``settings.seed`` seeds it)."""
    if not settings.do_sample or settings.num_beams > 1:
        raise ValueError("speculative_sample samples: set do_sample=True with num_beams=1, or use speculative_greedy")
    choice = _SampledChoice(settings, np.random.default_rng(settings.seed))
    return _speculate(full, draft, rows, settings, choice, draft_length, on_step)


def _speculate(
    full: VerifyingSession,
    draft: VerifyingSession,
    rows: int,
    settings: GenerationSettings,
    choice: _Choice,
    draft_length: DraftLength | None,
    on_step: Callable[[np.ndarray], None] | None,
) -> tuple[np.ndarray, SpeculationStats]:
    """The loop both share: draft ``k`` tokens, verify them in one full call, keep up to the first rejection."""
    controller = draft_length or DraftLength()
    stats = SpeculationStats()
    pad, eos = settings.pad_token_id, settings.eos_token_id
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
            tokens = np.where(proposing, choice.propose(scores), pad).astype(np.int64)
            proposing &= tokens != eos
            proposal = np.concatenate([proposal, tokens[:, None]], axis=1)
        drafted = time.perf_counter()
        choice.verify(full, proposal[:, length - 1 :])
        appended: list[np.ndarray] = []
        accepted = 0
        for position in range(k + 1):
            proposed = proposal[:, length + position] if position < k else None
            chosen = choice.choose(position, proposal[:, : length + position], proposed)
            tokens = np.where(unfinished, chosen, pad)
            appended.append(tokens)
            unfinished &= tokens != eos
            agrees = proposed is not None and np.array_equal(tokens, proposed)
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
