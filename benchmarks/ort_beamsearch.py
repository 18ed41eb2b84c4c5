"""The ``ort-beamsearch`` peer: BART inside ONNX Runtime's BeamSearch contrib op (the whole generation loop in one
ONNX graph), built with ``onnxruntime.transformers.convert_generation``.

    python -m cbart.benchmarks.ort_beamsearch --model CHECKPOINT_DIR --output DIR

ONNX Runtime offers the op for GPT-2 and T5-style encoder-decoders only (no ``bart`` model type). BART fits the
T5 layout: an init graph (source ids and mask -> every layer's cross key/value, [B, heads, S, head_dim]) and a
decoder graph (one token, the mask, the self-attention past and the cross key/values -> logits and the new self
past), with int32 ids and masks. Both are exported here from the checkpoint's own modules (plain ONNX ops), then
``convert_generation --model_type t5`` wraps them in the BeamSearch node, reading the special token ids from the
checkpoint's config. The op runs greedy search as one beam. Its encoder-decoder path cannot stop after exactly one
new token (``max_length=2`` is the shortest), so its encoder + first token figure is for two tokens.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from cbart.exporter.graphs import CrossKVGraph, DecoderStepGraph
from torch import nn
from transformers import BartForConditionalGeneration

GRAPH = "beam_search.onnx"
OPSET = 17


class T5LayoutInit(nn.Module):
    """encoder_input_ids, encoder_attention_mask (int32) -> present_key_cross_i, present_value_cross_i."""

    def __init__(self, model: BartForConditionalGeneration) -> None:
        super().__init__()
        self.encoder = model.model.encoder
        self.cross = CrossKVGraph(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        states = self.encoder(input_ids=input_ids.long(), attention_mask=attention_mask.long()).last_hidden_state
        outputs = self.cross(states)  # cross keys come pre-transposed, [B, heads, head_dim, S]: T5 keeps [.., S, d]
        return tuple(tensor.transpose(-1, -2) if index % 2 == 0 else tensor for index, tensor in enumerate(outputs))


class T5LayoutDecoder(nn.Module):
    """input_ids, encoder_attention_mask (int32), past self key/values, cross key/values -> logits, present self."""

    def __init__(self, model: BartForConditionalGeneration) -> None:
        super().__init__()
        self.step = DecoderStepGraph(model)
        self.layers = model.config.decoder_layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *caches: torch.Tensor) -> tuple:
        past, cross = caches[: 2 * self.layers], caches[2 * self.layers :]
        cross = tuple(tensor.transpose(-1, -2) if index % 2 == 0 else tensor for index, tensor in enumerate(cross))
        return self.step(input_ids.long(), attention_mask.long(), *past, *cross)


def cache_names(kind: str, layers: int) -> list[str]:
    return [f"{prefix}_{kind}_{layer}" for layer in range(layers) for prefix in ("key", "value")]


def export(model: BartForConditionalGeneration, directory: Path) -> tuple[Path, Path]:
    """The two T5-layout graphs of ``model``, in ``directory``."""
    config = model.config
    layers, heads = config.decoder_layers, config.decoder_attention_heads
    head_dim = config.d_model // heads
    ids = torch.full((2, 7), 5, dtype=torch.int32)
    mask = torch.ones_like(ids)
    init_path, decoder_path = directory / "encoder_decoder_init.onnx", directory / "decoder.onnx"
    cross_out = [
        name.replace("key", "present_key").replace("value", "present_value") for name in cache_names("cross", layers)
    ]
    batch_source = {0: "batch", 1: "source_length"}
    with torch.no_grad():
        torch.onnx.export(
            T5LayoutInit(model).eval(), (ids, mask), str(init_path), opset_version=OPSET, dynamo=False,
            input_names=["encoder_input_ids", "encoder_attention_mask"], output_names=cross_out,
            dynamic_axes={"encoder_input_ids": batch_source, "encoder_attention_mask": batch_source}
            | {name: {0: "batch", 2: "source_length"} for name in cross_out},
        )  # fmt: skip
        past_in = [f"past_{name}" for name in cache_names("self", layers)]
        cross_in = [f"past_{name}" for name in cache_names("cross", layers)]
        present = [f"present_{name}" for name in cache_names("self", layers)]
        past = [torch.zeros(2, heads, 3, head_dim) for _ in past_in]
        cross = [torch.zeros(2, heads, 7, head_dim) for _ in cross_in]
        torch.onnx.export(
            T5LayoutDecoder(model).eval(), (ids[:, :1], mask, *past, *cross), str(decoder_path), opset_version=OPSET,
            dynamo=False, input_names=["input_ids", "encoder_attention_mask", *past_in, *cross_in],
            output_names=["logits", *present],
            dynamic_axes={"input_ids": {0: "batch"}, "encoder_attention_mask": batch_source, "logits": {0: "batch"}}
            | {name: {0: "batch", 2: "past_length"} for name in past_in}
            | {name: {0: "batch", 2: "source_length"} for name in cross_in}
            | {name: {0: "batch", 2: "present_length"} for name in present},
        )  # fmt: skip
    return init_path, decoder_path


def build(checkpoint: Path, output: Path) -> Path:
    """``output/beam_search.onnx`` for the BART checkpoint in ``checkpoint`` (written through a temporary folder)."""
    from onnxruntime.transformers.convert_generation import convert_generation_model, parse_arguments

    model = BartForConditionalGeneration.from_pretrained(checkpoint).eval()
    with tempfile.TemporaryDirectory(dir=output.parent) as scratch:
        folder = Path(scratch)
        init_path, decoder_path = export(model, folder)
        (folder / "out").mkdir()
        arguments = parse_arguments(
            [
                "--model_name_or_path", str(checkpoint), "--model_type", "t5",
                "--encoder_decoder_init_onnx", str(init_path), "--decoder_onnx", str(decoder_path),
                "--output", str(folder / "out" / GRAPH), "--use_external_data_format",
                "--num_beams", "1", "--num_return_sequences", "1",
            ]
        )  # fmt: skip
        convert_generation_model(arguments)  # without its own test run, which wants a tokenizer and long inputs
        shutil.move(folder / "out", output)
    return output / GRAPH


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a BART checkpoint directory")
    parser.add_argument("--output", type=Path, required=True, help="folder for beam_search.onnx (created)")
    args = parser.parse_args(argv)
    print(build(args.model, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
