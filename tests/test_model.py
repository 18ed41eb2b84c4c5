"""The compressed model: shapes, the paper's parameter counts, BatchNorm slicing, generate()."""

from __future__ import annotations

import pytest
import torch
from cbart.compression import CompressedBartConfig, CompressedBartForConditionalGeneration
from cbart.compression.autoencoder import LatentAutoencoder, PositionBatchNorm, ProjectionStack
from cbart.compression.build import bart_base_config
from conftest import random_batch, tiny_bart_config, tiny_compressed
from transformers import BartForConditionalGeneration


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_decoder_parameters_match_the_paper_for_bart_base():
    base = bart_base_config()  # d_model 768, 6+6 layers, 12 heads, FFN 3072, vocab 50265
    with torch.device("meta"):
        full = BartForConditionalGeneration(base)
        compressed = CompressedBartForConditionalGeneration(
            CompressedBartConfig.from_base_config(base, [576, 480, 384])
        )
    full_decoder = count(full.model.decoder)
    compressed_decoder = compressed.decoder_parameter_count()
    assert 95e6 < full_decoder < 97e6
    assert 39.5e6 < compressed_decoder < 41.5e6
    layer = compressed.model.decoder.layers[0]
    assert layer.fc1.out_features == 3072 and layer.encoder_attn.k_proj.in_features == 384
    assert compressed.model.decoder.config.decoder_attention_heads == 12
    widths = [m.weight.shape for m in compressed.model.encoder.compressor.layers if isinstance(m, torch.nn.Linear)]
    assert widths == [torch.Size([576, 768]), torch.Size([480, 576]), torch.Size([384, 480])]


def test_paper_autoencoder_layout():
    stack = ProjectionStack([768, 576, 480, 384], "paper", 1024)
    kinds = [type(m).__name__ for m in stack.layers]
    assert kinds == ["Linear", "PositionBatchNorm", "ReLU"] * 2 + ["Linear", "PositionBatchNorm", "Tanh"]
    assert all(m.bias is None for m in stack.layers if isinstance(m, torch.nn.Linear))
    assert all(m.num_features == 1024 for m in stack.layers if isinstance(m, PositionBatchNorm))
    token = ProjectionStack([768, 576, 480, 384], "token", 1024)
    assert [type(m).__name__ for m in token.layers][1] == "LayerNorm"


def test_position_batchnorm_eval_is_sliceable_to_the_real_length():
    torch.manual_seed(0)
    stack = ProjectionStack([32, 24, 16], "paper", 40)
    stack.train()
    for _ in range(5):  # populate non-trivial running statistics
        stack(torch.randn(4, 40, 32) * 3 + 1)
    stack.eval()
    full = torch.randn(2, 40, 32)
    short = full[:, :13]
    sliced = stack(short)
    torch.testing.assert_close(sliced, stack(full)[:, :13], rtol=0, atol=1e-6)
    # ... and equal to torch's own BatchNorm1d on the padded input, as the original model runs it
    for module in stack.layers:
        if isinstance(module, PositionBatchNorm):
            module.forward = torch.nn.BatchNorm1d.forward.__get__(module)
    torch.testing.assert_close(stack(full)[:, :13], sliced, rtol=1e-5, atol=1e-5)


def test_paper_variant_training_requires_padding_to_max_length():
    autoencoder = LatentAutoencoder(32, [24, 16], "paper", 40).train()
    with pytest.raises(ValueError, match="padded to exactly 40 positions"):
        autoencoder(torch.randn(2, 13, 32))
    latent, reconstruction = autoencoder(torch.randn(2, 40, 32))
    assert latent.shape == (2, 40, 16) and reconstruction.shape == (2, 40, 32)
    assert latent.abs().max() <= 1.0  # Tanh last


def test_paper_variant_rejects_sources_longer_than_its_max_length():
    model = tiny_compressed("paper", positions=64)
    model.config.autoencoder_max_positions = 40
    model.model.encoder.compressor = ProjectionStack([32, 24, 16], "paper", 40).eval()
    ids, mask = random_batch([50])
    with pytest.raises(ValueError, match="exceeds the 'paper' autoencoder's max length 40"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)


@pytest.mark.parametrize("variant", ["paper", "token"])
def test_generation_is_independent_of_padding(variant):
    model = tiny_compressed(variant)
    ids, mask = random_batch([9, 5, 7], seed=3)
    batched = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, num_beams=1)
    for row in range(3):
        length = int(mask[row].sum())
        alone = model.generate(
            input_ids=ids[row : row + 1, :length],
            attention_mask=mask[row : row + 1, :length],
            max_new_tokens=6,
            do_sample=False,
            num_beams=1,
        )
        assert batched[row, : alone.shape[1]].tolist() == alone[0].tolist()


def test_paper_variant_padded_to_1024_style_max_length_generates_the_same_tokens():
    """The original pads every source to max length; the sliced BatchNorm must not change results."""
    model = tiny_compressed("paper")
    ids, mask = random_batch([11], seed=5)
    padded_ids = torch.nn.functional.pad(ids, (0, 40 - 11), value=1)
    padded_mask = torch.nn.functional.pad(mask, (0, 40 - 11), value=0)
    short = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, num_beams=2)
    padded = model.generate(input_ids=padded_ids, attention_mask=padded_mask, max_new_tokens=8, num_beams=2)
    assert short.tolist() == padded.tolist()


@pytest.mark.parametrize("variant", ["paper", "token"])
def test_generate_with_and_without_kv_cache_agree(variant):
    model = tiny_compressed(variant, seed=1)
    ids, mask = random_batch([8, 6], seed=2)
    for settings in ({"num_beams": 1}, {"num_beams": 3, "length_penalty": 2.0, "no_repeat_ngram_size": 2}):
        cached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=7, use_cache=True, **settings)
        uncached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=7, use_cache=False, **settings)
        assert cached.tolist() == uncached.tolist()


def test_sampling_is_reproducible_with_a_seed():
    model = tiny_compressed("token")
    ids, mask = random_batch([8])
    outputs = []
    for _ in range(2):
        torch.manual_seed(7)
        outputs.append(model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=10, max_new_tokens=6))
    assert outputs[0].tolist() == outputs[1].tolist()


def test_decoder_cross_attention_reads_the_compressed_memory():
    model = tiny_compressed("token")
    ids, mask = random_batch([8])
    memory = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    assert memory.shape == (1, 8, 16)
    logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=torch.tensor([[2, 0]])).logits
    assert logits.shape == (1, 2, 96)
    # the final_logits_bias is part of the logits
    plain = model.lm_head(model.model(input_ids=ids, attention_mask=mask, decoder_input_ids=torch.tensor([[2, 0]]))[0])
    torch.testing.assert_close(logits, plain + model.final_logits_bias)


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ([24, 28], "strictly decreasing"),
        ([40, 16], "smaller than the base d_model"),
        ([24, 18], "not divisible by decoder_attention_heads"),
        ([], "latent_sizes is empty"),
    ],
)
def test_invalid_latent_sizes_are_rejected_with_the_fix(sizes, message):
    with pytest.raises(ValueError, match=message):
        CompressedBartConfig.from_base_config(tiny_bart_config(), sizes)


def test_unknown_variant_and_non_bart_base_are_rejected():
    with pytest.raises(ValueError, match="autoencoder_variant must be one of"):
        CompressedBartConfig.from_base_config(tiny_bart_config(), [24, 16], "batch")
    from transformers import T5Config

    with pytest.raises(ValueError, match="must be a BART checkpoint"):
        CompressedBartConfig.from_base_config(T5Config(), [24, 16])


def test_decoder_heads_can_be_set_for_latent_sizes_the_base_heads_do_not_divide():
    with pytest.raises(ValueError, match="--decoder-heads 8 for 256 or 128"):
        CompressedBartConfig.from_base_config(tiny_bart_config(), [24, 18])
    config = CompressedBartConfig.from_base_config(tiny_bart_config(), [24, 18], decoder_attention_heads=3)
    model = CompressedBartForConditionalGeneration(config).eval()
    assert model.model.decoder.layers[0].self_attn.head_dim == 6
    assert config.encoder_config().encoder_attention_heads == 4
    ids, mask = random_batch([6])
    assert model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3).shape[1] >= 2
