"""``cbart demo``: the whole method end to end on a built-in task, with no download.

Train a small BART on sequence reversal, compress it (stage 1: autoencoder on its frozen
encoder; stage 2: a narrower decoder from the compressed memory), check that the compressed
model still gets the held-out examples exactly right, then export it to ONNX and check the same
through the ONNX Runtime runtime.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import BartForConditionalGeneration

from cbart.compression.build import build_from_base
from cbart.compression.checkpoint import save_checkpoint
from cbart.compression.data import Collator
from cbart.compression.metrics import exact_match
from cbart.compression.modeling import CompressedBartForConditionalGeneration
from cbart.compression.synthetic import ReversalTask, strip_specials
from cbart.compression.training import (
    Seq2SeqEvaluation,
    TrainingArguments,
    evaluate_generation,
    train_autoencoder,
    train_decoder,
)
from cbart.compression.training.loop import fit
from cbart.exporter.export import ExportOptions, export_onnx
from cbart.runtime.generator import Seq2SeqRuntime

TARGET_EXACT_MATCH = 95.0


@dataclass
class DemoResult:
    base_exact_match: float
    compressed_exact_match: float
    onnx_exact_match: float
    base_decoder_parameters: int
    compressed_decoder_parameters: int
    seconds: float
    output_dir: Path

    @property
    def passed(self) -> bool:
        return min(self.compressed_exact_match, self.onnx_exact_match) >= TARGET_EXACT_MATCH


def run_demo(output_dir: Path, seed: int = 0, progress: bool = True, log=print) -> DemoResult:
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    started = time.perf_counter()
    task = ReversalTask()
    train = task.sample(4000, seed)
    seen = {tuple(example.input_ids) for example in train}
    held_out = [example for example in task.sample(400, seed + 1) if tuple(example.input_ids) not in seen][:200]
    evaluation = Seq2SeqEvaluation(
        examples=held_out,
        references=[strip_specials(example.labels) for example in held_out],  # type: ignore[arg-type]
        decode=lambda batch: [strip_specials(ids) for ids in batch],
        metric="exact_match",
        batch_size=100,
        generation={"num_beams": 1, "max_new_tokens": task.max_source_tokens + 1},
    )

    log("1/4 training a small BART on sequence reversal ...")
    base = BartForConditionalGeneration(task.base_config())
    base_args = TrainingArguments(
        output_dir / "base",
        max_steps=700,
        batch_size=64,
        learning_rate=3e-3,
        warmup_steps=50,
        seed=seed,
        progress=progress,
    )
    base.train()
    fit(
        list(base.parameters()),
        lambda batch: base(**batch).loss,
        train,
        Collator(task.base_config().pad_token_id),
        base_args,
        lambda path, state: save_checkpoint(base, path, training_state=state),
        {"stage": "base"},
        description="base BART",
    )
    base.eval()
    base_score = evaluate_generation(base, evaluation)["exact_match"]  # type: ignore[arg-type]
    log(f"    base model exact match on held-out examples: {base_score:.1f}%")

    log("2/4 stage 1: autoencoder on the frozen encoder (width 64 -> 48 -> 32) ...")
    model = build_from_base(base, latent_sizes=(48, 32), autoencoder_variant="paper")
    train_autoencoder(
        model,
        train,
        TrainingArguments(
            output_dir / "autoencoder", max_steps=300, batch_size=64, learning_rate=3e-3, seed=seed, progress=progress
        ),
    )

    log("3/4 stage 2: the 32-wide decoder from the compressed memory ...")
    train_decoder(
        model,
        train,
        TrainingArguments(
            output_dir / "compressed",
            max_steps=900,
            batch_size=64,
            learning_rate=3e-3,
            warmup_steps=50,
            seed=seed,
            progress=progress,
        ),
    )
    compressed_score = evaluate_generation(model, evaluation)["exact_match"]

    log("4/4 export to ONNX (verified against PyTorch) and generate with ONNX Runtime ...")
    export_onnx(
        output_dir / "compressed",
        output_dir / "onnx",
        ExportOptions(progress=progress, overwrite=True),
        log=lambda *_: None,
    )
    runtime = Seq2SeqRuntime.from_dir(output_dir / "onnx")
    generated = runtime.generate([e.input_ids for e in held_out], **evaluation.generation).sequences
    onnx_score = exact_match([strip_specials(ids) for ids in generated], list(evaluation.references))["exact_match"]
    result = DemoResult(
        base_exact_match=base_score,
        compressed_exact_match=compressed_score,
        onnx_exact_match=onnx_score,
        base_decoder_parameters=sum(p.numel() for p in base.model.decoder.parameters()),
        compressed_decoder_parameters=model.decoder_parameter_count(),
        seconds=time.perf_counter() - started,
        output_dir=output_dir / "compressed",
    )
    _report(result, model, log)
    return result


def _report(result: DemoResult, model: CompressedBartForConditionalGeneration, log) -> None:
    verdict = "PASS" if result.passed else "FAIL"
    log(
        f"compressed model exact match: {result.compressed_exact_match:.1f}% (target >= {TARGET_EXACT_MATCH:.0f}%: "
        f"{verdict}); base {result.base_exact_match:.1f}%; exported to ONNX, run by ONNX Runtime: "
        f"{result.onnx_exact_match:.1f}%\n"
        f"decoder parameters: {result.compressed_decoder_parameters:,} vs {result.base_decoder_parameters:,} "
        f"in the base; finished in {result.seconds:.0f} s; checkpoint: {result.output_dir}"
    )
    sample = torch.tensor([[0, 4, 5, 6, 7, 8, 2]])
    generated = model.generate(input_ids=sample, attention_mask=torch.ones_like(sample), max_new_tokens=10)
    log(f"example: {strip_specials(sample[0].tolist())} -> {strip_specials(generated[0].tolist())}")
