"""Whether TensorRT can run here, and the facts an engine must match (shared by builder and runtime).

``import tensorrt`` alone proves little: the type-stub package installs a ``tensorrt`` folder
without code, which Python imports as an empty namespace package. An engine also only runs on the
TensorRT version and GPU architecture it was built for.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any


class TensorRTUnavailable(RuntimeError):
    """TensorRT (or a CUDA GPU) is missing, or the installed TensorRT is a version cbart does not support."""


# 10.1 added ``set_device_memory(memory, size)`` (the CUDA-graph path); 11 dropped the weakly-typed
# precision API (``BuilderFlag.FP16``, ``ILayer.precision``) that --fp16/--bf16 engines use.
SUPPORTED_TENSORRT = ((10, 1), (11, 0))


def check_tensorrt_version(version: str) -> None:
    """Refuse a TensorRT outside ``SUPPORTED_TENSORRT`` with the pip command that installs a supported one."""
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError as error:
        raise TensorRTUnavailable(f"cannot read the TensorRT version {version!r}") from error
    low, high = SUPPORTED_TENSORRT
    if not low <= (major, minor) < high:
        raise TensorRTUnavailable(
            f"TensorRT {version} is installed, but cbart supports TensorRT >= {low[0]}.{low[1]}, < {high[0]}; "
            f"install a supported one with pip install 'tensorrt>={low[0]}.{low[1]},<{high[0]}'"
        )


def import_tensorrt() -> ModuleType:
    try:
        import tensorrt
    except ImportError as error:
        raise TensorRTUnavailable(
            "TensorRT is not installed: install it with pip install 'cbart[trt]' on a machine with an NVIDIA GPU"
        ) from error
    if not hasattr(tensorrt, "Builder"):
        raise TensorRTUnavailable(
            "the installed `tensorrt` package has no runtime (only type stubs?): install it with "
            "pip install 'cbart[trt]' on a machine with an NVIDIA GPU"
        )
    check_tensorrt_version(tensorrt.__version__)
    return tensorrt


def cuda_compute_capability() -> str:
    """``"major.minor"`` of the current CUDA device, or TensorRTUnavailable when there is none."""
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable(
            "TensorRT needs an NVIDIA GPU and none is visible (torch.cuda.is_available() is False)"
        )
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def require_tensorrt() -> tuple[ModuleType, str]:
    """TensorRT module and GPU compute capability, or a clear error naming what is missing."""
    tensorrt = import_tensorrt()
    return tensorrt, cuda_compute_capability()


def check_request(
    limits: dict[str, Any],
    sources: int | None = None,
    source_length: int | None = None,
    rows: int | None = None,
    max_length: int | None = None,
) -> None:
    """Refuse, before any CUDA work, a request outside the engines' optimization profiles.

    ``limits`` is the manifest's record of ``cbart export --to trt``'s limits. TensorRT itself would
    reject such shapes deep inside execution (or torch would report a negative dimension); the error
    here names the limit and the export flag that raises it.
    """
    checks = (
        (sources, limits["max_batch"], "sources in one request", "--max-batch"),
        (source_length, limits["max_source_length"], "source tokens", "--max-source-length"),
        (rows, limits["max_batch"] * limits["beams"], "decoder rows (sources x beams)", "--max-batch/--beams"),
        (None if max_length is None else max_length - 1, limits["max_new_tokens"], "new tokens", "--max-new-tokens"),
    )
    for needed, limit, what, flag in checks:
        if needed is not None and needed > limit:
            raise ValueError(
                f"this request needs {needed} {what}, but the TensorRT engines were built for at most {limit}; "
                f"rebuild them with a larger {flag} (cbart export --to trt), or split the request"
            )
