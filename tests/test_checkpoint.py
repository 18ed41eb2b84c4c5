"""Checkpoints: round trip, atomic writes, clear errors, building from a base, importing the original."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cbart.compression import CheckpointError, build_from_base, load_compressed_model, save_checkpoint
from cbart.compression.checkpoint import TRAINING_STATE, atomic_directory, load_training_state
from cbart.compression.importer import import_original_checkpoint
from conftest import random_batch, tiny_bart_config, tiny_compressed
from transformers import BartForConditionalGeneration, T5Config


def logits_of(model, ids, mask):
    decoder_ids = torch.tensor([[2, 0, 5, 9]]).expand(ids.shape[0], -1)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits


@pytest.mark.parametrize("variant", ["paper", "token"])
def test_save_and_load_round_trip(tmp_path: Path, variant: str):
    model = tiny_compressed(variant)
    save_checkpoint(model, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "README.md",  # the model card
        "autoencoder.py",  # the code transformers loads with trust_remote_code=True
        "config.json",
        "config.py",
        "generation_config.json",
        "model.safetensors",
        "modeling.py",
    ]
    loaded = load_compressed_model(tmp_path / "ckpt")
    assert loaded.config.latent_sizes == [24, 16] and loaded.config.autoencoder_variant == variant
    ids, mask = random_batch([7, 5])
    torch.testing.assert_close(logits_of(loaded, ids, mask), logits_of(model, ids, mask), rtol=0, atol=0)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.decoder.embed_tokens.weight.data_ptr()


def test_failed_write_leaves_previous_checkpoint_and_no_partial_directory(tmp_path: Path):
    model = tiny_compressed()
    destination = save_checkpoint(model, tmp_path / "ckpt")

    def broken(directory: Path) -> None:
        (directory / "config.json").write_text("{}")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_directory(destination, broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    load_compressed_model(destination)  # still the complete old checkpoint


def test_overwrite_keeps_named_subdirectories(tmp_path: Path):
    model = tiny_compressed()
    destination = save_checkpoint(model, tmp_path / "run")
    (destination / "checkpoints").mkdir()
    (destination / "checkpoints" / "marker").write_text("x")
    save_checkpoint(model, destination, keep=("checkpoints",))
    assert (destination / "checkpoints" / "marker").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_loading_errors_name_the_problem(tmp_path: Path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_compressed_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_compressed_model(tmp_path / "empty")
    bad = tmp_path / "bad-json"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_compressed_model(bad)
    bart = tmp_path / "bart"
    BartForConditionalGeneration(tiny_bart_config()).save_pretrained(bart)
    with pytest.raises(CheckpointError, match="holds a 'bart' model, not a compressed BART"):
        load_compressed_model(bart)

    good = save_checkpoint(tiny_compressed(), tmp_path / "good")
    (good / "model.safetensors").rename(tmp_path / "weights")
    with pytest.raises(CheckpointError, match="no weights"):
        load_compressed_model(good)
    (tmp_path / "weights").rename(good / "model.safetensors")
    payload = (good / "model.safetensors").read_bytes()
    (good / "model.safetensors").write_bytes(payload[: len(payload) // 2])
    with pytest.raises(CheckpointError, match="could not load the weights"):
        load_compressed_model(good)

    invalid = save_checkpoint(tiny_compressed(), tmp_path / "invalid")
    fields = json.loads((invalid / "config.json").read_text())
    fields["latent_sizes"] = [16, 24]
    (invalid / "config.json").write_text(json.dumps(fields))
    with pytest.raises(CheckpointError, match="strictly decreasing"):
        load_compressed_model(invalid)


def test_build_from_a_local_base_directory(tiny_base_dir: Path):
    model = build_from_base(tiny_base_dir, [24, 16], "token")
    base = BartForConditionalGeneration.from_pretrained(tiny_base_dir)
    for name, tensor in base.model.encoder.state_dict().items():
        torch.testing.assert_close(model.model.encoder.base.state_dict()[name], tensor, rtol=0, atol=0)
    assert model.config.encoder_d_model == 32 and model.config.d_model == 16
    assert model.config.decoder_ffn_dim == 64 and model.config.decoder_attention_heads == 4


def test_build_rejects_what_is_not_bart(tmp_path: Path):
    T5Config(d_model=32).save_pretrained(tmp_path / "t5")
    with pytest.raises(ValueError, match="is a 't5' model, not BART"):
        build_from_base(tmp_path / "t5", [24, 16])
    (tmp_path / "nothing").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        build_from_base(tmp_path / "nothing", [24, 16])


def write_original_release(model, directory: Path) -> None:
    """The original repository's layout: BART-style names, the AE in ae-checkpoint.pth under 'model'."""
    directory.mkdir()
    state = model.state_dict()
    weights = {}
    for key, tensor in state.items():
        if key.startswith("model.encoder.base."):
            weights["model.encoder." + key.removeprefix("model.encoder.base.")] = tensor
        elif key.startswith("model.encoder.compressor."):
            continue
        else:
            weights[key] = tensor
    torch.save(weights, directory / "pytorch_model.bin")
    compressor = model.model.encoder.compressor.layers
    ae = {}
    for original, ours in ((0, 0), (3, 3)):  # Linear at 0/3, BatchNorm at 1/4, as nn.Sequential numbers them
        ae[f"encoder.{original}.weight"] = compressor[ours].weight
        for field in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            ae[f"encoder.{original + 1}.{field}"] = getattr(compressor[ours + 1], field)
    ae["decoder.0.weight"] = torch.randn(24, 16)
    ae["decoder.1.weight"] = torch.ones(40)
    torch.save({"model": ae}, directory / "ae-checkpoint.pth")
    config = tiny_bart_config().to_dict()
    config["d_model"] = 16  # the release's config describes the narrow decoder
    (directory / "config.json").write_text(json.dumps(config))


def test_import_original_release_reproduces_the_model(tmp_path: Path):
    reference = tiny_compressed("paper", seed=4)
    write_original_release(reference, tmp_path / "384")
    imported = import_original_checkpoint(tmp_path / "384", [24, 16])
    inferred = import_original_checkpoint(tmp_path / "384")
    assert inferred.config.latent_sizes == [24, 16] and inferred.config.autoencoder_max_positions == 40
    ids, mask = random_batch([9, 6], seed=1)
    torch.testing.assert_close(logits_of(imported, ids, mask), logits_of(reference, ids, mask), rtol=0, atol=0)
    generated = imported.generate(input_ids=ids, attention_mask=mask, num_beams=2, max_new_tokens=5)
    assert (
        generated.tolist()
        == reference.generate(input_ids=ids, attention_mask=mask, num_beams=2, max_new_tokens=5).tolist()
    )


def test_import_original_errors(tmp_path: Path):
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="missing pytorch_model.bin, ae-checkpoint.pth"):
        import_original_checkpoint(tmp_path / "partial")
    write_original_release(tiny_compressed("paper"), tmp_path / "release")
    with pytest.raises(CheckpointError, match="decoder in .* is 16 wide but the latent sizes given end in 20"):
        import_original_checkpoint(tmp_path / "release", [28, 20])
    with pytest.raises(CheckpointError, match="should be \\(32, 28\\)"):
        import_original_checkpoint(tmp_path / "release", [28, 16])


class _RunsCodeWhenUnpickled:
    """What a crafted checkpoint does: unpickling calls ``Path.touch`` on a file of the attacker's choosing."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_that_would_run_code_is_refused_unless_trusted(tmp_path: Path):
    write_original_release(tiny_compressed("paper"), tmp_path / "release")
    marker = tmp_path / "code-ran"
    torch.save({"model": _RunsCodeWhenUnpickled(marker)}, tmp_path / "release" / "ae-checkpoint.pth")
    with pytest.raises(CheckpointError, match="unpickling them would run code .* pass --trust-pickle"):
        import_original_checkpoint(tmp_path / "release")
    assert not marker.exists()
    with pytest.raises(CheckpointError):  # trusted: it loads (and runs), then fails as not a state dict
        import_original_checkpoint(tmp_path / "release", trust_pickle=True)
    assert marker.exists()

    marker.unlink()
    state = tmp_path / "resume"
    state.mkdir()
    torch.save({"step": 1, "optimizer": _RunsCodeWhenUnpickled(marker)}, state / TRAINING_STATE)
    with pytest.raises(CheckpointError, match="unpickling them would run code"):
        load_training_state(state)
    assert not marker.exists()


_WITHOUT_CBART = """
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"cbart", "compression", "exporter", "runtime", "benchmarks"}:
            raise ImportError(f"{name} is blocked: this process must load the checkpoint without cbart")
sys.meta_path.insert(0, Block())
import torch
import transformers
directory, task = sys.argv[1], sys.argv[2]
auto = getattr(transformers, task)
model = auto.from_pretrained(directory, trust_remote_code=True).eval()
ids = torch.tensor([[0, 5, 17, 33, 9, 2]])
with torch.no_grad():
    if task == "AutoModelForSeq2SeqLM":
        print(json.dumps(model.generate(input_ids=ids, max_new_tokens=8, num_beams=1).tolist()))
    else:
        print(json.dumps(model(input_ids=ids).logits.tolist()))
"""


@pytest.mark.parametrize("task", ["seq2seq", "classification"])
def test_transformers_loads_a_checkpoint_without_cbart(tmp_path: Path, task: str):
    """The code saved with the checkpoint (auto_map) loads it in a process where cbart cannot be imported."""
    import subprocess
    import sys

    model = tiny_compressed(seed=3)
    auto = "AutoModelForSeq2SeqLM"
    if task == "classification":
        from cbart.compression.training.stages import to_classifier

        model, auto = to_classifier(model, num_labels=3).eval(), "AutoModelForSequenceClassification"
    save_checkpoint(model, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "config.CompressedBartConfig", auto: f"modeling.{type(model).__name__}"}
    completed = subprocess.run(
        [sys.executable, "-c", _WITHOUT_CBART, str(tmp_path / "ckpt"), auto],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    ids = torch.tensor([[0, 5, 17, 33, 9, 2]])
    with torch.no_grad():
        if task == "seq2seq":
            expected = model.generate(input_ids=ids, max_new_tokens=8, num_beams=1).tolist()
            assert json.loads(completed.stdout.splitlines()[-1]) == expected
        else:
            logits = torch.tensor(json.loads(completed.stdout.splitlines()[-1]))
            torch.testing.assert_close(logits, model(input_ids=ids).logits)


def test_checkpoint_carries_a_model_card(tmp_path: Path):
    model = tiny_compressed()
    save_checkpoint(model, tmp_path / "fresh")
    card = (tmp_path / "fresh" / "README.md").read_text()
    assert "Autoencoder (paper): 32 → 24 → 16" in card and "width 16, 4 heads" in card
    assert "Not trained by cbart yet" in card and 'from_pretrained("THIS_DIRECTORY", trust_remote_code=True)' in card
    state = {"step": 40, "epoch": 2, "evaluations": [{"bleu": 10.0}, {"bleu": 12.25, "loss": 2.5}]}
    save_checkpoint(model, tmp_path / "trained", training_state=state)
    card = (tmp_path / "trained" / "README.md").read_text()
    assert "Optimizer steps: 40, epoch 2." in card and "Latest evaluation: bleu 12.25, loss 2.5." in card
    base = BartForConditionalGeneration(tiny_bart_config())
    save_checkpoint(base, tmp_path / "base")
    assert not (tmp_path / "base" / "README.md").exists()
