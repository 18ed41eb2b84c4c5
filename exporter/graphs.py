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
    ``python -m benchmarks.graph_choices``). TensorRT's ONNX parser has no
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
            projections = [F.linear(hidden, proj.weight) for proj in (attn.q_proj, attn.k_proj, attn.v_proj)]
            bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
            context = attend(*projections, bias, attention_mask, attn.num_heads)
            hidden = layer.self_attn_layer_norm(hidden + attn.out_proj(context))
            feed_forward = layer.fc2(layer.activation_fn(layer.fc1(hidden)))
            hidden = layer.final_layer_norm(hidden + feed_forward)
        return hidden


def _self_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor, heads: int
) -> torch.Tensor:
    """Bidirectional attention over a key padding mask: ``[B, S, d]`` bias-free projections, packed ``[3d]`` biases."""
    batch, length, width = query.shape
    query = _split_heads(query + bias[:width], heads)
    key = _split_heads(key + bias[width : 2 * width], heads)
    value = _split_heads(value + bias[2 * width :], heads)
    blocked = (1.0 - mask[:, None, None, :].to(query.dtype)) * torch.finfo(query.dtype).min
    context = F.scaled_dot_product_attention(query, key, value, attn_mask=blocked)
    return context.transpose(1, 2).reshape(batch, length, width)


class _FusedSelfAttention(torch.autograd.Function):
    """``_self_attention`` exported as one ``com.microsoft.MultiHeadAttention`` node.

    The node takes the same inputs (it adds the packed biases itself, mask 1 = token) and, like
    BART, scales by ``head_dim ** -0.5``. Used only while exporting to ONNX: a TorchScript trace
    cannot save a Python autograd function.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        bias: torch.Tensor,
        mask: torch.Tensor,
        heads: int,
    ) -> torch.Tensor:
        return _self_attention(query, key, value, bias, mask, heads)

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


def _split_heads(states: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, width = states.shape
    return states.view(batch, length, heads, width // heads).transpose(1, 2)


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
    """

    def __init__(self, model: BartForConditionalGeneration) -> None:
        super().__init__()
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
        past, cross = caches[: 2 * layers], caches[2 * layers :]
        past_length = past[0].shape[2]
        steps = input_ids.shape[1]
        positions = torch.arange(steps, device=input_ids.device) + past_length
        hidden = self.embed_tokens(input_ids) + self.embed_positions.weight[positions + self.embed_positions.offset]
        hidden = self.layernorm_embedding(hidden)

        total = past_length + steps
        allowed = torch.arange(total, device=input_ids.device)[None, :] <= (positions[:, None])
        causal = torch.zeros(steps, total, dtype=hidden.dtype, device=hidden.device)
        causal = causal.masked_fill(~allowed, torch.finfo(hidden.dtype).min)
        cross_mask = (1.0 - encoder_attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min

        presents: list[torch.Tensor] = []
        for index, layer in enumerate(self.layers):
            hidden, key, value = self._layer(
                layer, hidden, past[2 * index : 2 * index + 2], cross[2 * index : 2 * index + 2], causal, cross_mask
            )
            presents += [key, value]
        logits = self.lm_head(hidden) + self.final_logits_bias
        return (logits, *presents)

    def _layer(
        self,
        layer: BartDecoderLayer,
        hidden: torch.Tensor,
        past: tuple[torch.Tensor, ...],
        cross: tuple[torch.Tensor, ...],
        causal: torch.Tensor,
        cross_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn = layer.self_attn
        query = _split_heads(attn.q_proj(hidden), self.heads)
        key = torch.cat([past[0], _split_heads(attn.k_proj(hidden), self.heads)], dim=2)
        value = torch.cat([past[1], _split_heads(attn.v_proj(hidden), self.heads)], dim=2)
        context = _attend(query * attn.scaling, key, value, causal)
        hidden = layer.self_attn_layer_norm(hidden + attn.out_proj(context))

        context = self._cross_attend(layer.encoder_attn, hidden, cross[0], cross[1], cross_mask)
        hidden = layer.encoder_attn_layer_norm(hidden + layer.encoder_attn.out_proj(context))

        feed_forward = layer.fc2(self.activation(layer.fc1(hidden)))
        hidden = layer.final_layer_norm(hidden + feed_forward)
        return hidden, key, value

    def _cross_attend(
        self, attn: BartAttention, hidden: torch.Tensor, key_t: torch.Tensor, value: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Rows are grouped by source: decoder rows [n*K, (n+1)*K) read source n's K/V."""
        batch, steps, width = hidden.shape
        sources = key_t.shape[0]
        group = batch // sources
        query = _split_heads(attn.q_proj(hidden) * attn.scaling, self.heads)  # [B, H, T, hd]
        head_dim = query.shape[-1]
        query = query.reshape(sources, group, self.heads, steps, head_dim).transpose(1, 2)
        query = query.reshape(sources, self.heads, group * steps, head_dim)
        scores = torch.matmul(query, key_t) + mask
        context = torch.matmul(torch.softmax(scores, dim=-1), value)  # [N, H, K*T, hd]
        context = context.reshape(sources, self.heads, group, steps, head_dim).permute(0, 2, 3, 1, 4)
        return context.reshape(batch, steps, width)


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    batch, heads, steps, head_dim = query.shape
    scores = torch.matmul(query, key.transpose(-1, -2)) + mask
    context = torch.matmul(torch.softmax(scores, dim=-1), value)
    return context.transpose(1, 2).reshape(batch, steps, heads * head_dim)
