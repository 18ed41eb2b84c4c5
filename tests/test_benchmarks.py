"""The quality benchmarks end to end on the shared real data, at smoke size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import cnn_dailymail, latency, quality
from benchmarks.models import ModelSpec
from compression.config import PAPER_GENERATION
from compression.data import Example, load_tokenizer


def test_bare_bpe_folder_loads_as_the_bart_tokenizer(shared_data: Path) -> None:
    tokenizer = load_tokenizer(shared_data / "tokenizer" / "bart")
    assert tokenizer("Hello world")["input_ids"] == [0, 31414, 232, 2]


def test_trimmed_vocabulary_round_trips_and_keeps_special_ids() -> None:
    examples = [Example([0, 900, 17, 2], [0, 40000, 17, 2]), Example([0, 5, 2, 1], [0, 3, 2])]
    vocabulary = quality.TrimmedVocabulary.from_examples(examples, [0, 1, 2, 3])
    assert vocabulary.kept == (0, 1, 2, 3, 5, 17, 900, 40000)
    compact = vocabulary.compact([0, 40000, 17, 2, 1])
    assert compact == [0, 7, 5, 2, 1]
    assert vocabulary.original(compact) == [0, 40000, 17, 2, 1]


def test_trimmed_vocabulary_refuses_specials_that_are_not_the_smallest_ids() -> None:
    with pytest.raises(ValueError, match="special ids"):
        quality.TrimmedVocabulary.from_examples([Example([0, 5], [0, 5])], [0, 50264])


def test_latent_sizes_scale_the_papers_projections() -> None:
    assert cnn_dailymail.latent_sizes(384, 768) == (576, 480, 384)
    assert cnn_dailymail.latent_sizes(384, 128) == (96, 80, 64)
    with pytest.raises(ValueError, match="paper's latent sizes are \\[384, 504\\]"):
        cnn_dailymail.latent_sizes(300, 768)


def test_cnn_dailymail_protocol_smoke_runs_end_to_end(tmp_path: Path, shared_data: Path) -> None:
    arguments = ["--smoke", "--train-limit", "8", "--test-limit", "2", "--max-steps", "2", "--latents", "384"]
    code = cnn_dailymail.main(
        [*arguments, "--work", str(tmp_path / "work"), "--results", str(tmp_path), "--no-progress"]
    )
    assert code == 0
    payload = json.loads((tmp_path / "cnn-dailymail-smoke.json").read_text())
    rows = {row["model"]: row for row in payload["rows"]}
    assert list(rows) == ["full", "compressed-384"]
    for row in rows.values():
        assert all(0.0 <= row[name] <= 100.0 for name in ("rouge1", "rouge2", "rougeLsum"))
    assert rows["compressed-384"]["decoder_parameters"] < rows["full"]["decoder_parameters"]
    assert rows["full"]["rouge1_change_percent"] is None
    assert payload["protocol"]["data"].endswith("test_frank250.jsonl")
    for stage in ("full", "compressed-384-ae", "compressed-384"):
        assert (tmp_path / "work" / stage / "config.json").is_file()
    assert "| compressed-384 |" in payload["table"]
    assert payload["generation"] == PAPER_GENERATION


def test_quality_quick_preset_trains_exports_and_scores(tmp_path: Path, shared_data: Path, capsys) -> None:
    assert quality.main(["--quick", "--work", str(tmp_path / "work"), "--results", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "quality-quick.json").read_text())
    assert [row["model"] for row in payload["rows"]] == ["full (256)", "compressed-128"]
    for row in payload["rows"]:
        assert 0.0 <= row["bleu"] <= 100.0
        assert row["decode_ms_per_token"] > 0
    assert 1000 < payload["vocabulary"] < 50265
    assert (tmp_path / "quality-quick.png").stat().st_size > 0
    capsys.readouterr()
    assert quality.main(["--quick", "--work", str(tmp_path / "work"), "--results", str(tmp_path)]) == 0
    assert "reusing" in capsys.readouterr().out  # the second run measures without training again


def test_bench_reports_tensorrt_as_skipped_with_the_reason_when_it_cannot_run(tmp_path: Path, capsys) -> None:
    from runtime.trt_support import TensorRTUnavailable, require_tensorrt

    try:
        require_tensorrt()
    except TensorRTUnavailable as error:
        reason = str(error)
    else:
        pytest.skip("TensorRT and a GPU are present: the cbart-trt rows run instead")
    arguments = ["--quick", "--systems", "cbart-trt:fp16", "--rounds", "1", "--name", "trt"]
    assert latency.main([*arguments, "--results", str(tmp_path), "--cache", str(tmp_path / "cache")]) == 0
    payload = json.loads((tmp_path / "trt.json").read_text())
    assert payload["results"] == []
    assert payload["skipped"] == [
        f"cbart TensorRT fp16 / {model} on batch 1, src 512, greedy, 64 new: skipped ({reason})"
        for model in ("full", "compressed-384")
    ]
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # nothing was built
    assert "skipped on every cell" in capsys.readouterr().out


def test_latency_table_shows_gpu_memory_next_to_the_peak_rss() -> None:
    cell = latency.Cell(1, 512, 1, 64)
    rounds = [{"t1": [0.1], "tn": [0.74], "peak_rss_mib": 900.0, "gpu_peak_mib": 812.4}]
    engine = latency.Engine("cbart-trt", ModelSpec(384), "fp16")
    row = latency.summarise(engine, cell, rounds, bandwidth=10.0)
    assert row.per_token_ms == pytest.approx(1000 * 0.64 / 63)
    assert "| cbart TensorRT fp16 / compressed-384 | 0.740 (0.740-0.740) | 0.100 | 10.2 | 86.5 | 900 (GPU 812) |" in (
        latency.markdown([row])
    )


def test_the_floor_of_a_screened_greedy_step_counts_the_bytes_it_reads() -> None:
    cell = latency.Cell(1, 512, 1, 64)
    rounds = [{"t1": [0.1], "tn": [1.36], "peak_rss_mib": 900.0}]
    screened = latency.summarise(latency.Engine("cbart", ModelSpec(None), "fp32"), cell, rounds, bandwidth=10.0)
    exact = latency.summarise(latency.Engine("cbart-torch", ModelSpec(None), "fp32"), cell, rounds, bandwidth=10.0)
    head_fp32, head_screened = 4 * 768 * 50265, 768 * 50265 * (1 + 4 / 32) + 4 * 8 * 50265
    assert exact.floor_ms - screened.floor_ms == pytest.approx((head_fp32 - head_screened) / 1e7)


def test_graph_choices_table_lists_the_measured_rows_only() -> None:
    from benchmarks.graph_choices import table

    text = table(
        {"full_lm-head-exact_ms_per_token": 24.61, "full_lm-head-screened_ms_per_token": 17.02, "shared_beam4_s": 1.0}
    )
    assert text.splitlines()[2:] == [
        "| full greedy decode, LM head (batch 1, src 512, ms/token) | exact fp32: 24.6 | screened: 17.0 |"
    ]
