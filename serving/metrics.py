"""Prometheus metrics of one server, in a registry of its own (several servers may share a process in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "cbart_requests",
            "Requests by outcome (ok, invalid, overloaded, timeout, error)",
            ["status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "cbart_request_latency_seconds", "Submission to last token", buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.first_token = Histogram(
            "cbart_time_to_first_token_seconds",
            "Submission to first token",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "cbart_generated_tokens", "Tokens generated (rate() gives tokens/s)", registry=self.registry
        )
        self.queue_depth = Gauge("cbart_queue_depth", "Requests waiting to start", registry=self.registry)
        self.rows_in_flight = Gauge("cbart_rows_in_flight", "Decoder rows of the running batch", registry=self.registry)
        self.batch_rows = Histogram(
            "cbart_batch_rows",
            "Rows per decoder step (or per static batch)",
            buckets=ROW_BUCKETS,
            registry=self.registry,
        )
