"""Probe of a checkpoint's vision tower: how many benchmark questions can its frozen features answer?

    python -m omnict_core.evaluation.tower_probe --model checkpoints/omnict-tiny-phantom --data .cache/phantom-vqa \\
        --out artifacts/probe.json

Why: the demo checkpoint answers about 0.69 of its own training questions and 0.60 of held-out ones. Is the limit in
what the vision tower sees, or in how the projector / OSE / LLM read it? The probe freezes the checkpoint's tower,
trains only the stage-0 answer head on it (``VisionPretrainHeads.answer_logits``: a learned per-question attention
query over the tower's tokens, concatenated with the mean of the tokens under the question's ROI, the mask OSE
gets, then a per-question linear classifier) on the TRAINING split, and scores the benchmark's closed questions
with that head, in the tables of ``omnict-node eval``.

Reading it: the head sees what the LLM sees of the image (the tower tokens and the question's organ ROI), through
a far shorter path. Its held-out accuracy is what the tower's features support; the gap from there down to the
checkpoint's own score lies after the tower. ``--read-at projector`` probes the MHP's tokens instead (after TPE and
the m x m unshuffle, exactly what is spliced into the LLM; a token is in the ROI when any of its m x m patches is),
which splits that gap into the projector's part and the LLM's part.

Answers: judgment -> "Yes" / "No"; multiple choice -> the head chooses among the question's options (by their
text, as the LLM reads them) and answers "<letter>. <option>". A benchmark question whose key has no closed answer
set in training cannot be scored and is counted in ``unscored``.

Shapes: L = tokens of one image (N_u units x h x w), d_v = tower width, Q = questions of one image, C = the most
answer classes of any question key.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

# before torch loads OpenMP (see omnict_core/evaluation/cli.py)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click
import numpy as np
import torch
import torch.nn.functional as F

from omnict_core.evaluation.metrics import CLOSED_TASKS, score_predictions, summarize
from omnict_core.training.vision_pretrain import (
    CLASS_TASKS,
    ORGAN_GROUPS,
    QuestionVocab,
    VisionPretrainHeads,
    answer_class,
    image_units,
    roi_token_mask,
)


@dataclass
class ProbeConfig:
    model_dir: str
    data_dir: str
    split: str = "bench"
    epochs: int = 30
    batch_images: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    seed: int = 0
    bf16: bool = True
    num_threads: int | None = None
    max_train_samples: int | None = None  # only the first N training samples (tests)
    limit: int | None = None  # only the first N benchmark samples
    read_at: str = "tower"  # "tower": the tower's patch tokens; "projector": the MHP's tokens (after TPE + unshuffle)


@dataclass
class ProbeImage:
    """One image's tokens at the read point (frozen model) and the closed questions asked of it."""

    tokens: torch.Tensor  # (L, d) float16: tower tokens (d = d_v) or projector tokens (d = d_h)
    keys: torch.Tensor  # (Q,) long: question-key index
    answers: torch.Tensor  # (Q,) long: answer-class index, -1 when training never saw this answer
    roi: torch.Tensor  # (Q, L) bool: tokens under the question's ROI
    allowed: torch.Tensor  # (Q, C) bool: the classes the question may be answered with


def allowed_classes(vocab: QuestionVocab, key: int, sample: dict) -> torch.Tensor:
    """(C,) bool: the key's classes, and for multiple choice only those that are options of this question."""
    names = vocab.classes[key]
    options = set(sample.get("options") or names)
    return torch.tensor([name in options for name in names] + [False] * (vocab.max_classes - len(names)))


READ_POINTS = ("tower", "projector")


@torch.no_grad()
def image_tokens(model, units: torch.Tensor, dim: str, read_at: str, bf16: bool) -> torch.Tensor:
    """Units (N_u, 3, S, S) -> the image's tokens at ``read_at``: the tower's patch tokens (N_u * h * w, d_v), or
    the projector's global tokens (N_u * h/m * w/m, d_h) as the LLM receives them; float16."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        features = model._vision_features(units)  # (N_u, h, w, d_v)
        if read_at == "projector":
            features = model._project(features, dim)  # (N_u, h/m, w/m, d_h)
    return features.reshape(-1, features.shape[-1]).to(torch.float16)


def roi_mask_at(model, lab_units: torch.Tensor, roi_ids, dim: str, read_at: str) -> torch.Tensor:
    """The tokens (at ``read_at``) touched by the ROI, (L,) bool; a projector token covers m x m patches."""
    config = model.config
    mask = roi_token_mask(lab_units, roi_ids, config.patch_size, config.patch_grid)  # (N_u * h * w,)
    m = config.unshuffle(dim) if read_at == "projector" else 1
    if m == 1:
        return mask
    grid = mask.view(-1, 1, config.patch_grid, config.patch_grid).float()
    return F.max_pool2d(grid, m).flatten() > 0  # (N_u * h/m * w/m,)


def encode_questions(model, cache, samples: Sequence[dict], vocab: QuestionVocab, read_at: str, bf16: bool
                     ) -> tuple[list[ProbeImage], list[tuple[int, int] | None]]:
    """Run the tower (and the projector) once per image of ``samples``; returns the images and, per sample,
    (image position, question row) or None when the sample's key has no closed answer set in ``vocab``."""
    from omnict_core.data.dataset import parse_image_ref

    by_image: dict[str, list[int]] = {}
    slots: list[tuple[int, int] | None] = [None] * len(samples)
    for i, sample in enumerate(samples):
        if sample["task_type"] in CLASS_TASKS and vocab.key_index(sample["question_key"]) is not None:
            by_image.setdefault(sample["image"], []).append(i)
    images: list[ProbeImage] = []
    for ref, members in by_image.items():
        _, dim, index = parse_image_ref(ref)
        units, lab_units = image_units(cache, dim, index)
        keys, answers, rois, allowed = [], [], [], []
        for row, i in enumerate(members):
            sample = samples[i]
            key = vocab.key_index(sample["question_key"])
            names = vocab.classes[key]
            keys.append(key)
            answer = answer_class(sample)
            answers.append(names.index(answer) if answer in names else -1)
            rois.append(roi_mask_at(model, lab_units, sample.get("roi_label_ids") or (), dim, read_at))
            allowed.append(allowed_classes(vocab, key, sample))
            slots[i] = (len(images), row)
        images.append(ProbeImage(image_tokens(model, units, dim, read_at, bf16), torch.tensor(keys),
                                 torch.tensor(answers), torch.stack(rois), torch.stack(allowed)))
    return images, slots


def head_logits(heads: VisionPretrainHeads, image: ProbeImage) -> torch.Tensor:
    """(Q, C) logits of the image's questions; classes a question may not take are -inf."""
    logits = heads.answer_logits(image.tokens.float(), image.keys, image.roi)
    return logits.masked_fill(~image.allowed, float("-inf"))


def train_head(heads: VisionPretrainHeads, images: list[ProbeImage], cfg: ProbeConfig) -> list[dict]:
    """AdamW + warmup-cosine on the answer head only; one row (loss, training accuracy) per epoch."""
    from omnict_core.training.schedule import make_scheduler

    params = [heads.norm.weight, heads.norm.bias, heads.key_query, heads.key_weight, heads.key_bias]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = -(-len(images) // cfg.batch_images)
    scheduler = make_scheduler(optimizer, cfg.epochs * steps_per_epoch, 0.03)
    rng = np.random.default_rng(cfg.seed)
    history = []
    for epoch in range(cfg.epochs):
        order = rng.permutation(len(images))
        total_loss, correct, total = 0.0, 0, 0
        for start in range(0, len(order), cfg.batch_images):
            batch = [images[i] for i in order[start:start + cfg.batch_images]]
            losses = []
            for image in batch:
                logits = head_logits(heads, image)  # (Q, C)
                losses.append(F.cross_entropy(logits, image.answers, reduction="sum"))
                correct += int((logits.argmax(-1) == image.answers).sum())
                total += len(image.answers)
            loss = torch.stack(losses).sum() / sum(len(image.answers) for image in batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += float(loss.detach()) * len(batch)
        history.append({"epoch": epoch + 1, "loss": total_loss / len(images), "train_acc": correct / max(1, total)})
    return history


@torch.no_grad()
def predict(heads: VisionPretrainHeads, images: list[ProbeImage], samples: Sequence[dict],
            slots: Sequence[tuple[int, int] | None], vocab: QuestionVocab) -> list[str | None]:
    """Per sample, the head's answer in the benchmark's answer format, or None when it cannot be scored."""
    chosen = [head_logits(heads, image).argmax(-1).tolist() for image in images]
    predictions: list[str | None] = []
    for sample, slot in zip(samples, slots):
        if slot is None:
            predictions.append(None)
            continue
        image, row = slot
        name = vocab.classes[int(images[image].keys[row])][chosen[image][row]]
        if sample["task_type"] == "multiple_choice":
            name = f"{'ABCDEF'[sample['options'].index(name)]}. {name}"
        predictions.append(name)
    return predictions


def run_probe(cfg: ProbeConfig) -> dict:
    """Train the answer head on the frozen tower (training split) and score ``cfg.split``'s closed questions.
    Returns a dict shaped like ``omnict_core.evaluation.runner.evaluate``'s (one condition, ``normal``)."""
    from omnict_core.data.dataset import ImageCache, read_jsonl
    from omnict_core.modeling_omnict import load_omnict

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    data_dir = Path(cfg.data_dir)
    model, _ = load_omnict(cfg.model_dir)
    model.eval()
    train = read_jsonl(data_dir / "train.jsonl")[:cfg.max_train_samples]
    vocab = QuestionVocab.from_samples(train)
    started = time.perf_counter()
    train_images, _ = encode_questions(model, ImageCache(data_dir, "train"), train, vocab, cfg.read_at, cfg.bf16)
    bench = [s for s in read_jsonl(data_dir / f"{cfg.split}.jsonl")[:cfg.limit] if s["task_type"] in CLOSED_TASKS]
    bench_images, slots = encode_questions(model, ImageCache(data_dir, cfg.split), bench, vocab, cfg.read_at,
                                          cfg.bf16)
    encode_s = time.perf_counter() - started
    heads = VisionPretrainHeads(int(train_images[0].tokens.shape[-1]), len(ORGAN_GROUPS), vocab.valid_mask())
    started = time.perf_counter()
    history = train_head(heads, train_images, cfg)
    train_s = time.perf_counter() - started
    predictions = predict(heads, bench_images, bench, slots, vocab)
    scored = [(s, p) for s, p in zip(bench, predictions) if p is not None]
    summary = summarize(score_predictions([s for s, _ in scored], [p for _, p in scored]))
    return {
        "model": str(cfg.model_dir), "use_ose": model.config.use_ose, "data": str(cfg.data_dir), "split": cfg.split,
        "samples": len(scored), "unscored": len(bench) - len(scored), "probe_config": asdict(cfg),
        "train_images": len(train_images), "question_keys": len(vocab.keys),
        "encode_seconds": round(encode_s, 1), "train_seconds": round(train_s, 1), "history": history,
        "conditions": {"normal": summary},
        "predictions": [{"id": s["id"], "prediction": p} for s, p in scored],
    }


@click.command()
@click.option("--model", "model_dir", type=click.Path(file_okay=False, exists=True), required=True)
@click.option("--data", "data_dir", type=click.Path(file_okay=False, exists=True), required=True)
@click.option("--split", default="bench", show_default=True)
@click.option("--epochs", type=int, default=30, show_default=True)
@click.option("--lr", type=float, default=3e-3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=None)
@click.option("--read-at", type=click.Choice(READ_POINTS), default="tower", show_default=True,
              help="tower: the vision tower's patch tokens; projector: the MHP's tokens, as the LLM receives them")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(model_dir: str, data_dir: str, split: str, epochs: int, lr: float, seed: int, threads: int | None,
         read_at: str, out_path: Path | None) -> None:
    """Train a small answer head on a checkpoint's frozen vision tower and score the benchmark with it."""
    from omnict_core.evaluation.cli import render_report

    results = run_probe(ProbeConfig(model_dir=model_dir, data_dir=data_dir, split=split, epochs=epochs, lr=lr,
                                    seed=seed, num_threads=threads, read_at=read_at))
    report = render_report(results)
    last = results["history"][-1]
    click.echo(f"probe at the {read_at}: {results['train_images']} training images, "
               f"{results['question_keys']} question keys, last epoch training accuracy {last['train_acc']:.3f}; "
               f"{results['unscored']} benchmark questions unscored")
    click.echo(report)
    if out_path:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps({**results, "report": report}, indent=2))
        click.echo(f"results -> {out_path}")


if __name__ == "__main__":
    main()
