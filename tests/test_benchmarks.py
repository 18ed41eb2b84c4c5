"""The quality benchmarks end to end on the shared real data, at smoke size."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from cbart.benchmarks import cnn_dailymail, latency
from cbart.benchmarks.models import ModelSpec
from cbart.benchmarks.quality import data as quality_data
from cbart.benchmarks.quality import sequence_kd, stats
from cbart.benchmarks.quality.run import check_recipe
from cbart.benchmarks.quality.run import main as quality_main
from cbart.benchmarks.quality.translation import MAX_NEW_TOKENS, QUICK
from cbart.benchmarks.speculative import main as speculative_main
from cbart.compression.config import PAPER_GENERATION
from cbart.compression.data import Example, load_tokenizer
from cbart.runtime.generator import Seq2SeqRuntime


def test_bare_bpe_folder_loads_as_the_bart_tokenizer(shared_data: Path) -> None:
    tokenizer = load_tokenizer(shared_data / "tokenizer" / "bart")
    assert tokenizer("Hello world")["input_ids"] == [0, 31414, 232, 2]


def test_trimmed_vocabulary_round_trips_keeps_special_ids_and_maps_unseen_ids_to_unk() -> None:
    examples = [Example([0, 900, 17, 2], [0, 40000, 17, 2]), Example([0, 5, 2, 1], [0, 3, 2])]
    vocabulary = quality_data.TrimmedVocabulary.from_examples(examples, [0, 1, 2, 3])
    assert vocabulary.kept == (0, 1, 2, 3, 5, 17, 900, 40000)
    compact = vocabulary.compact([0, 40000, 17, 2, 1])
    assert compact == [0, 7, 5, 2, 1]
    assert vocabulary.original(compact) == [0, 40000, 17, 2, 1]
    assert vocabulary.compact([0, 31414, 2]) == [0, 3, 2]  # never seen in training: <unk>


def test_trimmed_vocabulary_refuses_specials_that_are_not_the_smallest_ids() -> None:
    with pytest.raises(ValueError, match="special ids"):
        quality_data.TrimmedVocabulary.from_examples([Example([0, 5], [0, 5])], [0, 50264])


def test_stratified_split_is_deterministic_disjoint_and_balanced() -> None:
    labels = [i % 4 for i in range(100)]
    train, test = quality_data.stratified_split(labels, test_per_class=5)
    assert (train, test) == quality_data.stratified_split(labels, test_per_class=5)
    assert not set(train) & set(test) and sorted(train + test) == list(range(100))
    assert [sum(labels[i] == label for i in test) for label in range(4)] == [5, 5, 5, 5]
    with pytest.raises(ValueError, match="cannot hold out 30"):
        quality_data.stratified_split(labels, test_per_class=30)


def test_bootstrap_bleu_matches_sacrebleu_and_a_paired_difference_of_a_system_with_itself_is_zero() -> None:
    import sacrebleu

    hypotheses = ["a b c d", "x y", "the cat sat on it", "on the mat", "one two three four five"]
    references = ["a b c e", "x y z", "the cat sat on it", "on a mat", "one two three four six"]
    statistics = stats.bleu_statistics(hypotheses, references)
    interval = stats.bootstrap(statistics, stats.bleu_from_statistics, resamples=200)
    assert interval.value == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [references]).score)
    assert interval.low <= interval.value <= interval.high and interval.low < interval.high
    same = stats.paired_bootstrap(statistics, statistics, stats.bleu_from_statistics, resamples=200)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)
    worse = stats.bleu_statistics(["a", "x", "the", "on", "one"], references)
    delta = stats.paired_bootstrap(worse, statistics, stats.bleu_from_statistics, resamples=200)
    assert delta.high < 0


def test_accuracy_interval_brackets_the_accuracy() -> None:
    statistics = stats.accuracy_statistics([1, 0, 1, 1] * 25, [1, 1, 1, 1] * 25)
    interval = stats.bootstrap(statistics, stats.accuracy_from_statistics)
    assert interval.value == 75.0 and 60 < interval.low < 75 < interval.high < 90


def test_a_work_folder_refuses_models_of_another_recipe(tmp_path: Path) -> None:
    check_recipe(tmp_path, QUICK)
    check_recipe(tmp_path, replace(QUICK, base_epochs=9))  # more epochs: training resumes
    with pytest.raises(SystemExit, match="another recipe .*d_model"):
        check_recipe(tmp_path, replace(QUICK, d_model=96))


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


def test_quality_quick_preset_trains_exports_scores_and_reuses(tmp_path: Path, shared_data: Path, capsys) -> None:
    arguments = ["--quick", "--work", str(tmp_path / "work"), "--results", str(tmp_path), "--no-progress"]
    assert quality_main(arguments) == 0
    payload = json.loads((tmp_path / "quality-quick.json").read_text())
    rows = {row["model"]: row for row in payload["translation"]}
    assert list(rows) == ["base", "compressed-32", "compressed-32-distilled"]
    for name, row in rows.items():
        assert row["beam"]["low"] <= row["beam"]["value"] <= row["beam"]["high"]
        assert row["ms_fp32"]["median"] > 0 and row["ms_int8"]["median"] > 0
        assert row["finetune"]["step_seconds"] > 0
        assert ("beam_delta" in row) == (name != "base")
    assert rows["compressed-32"]["decoder_parameters"] < rows["base"]["decoder_parameters"]
    assert rows["base"]["finetune"]["trainable_parameters"] > rows["compressed-32"]["finetune"]["trainable_parameters"]
    assert [row["model"] for row in payload["classification"]] == ["base", "compressed-32"]
    assert payload["training"]["base"]["evaluations"][-1]["epoch"] == QUICK.base_epochs
    assert 1000 < payload["vocabulary"] < 50265
    for plot in ("quality-quick.png", "quality-quick-curves.png"):
        assert (tmp_path / plot).stat().st_size > 0
    capsys.readouterr()
    assert quality_main(arguments) == 0
    assert "[base] reusing" in capsys.readouterr().out  # the second run measures without training again
    work = tmp_path / "work"
    assert quality_main([*arguments, "--train-only", "--variants", "seqkd", "--tasks", "translation"]) == 0
    targets = json.loads((work / sequence_kd.CACHE).read_text())
    assert len(targets) == QUICK.train_rows and all(t and t[-1] == 2 for t in targets)  # EOS-terminated
    base = Seq2SeqRuntime.from_dir(work / "exports" / "base-fp32")
    sources = [example.input_ids for example in quality_data.load_multi30k(QUICK.train_rows, 1).train[:3]]
    greedy = base.generate(sources, max_new_tokens=MAX_NEW_TOKENS).sequences
    assert targets[:3] == [sequence_kd.as_labels(ids, decoder_start=2, pad=1) for ids in greedy]
    assert (work / "compressed-32-seqkd" / "config.json").is_file()
    speculative = ["--work", str(work), "--sentences", "6", "--rounds", "1", "--skip-random", "--threads", "1"]
    assert speculative_main([*speculative, "--results", str(tmp_path / "speculative.json")]) == 0
    rows = json.loads((tmp_path / "speculative.json").read_text())["trained"]["rows"]
    assert [row["system"] for row in rows] == ["cbart:fp32"] + [
        f"cbart:{precision}+spec / compressed-32{suffix}"
        for suffix in ("", "-distilled", "-seqkd")
        for precision in ("fp32", "int8")
    ]
    assert all(row["identical_to_full"] == 6 for row in rows)
    assert all(0 <= row["acceptance_rate"] <= 1 for row in rows[1:])


def test_sequence_kd_targets_take_the_layout_of_tokenized_labels() -> None:
    assert sequence_kd.as_labels([2, 0, 57, 81, 2, 1, 1], decoder_start=2, pad=1) == [0, 57, 81, 2]
    assert sequence_kd.as_labels([2, 0, 57, 81], decoder_start=2, pad=1) == [0, 57, 81]  # cut at the length limit


def test_bench_reports_tensorrt_as_skipped_with_the_reason_when_it_cannot_run(tmp_path: Path, capsys) -> None:
    from cbart.runtime.trt_support import TensorRTUnavailable, require_tensorrt

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


def test_a_result_faster_than_the_floor_is_reported_as_a_bug() -> None:
    cell = latency.Cell(1, 512, 1, 64)
    engine = latency.Engine("cbart", ModelSpec(384), "fp32")
    slow = latency.summarise(engine, cell, [{"t1": [0.1], "tn": [5.0], "peak_rss_mib": 1.0}], bandwidth=10.0)
    fast = latency.summarise(engine, cell, [{"t1": [0.1], "tn": [0.1063], "peak_rss_mib": 1.0}], bandwidth=10.0)
    assert slow.percent_of_floor < 100 < fast.percent_of_floor
    assert latency.floor_violations([slow]) == []
    (line,) = latency.floor_violations([slow, fast])
    assert line.startswith("BUG: cbart ONNX Runtime fp32 / compressed-384 on batch 1, src 512, greedy, 64 new reached")


def test_the_compiled_read_probe_reads_every_element(tmp_path: Path) -> None:
    from cbart.benchmarks.bandwidth import compiled_read_kernel

    read = compiled_read_kernel(tmp_path)
    if read is None:
        pytest.skip("no C compiler with OpenMP here: the probe is left out of the floor, as on this machine")
    values = np.arange(1, 100_001, dtype=np.float32) % 7
    assert read(values, 2) == pytest.approx(float(values.sum(dtype=np.float64)), rel=1e-4)


def test_graph_choices_table_lists_the_measured_rows_only() -> None:
    from cbart.benchmarks.graph_choices import table

    text = table(
        {"full_lm-head-exact_ms_per_token": 24.61, "full_lm-head-screened_ms_per_token": 17.02, "shared_beam4_s": 1.0}
    )
    assert text.splitlines()[2:] == [
        "| full greedy decode, LM head (batch 1, src 512, ms/token) | exact fp32: 24.6 | screened: 17.0 |"
    ]


def test_gpu_check_refuses_to_run_without_a_gpu_and_summarises_rows(tmp_path: Path, capsys) -> None:
    from cbart.benchmarks import gpu_check

    if not torch.cuda.is_available():
        assert gpu_check.main([str(tmp_path)]) == 2
        assert "no CUDA GPU is visible; run with --dry-run" in capsys.readouterr().err
        assert not (tmp_path / "gpu-check.json").exists()
    rows = [
        {"kind": "generation", "system": "transformers", "model": "full", "dtype": "bf16", "batch": 8,
         "decode_ms_per_token": 9.0, "total_s": 1.0},
        {"kind": "generation", "system": "transformers", "model": "compressed-384", "dtype": "bf16", "batch": 8,
         "decode_ms_per_token": 4.5, "total_s": 0.8},
        {"kind": "generation", "system": "transformers", "model": "compressed-384", "dtype": "bf16", "batch": 1,
         "decode_ms_per_token": 4.0, "total_s": 0.5},
        {"kind": "generation", "system": "cbart-torch", "model": "full", "dtype": "fp32", "batch": 8, "error": "boom"},
        {"kind": "training", "model": "full", "dtype": "fp32", "cuda_max_allocated_mib": 8000.0},
        {"kind": "training", "model": "compressed-384", "dtype": "fp32", "cuda_max_allocated_mib": 3000.0},
    ]  # fmt: skip
    assert gpu_check.summary(rows) == {
        "transformers bf16, batch 8: decode speed-up": 2.0,
        "transformers bf16, batch 8: end-to-end speed-up": 1.25,
        "training step memory, compressed / full (cuda_max_allocated_mib)": 0.375,
    }


def test_gpu_summary_pairs_full_with_compressed_per_batch_and_reports_failures(tmp_path: Path) -> None:
    from cbart.benchmarks.readme import gpu_summary

    assert "No GPU figure is measured yet" in gpu_summary(tmp_path)
    sizes = {"batch": 1, "source": 512, "new_tokens": 64, "repeats": 3, "train_batch": 8, "train_source": 512,
             "train_target": 128}  # fmt: skip
    generation = {"kind": "generation", "system": "transformers", "dtype": "fp32", "batch": 64}
    rows = [
        {**generation, "model": "full", "decode_ms_per_token": 6.0, "encoder_and_first_token_s": 0.02,
         "gpu_peak_mib": 2000.0},
        {**generation, "model": "compressed-384", "decode_ms_per_token": 4.0, "encoder_and_first_token_s": 0.015,
         "gpu_peak_mib": 1500.0},
        {**generation, "system": "cbart-torch", "model": "full", "error": "timed out after 300 s"},
        {"kind": "training", "model": "full", "dtype": "fp32", "cuda_max_allocated_mib": 4000.0},
        {"kind": "training", "model": "compressed-384", "dtype": "fp32", "cuda_max_allocated_mib": 1000.0},
    ]  # fmt: skip
    report = {"command": "bash benchmarks/gpu_check.sh out", "date": "2026-11-30", "device": "NVIDIA H200",
              "torch": "2.11.0", "sizes": sizes, "rows": rows}  # fmt: skip
    (tmp_path / "gpu-check-h200.json").write_text(json.dumps(report))
    text = gpu_summary(tmp_path)
    assert "| transformers fp32 | 64 | 6.00 → 4.00 | 1.50x | 20.0 → 15.0 | 2000 → 1500 |" in text
    assert "cbart-torch" not in text.split("\n\n")[1]  # its compressed row is missing: no pair, no table row
    assert "4000 MiB of GPU memory at peak for the full model, 1000 MiB for compressed-384" in text
    assert "(0.25x)" in text
    assert "1 step(s) failed in that run: timed out after 300 s." in text


def test_each_peer_runs_in_its_own_environment() -> None:
    pythons = latency.peer_pythons(["/venvs/peers/bin/python", "openvino=/venvs/ov/bin/python"])
    full = ModelSpec(None)
    assert latency.interpreter(latency.Engine("openvino", full, "int8"), pythons) == "/venvs/ov/bin/python"
    assert latency.interpreter(latency.Engine("ctranslate2", full, "fp32"), pythons) == "/venvs/peers/bin/python"
    assert latency.interpreter(latency.Engine("cbart", full, "fp32"), pythons) == sys.executable
    with pytest.raises(SystemExit, match="'openvno' is not a peer; peers are optimum, ctranslate2, openvino"):
        latency.peer_pythons(["openvno=/venvs/ov/bin/python"])
    with pytest.raises(SystemExit, match="--peers openvino:bf16: openvino runs fp32, int8, default"):
        latency.main(["--quick", "--systems", "cbart", "--peers", "openvino:bf16"])
    with pytest.raises(SystemExit, match="--peers onnxruntime: unknown peer 'onnxruntime'"):
        latency.main(["--quick", "--systems", "cbart", "--peers", "onnxruntime"])


def test_every_row_reports_how_many_new_token_ids_equal_transformers() -> None:
    cell = latency.Cell(2, 512, 1, 3)
    full = ModelSpec(None)
    engines = [latency.Engine(system, full, "fp32") for system in ("transformers", "openvino", "cbart")]
    engines.append(latency.Engine("cbart", ModelSpec(384), "fp32"))  # no transformers row for compressed-384
    ids = {
        "transformers": [[5, 6, 7], [8, 9, 10]],
        "openvino": [[5, 6, 7], [8, 9, 11]],
        "cbart": [[5, 6, 7], [8, 9, 10]],
    }
    rounds = {
        engine: [{"t1": [0.1], "tn": [0.5], "peak_rss_mib": 1.0, "ids": ids.get(engine.system, [[1, 2, 3]] * 2)}]
        for engine in engines
    }
    results = {engine: latency.summarise(engine, cell, rounds[engine], bandwidth=10.0) for engine in engines}
    latency.compare_ids(results, rounds)
    assert [r.ids_agreement for r in results.values()] == [1.0, 5 / 6, 1.0, None]
    assert all("ids" not in entry for r in results.values() for entry in r.rounds)  # not stored in the results
    table = latency.markdown(list(results.values()))
    assert "| OpenVINO (optimum-intel) fp32 / full |" in table and "| 83% |" in table and table.endswith("| - |")
    assert latency.ids_agreement([[1, 2]], [[1, 2, 3]]) == 2 / 3  # a missing position disagrees


def test_the_beamsearch_op_peer_generates_transformers_ids_but_the_forced_eos(tmp_path: Path) -> None:
    from cbart.benchmarks import ort_beamsearch, worker
    from conftest import tiny_bart_config
    from transformers import BartForConditionalGeneration

    torch.manual_seed(0)
    model = BartForConditionalGeneration(tiny_bart_config()).eval()
    model.save_pretrained(tmp_path / "bart")
    ort_beamsearch.build(tmp_path / "bart", tmp_path / "op")
    ids = np.array([[0, 5, 17, 33, 9, 2], [0, 50, 60, 70, 80, 2]], dtype=np.int64)
    for beams in (1, 4):
        generate = worker.ort_beamsearch_system(tmp_path / "op", ids, beams, threads=1)
        with torch.no_grad():
            expected = model.generate(
                input_ids=torch.from_numpy(ids), num_beams=beams, do_sample=False, min_new_tokens=8, max_new_tokens=8
            ).tolist()
        actual = generate(8)
        # the op has no forced-EOS processor: transformers' last token is EOS, the op's is the model's choice
        assert [row[:-1] for row in actual] == [row[:-1] for row in expected]
        assert all(row[-1] == 2 for row in expected)
        assert [len(row) for row in generate(1)] == [3, 3]  # start + 2 new: the op cannot stop after one


def test_peer_targets_compare_cbart_with_the_fastest_peer_at_each_precision(tmp_path: Path) -> None:
    from cbart.benchmarks.readme import peer_targets

    assert "Not measured yet" in peer_targets(tmp_path)
    cell = {"batch": 8, "source": 512, "beams": 1, "new_tokens": 64}

    def row(system: str, model: str, precision: str, median: float, encoder: float, rss: float) -> dict:
        engine = f"{system} {precision} / {model}"
        return {"system": system, "model": model, "precision": precision, "cell": cell, "engine": engine,
                "median_s": median, "encoder_s": encoder, "peak_rss_mib": rss}  # fmt: skip

    rows = [
        row("cbart", "full", "fp32", 2.0, 1.0, 1500.0),
        row("cbart", "full", "int8", 1.5, 0.6, 900.0),
        row("cbart", "compressed-384", "int8", 0.7, 0.5, 700.0),
        row("ctranslate2", "full", "fp32", 2.8, 0.9, 1000.0),
        row("openvino", "full", "fp32", 2.4, 1.2, 2000.0),  # the fastest fp32 peer end to end
        row("ctranslate2", "full", "int8", 1.2, 0.5, 500.0),
        row("openvino", "full", "default", 1.0, 0.4, 1900.0),  # the fastest of any precision
        row("transformers", "full", "fp32", 9.0, 2.0, 900.0),  # not a peer
    ]
    payload = {"command": "cbart bench --peers ...", "date": "2026-11-30", "threads": 2,
               "cpu": {"cpu": "AMD EPYC", "flags": ["avx2"]}, "results": rows}  # fmt: skip
    (tmp_path / "latency-peers.json").write_text(json.dumps(payload))
    table = peer_targets(tmp_path)
    label = "batch 8, src 512, greedy, 64 new"
    assert (
        f"| {label} | cbart full fp32 vs the fastest fp32 peer (openvino fp32 / full) | >= 1.3x | 1.20x | no |" in table
    )
    assert (
        f"| {label} | cbart full int8 vs the fastest int8 peer (ctranslate2 int8 / full) | >= 1.0x | 0.80x | no |"
        in table
    )
    assert (
        "compressed-384 int8 vs the fastest peer of any precision (openvino default / full) | >= 2.0x | 1.43x |"
        in table
    )
    assert (
        "encoder + first token, cbart full fp32 vs the fastest fp32 peer's (ctranslate2 fp32 / full) | >= 1.0x | 0.90x"
        in table
    )
    assert "peak RSS, cbart full fp32 vs CTranslate2 fp32 | <= 1.2x | 1.50x (1500 vs 1000 MiB) | no |" in table
    assert "peak RSS, cbart full int8 vs CTranslate2 int8 | <= 1.2x | 1.80x (900 vs 500 MiB) | no |" in table
