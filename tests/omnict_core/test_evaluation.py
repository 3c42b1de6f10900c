"""Evaluation: answer parsing, metrics from maintained packages, group tables, chance levels, and the Table 14
stress test (mismatch / noise) on a real (untrained) model."""

from __future__ import annotations

import math

import numpy as np
import pytest



def test_closed_answer_parsing():
    from omnict_core.evaluation.metrics import extract_choice, normalize_yes_no

    assert normalize_yes_no("Yes") == "yes" and normalize_yes_no("no, there is none.") == "no"
    assert normalize_yes_no("Maybe") is None and normalize_yes_no("") is None
    assert extract_choice("B. right lower lobe") == "B" and extract_choice("(c) left") == "C"
    assert extract_choice("right lower lobe") is None


def test_open_metrics_come_from_the_packages():
    from omnict_core.evaluation.metrics import OpenAnswerScorer, token_f1

    scorer = OpenAnswerScorer()
    same = scorer.score("A 12 mm nodule in the right upper lobe.", "A 12 mm nodule in the right upper lobe.")
    assert same["bleu"] == pytest.approx(1.0) and same["rouge_l"] == pytest.approx(1.0)
    assert same["token_f1"] == pytest.approx(1.0)
    other = scorer.score("left kidney stone", "A 12 mm nodule in the right upper lobe.")
    assert other["rouge_l"] == 0.0 and other["token_f1"] == 0.0 and other["bleu"] < 0.05
    assert token_f1("right upper lobe", "right lower lobe") == pytest.approx(2 / 3)
    if scorer.meteor_unavailable is None:  # WordNet found (Debian wordnet-base): a real METEOR
        assert same["meteor"] > 0.9 and other["meteor"] < 0.2
        # synonyms count in METEOR (WordNet), not in token-F1
        ref = "the patient is sick today"  # NLTK matches synonyms after stemming: a pair Porter leaves intact
        synonym = scorer.score("the patient is ill today", ref)
        unrelated = scorer.score("the patient is old today", ref)
        assert synonym["meteor"] > unrelated["meteor"] + 0.05 and synonym["token_f1"] == unrelated["token_f1"]
    else:
        assert same["meteor"] is None and "wordnet" in scorer.meteor_unavailable.lower()


def test_scores_group_by_organ_category_and_size():
    from omnict_core.evaluation.metrics import score_predictions, summarize

    def sample(task, answer, organ, category, bucket, options=None):
        return {"task_type": task, "answer": answer, "organ": organ, "category": category, "finding_type": "x",
                "size_bucket": bucket, "dim": "2d", "options": options}

    samples = [sample("judgment", "Yes", "lungs", "abnormality", "<=10 mm"),
               sample("judgment", "No", "lungs", "abnormality", ">20 mm"),
               sample("multiple_choice", "C. left", "liver", "interpretation", "n/a", ["a", "b", "left", "d"]),
               sample("short_answer", "right upper lobe", "lungs", "interpretation", "n/a")]
    preds = ["Yes", "Yes", "C", "right lower lobe"]
    out = summarize(score_predictions(samples, preds))
    assert out["overall"]["accuracy"] == pytest.approx(2 / 3)
    assert out["overall"]["chance"] == pytest.approx((0.5 + 0.5 + 0.25) / 3)
    assert out["groups"]["organ"]["lungs"]["accuracy"] == pytest.approx(0.5)
    assert out["groups"]["organ"]["liver"]["accuracy"] == pytest.approx(1.0)
    assert out["groups"]["size_bucket"]["<=10 mm"]["accuracy"] == 1.0
    assert out["groups"]["size_bucket"][">20 mm"]["accuracy"] == 0.0
    assert out["groups"]["category"]["interpretation"]["token_f1"] == pytest.approx(2 / 3)
    assert out["overall"]["open_n"] == 1 and out["overall"]["exact"] == 0.0


def test_mismatch_pairs_other_studies_of_the_same_kind(vqa_dir):
    from omnict_core.data.dataset import PhantomVQADataset
    from omnict_core.evaluation.runner import apply_condition

    dataset = PhantomVQADataset(vqa_dir, "bench")
    indices = list(range(len(dataset)))
    apply_condition(dataset, "mismatch", indices, seed=1)
    assert len(dataset.image_override) > len(indices) // 2
    for i, (image, _) in list(dataset.image_override.items())[:20]:
        original, _ = dataset.load_image(dataset.samples[i])
        assert image.shape == original.shape and not np.array_equal(image, original)
    apply_condition(dataset, "noise", indices[:5], seed=1)
    for image, labels in dataset.image_override.values():
        assert 0.0 <= image.min() and image.max() <= 1.0 and not labels.any()  # nothing to segment in noise


def test_evaluate_runs_all_conditions_on_a_model(vqa_dir, tmp_path):
    from click.testing import CliRunner

    from omnict_core.evaluation.cli import eval_command
    from omnict_core.modeling_omnict import build_model, save_omnict
    from omnict_core.tokenization_omnict import load_tokenizer

    tokenizer = load_tokenizer(str(vqa_dir / "tokenizer"))
    model_dir = save_omnict(build_model("tiny", tokenizer), tokenizer, tmp_path / "untrained")
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(eval_command, ["--model", str(model_dir), "--bench", str(vqa_dir), "--limit", "6",
                                               "--task", "judgment", "--task", "multiple_choice",
                                               "--out", str(out), "--threads", "1", "--batch-size", "6"])
    assert result.exit_code == 0, result.output
    assert "Robustness (paper Table 14)" in result.output and "mismatch" in result.output
    import json

    data = json.loads(out.read_text())
    assert set(data["conditions"]) == {"normal", "mismatch", "noise"}
    acc = data["conditions"]["normal"]["overall"]["accuracy"]
    assert acc is None or 0.0 <= acc <= 1.0
    assert len(data["predictions"]) == 6 and all(isinstance(p["prediction"], str) for p in data["predictions"])
    assert not math.isnan(data["conditions"]["noise"]["overall"]["chance"] or 0.0)


def test_select_samples_filters_by_finding_and_size_bucket():
    from omnict_core.evaluation.runner import select_samples

    samples = [{"id": 1, "finding_type": "lung_nodule", "size_bucket": "<=10 mm"},
               {"id": 2, "finding_type": "lung_nodule", "size_bucket": "none"},
               {"id": 3, "finding_type": "kidney_stone", "size_bucket": "<=5 mm"},
               {"id": 4, "finding_type": "liver_lesion", "size_bucket": "<=10 mm"}]
    ids = lambda rows: [r["id"] for r in rows]  # noqa: E731
    assert ids(select_samples(samples, None)) == [1, 2, 3, 4]
    assert ids(select_samples(samples, {"finding_type": ("lung_nodule", "kidney_stone")})) == [1, 2, 3]
    assert ids(select_samples(samples, {"finding_type": ("lung_nodule",), "size_bucket": ("<=10 mm",)})) == [1]
    assert ids(select_samples(samples, {"finding_type": (), "size_bucket": ("<=10 mm",)})) == [1, 4]


def test_multiple_choice_diagnostic_separates_the_named_option_from_the_letter():
    """An answer can name the right option's text under the wrong letter ('A. moderate' when moderate is B): the
    score reads the letter; the diagnostic says how often the text was right and the letter pointed at it."""
    from omnict_core.evaluation.metrics import named_option, score_predictions, summarize

    options = ["small", "moderate", "large"]
    sample = {"task_type": "multiple_choice", "answer": "B. moderate", "options": options, "organ": "lungs"}
    assert named_option(sample, "A. moderate") == "moderate" and named_option(sample, "(b) Moderate") == "moderate"
    assert named_option(sample, "B") is None and named_option(sample, "C. huge") is None
    preds = ["A. moderate",  # right text, wrong letter: scored wrong
             "B. moderate",  # right text, right letter
             "C. large",  # wrong text, its letter agrees
             "B. small"]  # wrong text under the right letter: scored right
    out = summarize(score_predictions([sample] * 4, preds))["overall"]
    assert out["accuracy"] == pytest.approx(2 / 4)
    assert out["choice_n"] == 4
    assert out["choice_named"] == pytest.approx(2 / 4)
    assert out["choice_letter_agrees"] == pytest.approx(2 / 4)
    judgment_only = summarize(score_predictions([{"task_type": "judgment", "answer": "Yes"}], ["Yes"]))["overall"]
    assert judgment_only["choice_n"] == 0 and judgment_only["choice_named"] is None


def test_ranked_answers_are_the_likeliest_allowed_answer(vqa_dir, random_model_dir):
    """Ranked answering scores every allowed answer (Yes / No, the lettered options) by its log-likelihood and
    answers with the best; the batched scores equal the model's own loss on each candidate alone (n x mean NLL)."""
    import torch

    from omnict_core.data.dataset import PhantomVQADataset, VQACollator
    from omnict_core.data.vqa import answer_candidates
    from omnict_core.evaluation.runner import answer_log_likelihoods, rank_answers
    from omnict_core.modeling_omnict import load_omnict

    model, tokenizer = load_omnict(random_model_dir)
    dataset = PhantomVQADataset(vqa_dir, "bench")
    closed = [i for i, s in enumerate(dataset.samples) if answer_candidates(s)]
    picked = [i for i in closed if dataset.samples[i]["task_type"] == "judgment"][:3] + \
             [i for i in closed if dataset.samples[i]["task_type"] == "multiple_choice"][:3]
    assert len(picked) == 6
    answers = rank_answers(model, tokenizer, dataset, picked, batch_size=5, bf16=False, progress=False)
    collator = VQACollator(tokenizer, model.config, with_answers=True)
    for i in picked:
        item = dataset[i]
        candidates = answer_candidates(item["sample"])
        scores = []
        for candidate in candidates:
            turns = [item["sample"]["conversations"][0], {"from": "gpt", "value": candidate}]
            batch = collator([{**item, "sample": {**item["sample"], "conversations": turns}}])
            with torch.no_grad():
                loss = model(**batch).loss  # mean NLL over the labelled tokens (HF's own loss)
            labelled = int((batch["labels"] != -100).sum())
            scores.append(float(answer_log_likelihoods(model, batch, bf16=False)[0]))
            assert scores[-1] == pytest.approx(-float(loss) * labelled, rel=1e-4)
        assert answers[i] == candidates[int(np.argmax(scores))]
    assert {answers[i] for i in picked[:3]} <= {"Yes", "No"}


def test_eval_command_ranks_closed_answers(vqa_dir, random_model_dir, tmp_path):
    import json

    from click.testing import CliRunner

    from omnict_core.data.dataset import read_jsonl
    from omnict_core.data.vqa import answer_candidates
    from omnict_core.evaluation.cli import eval_command

    out = tmp_path / "eval.json"
    result = CliRunner().invoke(eval_command, ["--model", str(random_model_dir), "--bench", str(vqa_dir), "--limit",
                                               "8", "--closed-answers", "rank", "--no-robustness", "--out", str(out),
                                               "--threads", "1", "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    assert "answered by ranking" in result.output
    data = json.loads(out.read_text())
    assert data["closed_answering"] == "rank"
    samples = {s["id"]: s for s in read_jsonl(vqa_dir / "bench.jsonl")}
    closed = [p for p in data["predictions"] if answer_candidates(samples[p["id"]])]
    assert closed and all(p["prediction"] in answer_candidates(samples[p["id"]]) for p in closed)
