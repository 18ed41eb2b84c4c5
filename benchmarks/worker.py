"""One system, one cell, in a fresh process: warm up once, then time T(1) and T(N) generations.

Run by ``benchmarks.latency``; prints one JSON object, with the new token ids of the last N-token call (the
harness compares them with transformers'). Every system generates exactly N new tokens (min = max new
tokens), so none stops early.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

Generate = Callable[[int], list[list[int]]]
"""Generates exactly that many new tokens for every source; returns each source's best sequence (any prefix)."""


def source_ids(batch: int, length: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, 50000, (batch, length)).astype(np.int64)
    ids[:, 0], ids[:, -1] = 0, 2
    return ids


DTYPES = ("fp32", "bf16", "fp16")


def transformers_system(
    path: Path, ids: np.ndarray, beams: int, threads: int, device: str = "cpu", dtype: str = "fp32"
) -> Generate:
    import cbart.compression  # noqa: F401 -- registers the compressed architecture with AutoModel
    import torch
    from transformers import AutoModelForSeq2SeqLM

    torch.set_num_threads(threads)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    model = AutoModelForSeq2SeqLM.from_pretrained(path).to(device=device, dtype=torch_dtype).eval()
    return generate_with(model, torch.from_numpy(ids).to(device), beams)


def generate_with(model: Any, inputs: Any, beams: int) -> Generate:
    """Generation through a transformers-style ``generate()``: transformers', Optimum's and optimum-intel's models."""
    import torch

    mask = torch.ones_like(inputs)

    def generate(new_tokens: int) -> list[list[int]]:
        with torch.inference_mode():
            output = model.generate(
                input_ids=inputs,
                attention_mask=mask,
                num_beams=beams,
                do_sample=False,
                min_new_tokens=new_tokens,
                max_new_tokens=new_tokens,
            )
        return output.tolist()  # .tolist() waits for a GPU: the timer sees its work, not its launch

    return generate


def cbart_system(
    path: Path, ids: np.ndarray, beams: int, threads: int, backend: str = "onnxruntime", device: str = "cpu"
) -> Generate:
    from cbart.runtime.generator import Seq2SeqRuntime

    if backend == "tensorrt":
        import torch  # the TensorRT backend's buffers are torch tensors; its CPU work is small

        torch.set_num_threads(1)
    # the ONNX Runtime backend never imports torch, and neither does its worker: ~180 MiB of resident memory
    runtime = Seq2SeqRuntime.from_dir(path, backend=backend, device=device, threads=threads, check_files=False)
    sequences = ids.tolist()

    def generate(new_tokens: int) -> list[list[int]]:
        return runtime.generate(
            sequences, num_beams=beams, min_new_tokens=new_tokens, max_new_tokens=new_tokens
        ).sequences

    return generate


def optimum_system(path: Path, ids: np.ndarray, beams: int, threads: int) -> Generate:
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForSeq2SeqLM

    torch.set_num_threads(1)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    model = ORTModelForSeq2SeqLM.from_pretrained(path, session_options=options, use_cache=True)
    return generate_with(model, torch.from_numpy(ids), beams)


OPENVINO_F32 = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}
"""On CPUs with AVX512-BF16, OpenVINO computes in bf16 with an f16 KV cache unless told otherwise: its ``fp32``
and ``int8`` (weight-only) rows compute in f32; ``default`` leaves OpenVINO its own choice."""


def openvino_system(path: Path, ids: np.ndarray, beams: int, threads: int) -> Generate:
    import torch
    from optimum.intel import OVModelForSeq2SeqLM

    torch.set_num_threads(1)
    hints = {} if os.environ.get("CBART_PRECISION") == "default" else OPENVINO_F32
    config = {"INFERENCE_NUM_THREADS": str(threads), "PERFORMANCE_HINT": "LATENCY", "CACHE_DIR": "", **hints}
    model = OVModelForSeq2SeqLM.from_pretrained(path, ov_config=config, compile=True)
    return generate_with(model, torch.from_numpy(ids), beams)


def ort_beamsearch_system(path: Path, ids: np.ndarray, beams: int, threads: int) -> Generate:
    """ONNX Runtime's BeamSearch op (``benchmarks.ort_beamsearch``): the whole loop in one ``run`` call."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path / "beam_search.onnx"), options, providers=["CPUExecutionProvider"])
    scalars = {
        "num_beams": np.array([beams], np.int32),
        "num_return_sequences": np.array([1], np.int32),
        "length_penalty": np.array([1.0], np.float32),
        "repetition_penalty": np.array([1.0], np.float32),
    }
    inputs = ids.astype(np.int32)

    def generate(new_tokens: int) -> list[list[int]]:
        length = np.array([max(new_tokens, 2) + 1], np.int32)  # + the start token; the op's shortest is 2 new
        (sequences,) = session.run(None, {"input_ids": inputs, "max_length": length, "min_length": length, **scalars})
        return sequences[:, 0, :].tolist()

    return generate


def ctranslate2_system(path: Path, ids: np.ndarray, beams: int, threads: int) -> Generate:
    import ctranslate2

    compute_type = "int8_float32" if os.environ.get("CBART_PRECISION") == "int8" else "float32"
    translator = ctranslate2.Translator(
        str(path), device="cpu", intra_threads=threads, inter_threads=1, compute_type=compute_type
    )
    vocabulary = json.loads((path / "shared_vocabulary.json").read_text(encoding="utf-8"))
    index = {token: position for position, token in enumerate(vocabulary)}
    tokens = [[vocabulary[i] for i in row] for row in ids.tolist()]

    def generate(new_tokens: int) -> list[list[int]]:
        results = translator.translate_batch(
            tokens, beam_size=beams, min_decoding_length=new_tokens, max_decoding_length=new_tokens
        )
        return [[index[token] for token in result.hypotheses[0]] for result in results]

    return generate


CPP_BINARY = Path(__file__).resolve().parents[1] / "runtime" / "cpp" / "build" / "cbart-generate"
_CHILD_PIDS: list[int] = []


def cpp_system(path: Path, ids: np.ndarray, beams: int, threads: int) -> Generate:
    """The C++ runtime's example app as a persistent process: one JSON request line per generation."""
    import subprocess

    binary = Path(os.environ.get("CBART_CPP_BINARY", CPP_BINARY))
    if not binary.is_file():
        raise SystemExit(f"{binary} is not built; see runtime/cpp/README.md")
    process = subprocess.Popen(
        [str(binary), str(path), "--threads", str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    _CHILD_PIDS.append(process.pid)
    inputs = ids.tolist()

    def generate(new_tokens: int) -> list[list[int]]:
        request = {"input_ids": inputs, "num_beams": beams, "min_new_tokens": new_tokens, "max_new_tokens": new_tokens}
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(json.dumps(request) + "\n")
        process.stdin.flush()
        line = process.stdout.readline()
        if not line:
            raise SystemExit("cbart-generate exited; see its error above")
        return json.loads(line)["sequences"]

    return generate


SYSTEMS: dict[str, Callable[..., Generate]] = {  # (path, ids, beams, threads, **device and dtype options)
    "transformers": transformers_system,
    "cbart": cbart_system,
    "cbart-torch": partial(cbart_system, backend="torch"),
    "cbart-trt": partial(cbart_system, backend="tensorrt", device="cuda"),
    "cbart-cpp": cpp_system,
    "optimum": optimum_system,
    "ctranslate2": ctranslate2_system,
    "openvino": openvino_system,
    "ort-beamsearch": ort_beamsearch_system,
}


def peak_rss_mib(pid: int | str = "self") -> float:
    """A process's resident-set high-water mark (VmHWM; ru_maxrss would include the parent's at fork)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gpu_peak_mib() -> float | None:
    """Peak CUDA memory allocated through torch (the TensorRT backend's buffers), None on CPU runs."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--system", choices=sorted(SYSTEMS), required=True)
    parser.add_argument("--path", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--source", type=int, default=512)
    parser.add_argument("--beams", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default=None, help="transformers and cbart-torch: cpu (default) or cuda")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="transformers: the model's dtype")
    parser.add_argument(
        "--per-session-arena", action="store_true", help="cbart: an arena per session (benchmarks.replica_memory)"
    )
    args = parser.parse_args(argv)
    if args.per_session_arena:
        from cbart.runtime.backends import onnxruntime as ort_backend

        ort_backend.SHARE_CPU_ARENA = False
    ids = source_ids(args.batch, args.source)
    options = {key: value for key, value in (("device", args.device), ("dtype", args.dtype)) if value is not None}
    generate = SYSTEMS[args.system](args.path, ids, args.beams, args.threads, **options)
    generate(2)  # warm-up
    first, full = [], []
    sequences: list[list[int]] = []
    for _ in range(args.repeats):
        for count, bucket in ((1, first), (args.new_tokens, full)):
            started = time.perf_counter()
            sequences = generate(count)
            bucket.append(time.perf_counter() - started)
    peak_mib = max([peak_rss_mib()] + [peak_rss_mib(pid) for pid in _CHILD_PIDS])
    new_ids = [row[-args.new_tokens :] for row in sequences]  # systems differ in the start tokens they return
    report = {"t1": first, "tn": full, "peak_rss_mib": peak_mib, "gpu_peak_mib": gpu_peak_mib(), "ids": new_ids}
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
