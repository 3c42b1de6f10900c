"""OmniCT trainer: the paper's two stages (App. E, Table 5) on a CPU-sized model.

Stage 1 (alignment) and stage 2 (instruction tuning) minimise the same autoregressive loss, eq. (6), on the
answer tokens; they differ in which parameters move:

* paper stage 1: theta_p (the MHP projector) only — SigLIP and the LLM are pretrained and frozen;
* paper stage 2: theta_p + theta_llm.

Our ``tiny`` model is built from scratch (no pretrained weights may be downloaded), so a frozen vision tower would
be a frozen *random* feature extractor that cannot see 5 mm nodules. Our stage 1 therefore trains the vision tower
+ MHP projector + OSE (slot embeddings) with the LLM frozen, and our stage 2 trains everything (vision tower,
projector, OSE, LLM). ``--vision-frozen`` restores the paper's literal stage 1 for pretrained components — or keeps
a tower pretrained by our stage 0 (``omnict_core.training.vision_pretrain``, the stand-in for a pretrained SigLIP)
fixed in stages 1 and 2.

Everything a resume needs is in ``<out>/checkpoint-last/``: model weights, AdamW state, scheduler state, the
optimizer step, the data position (samples consumed from a seeded permutation) and the torch / numpy / python RNG
states. Resuming reproduces the loss curve of an uninterrupted run exactly (tested).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from omnict_core.data.vqa import reletter_choices
from omnict_core.training.schedule import make_scheduler

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint-last"
STATE_FILE = "trainer_state.pt"
PAPER_LR = {1: 2e-4, 2: 5e-5}  # Table 5


@dataclass
class TrainConfig:
    data_dir: str
    out_dir: str
    stage: int = 2
    preset: str = "tiny"
    config_overrides: dict = field(default_factory=dict)  # e.g. {"use_ose": False}; or a whole config via JSON
    init_from: str | None = None  # stage 2 starts from the stage-1 output directory
    steps: int = 100  # optimizer steps
    batch_size: int = 8  # per micro-batch
    grad_accum: int = 1
    lr: float | None = None  # None = the paper's stage LR (Table 5)
    weight_decay: float = 0.0  # Table 5
    warmup_ratio: float = 0.03  # Table 5
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    bf16: bool = True  # bf16 autocast on CPU (AVX512-BF16: ~2x faster than fp32 here)
    seed: int = 0
    save_every: int = 200
    log_every: int = 10
    vision_frozen: bool = False
    num_threads: int | None = None
    progress: bool = True
    max_samples: int | None = None  # use only the first N training samples (tests)
    # "token": the mean over all answer tokens of the batch (HF's causal-LM loss; long answers dominate it);
    # "sample": each sample's mean over its own answer tokens, then the mean over samples (a one-token yes/no answer
    # weighs as much as a 34-token report, the phantom reports' mean length)
    loss_average: str = "token"
    # Multiple-choice samples get a new option order each time they are drawn (``vqa.reletter_choices``), so the
    # answer letter can only be learned as a lookup of the option that names the finding, not as a letter prior.
    reletter_choices: bool = False
    # Loss weight of a multiple-choice answer's first token (its letter, the token the closed-question score reads)
    # relative to the answer's other tokens; 1 = the plain language-model loss.
    choice_letter_weight: float = 1.0

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else PAPER_LR[self.stage]


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def apply_stage(model, stage: int, vision_frozen: bool = False) -> None:
    """Freeze / unfreeze per stage (see module doc)."""
    if stage == 1:
        model.set_trainable("align")  # projector + OSE
        if not vision_frozen:
            model.vision_tower.requires_grad_(True)  # random-init tower must learn to see
    elif stage == 2:
        model.set_trainable("instruct" if vision_frozen else "all")
    else:
        raise ValueError(f"stage must be 1 or 2, got {stage}")


class SamplePlan:
    """Deterministic order of training samples: epoch e is permutation(seed + e); position = samples consumed."""

    def __init__(self, n_samples: int, seed: int) -> None:
        if n_samples <= 0:
            raise ValueError("no training samples")
        self.n = n_samples
        self.seed = seed
        self._epoch = -1
        self._perm: np.ndarray | None = None

    def indices(self, position: int, count: int) -> list[int]:
        out = []
        for pos in range(position, position + count):
            epoch, offset = divmod(pos, self.n)
            if epoch != self._epoch:
                self._perm = np.random.default_rng(self.seed + 1_000_003 * epoch).permutation(self.n)
                self._epoch = epoch
            out.append(int(self._perm[offset]))
        return out


def answer_loss(logits: torch.Tensor, labels: torch.Tensor, average: str = "sample",
                weights: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy on the labelled (answer) tokens, optionally weighted per token.

    logits (B, T, V); labels (B, T), -100 where not supervised (prompt, padding); weights (B, T) aligned with
    ``labels`` (None = all 1). ``average="sample"``: each sample's weighted mean over its own tokens, then the mean
    over samples; ``"token"``: the weighted mean over all labelled tokens of the batch (unweighted, HF's loss).
    """
    targets = labels[:, 1:]  # position t predicts token t + 1
    per_token = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100,
                                reduction="none")  # (B, T - 1)
    supervised = (targets != -100).float()  # (B, T - 1)
    w = supervised if weights is None else weights[:, 1:].float() * supervised
    if average == "token":
        return (per_token * w).sum() / w.sum().clamp_min(1e-12)
    totals = w.sum(dim=1)  # (B,)
    per_sample = (per_token * w).sum(dim=1) / totals.clamp_min(1e-12)
    return per_sample[supervised.sum(dim=1) > 0].mean()


def choice_letter_weights(labels: torch.Tensor, is_choice: Sequence[bool], weight: float) -> torch.Tensor:
    """(B, T) loss weights: ``weight`` at the first answer token of each multiple-choice row, 1 elsewhere."""
    weights = torch.ones(labels.shape, dtype=torch.float32)
    supervised = labels != -100
    first = supervised.float().argmax(dim=1)  # (B,) index of each row's first answer token
    for row, choice in enumerate(is_choice):
        if choice and bool(supervised[row].any()):
            weights[row, first[row]] = weight
    return weights


def clip_and_step(optimizer: torch.optim.Optimizer, scheduler, max_grad_norm: float | None) -> None:
    """Clip the gradient norm of the optimizer's parameters (0 / None: no clipping), step, advance the LR."""
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]],
                                       max_grad_norm)
    optimizer.step()
    scheduler.step()


def count_parameters(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def build_or_load_model(cfg: TrainConfig, tokenizer):
    from omnict_core.modeling_omnict import OmniCTForConditionalGeneration, build_model

    if cfg.init_from:
        path = Path(cfg.init_from)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--init-from must be a trained OmniCT directory (config.json missing): {path}")
        model = OmniCTForConditionalGeneration.from_pretrained(path)
        if cfg.config_overrides.get("use_ose") is not None:
            model.config.use_ose = bool(cfg.config_overrides["use_ose"])
        return model
    return build_model(cfg.preset, tokenizer, **cfg.config_overrides)


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        from omnict_core.data.dataset import PhantomVQADataset, VQACollator
        from omnict_core.tokenization_omnict import load_tokenizer

        self.cfg = cfg
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        set_seed(cfg.seed)
        self.out_dir = Path(cfg.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        data_dir = Path(cfg.data_dir)
        tokenizer_dir = Path(cfg.init_from) if cfg.init_from else data_dir / "tokenizer"
        self.tokenizer = load_tokenizer(str(tokenizer_dir))
        self.model = build_or_load_model(cfg, self.tokenizer)
        apply_stage(self.model, cfg.stage, cfg.vision_frozen)
        self.model.train()
        self.dataset = PhantomVQADataset(data_dir, split="train", max_samples=cfg.max_samples)
        self.collator = VQACollator(self.tokenizer, self.model.config)
        self.plan = SamplePlan(len(self.dataset), cfg.seed)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.peak_lr, weight_decay=cfg.weight_decay,
                                           betas=(0.9, 0.999), eps=1e-8)
        self.scheduler = make_scheduler(self.optimizer, cfg.steps, cfg.warmup_ratio, cfg.min_lr_ratio)
        self.step = 0
        self.position = 0
        self.history: list[dict] = []
        self.elapsed_s = 0.0

    # ---------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        directory = self.out_dir / CHECKPOINT_DIR
        tmp = self.out_dir / (CHECKPOINT_DIR + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save({
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "step": self.step, "position": self.position,
            "rng": rng_state(), "history": self.history, "elapsed_s": self.elapsed_s,
            "train_config": asdict(self.cfg),
        }, tmp / STATE_FILE)
        # Atomic swap: a crash while saving never leaves a half-written "last" checkpoint.
        if directory.exists():
            old = self.out_dir / (CHECKPOINT_DIR + ".old")
            directory.rename(old)
            tmp.rename(directory)
            for item in old.iterdir():
                item.unlink()
            old.rmdir()
        else:
            tmp.rename(directory)
        return directory

    def load_checkpoint(self, directory: Path | None = None) -> bool:
        directory = directory or self.out_dir / CHECKPOINT_DIR
        path = directory / STATE_FILE
        if not path.is_file():
            return False
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.position = int(state["step"]), int(state["position"])
        self.history = list(state.get("history", []))
        self.elapsed_s = float(state.get("elapsed_s", 0.0))
        set_rng_state(state["rng"])
        return True

    # --------------------------------------------------------------------------------------------- steps
    def next_items(self) -> list[dict]:
        """The next micro-batch's dataset items; with ``reletter_choices`` each MC sample's options get an order
        drawn from (seed, data position), so a resumed run sees the same orders."""
        indices = self.plan.indices(self.position, self.cfg.batch_size)
        items = [self.dataset[i] for i in indices]
        if self.cfg.reletter_choices:
            for offset, item in enumerate(items):
                rng = np.random.default_rng((self.cfg.seed, self.position + offset))
                item["sample"] = reletter_choices(item["sample"], rng)
        self.position += len(indices)
        return items

    def micro_batch_loss(self, items: list[dict]) -> torch.Tensor:
        """The training loss of one micro-batch (``loss_average``, ``choice_letter_weight``)."""
        cfg = self.cfg
        batch = self.collator(items)
        weighted = cfg.choice_letter_weight != 1.0
        labels = batch.pop("labels") if cfg.loss_average == "sample" or weighted else None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            out = self.model(**batch)
        if labels is None:
            return out.loss.float()
        weights = None
        if weighted:
            is_choice = [item["sample"].get("task_type") == "multiple_choice" for item in items]
            weights = choice_letter_weights(labels, is_choice, cfg.choice_letter_weight)
        return answer_loss(out.logits, labels, cfg.loss_average, weights)

    def train_step(self) -> float:
        """One optimizer step (grad_accum micro-batches); returns the mean micro-batch loss."""
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        for _ in range(cfg.grad_accum):
            loss = self.micro_batch_loss(self.next_items())
            (loss / cfg.grad_accum).backward()
            losses.append(float(loss.detach()))
        clip_and_step(self.optimizer, self.scheduler, cfg.max_grad_norm)
        self.step += 1
        return float(np.mean(losses))

    def train(self, resume: bool = True, stop_after: int | None = None) -> list[dict]:
        """Run to ``cfg.steps`` (or ``stop_after`` more steps, for tests); returns the loss history."""
        from tqdm import tqdm

        cfg = self.cfg
        if resume and self.load_checkpoint():
            logger.info("resumed from step %d (position %d)", self.step, self.position)
        target = cfg.steps if stop_after is None else min(cfg.steps, self.step + stop_after)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not cfg.progress, dynamic_ncols=True,
                   desc=f"stage {cfg.stage}")
        window: list[tuple[float, int, float]] = []  # (loss, samples, seconds) for the bar
        samples_per_step = cfg.batch_size * cfg.grad_accum
        while self.step < target:
            started = time.perf_counter()
            loss = self.train_step()
            seconds = time.perf_counter() - started
            self.elapsed_s += seconds
            lr = self.scheduler.get_last_lr()[0]
            self.history.append({"step": self.step, "loss": loss, "lr": lr, "seconds": seconds})
            window = (window + [(loss, samples_per_step, seconds)])[-cfg.log_every:]
            rate = sum(w[1] for w in window) / max(1e-9, sum(w[2] for w in window))
            bar.set_postfix(loss=f"{np.mean([w[0] for w in window]):.4f}", sps=f"{rate:.1f}", lr=f"{lr:.2e}")
            bar.update(1)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                self.save_checkpoint()
        bar.close()
        if self.step >= cfg.steps:
            self.finish()
        else:
            self.save_checkpoint()
        return self.history

    def finish(self) -> Path:
        """Write the trained model (HF directory: config + safetensors + tokenizer) and a training summary."""
        from omnict_core.inference.drafting import build_for_checkpoint
        from omnict_core.modeling_omnict import save_omnict

        self.save_checkpoint()
        save_omnict(self.model, self.tokenizer, self.out_dir)
        # the engine's draft table, from the answers this model was trained on (omnict_core.inference.drafting)
        build_for_checkpoint(self.out_dir, self.dataset.samples, self.tokenizer)
        total, trainable = count_parameters(self.model)
        losses = [h["loss"] for h in self.history]
        tail = losses[-max(1, len(losses) // 10):]
        summary = {
            "train_config": asdict(self.cfg), "steps": self.step, "samples_seen": self.position,
            "train_samples": len(self.dataset), "parameters": total, "trainable_parameters": trainable,
            "train_seconds": round(self.elapsed_s, 1), "final_loss_mean_last_10pct": float(np.mean(tail)),
            "first_loss": losses[0] if losses else None, "torch_threads": torch.get_num_threads(),
            "data_manifest": _read_json(Path(self.cfg.data_dir) / "manifest.json"),
        }
        (self.out_dir / "training_summary.json").write_text(json.dumps(summary, indent=2, default=str))
        (self.out_dir / "loss_history.json").write_text(json.dumps(self.history))
        return self.out_dir


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
