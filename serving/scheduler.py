"""The server's one decoding thread: a bounded queue of jobs in front of the runtime.

Three policies (``BATCHING``):
- ``inflight``: requests join the running decoder batch at the next step and leave when done
  (``runtime.inflight``); beam-search requests run alone between steps. Needs an ``--inflight`` export.
- ``static``: the requests waiting when a batch starts, grouped by identical parameters, run as one
  ``generate()`` call; a request arriving a step later waits for the whole batch.
- ``none``: one request at a time.

The queue is bounded: when it is full, ``submit`` raises ``Overloaded`` at once (the server answers 503 with
``Retry-After``) instead of letting waiting time grow without limit. Jobs past their deadline and jobs
whose client went away are dropped at the next step boundary, freeing their rows.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cbart.runtime.generator import Seq2SeqRuntime
from cbart.runtime.inflight import InflightBatch, InflightRequest
from cbart.runtime.search import GenerationSettings
from cbart.serving.config import BATCHING
from cbart.serving.metrics import ServingMetrics


class Overloaded(RuntimeError):
    """The queue is full; retry later."""


class JobTimeout(TimeoutError):
    """The job passed its deadline before it finished."""


@dataclass(eq=False)
class Job:
    """One input of a request. ``on_token`` (any thread may be the caller's) receives each step's tokens, one per
    row; ``future`` resolves to the rows' token ids."""

    input_ids: list[int]
    settings: GenerationSettings
    parameters: dict[str, Any]
    deadline: float | None = None
    on_token: Callable[[np.ndarray], None] | None = None
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    future: Future = field(default_factory=Future)
    cancelled: bool = False

    def cancel(self) -> None:
        """The client went away: drop the job at the next step boundary."""
        self.cancelled = True

    def tokens(self, tokens: np.ndarray) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter()
        if self.on_token is not None:
            self.on_token(tokens)

    @property
    def expired(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline


class Scheduler:
    def __init__(
        self, runtime: Seq2SeqRuntime, batching: str, max_rows: int, max_queue: int, metrics: ServingMetrics
    ) -> None:
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {', '.join(BATCHING)}, got {batching!r}")
        self.runtime = runtime
        self.batching, self.max_rows, self.max_queue = batching, max_rows, max_queue
        self.metrics = metrics
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.batch = InflightBatch(runtime) if batching == "inflight" else None
        self._jobs: dict[int, Job] = {}  # in-flight request id -> job
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cbart-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish queued and in-flight jobs, then stop (graceful shutdown)."""
        self._stopping.set()
        self._thread.join(timeout)

    def submit(self, job: Job) -> Job:
        if self._stopping.is_set():
            raise Overloaded("the server is shutting down")
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise Overloaded(f"{self.max_queue} requests are already waiting") from None
        self.metrics.queue_depth.set(self.queue.qsize())
        return job

    # ------------------------------------------------------------------------------------------ loop
    def _loop(self) -> None:
        while True:
            busy = self.batch is not None and self.batch.requests
            if not busy and self.queue.empty() and self._stopping.is_set():
                return
            try:
                if self.batch is not None:
                    self._inflight_round()
                else:
                    self._static_round()
            except Exception as error:  # a bug must fail the jobs it touched, never the server
                self._fail_all(error)

    def _take(self, block: bool) -> Job | None:
        try:
            job = self.queue.get(timeout=0.05) if block else self.queue.get_nowait()
        except queue.Empty:
            return None
        self.metrics.queue_depth.set(self.queue.qsize())
        if job.cancelled or job.expired:
            self._finish(job, error=JobTimeout("timed out while queued") if job.expired else None)
            return None
        return job

    def _inflight_round(self) -> None:
        assert self.batch is not None
        joining: list[Job] = []
        rows = self.batch.rows
        while rows < self.max_rows:
            job = self._take(block=not self.batch.requests and not joining)
            if job is None:
                break
            if job.settings.num_beams > 1:  # beam search reorders rows: it runs alone, between steps
                self._run_group([job])
                continue
            joining.append(job)
            rows += job.settings.num_return_sequences
        if joining:
            requests = [InflightRequest(job.input_ids, job.settings, on_token=job.tokens) for job in joining]
            try:
                self.batch.join(requests)
            except Exception as error:  # not in the batch yet: _fail_all would not see them
                for job in joining:
                    self._finish(job, error=error)
                raise
            for request, job in zip(requests, joining, strict=True):
                self._jobs[id(request)] = job
        if not self.batch.requests:
            return
        for request in self.batch.requests:
            job = self._jobs[id(request)]
            request.cancelled = job.cancelled or job.expired
        self.metrics.rows_in_flight.set(self.batch.rows)
        self.metrics.batch_rows.observe(self.batch.rows)
        for request in self.batch.step():
            job = self._jobs.pop(id(request))
            if job.expired and not (request.state is not None and request.state.done):
                self._finish(job, error=JobTimeout("timed out while decoding"))
            else:
                self._finish(job, sequences=request.sequences)
        self.metrics.rows_in_flight.set(self.batch.rows)

    def _static_round(self) -> None:
        first = self._take(block=True)
        if first is None:
            return
        jobs = [first]
        limit = 1 if self.batching == "none" else self.max_rows
        while len(jobs) < limit:
            job = self._take(block=False)
            if job is None:
                break
            jobs.append(job)
        groups: dict[str, list[Job]] = {}
        for job in jobs:
            groups.setdefault(json.dumps(job.parameters, sort_keys=True), []).append(job)
        for group in groups.values():
            self._run_group(group)

    def _run_group(self, jobs: list[Job]) -> None:
        """One ``generate()`` call for jobs with identical parameters (static batching)."""
        per_job = jobs[0].settings.num_return_sequences  # rows per job (on_token: greedy and sampling only)

        def on_token(tokens: np.ndarray) -> None:
            for index, job in enumerate(jobs):
                job.tokens(tokens[index * per_job : (index + 1) * per_job])

        rows = len(jobs) * max(jobs[0].settings.num_beams, jobs[0].settings.num_return_sequences)
        self.metrics.rows_in_flight.set(rows)
        self.metrics.batch_rows.observe(rows)
        try:
            output = self.runtime.generate(
                [job.input_ids for job in jobs], truncation=False, on_token=on_token, **jobs[0].parameters
            )
        except Exception as error:
            for job in jobs:
                self._finish(job, error=error)
            return
        finally:
            self.metrics.rows_in_flight.set(0)
        returned = jobs[0].settings.num_return_sequences
        for index, job in enumerate(jobs):
            sequences = output.sequences[index * returned : (index + 1) * returned]
            if job.first_token is None:  # beam search reports no tokens until it ends
                job.first_token = time.perf_counter()
            self._finish(job, sequences=sequences)

    # --------------------------------------------------------------------------------------- results
    def _finish(self, job: Job, sequences: list[list[int]] | None = None, error: BaseException | None = None) -> None:
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
            return
        if job.cancelled:
            job.future.cancel()
            return
        assert sequences is not None
        now = time.perf_counter()
        self.metrics.latency.observe(now - job.submitted)
        if job.first_token is not None:
            self.metrics.first_token.observe(job.first_token - job.submitted)
        self.metrics.tokens.inc(sum(len(row) - 1 for row in sequences))
        job.future.set_result(sequences)

    def _fail_all(self, error: BaseException) -> None:
        if self.batch is not None:
            for request in self.batch.requests:
                self._finish(self._jobs.pop(id(request)), error=error)
            self.batch = InflightBatch(self.runtime)
