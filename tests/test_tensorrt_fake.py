"""The TensorRT path's control flow on the CPU, through ``fake_tensorrt`` (engines = their ONNX graphs run by ONNX
Runtime at the addresses TensorRT would use; streams and CUDA graphs recorded). What needs the real TensorRT and a
GPU (kernels, precision, CUDA graph replay) is in ``test_tensorrt.py``, marked ``gpu``.
"""

from __future__ import annotations

import importlib
import json
import sys

import fake_tensorrt
import numpy as np
import pytest
import torch
from cbart.compression import save_checkpoint
from cbart.exporter.engine_profiles import EngineLimits
from cbart.exporter.export import ExportOptions, export_tensorrt
from cbart.exporter.options import ExportError
from cbart.runtime.generator import Seq2SeqRuntime
from cbart.runtime.manifest import read_manifest
from conftest import random_batch, tiny_compressed
from torch.overrides import TorchFunctionMode

LIMITS = EngineLimits(
    max_batch=3, opt_batch=2, max_source_length=16, opt_source_length=12, max_new_tokens=20, opt_new_tokens=8, beams=4
)
TRT_MODULES = ("tensorrt", "cbart.runtime.backends.tensorrt", "cbart.exporter.tensorrt_build")
CAPABILITY = "9.0"
HOST_OPS = {"from_numpy", "numpy", "data_ptr", "numel", "__get__", "view", "__getitem__", "dim", "size"}
"""Torch calls that touch no device memory (metadata, host arrays): every other call must be on the stream."""


def quiet(*_: object) -> None:
    return None


@pytest.fixture
def fake_trt(monkeypatch):
    """TensorRT and the CUDA calls cbart makes, faked on the CPU; the real modules are restored afterwards."""
    saved = {name: sys.modules.pop(name) for name in TRT_MODULES if name in sys.modules}
    monkeypatch.setattr(fake_tensorrt, "STATE", fake_tensorrt.State())
    sys.modules["tensorrt"] = fake_tensorrt.module()
    for name, value in (("Stream", fake_tensorrt.FakeStream), ("stream", fake_tensorrt.stream)):
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", fake_tensorrt.FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_tensorrt.graph)
    import cbart.runtime.trt_support as support

    monkeypatch.setattr(support, "cuda_compute_capability", lambda: CAPABILITY)
    backend = importlib.import_module("cbart.runtime.backends.tensorrt")
    build = importlib.import_module("cbart.exporter.tensorrt_build")
    monkeypatch.setattr(backend, "cuda_compute_capability", lambda: CAPABILITY)
    monkeypatch.setattr(build, "cuda_compute_capability", lambda: CAPABILITY)
    monkeypatch.setattr(backend, "cuda_device", lambda device: torch.device("cpu"))
    yield backend, build
    for name in TRT_MODULES:
        sys.modules.pop(name, None)
    sys.modules.update(saved)


@pytest.fixture
def engines(fake_trt, tmp_path):
    model = tiny_compressed("paper", seed=7)
    save_checkpoint(model, tmp_path / "ckpt")
    options = ExportOptions(progress=False, with_torch=True)
    result = export_tensorrt(tmp_path / "ckpt", tmp_path / "trt", LIMITS, options, log=quiet)
    return model, tmp_path / "trt", result


def inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    ids, mask = random_batch([12, 5, 9], seed=seed)
    return ids, mask, [row[: int(m.sum())].tolist() for row, m in zip(ids, mask, strict=True)]


class StreamAudit(TorchFunctionMode):
    """Records every torch call that can touch device memory with the stream current at the time."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, object]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name not in HOST_OPS:
            self.calls.append((name, fake_tensorrt.STATE.current_stream))
        return func(*args, **(kwargs or {}))


def test_export_verifies_the_engines_and_keeps_the_torchscript_graphs(engines):
    model, directory, result = engines
    manifest = read_manifest(directory, check_files=True)  # every file the manifest names exists, hashes match
    assert manifest.backend == "tensorrt" and set(manifest.torch_graphs) == set(manifest.graphs)
    assert manifest.verification.passed and manifest.verification.greedy_identical == "4/4"
    assert result.report.greedy_cases == 4  # 1 + 3 sources: the 3-source batch fits --max-batch 3
    assert max(c.max_abs for c in result.report.comparisons) < 1e-4
    assert {c.graph for c in result.report.comparisons} == {"encoder", "autoencoder", "cross_kv", "decoder_step"}
    builds = fake_tensorrt.STATE.builds
    assert len(builds) == 4 and all("tf32" not in config.flags for config in builds)  # fp32 engines: TF32 off
    assert not list(directory.parent.glob(".trt*")), "no staging directory is left behind"


def test_engine_verification_failure_names_the_numbers_and_writes_nothing(fake_trt, tmp_path):
    save_checkpoint(tiny_compressed("paper", seed=7), tmp_path / "ckpt")
    fake_tensorrt.STATE.output_noise = 0.05
    options = ExportOptions(progress=False, verify=True)
    # ONNX verification runs first on ONNX Runtime and passes; the (noisy) engines then fail theirs
    failure = r"(?s)TensorRT engine verification failed.*encoder.hidden_states .*max abs 0.05.*and \d+ more"
    with pytest.raises(ExportError, match=failure):
        export_tensorrt(tmp_path / "ckpt", tmp_path / "trt", LIMITS, options, log=quiet)
    assert not (tmp_path / "trt").exists()


def test_engines_give_pytorchs_ids_with_every_cuda_call_on_the_backend_stream(engines):
    model, directory, _ = engines
    runtime = Seq2SeqRuntime.from_dir(directory, backend="tensorrt")
    stream = runtime.backend.stream
    ids, mask, sequences = inputs(1)
    for settings in (
        {"num_beams": 1, "max_new_tokens": 12},
        {"num_beams": 4, "length_penalty": 2.0, "no_repeat_ngram_size": 3, "max_new_tokens": 12},
    ):
        fake_tensorrt.STATE.events.clear()
        with StreamAudit() as audit:
            output = runtime.generate(sequences, **settings)
        with torch.no_grad():
            assert output.sequences == model.generate(input_ids=ids, attention_mask=mask, **settings).tolist()
        off_stream = {name for name, current in audit.calls if current is not stream}
        assert not off_stream, f"torch calls outside the backend's stream: {sorted(off_stream)}"
        assert {"index_select", "zeros", "to"} & {name for name, _ in audit.calls}
        launches = [handle for event, handle in fake_tensorrt.STATE.events if event == "execute"]
        assert launches and set(launches) == {stream.cuda_stream}


def test_empty_inputs_are_bound_to_the_placeholder_not_null(engines):
    _, directory, _ = engines
    runtime = Seq2SeqRuntime.from_dir(directory, backend="tensorrt")
    runner = runtime.backend.engines["decoder_step"]
    empty = torch.zeros((2, 4, 0, 8))
    context = runner.engine.create_execution_context()
    runner.bind(context, {"past_key_0": empty, "logits": torch.zeros(3)})
    assert context.addresses["past_key_0"] == runner.placeholder.data_ptr() != 0
    assert runtime.generate([[0, 5, 6, 2]], max_new_tokens=3).sequences  # step 0 binds an empty past


def test_a_refused_shape_and_a_wrong_dtype_get_clear_errors(engines):
    _, directory, _ = engines
    runtime = Seq2SeqRuntime.from_dir(directory, backend="tensorrt")
    runner = runtime.backend.engines["encoder"]
    ids = torch.tensor([[0, 5, 6, 2]])
    with pytest.raises(TypeError, match="input_ids is torch.int32 but the engine expects torch.int64; convert it"):
        runner(runtime.backend.stream, input_ids=ids.int(), attention_mask=torch.ones_like(ids))
    fake_tensorrt.STATE.refuse_shapes = True
    with pytest.raises(ValueError, match=r"refused shape \(1, 4\) for input_ids: .* rebuild the engines with larger"):
        runtime.generate([[0, 5, 6, 2]], max_new_tokens=3)


def test_cuda_graphs_capture_thread_locally_replay_and_fall_back_when_capture_fails(engines):
    _, directory, _ = engines
    plain = Seq2SeqRuntime.from_dir(directory, backend="tensorrt")
    graphed = Seq2SeqRuntime.from_dir(directory, backend="tensorrt", cuda_graphs=True)
    _, _, sequences = inputs(3)
    settings = {"num_beams": 2, "max_new_tokens": 6, "min_new_tokens": 6}
    expected = plain.generate(sequences, **settings).sequences
    fake_tensorrt.STATE.events.clear()
    assert graphed.generate(sequences, **settings).sequences == expected  # captures
    captures = [mode for event, mode in fake_tensorrt.STATE.events if event == "capture"]
    assert captures and all(mode == (graphed.backend.stream, "thread_local") for mode in captures)
    assert graphed.generate(sequences, **settings).sequences == expected  # replays
    assert any(event == "replay" for event, _ in fake_tensorrt.STATE.events)
    (graphs,) = graphed.backend.step_graphs.values()
    assert 0 < graphs.scratch.numel() < graphs.runner.engine.device_memory_size_v2  # sized for this request

    fallback = Seq2SeqRuntime.from_dir(directory, backend="tensorrt", cuda_graphs=True)
    fake_tensorrt.STATE.fail_capture = True
    fake_tensorrt.STATE.events.clear()
    with pytest.warns(RuntimeWarning, match="CUDA graph capture of decoder step 0 failed"):
        assert fallback.generate(sequences, **settings).sequences == expected
    assert fallback.generate(sequences, **settings).sequences == expected  # later requests run without graphs
    assert sum(event == "capture" for event, _ in fake_tensorrt.STATE.events) == 1  # tried once per request shape


def test_half_precision_engines_keep_layernorm_softmax_reductions_and_residual_adds_in_fp32(fake_trt):
    _, build = fake_trt
    layer = fake_tensorrt.FakeLayer
    kinds = fake_tensorrt.LayerType
    network = fake_tensorrt.FakeNetwork(
        [
            layer(kinds.MATRIX_MULTIPLY, ["x"], ["projected"]),
            layer(kinds.ELEMENTWISE, ["x", "projected"], ["residual"], op="sum"),
            layer(kinds.NORMALIZATION, ["residual"], ["normed"]),
            layer(kinds.ELEMENTWISE, ["normed", "normed"], ["squared"], op="prod"),
            layer(kinds.ELEMENTWISE, ["squared", "x"], ["bias"], op="sum"),  # feeds no LayerNorm: may be fp16
            layer(kinds.SOFTMAX, ["bias"], ["probabilities"]),
            layer(kinds.REDUCE, ["probabilities"], ["total"]),
        ]
    )
    kept = build.fp32_islands(network)
    assert [network.layers.index(k) for k in kept] == [2, 5, 6, 1]


def test_a_rejected_timing_cache_is_an_error(fake_trt, tmp_path):
    _, build = fake_trt
    model = tiny_compressed("paper", seed=7)
    save_checkpoint(model, tmp_path / "ckpt")
    fake_tensorrt.STATE.timing_cache_accepted = False
    with pytest.raises(RuntimeError, match="TensorRT rejected the timing cache .* delete it or pass another"):
        export_tensorrt(tmp_path / "ckpt", tmp_path / "trt", LIMITS, ExportOptions(progress=False), log=quiet)
    assert not (tmp_path / "trt").exists()


def test_half_precision_builds_set_their_flags_and_keep_tf32(fake_trt, tmp_path):
    model = tiny_compressed("paper", seed=7)
    save_checkpoint(model, tmp_path / "ckpt")
    limits = EngineLimits(**{**json.loads(json.dumps(LIMITS.__dict__)), "fp16": True})
    result = export_tensorrt(tmp_path / "ckpt", tmp_path / "trt", limits, ExportOptions(progress=False), log=quiet)
    assert result.manifest.precision == "fp16"
    assert all({"fp16", "obey precision constraints", "tf32"} <= config.flags for config in fake_tensorrt.STATE.builds)


def test_the_backend_runs_on_cuda_devices_only(fake_trt):
    backend, _ = fake_trt
    importlib.reload(backend)  # the module's own cuda_device, not the fixture's stand-in
    with pytest.raises(ValueError, match="runs on a CUDA device, not 'cpu'; pass device='cuda' or 'cuda:N'"):
        backend.cuda_device("cpu")
    assert backend.cuda_device("cuda:1") == torch.device("cuda", 1)


def test_engine_sessions_answer_like_onnx_runtime(engines):
    _, directory, _ = engines
    runtime = Seq2SeqRuntime.from_dir(directory, backend="tensorrt")
    session = runtime.backend.sessions()["encoder"]
    ids = np.array([[0, 5, 6, 2]], dtype=np.int64)
    (states,) = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids), "unused": ids})
    assert states.shape == (1, 4, runtime.manifest.model.base_width) and states.dtype == np.float32
