"""The autoencoder that compresses BART encoder states (paper: 768 -> 576 -> 480 -> 384).

Two normalization variants share one projection stack:

* ``paper`` -- BatchNorm1d whose *channels are positions* (num_features = max source length), as
  in the original code. Training therefore needs inputs padded to that length. In eval mode the
  BatchNorm is a fixed per-position affine map, so the first L positions can be used on their own:
  inference never pads to 1024 (see :class:`PositionBatchNorm`).
* ``token`` -- LayerNorm over each token's features; independent of length and batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class PositionBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over positions of ``(batch, positions, features)`` inputs.

    Training: the input must hold exactly ``num_features`` positions, because the statistics
    are per position (the original model pads every source to its max length). Eval: the
    running statistics define ``y[:, p] = x[:, p] * scale[p] + shift[p]``, which is sliced to the
    actual length, so a 300-token input costs 300 positions, not 1024.
    """

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        length = hidden.shape[1]
        if self.training:
            if length != self.num_features:
                raise ValueError(
                    f"the 'paper' autoencoder normalizes over positions and trains on inputs padded to "
                    f"exactly {self.num_features} positions, got {length}; pad sources to "
                    f"max_length={self.num_features} (the trainers do this for you) or use the 'token' variant"
                )
            return super().forward(hidden)
        if not torch.jit.is_tracing() and not torch.compiler.is_compiling() and length > self.num_features:
            raise ValueError(
                f"source length {length} exceeds the 'paper' autoencoder's max length {self.num_features}; "
                f"truncate inputs to {self.num_features} tokens"
            )
        scale, shift = self.affine_parameters()
        return hidden * scale[:length, None] + shift[:length, None]

    def affine_parameters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The eval-mode map as per-position ``(scale, shift)`` vectors of length num_features."""
        assert self.running_mean is not None and self.running_var is not None
        scale = torch.rsqrt(self.running_var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -self.running_mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        return scale, shift


def make_norm(variant: str, width: int, max_positions: int) -> nn.Module:
    if variant == "paper":
        return PositionBatchNorm(max_positions)
    if variant == "token":
        return nn.LayerNorm(width)
    raise ValueError(f"unknown autoencoder variant {variant!r}; use 'paper' or 'token'")


class ProjectionStack(nn.Module):
    """``Linear(no bias) -> norm -> activation`` for each consecutive pair of ``widths``.

    Hidden layers use ReLU. ``last`` picks the final block: ``"tanh"`` (the compressor: a bounded
    latent) or ``"linear"`` (the reconstructor: BART states are unbounded, so no norm/activation).
    """

    def __init__(self, widths: Sequence[int], variant: str, max_positions: int, last: str = "tanh") -> None:
        super().__init__()
        if last not in ("tanh", "linear"):
            raise ValueError(f"last must be 'tanh' or 'linear', got {last!r}")
        self.widths = list(widths)
        blocks: list[nn.Module] = []
        pairs = list(zip(self.widths, self.widths[1:], strict=False))
        for index, (d_in, d_out) in enumerate(pairs):
            is_last = index == len(pairs) - 1
            blocks.append(nn.Linear(d_in, d_out, bias=False))
            if is_last and last == "linear":
                break
            blocks.append(make_norm(variant, d_out, max_positions))
            blocks.append(nn.Tanh() if is_last else nn.ReLU())
        self.layers = nn.Sequential(*blocks)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.layers(hidden)


class LatentAutoencoder(nn.Module):
    """Both halves, for stage-1 training: ``decoder(encoder(h)) ~ h`` on non-pad positions.

    Only ``encoder`` (the compressor) is kept in the compressed model; the decoder half exists
    to give the latent a reconstruction objective.
    """

    def __init__(self, base_width: int, latent_sizes: Sequence[int], variant: str, max_positions: int) -> None:
        super().__init__()
        widths = [base_width, *latent_sizes]
        self.encoder = ProjectionStack(widths, variant, max_positions, last="tanh")
        self.decoder = ProjectionStack(widths[::-1], variant, max_positions, last="linear")

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latent = self.encoder(hidden)
        return latent, self.decoder(latent)


def reconstruction_loss(
    reconstruction: torch.Tensor, target: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Mean squared error over non-pad positions only (pads carry no information to keep)."""
    mask = attention_mask[..., None].to(reconstruction.dtype)
    squared = (reconstruction - target).pow(2) * mask
    return squared.sum() / (mask.sum() * target.shape[-1]).clamp_min(1.0)
