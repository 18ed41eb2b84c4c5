"""The C++ runtime (runtime/cpp): same export directory, same token ids as the Python runtime.

Builds the library and ``cbart-generate`` with CMake once per session (skipped, saying why, when
cmake, a compiler, nlohmann-json or npm for the ONNX Runtime headers is missing).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from cbart.compression import save_checkpoint
from cbart.compression.config import PAPER_GENERATION as PAPER
from cbart.exporter import external_weights
from cbart.exporter.export import ExportOptions, export_onnx
from cbart.runtime.generator import Seq2SeqRuntime
from cbart.runtime.lm_head_screen import ROWS_FILE
from cbart.runtime.manifest import read_manifest
from conftest import random_batch, tiny_compressed

ROOT = Path(__file__).resolve().parents[1]
CPP = ROOT / "runtime" / "cpp"


@pytest.fixture(scope="session")
def binary(tmp_path_factory) -> Path:
    missing = [tool for tool in ("cmake", "c++", "npm") if shutil.which(tool) is None]
    if missing or not Path("/usr/include/nlohmann/json.hpp").is_file():
        pytest.skip(f"C++ toolchain incomplete (missing: {missing or ['nlohmann-json3-dev']}); see runtime/cpp/README")
    build = Path(os.environ.get("CBART_CPP_BUILD", tmp_path_factory.mktemp("cpp-build")))
    ort_root = build / "onnxruntime"
    subprocess.run([str(CPP / "scripts" / "make_ort_root.sh"), str(ort_root)], check=True, capture_output=True)
    subprocess.run(
        ["cmake", "-S", str(CPP), "-B", str(build), f"-DONNXRUNTIME_ROOT={ort_root}"], check=True, capture_output=True
    )
    subprocess.run(["cmake", "--build", str(build), "-j", "2"], check=True, capture_output=True)
    return build / "cbart-generate"


@pytest.fixture(scope="module", params=["paper", "token"])
def exported(request, tmp_path_factory):
    model = tiny_compressed(request.param, seed=13, positions=160)
    root = tmp_path_factory.mktemp(f"cpp-{request.param}")
    save_checkpoint(model, root / "ckpt")
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "paper":  # its weights outside the graphs, as a bart-base-sized export has them
            patch.setattr(external_weights, "MIN_EXTERNAL_BYTES", 1024)
        export_onnx(root / "ckpt", root / "onnx", ExportOptions(progress=False), log=lambda *_: None)
    assert any((root / "onnx").glob("*.onnx.data")) == (request.param == "paper")
    return model, root / "onnx"


def run(binary: Path, directory: Path, requests: list[dict]) -> subprocess.CompletedProcess:
    lines = "\n".join(json.dumps(r) for r in requests) + "\n"
    return subprocess.run(
        [str(binary), str(directory), "--threads", "1"], input=lines, capture_output=True, text=True, timeout=300
    )


def sequences(seed: int) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    ids, mask = random_batch([12, 5, 9], seed=seed)
    return ids, mask, [row[: int(m.sum())].tolist() for row, m in zip(ids, mask, strict=True)]


SETTINGS = [
    {"num_beams": 1, "max_new_tokens": 20},
    {"num_beams": 1, "max_new_tokens": 20, "min_new_tokens": 16, "no_repeat_ngram_size": 2},
    PAPER,
    {"num_beams": 3, "max_new_tokens": 15, "repetition_penalty": 1.3},
    {"num_beams": 4, "num_return_sequences": 2, "max_new_tokens": 9, "early_stopping": "never"},
]
EXPECTED_PROCESSORS = {  # the tiny models force EOS at the length limit (forced_eos_token_id=2)
    json.dumps(settings, sort_keys=True): names
    for settings, names in zip(
        SETTINGS,
        [
            ["forced_eos"],
            ["no_repeat_ngram", "min_new_tokens", "forced_eos"],
            ["no_repeat_ngram", "min_length", "forced_eos"],
            ["repetition_penalty", "forced_eos"],
            ["forced_eos"],
        ],
        strict=True,
    )
}


@pytest.mark.parametrize("settings", SETTINGS)
def test_cpp_token_ids_equal_python_and_pytorch(binary, exported, settings):
    model, directory = exported
    ids, mask, inputs = sequences(seed=len(json.dumps(settings)))
    completed = run(binary, directory, [{"input_ids": inputs, **settings}])
    assert completed.returncode == 0, completed.stderr
    response = json.loads(completed.stdout.splitlines()[0])
    python = Seq2SeqRuntime.from_dir(directory).generate(inputs, **settings)
    assert response["sequences"] == python.sequences
    assert response["sequences"] == model.generate(input_ids=ids, attention_mask=mask, **settings).tolist()
    # the same named processors, in the same order (runtime/processors.py, mirrored in processors.hpp)
    assert response["processors"] == python.processors
    assert python.processors == EXPECTED_PROCESSORS[json.dumps(settings, sort_keys=True)]


def test_cpp_errors_are_clear_and_do_not_crash(binary, exported, tmp_path):
    _, directory = exported
    completed = run(binary, directory, [{"input_ids": []}])
    assert completed.returncode == 1 and "empty input" in completed.stderr
    completed = run(binary, directory, [{"input_ids": [[0, 500, 2]]}])
    assert completed.returncode == 1 and "token id 500 is outside the vocabulary" in completed.stderr
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    (copy / "cross_kv.onnx").write_bytes(b"tampered")
    completed = run(binary, copy, [{"input_ids": [[0, 5, 2]]}])
    assert completed.returncode == 1 and "does not match its manifest" in completed.stderr
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["format_version"] = 7
    (copy / "manifest.json").write_text(json.dumps(manifest))
    completed = run(binary, copy, [{"input_ids": [[0, 5, 2]]}])
    assert completed.returncode == 1 and "format version 7, but this runtime reads version 1" in completed.stderr
    completed = run(binary, tmp_path / "nothing", [])
    assert completed.returncode == 1 and "has no manifest.json" in completed.stderr


def test_both_runtimes_bind_by_name_and_refuse_the_same_broken_contract(binary, exported, tmp_path):
    """Names the runtimes bind (runtime/manifest.py's contract, mirrored in contract.hpp), renamed in a real
    export's manifest: Python and C++ both refuse the directory, naming that same tensor."""
    from cbart.runtime.manifest import ExportDirectoryError, contract_names

    _, directory = exported
    manifest = json.loads((directory / "manifest.json").read_text())
    contract = contract_names(read_manifest(directory))
    assert contract["decoder_step"][0][:4] == ["input_ids", "encoder_attention_mask", "past_key_0", "past_value_0"]
    assert contract["decoder_step"][1][:3] == ["logits", "present_key_0", "present_value_0"]
    copy = tmp_path / "broken"
    shutil.copytree(directory, copy)
    for graph, (inputs, outputs) in contract.items():
        for side, names in (("inputs", inputs), ("outputs", outputs)):
            for name in {*names[:1], *names[-1:]}:  # the first and the last name of each list
                broken = json.loads(json.dumps(manifest))
                for tensor in broken["graphs"][graph][side]:
                    if tensor["name"] == name:
                        tensor["name"] = f"{name}_renamed"
                (copy / "manifest.json").write_text(json.dumps(broken))
                expected = f"{graph} in {copy} has no {side[:-1]} '{name}'"
                with pytest.raises(ExportDirectoryError) as error:
                    read_manifest(copy, check_files=False)
                assert str(error.value).startswith(expected), str(error.value)
                completed = run(binary, copy, [{"input_ids": [[0, 5, 2]]}])
                assert completed.returncode == 1 and expected in completed.stderr, completed.stderr


def test_cpp_screened_greedy_on_a_larger_vocabulary(binary, tmp_path, monkeypatch):
    """600 tokens: the screen prunes most of them (96-token models mostly fall back to the whole head). The
    weights are outside the graphs: the decoder's embedding is the screen's rows file."""
    model = tiny_compressed("paper", seed=5, vocab_size=600, positions=80)
    save_checkpoint(model, tmp_path / "ckpt")
    monkeypatch.setattr(external_weights, "MIN_EXTERNAL_BYTES", 1024)
    export_onnx(tmp_path / "ckpt", tmp_path / "onnx", ExportOptions(progress=False), log=lambda *_: None)
    ids, mask = random_batch([15, 4, 9], vocab_size=600, seed=3)
    inputs = [row[: int(m.sum())].tolist() for row, m in zip(ids, mask, strict=True)]
    settings = {"num_beams": 1, "max_new_tokens": 24, "min_new_tokens": 20}
    completed = run(binary, tmp_path / "onnx", [{"input_ids": inputs, **settings}])
    assert completed.returncode == 0, completed.stderr
    got = json.loads(completed.stdout.splitlines()[0])["sequences"]
    assert got == model.generate(input_ids=ids, attention_mask=mask, **settings).tolist()
    (shared,) = read_manifest(tmp_path / "onnx").shared_weights
    assert shared.file == ROWS_FILE and "decoder_step" in shared.initializers  # the tied embedding is the rows
    if Path("/proc/self/maps").is_file():  # ... mapped once, by the screen, whose mapping the session reads
        process = subprocess.Popen(
            [str(binary), str(tmp_path / "onnx"), "--threads", "1"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            process.stdin.write(json.dumps({"input_ids": inputs, **settings}) + "\n")
            process.stdin.flush()
            assert json.loads(process.stdout.readline())["sequences"] == got
            maps = Path(f"/proc/{process.pid}/maps").read_text().splitlines()
        finally:
            process.stdin.close()
            process.wait(timeout=60)
        rows = str(tmp_path / "onnx" / ROWS_FILE)
        assert len([line for line in maps if line.endswith(rows)]) == 1


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """A speculative pair whose draft partly agrees (noise on the decoder layers), int8 draft."""
    from cbart.exporter.pair import export_pair
    from test_speculative import full_model, noisy_copy

    model = full_model()
    root = tmp_path_factory.mktemp("cpp-pair")
    model.save_pretrained(root / "full")
    noisy_copy(model, 0.02).save_pretrained(root / "draft")
    options = ExportOptions(progress=False)
    export_pair(root / "full", root / "draft", root / "pair", options, "int8", log=lambda *_: None)
    return model, root / "pair"


@pytest.mark.parametrize(
    "settings",
    [
        {"max_new_tokens": 24, "speculative": True},
        {"max_new_tokens": 20, "no_repeat_ngram_size": 2, "speculative": 3},
        {"max_new_tokens": 16, "min_new_tokens": 10, "repetition_penalty": 1.3, "speculative": 1},
    ],
)
def test_cpp_speculative_decoding_mirrors_python(binary, pair, settings):
    """Same token ids as the full model's greedy search, and the same proposals and acceptances as Python."""
    model, directory = pair
    ids, mask = random_batch([9, 4, 13, 6], seed=3)
    inputs = [row[: int(m.sum())].tolist() for row, m in zip(ids, mask, strict=True)]
    completed = run(binary, directory, [{"input_ids": inputs, **settings}])
    assert completed.returncode == 0, completed.stderr
    got = json.loads(completed.stdout.splitlines()[0])
    python = Seq2SeqRuntime.from_dir(directory).generate(inputs, **settings)
    plain = {key: value for key, value in settings.items() if key != "speculative"}
    assert got["sequences"] == python.sequences
    assert got["sequences"] == model.generate(input_ids=ids, attention_mask=mask, num_beams=1, **plain).tolist()
    assert python.speculation is not None
    stats = python.speculation.to_dict()
    assert got["speculation"] == {key: stats[key] for key in got["speculation"]}
    assert 0 < stats["accepted"] < stats["proposed"]


def test_cpp_speculative_errors(binary, pair, exported):
    _, directory = exported
    completed = run(binary, directory, [{"input_ids": [[0, 5, 2]], "speculative": True}])
    assert completed.returncode == 1
    assert "has no draft decoder; speculative decoding needs a pair export" in completed.stderr
    _, pair_directory = pair
    completed = run(binary, pair_directory, [{"input_ids": [[0, 5, 2]], "speculative": True, "num_beams": 2}])
    assert completed.returncode == 1 and "speculative decoding is greedy" in completed.stderr
    completed = run(binary, pair_directory, [{"input_ids": [[0, 5, 2]], "speculative": 0}])
    assert completed.returncode == 1 and "draft length >= 1" in completed.stderr


def test_checkpoint_generation_defaults_are_honoured_by_both_runtimes(binary, tmp_path):
    """A fine-tuned checkpoint's generation_config.json (min/max new tokens, no-repeat n-grams, sampling by
    default): the export carries it, and both runtimes called without arguments match model.generate()."""
    model = tiny_compressed("paper", seed=21, positions=160)
    model.generation_config.update(min_new_tokens=7, max_new_tokens=11, no_repeat_ngram_size=2, num_beams=2)
    save_checkpoint(model, tmp_path / "ckpt")
    export_onnx(tmp_path / "ckpt", tmp_path / "onnx", ExportOptions(progress=False), log=lambda *_: None)
    ids, mask, inputs = sequences(seed=4)
    expected = model.generate(input_ids=ids, attention_mask=mask).tolist()
    assert {len(row) for row in expected} == {12}  # the defaults are in force: 11 new tokens, EOS banned early
    assert Seq2SeqRuntime.from_dir(tmp_path / "onnx").generate(inputs).sequences == expected
    completed = run(binary, tmp_path / "onnx", [{"input_ids": inputs}])
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout.splitlines()[0])["sequences"] == expected

    model.generation_config.update(do_sample=True, top_k=4, num_beams=1)
    save_checkpoint(model, tmp_path / "sampling")
    export_onnx(tmp_path / "sampling", tmp_path / "sampling-onnx", ExportOptions(progress=False), log=lambda *_: None)
    runtime = Seq2SeqRuntime.from_dir(tmp_path / "sampling-onnx")
    assert runtime.settings().do_sample and runtime.settings().top_k == 4
    completed = run(binary, tmp_path / "sampling-onnx", [{"input_ids": inputs}])
    assert completed.returncode == 1 and "the C++ runtime does not sample" in completed.stderr
    completed = run(binary, tmp_path / "sampling-onnx", [{"input_ids": inputs, "do_sample": False}])
    greedy = model.generate(input_ids=ids, attention_mask=mask, do_sample=False).tolist()
    assert json.loads(completed.stdout.splitlines()[0])["sequences"] == greedy
    assert runtime.generate(inputs, do_sample=False).sequences == greedy


def test_one_truncation_policy_in_both_runtimes(binary, exported):
    """Over-long inputs: truncated to the model's maximum with EOS kept last, by default, in both runtimes (same
    ids, same warning); refused with the limit named when truncation is off."""
    import warnings

    _, directory = exported
    too_long = [[0, *[4 + i % 90 for i in range(200)], 2], [0, 7, 8, 2]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        python = Seq2SeqRuntime.from_dir(directory).generate(too_long, max_new_tokens=6).sequences
    message = "truncating 1 input(s) to the model's maximum of 160 tokens"
    assert [str(w.message) for w in caught] == [message]
    completed = run(binary, directory, [{"input_ids": too_long, "max_new_tokens": 6}])
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout.splitlines()[0])["sequences"] == python
    assert message in completed.stderr
    completed = run(binary, directory, [{"input_ids": too_long, "truncation": False}])
    assert completed.returncode == 1
    assert "input of 202 tokens exceeds the model's maximum of 160; shorten it" in completed.stderr


def test_an_older_manifest_without_generation_defaults_still_runs(binary, exported, tmp_path):
    """Exports written before the defaults were carried: rules stay off, and max_length must come with the
    request (neither runtime invents one); both say so."""
    _, directory = exported
    copy = tmp_path / "older"
    shutil.copytree(directory, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["generation"] = {}
    manifest["verification"] = {
        key: manifest["verification"][key] for key in ("passed", "outputs", "greedy_identical", "token_agreement")
    }
    (copy / "manifest.json").write_text(json.dumps(manifest))
    runtime = Seq2SeqRuntime.from_dir(copy)
    assert runtime.manifest.verification is not None and runtime.manifest.verification.onnx_checker == "not run"
    with pytest.raises(ValueError, match="carries no max_length .* pass max_new_tokens"):
        runtime.generate([[0, 5, 6, 2]])
    python = runtime.generate([[0, 5, 6, 2]], max_new_tokens=5).sequences
    completed = run(binary, copy, [{"input_ids": [[0, 5, 6, 2]]}])
    assert completed.returncode == 1 and "carries no max_length" in completed.stderr
    completed = run(binary, copy, [{"input_ids": [[0, 5, 6, 2]], "max_new_tokens": 5}])
    assert json.loads(completed.stdout.splitlines()[0])["sequences"] == python


def test_cpp_reads_an_inflight_export(binary, tmp_path):
    """An --inflight export's decoder step also takes positions and a self-attention mask: C++ feeds them."""
    model = tiny_compressed("paper", seed=7, positions=160)
    save_checkpoint(model, tmp_path / "ckpt")
    export_onnx(tmp_path / "ckpt", tmp_path / "onnx", ExportOptions(inflight=True, progress=False), log=lambda *_: None)
    ids, mask, inputs = sequences(5)
    for settings in ({"num_beams": 1, "max_new_tokens": 12}, {"num_beams": 3, "max_new_tokens": 8}):
        completed = run(binary, tmp_path / "onnx", [{"input_ids": inputs, **settings}])
        assert completed.returncode == 0, completed.stderr
        expected = model.generate(input_ids=ids, attention_mask=mask, **settings).tolist()
        assert json.loads(completed.stdout)["sequences"] == expected
