"""Shared fixtures: tiny BART models built on the spot, and the real data in ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from cbart.compression import CompressedBartConfig, CompressedBartForConditionalGeneration
from transformers import BartConfig, BartForConditionalGeneration

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub; fail fast instead of waiting

SHARED_DATA = Path(os.environ.get("CBART_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TOKENIZER_DIR = SHARED_DATA / "tokenizer" / "bart"


def tiny_bart_config(vocab_size: int = 96, width: int = 32, positions: int = 40) -> BartConfig:
    return BartConfig(
        vocab_size=vocab_size,
        d_model=width,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=positions,
        dropout=0.0,
        attention_dropout=0.0,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=2,
    )


def tiny_compressed(variant: str = "paper", seed: int = 0, **overrides) -> CompressedBartForConditionalGeneration:
    """A tiny compressed model with random weights and non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    base = tiny_bart_config(**overrides)
    config = CompressedBartConfig.from_base_config(base, [24, 16], variant)
    model = CompressedBartForConditionalGeneration(config)
    with torch.no_grad():
        model.final_logits_bias.normal_(0, 0.5)
        for module in model.modules():
            if hasattr(module, "running_mean") and module.running_mean is not None:
                module.running_mean.normal_(0, 0.3)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.2)
    return model.eval()


def tiny_inflight_export(root: Path, seed: int, **options) -> tuple[CompressedBartForConditionalGeneration, Path]:
    """A tiny compressed model saved under ``root`` and exported with ``--inflight`` (plus ``options``)."""
    from cbart.compression import save_checkpoint
    from cbart.exporter.export import ExportOptions, export_onnx

    model = tiny_compressed("paper", seed=seed, positions=160)
    save_checkpoint(model, root / "ckpt")
    export_onnx(
        root / "ckpt", root / "onnx", ExportOptions(inflight=True, progress=False, **options), log=lambda *_: None
    )
    return model, root / "onnx"


@pytest.fixture
def tiny_base_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = BartForConditionalGeneration(tiny_bart_config())
    directory = tmp_path / "tiny-bart"
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (set CBART_SHARED_DATA to the shared/data folder)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def bart_tokenizer(shared_data: Path):
    from transformers import BartTokenizer

    return BartTokenizer.from_pretrained(str(shared_data / "tokenizer" / "bart"))


def random_batch(lengths: list[int], vocab_size: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (BOS ... EOS) of the given lengths and their attention mask."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), 1, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, length in enumerate(lengths):
        body = torch.randint(4, vocab_size, (length - 2,), generator=generator)
        ids[row, :length] = torch.cat([torch.tensor([0]), body, torch.tensor([2])])
        mask[row, :length] = 1
    return ids, mask
