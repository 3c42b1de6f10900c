"""``omnict-node train``: one training stage of OmniCT on a phantom VQA data directory.

    omnict-node train --preset tiny --data .cache/phantom-vqa --out artifacts/stage0 --stage 0 --steps 900 --batch-size 32
    omnict-node train --data .cache/phantom-vqa --out artifacts/stage1 --stage 1 --init-from artifacts/stage0 ...
    omnict-node train --preset tiny --data .cache/phantom-vqa --out artifacts/stage1 --stage 1 --steps 300 --lr 1e-3
    omnict-node train --data .cache/phantom-vqa --out artifacts/stage2 --stage 2 --init-from artifacts/stage1 ...

Re-running the same command after an interruption resumes from ``<out>/checkpoint-last`` (optimizer, scheduler,
step, data position, RNG) unless ``--no-resume``. ``--stage 0`` (vision-tower pretraining, see
``omnict_core.training.vision_pretrain``) has no resume; its ``--batch-size`` counts images.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import click

# Must be set before torch loads OpenMP: on this shared 2-core machine, spinning OpenMP workers waiting for a
# descheduled sibling burned 5-10x the CPU of the useful work (measured: 7 s vs 0.4 s forward, batch 8).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@click.command("train")
@click.option("--data", "data_dir", type=click.Path(path_type=Path, file_okay=False, exists=True), required=True,
              help="data directory written by `python -m omnict_core.data.build`")
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False), required=True)
@click.option("--stage", type=click.IntRange(0, 2), default=2, show_default=True,
              help="0 = dense vision-tower pretraining (organ patches + closed answers, training split), "
                   "1 = alignment (vision tower + projector + OSE; LLM frozen), 2 = + LLM")
@click.option("--preset", default="tiny", show_default=True, help="model preset when not --init-from")
@click.option("--config-json", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
              help="JSON of top-level config overrides, e.g. {\"use_ose\": false}")
@click.option("--no-ose", is_flag=True, help="ablation: OmniCT without OSE (use_ose=False)")
@click.option("--init-from", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="start from a trained directory (stage 2 after stage 1)")
@click.option("--steps", type=int, default=100, show_default=True, help="optimizer steps")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--grad-accum", type=int, default=1, show_default=True)
@click.option("--lr", type=float, default=None, help="peak LR (default: paper Table 5, 2e-4 / 5e-5)")
@click.option("--warmup-ratio", type=float, default=0.03, show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--bf16/--fp32", default=True, show_default=True, help="bf16 autocast on CPU")
@click.option("--save-every", type=int, default=200, show_default=True)
@click.option("--threads", type=int, default=None, help="torch CPU threads")
@click.option("--vision-frozen", is_flag=True, help="paper-literal stage 1 (pretrained vision tower frozen)")
@click.option("--resume/--no-resume", default=True, show_default=True)
@click.option("--max-samples", type=int, default=None, help="use only the first N training samples")
@click.option("--loss-average", type=click.Choice(["token", "sample"]), default="token", show_default=True,
              help="token: mean over all answer tokens of a batch; sample: per-sample mean, then over samples")
@click.option("--reletter-choices/--fixed-choices", default=False, show_default=True,
              help="give each multiple-choice sample a new option order every time it is drawn")
@click.option("--choice-letter-weight", type=float, default=1.0, show_default=True,
              help="loss weight of a multiple-choice answer's letter token (1 = plain LM loss)")
@click.option("--finding-weight", type=float, default=0.0, show_default=True,
              help="stage 0: weight of the per-patch finding-type loss (0 = off; needs a data directory whose "
                   "build wrote finding maps)")
def train(data_dir: Path, out_dir: Path, stage: int, preset: str, config_json: Path | None, no_ose: bool,
          init_from: Path | None, steps: int, batch_size: int, grad_accum: int, lr: float | None,
          warmup_ratio: float, weight_decay: float, seed: int, bf16: bool, save_every: int, threads: int | None,
          vision_frozen: bool, resume: bool, max_samples: int | None, loss_average: str, reletter_choices: bool,
          choice_letter_weight: float, finding_weight: float) -> None:
    """Train OmniCT (one stage) on phantom VQA data; writes an HF model directory to --out."""
    from omnict_core.training.trainer import TrainConfig, Trainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = json.loads(config_json.read_text()) if config_json else {}
    if no_ose:
        overrides["use_ose"] = False
    if stage == 0:
        _train_stage0(data_dir, out_dir, preset, overrides, steps, batch_size, lr, warmup_ratio, weight_decay,
                      seed, bf16, threads, max_samples, init_from, finding_weight)
        return
    if finding_weight:
        raise click.UsageError("--finding-weight is a stage-0 loss (the finding head trains the vision tower)")
    cfg = TrainConfig(data_dir=str(data_dir), out_dir=str(out_dir), stage=stage, preset=preset,
                      config_overrides=overrides, init_from=str(init_from) if init_from else None, steps=steps,
                      batch_size=batch_size, grad_accum=grad_accum, lr=lr, warmup_ratio=warmup_ratio,
                      weight_decay=weight_decay, seed=seed, bf16=bf16, save_every=save_every, num_threads=threads,
                      vision_frozen=vision_frozen, max_samples=max_samples, loss_average=loss_average,
                      reletter_choices=reletter_choices, choice_letter_weight=choice_letter_weight)
    trainer = Trainer(cfg)
    total = sum(p.numel() for p in trainer.model.parameters())
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    click.echo(f"stage {stage}: {total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable, "
               f"{len(trainer.dataset)} training samples, {steps} steps x {batch_size * grad_accum} samples, "
               f"peak lr {cfg.peak_lr:g}, use_ose={trainer.model.config.use_ose}")
    history = trainer.train(resume=resume)
    losses = [h["loss"] for h in history]
    if losses:
        click.echo(f"done: step {trainer.step}, loss first {losses[0]:.4f} last-10% "
                   f"{sum(losses[-max(1, len(losses) // 10):]) / max(1, len(losses[-max(1, len(losses) // 10):])):.4f}, "
                   f"{trainer.elapsed_s:.0f} s -> {out_dir}")


def _train_stage0(data_dir: Path, out_dir: Path, preset: str, overrides: dict, steps: int, batch_size: int,
                  lr: float | None, warmup_ratio: float, weight_decay: float, seed: int, bf16: bool,
                  threads: int | None, max_samples: int | None, init_from: Path | None,
                  finding_weight: float = 0.0) -> None:
    """``--stage 0``: vision-tower pretraining (omnict_core.training.vision_pretrain); --batch-size counts images."""
    from omnict_core.training.trainer import count_parameters
    from omnict_core.training.vision_pretrain import VisionPretrainConfig, VisionPretrainer

    if init_from is not None:
        raise click.UsageError("--stage 0 starts from a random tower; --init-from is for stages 1 and 2")
    cfg = VisionPretrainConfig(data_dir=str(data_dir), out_dir=str(out_dir), preset=preset,
                               config_overrides=overrides, steps=steps, batch_size=batch_size,
                               lr=lr if lr is not None else 1e-3, warmup_ratio=warmup_ratio,
                               weight_decay=weight_decay, seed=seed, bf16=bf16, num_threads=threads,
                               max_samples=max_samples, finding_loss_weight=finding_weight)
    trainer = VisionPretrainer(cfg)
    tower = count_parameters(trainer.model.vision_tower)[0]
    heads = count_parameters(trainer.heads)[0]
    click.echo(f"stage 0: vision tower {tower / 1e6:.2f}M parameters (+ {heads / 1e6:.2f}M training-only heads), "
               f"{len(trainer.images)} training images, {len(trainer.vocab.keys)} closed question keys, "
               f"{steps} steps x {batch_size} images, peak lr {cfg.lr:g}")
    history = trainer.train()
    last = history[-max(1, len(history) // 10):]
    click.echo(f"done: step {trainer.step}, last-10% loss {sum(h['loss'] for h in last) / len(last):.4f} "
               f"patch acc {sum(h['patch_acc'] for h in last) / len(last):.3f} "
               f"answer acc {sum(h['answer_acc'] for h in last) / len(last):.3f}, "
               f"{trainer.elapsed_s:.0f} s -> {out_dir}")
