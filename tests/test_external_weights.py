"""Weights outside the graphs (``exporter.external_weights``): one copy on disk, one mapping in memory,
and the same token ids as before."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cbart.exporter import external_weights
from cbart.exporter.export import ExportOptions, export_onnx
from cbart.exporter.external_weights import GATHER_ALIAS_SUFFIX, alias_gathered_weights
from cbart.runtime.generator import Seq2SeqRuntime
from cbart.runtime.lm_head_screen import ROWS_FILE
from cbart.runtime.manifest import DECODER_STEP, ENCODER, read_manifest
from conftest import random_batch, tiny_bart_config
from onnx import TensorProto, helper, numpy_helper
from transformers import BartForConditionalGeneration


def quiet(*_: object) -> None:
    return None


def export(tmp_path: Path, name: str, model: BartForConditionalGeneration, external: bool, **options) -> Path:
    """``external``: every initializer moves out of the graphs (a tiny model's are all under the threshold)."""
    model.save_pretrained(tmp_path / f"{name}-ckpt")
    with pytest.MonkeyPatch.context() as patch:
        if external:
            patch.setattr(external_weights, "MIN_EXTERNAL_BYTES", 1024)  # shape inputs (TopK's k) stay inline
        export_onnx(tmp_path / f"{name}-ckpt", tmp_path / name, ExportOptions(progress=False, **options), log=quiet)
    return tmp_path / name


def external_locations(path: Path) -> dict[str, str]:
    """Initializer name -> the file its data is in (inline ones left out)."""
    model = onnx.load(str(path), load_external_data=False)
    return {
        tensor.name: {entry.key: entry.value for entry in tensor.external_data}["location"]
        for tensor in model.graph.initializer
        if tensor.data_location == TensorProto.EXTERNAL
    }


@pytest.fixture(scope="module")
def bart(tmp_path_factory) -> tuple[BartForConditionalGeneration, Path, Path]:
    """A tied-embedding BART exported twice: weights inside the graphs, and every weight outside."""
    model = BartForConditionalGeneration(tiny_bart_config(vocab_size=600)).eval()
    root = tmp_path_factory.mktemp("external")
    return model, export(root, "inline", model, external=False), export(root, "external", model, external=True)


def test_the_tied_embedding_is_stored_once_and_mapped_once(bart):
    _, inline, external = bart
    assert not list(inline.glob("*.onnx.data"))  # the tiny model stays inline by default
    manifest = read_manifest(external)  # hashes of the .data files included
    assert {f"{name}.onnx.data" for name in (ENCODER, DECODER_STEP)} <= set(manifest.files)
    # the encoder's and decoder's embeddings read the screened head's rows file, and nothing else holds them
    encoder, step = (external_locations(external / f"{name}.onnx") for name in (ENCODER, DECODER_STEP))
    assert [file for file in encoder.values() if file == ROWS_FILE] == [ROWS_FILE]
    assert [file for file in step.values() if file == ROWS_FILE] == [ROWS_FILE]
    (shared,) = manifest.shared_weights
    assert shared.file == ROWS_FILE and shared.offset == np.load(external / ROWS_FILE, mmap_mode="r").offset
    assert sorted(shared.initializers) == [DECODER_STEP, ENCODER]
    rows = np.load(external / ROWS_FILE)
    data = sum((external / f"{name}.onnx.data").stat().st_size for name in (ENCODER, DECODER_STEP, "cross_kv"))
    inline_bytes = sum(path.stat().st_size for path in inline.glob("*.onnx"))
    assert data + rows.nbytes < inline_bytes  # two embedding copies fewer, alignment padding included


def test_the_backend_hands_one_mapping_to_every_reader(bart):
    _, _, external = bart
    runtime = Seq2SeqRuntime.from_dir(external)
    backend = runtime.backend
    (array,) = backend.shared.arrays
    assert backend.screen.rows is array  # the screen reads the same mapping the sessions were given
    maps = Path("/proc/self/maps")
    if maps.is_file():
        mapped = [line for line in maps.read_text().splitlines() if line.endswith(str(external / ROWS_FILE))]
        assert len(mapped) == 1, mapped  # ONNX Runtime did not map the rows file a second time


@pytest.mark.parametrize("settings", [{"num_beams": 1}, {"num_beams": 4, "num_return_sequences": 2}])
def test_external_weights_give_the_same_ids(bart, settings):
    model, inline, external = bart
    ids, mask = random_batch([11, 6, 9], vocab_size=600, seed=4)
    inputs = [row[: int(m.sum())].tolist() for row, m in zip(ids, mask, strict=True)]
    settings = {"max_new_tokens": 18, "min_new_tokens": 14, **settings}
    expected = model.generate(input_ids=ids, attention_mask=mask, **settings).tolist()
    assert Seq2SeqRuntime.from_dir(external).generate(inputs, **settings).sequences == expected
    assert Seq2SeqRuntime.from_dir(inline).generate(inputs, **settings).sequences == expected


def test_int8_exports_share_the_embedding_between_encoder_and_decoder(tmp_path):
    """No screen (int8): the decoder step's embedding points at the encoder's copy; both sessions share it."""
    model = BartForConditionalGeneration(tiny_bart_config(vocab_size=600)).eval()
    directory = export(tmp_path, "int8", model, external=True, quantize="int8")
    manifest = read_manifest(directory)
    (shared,) = manifest.shared_weights
    assert shared.file == f"{ENCODER}.onnx.data" and shared.shape == [600, 32]
    assert set(external_locations(directory / f"{DECODER_STEP}.onnx").values()) == {
        f"{ENCODER}.onnx.data",
        f"{DECODER_STEP}.onnx.data",
    }
    ids, mask = random_batch([7, 10], vocab_size=600, seed=2)
    inputs = [row[: int(m.sum())].tolist() for row, m in zip(ids, mask, strict=True)]
    runtime = Seq2SeqRuntime.from_dir(directory)
    assert len(runtime.generate(inputs, max_new_tokens=6, min_new_tokens=6).sequences[0]) == 7  # start + 6


def test_a_gather_beside_a_matmul_reads_an_alias_of_the_same_bytes(tmp_path):
    """ONNX Runtime keeps a prepacked weight's original while a Gather reads it: the Gather gets its own name."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((16, 40)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["product"]),
            helper.make_node("Gather", ["w", "rows"], ["picked"], axis=0),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16]),
            helper.make_tensor_value_info("rows", TensorProto.INT64, [3]),
        ],
        [
            helper.make_tensor_value_info("product", TensorProto.FLOAT, [2, 40]),
            helper.make_tensor_value_info("picked", TensorProto.FLOAT, [3, 40]),
        ],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "g.onnx"))
    shared = external_weights.externalize_weights(tmp_path, {"g": "g.onnx"}, min_bytes=1024)
    assert shared == []  # one reader of the alias, and no other graph
    rewritten = onnx.load(str(tmp_path / "g.onnx"), load_external_data=False)
    assert [node.input[0] for node in rewritten.graph.node] == ["x", "w" + GATHER_ALIAS_SUFFIX]
    locations = {
        tensor.name: [(entry.key, entry.value) for entry in tensor.external_data]
        for tensor in rewritten.graph.initializer
    }
    assert locations["w"] == locations["w" + GATHER_ALIAS_SUFFIX]  # the same bytes, stored once
    assert (tmp_path / "g.onnx.data").stat().st_size == weight.nbytes
    session = ort.InferenceSession(str(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"])
    x, rows = rng.standard_normal((2, 16)).astype(np.float32), np.array([5, 0, 15])
    product, picked = session.run(None, {"x": x, "rows": rows})
    np.testing.assert_allclose(product, x @ weight, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(picked, weight[rows])
    assert alias_gathered_weights(rewritten) == []  # already split: nothing left to alias


def test_an_export_without_shared_weights_in_its_manifest_still_loads(bart, tmp_path):
    """Exports written before ``shared_weights`` joined the manifest: every session maps its own copy."""
    import shutil

    _, _, external = bart
    copy = tmp_path / "older"
    shutil.copytree(external, copy)
    data = json.loads((copy / "manifest.json").read_text())
    del data["shared_weights"]
    (copy / "manifest.json").write_text(json.dumps(data))
    runtime = Seq2SeqRuntime.from_dir(copy)
    assert runtime.backend.shared.arrays == []
    assert runtime.generate([[0, 8, 9, 2]], max_new_tokens=4).sequences
