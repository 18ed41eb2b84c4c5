"""TensorRT optimization profiles derived from user-facing limits (no TensorRT import needed)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from cbart.runtime.manifest import GraphSpec


@dataclass(frozen=True)
class EngineLimits:
    """User-facing limits from which the optimization profiles are derived (opt = typical)."""

    max_batch: int = 8
    opt_batch: int = 1
    max_source_length: int = 1024
    opt_source_length: int = 512
    max_new_tokens: int = 144
    opt_new_tokens: int = 64
    beams: int = 4
    fp16: bool = False
    bf16: bool = False
    workspace_gib: float = 4.0

    def __post_init__(self) -> None:
        if self.fp16 and self.bf16:
            raise ValueError("choose one of --fp16 and --bf16")
        for name in ("max_batch", "max_source_length", "max_new_tokens", "beams"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for opt, high in (
            ("opt_batch", "max_batch"),
            ("opt_source_length", "max_source_length"),
            ("opt_new_tokens", "max_new_tokens"),
        ):
            if getattr(self, opt) > getattr(self, high):
                flag, limit = opt.replace("_", "-"), high.replace("_", "-")
                raise ValueError(
                    f"--{flag} {getattr(self, opt)} exceeds --{limit} {getattr(self, high)}; "
                    f"raise --{limit} or lower --{flag}"
                )

    def within_model(self, max_source_positions: int) -> EngineLimits:
        """The limits with the source length clamped to what the model can read.

        A profile longer than the model's source positions (or the ``paper`` autoencoder's per-position
        BatchNorm) cannot build: TensorRT reports a shape-constraint failure deep in the build.
        """
        if self.max_source_length <= max_source_positions:
            return self
        return replace(
            self,
            max_source_length=max_source_positions,
            opt_source_length=min(self.opt_source_length, max_source_positions),
        )

    def ranges(self) -> dict[str, tuple[int, int, int]]:
        """min/opt/max for every symbolic dimension name used in the manifest."""
        rows = self.max_batch * self.beams
        steps = self.max_new_tokens + 1
        return {
            "batch": (1, self.opt_batch, self.max_batch),
            "source_length": (1, self.opt_source_length, self.max_source_length),
            "decoder_batch": (1, self.opt_batch * self.beams, rows),
            "target_length": (1, 1, steps),
            "past_length": (0, self.opt_new_tokens, steps),
        }


def profile_shapes(spec: GraphSpec, limits: EngineLimits) -> dict[str, tuple[list[int], list[int], list[int]]]:
    """(min, opt, max) shape of each graph input."""
    ranges = limits.ranges()
    shapes: dict[str, tuple[list[int], list[int], list[int]]] = {}
    for tensor in spec.inputs:
        low: list[int] = []
        typical: list[int] = []
        high: list[int] = []
        for dim in tensor.shape:
            if isinstance(dim, int):
                low.append(dim)
                typical.append(dim)
                high.append(dim)
            else:
                if dim not in ranges:
                    raise ValueError(f"no optimization-profile range for dimension {dim!r} of {tensor.name}")
                a, b, c = ranges[dim]
                low.append(a)
                typical.append(b)
                high.append(c)
        shapes[tensor.name] = (low, typical, high)
    return shapes
