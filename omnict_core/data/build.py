"""Build a phantom VQA data directory: render studies, cache images at the model resolution, write the VQA
samples (train / held-out bench) and train the tokenizer on the training QA corpus.

    python -m omnict_core.data.build --out .cache/phantom-vqa --train-studies 2000 --bench-studies 150

Seeds: training studies use ``train_seed_base + i``, benchmark studies ``bench_seed_base + i``; the two ranges
never overlap (checked), so no benchmark patient is ever seen in training.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from omnict_core.data.dataset import image_ref, write_jsonl
from omnict_core.data.vqa import (FINDING_TYPES, LOBES, VOLUME_MIN_SIZE_MM, FindingTruth, ImageTruth, balance,
                                  image_intents, report_intent, to_sample)

TRAIN_SEED_BASE = 100_000
BENCH_SEED_BASE = 9_000_000
RENDER_SLICES, RENDER_SIZE = 64, 128  # 5 mm slices, ~3 mm pixels: cheap (~0.3 s) and finer than the model grid
ROUND_TYPES = ("lung_nodule", "liver_lesion", "kidney_stone")
SIZE_RANGES = {  # one range per size bucket, drawn uniformly so every bucket is equally common
    "lung_nodule": ((5.0, 10.0), (10.0, 20.0), (20.0, 30.0)),
    "liver_lesion": ((5.0, 10.0), (10.0, 20.0), (20.0, 60.0)),
    "kidney_stone": ((3.0, 5.0), (5.0, 10.0), (10.0, 15.0)),
}


@dataclass
class BuildOptions:
    depth: int = 12  # model volume depth (tiny preset)
    size: int = 96  # model image size (tiny preset)
    render_slices: int = RENDER_SLICES
    render_size: int = RENDER_SIZE
    random_slices: int = 3  # extra 2D slices per study (negatives, recognition)


# ------------------------------------------------------------------------------------------------ study specs
def finding_specs(rng: np.random.Generator) -> list:
    """0-3 findings, types uniform, sizes uniform over the size buckets, one pleural finding per side."""
    from omnict_core.phantom import FindingSpec

    n = int(rng.choice([0, 1, 1, 2, 2, 3]))
    chosen, used_sides, used = [], set(), Counter()
    for _ in range(n * 3):
        if len(chosen) == n:
            break
        ftype = str(FINDING_TYPES[int(rng.integers(len(FINDING_TYPES)))])
        params: dict = {}
        if ftype == "splenomegaly" and used[ftype]:
            continue
        if ftype in ("pleural_effusion", "pneumothorax"):
            side = str(rng.choice(["left", "right"]))
            if side in used_sides:
                continue
            used_sides.add(side)
            params.update(side=side, amount=str(rng.choice(["small", "moderate", "large"])))
        if ftype in ("lung_nodule", "consolidation"):
            params["lobe"] = str(LOBES[int(rng.integers(len(LOBES)))])
        if ftype == "lung_nodule":
            params["kind"] = "solid"
        if ftype == "kidney_stone":
            params["side"] = str(rng.choice(["left", "right"]))
        if ftype in SIZE_RANGES:
            lo, hi = SIZE_RANGES[ftype][int(rng.integers(3))]
            params["size_mm"] = round(float(math.exp(rng.uniform(math.log(lo), math.log(hi)))), 1)
        used[ftype] += 1
        chosen.append(FindingSpec(ftype, params))
    return chosen


def study_spec(seed: int, options: BuildOptions):
    from omnict_core.phantom import PhantomSpec

    rng = np.random.default_rng([seed, 77])
    return PhantomSpec(seed=seed, slices=options.render_slices, size=options.render_size,
                       findings=finding_specs(rng))


# ---------------------------------------------------------------------------------------------- render a study
def finding_type_map(finding_mask: np.ndarray, type_of: dict[int, str], shape: tuple[int, ...]) -> np.ndarray:
    """Finding mask on the render grid (values: finding index, 0 none) -> finding-type map at the model grid
    ``shape`` (uint8: 0 none, else ``1 + FINDING_TYPES.index(type)``).

    A model pixel takes a finding's type when any render voxel under it belongs to the finding (max pooling, not
    the nearest-neighbour resampling of organ labels): a 5 mm nodule covers 2 render pixels and must not vanish on
    the coarser model grid. Where two findings overlap, the smaller one wins, so a nodule inside a consolidation
    stays visible in the map. Stage 0 reads these maps as dense targets (``vision_pretrain``).
    """
    import torch
    import torch.nn.functional as F

    mask = torch.from_numpy(np.ascontiguousarray(finding_mask))
    out = torch.zeros(shape, dtype=torch.uint8)
    pool = F.adaptive_max_pool2d if len(shape) == 2 else F.adaptive_max_pool3d
    by_type: dict[str, list[int]] = {}
    for index, ftype in type_of.items():
        by_type.setdefault(ftype, []).append(index)
    covered = {t: torch.isin(mask, torch.tensor(ids, dtype=mask.dtype)) for t, ids in by_type.items()}
    for ftype in sorted(covered, key=lambda t: -int(covered[t].sum())):  # largest first: smaller ones paint over
        hit = pool(covered[ftype].float()[None, None], shape)[0, 0] > 0
        out[hit] = 1 + FINDING_TYPES.index(ftype)
    return out.numpy()


def _z_range(mask: np.ndarray) -> tuple[int, int] | None:
    z = np.nonzero(mask.any(axis=(1, 2)))[0]
    return (int(z.min()), int(z.max())) if len(z) else None


def render_study(seed: int, options: BuildOptions) -> dict:
    """Render one study; return its cached arrays + image truths (picklable, for worker processes)."""
    import torch

    from omnict_core.phantom import LABELS, generate_study
    from omnict_core.preprocessing import prepare_slice, resample_labels, resample_volume, window_hu

    spec = study_spec(seed, options)
    study = generate_study(spec)
    dz = study.spacing[0]
    truths = [FindingTruth(index=f.index, type=f.type, location=f.location, size_mm=float(f.size_mm),
                           center_z=float(f.center_voxel[0]), z_range=_z_range(study.finding_mask == f.index),
                           params=dict(f.params))
              for f in study.findings if f.note not in ("no room in the lobe", "no room in the liver")
              and f.center_xyz_anat != (0.0, 0.0, 0.0)]
    # --- 3D: exactly the inference preprocessing (window, area-averaged resampling)
    grid = (options.depth, options.size, options.size)
    volume = resample_volume(window_hu(study.hu), grid).numpy().astype(np.float16)
    labels3d = resample_labels(study.labels, grid).numpy().astype(np.uint8)
    organ_vox = {LABELS[i]: int(c) for i, c in enumerate(np.bincount(labels3d.ravel(), minlength=256)) if i and c}
    in3d, unsure3d = [], []
    for f in truths:
        big_enough = f.size_mm >= VOLUME_MIN_SIZE_MM.get(f.type, 0.0)
        shown = f.type in ROUND_TYPES or f.z_range is not None
        (in3d if big_enough and shown else unsure3d).append(f)
    type_of = {f.index: f.type for f in study.findings if f.type in FINDING_TYPES}
    findings3d = finding_type_map(study.finding_mask, type_of, grid)
    images3d = [(volume, labels3d, findings3d, ImageTruth("3d", "", organ_vox, in3d, unsure3d, truths))]
    # --- 2D: slices through each finding + random slices, through the 2D preprocessing
    rng = np.random.default_rng([seed, 78])
    z_list = [int(np.clip(round(f.center_z), 0, study.hu.shape[0] - 1)) for f in truths]
    z_list += [int(z) for z in rng.integers(0, study.hu.shape[0], size=options.random_slices)]
    images2d = []
    for z in dict.fromkeys(z_list):  # unique, in order
        prepared = prepare_slice(study.hu[z], size=options.size, labels=study.labels[z])
        x01 = (prepared.pixel_units[0, 0] * 0.5 + 0.5).numpy().astype(np.float16)
        lab = prepared.label_units[0, 0].numpy().astype(np.uint8)
        fmask = resample_labels(study.finding_mask[z], (options.size, options.size)).numpy()
        organ_px = {LABELS[i]: int(c) for i, c in enumerate(np.bincount(lab.ravel(), minlength=256)) if i and c}
        shown, unsure = [], []
        for f in truths:
            if f.type in ROUND_TYPES:
                dist_mm = abs(z - f.center_z) * dz
                if dist_mm <= max(dz / 2, 0.4 * f.size_mm / 2):
                    shown.append(f)
                elif dist_mm < f.size_mm / 2 + dz:
                    unsure.append(f)
            elif f.type == "splenomegaly":
                px = organ_px.get("spleen", 0)
                (shown if px >= 40 else unsure if px > 0 else []).append(f)
            else:
                px = int((fmask == f.index).sum())
                (shown if px >= 15 else unsure if px > 0 else []).append(f)
        fmap = finding_type_map(study.finding_mask[z], type_of, (options.size, options.size))
        images2d.append((x01, lab, fmap, ImageTruth("2d", "", organ_px, shown, unsure, truths)))
    del torch
    return {"seed": seed, "images2d": images2d, "images3d": images3d,
            "findings": [(f.type, f.location, round(f.size_mm, 1), f.bucket) for f in truths]}


# ------------------------------------------------------------------------------------------------ split builder
def build_split(split: str, seeds: list[int], out: Path, options: BuildOptions, workers: int,
                cap_per_answer: int | None, progress: bool = True) -> dict:
    from tqdm import tqdm

    from omnict_core.phantom import LABEL_IDS

    images2d, labels2d, volumes3d, labels3d, findings2d, findings3d = [], [], [], [], [], []
    intents = []
    finding_counts: Counter = Counter()
    started = time.perf_counter()

    def consume(result: dict) -> None:
        rng = np.random.default_rng([result["seed"], 79])
        for x01, lab, fmap, truth in result["images2d"]:
            truth.ref = image_ref(split, "2d", len(images2d))
            images2d.append(x01)
            labels2d.append(lab)
            findings2d.append(fmap)
            intents.extend((result["seed"], i) for i in image_intents(truth, rng))
        for vol, lab, fmap, truth in result["images3d"]:
            truth.ref = image_ref(split, "3d", len(volumes3d))
            volumes3d.append(vol)
            labels3d.append(lab)
            findings3d.append(fmap)
            intents.extend((result["seed"], i) for i in image_intents(truth, rng))
            intents.append((result["seed"], report_intent(truth, rng)))
        finding_counts.update(f[0] for f in result["findings"])

    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for result in tqdm(pool.map(render_study, seeds, [options] * len(seeds), chunksize=4),
                               total=len(seeds), desc=f"render {split}", disable=not progress):
                consume(result)
    else:
        for seed in tqdm(seeds, desc=f"render {split}", disable=not progress):
            consume(render_study(seed, options))
    render_s = time.perf_counter() - started

    rng = np.random.default_rng([seeds[0], 80])
    seed_of = {id(intent): seed for seed, intent in intents}
    kept = balance([intent for _, intent in intents], rng, cap_per_answer)
    kept.sort(key=lambda i: (seed_of[id(i)], i.image.ref, i.key))
    samples = [to_sample(intent, f"{split}-{n:06d}", rng, LABEL_IDS, seed_of[id(intent)])
               for n, intent in enumerate(kept)]
    if split == "train":  # interleave tasks: a seeded shuffle of the sample order (the trainer permutes anyway)
        samples = [samples[i] for i in rng.permutation(len(samples))]
    np.save(out / f"{split}_images2d.npy", np.stack(images2d).astype(np.float16))
    np.save(out / f"{split}_labels2d.npy", np.stack(labels2d).astype(np.uint8))
    np.save(out / f"{split}_volumes3d.npy", np.stack(volumes3d).astype(np.float16))
    np.save(out / f"{split}_labels3d.npy", np.stack(labels3d).astype(np.uint8))
    np.save(out / f"{split}_findings2d.npy", np.stack(findings2d))
    np.save(out / f"{split}_findings3d.npy", np.stack(findings3d))
    write_jsonl(out / f"{split}.jsonl", samples)
    return {
        "studies": len(seeds), "seed_range": [min(seeds), max(seeds)], "images2d": len(images2d),
        "volumes3d": len(volumes3d), "samples": len(samples), "render_seconds": round(render_s, 1),
        "findings": dict(finding_counts),
        "by_task": dict(Counter(s["task_type"] for s in samples)),
        "by_category": dict(Counter(s["category"] for s in samples)),
        "by_dim": dict(Counter(s["dim"] for s in samples)),
        "by_finding": dict(Counter(s["finding_type"] for s in samples)),
        "by_finding_size": dict(Counter(f"{s['finding_type']}|{s['size_bucket']}" for s in samples)),
        "judgment_yes_fraction": _yes_fraction(samples),
    }


def _yes_fraction(samples: list[dict]) -> float | None:
    judged = [s for s in samples if s["task_type"] == "judgment"]
    return round(sum(s["answer"].startswith("Yes") for s in judged) / len(judged), 4) if judged else None


def train_corpus_tokenizer(out: Path, vocab_size: int) -> int:
    """Byte-level BPE trained on the training QA text (model engineer's ``train_tokenizer``)."""
    from omnict_core.data.dataset import read_jsonl
    from omnict_core.tokenization_omnict import train_tokenizer

    texts = [turn["value"].replace("<image>\n", "") for s in read_jsonl(out / "train.jsonl")
             for turn in s["conversations"]]
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    tokenizer.save_pretrained(str(out / "tokenizer"))
    return len(tokenizer)


def build_dataset(out: Path, train_studies: int, bench_studies: int, workers: int = 1,
                  options: BuildOptions | None = None, train_seed_base: int = TRAIN_SEED_BASE,
                  bench_seed_base: int = BENCH_SEED_BASE, bench_cap: int | None = 12, vocab_size: int = 2048,
                  progress: bool = True) -> dict:
    options = options or BuildOptions()
    out.mkdir(parents=True, exist_ok=True)
    train_seeds = list(range(train_seed_base, train_seed_base + train_studies))
    bench_seeds = list(range(bench_seed_base, bench_seed_base + bench_studies))
    if set(train_seeds) & set(bench_seeds):
        raise ValueError("train and bench seed ranges overlap")
    manifest = {"generator": "omnict_core.data.build", "options": options.__dict__,
                "finding_types": list(FINDING_TYPES),
                "train": build_split("train", train_seeds, out, options, workers, None, progress),
                "bench": build_split("bench", bench_seeds, out, options, workers, bench_cap, progress)}
    manifest["tokenizer_vocab"] = train_corpus_tokenizer(out, vocab_size)
    from omnict_core.phantom import LABELS

    manifest["label_names"] = {str(k): v for k, v in LABELS.items()}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def cap_samples(samples: list[dict], cap: int, seed: int = 0) -> list[dict]:
    """Keep at most ``cap`` samples per (question key, answer content), equal counts per answer within a key
    (the balancing rule of ``vqa.balance``); open-ended samples are capped per key. Order preserved."""
    rng = np.random.default_rng(seed)
    groups: dict[str, dict[str, list[int]]] = {}
    for n, s in enumerate(samples):
        groups.setdefault(s["question_key"], {}).setdefault(
            s["answer_content"] if s["task_type"] in ("judgment", "multiple_choice") else "open", []).append(n)
    keep: set[int] = set()
    for key in sorted(groups):
        answers = groups[key]
        if "open" in answers:
            items = answers["open"]
            keep.update(items[i] for i in rng.choice(len(items), size=min(cap, len(items)), replace=False))
            continue
        n = min(cap, min(len(v) for v in answers.values()))
        for answer in sorted(answers):
            items = answers[answer]
            keep.update(items[i] for i in rng.choice(len(items), size=n, replace=False))
    return [s for n, s in enumerate(samples) if n in keep]


def recap_benchmark(out: Path, cap: int, seed: int = 0) -> int:
    """Rewrite ``bench.jsonl`` of an existing data directory with ``cap_samples`` (images untouched)."""
    from omnict_core.data.dataset import read_jsonl

    samples = cap_samples(read_jsonl(out / "bench.jsonl"), cap, seed)
    write_jsonl(out / "bench.jsonl", samples)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["bench"]["recap"] = {"cap": cap, "seed": seed, "samples": len(samples),
                                  "by_finding_size": dict(Counter(f"{s['finding_type']}|{s['size_bucket']}"
                                                                  for s in samples)),
                                  "by_task": dict(Counter(s["task_type"] for s in samples)),
                                  "judgment_yes_fraction": _yes_fraction(samples)}
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return len(samples)


@click.command("build-data")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True)
@click.option("--train-studies", type=int, default=2000, show_default=True)
@click.option("--bench-studies", type=int, default=150, show_default=True)
@click.option("--workers", type=int, default=1, show_default=True)
@click.option("--bench-cap", type=int, default=12, show_default=True,
              help="max samples per (question key, answer) in the benchmark (stratification)")
@click.option("--vocab-size", type=int, default=2048, show_default=True)
@click.option("--recap-bench", type=int, default=None,
              help="only re-cap bench.jsonl of an existing --out to N samples per (question, answer)")
def main(out: Path, train_studies: int, bench_studies: int, workers: int, bench_cap: int, vocab_size: int,
         recap_bench: int | None) -> None:
    """Render phantom studies and write the VQA data directory."""
    if recap_bench:
        click.echo(f"bench: {recap_benchmark(out, recap_bench)} samples after capping at {recap_bench}")
        return
    manifest = build_dataset(out, train_studies, bench_studies, workers, bench_cap=bench_cap, vocab_size=vocab_size)
    for split in ("train", "bench"):
        m = manifest[split]
        click.echo(f"{split}: {m['studies']} studies, {m['samples']} samples, {m['images2d']} slices, "
                   f"{m['volumes3d']} volumes, yes={m['judgment_yes_fraction']}, {m['render_seconds']} s")


if __name__ == "__main__":
    main()
