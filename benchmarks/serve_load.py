"""Load test of ``cbart serve``: open-loop Poisson arrivals against one-at-a-time, static and in-flight batching,
the same model, requests and arrival times in one run (loopback only; bounded in requests and seconds).

    python -m cbart.benchmarks.serve_load

The model is the bart-base-shaped compressed-384 export (random untied weights, fp32, ``--inflight``). Two
workloads:
- ``fixed``: every request has the same parameters (32 new tokens) and sources of 16-128 tokens, the case
  static batching handles best (it can batch only requests with identical parameters);
- ``mixed``: each request asks for its own exact length, 8-48 new tokens, as real traffic does.

Offered rates are multiples of the one-at-a-time capacity (1 / a lone warm request's latency). Each cell
reports throughput, latency and time-to-first-token percentiles, answers by status (every request is
awaited: ``lost`` counts requests that got no answer at all) and the server's peak memory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from cbart.benchmarks.machine import machine
from cbart.benchmarks.models import ModelSpec, onnx_export
from cbart.benchmarks.plotting import pyplot

MODES = ("none", "static", "inflight")
WORKLOADS = ("fixed", "mixed")
RESULTS = Path(__file__).resolve().parent / "results"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """``cbart serve`` in a subprocess on 127.0.0.1, warmed up by one request; its peak memory is sampled."""

    def __init__(self, directory: Path, batching: str, threads: int, max_queue: int, warmup: dict[str, Any]) -> None:
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
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline or self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"cbart serve --batching {batching} did not start")
            time.sleep(0.2)
        httpx.post(f"{self.base}/v1/generate", json=warmup, timeout=120).raise_for_status()
        self.peak_rss_mb = 0.0
        self._sampling = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        import psutil

        process = psutil.Process(self.process.pid)
        while not self._sampling.is_set():
            self.peak_rss_mb = max(self.peak_rss_mb, process.memory_info().rss / 2**20)
            time.sleep(0.2)

    def stop(self) -> None:
        if hasattr(self, "_sampling"):
            self._sampling.set()
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def workload(kind: str, count: int, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    bodies = []
    for _ in range(count):
        source = [0, *rng.integers(4, 50000, int(rng.integers(16, 129)) - 2).tolist(), 2]
        length = 32 if kind == "fixed" else int(rng.integers(8, 49))
        bodies.append({"inputs": source, "parameters": {"max_new_tokens": length, "min_new_tokens": length}})
    return bodies


async def _drive(
    base: str, bodies: list[dict[str, Any]], rate: float | None, seconds: float, seed: int
) -> tuple[list[dict], int]:
    """Send ``bodies`` at Poisson arrivals of ``rate``/s, stopping new sends after ``seconds`` (``rate=None``:
    one after another, each after the previous answer). Every request is awaited to its answer."""
    import httpx

    rng = np.random.default_rng(seed)
    results: list[dict] = []
    async with httpx.AsyncClient(base_url=base, timeout=180, limits=httpx.Limits(max_connections=1024)) as client:

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
            if rate is None:
                await one(body)
                continue
            tasks.append(asyncio.create_task(one(body)))
            await asyncio.sleep(float(rng.exponential(1.0 / rate)))
            if time.perf_counter() - started > seconds:
                break
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - started
    for result in results:
        result["wall_s"] = wall
    return results, len(tasks) if rate is not None else len(bodies)


def summarize(results: list[dict], sent: int) -> dict[str, Any]:
    ok = [r for r in results if r["status"] == 200]
    wall = results[0]["wall_s"] if results else 0.0
    latencies = np.array([r["latency_s"] for r in ok] or [0.0])
    ttft = np.array([r["ttft_s"] for r in ok if r.get("ttft_s") is not None] or [0.0])
    statuses: dict[str, int] = {}
    for result in results:
        statuses[str(result["status"])] = statuses.get(str(result["status"]), 0) + 1
    return {
        "sent": sent,
        "answered": len(results),
        "lost": sent - len(results),
        "statuses": statuses,
        "refusals_with_retry_after": sum(1 for r in results if r["status"] == 503 and r.get("retry_after")),
        "requests_per_s": len(ok) / wall if wall else 0.0,
        "tokens_per_s": sum(r["tokens"] for r in ok) / wall if wall else 0.0,
        "p50_s": float(np.percentile(latencies, 50)),
        "p95_s": float(np.percentile(latencies, 95)),
        "p99_s": float(np.percentile(latencies, 99)),
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p95_s": float(np.percentile(ttft, 95)),
    }


def targets(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets, per workload: in-flight throughput at saturation vs one at a time; p99 vs static at
    the highest load in-flight still answers in full; at the highest (overload) rate nothing lost."""
    by = {(c["load"], c["batching"]): c for c in cells}
    loads = sorted({c["load"] for c in cells})
    best = {mode: max(by[(load, mode)]["requests_per_s"] for load in loads) for mode in MODES}
    served = [load for load in loads if by[(load, "inflight")]["statuses"].get("200") == by[(load, "inflight")]["sent"]]
    at = max(served) if served else loads[0]
    top = loads[-1]
    overload = [by[(top, mode)] for mode in MODES]
    return {
        "throughput_inflight_vs_one_at_a_time": best["inflight"] / best["none"],
        "saturation_load": at,
        "p99_inflight_s": by[(at, "inflight")]["p99_s"],
        "p99_static_s": by[(at, "static")]["p99_s"],
        "overload_load": top,
        "overload_lost": sum(c["lost"] for c in overload),
        "overload_other_than_200_or_503": sum(
            n for c in overload for status, n in c["statuses"].items() if status not in ("200", "503")
        ),
    }


def table(cells: list[dict[str, Any]], capacity: float) -> str:
    lines = [
        f"One-at-a-time capacity: {capacity:.2f} requests/s.",
        "",
        "| offered rate | batching | 200 / 503 / lost | requests/s | tokens/s | p50 s | p95 s | p99 s "
        "| first token p50 / p95 s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        lines.append(
            f"| {c['rate_per_s']:.1f}/s ({c['load']:g}x) | {c['batching']} | {c['statuses'].get('200', 0)} / "
            f"{c['statuses'].get('503', 0)} / {c['lost']} | {c['requests_per_s']:.2f} | {c['tokens_per_s']:.0f} | "
            f"{c['p50_s']:.2f} | {c['p95_s']:.2f} | {c['p99_s']:.2f} | {c['ttft_p50_s']:.2f} / {c['ttft_p95_s']:.2f} | "
            f"{c['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    figure, axes = plt.subplots(2, len(WORKLOADS), figsize=(5 * len(WORKLOADS), 7), squeeze=False)
    for column, (kind, data) in enumerate(report["workloads"].items()):
        for mode in MODES:
            cells = [c for c in data["cells"] if c["batching"] == mode]
            rates = [c["rate_per_s"] for c in cells]
            axes[0][column].plot(rates, [c["requests_per_s"] for c in cells], marker="o", label=mode)
            axes[1][column].plot(rates, [c["p99_s"] for c in cells], marker="o", label=mode)
        axes[0][column].set_title(f"{kind} workload")
        axes[0][column].set_ylabel("answered requests/s")
        axes[1][column].set_ylabel("p99 latency, s")
        axes[1][column].set_xlabel("offered requests/s")
        axes[0][column].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path(__file__).resolve().parent / ".cache")
    parser.add_argument("--out", type=Path, default=RESULTS / "serve-load.json")
    parser.add_argument("--threads", type=int, default=1, help="server threads (the client needs a core too)")
    parser.add_argument("--loads", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0], help="x capacity")
    parser.add_argument("--seconds", type=float, default=12.0, help="sending time per cell")
    parser.add_argument("--max-requests", type=int, default=400, help="per cell")
    parser.add_argument("--max-queue", type=int, default=32)
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    started = time.time()
    directory = onnx_export(ModelSpec(384, varied=True), args.cache, inflight=True)
    report: dict[str, Any] = {
        "command": "python -m cbart.benchmarks.serve_load " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d"),
        "model": "compressed-384 (bart-base shape, random untied weights), fp32, --inflight export",
        "machine": machine(),
        "server_threads": args.threads,
        "max_queue": args.max_queue,
        "workloads": {},
    }
    for kind in args.workloads:
        warmup = workload(kind, 1, seed=99)[0]
        probe = Server(directory, "none", args.threads, args.max_queue, warmup)
        try:
            lone, _ = asyncio.run(_drive(probe.base, workload(kind, 6, seed=1), None, 0, 0))
        finally:
            probe.stop()
        capacity = 1.0 / float(np.mean([r["latency_s"] for r in lone]))
        print(f"{kind}: one-at-a-time capacity {capacity:.2f} requests/s", flush=True)
        cells: list[dict[str, Any]] = []
        for load in args.loads:
            bodies = workload(kind, args.max_requests, seed=int(load * 100))
            for mode in MODES:  # every mode gets the same requests at the same arrival times
                server = Server(directory, mode, args.threads, args.max_queue, warmup)
                try:
                    results, sent = asyncio.run(_drive(server.base, bodies, load * capacity, args.seconds, int(load)))
                finally:
                    server.stop()
                cell = {"batching": mode, "load": load, "rate_per_s": load * capacity, **summarize(results, sent)}
                cell["peak_rss_mb"] = server.peak_rss_mb
                cells.append(cell)
                print(json.dumps(cell), flush=True)
        report["workloads"][kind] = {
            "capacity_per_s": capacity,
            "cells": cells,
            "targets": targets(cells),
            "table": table(cells, capacity),
        }
    report["minutes"] = round((time.time() - started) / 60, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
