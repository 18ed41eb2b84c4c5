"""Graph variants built from the fp32 export: ORT transformer fusions, fp16, dynamic int8."""

from __future__ import annotations

import heapq
import logging
from collections import Counter
from pathlib import Path

import onnx


def fused_operator_counts(path: Path) -> dict[str, int]:
    """Operators in a graph that come from ONNX Runtime's contrib (fused) op set."""
    model = onnx.load(str(path), load_external_data=False)
    return dict(Counter(node.op_type for node in model.graph.node if node.domain == "com.microsoft"))


def optimize_graph(path: Path, num_heads: int, hidden_size: int, fuse_attention: bool = True) -> dict[str, int]:
    """Apply ONNX Runtime's transformer fusions in place; return what fused (op type -> count).

    ``fuse_attention=False`` skips the attention fusion: its BART patterns are transformers' decoder, and
    on our decoder step (cached K/V as graph inputs, cross-attention rows grouped by source) it can only
    fail to match or, in some ONNX Runtime releases, raise while matching.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bart")
    options.enable_attention = fuse_attention
    optimized = optimize_model(
        str(path),
        model_type="bart",
        num_heads=num_heads,
        hidden_size=hidden_size,
        optimization_options=options,
        opt_level=0,
    )
    optimized.save_model_to_file(str(path))
    return fused_operator_counts(path)


def convert_to_fp16(path: Path) -> None:
    """fp16 weights and math with fp32 graph inputs/outputs kept where they are floats.

    BART's LayerNorm and residual sums overflow in fp16, so LayerNormalization, Softmax and the
    ops feeding them stay fp32 (op_block_list); the runtime feeds float32 and reads float32.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(path))
    converted = convert_float_to_float16(
        model,
        keep_io_types=True,
        op_block_list=["LayerNormalization", "SkipLayerNormalization", "Softmax", "Pow", "ReduceMean", "Sqrt", "Div"],
    )
    sort_topologically(converted.graph)  # the converter appends its Cast nodes after their consumers
    onnx.save(converted, str(path))


def _outer_names(graph: onnx.GraphProto) -> set[str]:
    """Values a subgraph reads from its enclosing graphs."""
    local = {value.name for value in graph.input} | {tensor.name for tensor in graph.initializer}
    local |= {output for node in graph.node for output in node.output}
    read = {name for node in graph.node for name in _node_reads(node)}
    return read - local


def _node_reads(node: onnx.NodeProto) -> set[str]:
    reads = set(node.input)
    for attribute in node.attribute:
        for subgraph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
            reads |= _outer_names(subgraph)
    return reads - {""}


def sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` so that every node follows the producers of what it reads (its subgraphs' outer
    values included), keeping the original order otherwise. ONNX requires this order (``onnx.checker``'s
    full check); ONNX Runtime tolerates its absence, other consumers of the graphs do not."""
    nodes = list(graph.node)
    producer = {output: index for index, node in enumerate(nodes) for output in node.output}
    dependents: list[list[int]] = [[] for _ in nodes]
    missing = [0] * len(nodes)  # producers not placed yet
    for index, node in enumerate(nodes):
        for source in {producer[name] for name in _node_reads(node) if name in producer} - {index}:
            dependents[source].append(index)
            missing[index] += 1
    ready = [index for index, count in enumerate(missing) if count == 0]
    heapq.heapify(ready)  # smallest original index first: the order changes only where it must
    placed: list[int] = []
    while ready:
        index = heapq.heappop(ready)
        placed.append(index)
        for dependent in dependents[index]:
            missing[dependent] -= 1
            if missing[dependent] == 0:
                heapq.heappush(ready, dependent)
    if len(placed) < len(nodes):
        raise ValueError("the graph has a cycle; it cannot be ordered")
    del graph.node[:]
    graph.node.extend(nodes[i] for i in placed)


def quantize_int8(path: Path) -> None:
    """Dynamic int8 quantization of MatMul/Gemm weights (activations quantized on the fly): CPU-oriented."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantized = path.with_suffix(".int8.onnx")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs advice about pre-processing on the root logger
    try:
        quantize_dynamic(
            str(path), str(quantized), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"]
        )
    finally:
        root.setLevel(level)
    quantized.replace(path)
