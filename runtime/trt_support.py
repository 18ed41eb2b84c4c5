"""Whether TensorRT can run here, and the facts an engine must match (shared by builder and runtime).

``import tensorrt`` alone proves little: the type-stub package installs a ``tensorrt`` folder
without code, which Python imports as an empty namespace package. An engine also only runs on the
TensorRT version and GPU architecture it was built for.
"""

from __future__ import annotations

from types import ModuleType


class TensorRTUnavailable(RuntimeError):
    """TensorRT (or a CUDA GPU) is missing."""


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
