"""One optimisation loop shared by every training stage.

It owns what users expect of a trainer -- gradient accumulation, mixed precision, warmup,
gradient clipping, progress bar, periodic checkpoints, exact resume, periodic evaluation -- so
the stages only say *what* to train and *how to compute the loss*.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from compression.checkpoint import CheckpointError

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


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    evaluations: list[dict[str, float]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def batches_for_epoch(
    examples: Sequence[Any], collate: Callable[[Sequence[Any]], Batch], batch_size: int, seed: int, epoch: int
) -> Iterator[Batch]:
    """Shuffled batches, reproducible from ``(seed, epoch)`` so a resumed run sees the same order."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    for start in range(0, len(examples), batch_size):
        yield collate([examples[int(i)] for i in order[start : start + batch_size]])


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
    """Train ``parameters`` to minimise ``compute_loss``; ``save(dir, training_state)`` writes checkpoints."""
    parameters = [p for p in parameters if p.requires_grad]
    if not parameters:
        raise ValueError("nothing to train: every parameter is frozen")
    micro_per_epoch = math.ceil(len(examples) / args.batch_size)
    steps_per_epoch = max(1, micro_per_epoch // args.gradient_accumulation_steps)
    total_steps = args.max_steps or steps_per_epoch * args.epochs
    optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _linear_schedule(args.warmup_steps, total_steps))
    scaler = torch.amp.GradScaler("cuda", enabled=args.mixed_precision == "fp16")
    result = TrainResult(steps=0)
    micro_step = 0
    seed_everything(args.seed)
    if args.resume_from is not None:
        state = _load_resume_state(args.resume_from, compatibility)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        result = TrainResult(state["step"], state.get("losses", []), state.get("evaluations", []))
        micro_step = state["micro_step"]
        torch.set_rng_state(state["torch_rng"])

    def training_state() -> dict[str, Any]:
        return {
            "step": result.steps,
            "micro_step": micro_step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "losses": result.losses,
            "evaluations": result.evaluations,
            "compatibility": compatibility,
        }

    autocast = _autocast(args)
    progress = tqdm(total=total_steps, initial=result.steps, desc=description, disable=not args.progress)
    running = 0.0
    epoch = micro_step // micro_per_epoch
    while result.steps < total_steps:
        skip = micro_step - epoch * micro_per_epoch
        for index, batch in enumerate(batches_for_epoch(examples, collate, args.batch_size, args.seed, epoch)):
            if index < skip:
                continue
            batch = {name: tensor.to(args.device) for name, tensor in batch.items()}
            with autocast:
                loss = compute_loss(batch) / args.gradient_accumulation_steps
            scaler.scale(loss).backward()
            running += float(loss.detach())
            micro_step += 1
            if micro_step % args.gradient_accumulation_steps:
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
            progress.set_postfix(loss=f"{running:.4f}")
            running = 0.0
            if evaluate is not None and args.eval_every and result.steps % args.eval_every == 0:
                result.evaluations.append({"step": result.steps, **evaluate()})
                progress.write(f"step {result.steps}: {result.evaluations[-1]}")
            if args.save_every and result.steps % args.save_every == 0:
                save(args.output_dir / CHECKPOINTS / f"step-{result.steps}", training_state())
            if result.steps >= total_steps:
                break
        epoch += 1
    progress.close()
    if evaluate is not None and (not result.evaluations or result.evaluations[-1]["step"] != result.steps):
        result.evaluations.append({"step": result.steps, **evaluate()})
    save(args.output_dir, training_state())
    return result


def _linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def _autocast(args: TrainingArguments) -> contextlib.AbstractContextManager[Any]:
    if args.mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.float16 if args.mixed_precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=args.device.split(":")[0], dtype=dtype)


def _load_resume_state(directory: Path, compatibility: dict[str, Any]) -> dict[str, Any]:
    from compression.checkpoint import load_training_state

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
