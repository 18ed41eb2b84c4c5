"""The HTTP API of ``cbart serve`` (FastAPI): generate, stream, health, metrics.

``POST /v1/generate`` takes ``{"inputs": text | [texts] | token ids | [token ids], "parameters": {transformers-style
generation arguments, "truncation": bool}, "stream": bool, "timeout": seconds}``. Answers: 200 with ids, texts and
timings; 400 with the runtime's message for bad input; 503 with ``Retry-After`` while loading or when the queue
is full; 504 past the timeout; 500 for an internal error (the server keeps running). ``stream: true`` sends
server-sent events, one per row and token, then a final ``done`` event (greedy search and sampling).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from cbart.runtime.generator import Seq2SeqRuntime
from cbart.runtime.tokenizer import TextTokenizer
from cbart.serving.config import ServerConfig
from cbart.serving.metrics import ServingMetrics
from cbart.serving.scheduler import Job, JobTimeout, Overloaded, Scheduler
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

RETRY_AFTER_S = "1"


class GenerateRequest(BaseModel):
    inputs: str | list[str] | list[int] | list[list[int]]
    parameters: dict[str, Any] = Field(default_factory=dict)
    stream: bool = False
    timeout: float | None = Field(default=None, gt=0)


class ServerState:
    """The runtime and its scheduler, loaded off the event loop so that ``/health`` answers while loading."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = ServingMetrics()
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.runtime: Seq2SeqRuntime | None = None
        self.scheduler: Scheduler | None = None
        self.batching: str | None = None

    def load(self) -> None:
        try:
            runtime = Seq2SeqRuntime.from_dir(
                self.config.export_dir, threads=self.config.threads, check_files=self.config.check_files
            )
            batching = self.config.batching
            if batching == "auto":
                batching = "inflight" if runtime.manifest.per_row_positions else "static"
            self.scheduler = Scheduler(runtime, batching, self.config.max_rows, self.config.max_queue, self.metrics)
            self.scheduler.start()
            self.runtime, self.batching = runtime, batching
            self.ready.set()
        except Exception as error:  # reported by /health; the process stays up to say why
            self.load_error = f"{type(error).__name__}: {error}"

    def stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()


def _error(status: int, message: str, retry: bool = False) -> JSONResponse:
    headers = {"Retry-After": RETRY_AFTER_S} if retry else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(config: ServerConfig) -> FastAPI:
    state = ServerState(config)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=state.load, name="cbart-load", daemon=True).start()
        yield
        await asyncio.to_thread(state.stop)  # graceful: finish what is queued and in flight

    app = FastAPI(title="cbart", lifespan=lifespan)
    app.state.cbart = state

    @app.get("/health")
    def health() -> JSONResponse:
        if state.load_error is not None:
            return JSONResponse({"status": "failed", "error": state.load_error}, status_code=500)
        if not state.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": RETRY_AFTER_S})
        return JSONResponse({"status": "ready", "batching": state.batching})

    @app.get("/metrics")
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/generate", response_model=None)
    async def generate(body: GenerateRequest, request: Request) -> JSONResponse | StreamingResponse:
        if not state.ready.is_set() or state.runtime is None or state.scheduler is None:
            return _error(503, "the model is still loading; retry shortly", retry=True)
        runtime, scheduler, counter = state.runtime, state.scheduler, state.metrics.requests
        parameters = dict(body.parameters)
        truncation = bool(parameters.pop("truncation", True))
        try:
            inputs = [body.inputs] if _is_token_ids(body.inputs) else body.inputs
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # truncation is the documented default, as in generate()
                sequences, texts_in = runtime.token_ids(inputs, truncation)
            settings = runtime.settings(**parameters)
            if body.stream and (settings.num_beams > 1 or len(sequences) > 1):
                raise ValueError("stream needs one input and greedy search or sampling (num_beams=1)")
        except (ValueError, TypeError) as error:
            counter.labels("invalid").inc()
            return _error(400, str(error))
        deadline = time.perf_counter() + (body.timeout or config.request_timeout_s)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[np.ndarray] = asyncio.Queue()

        def on_token(tokens: np.ndarray) -> None:
            loop.call_soon_threadsafe(events.put_nowait, np.array(tokens))

        jobs = [
            Job(ids, settings, parameters, deadline, on_token=on_token if body.stream else None) for ids in sequences
        ]
        try:
            for job in jobs:
                scheduler.submit(job)
        except Overloaded as error:
            for job in jobs:
                job.cancel()
            counter.labels("overloaded").inc()
            return _error(503, f"overloaded: {error}; retry later", retry=True)
        if body.stream:
            stream = _stream(jobs[0], events, request, runtime.tokenizer if texts_in else None, state.metrics)
            return StreamingResponse(stream, media_type="text/event-stream")
        try:
            results = [await _wait(job, request) for job in jobs]
        except asyncio.CancelledError:
            for job in jobs:
                job.cancel()
            raise
        except JobTimeout as error:
            counter.labels("timeout").inc()
            return _error(504, f"{error}; raise the timeout or shorten the request")
        except Exception as error:
            counter.labels("error").inc()
            return _error(500, f"internal error: {type(error).__name__}: {error}")
        if any(result is None for result in results):  # the client went away
            counter.labels("cancelled").inc()
            return _error(499, "client closed the request")
        counter.labels("ok").inc()
        return JSONResponse(_body(jobs, [row for result in results for row in result], runtime, texts_in))

    return app


def _is_token_ids(inputs: Any) -> bool:
    """One sequence of token ids (a flat list of ints), as opposed to a list of texts or of sequences."""
    return isinstance(inputs, list) and bool(inputs) and all(isinstance(item, int) for item in inputs)


async def _wait(job: Job, request: Request) -> list[list[int]] | None:
    """The job's ids; None when the client disconnected (the job is then cancelled and its rows freed)."""
    future = asyncio.wrap_future(job.future)
    while True:
        done, _ = await asyncio.wait({future}, timeout=0.25)
        if done:
            return future.result()
        if await request.is_disconnected():
            job.cancel()
            return None


def _timings(jobs: list[Job]) -> dict[str, float]:
    now = time.perf_counter()
    submitted = min(job.submitted for job in jobs)
    first = [job.first_token for job in jobs if job.first_token is not None]
    timings = {"total_s": now - submitted}
    if first:
        timings["time_to_first_token_s"] = min(first) - submitted
    return timings


def _body(jobs: list[Job], sequences: list[list[int]], runtime: Seq2SeqRuntime, texts_in: bool) -> dict[str, Any]:
    texts = runtime.tokenizer.decode(sequences) if texts_in and runtime.tokenizer is not None else None
    return {"sequences": sequences, "texts": texts, "timings": _timings(jobs)}


def _event(data: dict[str, Any], kind: str | None = None) -> str:
    prefix = f"event: {kind}\n" if kind else ""
    return f"{prefix}data: {json.dumps(data)}\n\n"


async def _stream(
    job: Job,
    events: asyncio.Queue[np.ndarray],
    request: Request,
    tokenizer: TextTokenizer | None,
    metrics: ServingMetrics,
) -> AsyncIterator[str]:
    """One event per row and token (``index``: the row; ``text``: what the token adds to the row's text), then
    ``done`` with the final ids. A client that disconnects cancels the job: its rows leave the batch."""
    rows: list[list[int]] = []
    shown: list[str] = []
    ended: list[bool] = []
    future = asyncio.wrap_future(job.future)
    try:
        while not (future.done() and events.empty()):
            try:
                tokens = await asyncio.wait_for(events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    return
                continue
            if not rows:
                rows = [[job.settings.decoder_start_token_id] for _ in tokens]
                shown, ended = ["" for _ in tokens], [False for _ in tokens]
            for index, token in enumerate(tokens.tolist()):
                if ended[index]:
                    continue  # what follows a row's EOS is padding
                ended[index] = token == job.settings.eos_token_id
                rows[index].append(token)
                event: dict[str, Any] = {"index": index, "token": token}
                if tokenizer is not None:
                    text = tokenizer.decode([rows[index]])[0]
                    event["text"], shown[index] = text[len(shown[index]) :], text
                yield _event(event)
        sequences = future.result()
    except asyncio.CancelledError:
        job.cancel()
        raise
    except JobTimeout as error:
        metrics.requests.labels("timeout").inc()
        yield _event({"error": str(error)}, "error")
        return
    except Exception as error:
        metrics.requests.labels("error").inc()
        yield _event({"error": f"internal error: {type(error).__name__}: {error}"}, "error")
        return
    metrics.requests.labels("ok").inc()
    yield _event({"done": True, "sequences": sequences, "timings": _timings([job])}, "done")


def serve(config: ServerConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the server until SIGINT/SIGTERM; uvicorn stops accepting, finishes open requests, then the
    scheduler drains (graceful shutdown)."""
    import uvicorn

    uvicorn.run(create_app(config), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=120)
