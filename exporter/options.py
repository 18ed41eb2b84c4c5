"""What ``cbart export`` can be asked for: the options, their choices and defaults, checked in one place.

Kept free of torch and ONNX imports, so the command line reads its choices and defaults from here without
loading the exporter (``cbart generate`` starts without torch).
"""

from __future__ import annotations

from dataclasses import dataclass


class ExportError(RuntimeError):
    """The export could not be produced or failed its verification; nothing was written."""


TARGETS = ("onnx", "trt")
DTYPE_CHOICES = ("fp32", "fp16")
"""ONNX precision (bf16 exists for TensorRT engines only: ``--to trt --bf16``)."""
QUANTIZE_CHOICES = ("int8",)
TORCH_DEVICE_CHOICES = ("cpu", "cuda")
ATTENTION_CHOICES = ("auto", "fused", "plain")
"""Encoder and decoder-step self-attention in the ONNX graphs: ``fused`` = ONNX Runtime's MultiHeadAttention
contrib op (fewer, faster kernels on ONNX Runtime; unknown to TensorRT's parser), ``plain`` = standard ops,
``auto`` = fused for ONNX exports and plain for TensorRT engines."""


LM_HEAD_SCREEN_CHOICES = ("auto", "on", "off")
"""Decoder step with a screened LM head (``exporter.lm_head_screen``): exact greedy argmax from an 8-bit
copy of the head. ``auto`` = on for fp32 ONNX exports, off otherwise (it proves the argmax of fp32 logits;
TensorRT's parser has no MatMulNBits)."""


@dataclass
class ExportOptions:
    opset: int = 17
    fuse_encoder: bool = False
    attention: str = "auto"
    lm_head_screen: str = "auto"
    optimize: bool = False
    dtype: str = "fp32"
    quantize: str | None = None
    verify: bool = True
    tokenizer: str | None = None
    overwrite: bool = False
    threads: int | None = None
    timing_cache: str | None = None
    progress: bool = True
    with_torch: bool = False
    torch_device: str = "cpu"
    """The device type the TorchScript graphs are traced on, and so the one they run on (tracing records the
    device of the tensors a graph creates)."""
    inflight: bool = False
    """The decoder step also takes per-row positions and a self-attention mask, so that ``cbart serve`` can add
    requests to a running batch (in-flight batching); other generation is unchanged, token for token."""

    def __post_init__(self) -> None:
        if self.opset < 17:
            raise ValueError(f"opset must be >= 17 (LayerNormalization), got {self.opset}")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(
                f"--dtype {self.dtype} is not supported for ONNX export; use fp32 or fp16 "
                "(bf16 is available for TensorRT engines: --to trt --bf16)"
            )
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_CHOICES)}, got {self.attention!r}")
        if self.lm_head_screen not in LM_HEAD_SCREEN_CHOICES:
            raise ValueError(
                f"lm_head_screen must be one of {', '.join(LM_HEAD_SCREEN_CHOICES)}, got {self.lm_head_screen!r}"
            )
        if self.lm_head_screen == "on" and (self.dtype != "fp32" or self.quantize):
            raise ValueError(
                "--lm-head-screen on proves the argmax of fp32 logits; it applies to fp32 exports only "
                "(drop --dtype fp16 / --quantize, or use --lm-head-screen auto)"
            )
        if self.torch_device not in TORCH_DEVICE_CHOICES:
            raise ValueError(f"--torch-device must be cpu or cuda, got {self.torch_device!r}")
        if self.torch_device != "cpu" and not self.with_torch:
            raise ValueError("--torch-device chooses where the TorchScript graphs are traced; add --with-torch")
        if self.quantize not in (None, *QUANTIZE_CHOICES):
            raise ValueError(f"--quantize supports int8 only, got {self.quantize!r}")
        if self.quantize and self.dtype != "fp32":
            raise ValueError("int8 quantization starts from fp32 graphs; drop --dtype fp16")

    @property
    def precision(self) -> str:
        return self.quantize or self.dtype

    @property
    def screens_lm_head(self) -> bool:
        """Whether an ONNX export gets the screened LM head (TensorRT exports never do)."""
        return self.lm_head_screen != "off" and self.precision == "fp32"


def check_combination(
    options: ExportOptions,
    target: str = "onnx",
    draft: bool = False,
    draft_quantize: str | None = None,
    engine_precision: bool = False,
) -> None:
    """Every check on how export options combine, in one place (``ExportOptions`` checks each one alone).

    ``target``: ``onnx`` or ``trt``; ``draft``: a speculative pair (``--draft``); ``engine_precision``: a TensorRT
    precision flag (``--fp16``/``--bf16``) was given.
    """
    if target == "trt":
        if draft:
            raise ExportError("--draft (speculative pairs) writes ONNX exports only; drop --to trt or --draft")
        if options.dtype != "fp32" or options.quantize:
            raise ExportError(
                "for --to trt choose precision with --fp16/--bf16; --dtype/--quantize apply to ONNX exports"
            )
        if options.attention == "fused":
            raise ExportError(
                "--attention fused uses ONNX Runtime's MultiHeadAttention contrib op, which TensorRT's ONNX parser "
                "cannot read; use --attention plain (or auto) with --to trt"
            )
        if options.lm_head_screen == "on":
            raise ExportError(
                "--lm-head-screen on uses ONNX Runtime's MatMulNBits contrib op, which TensorRT's ONNX parser "
                "cannot read; use --lm-head-screen auto (or off) with --to trt"
            )
        if options.inflight:
            raise ExportError(
                "--inflight (per-row positions for in-flight batching) is an ONNX Runtime feature of `cbart serve`; "
                "drop --inflight with --to trt"
            )
        if options.optimize:
            raise ExportError(
                "--optimize applies ONNX Runtime's transformer fusions (com.microsoft ops), which TensorRT's ONNX "
                "parser cannot read; drop --optimize with --to trt (TensorRT fuses the graph itself when it builds "
                "engines)"
            )
        return
    if engine_precision:
        raise ExportError("--fp16/--bf16 are TensorRT build flags; for ONNX use --dtype fp16")
    if draft:
        if options.quantize:
            raise ExportError("--quantize would change the full model's output; with --draft use --draft-quantize int8")
        if options.fuse_encoder:
            raise ExportError("--fuse-encoder cannot be used with --draft: the pair shares the encoder graph")
        if options.inflight:
            raise ExportError(
                "--inflight cannot be used with --draft: in-flight batching decodes without a draft; export the "
                "full model alone with --inflight for `cbart serve`"
            )
    elif draft_quantize:
        raise ExportError("--draft-quantize applies to the draft of a speculative pair; add --draft DRAFT_CKPT")
