"""Load test of ``cbart serve``: open-loop Poisson arrivals against one-at-a-time, static and in-flight batching,
the same model, requests and rates in one run (loopback only; bounded in requests and seconds).

    python -m cbart.benchmarks.serve_load --out benchmarks/results/serve-load.json

The model is the bart-base-shaped compressed-384 export (random weights, untied: varied lengths until the
requested exact length). Each request asks for an exact number of new tokens drawn from ``--new-tokens``, so
requests differ in length as real ones do. Rates are multiples of the one-at-a-time capacity measured first
(1 / a lone request's latency). Reports throughput, latency and time-to-first-token percentiles, errors by
kind, and the server's peak memory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from cbart.benchmarks.models import ModelSpec, onnx_export
from cbart.benchmarks.quality.run import machine

MODES = ("none", "static", "inflight")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """``cbart serve`` in a subprocess on 127.0.0.1."""

    def __init__(self, directory: Path, batching: str, threads: int, max_queue: int) -> None:
        import httpx

        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable, "-m", "cbart.cli", "serve", str(directory), "--port", str(self.port),
            "--batching", batching, "--threads", str(threads), "--max-queue", str(max_queue), "--max-rows", "16",
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{self.base}/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.time() > deadline or self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"cbart serve --batching {batching} did not start")
            time.sleep(0.2)

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.process.pid).memory_info().rss / 2**20

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def workload(count: int, source_length: int, new_tokens: tuple[int, int], seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    bodies = []
    for _ in range(count):
        length = int(rng.integers(new_tokens[0], new_tokens[1] + 1))
        ids = [0, *rng.integers(4, 50000, source_length - 2).tolist(), 2]
        bodies.append({"inputs": ids, "parameters": {"max_new_tokens": length, "min_new_tokens": length}})
    return bodies


async def _drive(
    base: str, bodies: list[dict[str, Any]], rate: float, seconds: float, seed: int
) -> tuple[list[dict], int]:
    """Send ``bodies`` at Poisson arrivals of ``rate``/s (stopping sends after ``seconds``); every request is
    awaited to its answer or a client timeout, so none is lost unnoticed."""
    import httpx

    rng = np.random.default_rng(seed)
    results: list[dict] = []
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=httpx.Limits(max_connections=512)) as client:

        async def one(body: dict[str, Any]) -> None:
            sent = time.perf_counter()
            try:
                response = await client.post("/v1/generate", json=body)
                data = response.json()
                results.append(
                    {
                        "status": response.status_code,
                        "latency_s": time.perf_counter() - sent,
                        "ttft_s": data.get("timings", {}).get("time_to_first_token_s"),
                        "tokens": sum(len(row) - 1 for row in data.get("sequences", [])),
                        "retry_after": response.headers.get("retry-after"),
                    }
                )
            except httpx.HTTPError as error:
                results.append({"status": type(error).__name__, "latency_s": time.perf_counter() - sent})

        tasks = []
        started = time.perf_counter()
        for body in bodies:
            tasks.append(asyncio.create_task(one(body)))
            await asyncio.sleep(float(rng.exponential(1.0 / rate)))
            if time.perf_counter() - started > seconds:
                break
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - started
    for result in results:
        result["wall_s"] = wall
    return results, len(tasks)


def summarize(results: list[dict], sent: int) -> dict[str, Any]:
    ok = [r for r in results if r["status"] == 200]
    wall = results[0]["wall_s"] if results else 0.0
    latencies = np.array([r["latency_s"] for r in ok]) if ok else np.zeros(1)
    ttft = np.array([r["ttft_s"] for r in ok if r.get("ttft_s") is not None] or [0.0])
    errors: dict[str, int] = {}
    for result in results:
        if result["status"] != 200:
            errors[str(result["status"])] = errors.get(str(result["status"]), 0) + 1
    return {
        "sent": sent,
        "answered": len(results),
        "lost": sent - len(results),
        "ok": len(ok),
        "errors": errors,
        "requests_per_s": len(ok) / wall if wall else 0.0,
        "tokens_per_s": sum(r["tokens"] for r in ok) / wall if wall else 0.0,
        "p50_s": float(np.percentile(latencies, 50)),
        "p95_s": float(np.percentile(latencies, 95)),
        "p99_s": float(np.percentile(latencies, 99)),
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p95_s": float(np.percentile(ttft, 95)),
        "refusals_with_retry_after": sum(1 for r in results if r["status"] == 503 and r.get("retry_after")),
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path(__file__).resolve().parent / ".cache")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "serve-load.json")
    parser.add_argument("--threads", type=int, default=1, help="server threads (the client needs a core too)")
    parser.add_argument("--loads", type=float, nargs="+", default=[1.0, 3.0, 6.0], help="x one-at-a-time capacity")
    parser.add_argument("--seconds", type=float, default=15.0, help="sending time per cell")
    parser.add_argument("--max-requests", type=int, default=400, help="per cell")
    parser.add_argument("--source-length", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, nargs=2, default=[8, 48])
    parser.add_argument("--max-queue", type=int, default=32)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    directory = onnx_export(ModelSpec(384, varied=True), args.cache, inflight=True)
    new_tokens = (args.new_tokens[0], args.new_tokens[1])
    cells: list[dict[str, Any]] = []
    probe = Server(directory, "none", args.threads, args.max_queue)
    try:
        lone, _ = asyncio.run(_drive(probe.base, workload(8, args.source_length, new_tokens, 0), 0.5, 1e9, 0))
        capacity = 1.0 / float(np.mean([r["latency_s"] for r in lone]))
    finally:
        probe.stop()
    print(f"one-at-a-time capacity: {capacity:.2f} requests/s", flush=True)
    for load in args.loads:
        rate = load * capacity
        bodies = workload(args.max_requests, args.source_length, new_tokens, seed=int(load * 100))
        for mode in MODES:  # every mode sees the same requests at the same arrival times
            server = Server(directory, mode, args.threads, args.max_queue)
            try:
                results, sent = asyncio.run(_drive(server.base, bodies, rate, args.seconds, seed=int(load * 100)))
                peak = server.rss_mb()
            finally:
                server.stop()
            cell = {"batching": mode, "load": load, "rate_per_s": rate, **summarize(results, sent)}
            cell["server_rss_mb"] = peak
            cells.append(cell)
            print(json.dumps(cell), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "command": "python -m cbart.benchmarks.serve_load " + " ".join(argv or sys.argv[1:]),
        "model": "compressed-384 (bart-base shape, random untied weights), fp32, --inflight export",
        "machine": machine(),
        "server_threads": args.threads,
        "one_at_a_time_capacity_per_s": capacity,
        "cells": cells,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
