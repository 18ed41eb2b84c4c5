"""In-flight batching: an --inflight export generates exactly as before, and a request's ids are the same
whether it ran alone or joined a busy batch at any step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cbart.compression import save_checkpoint
from cbart.exporter.export import ExportOptions, export_onnx
from cbart.exporter.options import ExportError, check_combination
from cbart.runtime.generator import Seq2SeqRuntime
from cbart.runtime.inflight import InflightBatch, InflightRequest
from conftest import random_batch, tiny_compressed, tiny_inflight_export


def quiet(*_: object) -> None:
    return None


@pytest.fixture(scope="module", params=["screened", "plain"])
def inflight_export(request, tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """A tiny compressed model exported with --inflight (verified at export against PyTorch)."""
    screen = "on" if request.param == "screened" else "off"
    return tiny_inflight_export(
        tmp_path_factory.mktemp("inflight"), 5, lm_head_screen=screen, with_torch=screen == "off"
    )


def sources(count: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[0, *rng.integers(4, 96, int(rng.integers(3, 20))).tolist(), 2] for _ in range(count)]


def test_an_inflight_export_generates_like_pytorch(inflight_export):
    model, directory = inflight_export
    ids, mask = random_batch([12, 5, 9], seed=3)
    expected = model.generate(input_ids=ids, attention_mask=mask, num_beams=1, max_new_tokens=16).tolist()
    beams = {"num_beams": 3, "max_new_tokens": 10, "no_repeat_ngram_size": 2}
    expected_beams = model.generate(input_ids=ids, attention_mask=mask, **beams).tolist()
    sequences = [row[: int(m.sum())].tolist() for row, m in zip(ids, mask, strict=True)]
    backends = ["onnxruntime", "torch"] if (directory / "torch").is_dir() else ["onnxruntime"]
    for backend in backends:
        runtime = Seq2SeqRuntime.from_dir(directory, backend=backend)
        assert runtime.manifest.per_row_positions
        assert runtime.generate(sequences, max_new_tokens=16).sequences == expected
        assert runtime.generate(sequences, **beams).sequences == expected_beams


SETTINGS = [
    {"max_new_tokens": 14},
    {"max_new_tokens": 9, "min_new_tokens": 6, "no_repeat_ngram_size": 2},
    {"max_new_tokens": 12, "repetition_penalty": 1.4},
    {"max_new_tokens": 11, "do_sample": True, "top_k": 8, "seed": 3, "num_return_sequences": 2},
    {"max_new_tokens": 7},
    {"max_new_tokens": 13, "do_sample": True, "top_p": 0.9, "temperature": 0.7, "seed": 11},
]


def test_requests_joining_a_busy_batch_get_the_ids_they_get_alone(inflight_export):
    _, directory = inflight_export
    runtime = Seq2SeqRuntime.from_dir(directory)
    inputs = sources(len(SETTINGS), seed=1)
    alone = [runtime.generate([ids], **settings).sequences for ids, settings in zip(inputs, SETTINGS, strict=True)]

    batch = InflightBatch(runtime)
    requests = [InflightRequest(ids, runtime.settings(**s)) for ids, s in zip(inputs, SETTINGS, strict=True)]
    arrivals = {0: requests[:2], 1: requests[2:3], 4: requests[3:5], 9: requests[5:]}  # step -> who joins
    finished: list[InflightRequest] = []
    rows_seen = []
    step = 0
    while len(finished) < len(requests):
        batch.join(arrivals.get(step, []))
        rows_seen.append(batch.rows)
        finished += batch.step()
        step += 1
        assert step < 100
    assert max(rows_seen) >= 4  # requests really shared steps
    for request, expected in zip(requests, alone, strict=True):
        assert request.sequences == expected


def test_a_cancelled_request_leaves_and_frees_its_rows(inflight_export):
    _, directory = inflight_export
    runtime = Seq2SeqRuntime.from_dir(directory)
    first, second = sources(2, seed=4)
    long = runtime.settings(max_new_tokens=30, min_new_tokens=30)
    batch = InflightBatch(runtime)
    stay, go = InflightRequest(first, long), InflightRequest(second, long)
    batch.join([stay, go])
    batch.step()
    go.cancelled = True
    assert batch.step() == [go]
    assert batch.rows == 1 and batch.session.rows == 1
    while not batch.step():
        pass
    assert stay.sequences == runtime.generate([first], max_new_tokens=30, min_new_tokens=30).sequences


def test_inflight_needs_an_inflight_export_and_refuses_beams(inflight_export, tmp_path):
    _, directory = inflight_export
    runtime = Seq2SeqRuntime.from_dir(directory)
    with pytest.raises(ValueError, match="run beam search alone"):
        InflightBatch(runtime).join([InflightRequest([0, 5, 2], runtime.settings(num_beams=2))])
    model = tiny_compressed("paper", seed=5)
    save_checkpoint(model, tmp_path / "ckpt")
    export_onnx(tmp_path / "ckpt", tmp_path / "plain", ExportOptions(progress=False, verify=False), log=quiet)
    with pytest.raises(ValueError, match="re-export with `cbart export --inflight`"):
        InflightBatch(Seq2SeqRuntime.from_dir(tmp_path / "plain"))
    with pytest.raises(ExportError, match="drop --inflight with --to trt"):
        check_combination(ExportOptions(inflight=True), "trt")
