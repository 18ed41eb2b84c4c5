"""What ``cbart serve`` can be asked for, free of the web stack's imports, so the command line reads its
choices and defaults from here without loading FastAPI."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BATCHING = ("inflight", "static", "none")
"""The scheduler's policies (``serving.scheduler``)."""
BATCHING_CHOICES = ("auto", *BATCHING)


@dataclass
class ServerConfig:
    export_dir: Path
    batching: str = "auto"
    """``auto``: in-flight batching when the export allows it (``cbart export --inflight``), else static."""
    max_rows: int = 16
    """Decoder rows in flight (inflight) or per batch (static)."""
    max_queue: int = 64
    """Requests waiting to start; more are refused (503) at once."""
    request_timeout_s: float = 60.0
    threads: int | None = None
    check_files: bool = True

    def __post_init__(self) -> None:
        if self.batching not in BATCHING_CHOICES:
            raise ValueError(f"batching must be one of {', '.join(BATCHING_CHOICES)}, got {self.batching!r}")
        if self.max_rows < 1 or self.max_queue < 1:
            raise ValueError("max_rows and max_queue must be at least 1")
