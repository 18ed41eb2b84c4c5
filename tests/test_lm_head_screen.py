"""The screened LM head: its error bound holds on ONNX Runtime's kernel, and greedy search stays exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from cbart.compression import save_checkpoint
from cbart.exporter.export import ExportError, ExportOptions, export_onnx, export_tensorrt
from cbart.exporter.lm_head_screen import add_screened_lm_head
from cbart.runtime.backends.onnxruntime import OrtDecoderSession, ScreenedOrtDecoderSession
from cbart.runtime.generator import Seq2SeqRuntime
from cbart.runtime.lm_head_screen import LogitScreen
from cbart.runtime.processors import NEG_INF
from conftest import random_batch, tiny_compressed
from onnx import TensorProto, helper, numpy_helper

VOCAB, WIDTH = 4000, 768


def quiet(*_: object) -> None:
    return None


@pytest.fixture(scope="module")
def head(tmp_path_factory) -> tuple[ort.InferenceSession, LogitScreen, np.ndarray, np.ndarray]:
    """A bart-base-wide LM head (MatMul + bias, as traced from the decoder step), screened."""
    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((VOCAB, WIDTH)) * 0.02).astype(np.float32)
    bias = rng.normal(0, 0.1, VOCAB).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["state", "weight"], ["product"]),
            helper.make_node("Add", ["product", "bias"], ["logits"]),
        ],
        "lm_head",
        [helper.make_tensor_value_info("state", TensorProto.FLOAT, ["decoder_batch", "target_length", WIDTH])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["decoder_batch", "target_length", VOCAB])],
        [numpy_helper.from_array(rows.T.copy(), "weight"), numpy_helper.from_array(bias, "bias")],
    )
    directory = tmp_path_factory.mktemp("head")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(directory / "head.onnx"))
    add_screened_lm_head(directory / "head.onnx")
    session = ort.InferenceSession(str(directory / "head.onnx"), providers=["CPUExecutionProvider"])
    return session, LogitScreen(directory), rows, bias


def hidden_states(seed: int) -> np.ndarray:
    """LayerNorm-like rows, rows with outlier channels (as trained transformers have) and tiny rows."""
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((6, WIDTH)).astype(np.float32)
    hidden[1, rng.integers(0, WIDTH, 4)] *= 40
    hidden[2, :8] = 60.0
    hidden[3] *= 1e-3
    hidden[4] = np.abs(hidden[4])  # all positive: no cancellation to hide quantization errors
    return hidden


def run_head(session: ort.InferenceSession, hidden: np.ndarray, exact: bool) -> tuple[np.ndarray, np.ndarray]:
    """Logits [rows, vocab] and the part of ``hidden`` that went through the 8-bit head."""
    logits, echoed, residual = session.run(None, {"state": hidden[:, None, :], "exact_logits": np.array(exact)})
    np.testing.assert_array_equal(echoed[:, 0, :], hidden)
    return logits[:, 0, :], residual[:, 0, :]


@pytest.mark.parametrize("seed", range(4))
def test_bound_holds_on_onnxruntimes_kernel(head, seed):
    session, screen, rows, bias = head
    hidden = hidden_states(seed)
    exact, _ = run_head(session, hidden, True)
    approximate, residual = run_head(session, hidden, False)
    np.testing.assert_allclose(exact, hidden @ rows.T + bias, rtol=1e-5, atol=1e-4)
    assert not np.array_equal(exact, approximate)  # the else branch really is the 8-bit one
    outliers = (residual == 0) & (hidden != 0)
    assert (outliers.sum(axis=1) == 8).all() and outliers[2, :8].all()  # the largest channels go to fp32
    np.testing.assert_array_equal(np.where(outliers, hidden, residual), hidden)
    for row in range(len(hidden)):
        error = np.abs(approximate[row] - exact[row])
        assert (error <= screen.radius(hidden[row], residual[row])).all()


def test_refine_returns_the_exact_argmax_under_masking_processors(head):
    session, screen, rows, bias = head
    hidden = hidden_states(7)
    hidden[0] = rows[123] * 50  # a peaked row, as a trained model's usually is
    exact = hidden @ rows.T + bias
    approximate, residual = run_head(session, hidden, False)
    ranking = np.argsort(-exact, axis=1)
    banned = ranking[:, :2]  # mask each row's two best tokens (min length, n-gram bans) ...
    banned[0] = ranking[0, 1:3]  # ... but keep the peak of row 0
    masked = approximate.copy()
    np.put_along_axis(masked, banned, NEG_INF, axis=1)
    expected = exact.copy()
    np.put_along_axis(expected, banned, NEG_INF, axis=1)
    refined = screen.refine(masked, hidden, residual)
    np.testing.assert_array_equal(refined.argmax(axis=1), expected.argmax(axis=1))
    candidates = np.isfinite(refined).sum(axis=1)
    assert candidates[0] < 20 and (candidates < VOCAB // 8).all()  # tokens proven not to win are skipped
    chosen = refined.argmax(axis=1)
    np.testing.assert_allclose(refined[np.arange(6), chosen], expected[np.arange(6), chosen], rtol=1e-5)

    forced = np.full_like(approximate, NEG_INF)
    forced[:, 9] = 0.0  # forced BOS/EOS: one finite score
    refined = screen.refine(forced, hidden, residual)
    assert (refined.argmax(axis=1) == 9).all() and np.isfinite(refined).sum() == 6


def test_a_flat_distribution_falls_back_to_the_whole_head(head, monkeypatch):
    session, screen, rows, bias = head
    hidden = hidden_states(3)
    monkeypatch.setattr(screen, "max_candidates", 0)
    approximate, residual = run_head(session, hidden, False)
    refined = screen.refine(approximate, hidden, residual)
    np.testing.assert_allclose(refined, hidden @ rows.T + bias, rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> tuple[torch.nn.Module, Path, Path]:
    model = tiny_compressed("paper", seed=5, vocab_size=600, positions=80)
    root = tmp_path_factory.mktemp("screen")
    save_checkpoint(model, root / "ckpt")
    for screen in ("on", "off"):
        export_onnx(root / "ckpt", root / screen, ExportOptions(lm_head_screen=screen, progress=False), log=quiet)
    return model, root / "on", root / "off"


@pytest.mark.parametrize(
    "settings",
    [
        {"max_new_tokens": 24},
        {"max_new_tokens": 24, "min_new_tokens": 20, "no_repeat_ngram_size": 2},
        {"max_new_tokens": 12, "repetition_penalty": 1.4},  # rescales logits: the exact head is used
    ],
)
def test_screened_greedy_equals_pytorch_and_the_unscreened_export(exports, settings, monkeypatch):
    model, screened_dir, plain_dir = exports
    candidates: list[int] = []  # tokens recomputed in fp32, per row and step
    original = LogitScreen.refine

    def counting(self, scores, hidden, residual):
        exact = original(self, scores, hidden, residual)
        candidates.extend(np.isfinite(exact).sum(axis=1).tolist())
        return exact

    monkeypatch.setattr(LogitScreen, "refine", counting)
    ids, mask = random_batch([15, 4, 9], vocab_size=600, seed=3)
    sequences = [row[: int(m.sum())].tolist() for row, m in zip(ids, mask, strict=True)]
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, num_beams=1, **settings).tolist()
    screened = Seq2SeqRuntime.from_dir(screened_dir).generate(sequences, **settings).sequences
    plain = Seq2SeqRuntime.from_dir(plain_dir).generate(sequences, **settings).sequences
    assert screened == expected == plain
    if "repetition_penalty" in settings:
        assert not candidates
    else:
        assert candidates and max(candidates) < 600 // 4  # the screen skips most of the vocabulary


def test_screen_is_off_for_exports_that_cannot_use_it(exports, tmp_path):
    _, screened_dir, plain_dir = exports
    runtime = Seq2SeqRuntime.from_dir(plain_dir)
    encoded = runtime.encode([[0, 5, 6, 2]])
    assert type(runtime.backend.start(encoded, 1)) is OrtDecoderSession
    assert runtime.manifest.lm_head_screen is None and not (plain_dir / "lm_head_rows.npy").exists()
    graph = onnx.load(str(plain_dir / "decoder_step.onnx"))
    assert not [node for node in graph.graph.node if node.op_type == "If"]  # what TensorRT can parse
    screened = Seq2SeqRuntime.from_dir(screened_dir)
    assert isinstance(screened.backend.start(screened.encode([[0, 5, 6, 2]]), 1), ScreenedOrtDecoderSession)

    with pytest.raises(ValueError, match="fp32 exports only"):
        ExportOptions(lm_head_screen="on", dtype="fp16")
    with pytest.raises(ValueError, match="lm_head_screen must be one of"):
        ExportOptions(lm_head_screen="yes")
    with pytest.raises(ExportError, match="MatMulNBits"):
        export_tensorrt(screened_dir, tmp_path / "trt", limits=None, options=ExportOptions(lm_head_screen="on"))
    assert not (tmp_path / "trt").exists()


def test_every_graph_of_a_default_export_passes_onnxs_full_check(exports):
    """The screen's If node comes after every value its branches read (ONNX Runtime tolerates less)."""
    _, screened_dir, plain_dir = exports
    for directory in (screened_dir, plain_dir):
        for graph in sorted(directory.glob("*.onnx")):
            onnx.checker.check_model(str(graph), full_check=True)
