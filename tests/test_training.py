"""Training stages: losses go down, checkpoints and exact resume, incompatible resume, real data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cbart.compression import CheckpointError, build_from_base, load_compressed_model
from cbart.compression.data import Collator, Example, load_records, tokenize_seq2seq
from cbart.compression.synthetic import ReversalTask, strip_specials
from cbart.compression.training import (
    Distillation,
    Seq2SeqEvaluation,
    TrainingArguments,
    train_autoencoder,
    train_classifier,
    train_decoder,
    train_full_model,
)
from cbart.compression.training.loop import SCHEDULES, epoch_batches
from cbart.compression.training.stages import (
    AUTOENCODER_FILE,
    classification_accuracy,
    distillation_loss,
    label_loss,
    target_logits,
    to_classifier,
)
from conftest import tiny_bart_config
from transformers import BartForConditionalGeneration

TASK = ReversalTask(symbols=8, min_length=3, max_length=6)


def small_model(variant: str = "paper"):
    torch.manual_seed(0)
    base = BartForConditionalGeneration(TASK.base_config(width=32, ffn=64))
    return build_from_base(base, [24, 16], variant)


def args(tmp_path: Path, name: str, **overrides) -> TrainingArguments:
    settings = {"max_steps": 12, "batch_size": 16, "learning_rate": 3e-3, "progress": False, "seed": 0}
    return TrainingArguments(tmp_path / name, **{**settings, **overrides})


def exact_match_evaluation(held_out: list[Example]) -> Seq2SeqEvaluation:
    return Seq2SeqEvaluation(
        examples=held_out,
        references=[strip_specials(e.labels) for e in held_out],
        decode=lambda batch: [strip_specials(ids) for ids in batch],
        metric="exact_match",
        generation={"max_new_tokens": 8},
    )


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


@pytest.mark.parametrize("variant", ["paper", "token"])
def test_stage1_reconstruction_loss_decreases_and_updates_the_compressor(tmp_path: Path, variant: str):
    model = small_model(variant)
    before = model.model.encoder.compressor.layers[0].weight.clone()
    result = train_autoencoder(model, TASK.sample(256, 0), args(tmp_path, "ae", max_steps=30))
    assert mean(result.losses[-5:]) < 0.7 * mean(result.losses[:5])
    assert not torch.equal(model.model.encoder.compressor.layers[0].weight, before)
    saved = load_compressed_model(tmp_path / "ae")
    torch.testing.assert_close(
        saved.model.encoder.compressor.layers[0].weight, model.model.encoder.compressor.layers[0].weight
    )
    assert (tmp_path / "ae" / AUTOENCODER_FILE).is_file()


def test_stage2_trains_only_the_decoder_by_default_and_evaluates(tmp_path: Path):
    model = small_model("paper")
    encoder_before = {k: v.clone() for k, v in model.model.encoder.state_dict().items()}
    evaluation = exact_match_evaluation(TASK.sample(20, 1))
    result = train_decoder(
        model, TASK.sample(256, 0), args(tmp_path, "dec", max_steps=30, eval_every=15), evaluation=evaluation
    )
    assert mean(result.losses[-5:]) < 0.92 * mean(result.losses[:5])
    assert [e["step"] for e in result.evaluations] == [15, 30]
    assert all(0.0 <= e["exact_match"] <= 100.0 for e in result.evaluations)
    for name, tensor in model.model.encoder.state_dict().items():
        assert torch.equal(tensor, encoder_before[name]), name


def test_full_model_baseline_trains_every_weight_and_saves_a_plain_bart(tmp_path: Path):
    torch.manual_seed(0)
    model = BartForConditionalGeneration(TASK.base_config(width=32, ffn=64))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    evaluation = exact_match_evaluation(TASK.sample(8, 1))
    result = train_full_model(model, TASK.sample(256, 0), args(tmp_path, "full", max_steps=30), evaluation=evaluation)
    assert mean(result.losses[-5:]) < 0.9 * mean(result.losses[:5])
    assert not torch.equal(model.model.encoder.layers[0].fc1.weight, before["model.encoder.layers.0.fc1.weight"])
    assert not torch.equal(model.model.decoder.layers[0].fc1.weight, before["model.decoder.layers.0.fc1.weight"])
    assert [e["step"] for e in result.evaluations] == [30]
    saved = BartForConditionalGeneration.from_pretrained(tmp_path / "full")
    torch.testing.assert_close(saved.model.decoder.layers[0].fc1.weight, model.model.decoder.layers[0].fc1.weight)


def test_unfreezing_the_compressor_trains_it_with_padding_to_max_length(tmp_path: Path):
    model = small_model("paper")
    before = model.model.encoder.compressor.layers[0].weight.clone()
    train_decoder(model, TASK.sample(64, 0), args(tmp_path, "dec", max_steps=2), train_compressor=True)
    assert not torch.equal(model.model.encoder.compressor.layers[0].weight, before)


def test_resume_continues_exactly_where_training_stopped(tmp_path: Path):
    examples = TASK.sample(96, 0)
    straight = small_model()
    train_decoder(straight, examples, args(tmp_path, "straight", max_steps=8))

    interrupted = small_model()
    train_decoder(interrupted, examples, args(tmp_path, "run", max_steps=8, save_every=4))
    checkpoint = tmp_path / "run" / "checkpoints" / "step-4"
    assert checkpoint.is_dir() and (tmp_path / "run" / "checkpoints" / "step-8").is_dir()
    resumed = load_compressed_model(checkpoint)
    result = train_decoder(resumed, examples, args(tmp_path, "resumed", max_steps=8, resume_from=checkpoint))
    assert result.steps == 8 and len(result.losses) == 8
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_resume_from_an_incompatible_checkpoint_is_refused(tmp_path: Path):
    model = small_model()
    train_autoencoder(model, TASK.sample(32, 0), args(tmp_path, "ae", max_steps=2))
    with pytest.raises(CheckpointError, match="different settings .*stage: checkpoint 'autoencoder' vs now 'decoder'"):
        train_decoder(
            load_compressed_model(tmp_path / "ae"), TASK.sample(32, 0), args(tmp_path, "d", resume_from=tmp_path / "ae")
        )
    with pytest.raises(CheckpointError, match="has no training_state.pt"):
        train_decoder(small_model(), TASK.sample(32, 0), args(tmp_path, "d2", resume_from=tmp_path / "ae" / "nothing"))


def test_gradient_accumulation_and_bf16_autocast_run(tmp_path: Path):
    model = small_model("token")
    result = train_decoder(
        model,
        TASK.sample(64, 0),
        args(tmp_path, "acc", max_steps=3, gradient_accumulation_steps=2, mixed_precision="bf16"),
    )
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(result.losses)))


def test_training_arguments_reject_impossible_settings(tmp_path: Path):
    with pytest.raises(ValueError, match="fp16 mixed precision needs a CUDA device"):
        TrainingArguments(tmp_path, mixed_precision="fp16", device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is visible"):
            TrainingArguments(tmp_path, device="cuda")


def test_classification_head_on_the_compressed_decoder_learns(tmp_path: Path):
    torch.manual_seed(0)
    rows = TASK.sample(200, 3)
    examples = [Example(e.input_ids, int(e.input_ids[1] < e.input_ids[-2])) for e in rows]
    classifier = to_classifier(small_model("token"), num_labels=2)
    result = train_classifier(classifier, examples, args(tmp_path, "cls", max_steps=40), held_out=examples[:50])
    assert mean(result.losses[-5:]) < mean(result.losses[:5])
    assert classification_accuracy(classifier, examples[:50])["accuracy"] == result.evaluations[-1]["accuracy"]
    reloaded = load_compressed_model(tmp_path / "cls", task="classification")
    assert reloaded.config.num_labels == 2


def test_collator_pads_sources_and_masks_target_padding():
    batch = Collator(pad_token_id=1, pad_source_to=6)([Example([0, 5, 2], [0, 7, 8, 2]), Example([0, 2], [0, 2])])
    assert batch["input_ids"].tolist() == [[0, 5, 2, 1, 1, 1], [0, 2, 1, 1, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[0, 7, 8, 2], [0, 2, -100, -100]]


def test_local_data_files_and_field_errors(tmp_path: Path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"article": "a", "summary": "b"}) + "\n\n")
    (tmp_path / "d.csv").write_text("article,summary\nx,y\n")
    assert load_records(tmp_path / "d.jsonl") == [{"article": "a", "summary": "b"}]
    assert load_records(tmp_path / "d.csv") == [{"article": "x", "summary": "y"}]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_records(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    with pytest.raises(ValueError, match="bad.jsonl:1 is not valid JSON"):
        load_records(tmp_path / "bad.jsonl")
    with pytest.raises(KeyError, match="field 'source' not in the data; available fields: \\['article', 'summary'\\]"):
        tokenize_seq2seq(load_records(tmp_path / "d.jsonl"), None, "source", "summary", 8, 8)


def test_both_stages_on_real_translation_data_with_the_real_tokenizer(
    tmp_path: Path, shared_data: Path, bart_tokenizer
):
    rows = load_records(shared_data / "multi30k" / "train.jsonl", limit=128)
    examples = tokenize_seq2seq(rows, bart_tokenizer, "source", "target", 48, 48)
    torch.manual_seed(0)
    base_config = tiny_bart_config(vocab_size=len(bart_tokenizer), positions=64)
    model = build_from_base(BartForConditionalGeneration(base_config), [24, 16], "paper")
    stage1 = train_autoencoder(model, examples, args(tmp_path, "ae", max_steps=16), bart_tokenizer)
    stage2 = train_decoder(model, examples, args(tmp_path, "mt", max_steps=40, learning_rate=1e-2), bart_tokenizer)
    assert mean(stage1.losses[-3:]) < mean(stage1.losses[:3])
    assert mean(stage2.losses[-3:]) < 0.8 * mean(stage2.losses[:3])
    from transformers import AutoTokenizer

    stored = AutoTokenizer.from_pretrained(tmp_path / "mt")
    assert stored("Hello world").input_ids == [0, 31414, 232, 2]


def test_length_bucketed_batches_respect_the_token_budget_and_cover_every_example_once(tmp_path: Path):
    examples = TASK.sample(200, 0)
    settings = args(tmp_path, "b", max_tokens=64)
    batches = epoch_batches(examples, settings, epoch=0)
    assert sorted(i for batch in batches for i in batch) == list(range(200))
    for batch in batches:
        longest = max(max(len(examples[i].input_ids), len(examples[i].labels)) for i in batch)
        assert longest * len(batch) <= 64 or len(batch) == 1
    assert batches == epoch_batches(examples, settings, epoch=0)  # a resumed run rebuilds the same epoch
    assert batches != epoch_batches(examples, settings, epoch=1)


def test_inverse_sqrt_schedule_warms_up_linearly_then_decays_with_the_square_root():
    factor = SCHEDULES["inverse_sqrt"](warmup=4, total=0)
    assert [factor(step) for step in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(15) == pytest.approx(0.5)  # step 16 = 4 x warm-up: 1/sqrt(4)
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        args(Path("x"), "x", lr_schedule="cosine")


def test_epoch_checkpoints_resume_to_the_same_weights_as_a_straight_run(tmp_path: Path):
    examples = TASK.sample(64, 0)
    epoch_settings = {"max_steps": None, "epochs": 2, "max_tokens": 80, "save_each_epoch": True}
    straight = small_model()
    train_decoder(straight, examples, args(tmp_path, "straight", **epoch_settings))
    first = tmp_path / "straight" / "checkpoints" / "epoch-1"
    resumed = load_compressed_model(first)
    result = train_decoder(resumed, examples, args(tmp_path, "resumed", resume_from=first, **epoch_settings))
    assert torch.load(tmp_path / "resumed" / "training_state.pt", weights_only=False)["epoch"] == 2
    assert result.steps == len(epoch_batches(examples, args(tmp_path, "x", max_tokens=80), 0)) * 2
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_target_position_loss_equals_transformers_loss_and_smoothing_raises_it():
    model = small_model().train(False)
    batch = Collator(model.config.pad_token_id)(TASK.sample(6, 3))
    reference = model(**batch).loss
    logits = target_logits(model, batch)
    assert logits.shape == (int((batch["labels"] != -100).sum()), model.config.vocab_size)
    torch.testing.assert_close(label_loss(logits, batch["labels"]), reference)
    assert label_loss(logits, batch["labels"], 0.1) > reference


def test_distillation_loss_is_the_temperature_scaled_kl_to_the_teacher():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 7), torch.randn(5, 7)
    assert distillation_loss(teacher, teacher, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    p_teacher = torch.softmax(teacher / 2, -1)
    expected = (p_teacher * (p_teacher.log() - torch.log_softmax(student / 2, -1))).sum(-1).mean() * 4
    torch.testing.assert_close(distillation_loss(student, teacher, 2.0), expected)
    with pytest.raises(ValueError, match="alpha must be in"):
        Distillation(torch.nn.Linear(1, 1), alpha=1.5)  # type: ignore[arg-type]


def test_distilled_stage2_moves_the_student_towards_the_teacher(tmp_path: Path):
    torch.manual_seed(0)
    teacher = BartForConditionalGeneration(TASK.base_config(width=32, ffn=64)).eval()
    examples = TASK.sample(128, 0)
    batch = Collator(1)(examples[:32])

    def kl_to_teacher(student) -> float:
        with torch.no_grad():
            return float(distillation_loss(target_logits(student.eval(), batch), target_logits(teacher, batch), 1.0))

    student = build_from_base(teacher, [24, 16], "token")
    before = kl_to_teacher(student)
    train_decoder(student, examples, args(tmp_path, "kd", max_steps=25), distillation=Distillation(teacher, alpha=1.0))
    assert kl_to_teacher(student) < 0.7 * before
    torch.manual_seed(1)  # fit() reseeds the global generator: without this the stranger would be the teacher
    stranger = BartForConditionalGeneration(TASK.base_config(width=32, ffn=64))
    with pytest.raises(ValueError, match="teacher cannot serve this student: encoder weight"):
        train_decoder(student, examples, args(tmp_path, "x"), distillation=Distillation(stranger))
