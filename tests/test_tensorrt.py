"""TensorRT engines (``cbart export --to trt``) and the TensorRT runtime backend. Needs an NVIDIA GPU.

Run with ``python -m pytest -m gpu``; without TensorRT or a GPU every test here is skipped,
saying which of the two is missing.
"""

from __future__ import annotations

import json

import pytest
import torch
from cbart.compression import save_checkpoint
from cbart.exporter.engine_profiles import EngineLimits
from cbart.exporter.export import ExportOptions, export_onnx, export_tensorrt
from cbart.runtime.generator import Seq2SeqRuntime
from cbart.runtime.manifest import ExportDirectoryError
from cbart.runtime.trt_support import TensorRTUnavailable, require_tensorrt
from conftest import random_batch, tiny_compressed

pytestmark = pytest.mark.gpu


def _availability() -> str | None:
    try:
        require_tensorrt()
    except TensorRTUnavailable as error:
        return str(error)
    return None


MISSING = _availability()
requires_trt = pytest.mark.skipif(MISSING is not None, reason=f"TensorRT tests skipped: {MISSING}")
LIMITS = EngineLimits(
    max_batch=4,
    opt_batch=2,
    max_source_length=40,
    opt_source_length=16,
    max_new_tokens=24,
    opt_new_tokens=12,
    beams=4,
    workspace_gib=1.0,
)


def quiet(*_: object) -> None:
    return None


@pytest.fixture(scope="module", params=["paper", "token"])
def exports(request, tmp_path_factory):
    model = tiny_compressed(request.param, seed=7)
    root = tmp_path_factory.mktemp(f"trt-{request.param}")
    save_checkpoint(model, root / "ckpt")
    export_onnx(root / "ckpt", root / "onnx", ExportOptions(progress=False), log=quiet)
    export_tensorrt(root / "ckpt", root / "trt", LIMITS, ExportOptions(progress=False), log=quiet)
    return model, root


@requires_trt
def test_engines_generate_pytorchs_token_ids(exports):
    model, root = exports
    runtime = Seq2SeqRuntime.from_dir(root / "trt", backend="tensorrt", device="cuda")
    ids, mask = random_batch([12, 5, 9], seed=1)
    sequences = [row[: int(m.sum())].tolist() for row, m in zip(ids, mask, strict=True)]
    for settings in (
        {"num_beams": 1, "max_new_tokens": 20},
        {"num_beams": 4, "length_penalty": 2.0, "no_repeat_ngram_size": 3, "max_new_tokens": 20},
    ):
        expected = model.generate(input_ids=ids, attention_mask=mask, **settings).tolist()
        assert runtime.generate(sequences, **settings).sequences == expected


@requires_trt
def test_the_export_verified_its_engines_against_pytorch(exports):
    _, root = exports
    verification = json.loads((root / "trt" / "manifest.json").read_text())["verification"]
    cases, identical = verification["greedy_identical"].split("/")[::-1]
    assert verification["passed"] and int(cases) > 0 and identical == cases
    assert set(verification["outputs"]) >= {"encoder.hidden_states", "decoder_step.logits"}


@requires_trt
def test_requests_beyond_the_engine_limits_get_the_flag_that_raises_them(exports):
    _, root = exports
    runtime = Seq2SeqRuntime.from_dir(root / "trt", backend="tensorrt", device="cuda")
    with pytest.raises(ValueError, match="at most 24; rebuild them with a larger --max-new-tokens"):
        runtime.generate([[0, 5, 6, 2]], max_new_tokens=25)
    with pytest.raises(ValueError, match="at most 4; rebuild them with a larger --max-batch"):
        runtime.generate([[0, 5, 6, 2]] * 5, max_new_tokens=4)
    assert runtime.generate([[0, 5, 6, 2]] * 4, max_new_tokens=24, min_new_tokens=24).sequences


@requires_trt
def test_cuda_graph_replays_give_the_same_token_ids(exports):
    _, root = exports
    plain = Seq2SeqRuntime.from_dir(root / "trt", backend="tensorrt", device="cuda")
    graphed = Seq2SeqRuntime.from_dir(root / "trt", backend="tensorrt", device="cuda", cuda_graphs=True)
    ids, mask = random_batch([12, 5, 9], seed=3)
    sequences = [row[: int(m.sum())].tolist() for row, m in zip(ids, mask, strict=True)]
    other = [row[::-1] for row in sequences]  # same shape, other values: replays must not keep stale inputs
    for settings in (
        {"num_beams": 1, "max_new_tokens": 16, "min_new_tokens": 16},
        {"num_beams": 4, "length_penalty": 2.0, "no_repeat_ngram_size": 3, "max_new_tokens": 16},
    ):
        for batch in (sequences, other, sequences):  # the first captures, the others replay
            assert graphed.generate(batch, **settings).sequences == plain.generate(batch, **settings).sequences
    assert len(graphed.backend.step_graphs) == 2  # one set of graphs per request shape


@requires_trt
def test_polygraphy_parity_onnxruntime_vs_tensorrt_on_real_inputs(exports):
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import Comparator, CompareFunc

    _, root = exports
    ids, mask = random_batch([9, 6], seed=3)  # real token ids and masks, not polygraphy's 0/1 defaults
    feeds = [{"input_ids": ids.numpy(), "attention_mask": mask.numpy()}]
    runners = [
        OnnxrtRunner(SessionFromOnnx(str(root / "onnx" / "encoder.onnx"))),
        TrtRunner(EngineFromBytes((root / "trt" / "encoder.plan").read_bytes())),
    ]
    results = Comparator.run(runners, data_loader=feeds)
    assert bool(Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=1e-3, rtol=1e-3)))


@requires_trt
def test_engines_from_another_tensorrt_version_are_refused(exports, tmp_path):
    import shutil

    _, root = exports
    copy = tmp_path / "trt"
    shutil.copytree(root / "trt", copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["engine"]["tensorrt_version"] = "1.0.0"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportDirectoryError, match="built with TensorRT 1.0.0"):
        Seq2SeqRuntime.from_dir(copy, backend="tensorrt", device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
def test_compressed_model_generates_on_cuda():
    model = tiny_compressed("paper").cuda()
    ids, mask = random_batch([8, 5])
    cpu = tiny_compressed("paper").generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, num_beams=2)
    gpu = model.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=8, num_beams=2)
    assert gpu.cpu().tolist() == cpu.tolist()
