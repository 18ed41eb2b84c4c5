"""Export mechanics: trace each graph module to ONNX with dynamic axes and describe it for the manifest."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from cbart.exporter.graphs import (
    AutoencoderGraph,
    CrossKVGraph,
    DecoderStepGraph,
    EncoderGraph,
    FusedEncoderGraph,
    model_parts,
)
from cbart.runtime.manifest import (
    AUTOENCODER,
    CROSS,
    CROSS_KV,
    DECODER_STEP,
    ENCODER,
    PAST,
    PRESENT,
    STEP_ENCODER_MASK,
    STEP_INPUT_IDS,
    STEP_LOGITS,
    STEP_POSITIONS,
    STEP_SELF_MASK,
    GraphSpec,
    TensorSpec,
    cache_names,
)
from torch import nn
from transformers import BartForConditionalGeneration

TWO_GIB = 2**31


@dataclass(frozen=True)
class GraphDefinition:
    """One graph: its module, example inputs, and named symbolic shapes of inputs and outputs."""

    name: str
    module: nn.Module
    example: tuple[torch.Tensor, ...]
    inputs: dict[str, list[str | int]]
    outputs: dict[str, list[str | int]]
    input_dtypes: dict[str, str]


def _caches(prefix: str, batch: str, length: str, dims: dict[str, int]) -> dict[str, list[str | int]]:
    """Per-layer cache shapes; cross keys are pre-transposed ([batch, heads, head_dim, length])."""
    shapes: dict[str, list[str | int]] = {}
    for name in cache_names(prefix, dims["layers"]):
        transposed = prefix == CROSS and "_key_" in name
        tail: list[str | int] = [dims["head_dim"], length] if transposed else [length, dims["head_dim"]]
        shapes[name] = [batch, dims["heads"], *tail]
    return shapes


def graph_definitions(
    model: BartForConditionalGeneration,
    fuse_encoder: bool,
    fused_attention: bool = False,
    last_logits_only: bool = False,
    per_row_positions: bool = False,
) -> list[GraphDefinition]:
    """The graphs of the export directory and how their axes are named (see ``exporter.graphs``).

    ``fused_attention`` exports the encoder's and the decoder step's self-attention as ONNX Runtime contrib nodes.
    ``last_logits_only``: the decoder step's logits at the last new position only (a speculative pair's draft).
    ``per_row_positions``: the decoder step also takes ``positions`` and ``self_attention_mask`` (``--inflight``).
    """
    config = model.config
    _, compressor = model_parts(model)
    base_width = getattr(config, "encoder_d_model", config.d_model)
    dims = {
        "layers": config.decoder_layers,
        "heads": config.decoder_attention_heads,
        "head_dim": config.d_model // config.decoder_attention_heads,
    }
    batch, sources, length = 2, 2, 7
    ids = torch.tensor([[0, 5, 6, 7, 8, 9, 2], [0, 10, 11, 2, 1, 1, 1]])
    mask = (ids != config.pad_token_id).long()
    memory = torch.zeros(sources, length, config.d_model)
    id_dtypes = {"input_ids": "int64", "attention_mask": "int64"}
    source_axes = {"input_ids": ["batch", "source_length"], "attention_mask": ["batch", "source_length"]}
    definitions: list[GraphDefinition] = []
    if fuse_encoder or compressor is None:
        definitions.append(
            GraphDefinition(
                ENCODER,
                FusedEncoderGraph(model, fused_attention),
                (ids, mask),
                source_axes,
                {"memory": ["batch", "source_length", config.d_model]},
                id_dtypes,
            )
        )
    else:
        definitions.append(
            GraphDefinition(
                ENCODER,
                EncoderGraph(model, fused_attention),
                (ids, mask),
                source_axes,
                {"hidden_states": ["batch", "source_length", base_width]},
                id_dtypes,
            )
        )
        definitions.append(
            GraphDefinition(
                AUTOENCODER,
                AutoencoderGraph(model),
                (torch.zeros(sources, length, base_width),),
                {"hidden_states": ["batch", "source_length", base_width]},
                {"memory": ["batch", "source_length", config.d_model]},
                {"hidden_states": "float"},
            )
        )
    layers = dims["layers"]
    definitions.append(
        GraphDefinition(
            CROSS_KV,
            CrossKVGraph(model),
            (memory,),
            {"memory": ["batch", "source_length", config.d_model]},
            _caches(CROSS, "batch", "source_length", dims),
            {"memory": "float"},
        )
    )
    rows = batch * 2
    past = [torch.zeros(rows, dims["heads"], 3, dims["head_dim"]) for _ in range(2 * layers)]
    cross = [
        torch.zeros(sources, dims["heads"], *((dims["head_dim"], length) if i % 2 == 0 else (length, dims["head_dim"])))
        for i in range(2 * layers)
    ]
    step_inputs: dict[str, list[str | int]] = {
        STEP_INPUT_IDS: ["decoder_batch", "target_length"],
        STEP_ENCODER_MASK: ["batch", "source_length"],
    }
    row_inputs: tuple[torch.Tensor, ...] = ()
    if per_row_positions:
        step_inputs[STEP_POSITIONS] = ["decoder_batch", "target_length"]
        step_inputs[STEP_SELF_MASK] = ["decoder_batch", "past_length + target_length"]
        row_inputs = (torch.tensor([[3], [1], [3], [2]]), torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]] * 2))
    step_inputs.update(_caches(PAST, "decoder_batch", "past_length", dims))
    step_inputs.update(_caches(CROSS, "batch", "source_length", dims))
    integer_inputs = (STEP_INPUT_IDS, STEP_ENCODER_MASK, STEP_POSITIONS, STEP_SELF_MASK)
    definitions.append(
        GraphDefinition(
            DECODER_STEP,
            DecoderStepGraph(model, fused_attention, last_logits_only, per_row_positions),
            (torch.tensor([[2], [0], [5], [6]]), mask, *row_inputs, *past, *cross),
            step_inputs,
            {
                STEP_LOGITS: ["decoder_batch", 1 if last_logits_only else "target_length", config.vocab_size],
                **_caches(PRESENT, "decoder_batch", "past_length + target_length", dims),
            },
            {name: ("int64" if name in integer_inputs else "float") for name in step_inputs},
        )
    )
    return definitions


def export_graph(definition: GraphDefinition, directory: Path, opset: int) -> GraphSpec:
    """Trace ``definition`` to ``directory/<name>.onnx``, weights inline unless over 2 GB (the export moves them out
    later, after the variant passes: ``exporter.external_weights``)."""
    path = directory / f"{definition.name}.onnx"
    dynamic_axes = {
        name: {axis: label for axis, label in enumerate(shape) if isinstance(label, str)}
        for name, shape in {**definition.inputs, **definition.outputs}.items()
    }
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            definition.module.eval(),
            definition.example,
            str(path),
            input_names=list(definition.inputs),
            output_names=list(definition.outputs),
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    proto = onnx.load(str(path))
    if proto.ByteSize() > TWO_GIB:
        onnx.save(proto, str(path), save_as_external_data=True, location=f"{definition.name}.onnx.data")
    return describe(definition, path.name)


def export_torchscript(definition: GraphDefinition, directory: Path, device: str = "cpu") -> str:
    """Trace the same module to TorchScript for the runtime's PyTorch reference backend.

    Tracing records the device of every tensor the graph creates (positions, causal masks), so the graphs
    are traced on the device type they will run on; the module is moved back to the CPU afterwards, where
    the ONNX graphs are exported.
    """
    target = directory / "torch" / f"{definition.name}.pt"
    target.parent.mkdir(exist_ok=True)
    module = definition.module.eval().to(device)
    example = tuple(tensor.to(device) for tensor in definition.example)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(module, example, check_trace=False)
        torch.jit.save(traced, str(target))
    finally:
        module.to("cpu")
    return target.relative_to(directory).as_posix()


def describe(definition: GraphDefinition, file: str, float_dtype: str = "float32") -> GraphSpec:
    def dtype(name: str) -> str:
        declared = definition.input_dtypes.get(name, "float")
        return float_dtype if declared == "float" else declared

    return GraphSpec(
        file=file,
        inputs=[TensorSpec(name, dtype(name), shape) for name, shape in definition.inputs.items()],
        outputs=[TensorSpec(name, float_dtype, shape) for name, shape in definition.outputs.items()],
    )
