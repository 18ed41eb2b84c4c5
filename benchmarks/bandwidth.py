"""The machine's streaming read bandwidth, the denominator of the decode-step floor.

A floor must not be beatable: a batch-1 decode step cannot read its weights faster than the fastest kernel
on this machine can stream a buffer far larger than the last-level cache. So several probes each read
512 MiB of fp32, and the best wins:
- ONNX Runtime's own MatMul, ``[1, K] x [K, N]`` (MLAS, what cbart's graphs run);
- PyTorch's ``mv`` (the decode step's matrix-vector pattern);
- a read loop compiled here with the system C compiler (``-O3 -march=native``, OpenMP threads), when there
  is one: nothing but loads and adds, the ceiling for any kernel.
NumPy is left out on purpose: OpenBLAS is pinned to an older core type on these machines and reads at a
fraction of the real bandwidth. The buffers are built once (``BandwidthProbes``) and ``cbart bench``
measures in every round, keeping the best figure, so a slow moment cannot lower the floor.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROWS, COLUMNS = 8192, 16384  # 512 MiB of fp32
REPEATS = 8


def _best_seconds(run: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


READ_KERNEL = r"""
#include <omp.h>
#include <stddef.h>
float cbart_read(const float* data, size_t count, int threads) {
  omp_set_num_threads(threads);
  float total = 0.0f;
#pragma omp parallel for reduction(+ : total) schedule(static)
  for (size_t i = 0; i < count; ++i) total += data[i];
  return total;
}
"""


def compiled_read_kernel(directory: Path) -> Callable[[np.ndarray, int], float] | None:
    """The read loop above, compiled into ``directory``; None when no C compiler with OpenMP is found."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    source, library = directory / "read.c", directory / "libread.so"
    source.write_text(READ_KERNEL)
    flags = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC"]
    built = subprocess.run([compiler, *flags, str(source), "-o", str(library)], capture_output=True)
    if built.returncode != 0:
        return None
    function = ctypes.CDLL(str(library)).cbart_read
    function.restype = ctypes.c_float
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return lambda array, threads: function(array.ctypes.data, array.size, threads)


class BandwidthProbes:
    """The probes' buffers and sessions, built once (about 1.5 GiB while alive); ``measure`` runs each probe."""

    def __init__(self, threads: int) -> None:
        import onnxruntime as ort
        import torch
        from onnx import TensorProto, helper, numpy_helper

        self.threads = threads
        weights = np.full((ROWS, COLUMNS), 0.5, dtype=np.float32)
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"])],
            "bandwidth",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, ROWS])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, COLUMNS])],
            [numpy_helper.from_array(weights, "w")],
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
        del graph
        self.session = ort.InferenceSession(model, options, ["CPUExecutionProvider"])
        del model
        self.x = np.ones((1, ROWS), dtype=np.float32)
        self.matrix = torch.from_numpy(weights)  # shares the buffer the read loop reads
        self.vector = torch.ones(COLUMNS)
        self.buffer = weights
        self._scratch = tempfile.TemporaryDirectory()
        self.read = compiled_read_kernel(Path(self._scratch.name))

    def measure(self) -> dict[str, float]:
        """GB/s of every available probe, by name (best of a few repeats each)."""
        import torch

        gigabytes = ROWS * COLUMNS * 4 / 1e9
        results = {"onnxruntime_matmul": gigabytes / _best_seconds(lambda: self.session.run(None, {"x": self.x}))}
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            results["torch_mv"] = gigabytes / _best_seconds(lambda: torch.mv(self.matrix, self.vector))
        finally:
            torch.set_num_threads(previous)
        if self.read is not None:
            read = self.read
            results["compiled_read"] = gigabytes / _best_seconds(lambda: read(self.buffer, self.threads))
        return results
