"""Saving and loading compressed checkpoints: atomic writes, clear errors on bad directories.

A checkpoint is a ``save_pretrained`` directory (``config.json`` + ``model.safetensors``), plus
tokenizer files when a tokenizer is given, plus ``training_state.pt`` for ``--resume``.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from cbart.compression.config import CompressedBartConfig
from cbart.compression.model_card import CARD_FILE, model_card
from cbart.compression.modeling import (
    CompressedBartForConditionalGeneration,
    CompressedBartForSequenceClassification,
)
from transformers import PreTrainedModel, PreTrainedTokenizerBase

TRAINING_STATE = "training_state.pt"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete, corrupt or incompatible."""


def atomic_directory(destination: str | Path, write: Callable[[Path], None], keep: tuple[str, ...] = ()) -> Path:
    """Run ``write(tmp_dir)`` and move the result to ``destination`` only if it succeeded.

    The temporary directory lives next to the destination (same filesystem, so the final rename
    is atomic); an existing destination is swapped out and removed only after the new one is in
    place. A failure leaves the old destination untouched and no partial directory behind.
    Entries named in ``keep`` (e.g. periodic training checkpoints) are carried over from the old
    destination, by rename, just before the swap.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-", dir=destination.parent))
    try:
        write(tmp)
        for name in keep:
            if (destination / name).exists() and not (tmp / name).exists():
                os.replace(destination / name, tmp / name)
        if destination.exists():
            old = destination.with_name(f".{destination.name}.old-{os.getpid()}")
            os.replace(destination, old)
            os.replace(tmp, destination)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, destination)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return destination


def save_checkpoint(
    model: PreTrainedModel,
    directory: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    training_state: dict[str, Any] | None = None,
    extra_files: dict[str, bytes] | None = None,
    keep: tuple[str, ...] = (),
) -> Path:
    """Write a loadable checkpoint atomically (temp dir, then rename).

    A compressed model's checkpoint also holds its model card (``README.md``) and, through
    ``save_pretrained``, the code that loads it with ``trust_remote_code=True`` (see ``compression/__init__``).
    """

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if isinstance(model.config, CompressedBartConfig):
            (tmp / CARD_FILE).write_text(model_card(model, training_state), encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if training_state is not None:
            torch.save(training_state, tmp / TRAINING_STATE)
        for name, payload in (extra_files or {}).items():
            (tmp / name).write_bytes(payload)

    return atomic_directory(directory, write, keep)


def is_compressed_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a local directory whose config.json declares a compressed BART."""
    config_path = Path(path) / "config.json"
    try:
        return json.loads(config_path.read_text()).get("model_type") == CompressedBartConfig.model_type
    except (OSError, json.JSONDecodeError):
        return False


def read_config(directory: str | Path) -> CompressedBartConfig:
    """Read and validate ``config.json`` of a compressed checkpoint."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"{directory} has no config.json; is it a checkpoint written by `cbart train`, "
            "`cbart compress` or save_checkpoint()?"
        )
    try:
        fields = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_path} is not valid JSON ({error}); the checkpoint is corrupt") from error
    if fields.get("model_type") != CompressedBartConfig.model_type:
        raise CheckpointError(
            f"{directory} holds a {fields.get('model_type')!r} model, not a compressed BART; build one with "
            "`cbart compress BASE --out DIR` or import the original release with `cbart import-original`"
        )
    try:
        return CompressedBartConfig.from_dict(fields)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{config_path} has invalid compression settings: {error}") from error


def load_compressed_model(
    directory: str | Path, task: str = "seq2seq"
) -> CompressedBartForConditionalGeneration | CompressedBartForSequenceClassification:
    """Load a compressed checkpoint in eval mode, with a clear error for what is wrong with it."""
    directory = Path(directory)
    read_config(directory)
    if not any((directory / name).is_file() for name in WEIGHT_FILES):
        raise CheckpointError(f"{directory} has config.json but no weights ({' or '.join(WEIGHT_FILES)})")
    model_class = {
        "seq2seq": CompressedBartForConditionalGeneration,
        "classification": CompressedBartForSequenceClassification,
    }[task]
    try:
        model, info = model_class.from_pretrained(directory, output_loading_info=True)
    except Exception as error:  # safetensors/torch raise many types for truncated or corrupt files
        raise CheckpointError(f"could not load the weights in {directory}: {error}") from error
    missing = sorted(set(info.get("missing_keys", ())) - {"lm_head.weight"})
    if missing:
        raise CheckpointError(
            f"{directory} lacks {len(missing)} weights the model needs (first: {missing[:3]}); "
            "the checkpoint is incomplete or was written for another architecture"
        )
    return model.eval()


UNTRUSTED_PICKLE_FLAG = "--trust-pickle"


def load_torch_file(path: str | Path, trust_pickle: bool = False) -> Any:
    """``torch.load`` that unpickles tensors, containers and numbers only, unless the caller trusts the file.

    A ``.bin``/``.pth``/``.pt`` file is a pickle: a crafted one runs arbitrary code when it is loaded
    with ``weights_only=False``. Files from elsewhere (downloads, shared checkpoints) therefore load with
    ``weights_only=True``, and one that needs more is refused with the flag that opts in.
    """
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path} holds Python objects besides tensors, and unpickling them would run code from the file; "
            f"if you trust where it came from, pass {UNTRUSTED_PICKLE_FLAG} (trust_pickle=True) to load it anyway "
            f"({str(error).splitlines()[0]})"
        ) from error
    except Exception as error:  # truncated or corrupt files raise many types
        raise CheckpointError(f"{path} could not be read ({error}); is the file complete?") from error


def load_training_state(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / TRAINING_STATE
    if not path.is_file():
        raise CheckpointError(
            f"{directory} has no {TRAINING_STATE}, so training cannot resume from it; "
            "resume from a checkpoint written during training (OUT/checkpoint-*/ or OUT/last/)"
        )
    return load_torch_file(path)
