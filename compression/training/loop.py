"""One optimisation loop shared by every training stage.

It owns what users expect of a trainer -- gradient accumulation, mixed precision, warmup,
gradient clipping, progress bar, periodic checkpoints, exact resume, periodic evaluation -- so
the stages only say *what* to train and *how to compute the loss*.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cbart.compression.checkpoint import CheckpointError
from tqdm.auto import tqdm

Batch = dict[str, torch.Tensor]
CHECKPOINTS = "checkpoints"


@dataclass
class TrainingArguments:
    """Optimisation settings shared by ``cbart train-ae`` and ``cbart train``."""

    output_dir: Path
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    seed: int = 0
    mixed_precision: str = "no"
    device: str = "cpu"
    save_every: int = 0
    eval_every: int = 0
    log_every: int = 50
    resume_from: Path | None = None
    progress: bool = True
    lr_schedule: str = "linear"
    label_smoothing: float = 0.0
    max_tokens: int | None = None
    save_each_epoch: bool = False
    eval_each_epoch: bool = False

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda was requested but no CUDA GPU is visible; use --device cpu")
        if self.mixed_precision == "fp16" and not self.device.startswith("cuda"):
            raise ValueError("fp16 mixed precision needs a CUDA device; use --mixed-precision bf16 on CPU")
        if self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("batch_size and gradient_accumulation_steps must be >= 1")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {sorted(SCHEDULES)}, got {self.lr_schedule!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 (padded tokens per batch), got {self.max_tokens}")


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    evaluations: list[dict[str, float]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_batches(examples: Sequence[Any], args: TrainingArguments, epoch: int) -> list[list[int]]:
    """The example indices of every batch of one epoch, reproducible from ``(seed, epoch)``.

    With ``max_tokens`` the batches are bucketed by length (as fairseq and Marian do): examples are
    sorted by length with a per-epoch random tie-break, cut into batches whose padded size
    (rows x longest source or target) stays within ``max_tokens``, and the batches are shuffled.
    This wastes little compute on padding and keeps the number of tokens per update nearly
    constant, which a fixed sentence count does not. A resumed run rebuilds the same list.
    """
    generator = torch.Generator().manual_seed(args.seed * 1000 + epoch)
    order = torch.randperm(len(examples), generator=generator).tolist()
    if args.max_tokens is None:
        return [order[start : start + args.batch_size] for start in range(0, len(order), args.batch_size)]
    lengths = [_example_length(examples[i]) for i in range(len(examples))]
    order.sort(key=lambda i: lengths[i])  # stable: the random order breaks ties
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        if current and lengths[index] * (len(current) + 1) > args.max_tokens:  # sorted: index is the longest
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffled]


def _example_length(example: Any) -> int:
    labels = example.labels
    return max(len(example.input_ids), len(labels) if isinstance(labels, list) else 1)


def fit(
    parameters: Sequence[torch.nn.Parameter],
    compute_loss: Callable[[Batch], torch.Tensor],
    examples: Sequence[Any],
    collate: Callable[[Sequence[Any]], Batch],
    args: TrainingArguments,
    save: Callable[[Path, dict[str, Any]], None],
    compatibility: dict[str, Any],
    evaluate: Callable[[], dict[str, float]] | None = None,
    description: str = "training",
) -> TrainResult:
    """Train ``parameters`` to minimise ``compute_loss``; ``save(dir, training_state)`` writes checkpoints.

    Training stops after ``max_steps`` optimizer steps if given, else after ``epochs`` epochs.
    With ``save_each_epoch`` every epoch ends with ``OUT/checkpoints/epoch-N`` (for checkpoint
    averaging or best-on-validation selection); with ``eval_each_epoch`` it ends with an evaluation.
    """
    parameters = [p for p in parameters if p.requires_grad]
    if not parameters:
        raise ValueError("nothing to train: every parameter is frozen")
    steps_per_epoch = max(1, len(epoch_batches(examples, args, 0)) // args.gradient_accumulation_steps)
    total_steps = args.max_steps or steps_per_epoch * args.epochs
    optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, SCHEDULES[args.lr_schedule](args.warmup_steps, total_steps)
    )
    scaler = torch.amp.GradScaler("cuda", enabled=args.mixed_precision == "fp16")
    result = TrainResult(steps=0)
    epoch = 0
    epoch_batch = 0  # micro-batches of ``epoch`` already consumed
    seed_everything(args.seed)
    if args.resume_from is not None:
        state = _load_resume_state(args.resume_from, compatibility)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        result = TrainResult(state["step"], state.get("losses", []), state.get("evaluations", []))
        epoch, epoch_batch = state["epoch"], state["epoch_batch"]
        torch.set_rng_state(state["torch_rng"])

    def training_state() -> dict[str, Any]:
        return {
            "step": result.steps,
            "epoch": epoch,
            "epoch_batch": epoch_batch,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "losses": result.losses,
            "evaluations": result.evaluations,
            "compatibility": compatibility,
        }

    def finished() -> bool:
        return result.steps >= total_steps if args.max_steps else epoch >= args.epochs

    autocast = _autocast(args)
    progress = tqdm(total=total_steps, initial=result.steps, desc=description, disable=not args.progress)
    running = 0.0
    while not finished():
        batches = epoch_batches(examples, args, epoch)
        while epoch_batch < len(batches):
            batch = {
                name: t.to(args.device) for name, t in collate([examples[i] for i in batches[epoch_batch]]).items()
            }
            with autocast:
                loss = compute_loss(batch) / args.gradient_accumulation_steps
            scaler.scale(loss).backward()
            running += float(loss.detach())
            epoch_batch += 1
            if epoch_batch % args.gradient_accumulation_steps and epoch_batch < len(batches):
                continue
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, args.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            result.steps += 1
            result.losses.append(running)
            progress.update(1)
            progress.set_postfix(loss=f"{running:.4f}", epoch=epoch)
            running = 0.0
            if evaluate is not None and args.eval_every and result.steps % args.eval_every == 0:
                result.evaluations.append({"step": result.steps, "epoch": epoch, **evaluate()})
                progress.write(f"step {result.steps}: {result.evaluations[-1]}")
            if args.save_every and result.steps % args.save_every == 0:
                save(args.output_dir / CHECKPOINTS / f"step-{result.steps}", training_state())
            if finished():
                break
        else:
            epoch, epoch_batch = epoch + 1, 0
            if evaluate is not None and args.eval_each_epoch:
                result.evaluations.append({"step": result.steps, "epoch": epoch, **evaluate()})
                progress.write(f"epoch {epoch}: {result.evaluations[-1]}")
            if args.save_each_epoch:
                save(args.output_dir / CHECKPOINTS / f"epoch-{epoch}", training_state())
    progress.close()
    if evaluate is not None and (not result.evaluations or result.evaluations[-1]["step"] != result.steps):
        result.evaluations.append({"step": result.steps, "epoch": epoch, **evaluate()})
    save(args.output_dir, training_state())
    return result


def _linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def _inverse_sqrt_schedule(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warm-up to the peak rate, then decay with 1/sqrt(step) (Vaswani et al.; fairseq's default).

    It needs no step budget, so a run can be extended by more epochs without changing its schedule.
    """

    def factor(step: int) -> float:
        step += 1
        if warmup and step < warmup:
            return step / warmup
        return (max(warmup, 1) / step) ** 0.5

    return factor


SCHEDULES: dict[str, Callable[[int, int], Callable[[int], float]]] = {
    "linear": _linear_schedule,
    "inverse_sqrt": _inverse_sqrt_schedule,
}


def _autocast(args: TrainingArguments) -> contextlib.AbstractContextManager[Any]:
    if args.mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.float16 if args.mixed_precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=args.device.split(":")[0], dtype=dtype)


def _load_resume_state(directory: Path, compatibility: dict[str, Any]) -> dict[str, Any]:
    from cbart.compression.checkpoint import load_training_state

    state = load_training_state(directory)
    saved = state.get("compatibility", {})
    differences = {key: (saved.get(key), value) for key, value in compatibility.items() if saved.get(key) != value}
    if differences:
        described = "; ".join(f"{key}: checkpoint {old!r} vs now {new!r}" for key, (old, new) in differences.items())
        raise CheckpointError(
            f"cannot resume from {directory}: it was trained with different settings ({described}); "
            "resume with the same stage, model and trainable parts, or start a fresh run"
        )
    return state
