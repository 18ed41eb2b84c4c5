"""A screened LM head: exact greedy decoding that reads a quarter of the LM head's bytes.

At batch 1 the decoder step is memory-bound, and the fp32 LM head (vocab x width) is its largest
single read: 154 MB of the ~350 MB a bart-base step reads. Greedy search needs only the argmax, so
the step can read an 8-bit copy of that matrix instead, as long as the runtime can still prove which
token wins. The rewrite of ``decoder_step.onnx``:

* a boolean input ``exact_logits`` selects, through an ``If`` node, the original fp32 MatMul (true:
  beam search, sampling) or the screened head (false: greedy search, Python and C++);
* the screened head multiplies the ``OUTLIER_CHANNELS`` largest-magnitude hidden channels in fp32
  and the rest (``hidden_residual``) through ONNX Runtime's ``MatMulNBits`` (8-bit blocks of 32,
  int8 activations);
* the graph also returns ``hidden`` and ``hidden_residual``, the inputs of the runtime's bound;
* ``lm_head_rows.npy`` holds the fp32 rows (memory-mapped by the runtime, which reads only the rows
  it must recompute) and ``lm_head_bounds.npy`` the per-row numbers of the error bound
  ([3, vocab]: the bias, ``||w − ŵ||₂`` and ``max(||w||₁, ||ŵ||₁)``).

:mod:`runtime.lm_head_screen` turns the approximate logits into intervals certain to hold the exact
ones and recomputes in fp32 only the tokens whose interval reaches the best lower bound, so greedy
search returns the argmax of the fp32 logits, not an approximation of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from cbart.runtime.lm_head_screen import BOUNDS_FILE, HIDDEN, RESIDUAL, ROWS_FILE, SWITCH
from onnx import TensorProto, helper, numpy_helper

BITS = 8
BLOCK_SIZE = 32
OUTLIER_CHANNELS = 8
"""Hidden channels computed in fp32 beside the 8-bit head: trained transformers have a few channels
with much larger activations, which would otherwise dominate the int8 activation error bound."""


@dataclass(frozen=True)
class QuantizedRows:
    """Row-wise blocked symmetric quantization of ``rows`` [vocab, width] in MatMulNBits' layout."""

    packed: np.ndarray  # uint8 [vocab, blocks, BLOCK_SIZE], value + 128
    scales: np.ndarray  # float32 [vocab * blocks]
    dequantized: np.ndarray  # float32 [vocab, width]


def quantize_rows(rows: np.ndarray) -> QuantizedRows:
    vocab, width = rows.shape
    blocks = -(-width // BLOCK_SIZE)
    padded = np.zeros((vocab, blocks * BLOCK_SIZE), dtype=np.float32)
    padded[:, :width] = rows
    grouped = padded.reshape(vocab, blocks, BLOCK_SIZE)
    scales = np.abs(grouped).max(axis=-1, keepdims=True) / 127.0
    scales[scales == 0] = 1.0
    levels = np.clip(np.round(grouped / scales), -127, 127)
    dequantized = (levels * scales).reshape(vocab, -1)[:, :width].astype(np.float32)
    packed = (levels + 128).astype(np.uint8)
    return QuantizedRows(packed, scales.reshape(-1).astype(np.float32), dequantized)


def _producer(graph: onnx.GraphProto, tensor: str) -> onnx.NodeProto:
    for node in graph.node:
        if tensor in node.output:
            return node
    raise ValueError(f"no node produces {tensor!r}")


def _constant(graph: onnx.GraphProto, name: str) -> np.ndarray:
    for initializer in graph.initializer:
        if initializer.name == name:
            return numpy_helper.to_array(initializer)
    node = _producer(graph, name)
    if node.op_type == "Constant":
        return numpy_helper.to_array(node.attribute[0].t)
    raise ValueError(f"{name!r} is not a constant")


def add_screened_lm_head(path: Path, logits: str = "logits") -> None:
    """Rewrite the decoder step at ``path`` and write the row and bound files beside it.

    Expects the LM head as traced from ``DecoderStepGraph``: ``MatMul(hidden, W[width, vocab])``
    followed by ``Add(·, final_logits_bias)`` producing ``logits``.
    """
    model = onnx.load(str(path))
    graph = model.graph
    add = _producer(graph, logits)
    matmul = _producer(graph, add.input[0])
    if add.op_type != "Add" or matmul.op_type != "MatMul":
        raise ValueError(f"{path.name}: the LM head is not MatMul + Add ({matmul.op_type} + {add.op_type})")
    hidden, weight_name = matmul.input
    bias = _constant(graph, add.input[1]).reshape(-1).astype(np.float32)
    rows = np.ascontiguousarray(_constant(graph, weight_name).T.astype(np.float32))
    vocab, width = rows.shape
    quantized = quantize_rows(rows)

    outliers = min(OUTLIER_CHANNELS, width)
    index, values = "screen_outlier_index", "screen_outlier_values"
    # Main graph (runs on exact steps too; a few microseconds): pick the largest-magnitude channels of
    # each hidden row and zero them in RESIDUAL, the part that goes through the 8-bit head.
    split = [
        helper.make_node("Abs", [hidden], ["screen_magnitude"]),
        helper.make_node("TopK", ["screen_magnitude", "screen_outlier_count"], ["screen_top", index], axis=-1),
        helper.make_node("GatherElements", [hidden, index], [values], axis=-1),
        helper.make_node("Mul", [values, "screen_zero"], ["screen_zeros"]),
        helper.make_node("ScatterElements", [hidden, index, "screen_zeros"], [RESIDUAL], axis=-1),
    ]
    then_branch = helper.make_graph(
        [
            helper.make_node("MatMul", [hidden, weight_name], ["screen_exact_product"]),
            helper.make_node("Add", ["screen_exact_product", add.input[1]], ["screen_exact_logits"]),
        ],
        "exact_lm_head",
        [],
        [helper.make_tensor_value_info("screen_exact_logits", TensorProto.FLOAT, None)],
    )
    else_branch = helper.make_graph(
        [
            helper.make_node(
                "MatMulNBits",
                [RESIDUAL, "screen_weight_q8", "screen_weight_scales"],
                ["screen_residual_product"],
                domain="com.microsoft",
                K=width,
                N=vocab,
                bits=BITS,
                block_size=BLOCK_SIZE,
                accuracy_level=4,  # int8 activations: the fast kernel; the runtime's bound accounts for it
            ),
            # the outlier channels in fp32: `outliers` rows of the [width, vocab] weight
            helper.make_node("Gather", [weight_name, index], ["screen_outlier_rows"], axis=0),
            helper.make_node("Unsqueeze", [values, "screen_axis"], ["screen_outlier_row_vector"]),
            helper.make_node("MatMul", ["screen_outlier_row_vector", "screen_outlier_rows"], ["screen_outlier_part"]),
            helper.make_node("Squeeze", ["screen_outlier_part", "screen_axis"], ["screen_outlier_product"]),
            helper.make_node("Add", ["screen_residual_product", "screen_outlier_product"], ["screen_product"]),
            helper.make_node("Add", ["screen_product", add.input[1]], ["screen_approx_logits"]),
        ],
        "screened_lm_head",
        [],
        [helper.make_tensor_value_info("screen_approx_logits", TensorProto.FLOAT, None)],
    )
    graph.initializer.extend(
        [
            numpy_helper.from_array(quantized.packed, "screen_weight_q8"),
            numpy_helper.from_array(quantized.scales, "screen_weight_scales"),
            numpy_helper.from_array(np.array([outliers], dtype=np.int64), "screen_outlier_count"),
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "screen_zero"),
            numpy_helper.from_array(np.array([-2], dtype=np.int64), "screen_axis"),
        ]
    )
    # Where the Add was (less the MatMul before it): every value the head reads -- the hidden state, the
    # weight, the bias, which the tracer may emit as a Constant node after the MatMul -- exists by then,
    # so the graph stays topologically sorted (ONNX's checker requires it; ONNX Runtime does not).
    position = list(graph.node).index(add) - 1
    for node in (matmul, add):
        graph.node.remove(node)
    switch = helper.make_node("If", [SWITCH], [logits], then_branch=then_branch, else_branch=else_branch)
    for offset, node in enumerate([*split, switch]):
        graph.node.insert(position + offset, node)
    graph.input.append(helper.make_tensor_value_info(SWITCH, TensorProto.BOOL, []))
    for name in (HIDDEN, RESIDUAL):
        graph.output.append(
            helper.make_tensor_value_info(name, TensorProto.FLOAT, ["decoder_batch", "target_length", width])
        )
    graph.node.append(helper.make_node("Identity", [hidden], [HIDDEN]))
    if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(path))

    np.save(path.parent / ROWS_FILE, rows)
    bounds = np.stack(
        [
            bias,
            np.linalg.norm(rows - quantized.dequantized, axis=1),
            np.maximum(np.abs(rows).sum(axis=1), np.abs(quantized.dequantized).sum(axis=1)),
        ]
    )
    np.save(path.parent / BOUNDS_FILE, bounds.astype(np.float32))  # plain .npy: trivial to read from C++ too
