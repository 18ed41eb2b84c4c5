"""``cbart export FULL --draft DRAFT``: one export directory for speculative decoding.

The full model's export is written as usual (it still loads and runs alone); the draft's graphs go to
``draft/`` without an encoder graph, because the draft reads the full model's encoder output. That is
only correct when the draft's encoder *is* the full model's -- as for a compressed model trained on
that base with the encoder frozen -- so the pair is refused unless every encoder weight is equal,
and unless both share the vocabulary and special tokens. The pair is verified end to end: speculative
greedy through the export must give exactly the full PyTorch model's greedy ids.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from cbart.compression.build import encoder_mismatch
from cbart.compression.checkpoint import atomic_directory
from cbart.exporter.export import (
    ExportError,
    ExportOptions,
    ExportResult,
    check_destination,
    check_free_space,
    load_model,
    special_tokens,
    verify_export,
    write_manifest,
    write_onnx,
)
from cbart.exporter.options import check_combination
from cbart.exporter.verify import VerificationReport, compare_generation, verify_directory
from cbart.runtime.manifest import DraftSpec
from transformers import BartForConditionalGeneration

DRAFT_DIRECTORY = "draft"


def check_pair(full: BartForConditionalGeneration, draft: BartForConditionalGeneration) -> None:
    """Refuse a draft that cannot share the full model's encoder pass and token ids."""
    if draft.config.vocab_size != full.config.vocab_size:
        raise ExportError(
            f"the draft's vocabulary ({draft.config.vocab_size}) differs from the full model's "
            f"({full.config.vocab_size}); a draft must propose the full model's token ids"
        )
    if special_tokens(draft) != special_tokens(full):
        raise ExportError(
            f"the draft's special tokens {special_tokens(draft)} differ from the full model's {special_tokens(full)}"
        )
    mismatch = encoder_mismatch(full, draft)
    if mismatch is not None:
        raise ExportError(
            f"the draft cannot share the full model's encoder pass: {mismatch}. Use a draft compressed from this "
            "full model with its encoder frozen (cbart compress / cbart train keep it frozen)"
        )


def export_pair(
    checkpoint: str | Path,
    draft_checkpoint: str | Path,
    out: str | Path,
    options: ExportOptions | None = None,
    draft_quantize: str | None = None,
    log: Callable[..., None] = print,
) -> ExportResult:
    """Export the full model and its draft into ``out`` (atomically) and verify the pair.

    ``options`` apply to both; ``draft_quantize`` ("int8") makes only the draft cheaper -- the output
    stays the full fp32 model's, since only the full model's verification decides it.
    """
    options = options or ExportOptions()
    check_combination(options, draft=True, draft_quantize=draft_quantize)
    draft_options = replace(options, quantize=draft_quantize, lm_head_screen="off" if draft_quantize else "auto")
    out = Path(out)
    check_destination(out, options)
    full = load_model(checkpoint)
    draft = load_model(draft_checkpoint)
    check_pair(full, draft)
    check_free_space(out, full, options, engines=False)
    result: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        fused_attention = options.attention != "plain"
        manifest, fused = write_onnx(full, checkpoint, tmp, options, log, fused_attention, options.screens_lm_head)
        draft_dir = tmp / DRAFT_DIRECTORY
        draft_dir.mkdir()
        write_onnx(
            draft, draft_checkpoint, draft_dir, draft_options, log, fused_attention, draft_options.screens_lm_head, True
        )
        manifest.draft = DraftSpec(DRAFT_DIRECTORY, draft_options.precision, draft.config.model_type)
        write_manifest(tmp, manifest)
        report = None
        if options.verify:
            draft_report = verify_directory(draft, draft_dir, options.threads, graphs_only=True)
            if not draft_report.passed:
                raise ExportError("the draft's graphs failed verification:\n  " + "\n  ".join(draft_report.failures()))
            report = verify_export(full, tmp, manifest, options, log)
            log("verifying speculative decoding against PyTorch ...")
            speculative = VerificationReport()
            compare_generation(full, tmp, speculative, options.threads, speculative=True)
            if speculative.greedy_identical != speculative.greedy_cases:
                raise ExportError(
                    "speculative decoding through the pair differs from the full model's greedy output on "
                    f"{speculative.greedy_cases - speculative.greedy_identical} of {speculative.greedy_cases} "
                    "inputs; nothing was written"
                )
            assert manifest.verification is not None  # written by verify_export
            manifest.verification.speculative_identical = f"{speculative.greedy_identical}/{speculative.greedy_cases}"
            manifest.verification.draft_acceptance = round(speculative.draft_acceptance or 0.0, 4)
            write_manifest(tmp, manifest)
        result.update(manifest=manifest, report=report, fused=fused)

    atomic_directory(out, write)
    return ExportResult(out, result["manifest"], result["report"], result["fused"])
