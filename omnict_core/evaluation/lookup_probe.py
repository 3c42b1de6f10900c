"""Probe of a checkpoint's LLM: can it find an option's letter when the option is named in the text?

    python -m omnict_core.evaluation.lookup_probe --model checkpoints/omnict-tiny-phantom --data .cache/phantom-vqa \\
        --steps 1500 --out artifacts/lookup-probe.json

Why: a multiple-choice answer starts with its letter ("B. moderate"), so before it writes anything the LLM has to
find, among the listed options, the one that says what the image shows, and copy that option's letter. The
evaluation's diagnostic (``omnict-node eval``: "named option right" against "letter agrees") shows the demo
checkpoint names the right option far more often than it gives that option's letter. This probe takes the image out
of the question: each benchmark multiple-choice question, text only, with the right option stated before the list
("... Finding: moderate.\\nA. small\\nB. moderate\\n..."). The letter then needs only an in-context lookup,
the skill a pretrained LLM brings (the paper starts from Qwen2.5) and a from-scratch tiny LLM may lack.

It reports the zero-shot letter accuracy of the checkpoint's LLM, then fine-tunes the LLM as loaded (the
checkpoint on disk is never written) on the training split's questions in the same form, each drawn with a new
option order (``vqa.reletter_choices``), and reports the benchmark accuracy every ``--eval-every`` steps: how
much text it takes this LLM to learn the lookup, if it learns it at all.

Accuracy reads the greedy first answer token, as the closed-question score reads the letter; chance is the mean of
1/k over the questions (k options).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

# before torch loads OpenMP (see omnict_core/evaluation/cli.py)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click
import numpy as np
import torch
import torch.nn.functional as F

from omnict_core.data.vqa import choice_stem, format_choices, reletter_choices
from omnict_core.tokenization_omnict import IM_END, IM_START, SYSTEM_PROMPT, prompt_suffix


@dataclass
class LookupProbeConfig:
    model_dir: str
    data_dir: str
    steps: int = 1500
    batch_size: int = 32
    lr: float = 3e-4
    eval_every: int = 250
    seed: int = 0
    num_threads: int | None = None


def stated_choice_prompt(sample: dict) -> tuple[str, str]:
    """(text-only chat prompt with the right option stated before the list, the answer letter) of an MC sample."""
    stem = choice_stem(sample).replace("<image>\n", "")
    question, answer = format_choices(f"{stem} Finding: {sample['answer_content']}.", sample["options"],
                                      sample["answer_content"])
    # the chat format of every OmniCT prompt, without the image and organ placeholder lines
    prompt = f"{IM_START}system\n{SYSTEM_PROMPT}{IM_END}\n{IM_START}user\n{prompt_suffix(question)}"
    return prompt, answer.split(".", 1)[0]


class EncodedBatch(NamedTuple):
    input_ids: torch.Tensor  # (B, T) right-padded prompts
    attention_mask: torch.Tensor  # (B, T)
    last: torch.Tensor  # (B,) each row's last prompt position (where the first answer token is predicted)
    letters: torch.Tensor  # (B,) token id of the right option's letter


def encode_batch(tokenizer, samples: Sequence[dict]) -> EncodedBatch:
    """The samples' :func:`stated_choice_prompt` prompts, tokenized and right-padded, with their letters."""
    prompts = [stated_choice_prompt(s) for s in samples]
    ids = [tokenizer.encode(p, add_special_tokens=False) for p, _ in prompts]
    letters = torch.tensor([tokenizer.convert_tokens_to_ids(letter) for _, letter in prompts])
    input_ids = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        attention_mask[row, : len(seq)] = 1
    last = attention_mask.sum(dim=1) - 1
    return EncodedBatch(input_ids, attention_mask, last, letters)


def first_token_logits(lm, batch: EncodedBatch) -> torch.Tensor:
    """Logits of the first answer token (B, V) of an encoded batch."""
    logits = lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, T, V)
    return logits[torch.arange(len(batch.last)), batch.last]


def encode_batches(tokenizer, samples: Sequence[dict], batch_size: int = 64) -> list[EncodedBatch]:
    """``samples`` as :func:`encode_batch` batches (encoded once, scored at every evaluation)."""
    return [encode_batch(tokenizer, samples[start: start + batch_size])
            for start in range(0, len(samples), batch_size)]


@torch.no_grad()
def letter_accuracy(lm, batches: Sequence[EncodedBatch]) -> float:
    """Share of the questions in ``batches`` whose greedy first answer token is the right option's letter."""
    was_training = lm.training
    lm.eval()
    correct = sum(int((first_token_logits(lm, batch).argmax(dim=-1) == batch.letters).sum()) for batch in batches)
    lm.train(was_training)
    return correct / max(1, sum(len(batch.letters) for batch in batches))


def choice_samples(data_dir: Path, split: str) -> list[dict]:
    from omnict_core.data.dataset import read_jsonl

    return [s for s in read_jsonl(Path(data_dir) / f"{split}.jsonl") if s["task_type"] == "multiple_choice"]


def run_lookup_probe(cfg: LookupProbeConfig, progress: bool = True) -> dict:
    from omnict_core.modeling_omnict import load_omnict

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_omnict(cfg.model_dir)
    lm = model.language_model  # fine-tuned in memory only
    train, bench = choice_samples(Path(cfg.data_dir), "train"), choice_samples(Path(cfg.data_dir), "bench")
    if not train or not bench:
        raise ValueError(f"no multiple-choice questions in {cfg.data_dir} (train {len(train)}, bench {len(bench)})")
    chance = float(np.mean([1.0 / len(s["options"]) for s in bench]))
    bench_batches = encode_batches(tokenizer, bench)
    curve = [{"step": 0, "loss": None, "accuracy": letter_accuracy(lm, bench_batches)}]
    if progress:
        click.echo(f"step 0 (zero-shot): letter accuracy {curve[0]['accuracy']:.3f} on {len(bench)} (chance {chance:.3f})")
    optimizer = torch.optim.AdamW(lm.parameters(), lr=cfg.lr, weight_decay=0.0)
    rng = np.random.default_rng(cfg.seed)
    lm.train()
    losses: list[float] = []
    started = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        batch = encode_batch(tokenizer, [reletter_choices(train[i], rng)
                                         for i in rng.choice(len(train), cfg.batch_size)])
        loss = F.cross_entropy(first_token_logits(lm, batch).float(), batch.letters)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if step % cfg.eval_every == 0 or step == cfg.steps:
            row = {"step": step, "loss": float(np.mean(losses[-cfg.eval_every:])),
                   "accuracy": letter_accuracy(lm, bench_batches)}
            curve.append(row)
            if progress:
                click.echo(f"step {step}: loss {row['loss']:.3f}, letter accuracy {row['accuracy']:.3f} "
                           f"({time.perf_counter() - started:.0f} s)")
    return {"probe_config": asdict(cfg), "bench_questions": len(bench), "train_questions": len(train),
            "chance": chance, "zero_shot": curve[0]["accuracy"], "curve": curve,
            "seconds": round(time.perf_counter() - started, 1)}


@click.command()
@click.option("--model", "model_dir", type=click.Path(file_okay=False, exists=True), required=True)
@click.option("--data", "data_dir", type=click.Path(file_okay=False, exists=True), required=True)
@click.option("--steps", type=int, default=1500, show_default=True, help="fine-tuning steps (0: zero-shot only)")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--lr", type=float, default=3e-4, show_default=True)
@click.option("--eval-every", type=int, default=250, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=None)
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(model_dir: str, data_dir: str, steps: int, batch_size: int, lr: float, eval_every: int, seed: int,
         threads: int | None, out_path: Path | None) -> None:
    """Letter lookup of a checkpoint's LLM on the benchmark's multiple-choice questions, text only."""
    cfg = LookupProbeConfig(model_dir=model_dir, data_dir=data_dir, steps=steps, batch_size=batch_size, lr=lr,
                            eval_every=eval_every, seed=seed, num_threads=threads)
    result = run_lookup_probe(cfg)
    if out_path:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
