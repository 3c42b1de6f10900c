"""``omnict-node eval``: score a trained OmniCT on the held-out phantom benchmark.

    omnict-node eval --model checkpoints/omnict-tiny-phantom --bench .cache/phantom-vqa --out artifacts/eval.json

Prints closed-question accuracy (judgment + multiple choice) and open-answer metrics (BLEU, ROUGE-L, METEOR,
token-F1) overall and by organ / clinical category (paper Tables 8-9), finding type, size bucket, 2D/3D and task;
then the Table 14 stress test: accuracy with matched images, with images swapped between questions and with noise
images, beside the chance level.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

# Must be set before torch loads OpenMP: on this shared 2-core machine, spinning OpenMP workers waiting for a
# descheduled sibling burned 5-10x the CPU of the useful work (measured: 7 s vs 0.4 s forward, batch 8).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from omnict_core.evaluation.metrics import format_table

CLOSED_COLUMNS = (("closed_n", "n"), ("accuracy", "acc"), ("chance", "chance"))
OPEN_COLUMNS = (("open_n", "n_open"), ("exact", "exact"), ("bleu", "BLEU"), ("rouge_l", "ROUGE-L"),
                ("meteor", "METEOR"), ("token_f1", "tokF1"))
GROUP_TITLES = (("organ", "organ"), ("category", "category"), ("finding_type", "finding"),
                ("size_bucket", "size bucket"), ("dim", "dim"), ("task_type", "task"))


def render_report(results: dict) -> str:
    """Human-readable tables of an ``evaluate`` result."""
    normal = results["conditions"]["normal"]
    lines = [f"model {results['model']}  (use_ose={results['use_ose']})  bench {results['data']}/{results['split']}"
             f"  samples {results['samples']}"]
    if results.get("closed_answering") == "rank":
        lines.append("closed questions answered by ranking their allowed answers (Yes / No, the lettered options)")
    overall = normal["overall"]
    acc = overall["accuracy"]
    lines.append(f"closed-question accuracy {acc:.3f} on {overall['closed_n']} (chance {overall['chance']:.3f})"
                 if acc is not None else "no closed questions")
    if overall.get("choice_n"):
        lines.append(f"multiple choice ({overall['choice_n']}): named option right {overall['choice_named']:.3f}, "
                     f"letter agrees with the named option {overall['choice_letter_agrees']:.3f} "
                     "(diagnostic; the score reads the letter)")
    if normal.get("meteor_unavailable"):
        lines.append(f"METEOR unavailable: {normal['meteor_unavailable']}")
    lines.append("")
    lines.append(format_table("overall", {"all": overall}, CLOSED_COLUMNS + OPEN_COLUMNS))
    for key, title in GROUP_TITLES:
        rows = normal["groups"].get(key, {})
        lines += ["", format_table(title, rows, CLOSED_COLUMNS + OPEN_COLUMNS)]
    conditions = [c for c in ("normal", "mismatch", "noise") if c in results["conditions"]]
    if len(conditions) > 1:
        lines += ["", "Robustness (paper Table 14): closed-question accuracy"]
        rows = {"all": {c: results["conditions"][c]["overall"]["accuracy"] for c in conditions}}
        rows["all"]["chance"] = overall["chance"]
        for key in ("organ", "dim", "task_type"):
            for value, row in normal["groups"].get(key, {}).items():
                if not row["closed_n"]:
                    continue
                rows[f"{key}={value}"] = {c: results["conditions"][c]["groups"][key].get(value, {}).get("accuracy")
                                          for c in conditions}
                rows[f"{key}={value}"]["chance"] = row["chance"]
        lines.append(format_table("group", rows, [(c, c) for c in conditions] + [("chance", "chance")]))
    return "\n".join(lines)


@click.command("eval")
@click.option("--model", "model_dir", type=click.Path(path_type=Path, file_okay=False, exists=True), required=True)
@click.option("--bench", "data_dir", type=click.Path(path_type=Path, file_okay=False, exists=True), required=True,
              help="data directory holding bench.jsonl + the bench image cache")
@click.option("--split", default="bench", show_default=True)
@click.option("--out", "out_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="write the full results (tables + predictions) as JSON")
@click.option("--robustness/--no-robustness", default=True, show_default=True,
              help="also run the mismatch / noise stress test (closed questions)")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--limit", type=int, default=None, help="only the first N benchmark samples")
@click.option("--threads", type=int, default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--task", "tasks", multiple=True,
              type=click.Choice(["judgment", "multiple_choice", "short_answer", "report"]),
              help="only these task types (repeatable); default all")
@click.option("--finding", "findings", multiple=True,
              help="only samples of these finding types (repeatable), e.g. lung_nodule, kidney_stone")
@click.option("--size-bucket", "size_buckets", multiple=True,
              help="only samples of these size buckets (repeatable), e.g. '<=10 mm'")
@click.option("--closed-answers", "closed_answering", type=click.Choice(["generate", "rank"]), default="generate",
              show_default=True, help="closed questions: the greedy answer, or the likeliest of the allowed answers")
def eval_command(model_dir: Path, data_dir: Path, split: str, out_path: Path | None, robustness: bool,
                 batch_size: int, limit: int | None, threads: int | None, seed: int, tasks: tuple[str, ...],
                 findings: tuple[str, ...], size_buckets: tuple[str, ...], closed_answering: str) -> None:
    """Evaluate a trained OmniCT on the held-out phantom benchmark."""
    import torch

    from omnict_core.evaluation.runner import CONDITIONS, evaluate

    if threads:
        torch.set_num_threads(threads)
    conditions = CONDITIONS if robustness else ("normal",)
    results = evaluate(model_dir, data_dir, split, conditions, batch_size=batch_size, limit=limit, seed=seed,
                       tasks=tasks or None, where={"finding_type": findings, "size_bucket": size_buckets},
                       closed_answering=closed_answering)
    report = render_report(results)
    click.echo(report)
    if out_path:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        results["report"] = report
        out_path.write_text(json.dumps(results, indent=2))
        click.echo(f"results -> {out_path}")
