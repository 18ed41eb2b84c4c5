"""The model card written into every compressed checkpoint (``README.md``), offline.

A checkpoint pushed to a hub is read by people who never ran cbart: the card says what the model is
(widths, latent sizes, parameter counts), how far it was trained and how it scored when that is known,
and how to load it with plain transformers.
"""

from __future__ import annotations

from typing import Any

from cbart.compression.config import CompressedBartConfig
from torch import nn

CARD_FILE = "README.md"


def _millions(module: nn.Module) -> str:
    count = sum(p.numel() for p in module.parameters())
    return f"{count / 1e6:.1f}M" if count >= 100_000 else f"{count:,}"


def _training(state: dict[str, Any] | None) -> list[str]:
    if not state:
        return ["Not trained by cbart yet (or trained elsewhere): no training state was saved with it."]
    lines = [f"Optimizer steps: {state.get('step', 'unknown')}, epoch {state.get('epoch', 'unknown')}."]
    evaluations = state.get("evaluations") or []
    if evaluations:
        latest = ", ".join(f"{name} {value:.4g}" for name, value in evaluations[-1].items())
        lines.append(f"Latest evaluation: {latest}.")
    return lines


def model_card(model: nn.Module, training_state: dict[str, Any] | None = None) -> str:
    """Markdown describing ``model`` (a compressed BART) and, when given, its training state."""
    config = model.config
    if not isinstance(config, CompressedBartConfig):
        raise TypeError(f"model cards describe compressed BART models, not {type(config).__name__}")
    inner = model.model  # type: ignore[attr-defined]
    task = "sequence classification" if config.architectures and "Classification" in config.architectures[0] else ""
    widths = " → ".join(str(size) for size in [config.encoder_d_model, *config.latent_sizes])
    auto_class = "AutoModelForSequenceClassification" if task else "AutoModelForSeq2SeqLM"
    lines = [
        "---",
        "library_name: transformers",
        "tags: [cbart, compressed-bart, latent-compression]",
        "---",
        "",
        "# Compressed BART (cbart)",
        "",
        "A BART encoder, the encoder half of an autoencoder that compresses its output, and a narrow BART "
        "decoder reading the compressed memory (Falaki & Gras, *Efficient Latent Space Compression for "
        "Lightning-Fast Fine-Tuning and Inference of Transformer-Based Models*, MAKE 2023).",
        "",
        "## Architecture",
        "",
        f"- Encoder: {config.encoder_layers} layers, width {config.encoder_d_model} ({_millions(inner.encoder.base)} "
        "parameters).",
        f"- Autoencoder ({config.autoencoder_variant}): {widths} ({_millions(inner.encoder.compressor)} parameters).",
        f"- Decoder: {config.decoder_layers} layers, width {config.d_model}, {config.decoder_attention_heads} heads "
        f"({_millions(inner.decoder)} parameters).",
        f"- Vocabulary: {config.vocab_size} tokens; total {_millions(model)} parameters.",
        "",
        "## Training",
        "",
        *_training(training_state),
        "",
        "## Use",
        "",
        "With cbart installed (`import cbart.compression` registers the architecture), or with plain transformers "
        "from the code saved beside the weights:",
        "",
        "```python",
        f"from transformers import {auto_class}",
        f'model = {auto_class}.from_pretrained("THIS_DIRECTORY", trust_remote_code=True)',
        "```",
        "",
        "Export to ONNX Runtime / TensorRT and fast generation: `cbart export THIS_DIRECTORY --out DIR`, then "
        "`cbart generate DIR TEXT`.",
        "",
        "## Limitations",
        "",
        "The narrow decoder trades quality for speed: expect lower scores than the uncompressed base model "
        "fine-tuned on the same data.",
        "",
    ]
    return "\n".join(lines)
