"""Build TensorRT engines from the exported ONNX graphs (``cbart export --to trt``).

One engine per graph, each with one optimization profile whose min/opt/max come from the user's
limits (batch, source length, new tokens, beams). Every dynamic dimension gets all three values,
and the decoder's past length starts at 0, so the same decoder-step engine serves the first step.
LayerNorm layers stay fp32 under --fp16/--bf16 (BART's LayerNorm/residuals overflow in fp16).
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
        for index in range(network.num_layers):
            layer = network.get_layer(index)
            if layer.type == trt.LayerType.NORMALIZATION:
                layer.precision = trt.float32
                layer.set_output_type(0, trt.float32)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for name, (low, typical, high) in profile_shapes(spec, limits).items():
        profile.set_shape(name, trt.Dims(low), trt.Dims(typical), trt.Dims(high))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {onnx_path.name}; see the log above")
    engine_path.write_bytes(bytes(serialized))
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))


def engine_metadata(limits: EngineLimits) -> EngineSpec:
    """What the runtime checks before loading engines: TensorRT version, GPU architecture, profiles."""
    return EngineSpec(
        tensorrt_version=str(trt.__version__),
        compute_capability=cuda_compute_capability(),
        limits=asdict(limits),
        profiles={name: list(value) for name, value in limits.ranges().items()},
    )
