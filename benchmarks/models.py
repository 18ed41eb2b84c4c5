"""Random-weight models of bart-base's shape (no download) and their exports, cached on disk."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

LATENTS = {504: (640, 576, 504), 384: (576, 480, 384), 256: (512, 384, 256), 128: (384, 256, 128)}
HEADS = {256: 8, 128: 8}  # bart-base's 12 heads do not divide 256 or 128


@dataclass(frozen=True)
class ModelSpec:
    """``latent=None`` is the full bart-base; otherwise the compressed model with that latent width.

    ``varied``: untied output embeddings and a larger init (std 0.13), so that greedy decoding does not just
    repeat the last token as a random BART with tied embeddings does; two such models then rarely agree.
    """

    latent: int | None
    varied: bool = False

    @property
    def name(self) -> str:
        name = "full" if self.latent is None else f"compressed-{self.latent}"
        return f"{name}-varied" if self.varied else name


def checkpoint(spec: ModelSpec, cache: Path) -> Path:
    """Build (once) and save the model; the compressed ones share the full model's encoder."""
    from cbart.compression import build_from_base, save_checkpoint
    from cbart.compression.build import bart_base_config
    from transformers import BartForConditionalGeneration

    path = cache / spec.name
    if (path / "config.json").is_file():
        return path
    full = cache / ModelSpec(None, spec.varied).name
    if not (full / "config.json").is_file():
        torch.manual_seed(0)
        config = bart_base_config()
        if spec.varied:
            config.init_std, config.tie_word_embeddings = 0.13, False
        BartForConditionalGeneration(config).save_pretrained(full)
    if spec.latent is not None:
        torch.manual_seed(spec.latent)
        base = BartForConditionalGeneration.from_pretrained(full)
        model = build_from_base(base, LATENTS[spec.latent], "paper", decoder_attention_heads=HEADS.get(spec.latent))
        save_checkpoint(model, path)
    return path


def onnx_export(
    spec: ModelSpec,
    cache: Path,
    precision: str = "fp32",
    with_torch: bool = False,
    inflight: bool = False,
    torch_device: str = "cpu",
) -> Path:
    """Export (once) to ONNX; int8 is dynamic quantization of the fp32 graphs. ``with_torch`` adds the
    TorchScript graphs of the runtime's PyTorch reference backend, traced on ``torch_device``; ``inflight``,
    per-row positions (``cbart serve``'s in-flight batching)."""
    from cbart.exporter.export import ExportOptions, export_onnx

    torch_suffix = ("-torch" + ("" if torch_device == "cpu" else f"-{torch_device}")) if with_torch else ""
    path = cache / f"{spec.name}-onnx-{precision}{torch_suffix}{'-inflight' if inflight else ''}"
    stamp = path.with_name(path.name + ".exporter")
    if (path / "manifest.json").is_file() and stamp.is_file() and stamp.read_text() == exporter_fingerprint():
        return path
    options = ExportOptions(
        overwrite=True,
        quantize="int8" if precision == "int8" else None,
        verify=False,
        progress=False,
        with_torch=with_torch,
        torch_device=torch_device,
        inflight=inflight,
    )
    export_onnx(checkpoint(spec, cache), path, options, log=lambda *_: None)
    stamp.write_text(exporter_fingerprint())
    return path


def exporter_fingerprint() -> str:
    """A digest of the exporter's source: a cached export made by other exporter code is made again."""
    import hashlib

    from cbart import exporter

    digest = hashlib.sha256()
    for source in sorted(Path(exporter.__file__).parent.glob("*.py")):
        digest.update(source.read_bytes())
    return digest.hexdigest()


def tensorrt_export(spec: ModelSpec, cache: Path, precision: str, cells: list[Any]) -> Path:
    """Build (once) TensorRT engines whose profile covers ``cells`` (batch, source, beams, new tokens).

    Raises ``TensorRTUnavailable`` before building anything when TensorRT or a GPU is missing.
    """
    from cbart.exporter.engine_profiles import EngineLimits
    from cbart.exporter.export import ExportOptions, export_tensorrt
    from cbart.runtime.trt_support import require_tensorrt

    if precision not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"cbart-trt builds fp32, fp16 or bf16 engines, not {precision!r}")
    require_tensorrt()
    batch, source = max(c.batch for c in cells), max(c.source for c in cells)
    beams, new_tokens = max(c.beams for c in cells), max(c.new_tokens for c in cells)
    path = cache / f"{spec.name}-trt-{precision}-b{batch}-s{source}-k{beams}-n{new_tokens}"
    if (path / "manifest.json").is_file():
        return path
    limits = EngineLimits(
        max_batch=batch,
        opt_batch=min(c.batch for c in cells),
        max_source_length=source,
        opt_source_length=min(c.source for c in cells),
        max_new_tokens=new_tokens,
        opt_new_tokens=new_tokens,
        beams=beams,
        fp16=precision == "fp16",
        bf16=precision == "bf16",
    )
    export_tensorrt(checkpoint(spec, cache), path, limits, ExportOptions(verify=False, progress=False), log=print)
    return path


def decoder_step_bytes(
    latent: int | None,
    source_length: int,
    bytes_per_weight: float = 4.0,
    vocab: int = 50265,
    layers: int = 6,
    ffn: int = 3072,
    screened_lm_head: bool = False,
) -> float:
    """Bytes one batch-1 decode step must read: decoder weights, the LM head and the cached cross K/V.

    Per layer: self-attention (4 projections), cross-attention query and output projections (its
    K/V projections run once per request), the FFN and LayerNorms; then the LM head. The cached
    cross K/V (fp32) is read every step. Embedding lookups read one row and are ignored.
    ``screened_lm_head``: greedy search on an fp32 export reads the 8-bit head (one byte and a
    shared fp32 scale per block of weights) and the fp32 rows of the outlier channels instead.
    """
    width = 768 if latent is None else latent
    per_layer = 6 * width * width + 2 * width * ffn + ffn + 12 * width
    head = bytes_per_weight * width * vocab
    if screened_lm_head:
        from cbart.exporter.lm_head_screen import BLOCK_SIZE, OUTLIER_CHANNELS

        head = width * vocab * (1 + 4 / BLOCK_SIZE) + 4.0 * OUTLIER_CHANNELS * vocab
    weights = bytes_per_weight * layers * per_layer + head
    cross_cache = 4.0 * layers * 2 * source_length * width
    return weights + cross_cache
