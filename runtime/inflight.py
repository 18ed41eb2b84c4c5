"""In-flight (continuous) batching: requests join a running decoder batch at a step boundary and leave when
done (iteration-level scheduling, as Orca, TGI and TensorRT-LLM do).

With static batching a request that arrives one step after a batch started waits for the whole batch. Here
each step decodes the rows of every request in flight; a new request's encoder and cross-K/V run when it
joins. A request's ids are those it gets alone: its rows see only their own cache entries and positions
(``runtime.backends.ort_inflight``), and its tokens are chosen by its own settings and random generator.
Greedy search and sampling; beam search reorders rows and runs per request (``Seq2SeqRuntime.generate``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from cbart.runtime.generator import Seq2SeqRuntime
from cbart.runtime.search import DecodingRows, GenerationSettings, process_scores


@dataclass(eq=False)
class InflightRequest:
    """One request: a checked source (``Seq2SeqRuntime.token_ids``) and its resolved settings.

    ``on_token`` receives each step's new tokens, one per row (``num_return_sequences`` rows). Set
    ``cancelled`` from any thread: the request leaves at the next step boundary.
    """

    input_ids: list[int]
    settings: GenerationSettings
    on_token: Callable[[np.ndarray], None] | None = None
    cancelled: bool = False
    state: DecodingRows | None = field(default=None, init=False)

    @property
    def sequences(self) -> list[list[int]]:
        assert self.state is not None, "the request has not joined a batch"
        return self.state.sequences.tolist()


class InflightBatch:
    """The requests decoding together. Not thread-safe: one thread (a server's scheduler) owns it."""

    def __init__(self, runtime: Seq2SeqRuntime) -> None:
        inflight = getattr(runtime.backend, "inflight", None)
        if inflight is None:
            raise ValueError(
                f"in-flight batching runs on the onnxruntime backend, not {type(runtime.backend).__name__}"
            )
        self.runtime = runtime
        self.session = inflight()
        self.requests: list[InflightRequest] = []

    @property
    def rows(self) -> int:
        return sum(request.settings.num_return_sequences for request in self.requests)

    def join(self, requests: list[InflightRequest]) -> None:
        """Encode ``requests`` (one encoder batch) and add their rows to the batch."""
        for request in requests:
            if request.settings.num_beams > 1:
                raise ValueError("in-flight batching decodes greedy search and sampling; run beam search alone")
        if not requests:
            return
        input_ids, mask = self.runtime._pad([request.input_ids for request in requests], truncation=False)
        encoded = self.runtime.backend.encode(input_ids, mask)
        rows = np.array([request.settings.num_return_sequences for request in requests], dtype=np.int64)
        self.session.join(encoded, rows)
        for request in requests:
            request.state = DecodingRows(request.settings.num_return_sequences, request.settings)
            self.requests.append(request)

    def step(self) -> list[InflightRequest]:
        """One decoder step for every row in flight; returns the requests that finished (or were cancelled)."""
        states = [request.state for request in self.requests]
        assert all(state is not None for state in states)
        tokens = np.concatenate([state.sequences[:, -1:] for state in states if state is not None])
        screen = self.session.screen
        screened = screen is not None and all(request.settings.screenable for request in self.requests)
        if screened:
            approximate, hidden, residual = self.session.step_screened(tokens)
        else:
            logits = self.session.step(tokens)
        start = 0
        for request in self.requests:
            state = request.state
            assert state is not None
            rows = slice(start, start + len(state.sequences))
            start = rows.stop
            if screened:
                assert screen is not None
                masked = process_scores(approximate[rows], state.sequences, request.settings, owned=True)
                scores = screen.refine(masked, hidden[rows], residual[rows])
            else:
                scores = process_scores(logits[rows], state.sequences, request.settings)
            new = state.advance(scores)
            if request.on_token is not None:
                request.on_token(new)
        return self.leave()

    def leave(self) -> list[InflightRequest]:
        """Drop finished and cancelled requests (and their rows); return them."""
        kept: list[InflightRequest] = []
        left: list[InflightRequest] = []
        rows: list[int] = []
        start = 0
        for request in self.requests:
            state = request.state
            assert state is not None
            count = len(state.sequences)
            if state.done or request.cancelled:
                left.append(request)
            else:
                kept.append(request)
                rows.extend(range(start, start + count))
            start += count
        if left:
            self.session.keep(np.array(rows, dtype=np.int64))
            self.requests = kept
        return left
