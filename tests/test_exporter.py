"""``cbart export``: the export directory contract, built-in verification, variants, failures."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from cbart.compression import save_checkpoint
from cbart.exporter import verify as verify_module
from cbart.exporter.export import ExportError, ExportOptions, export_onnx, export_tensorrt
from cbart.exporter.graphs import AutoencoderGraph
from cbart.runtime.generator import Seq2SeqRuntime
from cbart.runtime.manifest import FORMAT_VERSION, read_manifest, sha256_of
from conftest import random_batch, tiny_bart_config, tiny_compressed
from transformers import BartForConditionalGeneration

from cbart.cli import main


def quiet(*_: object) -> None:
    return None


def options(**overrides) -> ExportOptions:
    return ExportOptions(progress=False, **overrides)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return save_checkpoint(tiny_compressed("paper", seed=2), tmp_path / "ckpt")


def test_export_directory_contract(checkpoint: Path, tmp_path: Path, bart_tokenizer):
    bart_tokenizer.save_pretrained(tmp_path / "tok")
    result = export_onnx(checkpoint, tmp_path / "onnx", options(tokenizer=str(tmp_path / "tok")), log=quiet)
    directory = result.directory
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["format"] == "cbart-export" and manifest["format_version"] == FORMAT_VERSION
    assert set(manifest["graphs"]) == {"encoder", "autoencoder", "cross_kv", "decoder_step"}
    for name, entry in manifest["files"].items():
        assert sha256_of(directory / name) == entry["sha256"]
    step = manifest["graphs"]["decoder_step"]
    names = [t["name"] for t in step["inputs"]]
    assert names == [
        "input_ids",
        "encoder_attention_mask",
        "past_key_0",
        "past_value_0",
        "past_key_1",
        "past_value_1",
        "cross_key_0",
        "cross_value_0",
        "cross_key_1",
        "cross_value_1",
        "exact_logits",  # the screened LM head's switch (fp32 ONNX exports)
    ]
    shapes = {t["name"]: t["shape"] for t in step["inputs"]}
    assert shapes["past_key_1"] == ["decoder_batch", 4, "past_length", 4]
    assert shapes["cross_key_0"] == ["batch", 4, 4, "source_length"]  # pre-transposed
    assert shapes["cross_value_0"] == ["batch", 4, "source_length", 4]
    assert [t["name"] for t in step["outputs"]][1:3] == ["present_key_0", "present_value_0"]
    assert step["outputs"][0] == {"name": "logits", "dtype": "float32", "shape": ["decoder_batch", "target_length", 96]}
    assert step["outputs"][-2:] == [
        {"name": name, "dtype": "float32", "shape": ["decoder_batch", "target_length", 16]}
        for name in ("hidden", "hidden_residual")
    ]
    assert manifest["lm_head_screen"] == {
        "rows": "lm_head_rows.npy",
        "bounds": "lm_head_bounds.npy",
        "bits": 8,
        "block_size": 32,
    }
    assert {"lm_head_rows.npy", "lm_head_bounds.npy"} <= set(manifest["files"])
    assert manifest["model"] == {
        "architecture": "compressed_bart",
        "encoder_layers": 2,
        "decoder_layers": 2,
        "decoder_attention_heads": 4,
        "head_dim": 4,
        "base_width": 32,
        "latent_width": 16,
        "latent_sizes": [24, 16],
        "autoencoder_variant": "paper",
        "vocab_size": 96,
        "max_source_positions": 40,
        "max_target_positions": 40,
    }
    assert manifest["tokens"] == {"bos": 0, "pad": 1, "eos": 2, "decoder_start": 2, "forced_bos": None, "forced_eos": 2}
    assert set(manifest["versions"]) >= {"torch", "onnx", "onnxruntime", "transformers"}
    assert manifest["verification"]["passed"] and manifest["verification"]["greedy_identical"] == "4/4"
    assert (directory / "tokenizer" / "tokenizer.json").is_file()
    for spec in manifest["graphs"].values():
        graph = onnx.load(str(directory / spec["file"]))
        assert graph.opset_import[0].version >= 17
        branches = [node for node in graph.graph.node if node.op_type == "If"]
        assert len(branches) == (1 if spec["file"] == "decoder_step.onnx" else 0)  # only the LM head switch


def test_paper_autoencoder_graph_is_sliced_to_the_actual_length(checkpoint: Path, tmp_path: Path):
    export_onnx(checkpoint, tmp_path / "onnx", options(), log=quiet)
    model = tiny_compressed("paper", seed=2)
    session = ort.InferenceSession(str(tmp_path / "onnx" / "autoencoder.onnx"))
    for length in (1, 3, 40):
        hidden = torch.randn(2, length, 32)
        expected = AutoencoderGraph(model)(hidden).detach().numpy()
        np.testing.assert_allclose(session.run(None, {"hidden_states": hidden.numpy()})[0], expected, atol=1e-5)


def test_decoder_step_accepts_an_empty_past_and_beam_shared_cross_kv(checkpoint: Path, tmp_path: Path):
    export_onnx(checkpoint, tmp_path / "onnx", options(), log=quiet)
    manifest = read_manifest(tmp_path / "onnx")
    dims = manifest.model
    cross = ort.InferenceSession(str(tmp_path / "onnx" / "cross_kv.onnx")).run(
        None, {"memory": np.random.rand(2, 5, 16).astype(np.float32)}
    )
    step = ort.InferenceSession(str(tmp_path / "onnx" / "decoder_step.onnx"))
    empty = np.zeros((6, dims.decoder_attention_heads, 0, dims.head_dim), np.float32)
    feeds = {"input_ids": np.full((6, 1), 2), "encoder_attention_mask": np.ones((2, 5), np.int64)}
    names = [t.name for t in manifest.graphs["decoder_step"].inputs]
    feeds.update({name: empty for name in names if name.startswith("past_")})
    feeds.update(dict(zip([n for n in names if n.startswith("cross_")], cross, strict=True)))
    feeds["exact_logits"] = np.array(True)
    logits, *presents, hidden, residual = step.run(None, feeds)
    assert logits.shape == (6, 1, 96) and [p.shape for p in presents] == [(6, 4, 1, 4)] * 4
    assert hidden.shape == residual.shape == (6, 1, 16)
    np.testing.assert_allclose(logits[0], logits[2], atol=1e-6)  # rows 0-2 share source 0
    assert np.abs(logits[0] - logits[3]).max() > 1e-4  # row 3 reads source 1


@pytest.mark.parametrize(
    ("variant", "graphs"),
    [
        ({"optimize": True}, 4),
        ({"quantize": "int8"}, 4),
        ({"dtype": "fp16"}, 4),
        ({"fuse_encoder": True}, 3),
        ({"attention": "plain"}, 4),
    ],
)
def test_variants_are_verified(checkpoint: Path, tmp_path: Path, variant, graphs):
    result = export_onnx(checkpoint, tmp_path / "onnx", options(**variant), log=quiet)
    assert len(result.manifest.graphs) == graphs
    assert result.manifest.verification is not None and result.manifest.verification.passed
    # part of the export's own verification: every graph of every variant passes onnx.checker's full check
    assert result.manifest.verification.onnx_checker == "passed" and not result.report.checker_errors
    attention_nodes = encoder_attention_nodes(tmp_path / "onnx")
    assert attention_nodes == (0 if variant.get("attention") == "plain" else 2)  # one per encoder layer
    assert result.report is not None and result.report.greedy_cases == 4
    if "optimize" in variant:
        assert result.fused["decoder_step"].get("SkipLayerNormalization", 0) > 0
    if "quantize" in variant:
        assert result.manifest.precision == "int8"
        assert 0.5 <= result.report.token_agreement <= 1.0
        assert any(
            n.op_type == "DynamicQuantizeLinear"
            for n in onnx.load(str(tmp_path / "onnx" / "decoder_step.onnx")).graph.node
        )
    runtime = Seq2SeqRuntime.from_dir(tmp_path / "onnx")
    assert len(runtime.generate([[0, 5, 6, 2]], num_beams=2, max_new_tokens=4).sequences) == 1


@pytest.mark.parametrize("attention", ["plain", "fused"])
def test_decoder_step_reads_sizes_once_per_graph_and_fuses_one_attention_per_layer(tmp_path: Path, attention: str):
    """Reshape targets are constants (0/-1) or computed once, so more layers add no Shape nodes; ``fused``
    writes each cached self-attention as one MultiHeadAttention node, ``plain`` (TensorRT) standard ops only."""
    ops = {}
    for layers in (2, 4):
        config = tiny_bart_config()
        config.decoder_layers = layers
        BartForConditionalGeneration(config).save_pretrained(tmp_path / f"bart-{layers}")
        out = tmp_path / f"onnx-{layers}"
        export_onnx(tmp_path / f"bart-{layers}", out, options(attention=attention, lm_head_screen="off"), log=quiet)
        graph = onnx.load(str(out / "decoder_step.onnx")).graph
        ops[layers] = Counter((node.domain or "ai.onnx", node.op_type) for node in graph.node)
    assert ops[2][("ai.onnx", "Shape")] == ops[4][("ai.onnx", "Shape")] > 0
    fused = {layers: counts[("com.microsoft", "MultiHeadAttention")] for layers, counts in ops.items()}
    assert fused == ({2: 2, 4: 4} if attention == "fused" else {2: 0, 4: 0})
    if attention == "plain":
        assert {domain for counts in ops.values() for domain, _ in counts} == {"ai.onnx"}


def encoder_attention_nodes(directory: Path) -> int:
    graph = onnx.load(str(directory / "encoder.onnx")).graph
    return sum(node.op_type == "MultiHeadAttention" and node.domain == "com.microsoft" for node in graph.node)


def test_fused_attention_encoder_matches_transformers_on_padded_batches(tmp_path: Path):
    torch.manual_seed(5)
    model = BartForConditionalGeneration(tiny_bart_config()).eval()
    model.save_pretrained(tmp_path / "bart")
    export_onnx(tmp_path / "bart", tmp_path / "onnx", options(verify=False), log=quiet)
    assert encoder_attention_nodes(tmp_path / "onnx") == model.config.encoder_layers
    session = ort.InferenceSession(str(tmp_path / "onnx" / "encoder.onnx"))
    for lengths in ([9, 3, 6], [2], [30, 30]):
        ids, mask = random_batch(lengths, seed=len(lengths))
        with torch.no_grad():
            expected = model.model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
        actual = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        tokens = mask.numpy().astype(bool)
        np.testing.assert_allclose(actual[tokens], expected[tokens], atol=2e-5)


def test_failed_verification_writes_nothing_and_reports_numbers(checkpoint: Path, tmp_path: Path, monkeypatch):
    strict = verify_module.Tolerance(atol=0.0, rtol=0.0, exact_tokens=True)
    monkeypatch.setattr(verify_module.Tolerance, "for_precision", classmethod(lambda cls, precision: strict))
    with pytest.raises(ExportError, match=r"verification failed, nothing was written:\n  .*max abs .*max rel"):
        export_onnx(checkpoint, tmp_path / "onnx", options(quantize="int8"), log=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_existing_destination_needs_overwrite(checkpoint: Path, tmp_path: Path):
    (tmp_path / "onnx").mkdir()
    with pytest.raises(ExportError, match="already exists; choose another --out or pass --overwrite"):
        export_onnx(checkpoint, tmp_path / "onnx", options(), log=quiet)
    export_onnx(checkpoint, tmp_path / "onnx", options(overwrite=True, verify=False), log=quiet)
    assert read_manifest(tmp_path / "onnx").verification is None  # --no-verify: nothing measured, nothing claimed


def test_short_disk_fails_before_writing_and_names_the_fix(checkpoint: Path, tmp_path: Path, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("cbart.exporter.disk_space.shutil.disk_usage", lambda path: usage(10**12, 10**12 - 4096, 4096))
    with pytest.raises(ExportError) as raised:
        export_onnx(checkpoint, tmp_path / "out" / "onnx", options(quantize="int8"), log=quiet)
    message = str(raised.value)
    assert "not enough free disk space" in message and "4.0 KiB is free" in message
    assert "the export directory" in message and "the temp directory" in message  # int8 also writes to TMPDIR
    assert "choose another --out" in message and "Nothing was written" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    monkeypatch.undo()
    export_onnx(checkpoint, tmp_path / "out" / "onnx", options(verify=False), log=quiet)


def test_tensorrt_without_tensorrt_fails_at_once_and_writes_nothing(checkpoint: Path, tmp_path: Path):
    from cbart.runtime.trt_support import TensorRTUnavailable, require_tensorrt

    try:
        require_tensorrt()
    except TensorRTUnavailable:
        pass
    else:
        pytest.skip("TensorRT and a GPU are present; tests/test_tensorrt.py covers this machine")
    from cbart.exporter.engine_profiles import EngineLimits

    with pytest.raises(ExportError, match="cannot build TensorRT engines: .*Nothing was written"):
        export_tensorrt(checkpoint, tmp_path / "trt", EngineLimits(), options(), log=quiet)
    with pytest.raises(ExportError, match="TensorRT's ONNX parser cannot read; use --attention plain"):
        export_tensorrt(checkpoint, tmp_path / "trt", EngineLimits(), options(attention="fused"), log=quiet)
    with pytest.raises(ExportError, match="--optimize applies ONNX Runtime's .* drop --optimize with --to trt"):
        export_tensorrt(checkpoint, tmp_path / "trt", EngineLimits(), options(optimize=True), log=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert main(["export", str(checkpoint), "--to", "trt", "--out", str(tmp_path / "trt2")]) == 2
    assert not (tmp_path / "trt2").exists()


def test_plain_bart_exports_the_same_way(tmp_path: Path):
    torch.manual_seed(3)
    model = BartForConditionalGeneration(tiny_bart_config()).eval()
    model.save_pretrained(tmp_path / "bart")
    result = export_onnx(tmp_path / "bart", tmp_path / "onnx", options(), log=quiet)
    assert set(result.manifest.graphs) == {"encoder", "cross_kv", "decoder_step"}
    assert result.manifest.model.autoencoder_variant is None
    ids, mask = random_batch([7, 4], seed=4)
    runtime = Seq2SeqRuntime.from_dir(tmp_path / "onnx")
    sequences = [row[: int(m.sum())].tolist() for row, m in zip(ids, mask, strict=True)]
    settings = {"num_beams": 3, "max_new_tokens": 10, "no_repeat_ngram_size": 2}
    assert (
        runtime.generate(sequences, **settings).sequences
        == model.generate(input_ids=ids, attention_mask=mask, **settings).tolist()
    )


def test_not_a_model_directory(tmp_path: Path):
    (tmp_path / "x").mkdir()
    with pytest.raises(ExportError, match="neither a compressed BART checkpoint nor a BART directory"):
        export_onnx(tmp_path / "x", tmp_path / "onnx", options(), log=quiet)


def test_cli_export_verify_generate(checkpoint: Path, tmp_path: Path, bart_tokenizer, capsys):
    out = tmp_path / "onnx"
    assert main(["export", str(checkpoint), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "decoder_step.logits" in printed and "greedy ids identical to PyTorch: 4/4" in printed
    assert main(["verify", str(out), "--ckpt", str(checkpoint)]) == 0
    assert "verification passed" in capsys.readouterr().out
    assert main(["verify", str(out)]) == 0
    assert "sha256 OK" in capsys.readouterr().out
    assert main(["generate", str(out), "--max-new-tokens", "3"]) == 2
    assert "give a TEXT argument or --input" in capsys.readouterr().err
    (out / "encoder.onnx").write_bytes(b"tampered")
    assert main(["verify", str(out)]) == 2
    assert "does not match its manifest" in capsys.readouterr().err


def test_cli_generate_text_and_jsonl_with_the_real_tokenizer(tmp_path: Path, bart_tokenizer, capsys):
    torch.manual_seed(0)
    base = tiny_bart_config(vocab_size=len(bart_tokenizer), positions=64)
    from cbart.compression import build_from_base

    model = build_from_base(BartForConditionalGeneration(base), [24, 16], "token")
    save_checkpoint(model, tmp_path / "ckpt", bart_tokenizer)
    assert (
        main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "onnx"), "--no-progress", "--with-torch"]) == 0
    )
    assert (tmp_path / "onnx" / "torch" / "decoder_step.pt").is_file()
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "onnx"), "Hello world", "--max-new-tokens", "5", "--timing"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() != "" and "total_s=" in captured.err
    (tmp_path / "in.jsonl").write_text('{"source": "Hello world"}\n{"source": "A second, longer input text."}\n')
    assert (
        main(
            [
                "generate",
                str(tmp_path / "onnx"),
                "--input",
                str(tmp_path / "in.jsonl"),
                "--output",
                str(tmp_path / "out.jsonl"),
                "--max-new-tokens",
                "4",
                "--num-beams",
                "2",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [row["source"] for row in rows] == ["Hello world", "A second, longer input text."]
    runtime = Seq2SeqRuntime.from_dir(tmp_path / "onnx")
    expected = runtime.generate(["Hello world"], max_new_tokens=4, num_beams=2).texts
    assert rows[0]["generated"] == expected[0]
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                str(tmp_path / "onnx"),
                "Hello world",
                "--max-new-tokens",
                "4",
                "--num-beams",
                "2",
                "--backend",
                "torch",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.rstrip("\n") == expected[0]
    ids = bart_tokenizer(["Hello world"], return_tensors="pt")
    reference = model.generate(**ids, max_new_tokens=4, num_beams=2)
    assert runtime.generate(["Hello world"], max_new_tokens=4, num_beams=2).sequences == reference.tolist()


def test_engine_limits_are_checked_and_clamped_to_the_models_source_positions() -> None:
    from cbart.exporter.engine_profiles import EngineLimits
    from cbart.exporter.export import source_positions

    with pytest.raises(ValueError, match="--opt-new-tokens 80 exceeds --max-new-tokens 64; raise --max-new-tokens"):
        EngineLimits(max_new_tokens=64, opt_new_tokens=80)
    limits = EngineLimits(max_source_length=1024, opt_source_length=512)
    clamped = limits.within_model(40)
    assert (clamped.max_source_length, clamped.opt_source_length) == (40, 40)
    assert clamped.ranges()["source_length"] == (1, 40, 40)
    assert limits.within_model(2048) is limits
    paper = tiny_compressed("paper").config
    assert source_positions(paper) == min(paper.max_position_embeddings, paper.autoencoder_max_positions)
    assert source_positions(tiny_bart_config(positions=40)) == 40


@pytest.mark.parametrize("version", ["10.0.1", "11.0.0.1", "9.3"])
def test_an_unsupported_tensorrt_version_is_refused_with_the_install_command(version: str) -> None:
    from cbart.runtime.trt_support import TensorRTUnavailable, check_tensorrt_version

    with pytest.raises(TensorRTUnavailable, match=f"TensorRT {version} is installed.*pip install 'tensorrt>=10.1,<11'"):
        check_tensorrt_version(version)
    check_tensorrt_version("10.13.0.35")


def test_requests_outside_the_engines_profiles_are_refused_before_any_cuda_work() -> None:
    """The manifest records the export's limits; the TensorRT backend checks every request against them."""
    from dataclasses import asdict

    from cbart.exporter.engine_profiles import EngineLimits
    from cbart.runtime.trt_support import check_request

    limits = asdict(
        EngineLimits(
            max_batch=4,
            opt_batch=2,
            max_source_length=40,
            opt_source_length=16,
            max_new_tokens=24,
            opt_new_tokens=8,
            beams=2,
        )
    )
    check_request(limits, sources=4, source_length=40, rows=8, max_length=25)  # exactly at every limit
    for request, message in (
        ({"sources": 5}, "needs 5 sources in one request, but .* at most 4; rebuild them with a larger --max-batch"),
        ({"source_length": 41}, "needs 41 source tokens, .* at most 40; .* larger --max-source-length"),
        ({"rows": 9}, r"needs 9 decoder rows \(sources x beams\), .* at most 8; .* larger --max-batch/--beams"),
        ({"max_length": 26}, "needs 25 new tokens, .* at most 24; .* larger --max-new-tokens"),
    ):
        with pytest.raises(ValueError, match=message):
            check_request(limits, **request)


@pytest.mark.parametrize(
    ("setting", "named"),
    [({"suppress_tokens": [5, 6]}, "suppress_tokens=[5, 6]"), ({"do_sample": True, "typical_p": 0.5}, "typical_p=0.5")],
)
def test_generation_settings_the_runtimes_lack_are_refused_by_name(tmp_path: Path, setting: dict, named: str):
    model = tiny_compressed()
    model.generation_config.update(**setting)
    save_checkpoint(model, tmp_path / "ckpt")
    with pytest.raises(ExportError, match=f"generation config sets {re.escape(named)}, which cbart's runtimes do not"):
        export_onnx(tmp_path / "ckpt", tmp_path / "onnx", ExportOptions(progress=False))
    assert not (tmp_path / "onnx").exists()


def test_a_graph_out_of_topological_order_fails_verification_until_sorted(checkpoint: Path, tmp_path: Path):
    """The ONNX checker runs in every export's verification; sort_topologically repairs what converters
    append out of order (fp16's Cast nodes)."""
    from cbart.exporter.variants import sort_topologically
    from cbart.exporter.verify import VerificationReport, check_onnx_graphs

    export_onnx(checkpoint, tmp_path / "onnx", options(verify=False), log=quiet)
    path = tmp_path / "onnx" / "cross_kv.onnx"
    model = onnx.load(str(path))
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    onnx.save(model, str(path))
    report = VerificationReport()
    check_onnx_graphs(tmp_path / "onnx", report)
    assert "topologically sorted" in report.checker_errors["cross_kv.onnx"]
    sort_topologically(model.graph)
    onnx.save(model, str(path))
    report = VerificationReport()
    check_onnx_graphs(tmp_path / "onnx", report)
    assert report.checker_errors == {}
