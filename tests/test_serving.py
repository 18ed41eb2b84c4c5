"""`cbart serve`: served ids equal Seq2SeqRuntime.generate, streaming, errors, backpressure, disconnects,
timeouts and graceful shutdown, against a real server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from cbart.runtime.generator import Seq2SeqRuntime
from cbart.serving.app import create_app
from cbart.serving.config import ServerConfig
from conftest import tiny_inflight_export

LONG = {"max_new_tokens": 60, "min_new_tokens": 60}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    return tiny_inflight_export(tmp_path_factory.mktemp("serve"), 21)[1]


@contextmanager
def running(config: ServerConfig) -> Iterator[tuple[httpx.Client, object]]:
    """The server in a thread of this process, ready; yields a client and the app's state."""
    app = create_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    client = httpx.Client(base_url=f"http://127.0.0.1:{server.config.port}", timeout=60)
    deadline = time.time() + 60
    while True:
        try:
            if client.get("/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.time() < deadline, "server did not become ready"
        time.sleep(0.05)
    try:
        yield client, app.state.cbart
    finally:
        client.close()
        server.should_exit = True
        thread.join(30)


REQUESTS = [
    ([0, 7, 8, 9, 2], {"max_new_tokens": 12}),
    ([0, 11, 12, 13, 14, 15, 16, 17, 2], {"max_new_tokens": 9, "no_repeat_ngram_size": 2}),
    ([0, 20, 2], {"max_new_tokens": 10, "do_sample": True, "top_k": 5, "seed": 4, "num_return_sequences": 2}),
    ([0, 30, 31, 32, 2], {"max_new_tokens": 7, "num_beams": 3}),
    ([0, 40, 41, 2], {"max_new_tokens": 14, "repetition_penalty": 1.3}),
]


@pytest.mark.parametrize("batching", ["inflight", "static"])
def test_served_ids_equal_the_runtime_under_concurrent_load(export_dir, batching):
    runtime = Seq2SeqRuntime.from_dir(export_dir)
    expected = [runtime.generate([ids], **settings).sequences for ids, settings in REQUESTS]
    with running(ServerConfig(export_dir, batching=batching)) as (client, state):
        assert client.get("/health").json() == {"status": "ready", "batching": batching}

        def call(request: tuple[list[int], dict]) -> dict:
            ids, settings = request
            response = client.post("/v1/generate", json={"inputs": ids, "parameters": settings})
            assert response.status_code == 200, response.text
            return response.json()

        with ThreadPoolExecutor(len(REQUESTS)) as pool:
            bodies = list(pool.map(call, REQUESTS * 2))
        if batching == "static":  # sampling shares one generator per static batch: only alone it is reproducible
            bodies = [body for body, (_, s) in zip(bodies, REQUESTS * 2, strict=True) if not s.get("do_sample")]
            expected = [e for e, (_, s) in zip(expected, REQUESTS, strict=True) if not s.get("do_sample")]
        assert [body["sequences"] for body in bodies] == expected * 2
        assert all(body["timings"]["total_s"] > 0 for body in bodies)
        several = client.post(
            "/v1/generate", json={"inputs": [ids for ids, _ in REQUESTS[:2]], "parameters": {"max_new_tokens": 12}}
        )
        assert (
            several.json()["sequences"]
            == runtime.generate([ids for ids, _ in REQUESTS[:2]], max_new_tokens=12).sequences
        )
        metrics = client.get("/metrics").text
        assert 'cbart_requests_total{status="ok"} 11.0' in metrics
        assert "cbart_time_to_first_token_seconds_count" in metrics and "cbart_batch_rows_bucket" in metrics
        if batching == "inflight":
            assert state.metrics.batch_rows.collect()[0].samples  # steps were observed
            assert max_rows_observed(state) > 1  # requests shared decoder steps


def max_rows_observed(state) -> float:
    buckets = [s for s in state.metrics.batch_rows.collect()[0].samples if s.name.endswith("_bucket")]
    counts = {float(s.labels["le"]): s.value for s in buckets}
    total = counts[float("inf")]
    return min(le for le, count in counts.items() if count == total)


def test_streaming_sends_each_token_then_the_ids(export_dir):
    runtime = Seq2SeqRuntime.from_dir(export_dir)
    ids, settings = REQUESTS[2]
    expected = runtime.generate([ids], **settings).sequences
    with running(ServerConfig(export_dir)) as (client, _):
        events = []
        with client.stream("POST", "/v1/generate", json={"inputs": ids, "parameters": settings, "stream": True}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            kind = None
            for line in r.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    events.append((kind, json.loads(line[6:])))
                    kind = None
        tokens = [event for kind, event in events if kind is None]
        done = [event for kind, event in events if kind == "done"]
        assert len(done) == 1 and done[0]["sequences"] == expected
        for row, sequence in enumerate(expected):
            streamed = [event["token"] for event in tokens if event["index"] == row]
            ended = sequence.index(2, 1) + 1 if 2 in sequence[1:] else len(sequence)
            assert streamed == sequence[1:ended]


def test_bad_requests_get_4xx_with_the_runtimes_message(export_dir):
    with running(ServerConfig(export_dir)) as (client, _):
        cases = [
            ({"inputs": [], "parameters": {}}, "empty input"),
            ({"inputs": [[0, 5, 2], []]}, "has no tokens"),
            (
                {"inputs": [0, 5, 2], "parameters": {"num_beams": 2, "bogus": 1}},
                "unknown generation argument(s): bogus",
            ),
            ({"inputs": [0, 500, 2]}, "token id 500 is outside the vocabulary (0..95)"),
            ({"inputs": [0] + [5] * 200 + [2], "parameters": {"truncation": False}}, "exceeds the model's maximum"),
            ({"inputs": [0, 5, 2], "parameters": {"num_beams": 2}, "stream": True}, "stream needs one input"),
            ({"inputs": "some text"}, "has no tokenizer"),
        ]
        for body, message in cases:
            response = client.post("/v1/generate", json=body)
            assert response.status_code == 400, (body, response.text)
            assert message in response.json()["error"]
        assert client.post("/v1/generate", json={"parameters": {}}).status_code == 422  # no inputs at all
        assert client.post("/v1/generate", json={"inputs": [0, 5, 2]}).status_code == 200  # still serving


@pytest.mark.parametrize("batching", ["inflight", "static"])
def test_internal_errors_are_500_and_the_server_keeps_serving(export_dir, batching):
    with running(ServerConfig(export_dir, batching=batching)) as (client, state):
        backend = state.runtime.backend
        original = backend.encode
        backend.encode = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
        response = client.post("/v1/generate", json={"inputs": [0, 5, 2]})
        assert response.status_code == 500 and "boom" in response.json()["error"]
        backend.encode = original
        assert client.post("/v1/generate", json={"inputs": [0, 5, 2]}).status_code == 200


def test_a_full_queue_answers_503_at_once_and_loses_nothing(export_dir):
    with running(ServerConfig(export_dir, batching="none", max_queue=1)) as (client, _):

        def call(_: int) -> tuple[int, float, str | None]:
            started = time.perf_counter()
            response = client.post("/v1/generate", json={"inputs": [0, 5, 6, 2], "parameters": LONG})
            return response.status_code, time.perf_counter() - started, response.headers.get("retry-after")

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(call, range(8)))
        statuses = [status for status, _, _ in results]
        assert set(statuses) == {200, 503}, statuses  # every request answered: a result or a refusal
        refused = [(seconds, retry) for status, seconds, retry in results if status == 503]
        assert all(retry == "1" for _, retry in refused)
        assert max(seconds for seconds, _ in refused) < min(s for st, s, _ in results if st == 200)
        metrics = client.get("/metrics").text
        assert f'cbart_requests_total{{status="overloaded"}} {float(len(refused))}' in metrics


def test_timeouts_are_504_and_a_disconnected_stream_frees_its_rows(export_dir):
    with running(ServerConfig(export_dir, max_rows=4)) as (client, state):
        slow = {"max_new_tokens": 150, "min_new_tokens": 150}
        response = client.post("/v1/generate", json={"inputs": [0, 5, 2], "parameters": slow, "timeout": 0.01})
        assert response.status_code == 504 and "timed out" in response.json()["error"]
        with client.stream("POST", "/v1/generate", json={"inputs": [0, 5, 2], "parameters": slow, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
        deadline = time.time() + 10
        while state.scheduler.batch.rows and time.time() < deadline:
            time.sleep(0.05)
        assert state.scheduler.batch.rows == 0  # the disconnected request left the batch
        assert client.post("/v1/generate", json={"inputs": [0, 5, 2]}).status_code == 200


def test_sigterm_finishes_in_flight_requests_then_exits(export_dir):
    port = free_port()
    command = [sys.executable, "-m", "cbart.cli", "serve", str(export_dir), "--port", str(port), "--threads", "1"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline and server.poll() is None, "server did not start"
            time.sleep(0.1)
        slow = {"max_new_tokens": 150, "min_new_tokens": 150}
        body = {"inputs": [0, 5, 2], "parameters": slow, "stream": True}
        with httpx.stream("POST", f"{base}/v1/generate", json=body, timeout=60) as response:
            lines: list[str] = []
            for line in response.iter_lines():
                if not lines:
                    server.send_signal(signal.SIGTERM)  # the request is in flight: its first token arrived
                lines.append(line)
        assert "event: done" in lines  # it finished after the signal
        assert server.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{base}/health")
    finally:
        server.kill()
