"""Speculative decoding through a pair export: exactly the full model's greedy ids, whatever the draft."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from cbart.compression import build_from_base
from cbart.exporter.export import ExportError, ExportOptions, export_onnx
from cbart.exporter.pair import DRAFT_DIRECTORY, export_pair
from cbart.runtime.generator import Seq2SeqRuntime
from cbart.runtime.manifest import read_manifest
from cbart.runtime.speculative import DraftLength
from transformers import BartForConditionalGeneration

from tests.conftest import random_batch, tiny_bart_config

EOS = 2
SETTINGS = [
    {"max_new_tokens": 24},
    {"max_new_tokens": 5},
    {"max_new_tokens": 16, "min_new_tokens": 10},
    {"max_new_tokens": 20, "no_repeat_ngram_size": 2},
    {"max_new_tokens": 20, "repetition_penalty": 1.3},
]


def full_model() -> BartForConditionalGeneration:
    """A random tiny BART that does not just repeat one token, and whose rows finish at different steps.

    (With tied embeddings and the default init, a random BART's greedy output copies its last token.)
    """
    torch.manual_seed(0)
    config = tiny_bart_config()
    config.init_std, config.tie_word_embeddings = 0.13, False
    return BartForConditionalGeneration(config).eval()


def noisy_copy(model: BartForConditionalGeneration, scale: float) -> BartForConditionalGeneration:
    """The same model with noise on its decoder layers only (the shared embeddings and encoder stay equal)."""
    draft = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in draft.model.decoder.layers.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return draft


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> tuple[BartForConditionalGeneration, Path]:
    model = full_model()
    directory = tmp_path_factory.mktemp("full") / "model"
    model.save_pretrained(directory)
    return model, directory


def _pair(tmp_path_factory, full, draft, name: str, **options) -> Path:
    _, full_dir = full
    draft_dir = tmp_path_factory.mktemp(name) / "draft-checkpoint"
    draft.save_pretrained(draft_dir)
    out = draft_dir.parent / "pair"
    draft_quantize = options.pop("draft_quantize", None)
    export_pair(full_dir, draft_dir, out, ExportOptions(progress=False, **options), draft_quantize, log=lambda *a: None)
    return out


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, full) -> dict[str, Path]:
    """Drafts that agree never-ish (a random compressed decoder), always (the model itself) and partly."""
    model, _ = full
    compressed = build_from_base(model, [24, 16], "paper", 40)
    return {
        "compressed": _pair(tmp_path_factory, full, compressed, "compressed", with_torch=True),
        "itself": _pair(tmp_path_factory, full, copy.deepcopy(model), "itself"),
        "noisy": _pair(tmp_path_factory, full, noisy_copy(model, 0.02), "noisy"),
        "compressed-int8": _pair(tmp_path_factory, full, compressed, "int8", draft_quantize="int8"),
    }


def expected_ids(model: BartForConditionalGeneration, ids: torch.Tensor, mask: torch.Tensor, **settings) -> list:
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, num_beams=1, do_sample=False, **settings).tolist()


def sources(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [row[: int(m.sum())].tolist() for row, m in zip(ids, mask, strict=True)]


@pytest.fixture(scope="module")
def greedy(full) -> tuple[list[list[int]], list[list]]:
    """A mixed-length batch and the full PyTorch model's greedy ids for each of ``SETTINGS``."""
    model, _ = full
    ids, mask = random_batch([9, 4, 13, 6], seed=3)
    return sources(ids, mask), [expected_ids(model, ids, mask, **settings) for settings in SETTINGS]


@pytest.mark.parametrize("draft", ["compressed", "itself", "noisy", "compressed-int8"])
@pytest.mark.parametrize("speculative", [True, 1, 4])
def test_speculative_greedy_equals_the_full_models_greedy(pairs, greedy, draft, speculative):
    runtime = Seq2SeqRuntime.from_dir(pairs[draft])
    batch, expected = greedy
    for settings, want in zip(SETTINGS, expected, strict=True):
        output = runtime.generate(batch, speculative=speculative, **settings)
        assert output.sequences == want, (draft, speculative, settings)
        assert output.speculation is not None and output.speculation.steps == len(output.sequences[0]) - 1


def test_rows_finish_at_different_steps(full):
    """The EOS handling above is exercised: some rows stop early, others run to the length limit."""
    model, _ = full
    ids, mask = random_batch([9, 4, 13, 6], seed=3)
    generated = expected_ids(model, ids, mask, max_new_tokens=24)
    lengths = [len(row) - row.count(1) for row in generated]
    assert min(lengths) < 10 and max(lengths) == 25
    assert len({token for row in generated for token in row}) > 10


def test_acceptance_follows_how_well_the_draft_matches(full, pairs):
    ids, mask = random_batch([9, 4, 13, 6], seed=3)
    rates = {}
    for name in ("itself", "noisy", "compressed"):
        output = Seq2SeqRuntime.from_dir(pairs[name]).generate(sources(ids, mask), max_new_tokens=24, speculative=4)
        assert output.speculation is not None
        rates[name] = output.speculation.acceptance_rate
        if name == "itself":
            assert output.speculation.tokens_per_full_call > 3
    assert rates["itself"] == 1.0
    assert rates["itself"] > rates["noisy"] > rates["compressed"]


def test_torch_backend_verifies_the_same_way(full, pairs):
    model, _ = full
    runtime = Seq2SeqRuntime.from_dir(pairs["compressed"], backend="torch")
    ids, mask = random_batch([7, 12], seed=5)
    output = runtime.generate(sources(ids, mask), max_new_tokens=18, speculative=3)
    assert output.sequences == expected_ids(model, ids, mask, max_new_tokens=18)


def test_pair_manifest_and_layout(pairs):
    manifest = read_manifest(pairs["compressed-int8"])
    assert manifest.draft is not None
    assert (manifest.draft.directory, manifest.draft.precision) == (DRAFT_DIRECTORY, "int8")
    assert manifest.draft.architecture == "compressed_bart"
    assert manifest.verification is not None and manifest.verification.speculative_identical == "4/4"
    draft_manifest = read_manifest(pairs["compressed-int8"] / DRAFT_DIRECTORY)
    assert "encoder" not in draft_manifest.graphs and "autoencoder" in draft_manifest.graphs
    assert not (pairs["compressed-int8"] / DRAFT_DIRECTORY / "tokenizer").exists()
    assert read_manifest(pairs["itself"]).verification.draft_acceptance == 1.0
    # the draft's LM head runs at the last fed position only (it catches up on several tokens after plain
    # steps); an fp32 draft's screened head follows suit, and the full model's step keeps every position
    assert draft_manifest.last_position_logits and not manifest.last_position_logits
    assert draft_manifest.graphs["decoder_step"].outputs[0].shape[1] == 1
    screened = read_manifest(pairs["noisy"] / DRAFT_DIRECTORY)
    assert screened.lm_head_screen and [spec.shape[1] for spec in screened.graphs["decoder_step"].outputs[-2:]] == [
        1,
        1,
    ]


def test_streaming_through_a_pair_yields_the_greedy_tokens(full, pairs):
    model, _ = full
    ids, mask = random_batch([9], seed=3)
    runtime = Seq2SeqRuntime.from_dir(pairs["noisy"])
    streamed = list(runtime.stream(sources(ids, mask), max_new_tokens=12, speculative=True))
    expected = [t for t in expected_ids(model, ids, mask, max_new_tokens=12)[0][1:] if t != EOS]
    assert streamed == expected


def test_a_draft_with_another_encoder_is_refused(full, tmp_path):
    _, full_dir = full
    torch.manual_seed(7)
    stranger = build_from_base(BartForConditionalGeneration(tiny_bart_config()), [24, 16], "paper", 40)
    stranger.save_pretrained(tmp_path / "stranger")
    with pytest.raises(ExportError, match="cannot share the full model's encoder pass: encoder weight"):
        export_pair(full_dir, tmp_path / "stranger", tmp_path / "out", ExportOptions(progress=False))
    assert not (tmp_path / "out").exists()


def test_a_draft_with_another_vocabulary_is_refused(full, tmp_path):
    _, full_dir = full
    BartForConditionalGeneration(tiny_bart_config(vocab_size=80)).save_pretrained(tmp_path / "other")
    with pytest.raises(ExportError, match=r"draft's vocabulary \(80\) differs from the full model's \(96\)"):
        export_pair(full_dir, tmp_path / "other", tmp_path / "out", ExportOptions(progress=False))


def test_fused_encoder_is_refused(full, tmp_path):
    _, full_dir = full
    with pytest.raises(ExportError, match="--fuse-encoder cannot be used with --draft"):
        export_pair(full_dir, full_dir, tmp_path / "out", ExportOptions(progress=False, fuse_encoder=True))


def test_speculation_needs_a_pair_and_greedy(full, pairs, tmp_path):
    _, full_dir = full
    single = export_onnx(full_dir, tmp_path / "single", ExportOptions(progress=False, verify=False)).directory
    with pytest.raises(ValueError, match="has no draft decoder; speculative decoding needs a pair export"):
        Seq2SeqRuntime.from_dir(single).generate([[0, 5, 6, 2]], speculative=True)
    runtime = Seq2SeqRuntime.from_dir(pairs["itself"])
    with pytest.raises(ValueError, match="speculative decoding is greedy search or sampling; drop num_beams"):
        runtime.generate([[0, 5, 6, 2]], num_beams=2, speculative=True)
    with pytest.raises(ValueError, match="draft length must be between 1"):
        runtime.generate([[0, 5, 6, 2]], speculative=0)
    # the pair's full model still runs alone, beams included
    assert runtime.generate([[0, 5, 6, 2]], num_beams=2, max_new_tokens=4).sequences


def test_draft_length_grows_shrinks_and_probes():
    length = DraftLength(start=2, maximum=3, probe_interval=2, max_probe_interval=4)
    length.update(2, 2)
    assert length.propose() == 3
    length.update(3, 3)
    assert length.propose() == 3  # capped
    length.update(3, 1)
    assert length.propose() == 3  # a partial run keeps k
    for expected in (2, 1):
        length.update(length.propose(), 0)
        assert length.current == expected
    length.update(1, 0)  # k reaches 0: plain steps, then a probe; each failed probe doubles the wait
    assert [length.propose() for _ in range(3)] == [0, 0, 1]
    length.update(1, 0)
    assert [length.propose() for _ in range(5)] == [0, 0, 0, 0, 1]
    length.update(1, 1)  # an accepted probe resumes drafting
    assert length.propose() == 2
    fixed = DraftLength(start=4, maximum=4, adaptive=False)
    fixed.update(4, 0)
    assert fixed.propose() == 4


def test_random_pair_falls_back_to_plain_decoding(full, pairs):
    """A draft that never agrees ends up proposing almost nothing: few draft calls per generated token."""
    ids, _ = random_batch([9], seed=3)
    runtime = Seq2SeqRuntime.from_dir(pairs["compressed"])
    output = runtime.generate([ids[0].tolist()], max_new_tokens=36, min_new_tokens=36, speculative=True)
    stats = output.speculation
    assert stats is not None and stats.steps == 36
    assert stats.draft_calls < 0.3 * stats.steps
    assert np.isclose(stats.tokens_per_full_call, stats.steps / stats.full_calls)


def test_encode_once_then_speculate_and_search(pairs, greedy):
    runtime = Seq2SeqRuntime.from_dir(pairs["noisy"])
    batch, expected = greedy
    encoded = runtime.encode(batch)
    assert encoded.draft is not None
    speculated = runtime.generate(encoded=encoded, speculative=True, **SETTINGS[0])
    assert speculated.sequences == expected[0]
    assert runtime.generate(encoded=encoded, **SETTINGS[0]).sequences == expected[0]
    assert len(runtime.generate(encoded=encoded, num_beams=2, max_new_tokens=6).sequences) == len(batch)


SAMPLING = {"do_sample": True, "top_k": 4, "temperature": 1.5, "max_new_tokens": 4}
DRAWS = 600


def _chi2_critical(df: int, z: float = 3.09) -> float:
    """The chi-square statistic's 0.1% critical value (Wilson-Hilferty; no scipy needed)."""
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


def _pair_distribution(
    model: BartForConditionalGeneration, source: list[int], settings
) -> dict[tuple[int, int], float]:
    """The exact joint distribution of the first two sampled tokens: the model's logits, processed and warped."""
    from cbart.runtime.search import process_scores, sampling_distribution

    ids = torch.tensor([source])
    start = settings.decoder_start_token_id

    def distribution(prefix: list[int]) -> np.ndarray:
        with torch.no_grad():
            logits = model(input_ids=ids, decoder_input_ids=torch.tensor([prefix])).logits[:, -1].numpy()
        return sampling_distribution(process_scores(logits, np.array([prefix]), settings), settings)[0]

    first = distribution([start])
    joint = {}
    for a in np.flatnonzero(first):
        second = distribution([start, int(a)])
        joint.update({(int(a), int(b)): first[a] * second[b] for b in np.flatnonzero(second)})
    return joint


def _chi2(counts: dict[tuple[int, int], int], expected: dict[tuple[int, int], float], draws: int) -> tuple[float, int]:
    """Pearson's statistic over cells expected >= 5 times (the rest pooled), and its degrees of freedom."""
    cells = [(counts.get(cell, 0), draws * p) for cell, p in expected.items() if draws * p >= 5]
    pooled_expected = draws - sum(e for _, e in cells)
    pooled_observed = draws - sum(o for o, _ in cells)
    if pooled_expected >= 5:
        cells.append((pooled_observed, pooled_expected))
    elif pooled_observed:
        return float("inf"), len(cells) - 1  # tokens the distribution gives (almost) no mass
    return sum((o - e) ** 2 / e for o, e in cells), len(cells) - 1


@pytest.mark.parametrize("draft", ["noisy", "compressed"])
def test_speculative_sampling_keeps_the_full_models_distribution(full, pairs, draft):
    """Chi-square test of the first two sampled tokens against the full model's exact joint distribution
    (draft "noisy": mostly accepted; "compressed": mostly resampled from the residual). The draft's own
    distribution fails the same test, so the test can tell the two apart."""
    model, _ = full
    runtime = Seq2SeqRuntime.from_dir(pairs[draft])
    source = [0, 17, 41, 9, 63, 2]
    settings = runtime.settings(**SAMPLING)
    expected = _pair_distribution(model, source, settings)
    counts: dict[tuple[int, int], int] = {}
    proposed = accepted = 0
    for seed in range(DRAWS):
        output = runtime.generate([source], speculative=2, seed=seed, **SAMPLING)
        cell = tuple(output.sequences[0][1:3])
        counts[cell] = counts.get(cell, 0) + 1
        assert output.speculation is not None
        proposed += output.speculation.proposed
        accepted += output.speculation.accepted
    statistic, df = _chi2(counts, expected, DRAWS)
    assert df >= 3 and statistic < _chi2_critical(df), (statistic, df)
    rate = accepted / proposed
    assert (0.5 < rate < 0.98) if draft == "noisy" else rate < 0.5, rate
    # the power check: the same samples are far from a different distribution
    other = noisy_copy(model, 0.3)
    statistic, df = _chi2(counts, _pair_distribution(other, source, settings), DRAWS)
    assert statistic > 3 * _chi2_critical(df), statistic


def test_speculative_sampling_is_seeded_and_returns_several_sequences(pairs):
    runtime = Seq2SeqRuntime.from_dir(pairs["noisy"])
    batch = [[0, 17, 41, 9, 2], [0, 5, 2]]
    settings = {**SAMPLING, "max_new_tokens": 12, "num_return_sequences": 3}
    first = runtime.generate(batch, speculative=True, seed=7, **settings)
    assert first.sequences == runtime.generate(batch, speculative=True, seed=7, **settings).sequences
    assert len(first.sequences) == 6
    assert first.sequences != runtime.generate(batch, speculative=True, seed=8, **settings).sequences
    assert first.speculation is not None and first.speculation.proposed > 0
