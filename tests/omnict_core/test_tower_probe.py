"""Tower probe: an answer head trained on a frozen tower's tokens, scored on the benchmark's closed questions in the
benchmark's own answer format."""

from __future__ import annotations

import json

import torch


def test_allowed_classes_are_the_options_of_a_multiple_choice_question():
    from omnict_core.evaluation.tower_probe import allowed_classes
    from omnict_core.training.vision_pretrain import QuestionVocab

    vocab = QuestionVocab(keys=["size_mc|2d|kidney_stone"], classes=[["5-10 mm", "<=5 mm", ">10 mm", "none"]])
    allowed = allowed_classes(vocab, 0, {"options": [">10 mm", "<=5 mm"]})
    assert allowed.tolist() == [False, True, True, False]
    assert allowed_classes(vocab, 0, {"options": None}).tolist() == [True, True, True, True]


def test_probe_fits_training_questions_and_answers_in_the_benchmark_format(vqa_dir, random_model_dir, tmp_path):
    from omnict_core.data.dataset import read_jsonl
    from omnict_core.evaluation.metrics import extract_choice
    from omnict_core.evaluation.tower_probe import ProbeConfig, run_probe

    weights_before = (random_model_dir / "model.safetensors").read_bytes()
    results = run_probe(ProbeConfig(model_dir=str(random_model_dir), data_dir=str(vqa_dir), epochs=40, lr=1e-2,
                                    batch_images=16))
    history = results["history"]
    # the head learns the training questions from the (random, frozen) tower's tokens
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert history[-1]["train_acc"] > history[0]["train_acc"]
    # every closed benchmark question of a key seen in training is scored, in the benchmark's answer format
    bench = {s["id"]: s for s in read_jsonl(vqa_dir / "bench.jsonl")}
    closed = [s for s in bench.values() if s["task_type"] in ("judgment", "multiple_choice")]
    assert results["samples"] + results["unscored"] == len(closed) and results["samples"] > 0
    for row in results["predictions"]:
        sample, prediction = bench[row["id"]], row["prediction"]
        if sample["task_type"] == "judgment":
            assert prediction in ("Yes", "No")
        else:
            letter, text = prediction.split(". ", 1)
            assert text in sample["options"] and extract_choice(prediction) == letter
            assert sample["options"].index(text) == "ABCDEF".index(letter)
    overall = results["conditions"]["normal"]["overall"]
    assert overall["closed_n"] == results["samples"] and 0.0 <= overall["accuracy"] <= 1.0
    json.dumps(results)  # the CLI writes it as JSON
    assert (random_model_dir / "model.safetensors").read_bytes() == weights_before  # the checkpoint is only read


def test_projector_read_point_gives_one_token_per_unshuffle_window_and_pools_the_roi(random_model_dir):
    from omnict_core.evaluation.tower_probe import image_tokens, roi_mask_at
    from omnict_core.modeling_omnict import load_omnict

    model, _ = load_omnict(random_model_dir)
    config = model.config
    grid, patch, m = config.patch_grid, config.patch_size, config.unshuffle("3d")
    assert m > 1
    size = grid * patch
    labels = torch.zeros(2, 3, size, size, dtype=torch.int32)  # 2 volume units
    labels[1, 0, patch * (m + 1), patch * m] = 5  # one pixel in patch (m + 1, m) of unit 1
    tower_mask = roi_mask_at(model, labels, (5,), "3d", "tower")
    projector_mask = roi_mask_at(model, labels, (5,), "3d", "projector")
    side = grid // m
    assert tower_mask.shape == (2 * grid * grid,) and int(tower_mask.sum()) == 1
    assert projector_mask.shape == (2 * side * side,)
    assert projector_mask.nonzero().flatten().tolist() == [side * side + 1 * side + 1]  # window (1, 1) of unit 1
    units = torch.zeros(2, 3, size, size)
    tokens = image_tokens(model, units, "3d", "projector", bf16=False)
    assert tokens.shape == (2 * side * side, config.text_config.hidden_size)
    assert image_tokens(model, units, "3d", "tower", bf16=False).shape == (2 * grid * grid,
                                                                              config.vision_config.hidden_size)


def test_probe_scored_on_its_training_split_reproduces_the_fit(vqa_dir, random_model_dir):
    """Each scored answer is the head's answer to that very question of that very image: on the questions it was
    trained on, the probe scores what it fitted (a mix-up of images or question rows would fall to chance)."""
    from omnict_core.evaluation.tower_probe import ProbeConfig, run_probe

    results = run_probe(ProbeConfig(model_dir=str(random_model_dir), data_dir=str(vqa_dir), split="train", epochs=40,
                                    lr=1e-2, batch_images=16))
    overall = results["conditions"]["normal"]["overall"]
    assert results["unscored"] == 0
    assert overall["accuracy"] >= 0.9 * results["history"][-1]["train_acc"]
    assert overall["accuracy"] > overall["chance"] + 0.3
