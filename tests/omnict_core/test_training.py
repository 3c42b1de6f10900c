"""Trainer: a few real steps on phantom VQA, stage freezing, warmup-cosine, and exact resume."""

from __future__ import annotations

import json
import math

import pytest
import torch



def _config(data_dir, out_dir, **kw):
    from omnict_core.training.trainer import TrainConfig

    base = dict(data_dir=str(data_dir), out_dir=str(out_dir), stage=2, steps=4, batch_size=2, lr=1e-3,
                save_every=2, seed=3, progress=False, max_samples=40, num_threads=1)
    base.update(kw)
    return TrainConfig(**base)


def test_warmup_cosine_schedule():
    from omnict_core.training.schedule import warmup_cosine_factor

    assert warmup_cosine_factor(0, 100, 4) == pytest.approx(0.25)
    assert warmup_cosine_factor(3, 100, 4) == pytest.approx(1.0)
    assert warmup_cosine_factor(52, 100, 4) == pytest.approx(0.5)  # half-way through the cosine
    assert warmup_cosine_factor(100, 100, 4) == pytest.approx(0.0, abs=1e-9)
    assert all(warmup_cosine_factor(s, 100, 4) >= warmup_cosine_factor(s + 1, 100, 4) for s in range(3, 99))


def test_stages_freeze_what_the_paper_freezes(vqa_dir, tmp_path):
    from omnict_core.training.trainer import Trainer

    stage1 = Trainer(_config(vqa_dir, tmp_path / "s1", stage=1)).model
    assert not any(p.requires_grad for p in stage1.language_model.parameters())  # LLM frozen
    assert all(p.requires_grad for p in stage1.projector.parameters())  # MHP trained
    assert all(p.requires_grad for p in stage1.vision_tower.parameters())  # random-init tower must learn
    stage2 = Trainer(_config(vqa_dir, tmp_path / "s2", stage=2)).model
    assert all(p.requires_grad for p in stage2.parameters())


def test_steps_run_and_resume_reproduces_the_uninterrupted_run(vqa_dir, tmp_path):
    from omnict_core.inference.drafting import ANSWER_START, AnswerDrafter
    from omnict_core.modeling_omnict import load_omnict
    from omnict_core.training.trainer import Trainer

    straight = Trainer(_config(vqa_dir, tmp_path / "straight"))
    losses = [h["loss"] for h in straight.train(resume=False)]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)

    interrupted = Trainer(_config(vqa_dir, tmp_path / "resumed"))
    interrupted.train(resume=False, stop_after=2)  # "crash" after step 2: checkpoint-last holds step 2
    assert (tmp_path / "resumed" / "checkpoint-last" / "trainer_state.pt").is_file()
    assert not (tmp_path / "resumed" / "config.json").exists()  # not finished
    resumed = Trainer(_config(vqa_dir, tmp_path / "resumed"))  # a new process would do exactly this
    history = resumed.train(resume=True)
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert resumed.position == straight.position == 4 * 2
    for step in (2, 3):  # the losses after the resume point equal the uninterrupted run's
        assert history[step]["loss"] == pytest.approx(losses[step], rel=1e-5, abs=1e-6)
    for name, tensor in straight.model.state_dict().items():
        assert torch.allclose(tensor, resumed.model.state_dict()[name], atol=1e-6), name

    summary = json.loads((tmp_path / "resumed" / "training_summary.json").read_text())
    assert summary["steps"] == 4 and summary["samples_seen"] == 8
    model, tokenizer = load_omnict(tmp_path / "resumed")  # the output is a loadable model directory
    assert model.config.use_ose and len(tokenizer) == model.config.text_config.vocab_size
    drafter = AnswerDrafter.load(tmp_path / "resumed", tokenizer)  # with the engine's table of training answers
    first_answer = tokenizer.encode(resumed.dataset.samples[0]["answer"], add_special_tokens=False)
    assert drafter is not None and drafter.table[(ANSWER_START,)][0] in {
        tokenizer.encode(s["answer"], add_special_tokens=False)[0] for s in resumed.dataset.samples}
    assert (ANSWER_START, *first_answer[:2]) in drafter.table


def test_cli_trains_an_ablation_without_ose(vqa_dir, tmp_path):
    from click.testing import CliRunner

    from omnict_core.training.cli import train

    out = tmp_path / "no-ose"
    result = CliRunner().invoke(train, ["--data", str(vqa_dir), "--out", str(out), "--stage", "1", "--steps", "1",
                                        "--batch-size", "2", "--no-ose", "--max-samples", "10", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "use_ose=False" in result.output
    assert json.loads((out / "config.json").read_text())["use_ose"] is False


def test_init_from_a_missing_directory_is_a_clear_error(vqa_dir, tmp_path):
    from omnict_core.training.trainer import Trainer

    with pytest.raises(FileNotFoundError, match="not-there"):
        Trainer(_config(vqa_dir, tmp_path / "x", init_from=str(tmp_path / "not-there")))


def test_per_sample_loss_weighs_every_answer_equally():
    """--loss-average sample: each sample's mean over its answer tokens, then the mean over samples — a one-token
    answer counts as much as a long one (the token mean lets long reports dominate)."""
    from omnict_core.training.trainer import answer_loss

    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.full((3, 7), -100)
    labels[0, 5:] = torch.tensor([1, 2])  # a short answer
    labels[1, 1:] = torch.randint(0, 11, (6,))  # a long one
    # sample 2: no supervised token at all -> left out, not a division by zero
    one = [torch.nn.functional.cross_entropy(logits[i, :-1], labels[i, 1:], ignore_index=-100) for i in (0, 1)]
    assert answer_loss(logits, labels, "sample") == pytest.approx(float((one[0] + one[1]) / 2), rel=1e-6)
    token_mean = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1),
                                                   ignore_index=-100)
    assert float(token_mean) != pytest.approx(float(answer_loss(logits, labels, "sample")), rel=1e-3)


def test_per_sample_loss_of_one_sample_is_the_language_model_loss():
    """Same shift and targets as the Hugging Face causal-LM loss (the "token" average)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from omnict_core.training.trainer import answer_loss

    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)).eval()
    ids = torch.randint(0, 50, (1, 12))
    labels = ids.clone()
    labels[:, :7] = -100  # the prompt
    out = lm(input_ids=ids, labels=labels)
    assert float(answer_loss(out.logits, labels, "sample")) == pytest.approx(float(out.loss), rel=1e-5)


def test_choice_letter_weight_scales_only_the_letter_of_multiple_choice_answers():
    """weights: w at each MC row's first answer token; the weighted per-sample mean is sum(w l) / sum(w)."""
    from omnict_core.training.trainer import answer_loss, choice_letter_weights

    torch.manual_seed(0)
    logits = torch.randn(2, 8, 13)
    labels = torch.full((2, 8), -100)
    labels[0, 4:] = torch.tensor([3, 4, 5, 6])  # an MC answer: letter at 4, then '.', content, <|im_end|>
    labels[1, 5:] = torch.tensor([7, 8, 9])  # a judgment answer
    weights = choice_letter_weights(labels, [True, False], 3.0)
    assert weights[0, 4] == 3.0 and float(weights.sum()) == 2 * 8 - 1 + 3.0
    token_losses = [torch.nn.functional.cross_entropy(logits[i, :-1], labels[i, 1:], ignore_index=-100,
                                                      reduction="none") for i in (0, 1)]
    mc = token_losses[0][3:]  # targets 4..7 (position t predicts t + 1)
    expected_mc = (3.0 * mc[0] + mc[1:].sum()) / (3.0 + 3)
    expected = (expected_mc + token_losses[1][4:].mean()) / 2
    assert float(answer_loss(logits, labels, "sample", weights)) == pytest.approx(float(expected), rel=1e-6)
    assert float(answer_loss(logits, labels, "sample", choice_letter_weights(labels, [True, False], 1.0))) == \
        pytest.approx(float(answer_loss(logits, labels, "sample")), rel=1e-6)
    flat = torch.cat([3.0 * mc[:1], mc[1:], token_losses[1][4:]])
    assert float(answer_loss(logits, labels, "token", weights)) == pytest.approx(float(flat.sum() / 9), rel=1e-6)


def test_relettered_training_draws_new_orders_and_repeats_them_after_a_resume(vqa_dir, tmp_path):
    """--reletter-choices: the option order depends on (seed, data position) only, so two epochs differ and a
    resumed run draws what the uninterrupted one drew; the dataset's own samples stay as written."""
    from omnict_core.training.trainer import Trainer

    cfg = _config(vqa_dir, tmp_path / "r", reletter_choices=True, choice_letter_weight=3.0, batch_size=40)
    trainer = Trainer(cfg)
    stored = [json.dumps(s, sort_keys=True) for s in trainer.dataset.samples]
    epoch0, epoch1 = trainer.next_items(), trainer.next_items()  # 40 samples: one micro-batch = one epoch

    def orders(items):
        return {item["sample"]["id"]: item["sample"]["answer"] + "|" + item["sample"]["conversations"][0]["value"]
                for item in items if item["sample"]["task_type"] == "multiple_choice"}

    assert orders(epoch0) and orders(epoch0) != orders(epoch1)
    again = Trainer(cfg)
    assert orders(again.next_items()) == orders(epoch0)
    again.position = 0  # a resume restores the position; the orders follow it, not the calls made before
    again.next_items()
    assert orders(again.next_items()) == orders(epoch1)
    assert [json.dumps(s, sort_keys=True) for s in trainer.dataset.samples] == stored
    items = [i for i in epoch0 if i["sample"]["task_type"] == "multiple_choice"][:2] + \
        [i for i in epoch0 if i["sample"]["task_type"] == "judgment"][:2]
    loss = trainer.micro_batch_loss(items)
    assert loss.requires_grad and math.isfinite(float(loss))
    trainer.cfg.choice_letter_weight = 1.0  # the same batch without the letter weight: the trainer applies it
    assert float(trainer.micro_batch_loss(items)) != pytest.approx(float(loss), rel=1e-4)
