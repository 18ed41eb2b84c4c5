"""The paper's training stages on top of the shared loop.

Stage 1 trains the autoencoder to reconstruct frozen encoder states. Stage 2 trains the narrow
decoder (or a classification head on it) from the compressed memory, encoder and compressor
frozen by default -- which is where the paper's fine-tuning memory saving comes from.
"""

from __future__ import annotations

import contextlib
import copy
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from cbart.compression.autoencoder import LatentAutoencoder, reconstruction_loss
from cbart.compression.build import encoder_mismatch
from cbart.compression.checkpoint import save_checkpoint
from cbart.compression.data import Collator, Example
from cbart.compression.metrics import TEXT_METRICS, accuracy
from cbart.compression.modeling import (
    CompressedBartForConditionalGeneration,
    CompressedBartForSequenceClassification,
)
from cbart.compression.training.loop import CHECKPOINTS, TrainingArguments, TrainResult, fit
from safetensors.torch import load_file, save
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.bart.modeling_bart import shift_tokens_right

AUTOENCODER_FILE = "autoencoder.safetensors"
CompressedModel = CompressedBartForConditionalGeneration | CompressedBartForSequenceClassification


def _stay_in_eval(module: nn.Module, mode: bool = True) -> nn.Module:
    """``train()`` of a frozen module: eval mode whatever ``mode`` -- transformers' Trainer calls
    ``model.train()`` every step, which would otherwise turn on the frozen part's dropout and let the
    ``paper`` autoencoder's BatchNorm update its running statistics."""
    return nn.Module.train(module, False)


def _set_trainable(module: nn.Module, trainable: bool) -> None:
    module.requires_grad_(trainable)
    if trainable:
        for child in module.modules():
            child.__dict__.pop("train", None)  # drop a frozen part's pinned eval mode
        module.train(True)
    else:
        module.train(False)
        module.train = types.MethodType(_stay_in_eval, module)  # type: ignore[method-assign]


def _pad_source_to(model: CompressedModel, compressor_trains: bool) -> int | None:
    """The paper AE's BatchNorm needs full-length inputs only while its statistics are trained."""
    config = model.config
    return config.autoencoder_max_positions if compressor_trains and config.autoencoder_variant == "paper" else None


def _saver(
    model: PreTrainedModel, tokenizer: Any, extra: Callable[[], dict[str, bytes]] | None = None
) -> Callable[[Path, dict[str, Any]], None]:
    def write(directory: Path, state: dict[str, Any]) -> None:
        save_checkpoint(model, directory, tokenizer, state, extra() if extra else None, keep=(CHECKPOINTS,))

    return write


def target_logits(
    model: PreTrainedModel, batch: dict[str, torch.Tensor], encoder_outputs: BaseModelOutput | None = None
) -> torch.Tensor:
    """Teacher-forced logits at the non-pad target positions only, as ``(tokens, vocab)``.

    The decoder reads the labels shifted right. The LM head runs only where a label exists: on
    length-bucketed batches a quarter or more of the padded positions are pads, and the LM head
    with its softmax is the largest single cost of a small model's training step.
    """
    config = model.config
    labels = batch["labels"]
    decoder_input_ids = shift_tokens_right(labels, config.pad_token_id, config.decoder_start_token_id)
    hidden = model.model(
        input_ids=None if encoder_outputs is not None else batch["input_ids"],
        attention_mask=batch["attention_mask"],
        encoder_outputs=encoder_outputs,
        decoder_input_ids=decoder_input_ids,
        use_cache=False,
    ).last_hidden_state
    return F.linear(hidden[labels != -100], model.lm_head.weight, model.final_logits_bias[0])


def label_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean token cross-entropy of ``target_logits`` against the batch's non-pad labels, optionally smoothed."""
    return F.cross_entropy(logits.float(), labels[labels != -100], label_smoothing=label_smoothing)


@dataclass(frozen=True)
class Distillation:
    """Token-level knowledge distillation from the base (teacher) model into the narrow decoder.

    loss = (1 - alpha) * CE(student, labels) + alpha * T^2 * KL(teacher_T || student_T), where ``_T``
    is the softmax at temperature T (Hinton et al., 2015). The T^2 keeps the soft term's gradient
    scale independent of T. The teacher reads the same frozen encoder output the student compresses,
    so the encoder runs once per batch for both.
    """

    teacher: PreTrainedModel
    alpha: float = 0.5
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"distillation alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise ValueError(f"distillation temperature must be > 0, got {self.temperature}")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over the target tokens (``target_logits``)."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


def check_teacher(model: CompressedBartForConditionalGeneration, teacher: PreTrainedModel) -> None:
    """The teacher must share the student's frozen encoder and vocabulary, or its soft targets are for other inputs."""
    if teacher.config.vocab_size != model.config.vocab_size:
        raise ValueError(
            f"the teacher's vocabulary ({teacher.config.vocab_size}) differs from the student's "
            f"({model.config.vocab_size}); distil from the base model the student was compressed from"
        )
    mismatch = encoder_mismatch(teacher, model)
    if mismatch is not None:
        raise ValueError(
            f"the teacher cannot serve this student: {mismatch}; distil from the base model the student was "
            "compressed from (its encoder is the student's frozen encoder)"
        )


def train_autoencoder(
    model: CompressedBartForConditionalGeneration,
    examples: Sequence[Example],
    args: TrainingArguments,
    tokenizer: Any = None,
) -> TrainResult:
    """Stage 1: fit the autoencoder on the frozen encoder's outputs; the model's compressor is updated.

    The full autoencoder (both halves) is saved as ``autoencoder.safetensors`` beside the model so
    that ``--resume`` continues exactly; the compressed model itself only keeps the encoder half.
    """
    config = model.config
    model.to(args.device)
    encoder = model.model.encoder.base
    _set_trainable(model, False)
    autoencoder = LatentAutoencoder(
        config.encoder_d_model, config.latent_sizes, config.autoencoder_variant, config.autoencoder_max_positions
    ).to(args.device)
    if args.resume_from is not None:
        autoencoder.load_state_dict(load_file(Path(args.resume_from) / AUTOENCODER_FILE))
    autoencoder.train()

    def compute_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            hidden = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        _, reconstruction = autoencoder(hidden.float())
        return reconstruction_loss(reconstruction.float(), hidden.float(), batch["attention_mask"])

    def extra_files() -> dict[str, bytes]:
        model.model.encoder.compressor.load_state_dict(autoencoder.encoder.state_dict())
        return {AUTOENCODER_FILE: save({k: v.detach().cpu().contiguous() for k, v in autoencoder.state_dict().items()})}

    compatibility = _compatibility(model, "autoencoder", [autoencoder])
    pad_to = config.autoencoder_max_positions if config.autoencoder_variant == "paper" else None
    result = fit(
        list(autoencoder.parameters()),
        compute_loss,
        examples,
        Collator(config.pad_token_id, pad_to),
        args,
        _saver(model, tokenizer, extra_files),
        compatibility,
        description="stage 1: autoencoder",
    )
    model.eval()
    return result


@dataclass
class Seq2SeqEvaluation:
    """Held-out examples and how to score generations of them during stage 2.

    ``decode`` turns generated ids into what ``references`` hold (text for ROUGE/BLEU, id lists for
    exact match); ``generation`` holds ``generate()`` keyword arguments (the paper's by default).
    """

    examples: Sequence[Example]
    references: Sequence[Any]
    decode: Callable[[list[list[int]]], list[Any]]
    metric: str = "rouge"
    batch_size: int = 8
    generation: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside, and afterwards every submodule back in *its own* mode.

    ``model.train()`` would put the frozen encoder and compressor back in training mode too, which
    changes them (dropout; the ``paper`` autoencoder's BatchNorm then demands full-length inputs).
    """
    modes = {name: module.training for name, module in model.named_modules()}
    model.eval()
    try:
        yield
    finally:
        for name, module in model.named_modules():
            module.train(modes[name])


def evaluate_generation(model: PreTrainedModel, evaluation: Seq2SeqEvaluation) -> dict[str, float]:
    """Generate for every held-out example and score it with ``evaluation.metric``."""
    if evaluation.metric not in TEXT_METRICS:
        raise ValueError(f"unknown metric {evaluation.metric!r}; choose from {sorted(TEXT_METRICS)}")
    collate = Collator(model.config.pad_token_id)
    predictions: list[Any] = []
    device = next(model.parameters()).device
    with evaluation_mode(model), torch.no_grad():
        for start in range(0, len(evaluation.examples), evaluation.batch_size):
            batch = collate(evaluation.examples[start : start + evaluation.batch_size])
            generated = model.generate(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                **evaluation.generation,
            )
            predictions.extend(evaluation.decode(generated.tolist()))
    return TEXT_METRICS[evaluation.metric](predictions, list(evaluation.references))


def _generation_scorer(
    model: PreTrainedModel, evaluation: Seq2SeqEvaluation | None
) -> Callable[[], dict[str, float]] | None:
    return (lambda: evaluate_generation(model, evaluation)) if evaluation is not None else None


def train_decoder(
    model: CompressedBartForConditionalGeneration,
    examples: Sequence[Example],
    args: TrainingArguments,
    tokenizer: Any = None,
    evaluation: Seq2SeqEvaluation | None = None,
    train_encoder: bool = False,
    train_compressor: bool = False,
    distillation: Distillation | None = None,
    evaluation_callback: Callable[[], dict[str, float]] | None = None,
) -> TrainResult:
    """Stage 2: train the narrow decoder on a seq2seq task from the compressed memory.

    With ``distillation`` the loss mixes the labels with the base model's soft targets.
    ``evaluation_callback`` replaces the ``evaluation`` scoring when a caller scores its own way.
    """
    model.to(args.device)
    freeze_for_stage2(model, train_encoder, train_compressor)
    smoothing = args.label_smoothing
    if distillation is None:

        def compute_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return label_loss(target_logits(model, batch), batch["labels"], smoothing)

    else:
        if train_encoder:
            raise ValueError("distillation shares the frozen encoder with the teacher; drop --unfreeze-encoder")
        check_teacher(model, distillation.teacher)
        teacher = distillation.teacher.to(args.device).eval().requires_grad_(False)
        encoder = model.model.encoder

        def compute_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            with torch.no_grad():
                hidden = encoder.base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                teacher_logits = target_logits(teacher, batch, hidden)
            compressed = BaseModelOutput(last_hidden_state=encoder.compressor(hidden.last_hidden_state))
            logits = target_logits(model, batch, compressed)
            hard = label_loss(logits, batch["labels"], smoothing)
            soft = distillation_loss(logits, teacher_logits, distillation.temperature)
            return (1 - distillation.alpha) * hard + distillation.alpha * soft

    result = fit(
        list(model.parameters()),
        compute_loss,
        examples,
        Collator(model.config.pad_token_id, _pad_source_to(model, train_compressor)),
        args,
        _saver(model, tokenizer),
        {**_compatibility(model, "decoder", [model]), "distilled": distillation is not None},
        evaluation_callback or _generation_scorer(model, evaluation),
        description="stage 2: decoder" + (" (distilled)" if distillation is not None else ""),
    )
    model.eval()
    return result


def train_full_model(
    model: PreTrainedModel,
    examples: Sequence[Example],
    args: TrainingArguments,
    tokenizer: Any = None,
    evaluation: Seq2SeqEvaluation | None = None,
    evaluation_callback: Callable[[], dict[str, float]] | None = None,
) -> TrainResult:
    """The baseline the paper compares against: fine-tune every weight of the uncompressed BART.

    Works for the seq2seq model and for ``BartForSequenceClassification`` (integer labels).
    """
    model.to(args.device)
    _set_trainable(model, True)
    shapes = {name: list(p.shape) for name, p in model.named_parameters()}

    def compute_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if batch["labels"].dim() == 1:  # a class per example: a sequence-classification model
            return F.cross_entropy(model(**batch).logits.float(), batch["labels"], label_smoothing=args.label_smoothing)
        return label_loss(target_logits(model, batch), batch["labels"], args.label_smoothing)

    result = fit(
        list(model.parameters()),
        compute_loss,
        examples,
        Collator(model.config.pad_token_id),
        args,
        _saver(model, tokenizer),
        {"stage": "full", "trainable_parameters": sorted(shapes)},
        evaluation_callback or _generation_scorer(model, evaluation),
        description="full model",
    )
    model.eval()
    return result


def to_classifier(
    model: CompressedBartForConditionalGeneration, num_labels: int
) -> CompressedBartForSequenceClassification:
    """A classification model sharing the trained encoder, compressor and decoder of ``model``."""
    config = copy.deepcopy(model.config)
    config.num_labels = num_labels  # the setter also rebuilds id2label/label2id
    classifier = CompressedBartForSequenceClassification(config)
    classifier.model.load_state_dict(model.model.state_dict())
    return classifier


def train_classifier(
    model: CompressedBartForSequenceClassification,
    examples: Sequence[Example],
    args: TrainingArguments,
    tokenizer: Any = None,
    held_out: Sequence[Example] | None = None,
    train_encoder: bool = False,
    train_compressor: bool = False,
) -> TrainResult:
    """Stage 2 for classification: the decoder and a BART classification head on its EOS state."""
    model.to(args.device)
    freeze_for_stage2(model, train_encoder, train_compressor)
    evaluate = (lambda: classification_accuracy(model, held_out, args.batch_size)) if held_out else None
    return fit(
        list(model.parameters()),
        lambda batch: model(**batch).loss,
        examples,
        Collator(model.config.pad_token_id, _pad_source_to(model, train_compressor)),
        args,
        _saver(model, tokenizer),
        _compatibility(model, "classifier", [model]),
        evaluate,
        description="stage 2: classifier",
    )


def classify(model: PreTrainedModel, examples: Sequence[Example], batch_size: int = 16) -> list[int]:
    """The predicted class of every example (any sequence-classification model, compressed or not)."""
    collate = Collator(model.config.pad_token_id)
    device = next(model.parameters()).device
    predictions: list[int] = []
    with evaluation_mode(model), torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size])
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits
            predictions.extend(logits.argmax(-1).tolist())
    return predictions


def classification_accuracy(
    model: CompressedBartForSequenceClassification, examples: Sequence[Example], batch_size: int = 16
) -> dict[str, float]:
    predictions = classify(model, examples, batch_size)
    return accuracy(predictions, [int(example.labels) for example in examples])  # type: ignore[arg-type]


def freeze_for_stage2(model: CompressedModel, train_encoder: bool = False, train_compressor: bool = False) -> None:
    """Stage 2's trainable set: the decoder (and head) train; the encoder and compressor stay frozen and in
    eval mode, also when a training loop calls ``model.train()`` (e.g. transformers' ``Seq2SeqTrainer``)."""
    _set_trainable(model, True)
    _set_trainable(model.model.encoder.base, train_encoder)
    _set_trainable(model.model.encoder.compressor, train_compressor)


def _compatibility(model: CompressedModel, stage: str, trained: Sequence[nn.Module]) -> dict[str, Any]:
    """What must match for ``--resume`` to continue the same run."""
    config = model.config
    shapes = {name: list(p.shape) for module in trained for name, p in module.named_parameters() if p.requires_grad}
    return {
        "stage": stage,
        "latent_sizes": list(config.latent_sizes),
        "autoencoder_variant": config.autoencoder_variant,
        "trainable_parameters": sorted(shapes),
        "parameter_count": sum(int(torch.tensor(s).prod()) for s in shapes.values()),
    }
