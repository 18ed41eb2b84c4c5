"""The Python runtime on ONNX Runtime: token ids equal ``model.generate()``; errors are clear."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from cbart.compression import save_checkpoint
from cbart.compression.config import PAPER_GENERATION as PAPER
from cbart.exporter.export import ExportOptions, export_onnx
from cbart.runtime.generator import Seq2SeqRuntime
from cbart.runtime.manifest import ExportDirectoryError
from conftest import random_batch, tiny_compressed

LENGTHS = [12, 5, 9]


def quiet(*_: object) -> None:
    return None


@pytest.fixture(scope="module", params=["paper", "token"])
def exported(request, tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    model = tiny_compressed(request.param, seed=11, positions=160)
    root = tmp_path_factory.mktemp(request.param)
    save_checkpoint(model, root / "ckpt")
    export_onnx(root / "ckpt", root / "onnx", ExportOptions(with_torch=True, progress=False), log=quiet)
    return model, root / "onnx"


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    ids, mask = random_batch(LENGTHS, seed=seed)
    return ids, mask, [row[: int(m.sum())].tolist() for row, m in zip(ids, mask, strict=True)]


def reference(model, ids, mask, **settings) -> list[list[int]]:
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, **settings).tolist()


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_greedy_batch_of_mixed_lengths_equals_pytorch(exported, backend):
    model, directory = exported
    runtime = Seq2SeqRuntime.from_dir(directory, backend=backend)
    for seed in range(3):
        ids, mask, sequences = inputs(seed)
        settings = {"num_beams": 1, "do_sample": False, "max_new_tokens": 20}
        assert runtime.generate(sequences, **settings).sequences == reference(model, ids, mask, **settings)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_beam_search_with_the_papers_settings_equals_pytorch(exported, backend):
    model, directory = exported
    runtime = Seq2SeqRuntime.from_dir(directory, backend=backend)
    ids, mask, sequences = inputs(1)
    expected = reference(model, ids, mask, **PAPER)
    assert runtime.generate(sequences, **PAPER).sequences == expected
    assert all(55 <= len(row) <= 144 for row in expected)


@pytest.mark.parametrize(
    "settings",
    [
        {"num_beams": 3, "max_new_tokens": 15},
        {"num_beams": 2, "length_penalty": 0.5, "early_stopping": False, "max_new_tokens": 10},
        {"num_beams": 4, "num_return_sequences": 3, "max_new_tokens": 9, "early_stopping": "never"},
        {"num_beams": 1, "repetition_penalty": 1.3, "min_new_tokens": 6, "max_new_tokens": 12},
    ],
)
def test_other_search_settings_equal_pytorch(exported, settings):
    model, directory = exported
    runtime = Seq2SeqRuntime.from_dir(directory)
    ids, mask, sequences = inputs(2)
    assert runtime.generate(sequences, **settings).sequences == reference(model, ids, mask, **settings)


def test_sampling_is_seeded_and_top_k_1_is_greedy(exported):
    _, directory = exported
    runtime = Seq2SeqRuntime.from_dir(directory)
    _, _, sequences = inputs(3)
    first = runtime.generate(sequences, do_sample=True, top_p=0.9, temperature=0.8, seed=5, max_new_tokens=10)
    again = runtime.generate(sequences, do_sample=True, top_p=0.9, temperature=0.8, seed=5, max_new_tokens=10)
    assert first.sequences == again.sequences
    greedy = runtime.generate(sequences, num_beams=1, max_new_tokens=10).sequences
    assert runtime.generate(sequences, do_sample=True, top_k=1, seed=1, max_new_tokens=10).sequences == greedy
    several = runtime.generate(sequences[:1], do_sample=True, num_return_sequences=3, seed=0, max_new_tokens=10)
    assert len(several.sequences) == 3


def test_encode_once_decode_many(exported):
    _, directory = exported
    runtime = Seq2SeqRuntime.from_dir(directory)
    _, _, sequences = inputs(4)
    encoded = runtime.encode(sequences)
    assert (
        runtime.generate(encoded=encoded, max_new_tokens=8).sequences
        == runtime.generate(sequences, max_new_tokens=8).sequences
    )
    assert (
        runtime.generate(encoded=encoded, num_beams=3, max_new_tokens=8).sequences
        == runtime.generate(sequences, num_beams=3, max_new_tokens=8).sequences
    )


def test_streaming_yields_the_greedy_tokens(exported):
    _, directory = exported
    runtime = Seq2SeqRuntime.from_dir(directory)
    _, _, sequences = inputs(5)
    streamed = list(runtime.stream([sequences[0]], max_new_tokens=12))
    greedy = runtime.generate([sequences[0]], max_new_tokens=12).sequences[0]
    assert streamed == [t for t in greedy[1:] if t != runtime.manifest.tokens.eos][: len(streamed)]
    assert len(streamed) >= 1


def test_one_runtime_from_several_threads(exported):
    _, directory = exported
    runtime = Seq2SeqRuntime.from_dir(directory, threads=1)
    jobs = [inputs(seed)[2] for seed in range(6)]
    expected = [runtime.generate(job, num_beams=2, max_new_tokens=10).sequences for job in jobs]
    results: dict[int, list[list[int]]] = {}

    def work(index: int) -> None:
        results[index] = runtime.generate(jobs[index], num_beams=2, max_new_tokens=10).sequences

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[i] for i in range(len(jobs))] == expected


def test_input_errors(exported):
    _, directory = exported
    runtime = Seq2SeqRuntime.from_dir(directory)
    with pytest.raises(ValueError, match="empty input"):
        runtime.generate([])
    with pytest.raises(ValueError, match="has no tokens"):
        runtime.generate([[]])
    with pytest.raises(ValueError, match="has no tokenizer; pass token ids"):
        runtime.generate("some text")
    too_long = [[0, *[4 + i % 90 for i in range(200)], 2]]
    with pytest.raises(ValueError, match="202 tokens exceeds the model's maximum of 160"):
        runtime.generate(too_long, truncation=False)
    with pytest.warns(UserWarning, match="truncating 1 input"):
        out = runtime.generate(too_long, max_new_tokens=3)
    assert len(out.sequences) == 1
    with pytest.raises(ValueError, match="token id 500 is outside the vocabulary \\(0..95\\)"):
        runtime.generate([[0, 500, 2]])
    with pytest.raises(TypeError, match="unknown generation argument"):
        runtime.generate([[0, 5, 2]], beams=3)
    with pytest.raises(ValueError, match="num_return_sequences \\(5\\) cannot exceed num_beams \\(2\\)"):
        runtime.generate([[0, 5, 2]], num_beams=2, num_return_sequences=5)


def test_directory_errors(exported, tmp_path):
    _, directory = exported
    manifest_without_torch = json.loads((directory / "manifest.json").read_text())
    manifest_without_torch["torch_graphs"] = {}
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "manifest.json").write_text(json.dumps(manifest_without_torch))
    with pytest.raises(ExportDirectoryError, match="export with `cbart export --with-torch`"):
        Seq2SeqRuntime.from_dir(bare, backend="torch", check_files=False)
    assert json.loads((directory / "manifest.json").read_text())["torch_device"] == "cpu"
    with pytest.raises(ExportDirectoryError, match="traced for cpu .* `cbart export --with-torch --torch-device cuda`"):
        Seq2SeqRuntime.from_dir(directory, backend="torch", device="cuda")
    with pytest.raises(ValueError, match="--torch-device must be cpu or cuda, got 'mps'"):
        ExportOptions(with_torch=True, torch_device="mps")
    with pytest.raises(ValueError, match="--torch-device chooses where .* are traced; add --with-torch"):
        ExportOptions(torch_device="cuda")
    with pytest.raises(ValueError, match="unknown backend 'tvm'"):
        Seq2SeqRuntime.from_dir(directory, backend="tvm")
    with pytest.raises(ValueError, match="cuda_graphs applies to the tensorrt backend only, not 'onnxruntime'"):
        Seq2SeqRuntime.from_dir(directory, cuda_graphs=True)
    with pytest.raises(ExportDirectoryError, match="has no manifest.json"):
        Seq2SeqRuntime.from_dir(tmp_path)
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(directory, copy)
    with (copy / "decoder_step.onnx").open("r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00\x01\x02")
    with pytest.raises(ExportDirectoryError, match="decoder_step.onnx .* does not match its manifest"):
        Seq2SeqRuntime.from_dir(copy)
    (copy / "decoder_step.onnx").unlink()
    with pytest.raises(ExportDirectoryError, match="is missing decoder_step.onnx"):
        Seq2SeqRuntime.from_dir(copy)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportDirectoryError, match="format version 99, but this runtime reads version 1"):
        Seq2SeqRuntime.from_dir(copy)
    if "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers():
        with pytest.raises(RuntimeError, match="has no CUDAExecutionProvider"):
            Seq2SeqRuntime.from_dir(directory, device="cuda")


def test_timings_are_reported(exported):
    _, directory = exported
    out = Seq2SeqRuntime.from_dir(directory).generate([[0, 7, 8, 2]], max_new_tokens=4)
    assert set(out.timings) == {"encode_s", "decode_s", "total_s"} and out.timings["total_s"] > 0
    assert np.isfinite(out.timings["decode_s"])
