"""The compressed BART: base-width encoder -> compressor -> narrow decoder.

The classes subclass transformers' BART classes and replace only what differs (module
construction and weight tying), so ``forward``, losses and ``generate()`` -- greedy, beam search,
sampling, KV cache -- are transformers' own code. That makes ``model.generate()`` a trustworthy
reference for the exporter and the runtimes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import (
    BartForConditionalGeneration,
    BartForSequenceClassification,
    BartModel,
)
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.bart.modeling_bart import (
    BartClassificationHead,
    BartDecoder,
    BartEncoder,
    BartPreTrainedModel,
    BartScaledWordEmbedding,
)

# Relative imports: transformers copies this file and the two it imports into every saved checkpoint
# (see compression/__init__.py), where they load with trust_remote_code=True and without cbart.
from .autoencoder import ProjectionStack
from .config import CompressedBartConfig


class CompressingEncoder(nn.Module):
    """The BART encoder followed by the autoencoder's encoder half.

    This is what ``generate()`` calls "the encoder": its output (the compressed memory, latent
    width) is what the decoder's cross-attention reads.
    """

    def __init__(self, config: CompressedBartConfig) -> None:
        super().__init__()
        self.config = config
        self.base = BartEncoder(config.encoder_config())
        self.compressor = ProjectionStack(
            [config.encoder_d_model, *config.latent_sizes],
            config.autoencoder_variant,
            config.autoencoder_max_positions,
            last="tanh",
        )

    @property
    def main_input_name(self) -> str:
        return "input_ids"

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> BaseModelOutput:
        kwargs.pop("return_dict", None)
        outputs = self.base(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs)
        return BaseModelOutput(
            last_hidden_state=self.compressor(outputs.last_hidden_state),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


def _init_compressed(module: BartPreTrainedModel, config: CompressedBartConfig) -> None:
    """Initialise the bare PreTrainedModel state without building BART's full-width modules."""
    BartPreTrainedModel.__init__(module, config)


class CompressedBartModel(BartModel):
    """BartModel whose encoder compresses and whose decoder is ``latent_sizes[-1]`` wide."""

    config_class = CompressedBartConfig
    # The encoder embedding is base-width and cannot be tied to the narrow decoder's.
    _tied_weights_keys = {"decoder.embed_tokens.weight": "shared.weight"}

    def __init__(self, config: CompressedBartConfig) -> None:
        _init_compressed(self, config)
        self.shared = BartScaledWordEmbedding(
            config.vocab_size, config.d_model, config.pad_token_id, embed_scale=_embed_scale(config)
        )
        self.encoder = CompressingEncoder(config)
        self.decoder = BartDecoder(config)
        self.post_init()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.shared = value
        self.decoder.embed_tokens = self.shared


def _embed_scale(config: CompressedBartConfig) -> float:
    return config.d_model**0.5 if config.scale_embedding else 1.0


class CompressedBartForConditionalGeneration(BartForConditionalGeneration):
    """Seq2seq LM head on the compressed model; ``generate()`` works unchanged.

    ``final_logits_bias`` is kept (BART checkpoints carry a non-zero one).
    """

    config_class = CompressedBartConfig

    def __init__(self, config: CompressedBartConfig) -> None:
        _init_compressed(self, config)
        self.model = CompressedBartModel(config)
        self.final_logits_bias = nn.Buffer(torch.zeros((1, config.vocab_size)))
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    def get_encoder(self, modality: str | None = None) -> CompressingEncoder:
        return self.model.encoder

    def decoder_parameter_count(self) -> int:
        """Decoder parameters incl. its embeddings (the LM head is tied to them), as the paper counts."""
        return _count(self.model.decoder)


class CompressedBartForSequenceClassification(BartForSequenceClassification):
    """The paper's classification setup: a BART classification head on the decoder's EOS state."""

    config_class = CompressedBartConfig

    def __init__(self, config: CompressedBartConfig, **kwargs: Any) -> None:
        _init_compressed(self, config)
        self.model = CompressedBartModel(config)
        self.classification_head = BartClassificationHead(
            config.d_model, config.d_model, config.num_labels, config.classifier_dropout
        )
        self.post_init()

    def get_encoder(self, modality: str | None = None) -> CompressingEncoder:
        return self.model.encoder


def _count(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())
