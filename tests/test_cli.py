"""The ``cbart`` front door: the whole compression workflow and its error messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cbart.compression import load_compressed_model
from conftest import tiny_bart_config
from transformers import BartConfig, BartForConditionalGeneration

from cbart.cli import main


@pytest.fixture
def base_with_tokenizer(tmp_path: Path, bart_tokenizer) -> Path:
    torch.manual_seed(0)
    directory = tmp_path / "base"
    BartForConditionalGeneration(tiny_bart_config(vocab_size=len(bart_tokenizer), positions=64)).save_pretrained(
        directory
    )
    bart_tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def translation_file(tmp_path: Path, shared_data: Path) -> Path:
    lines = (shared_data / "multi30k" / "validation.jsonl").read_text(encoding="utf-8").splitlines()[:24]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_compress_then_both_training_stages(tmp_path, base_with_tokenizer, translation_file, capsys):
    common = ["--max-steps", "2", "--batch-size", "8", "--no-progress", "--device", "cpu"]
    assert (
        main(
            [
                "compress",
                str(base_with_tokenizer),
                "--latent",
                "24",
                "16",
                "--variant",
                "token",
                "--out",
                str(tmp_path / "init"),
            ]
        )
        == 0
    )
    assert "decoder parameters" in capsys.readouterr().out
    assert (
        main(
            [
                "train-ae",
                str(tmp_path / "init"),
                "--data",
                str(translation_file),
                "--max-source-length",
                "48",
                "--out",
                str(tmp_path / "ae"),
                *common,
            ]
        )
        == 0
    )
    assert "stage 1 done: 2 steps" in capsys.readouterr().out
    assert (
        main(
            [
                "train",
                str(tmp_path / "ae"),
                "--data",
                str(translation_file),
                "--task",
                "translation",
                "--eval-data",
                str(translation_file),
                "--eval-limit",
                "4",
                "--num-beams",
                "1",
                "--min-length",
                "0",
                "--max-length",
                "6",
                "--max-target-length",
                "48",
                "--out",
                str(tmp_path / "mt"),
                *common,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "stage 2 done: 2 steps" in out and "'bleu'" in out
    model = load_compressed_model(tmp_path / "mt")
    assert model.config.latent_sizes == [24, 16] and model.config.autoencoder_variant == "token"
    state = torch.load(tmp_path / "mt" / "training_state.pt", weights_only=False)
    assert state["step"] == 2 and state["compatibility"]["stage"] == "decoder"


def test_train_ae_directly_from_a_base_model_with_paper_autoencoder(tmp_path, base_with_tokenizer, translation_file):
    assert (
        main(
            [
                "train-ae",
                str(base_with_tokenizer),
                "--latent",
                "24",
                "16",
                "--data",
                str(translation_file),
                "--max-source-length",
                "48",
                "--max-steps",
                "1",
                "--batch-size",
                "4",
                "--no-progress",
                "--out",
                str(tmp_path / "ae"),
            ]
        )
        == 0
    )
    config = json.loads((tmp_path / "ae" / "config.json").read_text())
    assert config["autoencoder_variant"] == "paper" and config["autoencoder_max_positions"] == 64


def test_classification_from_a_stage1_checkpoint(tmp_path, base_with_tokenizer, shared_data):
    rows = (shared_data / "sst2" / "validation.jsonl").read_text().splitlines()[:16]
    data = tmp_path / "sst2.jsonl"
    data.write_text("\n".join(rows) + "\n")
    assert (
        main(
            [
                "compress",
                str(base_with_tokenizer),
                "--latent",
                "24",
                "16",
                "--variant",
                "token",
                "--out",
                str(tmp_path / "init"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                str(tmp_path / "init"),
                "--task",
                "classification",
                "--data",
                str(data),
                "--source-field",
                "text",
                "--eval-data",
                str(data),
                "--max-steps",
                "2",
                "--batch-size",
                "8",
                "--no-progress",
                "--out",
                str(tmp_path / "cls"),
            ]
        )
        == 0
    )
    model = load_compressed_model(tmp_path / "cls", task="classification")
    assert model.config.num_labels == 2


def test_errors_are_one_clear_line(tmp_path, translation_file, capsys):
    assert (
        main(
            ["train-ae", str(tmp_path / "missing-model"), "--data", str(translation_file), "--out", str(tmp_path / "o")]
        )
        == 2
    )
    assert "base model directory" in capsys.readouterr().err
    assert (
        main(["compress", str(tmp_path / "missing-model"), "--latent", "24", "16", "--out", str(tmp_path / "o")]) == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bad_latent_sizes_from_the_command_line(tmp_path, base_with_tokenizer, capsys):
    assert main(["compress", str(base_with_tokenizer), "--latent", "16", "24", "--out", str(tmp_path / "o")]) == 2
    assert "strictly decreasing" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_import_original_from_the_command_line(tmp_path, capsys):
    from conftest import tiny_compressed
    from test_checkpoint import write_original_release

    write_original_release(tiny_compressed("paper"), tmp_path / "release")
    assert (
        main(["import-original", str(tmp_path / "release"), "--latent", "24", "16", "--out", str(tmp_path / "ours")])
        == 0
    )
    assert load_compressed_model(tmp_path / "ours").config.latent_sizes == [24, 16]
    assert main(["import-original", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "is missing config.json" in capsys.readouterr().err


def test_stage2_distilled_from_the_base_with_bucketed_batches(tmp_path, base_with_tokenizer, translation_file, capsys):
    common = ["--data", str(translation_file), "--no-progress", "--device", "cpu", "--max-source-length", "48"]
    assert main(["train-ae", str(base_with_tokenizer), "--latent", "24", "16", "--variant", "token",
                 "--out", str(tmp_path / "ae"), "--max-steps", "1", *common]) == 0  # fmt: skip
    arguments = ["train", str(tmp_path / "ae"), "--task", "translation", "--max-target-length", "48", "--epochs", "2",
                 "--max-tokens", "200", "--lr-schedule", "inverse_sqrt", "--warmup-steps", "2",
                 "--label-smoothing", "0.1", "--save-each-epoch", "--distill-from", str(base_with_tokenizer),
                 "--distill-alpha", "0.7", "--distill-temperature", "2", *common]  # fmt: skip
    assert main([*arguments, "--out", str(tmp_path / "kd")]) == 0
    assert "stage 2 done" in capsys.readouterr().out
    state = torch.load(tmp_path / "kd" / "training_state.pt", weights_only=False)
    assert state["epoch"] == 2 and state["compatibility"]["distilled"] is True
    assert sorted(p.name for p in (tmp_path / "kd" / "checkpoints").iterdir()) == ["epoch-1", "epoch-2"]

    other = tmp_path / "other-base"
    torch.manual_seed(1)
    BartForConditionalGeneration(BartConfig.from_pretrained(base_with_tokenizer)).save_pretrained(other)
    teacher_swapped = [str(other) if a == str(base_with_tokenizer) else a for a in arguments]
    assert main([*teacher_swapped, "--out", str(tmp_path / "bad")]) == 2
    assert "the teacher cannot serve this student: encoder weight" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_speculative_pair_from_the_command_line(tmp_path, base_with_tokenizer, capsys):
    draft, pair = tmp_path / "draft", tmp_path / "pair"
    assert main(["compress", str(base_with_tokenizer), "--latent", "24", "16", "--out", str(draft)]) == 0
    export = ["export", str(base_with_tokenizer), "--draft", str(draft), "--no-progress"]
    assert main([*export, "--draft-quantize", "int8", "--out", str(pair)]) == 0
    out = capsys.readouterr().out
    assert "speculative greedy identical to PyTorch: 4/4" in out and "with a int8 draft in draft/" in out
    text = "A man in a blue shirt is standing on a ladder."
    assert main(["generate", str(pair), text, "--max-new-tokens", "12"]) == 0
    plain = capsys.readouterr().out
    assert main(["generate", str(pair), text, "--max-new-tokens", "12", "--speculative"]) == 0
    assert main(["generate", str(pair), text, "--max-new-tokens", "12", "--speculative", "2"]) == 0
    assert capsys.readouterr().out == plain * 2
    sampled = [text, "--max-new-tokens", "12", "--do-sample", "--top-k", "5", "--seed", "3", "--speculative"]
    assert main(["generate", str(pair), *sampled]) == 0
    assert main(["generate", str(pair), *sampled]) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first == second  # seeded
    for wrong, message in (
        (["--quantize", "int8"], "with --draft use --draft-quantize int8"),
        (["--to", "trt"], "--draft (speculative pairs) writes ONNX exports only"),
    ):
        assert main([*export, *wrong, "--out", str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err
    single = ["export", str(base_with_tokenizer), "--draft-quantize", "int8", "--out", str(tmp_path / "bad")]
    assert main(single) == 2
    assert "--draft-quantize applies to the draft of a speculative pair" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_generate_never_imports_torch(tmp_path, base_with_tokenizer):
    """`cbart generate` on the ONNX Runtime backend starts without torch, error path included."""
    export = tmp_path / "onnx"
    assert main(["export", str(base_with_tokenizer), "--out", str(export), "--no-progress", "--no-verify"]) == 0
    script = (
        "import sys\n"
        "from cbart.cli import main\n"
        f"codes = [main(['generate', {str(export)!r}, 'A man on a ladder.', '--max-new-tokens', '6']),\n"
        f"         main(['generate', {str(tmp_path / 'missing')!r}, 'x'])]\n"
        "assert codes == [0, 2], codes\n"
        "assert 'torch' not in sys.modules and 'cbart.compression' not in sys.modules, 'torch was imported'\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stderr
    assert "error:" in completed.stderr and "missing" in completed.stderr
