"""Build a compressed model from a pretrained base BART (a hub name or a local directory)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from cbart.compression.config import CompressedBartConfig
from cbart.compression.modeling import CompressedBartForConditionalGeneration
from transformers import AutoConfig, BartConfig, BartForConditionalGeneration, PreTrainedModel

PAPER_LATENT_SIZES = {384: (576, 480, 384), 504: (640, 576, 504)}


def bart_base_config() -> BartConfig:
    """facebook/bart-base's architecture (for random-weight models of the real shape; no download)."""
    return BartConfig(
        vocab_size=50265,
        d_model=768,
        encoder_layers=6,
        decoder_layers=6,
        encoder_attention_heads=12,
        decoder_attention_heads=12,
        encoder_ffn_dim=3072,
        decoder_ffn_dim=3072,
        max_position_embeddings=1024,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=2,
        forced_bos_token_id=0,
        scale_embedding=False,
    )


def load_base_model(name_or_path: str | Path) -> BartForConditionalGeneration:
    """Load the base BART, checking that it is one before reading its weights."""
    source = str(name_or_path)
    looks_local = source.startswith((".", "/", "~")) or source.count("/") > 1 or isinstance(name_or_path, Path)
    if looks_local and not Path(source).expanduser().exists():
        raise FileNotFoundError(f"base model directory {source} does not exist")
    if Path(source).exists() and not (Path(source) / "config.json").is_file():
        raise FileNotFoundError(
            f"{source} has no config.json; point at a directory written by save_pretrained() "
            "(config.json + weights) or at a hub name such as facebook/bart-base"
        )
    config = AutoConfig.from_pretrained(source)
    if config.model_type != "bart":
        raise ValueError(
            f"{source} is a {config.model_type!r} model, not BART; cbart compresses BART checkpoints "
            "(e.g. facebook/bart-base)"
        )
    return BartForConditionalGeneration.from_pretrained(source)


def build_from_base(
    base: str | Path | PreTrainedModel,
    latent_sizes: Sequence[int] = PAPER_LATENT_SIZES[384],
    autoencoder_variant: str = "paper",
    autoencoder_max_positions: int | None = None,
    decoder_attention_heads: int | None = None,
) -> CompressedBartForConditionalGeneration:
    """A compressed model whose encoder is the base's and whose narrow decoder is freshly initialised.

    The decoder cannot reuse the base decoder's weights (different width); it is trained in
    stage 2. The vocabulary bias ``final_logits_bias`` carries over since the vocabulary is shared.
    """
    base_model = base if isinstance(base, PreTrainedModel) else load_base_model(base)
    if not isinstance(base_model, BartForConditionalGeneration):
        raise ValueError(
            f"expected a BartForConditionalGeneration base, got {type(base_model).__name__}; "
            "load it with BartForConditionalGeneration.from_pretrained"
        )
    config = CompressedBartConfig.from_base_config(
        base_model.config, latent_sizes, autoencoder_variant, autoencoder_max_positions, decoder_attention_heads
    )
    model = CompressedBartForConditionalGeneration(config)
    model.model.encoder.base.load_state_dict(base_model.model.encoder.state_dict())
    with torch.no_grad():
        model.final_logits_bias.copy_(base_model.final_logits_bias)
    return model


def base_encoder(model: PreTrainedModel) -> torch.nn.Module:
    """The full-width BART encoder inside a plain or a compressed model (before any autoencoder)."""
    if isinstance(model, CompressedBartForConditionalGeneration):
        return model.model.encoder.base
    return model.get_encoder()


def encoder_mismatch(reference: PreTrainedModel, other: PreTrainedModel) -> str | None:
    """Why ``other`` cannot reuse ``reference``'s encoder pass: the first differing weight, or None.

    A compressed model trained with a frozen encoder carries an exact copy of its base's encoder,
    so a teacher (distillation) or a verifier (speculative decoding) can share one encoder pass with it.
    """
    mine = base_encoder(other).state_dict()
    theirs = base_encoder(reference).state_dict()
    if mine.keys() != theirs.keys():
        missing = sorted(mine.keys() ^ theirs.keys())
        return f"the encoders have different weights ({missing[0]!r} is only in one of them)"
    for name, tensor in theirs.items():
        if mine[name].shape != tensor.shape or not torch.equal(mine[name].cpu(), tensor.cpu()):
            return f"encoder weight {name!r} differs"
    return None
