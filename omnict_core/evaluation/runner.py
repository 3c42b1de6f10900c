"""Run a trained OmniCT on the held-out phantom benchmark: greedy answers, scores, and the paper's Table 14
stress test (images swapped between questions / replaced by noise)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from omnict_core.data.dataset import IGNORE_INDEX, PhantomVQADataset, VQACollator
from omnict_core.data.vqa import answer_candidates
from omnict_core.evaluation.metrics import CLOSED_TASKS, OpenAnswerScorer, score_predictions, summarize

MAX_NEW_TOKENS = {"judgment": 4, "multiple_choice": 12, "short_answer": 12, "report": 120}
CONDITIONS = ("normal", "mismatch", "noise")
CLOSED_ANSWERING = ("generate", "rank")  # closed questions: free greedy answer, or the likeliest allowed answer


def _batches(indices: Sequence[int], size: int) -> list[list[int]]:
    return [list(indices[i:i + size]) for i in range(0, len(indices), size)]


@torch.no_grad()
def generate_answers(model, tokenizer, dataset: PhantomVQADataset, indices: Sequence[int], batch_size: int = 16,
                     bf16: bool = True, progress: bool = True) -> dict[int, str]:
    """Greedy answers for ``dataset[indices]``, batched by task (one max_new_tokens per batch), left padded."""
    from tqdm import tqdm

    collator = VQACollator(tokenizer, model.config, with_answers=False)
    by_task: dict[str, list[int]] = {}
    for i in indices:
        by_task.setdefault(dataset.samples[i]["task_type"], []).append(i)
    jobs = [(task, batch) for task, items in by_task.items() for batch in _batches(items, batch_size)]
    answers: dict[int, str] = {}
    for task, batch in tqdm(jobs, desc="generate", disable=not progress):
        inputs = collator([dataset[i] for i in batch])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            new_tokens = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS.get(task, 32))
        for i, row in zip(batch, new_tokens):
            answers[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return answers


@torch.no_grad()
def answer_log_likelihoods(model, batch: dict, bf16: bool = True) -> torch.Tensor:
    """log P(answer tokens + <|im_end|> | prompt) of every row of a training-style batch (``VQACollator`` with
    answers): one teacher-forced forward, the log-probabilities of the labelled tokens summed per row. (B,)"""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(**inputs).logits  # (B, T, V)
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # position t predicts token t + 1
    targets = labels[:, 1:]
    labelled = targets != IGNORE_INDEX
    picked = log_probs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (B, T - 1)
    return (picked * labelled).sum(dim=1)


@torch.no_grad()
def rank_answers(model, tokenizer, dataset: PhantomVQADataset, indices: Sequence[int], batch_size: int = 16,
                 bf16: bool = True, progress: bool = True) -> dict[int, str]:
    """Closed questions answered by ranking: every allowed answer (``vqa.answer_candidates``: Yes / No, or the
    lettered options) is scored by ``answer_log_likelihoods`` and the likeliest is the answer (first on a tie).
    The same rule as ``OmniCTEngine`` with ``Question.choices``."""
    from tqdm import tqdm

    collator = VQACollator(tokenizer, model.config, with_answers=True)
    pairs = []  # (index, candidate)
    for i in indices:
        candidates = answer_candidates(dataset.samples[i])
        if not candidates:
            raise ValueError(f"sample {dataset.samples[i]['id']}: ranked answering needs a closed question")
        pairs += [(i, candidate) for candidate in candidates]
    scores: dict[int, list[tuple[float, str]]] = {}
    loaded: tuple[int, dict] | None = None  # a question's candidates are adjacent: its image is prepared once
    for batch in tqdm(_batches(pairs, batch_size), desc="rank", disable=not progress):
        items = []
        for i, candidate in batch:
            if loaded is None or loaded[0] != i:
                loaded = (i, dataset[i])
            item = loaded[1]
            sample = item["sample"]
            turns = [sample["conversations"][0], {"from": "gpt", "value": candidate}]
            items.append({**item, "sample": {**sample, "conversations": turns}})
        for (i, candidate), score in zip(batch, answer_log_likelihoods(model, collator(items), bf16).tolist()):
            scores.setdefault(i, []).append((score, candidate))
    return {i: max(ranked, key=lambda pair: pair[0])[1] for i, ranked in scores.items()}


def derangement(groups: dict[str, list[int]], rng: np.random.Generator, key_of) -> dict[int, int]:
    """For every index, another index of the same group (dimension) showing a different study."""
    mapping: dict[int, int] = {}
    for items in groups.values():
        if len(items) < 2:
            continue
        order = rng.permutation(items)
        for n, i in enumerate(order):
            for step in range(1, len(order)):
                j = int(order[(n + step) % len(order)])
                if key_of(j) != key_of(int(i)):
                    mapping[int(i)] = j
                    break
    return mapping


def apply_condition(dataset: PhantomVQADataset, condition: str, indices: Sequence[int], seed: int = 0) -> None:
    """Set ``dataset.image_override`` for the stress test.

    mismatch: each question gets the image (and its segmentation) of a question about another study, same 2D/3D kind.
    noise: the image is uniform noise over the HU window and the segmentation is empty (nothing to segment).
    """
    dataset.image_override = {}
    if condition == "normal":
        return
    rng = np.random.default_rng(seed)
    if condition == "mismatch":
        groups: dict[str, list[int]] = {}
        for i in indices:
            groups.setdefault(dataset.samples[i]["dim"], []).append(i)
        mapping = derangement(groups, rng, lambda j: dataset.samples[j]["study_seed"])
        for i, j in mapping.items():
            dataset.image_override[i] = dataset.load_image(dataset.samples[j])
        return
    if condition == "noise":
        for i in indices:
            image, labels = dataset.load_image(dataset.samples[i])
            dataset.image_override[i] = (rng.random(image.shape, dtype=np.float32), np.zeros_like(labels))
        return
    raise ValueError(f"unknown condition {condition!r}; known: {', '.join(CONDITIONS)}")


def select_samples(samples: Sequence[dict], where: dict[str, Sequence[str]] | None) -> list[dict]:
    """Samples whose every ``where`` field holds one of the listed values (empty/None lists: no condition)."""
    conditions = {field: set(values) for field, values in (where or {}).items() if values}
    return [s for s in samples if all(str(s.get(field)) in values for field, values in conditions.items())]


def evaluate(model_dir: str | Path, data_dir: str | Path, split: str = "bench", conditions: Sequence[str] = CONDITIONS,
             batch_size: int = 16, limit: int | None = None, bf16: bool = True, seed: int = 0,
             progress: bool = True, tasks: Sequence[str] | None = None,
             where: dict[str, Sequence[str]] | None = None, closed_answering: str = "generate") -> dict:
    """Scores of ``model_dir`` on ``data_dir``/``split`` under each condition (robustness on closed questions).
    ``tasks`` keeps only those task types; ``where`` keeps samples whose field (e.g. ``finding_type``,
    ``size_bucket``) is one of the given values; ``limit`` then keeps the first N samples. ``closed_answering``
    'rank' answers closed questions with the likeliest allowed answer (``rank_answers``) instead of generating."""
    if closed_answering not in CLOSED_ANSWERING:
        raise ValueError(f"closed_answering must be one of {CLOSED_ANSWERING}, got {closed_answering!r}")
    from omnict_core.data.dataset import read_jsonl
    from omnict_core.modeling_omnict import load_omnict

    model, tokenizer = load_omnict(model_dir)
    model.eval()
    samples = read_jsonl(Path(data_dir) / f"{split}.jsonl")
    samples = select_samples(samples, {"task_type": tasks or (), **(where or {})})
    dataset = PhantomVQADataset(data_dir, split=split, max_samples=limit, samples=samples)
    all_indices = list(range(len(dataset)))
    closed = [i for i in all_indices if dataset.samples[i]["task_type"] in CLOSED_TASKS]
    closed_set = set(closed)
    scorer = OpenAnswerScorer()
    results: dict = {"model": str(model_dir), "data": str(data_dir), "split": split, "samples": len(dataset),
                     "where": {k: list(v) for k, v in (where or {}).items() if v},
                     "use_ose": bool(model.config.use_ose), "closed_answering": closed_answering,
                     "conditions": {}}
    predictions_out: list[dict] = []
    for condition in conditions:
        indices = all_indices if condition == "normal" else closed
        apply_condition(dataset, condition, indices, seed)
        started = time.perf_counter()
        by_rank = closed_set if closed_answering == "rank" else set()
        ranked = [i for i in indices if i in by_rank]
        generated = [i for i in indices if i not in by_rank]
        answers = generate_answers(model, tokenizer, dataset, generated, batch_size, bf16, progress)
        answers.update(rank_answers(model, tokenizer, dataset, ranked, batch_size, bf16, progress) if ranked else {})
        elapsed = time.perf_counter() - started
        samples = [dataset.samples[i] for i in indices]
        preds = [answers[i] for i in indices]
        summary = summarize(score_predictions(samples, preds, scorer))
        summary["seconds"] = round(elapsed, 1)
        results["conditions"][condition] = summary
        if condition == "normal":
            predictions_out = [{"id": s["id"], "prediction": p, "answer": s["answer"]} for s, p in zip(samples, preds)]
    dataset.image_override = {}
    results["predictions"] = predictions_out
    return results
