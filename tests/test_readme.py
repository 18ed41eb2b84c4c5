"""The README's Python API example runs as written."""

from __future__ import annotations

import os
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def run_readme_block(after: str, directory: Path) -> dict:
    """Run the README's first Python block after the text ``after``, in ``directory``; its namespace."""
    text = README.read_text()
    code = re.search(r"```python\n(.*?)```", text[text.index(after) :], re.S).group(1)
    cwd = os.getcwd()
    os.chdir(directory)
    try:
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 -- the point is to run the docs
    finally:
        os.chdir(cwd)
    return namespace


def test_python_api_example_runs(tmp_path: Path):
    namespace = run_readme_block("## Python API", tmp_path)
    assert namespace["model"].config.latent_sizes == [576, 480, 384]
    assert (tmp_path / "bart-384" / "model.safetensors").is_file()


def test_seq2seq_trainer_recipe_runs_and_trains_only_the_decoder(tmp_path: Path, bart_tokenizer, shared_data: Path):
    """The README's Seq2SeqTrainer recipe, on a tiny compressed model and 32 Multi30k pairs."""
    import torch
    from cbart.compression import load_compressed_model, save_checkpoint
    from conftest import tiny_compressed

    model = tiny_compressed(vocab_size=len(bart_tokenizer), positions=160)
    save_checkpoint(model, tmp_path / "compressed-ckpt", bart_tokenizer)
    rows = (shared_data / "multi30k" / "train.jsonl").read_text(encoding="utf-8").splitlines()[:32]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    run_readme_block("**Stage 2 with `Seq2SeqTrainer`.**", tmp_path)
    trained = load_compressed_model(tmp_path / "compressed-stage2")
    before, after = model.state_dict(), trained.state_dict()
    frozen = [name for name in before if name.startswith("model.encoder.")]
    decoder = [name for name in before if name.startswith("model.decoder.layers.")]
    assert any("running_mean" in name for name in frozen)  # the paper autoencoder's BatchNorm statistics
    for name in frozen:
        assert torch.equal(before[name], after[name]), f"{name} changed, but the encoder side is frozen"
    assert sum(not torch.equal(before[name], after[name]) for name in decoder) == len(decoder)
