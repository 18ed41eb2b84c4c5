"""Build TensorRT engines from the exported ONNX graphs (``cbart export --to trt``).

One engine per graph, each with one optimization profile whose min/opt/max come from the user's
limits (batch, source length, new tokens, beams). Every dynamic dimension gets all three values,
and the decoder's past length starts at 0, so the same decoder-step engine serves the first step.

Precision: fp32 engines compute in true fp32 (TensorRT's default TF32 would put them ~1e-3 from PyTorch and
make exact token ids a coin toss). Under --fp16/--bf16 the layers that overflow or lose range in half
precision stay fp32 (``fp32_islands``: LayerNorm, softmax, reductions and the residual adds that feed a
LayerNorm, as NVIDIA's BART demo pins them), through TensorRT 10's weakly-typed precision API.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from cbart.exporter.engine_profiles import EngineLimits, profile_shapes
from cbart.runtime.manifest import EngineSpec, GraphSpec
from cbart.runtime.trt_support import cuda_compute_capability, import_tensorrt

import_tensorrt()  # a clear error when TensorRT is missing (or only its type stubs are installed)
import tensorrt as trt  # noqa: E402


def build_engine(onnx_path: Path, engine_path: Path, spec: GraphSpec, limits: EngineLimits, timing_cache: Path) -> None:
    """Parse ``onnx_path`` and write a serialized engine to ``engine_path`` (timing cache reused/updated)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(index)) for index in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(limits.workspace_gib * (1 << 30)))
    if limits.fp16 or limits.bf16:
        config.set_flag(trt.BuilderFlag.FP16 if limits.fp16 else trt.BuilderFlag.BF16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        for layer in fp32_islands(network):
            layer.precision = trt.float32
            for output in range(layer.num_outputs):
                layer.set_output_type(output, trt.float32)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise RuntimeError(
            f"TensorRT rejected the timing cache {timing_cache} (another TensorRT version or GPU?); "
            "delete it or pass another --timing-cache"
        )
    profile = builder.create_optimization_profile()
    for name, (low, typical, high) in profile_shapes(spec, limits).items():
        profile.set_shape(name, trt.Dims(low), trt.Dims(typical), trt.Dims(high))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {onnx_path.name}; see the log above")
    engine_path.write_bytes(bytes(serialized))
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))


def fp32_islands(network: trt.INetworkDefinition) -> list[trt.ILayer]:
    """The layers kept in fp32 inside a half-precision engine: LayerNorm, softmax and reductions, and every
    elementwise SUM that feeds a LayerNorm (BART's residual adds, whose activations outgrow fp16's range)."""
    kept_types = (trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX, trt.LayerType.REDUCE)
    layers = [network.get_layer(index) for index in range(network.num_layers)]
    producers = {layer.get_output(output).name: layer for layer in layers for output in range(layer.num_outputs)}
    keep = [layer for layer in layers if layer.type in kept_types]
    for norm in [layer for layer in keep if layer.type == trt.LayerType.NORMALIZATION]:
        producer = producers.get(norm.get_input(0).name)
        if producer is not None and producer not in keep and is_sum(producer):
            keep.append(producer)
    return keep


def is_sum(layer: trt.ILayer) -> bool:
    """Whether ``layer`` is an elementwise SUM (``get_layer`` returns the base class: downcast to read ``op``)."""
    if layer.type != trt.LayerType.ELEMENTWISE:
        return False
    layer.__class__ = trt.IElementWiseLayer
    return bool(layer.op == trt.ElementWiseOperation.SUM)  # type: ignore[attr-defined]


def engine_metadata(limits: EngineLimits) -> EngineSpec:
    """What the runtime checks before loading engines: TensorRT version, GPU architecture, profiles."""
    return EngineSpec(
        tensorrt_version=str(trt.__version__),
        compute_capability=cuda_compute_capability(),
        limits=asdict(limits),
        profiles={name: list(value) for name, value in limits.ranges().items()},
    )
