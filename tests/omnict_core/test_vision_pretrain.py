"""Stage 0 (vision-tower pretraining): targets from label maps and closed answers, heads, and a loadable output
whose tower (only) is trained."""

from __future__ import annotations

import json

import pytest
import torch



def test_patch_targets_are_organ_group_fractions():
    from omnict_core.training.vision_pretrain import ORGAN_GROUPS, label_group_lut, patch_group_fractions

    names = [g for g, _ in ORGAN_GROUPS]
    lut = label_group_lut({3: "lung_upper_lobe_right", 14: "liver", 40: "urinary_bladder"})
    assert int(lut[0]) == 0 and int(lut[3]) == names.index("lung_upper_lobe_right")
    assert int(lut[14]) == names.index("liver") and int(lut[40]) == names.index("other")
    labels = torch.zeros(1, 9, 9, dtype=torch.int32)  # 2 x 2 patches of 4 px (+ 1 ignored remainder row/col)
    labels[0, :4, :2] = 14  # half of patch (0, 0) is liver
    labels[0, 4:8, 4:8] = 3  # patch (1, 1) is all right upper lobe
    labels[0, 8, :] = 14  # remainder pixels: ignored, as SigLIP ignores them
    frac = patch_group_fractions(labels, lut, patch=4, grid=2)
    assert frac.shape == (1, 2, 2, len(ORGAN_GROUPS))
    assert torch.allclose(frac.sum(-1), torch.ones(1, 2, 2))
    assert frac[0, 0, 0, names.index("liver")] == pytest.approx(0.5)
    assert frac[0, 0, 0, 0] == pytest.approx(0.5)
    assert frac[0, 1, 1, names.index("lung_upper_lobe_right")] == pytest.approx(1.0)
    assert frac[0, 1, 0, 0] == pytest.approx(1.0)


def test_roi_token_mask_marks_tokens_the_roi_touches():
    from omnict_core.training.vision_pretrain import roi_token_mask

    labels = torch.zeros(2, 3, 8, 8, dtype=torch.int32)  # 2 units of 3 slices, 2 x 2 tokens of 4 px each
    labels[1, 2, 5, 1] = 7  # one pixel, last slice of unit 1, token (1, 0)
    mask = roi_token_mask(labels, (7,), patch=4, grid=2)
    assert mask.tolist() == [False] * 4 + [False, False, True, False]
    assert not roi_token_mask(labels, (), patch=4, grid=2).any()


def test_question_vocab_uses_answer_content_and_skips_reports(vqa_dir):
    from omnict_core.data.dataset import read_jsonl
    from omnict_core.training.vision_pretrain import QuestionVocab, questions_by_image

    samples = read_jsonl(vqa_dir / "train.jsonl")
    vocab = QuestionVocab.from_samples(samples)
    assert vocab.keys and all(not k.startswith("report") for k in vocab.keys)
    mc = next(s for s in samples if s["task_type"] == "multiple_choice" and vocab.target(s))
    key, answer = vocab.target(mc)
    assert vocab.classes[key][answer] == mc["answer_content"]  # the option text, not the shuffled letter
    judgment = next(s for s in samples if s["task_type"] == "judgment" and vocab.target(s))
    key, answer = vocab.target(judgment)
    assert vocab.classes[key] == ["No", "Yes"] and vocab.classes[key][answer] == judgment["answer"]
    assert vocab.target(next(s for s in samples if s["task_type"] == "report")) is None
    valid = vocab.valid_mask()
    assert valid.shape == (len(vocab.keys), vocab.max_classes)
    assert valid.sum(1).tolist() == [len(c) for c in vocab.classes]
    by_image = questions_by_image(samples, vocab)
    assert by_image and judgment["image"] in by_image
    assert set(by_image) <= {s["image"] for s in samples}
    assert sum(len(q) for q in by_image.values()) <= sum(1 for s in samples if vocab.target(s))


def test_answer_head_pools_the_roi_and_masks_missing_classes():
    from omnict_core.training.vision_pretrain import VisionPretrainHeads

    valid = torch.tensor([[True, True, False], [True, True, True]])
    heads = VisionPretrainHeads(width=8, n_groups=3, class_valid=valid)
    tokens = torch.randn(5, 8)
    roi = torch.tensor([[True, False, False, False, False], [False] * 5])
    logits = heads.answer_logits(tokens, torch.tensor([0, 1]), roi)
    assert logits.shape == (2, 3)
    assert torch.isinf(logits[0, 2]) and torch.isfinite(logits[1]).all()
    # the ROI mean of key 0 reads only token 0: changing another token changes only the attention part
    with torch.no_grad():
        heads.key_weight[0, :, :8] = 0  # silence the attention half for key 0
    changed = tokens.clone()
    changed[3] += 5.0
    before = heads.answer_logits(tokens, torch.tensor([0]), roi[:1])
    after = heads.answer_logits(changed, torch.tensor([0]), roi[:1])
    assert torch.allclose(before, after)


def test_stage0_trains_only_the_tower_and_writes_a_loadable_omnict(vqa_dir, tmp_path):
    from omnict_core.modeling_omnict import build_model, load_omnict
    from omnict_core.tokenization_omnict import load_tokenizer
    from omnict_core.training.vision_pretrain import VisionPretrainConfig, VisionPretrainer

    cfg = VisionPretrainConfig(data_dir=str(vqa_dir), out_dir=str(tmp_path / "s0"), steps=3, batch_size=4, lr=3e-3,
                               seed=1, progress=False, num_threads=1, config_overrides={"unshuffle_2d": 3})
    trainer = VisionPretrainer(cfg)
    fixed = trainer.images[:4]
    first = float(trainer.batch_loss(fixed)["loss"].detach())
    projector_before = {k: v.clone() for k, v in trainer.model.projector.state_dict().items()}
    tower_before = {k: v.clone() for k, v in trainer.model.vision_tower.state_dict().items()}
    history = trainer.train()
    assert [h["step"] for h in history] == [1, 2, 3]
    assert all(0.0 <= h["patch_acc"] <= 1.0 and 0.0 <= h["answer_acc"] <= 1.0 for h in history)
    for _ in range(6):  # the losses really train the tower + heads: a fixed batch is fitted
        trainer.optimizer.zero_grad()
        trainer.batch_loss(fixed)["loss"].backward()
        trainer.optimizer.step()
    assert float(trainer.batch_loss(fixed)["loss"].detach()) < first

    model, tokenizer = load_omnict(tmp_path / "s0")
    assert model.config.unshuffle_2d == 3
    saved = model.vision_tower.state_dict()
    assert any(not torch.equal(saved[k], tower_before[k]) for k in tower_before)  # the tower moved
    for k, v in model.projector.state_dict().items():  # the projector did not (fresh for stage 1)
        assert torch.equal(v, projector_before[k])
    fresh = build_model("tiny", load_tokenizer(str(vqa_dir / "tokenizer")), unshuffle_2d=3)
    assert model.config.text_config.vocab_size == fresh.config.text_config.vocab_size == len(tokenizer)
    summary = json.loads((tmp_path / "s0" / "training_summary.json").read_text())
    assert summary["stage"] == 0 and summary["steps"] == 3 and summary["question_keys"] == len(trainer.vocab.keys)


def test_cli_stage0_then_stage1_from_it(vqa_dir, tmp_path):
    from click.testing import CliRunner

    from omnict_core.training.cli import train

    runner = CliRunner()
    s0 = runner.invoke(train, ["--stage", "0", "--data", str(vqa_dir), "--out", str(tmp_path / "s0"), "--steps", "2",
                               "--batch-size", "3", "--threads", "1", "--max-samples", "60"])
    assert s0.exit_code == 0, s0.output
    assert "stage 0: vision tower" in s0.output and (tmp_path / "s0" / "model.safetensors").is_file()
    s1 = runner.invoke(train, ["--stage", "1", "--data", str(vqa_dir), "--out", str(tmp_path / "s1"),
                               "--init-from", str(tmp_path / "s0"), "--steps", "1", "--batch-size", "2",
                               "--threads", "1", "--max-samples", "20", "--vision-frozen"])
    assert s1.exit_code == 0, s1.output
    assert (tmp_path / "s1" / "model.safetensors").is_file()
    from safetensors.torch import load_file

    tower0, tower1 = (
        {k: v for k, v in load_file(tmp_path / stage / "model.safetensors").items() if k.startswith("vision_tower.")}
        for stage in ("s0", "s1"))
    assert tower0 and tower0.keys() == tower1.keys()  # stage 1 starts from stage 0's tower and keeps it frozen
    assert all(torch.equal(tower0[k], tower1[k]) for k in tower0)


def test_patch_finding_targets_mark_every_patch_a_finding_touches_in_any_slice():
    from omnict_core.training.vision_pretrain import patch_finding_presence

    maps = torch.zeros(2, 3, 8, 8, dtype=torch.int32)  # 2 units of 3 slices, 2 x 2 patches of 4 px
    maps[0, 0, 1, 1] = 1  # type 0 (one pixel, first slice) in patch (0, 0) of unit 0
    maps[1, 2, 6, 2:6] = 3  # type 2 across patches (1, 0) and (1, 1) of unit 1, last slice
    target = patch_finding_presence(maps, n_types=3, patch=4, grid=2)
    assert target.shape == (2, 2, 2, 3)
    assert target.sum() == 3
    assert target[0, 0, 0, 0] == 1 and target[1, 1, 0, 2] == 1 and target[1, 1, 1, 2] == 1


def test_stage0_finding_head_learns_the_finding_maps_and_needs_them(vqa_dir, tmp_path):
    import shutil

    from omnict_core.training.vision_pretrain import VisionPretrainConfig, VisionPretrainer

    cfg = VisionPretrainConfig(data_dir=str(vqa_dir), out_dir=str(tmp_path / "s0"), steps=2, batch_size=4, lr=3e-3,
                               seed=1, progress=False, num_threads=1, finding_loss_weight=1.0,
                               config_overrides={"unshuffle_2d": 3})
    trainer = VisionPretrainer(cfg)
    with_findings = [image for image in trainer.images
                     if trainer.cache.finding_map(image.dim, image.index).any()][:4]
    assert with_findings
    first = trainer.batch_loss(with_findings)
    assert 0.0 <= first["finding_recall"] <= 1.0 and first["finding_loss"] > 0
    for _ in range(8):  # the finding loss trains the tower + finding head: a fixed batch is fitted
        trainer.optimizer.zero_grad()
        trainer.batch_loss(with_findings)["loss"].backward()
        trainer.optimizer.step()
    assert trainer.batch_loss(with_findings)["finding_loss"] < first["finding_loss"]
    trainer.train()
    summary = json.loads((tmp_path / "s0" / "training_summary.json").read_text())
    assert summary["finding_types"][0] == "lung_nodule" and summary["train_config"]["finding_loss_weight"] == 1.0

    no_maps = tmp_path / "no-maps"  # a data directory built before the maps were written
    shutil.copytree(vqa_dir, no_maps, ignore=shutil.ignore_patterns("*_findings*.npy"))
    with pytest.raises(FileNotFoundError, match="findings2d"):
        VisionPretrainer(VisionPretrainConfig(data_dir=str(no_maps), out_dir=str(tmp_path / "x"), steps=1,
                                              progress=False, finding_loss_weight=1.0))
    assert VisionPretrainer(VisionPretrainConfig(data_dir=str(no_maps), out_dir=str(tmp_path / "y"), steps=1,
                                                 progress=False)).heads.finding_head is None
