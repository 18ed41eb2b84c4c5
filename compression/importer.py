"""Import the original compressed-BART release into cbart's checkpoint format.

The original repository ships, per latent size, a directory with ``config.json`` and
``pytorch_model.bin`` (a ``BartForConditionalGeneration``-style state dict whose decoder is
``d_model`` = latent wide and whose encoder keeps the base width) and ``ae-checkpoint.pth``
holding ``{'model': autoencoder_state_dict}``; the three projection sizes are passed on the
command line (``--first 576 --second 480 --third 384``).

The autoencoder's parameter *names* depend on the original module layout, so blocks are matched
by order and shape instead: the state dict lists modules in registration order, the encoder half
first -- Linear (2-D weight) then BatchNorm (running stats) for each projection.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from cbart.compression.checkpoint import CheckpointError, load_torch_file
from cbart.compression.config import CompressedBartConfig
from cbart.compression.modeling import CompressedBartForConditionalGeneration
from transformers import BartConfig

ORIGINAL_FILES = ("config.json", "pytorch_model.bin", "ae-checkpoint.pth")
BATCHNORM_FIELDS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _group_modules(state: dict[str, torch.Tensor]) -> list[tuple[str, dict[str, torch.Tensor]]]:
    groups: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
    for key, tensor in state.items():
        prefix, _, field = key.rpartition(".")
        groups.setdefault(prefix, {})[field] = tensor
    return list(groups.items())


def autoencoder_encoder_state(
    ae_state: dict[str, torch.Tensor], base_width: int, latent_sizes: Sequence[int]
) -> dict[str, torch.Tensor]:
    """Map the original autoencoder's encoder half onto ``ProjectionStack`` parameter names."""
    groups = _group_modules(ae_state)
    widths = [base_width, *latent_sizes]
    mapped: dict[str, torch.Tensor] = {}
    cursor = 0
    for block, (d_in, d_out) in enumerate(zip(widths, widths[1:], strict=False)):
        while cursor < len(groups) and groups[cursor][1].get("weight", torch.empty(0)).dim() != 2:
            cursor += 1
        if cursor == len(groups):
            raise CheckpointError(f"ae-checkpoint.pth has no Linear layer for projection {d_in}->{d_out}")
        name, linear = groups[cursor]
        if tuple(linear["weight"].shape) != (d_out, d_in):
            raise CheckpointError(
                f"ae-checkpoint.pth layer {name} is {tuple(linear['weight'].shape[::-1])} but projection "
                f"{block + 1} should be ({d_in}, {d_out}); check the latent sizes "
                f"(--latent {' '.join(map(str, latent_sizes))})"
            )
        if cursor + 1 >= len(groups) or "running_mean" not in groups[cursor + 1][1]:
            raise CheckpointError(f"ae-checkpoint.pth: expected a BatchNorm after {name}")
        norm = groups[cursor + 1][1]
        mapped[f"layers.{3 * block}.weight"] = linear["weight"]
        for field in BATCHNORM_FIELDS:
            if field in norm:
                mapped[f"layers.{3 * block + 1}.{field}"] = norm[field]
        cursor += 2
    return mapped


def import_original_checkpoint(
    source: str | Path, latent_sizes: Sequence[int] | None = None, trust_pickle: bool = False
) -> CompressedBartForConditionalGeneration:
    """Build a cbart model from an original release directory (see module docstring).

    The release's files are pickles; they load as tensors only unless ``trust_pickle`` (see
    ``load_torch_file``).
    """
    source = Path(source)
    missing = [name for name in ORIGINAL_FILES if not (source / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{source} is missing {', '.join(missing)}; an original compressed-BART checkpoint directory "
            f"holds {', '.join(ORIGINAL_FILES)}"
        )
    weights: dict[str, torch.Tensor] = load_torch_file(source / "pytorch_model.bin", trust_pickle)
    ae_payload = load_torch_file(source / "ae-checkpoint.pth", trust_pickle)
    if not isinstance(ae_payload, dict) or not isinstance(ae_payload.get("model"), dict):
        raise CheckpointError(f"{source / 'ae-checkpoint.pth'} should hold {{'model': state_dict}}")
    try:
        base = BartConfig.from_dict(json.loads((source / "config.json").read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as error:
        raise CheckpointError(f"{source / 'config.json'} is not a valid BART config: {error}") from error

    # Widths come from the tensors: the release's config.json may describe bart-base itself.
    base_width = weights["model.encoder.layers.0.fc1.weight"].shape[1]
    latent = weights["model.decoder.layers.0.fc1.weight"].shape[1]
    ae_state = ae_payload["model"]
    if latent_sizes is None:
        latent_sizes = _infer_latent_sizes(ae_state, base_width, latent)
    if latent_sizes[-1] != latent:
        raise CheckpointError(
            f"the decoder in {source} is {latent} wide but the latent sizes given end in {latent_sizes[-1]}"
        )
    max_positions = _batchnorm_size(ae_state)
    fields = base.to_dict()
    for key in ("model_type", "d_model", "architectures", "transformers_version"):
        fields.pop(key, None)
    config = CompressedBartConfig(
        encoder_d_model=base_width,
        latent_sizes=list(latent_sizes),
        autoencoder_variant="paper",
        autoencoder_max_positions=max_positions,
        **fields,
    )
    model = CompressedBartForConditionalGeneration(config)
    model.model.encoder.compressor.load_state_dict(autoencoder_encoder_state(ae_state, base_width, latent_sizes))
    _load_transformer_weights(model, weights, source)
    return model.eval()


def _infer_latent_sizes(ae_state: dict[str, torch.Tensor], base_width: int, latent: int) -> list[int]:
    sizes: list[int] = []
    width = base_width
    for _, group in _group_modules(ae_state):
        weight = group.get("weight")
        if weight is not None and weight.dim() == 2 and weight.shape[1] == width:
            width = int(weight.shape[0])
            sizes.append(width)
            if width == latent:
                return sizes
    raise CheckpointError(
        f"could not trace the autoencoder from {base_width} down to {latent}; pass --latent explicitly"
    )


def _batchnorm_size(ae_state: dict[str, torch.Tensor]) -> int:
    for key, tensor in ae_state.items():
        if key.endswith("running_mean"):
            return int(tensor.shape[0])
    raise CheckpointError("ae-checkpoint.pth has no BatchNorm layers; it is not the paper's autoencoder")


def _load_transformer_weights(
    model: CompressedBartForConditionalGeneration, weights: dict[str, torch.Tensor], source: Path
) -> None:
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in weights.items():
        if key.startswith("model.encoder.") and not key.startswith("model.encoder.ae."):
            renamed["model.encoder.base." + key.removeprefix("model.encoder.")] = tensor
        elif key.startswith(("model.decoder.", "lm_head.", "final_logits_bias")):
            renamed[key] = tensor
    if "model.decoder.embed_tokens.weight" in renamed:
        renamed["model.shared.weight"] = renamed["model.decoder.embed_tokens.weight"]
    if "model.encoder.base.embed_tokens.weight" not in renamed and "model.shared.weight" in weights:
        renamed["model.encoder.base.embed_tokens.weight"] = weights["model.shared.weight"]
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith("model.encoder.compressor.")}
    missing = sorted(set(expected) - set(renamed) - {"lm_head.weight"})
    if missing:
        raise CheckpointError(f"{source / 'pytorch_model.bin'} lacks {len(missing)} weights, e.g. {missing[:3]}")
    wrong = [k for k in expected if k in renamed and renamed[k].shape != expected[k].shape]
    if wrong:
        k = wrong[0]
        raise CheckpointError(
            f"{source / 'pytorch_model.bin'}: {k} has shape {tuple(renamed[k].shape)}, "
            f"expected {tuple(expected[k].shape)}"
        )
    model.load_state_dict({k: v for k, v in renamed.items() if k in expected}, strict=False)
