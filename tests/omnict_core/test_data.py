"""Phantom VQA data: message format, balanced closed questions, answers that follow the ground truth, disjoint
train/benchmark seeds, dataset tensors and collated batches."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

_BUILT: dict[str, Path] = {}


def build_tiny_vqa(tmp_path_factory) -> Path:
    """5 training + 3 benchmark studies (a few hundred samples); built once per test session, shared by the
    data / training / evaluation test files."""
    if "dir" not in _BUILT:
        from omnict_core.data.build import build_dataset

        out = tmp_path_factory.mktemp("phantom-vqa")
        build_dataset(out, train_studies=5, bench_studies=3, workers=1, vocab_size=512, progress=False)
        _BUILT["dir"] = out
    return _BUILT["dir"]


@pytest.fixture(scope="session")
def tiny_vqa_dir(tmp_path_factory) -> Path:
    return build_tiny_vqa(tmp_path_factory)


def _samples(data_dir: Path, split: str) -> list[dict]:
    from omnict_core.data.dataset import read_jsonl

    return read_jsonl(data_dir / f"{split}.jsonl")


def test_samples_use_the_omnict_message_format(tiny_vqa_dir):
    samples = _samples(tiny_vqa_dir, "train")
    assert len(samples) > 50
    for s in samples:
        turns = s["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"]
        assert turns[0]["value"].startswith("<image>\n") and "<image>" not in turns[1]["value"]
        assert turns[1]["value"] == s["answer"]
        assert s["dim"] in ("2d", "3d") and s["image"].startswith(f"cache://train/{s['dim']}/")
        assert s["task_type"] in ("judgment", "multiple_choice", "short_answer", "report")
        assert s["category"] in ("recognition", "abnormality", "interpretation", "reasoning")
        assert len(s["roi"]) == len(s["roi_label_ids"])
    tasks = Counter(s["task_type"] for s in samples)
    assert set(tasks) == {"judgment", "multiple_choice", "short_answer", "report"}
    assert {s["dim"] for s in samples} == {"2d", "3d"}


def test_closed_questions_are_balanced_per_question_text(tiny_vqa_dir):
    """Every judgment question text has as many Yes as No answers: an image-blind model scores exactly 0.5."""
    for split in ("train", "bench"):
        counts: dict[str, Counter] = defaultdict(Counter)
        for s in _samples(tiny_vqa_dir, split):
            if s["task_type"] == "judgment":
                counts[s["question_key"]][s["answer"]] += 1
        assert counts, split
        for key, c in counts.items():
            assert c["Yes"] == c["No"] > 0, (split, key, c)


def test_multiple_choice_answers_match_their_letter_and_truth(tiny_vqa_dir):
    from omnict_core.data.vqa import LETTERS

    mc = [s for s in _samples(tiny_vqa_dir, "train") if s["task_type"] == "multiple_choice"]
    assert mc
    for s in mc:
        letter, _, content = s["answer"].partition(". ")
        assert s["options"][LETTERS.index(letter)] == content == s["answer_content"]
        assert f"{letter}. {content}" in s["conversations"][0]["value"]


def test_relettered_choices_keep_the_question_and_point_at_the_true_option(tiny_vqa_dir):
    """Training's option reshuffle: a new order per draw, the same stem and option set, the letter following the
    true option; other task types untouched; the source sample never modified."""
    from omnict_core.data.vqa import LETTERS, reletter_choices

    samples = _samples(tiny_vqa_dir, "train")
    mc = [s for s in samples if s["task_type"] == "multiple_choice"]
    rng = np.random.default_rng(0)
    letters_seen: dict[str, set] = defaultdict(set)
    for s in mc:
        before = json.dumps(s, sort_keys=True)
        for _ in range(20):
            new = reletter_choices(s, rng)
            letter, _, content = new["answer"].partition(". ")
            assert content == s["answer_content"] and new["options"][LETTERS.index(letter)] == content
            assert sorted(new["options"]) == sorted(s["options"])
            question = new["conversations"][0]["value"]
            assert question.split("\nA. ")[0] == s["conversations"][0]["value"].split("\nA. ")[0]
            assert all(f"\n{LETTERS[i]}. {o}\n" in question for i, o in enumerate(new["options"]))
            assert new["conversations"][1]["value"] == new["answer"]
            letters_seen[s["id"]].add(letter)
        assert json.dumps(s, sort_keys=True) == before
    assert all(len(seen) > 1 for seen in letters_seen.values())  # 20 draws of >= 2 options: not one fixed letter
    other = next(s for s in samples if s["task_type"] == "judgment")
    assert reletter_choices(other, rng) is other


def test_answers_follow_the_phantom_ground_truth(tiny_vqa_dir):
    """Lobe / side answers are re-derived from the generator's truth for the same seed."""
    from omnict_core.data.build import BuildOptions, study_spec
    from omnict_core.data.vqa import LOBE_TEXT
    from omnict_core.phantom import generate_study

    checked = 0
    for s in _samples(tiny_vqa_dir, "train"):
        if s["question_key"].startswith(("lobe_mc", "side_mc")):
            spec = study_spec(s["study_seed"], BuildOptions())
            truth = generate_study(spec).findings
            names = {LOBE_TEXT.get(f.location, f.location.replace("kidney_", "")) for f in truth
                     if f.type == s["finding_type"]}
            assert s["answer_content"] in names, s
            checked += 1
            if checked >= 2:
                break
    assert checked >= 1


def test_benchmark_seeds_never_appear_in_training(tiny_vqa_dir):
    manifest = json.loads((tiny_vqa_dir / "manifest.json").read_text())
    train_seeds = {s["study_seed"] for s in _samples(tiny_vqa_dir, "train")}
    bench_seeds = {s["study_seed"] for s in _samples(tiny_vqa_dir, "bench")}
    assert train_seeds and bench_seeds and not train_seeds & bench_seeds
    lo, hi = manifest["train"]["seed_range"]
    assert all(not lo <= seed <= hi for seed in bench_seeds)
    assert (tiny_vqa_dir / "tokenizer" / "tokenizer.json").is_file()


def test_report_text_names_every_finding():
    from omnict_core.data.vqa import FindingTruth, report_text

    nodule = FindingTruth(1, "lung_nodule", "lung_upper_lobe_right", 12.0, 10.0, (9, 11), {"kind": "solid"})
    stone = FindingTruth(2, "kidney_stone", "kidney_left", 4.0, 5.0, None, {})
    text = report_text([nodule, stone])
    assert text.startswith("Findings: ") and " Impression: " in text
    assert "12 mm solid nodule in the right upper lobe" in text and "left kidney" in text
    assert "CT at 3 months" in text  # Fleischner for > 8 mm
    assert "No acute abnormality" in report_text([])


def test_dataset_items_and_collated_batch(tiny_vqa_dir):
    from omnict_core.data.dataset import PhantomVQADataset, VQACollator
    from omnict_core.modeling_omnict import build_model
    from omnict_core.tokenization_omnict import IGNORE_INDEX, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_vqa_dir / "tokenizer"))
    config = build_model("tiny", tokenizer).config
    dataset = PhantomVQADataset(tiny_vqa_dir, "train")
    first2d = next(i for i, s in enumerate(dataset.samples) if s["dim"] == "2d" and s["roi"])
    first3d = next(i for i, s in enumerate(dataset.samples) if s["dim"] == "3d")
    item2d, item3d = dataset[first2d], dataset[first3d]
    size = config.image_size
    assert item2d["pixel_units"].shape == (1, 3, size, size)
    assert item3d["pixel_units"].shape == (config.num_units(), 3, size, size)
    assert -1.0 <= float(item2d["pixel_units"].min()) and float(item2d["pixel_units"].max()) <= 1.0
    assert bool(item2d["organ_mask"].any())  # the ROI organ is on the slice
    batch = VQACollator(tokenizer, config)([item2d, item3d])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["unit_kind"] == ["2d", "3d"]
    answer_ids = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX]
    decoded = tokenizer.decode(answer_ids, skip_special_tokens=True)
    assert decoded.strip() == dataset.samples[first2d]["answer"]
    prompt = VQACollator(tokenizer, config, with_answers=False)([item2d, item3d])
    assert "labels" not in prompt and bool((prompt["attention_mask"][:, -1] == 1).all())  # left padded


def test_missing_cache_is_a_clear_error(tmp_path):
    from omnict_core.data.dataset import ImageCache

    with pytest.raises(FileNotFoundError, match="train_images2d.npy"):
        ImageCache(tmp_path, "train")


def test_noise_free_units_compose_like_the_preprocessing():
    """to_units uses the model engineer's VSC: 12 slices -> 4 units of 3 consecutive slices."""
    from omnict_core.data.dataset import to_units

    volume = np.linspace(0, 1, 12 * 8 * 8, dtype=np.float32).reshape(12, 8, 8)
    labels = np.zeros((12, 8, 8), np.uint8)
    labels[4, 2, 2] = 7
    units, mask = to_units(volume, labels, "3d", [7])
    assert units.shape == (4, 3, 8, 8)
    assert torch.allclose(units[1, 0], torch.from_numpy(volume[3]) * 2 - 1)
    assert bool(mask[1, 2, 2]) and int(mask.sum()) == 1


def test_finding_type_map_keeps_small_findings_and_paints_them_over_large_ones():
    """Max pooling onto the coarser model grid: a 2-voxel nodule survives, and inside a consolidation it wins."""
    from omnict_core.data.build import finding_type_map
    from omnict_core.data.vqa import FINDING_TYPES

    mask = np.zeros((128, 128), dtype=np.uint8)
    mask[40:90, 30:80] = 2  # consolidation (finding index 2)
    mask[60, 50:52] = 1  # a 2-pixel nodule inside it (finding index 1)
    mask[10, 100] = 3  # a 1-pixel kidney stone on its own
    fmap = finding_type_map(mask, {1: "lung_nodule", 2: "consolidation", 3: "kidney_stone"}, (96, 96))
    nodule, consolidation, stone = (1 + FINDING_TYPES.index(t) for t in ("lung_nodule", "consolidation",
                                                                         "kidney_stone"))
    assert fmap.shape == (96, 96) and fmap.dtype == np.uint8
    assert 1 <= (fmap == nodule).sum() <= 4  # nearest-neighbour resampling could drop it; max pooling keeps it
    assert (fmap == stone).sum() >= 1
    assert (fmap == consolidation).sum() == pytest.approx(50 * 50 * (96 / 128) ** 2, rel=0.1)
    assert set(np.unique(fmap)) == {0, nodule, consolidation, stone}
    volume = np.zeros((64, 128, 128), dtype=np.uint8)
    volume[30, 60, 50] = 1
    # adaptive pooling windows overlap where the ratio is not whole: a voxel may mark two neighbouring cells
    assert 1 <= (finding_type_map(volume, {1: "lung_nodule"}, (12, 96, 96)) == nodule).sum() <= 4


def test_finding_maps_are_cached_beside_the_images_and_hold_the_findings_asked_about(tiny_vqa_dir):
    from omnict_core.data.dataset import ImageCache, parse_image_ref
    from omnict_core.data.vqa import FINDING_TYPES

    checked = 0
    for split in ("train", "bench"):
        cache = ImageCache(tiny_vqa_dir, split)
        assert cache.has_finding_maps
        assert cache.arrays["findings2d"].shape == cache.arrays["images2d"].shape
        assert cache.arrays["findings3d"].shape == cache.arrays["volumes3d"].shape
        for s in _samples(tiny_vqa_dir, split):
            if s["question_key"].startswith("presence|") and s["finding_type"] in FINDING_TYPES:
                _, dim, index = parse_image_ref(s["image"])
                shown = 1 + FINDING_TYPES.index(s["finding_type"]) in cache.finding_map(dim, index)
                if s["answer"] == "Yes":  # a finding the question says is shown is in the map
                    assert shown, s["id"]
                    checked += 1
    assert checked >= 3
