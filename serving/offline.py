"""Offline generation over a JSON-lines file: resumable, in this process or on a Ray cluster (Ray Data).

Every output row is its input row with ``generated`` and an ``id`` (the input's own ``id`` field, else its
line number), so rows may finish in any order. Rows are appended and flushed as they finish; a rerun skips the
ids already in the output (a line cut off by a crash is dropped first), so a stopped run resumes where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm


@dataclass
class OfflineJob:
    export_dir: Path
    input_path: Path
    output_path: Path
    text_field: str = "source"
    parameters: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 8
    threads: int | None = None
    originals: dict[Any, dict[str, Any]] = field(default_factory=dict, repr=False)
    """The input rows by id, read by ``pending_rows``: output rows keep their fields."""


class BatchGenerator:
    """Generates for a batch of rows ``{"id", field: text or ids}``; one per process or Ray actor (it loads the
    runtime once)."""

    def __init__(self, export_dir: str, threads: int | None, text_field: str, parameters: dict[str, Any]) -> None:
        from cbart.runtime.generator import Seq2SeqRuntime

        self.runtime = Seq2SeqRuntime.from_dir(export_dir, threads=threads)
        self.text_field = text_field
        self.parameters = parameters

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[str]]:
        ids = [value.item() if hasattr(value, "item") else value for value in batch["id"]]  # NumPy from Ray Data
        output = self.runtime.generate(list(batch[self.text_field]), **self.parameters)
        results = output.texts or output.sequences
        returned = len(results) // len(ids)
        rows = [results[index * returned : (index + 1) * returned] for index in range(len(ids))]
        lines = [
            json.dumps({"id": row_id, "generated": result[0] if returned == 1 else result}, ensure_ascii=False)
            for row_id, result in zip(ids, rows, strict=True)
        ]
        return {"line": lines}


def pending_rows(job: OfflineJob) -> tuple[list[dict[str, Any]], int]:
    """Input rows whose id is not in the output yet, and how many are done."""
    rows = []
    for number, line in enumerate(job.input_path.read_text(encoding="utf-8").splitlines()):
        if line.strip():
            row = json.loads(line)
            job.originals[row.get("id", number)] = row
            if job.text_field not in row:
                raise KeyError(
                    f"field {job.text_field!r} not in line {number + 1} of {job.input_path}; fields: {sorted(row)}"
                )
            rows.append({"id": row.get("id", number), job.text_field: row[job.text_field]})
    if not rows:
        raise ValueError(f"{job.input_path} has no rows")
    done = _finished_ids(job.output_path)
    return [row for row in rows if row["id"] not in done], len(done)


def _finished_ids(path: Path) -> set[Any]:
    """Ids already written; a trailing line without its newline (a crash mid-write) is cut off first."""
    if not path.is_file():
        return set()
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        path.write_text(text, encoding="utf-8")
    return {json.loads(line)["id"] for line in text.splitlines() if line.strip()}


def _batches(rows: list[dict[str, Any]], size: int, text_field: str) -> Iterator[dict[str, list[Any]]]:
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        yield {"id": [row["id"] for row in chunk], text_field: [row[text_field] for row in chunk]}


def generate_file(job: OfflineJob, ray_actors: int | None = None, progress: bool = True) -> int:
    """Generate for every pending row; ``ray_actors``: that many runtimes as a Ray Data actor pool (on the cluster
    ``ray.init()`` connects to), else one runtime here. Returns the number of rows written."""
    rows, done = pending_rows(job)
    bar = tqdm(total=len(rows) + done, initial=done, desc="generating", unit="row", disable=not progress)
    written = 0
    with job.output_path.open("a", encoding="utf-8") as output:
        for lines in _results(job, rows, ray_actors):
            for line in lines:
                result = json.loads(line)
                merged = {**job.originals[result["id"]], **result}
                output.write(json.dumps(merged, ensure_ascii=False) + "\n")
            output.flush()
            written += len(lines)
            bar.update(len(lines))
    bar.close()
    return written


def _results(job: OfflineJob, rows: list[dict[str, Any]], ray_actors: int | None) -> Iterator[list[str]]:
    arguments = (str(job.export_dir), job.threads, job.text_field, job.parameters)
    if not rows:
        return
    if ray_actors is None:
        generator = BatchGenerator(*arguments)
        for batch in _batches(rows, job.batch_size, job.text_field):
            yield generator(batch)["line"]
        return
    import ray

    if not ray.is_initialized():
        ray.init()
    dataset = ray.data.from_items(rows).map_batches(
        BatchGenerator,
        fn_constructor_args=arguments,
        batch_size=job.batch_size,
        batch_format="numpy",
        concurrency=ray_actors,
        num_cpus=job.threads or 1,
    )
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        yield [str(line) for line in batch["line"]]
