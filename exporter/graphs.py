"""The torch modules that become the exported graphs.

The exported split (encoder -> autoencoder -> cross-K/V generator -> decoder step) is what a fast
runtime needs, and it is the same for ONNX Runtime and TensorRT:

* the cross-attention K/V of every layer is computed **once per request** by its own small graph;
* one decoder-step graph accepts a past self-attention cache of any length, including 0, so the
  first step needs no special graph and no ONNX ``If`` (which TensorRT cannot build);
* the decoder step takes the encoder padding mask, so padded batches never attend to pads;
* the cross K/V may have fewer rows than the decoder batch: with ``N`` sources and ``N*K`` decoder
  rows (K beams or samples per source, rows grouped by source) every row reads its source's K/V, so
  beams share one copy instead of K.

K/V caches are one tensor per layer and kind (``past_key_3``, ``cross_value_0``, ...): a graph input
feeds its MatMul directly, whereas slicing a stacked cache copies it every step. Cross keys are
stored pre-transposed (``[batch, heads, head_dim, source_length]``) so the per-step attention needs
no transpose of the largest cache either.

The decoder step re-implements BART's post-LayerNorm decoder layer with plain tensor ops (weights
shared with the trained model); tests and the export's own verification hold it to transformers'
``generate()`` token for token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import onnx
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BartForConditionalGeneration
from transformers.activations import ACT2FN
from transformers.models.bart.modeling_bart import BartAttention, BartDecoderLayer


def model_parts(model: BartForConditionalGeneration) -> tuple[nn.Module, nn.Module | None]:
    """(BART encoder, compressor or None) of a compressed or a plain BART model."""
    encoder = model.model.encoder
    if hasattr(encoder, "compressor"):
        return encoder.base, encoder.compressor
    return encoder, None


class EncoderGraph(nn.Module):
    """input_ids, attention_mask -> encoder hidden states (base width).

    ``fused_attention`` re-states transformers' post-LayerNorm encoder layer with every
    self-attention as one ``com.microsoft.MultiHeadAttention`` node. The plain export spells
    attention out as MatMul/Softmax/MatMul and materialises ``[batch, heads, S, S]`` scores per
    layer; ONNX Runtime's fused kernel does not, and is faster on CPU (measured side by side by
    ``python -m cbart.benchmarks.graph_choices``). TensorRT's ONNX parser has no
    contrib ops, so engines are built from the plain graph. Without the flag this is transformers'
    own encoder, which the export verification uses as its reference.
    """

    def __init__(self, model: BartForConditionalGeneration, fused_attention: bool = False) -> None:
        super().__init__()
        self.encoder, _ = model_parts(model)
        self.fused_attention = fused_attention

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if not self.fused_attention:
            return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        encoder = self.encoder
        hidden = encoder.embed_tokens(input_ids) + encoder.embed_positions(input_ids)
        hidden = encoder.layernorm_embedding(hidden)
        attend = _FusedSelfAttention.apply if torch.onnx.is_in_onnx_export() else _self_attention
        for layer in encoder.layers:
            attn = layer.self_attn
            context = attend(*_projections(attn, hidden), attention_mask, attn.num_heads)
            hidden = layer.self_attn_layer_norm(hidden + attn.out_proj(context))
            feed_forward = layer.fc2(layer.activation_fn(layer.fc1(hidden)))
            hidden = layer.final_layer_norm(hidden + feed_forward)
        return hidden


def _projections(attn: BartAttention, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Bias-free Q/K/V projections and their packed ``[3d]`` biases: the inputs of a fused attention node."""
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    return (*(F.linear(hidden, proj.weight) for proj in projections), torch.cat([proj.bias for proj in projections]))


def _biased_heads(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor, heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Add the packed ``[3d]`` biases and split into heads; the width comes from the biases, a weight, so a
    trace folds it (the projections' width would be a run-time Shape)."""
    width = bias.shape[0] // 3
    return (
        _split_heads(query + bias[:width], heads),
        _split_heads(key + bias[width : 2 * width], heads),
        _split_heads(value + bias[2 * width :], heads),
    )


def _self_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor, heads: int
) -> torch.Tensor:
    """Bidirectional attention over a key padding mask: ``[B, S, d]`` bias-free projections, packed ``[3d]`` biases."""
    query, key, value = _biased_heads(query, key, value, bias, heads)
    blocked = (1.0 - mask[:, None, None, :].to(query.dtype)) * torch.finfo(query.dtype).min
    context = F.scaled_dot_product_attention(query, key, value, attn_mask=blocked)
    return _merge_heads(context)


class _FusedSelfAttention(torch.autograd.Function):
    """``_self_attention`` exported as one ``com.microsoft.MultiHeadAttention`` node.

    The node takes the same inputs (it adds the packed biases itself, mask 1 = token) and, like
    BART, scales by ``head_dim ** -0.5``. Used only while exporting to ONNX: a TorchScript trace
    cannot save a Python autograd function.
    """

    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> torch.Tensor:  # type: ignore[override]
        return _self_attention(*inputs)

    @staticmethod
    def symbolic(g: Any, query: Any, key: Any, value: Any, bias: Any, mask: Any, heads: int) -> Any:
        mask = g.op("Cast", mask, to_i=onnx.TensorProto.INT32)
        node = g.op("com.microsoft::MultiHeadAttention", query, key, value, bias, mask, num_heads_i=heads)
        return node.setType(query.type())


class AutoencoderGraph(nn.Module):
    """encoder hidden states -> compressed memory (latent width).

    For the ``paper`` variant the per-position BatchNorm runs in eval mode as an affine map sliced
    to the actual source length (see ``compression.autoencoder.PositionBatchNorm``).
    """

    def __init__(self, model: BartForConditionalGeneration) -> None:
        super().__init__()
        _, compressor = model_parts(model)
        if compressor is None:
            raise ValueError("a plain BART has no autoencoder graph")
        self.compressor = compressor

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.compressor(hidden_states)


class FusedEncoderGraph(nn.Module):
    """Encoder and autoencoder in one graph (``--fuse-encoder``); for a plain BART, just the encoder."""

    def __init__(self, model: BartForConditionalGeneration, fused_attention: bool = False) -> None:
        super().__init__()
        self.encoder = EncoderGraph(model, fused_attention)
        compressor = model_parts(model)[1]
        self.compressor = compressor if compressor is not None else nn.Identity()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.compressor(self.encoder(input_ids, attention_mask))


Target = tuple[int, ...] | torch.Tensor
"""A reshape target with ONNX's meaning of 0 (keep this dimension) and -1 (infer it): constant dimensions, or,
while exporting, a 1-D int64 tensor computed once per graph from a ``Shape``."""


def _reshape(states: torch.Tensor, target: Target) -> torch.Tensor:
    """``reshape`` that exports as one ``Reshape`` node.

    Why: tracing ``view(batch, length, ...)`` records each size it reads as Shape -> Gather -> Unsqueeze ->
    Concat, per call. The decoder step had ~300 such nodes left after ONNX Runtime's optimizer, and at batch 1
    each costs about as much as the small tensor ops they feed. A constant target with 0/-1 (which TensorRT's
    parser reads too), or a target computed once per graph, needs none of them.
    """
    if torch.onnx.is_in_onnx_export():
        return _ReshapeNode.apply(states, target if isinstance(target, torch.Tensor) else torch.tensor(target))
    dims = target.tolist() if isinstance(target, torch.Tensor) else target
    return states.reshape([states.shape[i] if size == 0 else size for i, size in enumerate(dims)])


class _ReshapeNode(torch.autograd.Function):
    """One ONNX ``Reshape`` (0 keeps a dimension); used only while exporting (see ``_reshape``)."""

    @staticmethod
    def forward(ctx: Any, states: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return states.reshape([states.shape[i] if size == 0 else size for i, size in enumerate(target.tolist())])

    @staticmethod
    def symbolic(g: Any, states: Any, target: Any) -> Any:
        return g.op("Reshape", states, target)


def _shape_target(tensor: torch.Tensor, *tail: int, leading: int | None = None) -> Target:
    """``tensor``'s shape (its first ``leading`` dimensions) followed by ``tail``: a ``Shape`` node once per
    graph while exporting, plain sizes otherwise."""
    if torch.onnx.is_in_onnx_export():
        shape = torch._shape_as_tensor(tensor)[:leading]
        return torch.cat([shape, torch.tensor(tail, dtype=torch.int64)]) if tail else shape
    return (*tensor.shape[:leading], *tail)


def _split_heads(states: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, heads * head_dim] -> [B, heads, T, head_dim]."""
    return _reshape(states, (0, -1, heads, states.shape[-1] // heads)).transpose(1, 2)


def _merge_heads(context: torch.Tensor) -> torch.Tensor:
    """[B, heads, T, head_dim] -> [B, T, heads * head_dim]."""
    return _reshape(context.transpose(1, 2), (0, 0, -1))


class CrossKVGraph(nn.Module):
    """memory [N, S, d] -> per layer: cross key [N, heads, head_dim, S] and cross value [N, heads, S, head_dim].

    Outputs are ordered ``cross_key_0, cross_value_0, cross_key_1, ...``.
    """

    def __init__(self, model: BartForConditionalGeneration) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layer.encoder_attn for layer in model.model.decoder.layers)
        self.heads = model.config.decoder_attention_heads

    def forward(self, memory: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs: list[torch.Tensor] = []
        for attn in self.layers:
            outputs.append(_split_heads(attn.k_proj(memory), self.heads).transpose(-1, -2))
            outputs.append(_split_heads(attn.v_proj(memory), self.heads))
        return tuple(outputs)


class DecoderStepGraph(nn.Module):
    """One decoding step with a KV cache.

    Inputs: ``input_ids`` [B, T]; ``encoder_attention_mask`` [N, S] with B a multiple of N; then per
    layer ``past_key_i``/``past_value_i`` [B, heads, P, head_dim] (P may be 0); then per layer
    ``cross_key_i`` [N, heads, head_dim, S] / ``cross_value_i`` [N, heads, S, head_dim].
    Outputs: ``logits`` [B, T, vocab] (with ``final_logits_bias``), then per layer
    ``present_key_i``/``present_value_i`` [B, heads, P + T, head_dim].

    ``fused_attention`` exports each self-attention, with its cache update, as one
    ``com.microsoft.MultiHeadAttention`` node (past in, present out). At batch 1 the step is a chain of
    small ops, and the ~18 that spell out one cached attention cost more than its arithmetic.
    Cross-attention stays spelled out: its K/V rows are shared by the beams of a source, which the fused
    kernel cannot express.

    ``last_logits_only``: ``logits`` at the last new position only, [B, 1, vocab] -- a speculative pair's
    draft, which catches up on several tokens after plain full-model steps but only ever proposes from
    the last one; its LM head then runs once, not once per fed token.

    ``per_row_positions`` (in-flight batching): two more inputs after ``encoder_attention_mask``,
    ``positions`` [B, T] (each row's own token positions) and ``self_attention_mask`` [B, P + T] (1 where a row
    may attend). A request that joins a running batch gets past entries it must not see (its cache is shorter
    than the batch's); the mask hides them and its positions count its own tokens only.
    """

    def __init__(
        self,
        model: BartForConditionalGeneration,
        fused_attention: bool = False,
        last_logits_only: bool = False,
        per_row_positions: bool = False,
    ) -> None:
        super().__init__()
        self.fused_attention = fused_attention
        self.last_logits_only = last_logits_only
        self.per_row_positions = per_row_positions
        decoder = model.model.decoder
        self.embed_tokens = decoder.embed_tokens
        self.embed_positions = decoder.embed_positions
        self.layernorm_embedding = decoder.layernorm_embedding
        self.layers = decoder.layers
        self.lm_head = model.lm_head
        self.register_buffer("final_logits_bias", model.final_logits_bias.detach().clone(), persistent=False)
        self.heads = model.config.decoder_attention_heads
        self.activation = ACT2FN[model.config.activation_function]

    def forward(
        self, input_ids: torch.Tensor, encoder_attention_mask: torch.Tensor, *caches: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        layers = len(self.layers)
        row_positions, self_mask = (caches[0], caches[1]) if self.per_row_positions else (None, None)
        caches = caches[2:] if self.per_row_positions else caches
        past, cross = caches[: 2 * layers], caches[2 * layers :]
        past_length = past[0].shape[2]
        steps = input_ids.shape[1]
        columns = torch.arange(steps, device=input_ids.device) + past_length  # the new tokens' cache columns
        positions = columns if row_positions is None else row_positions
        hidden = self.embed_tokens(input_ids) + self.embed_positions.weight[positions + self.embed_positions.offset]
        hidden = self.layernorm_embedding(hidden)

        total = past_length + steps
        allowed = (torch.arange(total, device=input_ids.device)[None, :] <= columns[:, None])[None, None]
        if self_mask is not None:
            allowed = allowed & self_mask[:, None, None, :].bool()  # [B, 1, T, P + T]
        causal = torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device)
        causal = causal.masked_fill(~allowed, torch.finfo(hidden.dtype).min)
        cross_mask = (1.0 - encoder_attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        fused = self.fused_attention and torch.onnx.is_in_onnx_export()
        step = _Step(
            attend=_FusedCachedSelfAttention.apply if fused else _cached_self_attention,
            causal=causal,
            cross_mask=cross_mask,
            by_source=_shape_target(encoder_attention_mask, -1, self.heads, hidden.shape[-1] // self.heads, leading=1),
            by_token=_shape_target(hidden),
        )

        presents: list[torch.Tensor] = []
        for index, layer in enumerate(self.layers):
            hidden, key, value = self._layer(
                layer, hidden, past[2 * index : 2 * index + 2], cross[2 * index : 2 * index + 2], step
            )
            presents += [key, value]
        if self.last_logits_only:
            hidden = hidden[:, -1:]
        logits = self.lm_head(hidden) + self.final_logits_bias
        return (logits, *presents)

    def _layer(
        self,
        layer: BartDecoderLayer,
        hidden: torch.Tensor,
        past: tuple[torch.Tensor, ...],
        cross: tuple[torch.Tensor, ...],
        step: _Step,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn = layer.self_attn
        context, key, value = step.attend(*_projections(attn, hidden), step.causal, past[0], past[1], self.heads)
        hidden = layer.self_attn_layer_norm(hidden + attn.out_proj(context))

        context = _cross_attend(layer.encoder_attn, hidden, cross[0], cross[1], step)
        hidden = layer.encoder_attn_layer_norm(hidden + layer.encoder_attn.out_proj(context))

        feed_forward = layer.fc2(self.activation(layer.fc1(hidden)))
        hidden = layer.final_layer_norm(hidden + feed_forward)
        return hidden, key, value


@dataclass
class _Step:
    """What every layer of one decoder step shares, built once per step graph."""

    attend: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # cached self-attention, fused or not
    causal: torch.Tensor  # [1 or B, 1, T, P + T] additive mask
    cross_mask: torch.Tensor  # [N, 1, 1, S] additive mask
    by_source: Target  # cross-attention query rows as [N, -1, heads, head_dim]
    by_token: Target  # the decoder hidden states' [B, T, d]


def _cross_attend(
    attn: BartAttention,
    hidden: torch.Tensor,
    key_t: torch.Tensor,
    value: torch.Tensor,
    step: _Step,
) -> torch.Tensor:
    """Rows are grouped by source: decoder rows [n*K, (n+1)*K) read source n's K/V.

    [B, T, d] in row-major order is [N, K*T, d], so one reshape gives each source its K*T query rows and one
    matmul per (source, head) reads that source's keys once for all of its beams.
    """
    query = _reshape(attn.q_proj(hidden) * attn.scaling, step.by_source).transpose(1, 2)  # [N, H, K*T, hd]
    scores = torch.matmul(query, key_t) + step.cross_mask
    context = torch.matmul(torch.softmax(scores, dim=-1), value)  # [N, H, K*T, hd]
    return _reshape(context.transpose(1, 2), step.by_token)


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    scores = torch.matmul(query, key.transpose(-1, -2)) + mask
    return _merge_heads(torch.matmul(torch.softmax(scores, dim=-1), value))


def _cached_self_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias: torch.Tensor,
    mask: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decoder self-attention over the cache: ``[B, T, d]`` bias-free projections, packed ``[3d]`` biases,
    an additive ``[1 or B, 1, T, P + T]`` mask -> (context ``[B, T, d]``, present key, present value)."""
    query, key, value = _biased_heads(query, key, value, bias, heads)
    key = torch.cat([past_key, key], dim=2)
    value = torch.cat([past_value, value], dim=2)
    return _attend(query * (bias.shape[0] // 3 // heads) ** -0.5, key, value, mask), key, value


class _FusedCachedSelfAttention(torch.autograd.Function):
    """``_cached_self_attention`` exported as one ``com.microsoft.MultiHeadAttention`` node.

    The node adds the packed biases, scales by ``head_dim ** -0.5`` as BART does, adds the mask as its
    ``attention_bias`` and appends the new K/V to ``past_key``/``past_value`` (BNSH) to give the presents.
    Used only while exporting to ONNX, like ``_FusedSelfAttention``.
    """

    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return _cached_self_attention(*inputs)

    @staticmethod
    def symbolic(
        g: Any, query: Any, key: Any, value: Any, bias: Any, mask: Any, past_key: Any, past_value: Any, heads: int
    ) -> Any:
        no_padding_mask = g.op("prim::Constant")
        no_padding_mask.setType(torch._C.OptionalType.ofTensor())
        context, present_key, present_value = g.op(
            "com.microsoft::MultiHeadAttention",
            query,
            key,
            value,
            bias,
            no_padding_mask,
            mask,
            past_key,
            past_value,
            num_heads_i=heads,
            outputs=3,
        )
        context.setType(query.type())
        present_key.setType(past_key.type())
        present_value.setType(past_value.type())
        return context, present_key, present_value
