"""Stage 0: dense supervised pretraining of the random-init vision tower on the phantom TRAINING split.

The paper starts from a pretrained SigLIP. Our ``tiny`` tower has no pretrained weights (none may be downloaded),
and learning to see only through the LLM's answer loss is slow: one scalar answer per question, routed through a
randomly initialised projector and LLM. Stage 0 gives the tower a dense, direct signal instead, from the training
split only (the benchmark seeds are never read):

* **per-patch organ groups** — for every 8 x 8 patch of every unit, the fraction of its pixels in each organ group
  (background, the five lung lobes, trachea, heart, liver, spleen, stomach, kidneys left/right, other tissue), read
  from the phantom label maps; soft cross-entropy of a linear patch head;
* **per-patch findings** (``--finding-weight W``, needs a data directory with finding maps) — for every patch, which
  finding types (nodule, effusion, pneumothorax, consolidation, liver lesion, kidney stone, splenomegaly) cover any
  of its pixels in any slice of the unit; binary cross-entropy of a linear patch head, positives weighted up
  (``finding_pos_weight``) because a small finding touches one or a few of a unit's 144 patches. Why: the question head alone
  gives one answer per question, and the tower it trains leaves nodules and stones at chance (model card, tower
  probe), while the pixels carry them (a small CNN on the raw slices reads them well above chance). Measured: at
  900 steps it did not lift the small findings in either probe (model card, "Small findings"); off by default;
* **per-question answer classes** — every non-report training question of the image (judgment, multiple choice,
  and short answers with a small answer set) becomes a classification target ``question_key -> answer content``.
  A per-key head pools the image tokens with a learned per-key attention query, concatenated with the mean of the
  tokens under the question's ROI mask (the mask OSE receives), then a per-key linear classifier.

The heads live only here and are discarded; what goes on is an OmniCT directory (``save_omnict``) whose vision
tower is pretrained and whose projector / OSE / LLM are freshly initialised, ready for
``omnict-node train --stage 1 --init-from <stage-0 dir>``.

Shapes: S = image size (96), K = patch size (8), h = w = S // K (12), d_v = tower width (192), G = organ groups,
Q = questions of one image, C = the most answer classes of any key, T = finding types (7).
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from omnict_core.data.vqa import FINDING_TYPES
from omnict_core.training.schedule import make_scheduler
from omnict_core.training.trainer import clip_and_step

#: organ groups of the patch head: name -> TotalSegmentator label names (group 0 = label 0, the last = the rest);
#: every group between them is the one label of its name
ORGAN_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("background", ()),
    *((name, (name,)) for name in (
        "lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right", "lung_upper_lobe_left",
        "lung_lower_lobe_left", "trachea", "heart", "liver", "spleen", "stomach", "kidney_left", "kidney_right")),
    ("other", ()),
)
#: task types turned into answer-class targets (reports are free text)
CLASS_TASKS = ("judgment", "multiple_choice", "short_answer")


# ------------------------------------------------------------------------------------------------- targets
def label_group_lut(label_names: dict[int, str]) -> torch.Tensor:
    """(256,) int64: TotalSegmentator label id -> organ-group index (0 background, unknown ids -> 'other')."""
    index_of = {name: g for g, (_, names) in enumerate(ORGAN_GROUPS) for name in names}
    other = len(ORGAN_GROUPS) - 1
    lut = torch.full((256,), other, dtype=torch.int64)
    lut[0] = 0
    for label_id, name in label_names.items():
        lut[int(label_id)] = index_of.get(name, other)
    return lut


def patch_group_fractions(labels: torch.Tensor, lut: torch.Tensor, patch: int, grid: int) -> torch.Tensor:
    """Label maps (N, S, S) int -> fraction of each organ group under each patch, (N, grid, grid, G) float."""
    used = labels[:, :grid * patch, :grid * patch].long()  # SigLIP ignores remainder pixels
    onehot = F.one_hot(lut[used], len(ORGAN_GROUPS)).permute(0, 3, 1, 2).float()  # (N, G, S', S')
    return F.avg_pool2d(onehot, patch).permute(0, 2, 3, 1)  # (N, grid, grid, G)


def patch_finding_presence(finding_units: torch.Tensor, n_types: int, patch: int, grid: int) -> torch.Tensor:
    """Finding-type maps of units (N_u, 3, S, S) int (0 none, t + 1 = type t) -> (N_u, grid, grid, T) float:
    1 where any pixel of the patch, in any slice of the unit, belongs to a finding of type t."""
    used = finding_units[:, :, :grid * patch, :grid * patch].long()  # SigLIP ignores remainder pixels
    onehot = F.one_hot(used, n_types + 1)[..., 1:].amax(dim=1)  # (N_u, S', S', T): any slice of the unit
    return F.max_pool2d(onehot.permute(0, 3, 1, 2).float(), patch).permute(0, 2, 3, 1)  # (N_u, grid, grid, T)


def roi_token_mask(labels: torch.Tensor, roi_ids: Sequence[int], patch: int, grid: int) -> torch.Tensor:
    """Label maps of one image's units (N_u, 3, S, S) -> tokens touched by the ROI, (N_u * grid * grid,) bool.
    Empty ``roi_ids`` -> all False (the head then pools the whole image)."""
    if not roi_ids:
        return torch.zeros(labels.shape[0] * grid * grid, dtype=torch.bool)
    hit = torch.isin(labels[:, :, :grid * patch, :grid * patch], torch.tensor(list(roi_ids), dtype=labels.dtype))
    pooled = F.max_pool2d(hit.any(dim=1, keepdim=True).float(), patch)  # (N_u, 1, grid, grid)
    return pooled.flatten() > 0


@dataclass
class QuestionVocab:
    """Question keys with a closed answer set: key index -> its answer classes (sorted, so runs are reproducible)."""

    keys: list[str]
    classes: list[list[str]]

    @classmethod
    def from_samples(cls, samples: Sequence[dict], max_classes: int = 8) -> "QuestionVocab":
        answers: dict[str, set[str]] = defaultdict(set)
        for s in samples:
            if s["task_type"] in CLASS_TASKS:
                answers[s["question_key"]].add(answer_class(s))
        keys = sorted(k for k, v in answers.items() if 2 <= len(v) <= max_classes)
        return cls(keys=keys, classes=[sorted(answers[k]) for k in keys])

    @property
    def max_classes(self) -> int:
        return max((len(c) for c in self.classes), default=2)

    def valid_mask(self) -> torch.Tensor:
        """(n_keys, C) bool: which class slots of each key exist."""
        mask = torch.zeros(len(self.keys), self.max_classes, dtype=torch.bool)
        for k, names in enumerate(self.classes):
            mask[k, :len(names)] = True
        return mask

    def key_index(self, question_key: str) -> int | None:
        """Index of a question key, or None when it has no closed answer set."""
        return self._index.get(question_key)

    def target(self, sample: dict) -> tuple[int, int] | None:
        """(key index, class index) of a sample, or None when its key has no closed answer set."""
        if sample["task_type"] not in CLASS_TASKS:
            return None
        key_index = self.key_index(sample["question_key"])
        if key_index is None:
            return None
        return key_index, self.classes[key_index].index(answer_class(sample))

    def __post_init__(self) -> None:
        self._index = {k: i for i, k in enumerate(self.keys)}


def answer_class(sample: dict) -> str:
    """The answer content (multiple choice: the option text, not the shuffled letter)."""
    return str(sample.get("answer_content") or sample["answer"])


@dataclass
class ImageQuestion:
    """One closed question of an image: key index, answer-class index, ROI label ids (empty = whole image)."""

    key: int
    answer: int
    roi_label_ids: tuple[int, ...]


def questions_by_image(samples: Sequence[dict], vocab: QuestionVocab) -> dict[str, list[ImageQuestion]]:
    """Image reference -> its distinct closed questions (duplicates of one (key, answer, roi) kept once)."""
    out: dict[str, dict[tuple, ImageQuestion]] = defaultdict(dict)
    for s in samples:
        target = vocab.target(s)
        if target is None:
            continue
        roi = tuple(int(i) for i in s.get("roi_label_ids") or ())
        out[s["image"]][(target, roi)] = ImageQuestion(target[0], target[1], roi)
    return {ref: list(qs.values()) for ref, qs in out.items()}


def map_units(image_map: np.ndarray, dim: str) -> torch.Tensor:
    """A per-pixel map of a cached image (organ labels, finding types), (S, S) or (D, S, S), composed like its
    pixels: (N_u, 3, S, S) int32 (a slice replicated, a volume in VSC units)."""
    from omnict_core.preprocessing import compose_units

    x = torch.from_numpy(np.ascontiguousarray(image_map).astype(np.int32))
    return x[None, None].expand(1, 3, *x.shape) if dim == "2d" else compose_units(x)


def image_units(cache, dim: str, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One cached image (``omnict_core.data.dataset.ImageCache``) as the VQA dataset feeds it to the tower:
    (units (N_u, 3, S, S) in [-1, 1], unit label maps (N_u, 3, S, S) int32)."""
    from omnict_core.data.dataset import to_units

    pixels, labels = cache.image(dim, index)
    units, _ = to_units(pixels, labels, dim, None)
    return units, map_units(labels, dim)


# --------------------------------------------------------------------------------------------------- heads
class VisionPretrainHeads(nn.Module):
    """Training-only heads on the tower's patch features (discarded after stage 0)."""

    def __init__(self, width: int, n_groups: int, class_valid: torch.Tensor, n_finding_types: int = 0) -> None:
        super().__init__()
        n_keys, n_classes = class_valid.shape
        self.patch_head = nn.Linear(width, n_groups)
        self.finding_head = nn.Linear(width, n_finding_types) if n_finding_types else None
        self.norm = nn.LayerNorm(width)
        self.key_query = nn.Parameter(torch.randn(n_keys, width) * width ** -0.5)
        self.key_weight = nn.Parameter(torch.randn(n_keys, n_classes, 2 * width) * (2 * width) ** -0.5)
        self.key_bias = nn.Parameter(torch.zeros(n_keys, n_classes))
        self.register_buffer("class_valid", class_valid.clone(), persistent=False)

    def patch_logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.patch_head(features)  # (N, h, w, d_v) -> (N, h, w, G)

    def finding_logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.finding_head(features)  # (N, h, w, d_v) -> (N, h, w, T)

    def answer_logits(self, tokens: torch.Tensor, keys: torch.Tensor, roi: torch.Tensor) -> torch.Tensor:
        """tokens (L, d_v) of one image, keys (Q,) long, roi (Q, L) bool -> logits (Q, C), invalid slots -inf."""
        x = self.norm(tokens.float())  # (L, d_v)
        attn = torch.softmax(self.key_query[keys] @ x.T / math.sqrt(x.shape[-1]), dim=-1)  # (Q, L)
        attended = attn @ x  # (Q, d_v)
        has_roi = roi.any(dim=1, keepdim=True)  # (Q, 1)
        weights = torch.where(has_roi, roi.float(), torch.ones_like(roi, dtype=torch.float32))
        roi_mean = (weights @ x) / weights.sum(dim=1, keepdim=True)  # (Q, d_v)
        feats = torch.cat([attended, roi_mean], dim=-1)  # (Q, 2 d_v)
        logits = torch.einsum("qd,qcd->qc", feats, self.key_weight[keys]) + self.key_bias[keys]  # (Q, C)
        return logits.masked_fill(~self.class_valid[keys], float("-inf"))


# ----------------------------------------------------------------------------------------------- training
@dataclass
class VisionPretrainConfig:
    data_dir: str
    out_dir: str
    preset: str = "tiny"
    config_overrides: dict = field(default_factory=dict)
    steps: int = 1000
    batch_size: int = 32  # images per step (a volume counts once; its units all go through the tower)
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    patch_loss_weight: float = 1.0
    answer_loss_weight: float = 1.0
    finding_loss_weight: float = 0.0  # > 0: per-patch finding head (data directory with finding maps)
    finding_pos_weight: float = 10.0  # BCE weight of a patch that holds the finding type
    bf16: bool = True
    seed: int = 0
    log_every: int = 10
    num_threads: int | None = None
    progress: bool = True
    max_samples: int | None = None  # use only the first N training samples (tests)


def mean_of(rows: Sequence[dict], key: str) -> float | None:
    """Mean of ``key`` over the log rows that have it (finding figures exist only with the finding head, and the
    recall only for batches with a finding); None when none has it."""
    values = [row[key] for row in rows if key in row]
    return float(np.mean(values)) if values else None


@dataclass
class PretrainImage:
    """A training image (``cache://train/{dim}/{index}``) and its closed questions."""

    ref: str
    dim: str
    index: int
    questions: list[ImageQuestion]


class VisionPretrainer:
    """Stage 0 loop: sample images, run the OmniCT model's own tower on their units, patch + answer losses."""

    def __init__(self, cfg: VisionPretrainConfig) -> None:
        from omnict_core.data.dataset import ImageCache, parse_image_ref, read_jsonl
        from omnict_core.modeling_omnict import build_model
        from omnict_core.tokenization_omnict import load_tokenizer

        self.cfg = cfg
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        torch.manual_seed(cfg.seed)
        data_dir = Path(cfg.data_dir)
        self.out_dir = Path(cfg.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer = load_tokenizer(str(data_dir / "tokenizer"))
        self.model = build_model(cfg.preset, self.tokenizer, **cfg.config_overrides)
        config = self.model.config
        self.patch, self.grid = config.patch_size, config.patch_grid
        samples = read_jsonl(data_dir / "train.jsonl")[:cfg.max_samples]
        self.vocab = QuestionVocab.from_samples(samples)
        by_image = questions_by_image(samples, self.vocab)
        self.images = [PretrainImage(ref, *parse_image_ref(ref)[1:], questions=qs)
                       for ref, qs in sorted(by_image.items())]
        if not self.images:
            raise ValueError(f"no closed training questions in {data_dir / 'train.jsonl'}")
        self.cache = ImageCache(data_dir, "train")
        manifest = json.loads((data_dir / "manifest.json").read_text())
        self.lut = label_group_lut({int(k): v for k, v in manifest["label_names"].items()})
        if cfg.finding_loss_weight > 0:
            self.cache.require_finding_maps()
        self.n_finding_types = len(FINDING_TYPES) if cfg.finding_loss_weight > 0 else 0
        width = config.vision_config.hidden_size
        self.heads = VisionPretrainHeads(width, len(ORGAN_GROUPS), self.vocab.valid_mask(), self.n_finding_types)
        params = list(self.model.vision_tower.parameters()) + list(self.heads.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, cfg.steps, cfg.warmup_ratio)
        self.rng = np.random.default_rng(cfg.seed)
        self.step = 0
        self.history: list[dict] = []
        self.elapsed_s = 0.0

    def batch_loss(self, images: Sequence[PretrainImage]) -> dict[str, torch.Tensor | float]:
        """Loss of a batch of images + running accuracies (patch top-1, answer) for the log."""
        loaded = [image_units(self.cache, image.dim, image.index) for image in images]
        counts = [int(units.shape[0]) for units, _ in loaded]
        units = torch.cat([u for u, _ in loaded])  # (sum N_u, 3, S, S)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.bf16):
            features = self.model._vision_features(units)  # (sum N_u, h, w, d_v)
        features = features.float()
        # per-patch organ groups: soft targets from the middle slice of each unit
        middle = torch.cat([lab[:, 1] for _, lab in loaded])  # (sum N_u, S, S)
        target = patch_group_fractions(middle, self.lut, self.patch, self.grid)  # (sum N_u, h, w, G)
        logp = F.log_softmax(self.heads.patch_logits(features), dim=-1)
        patch_loss = -(target * logp).sum(-1).mean()
        patch_acc = float((logp.argmax(-1) == target.argmax(-1)).float().mean())
        # per-question answers
        answer_losses, correct, total = [], 0, 0
        for image, (_, lab), feats in zip(images, loaded, features.split(counts)):
            keys = torch.tensor([q.key for q in image.questions])
            answers = torch.tensor([q.answer for q in image.questions])
            roi = torch.stack([roi_token_mask(lab, q.roi_label_ids, self.patch, self.grid) for q in image.questions])
            logits = self.heads.answer_logits(feats.reshape(-1, feats.shape[-1]), keys, roi)  # (Q, C)
            answer_losses.append(F.cross_entropy(logits, answers, reduction="sum"))
            correct += int((logits.argmax(-1) == answers).sum())
            total += len(answers)
        answer_loss = torch.stack(answer_losses).sum() / max(1, total)
        loss = self.cfg.patch_loss_weight * patch_loss + self.cfg.answer_loss_weight * answer_loss
        out = {"patch_loss": float(patch_loss.detach()), "answer_loss": float(answer_loss.detach()),
               "patch_acc": patch_acc, "answer_acc": correct / max(1, total)}
        if self.n_finding_types:
            finding_loss, finding_figures = self.finding_loss(images, features)
            loss = loss + self.cfg.finding_loss_weight * finding_loss
            out.update(finding_figures)
        return {"loss": loss, **out}

    def finding_loss(self, images: Sequence[PretrainImage], features: torch.Tensor
                     ) -> tuple[torch.Tensor, dict[str, float]]:
        """Per-patch finding-type BCE over a batch's units (``features`` (sum N_u, h, w, d_v)) and its log figures:
        ``finding_loss`` and, when the batch has positives, ``finding_recall`` (the share of (patch, type)
        positives with logit > 0)."""
        maps = torch.cat([map_units(self.cache.finding_map(image.dim, image.index), image.dim) for image in images])
        target = patch_finding_presence(maps, self.n_finding_types, self.patch, self.grid)  # (sum N_u, h, w, T)
        logits = self.heads.finding_logits(features)  # (sum N_u, h, w, T)
        loss = F.binary_cross_entropy_with_logits(
            logits, target, pos_weight=torch.tensor(self.cfg.finding_pos_weight))
        figures = {"finding_loss": float(loss.detach())}
        positives = target > 0
        if positives.any():
            figures["finding_recall"] = float((logits.detach()[positives] > 0).float().mean())
        return loss, figures

    def train_step(self) -> dict[str, float]:
        chosen = self.rng.choice(len(self.images), size=min(self.cfg.batch_size, len(self.images)), replace=False)
        out = self.batch_loss([self.images[i] for i in chosen])
        self.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        clip_and_step(self.optimizer, self.scheduler, self.cfg.max_grad_norm)
        self.step += 1
        return {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in out.items()}

    def train(self) -> list[dict]:
        from tqdm import tqdm

        cfg = self.cfg
        self.model.vision_tower.train()
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not cfg.progress, dynamic_ncols=True, desc="stage 0")
        while self.step < cfg.steps:
            started = time.perf_counter()
            row = self.train_step()
            seconds = time.perf_counter() - started
            self.elapsed_s += seconds
            row.update(step=self.step, lr=self.scheduler.get_last_lr()[0], seconds=seconds)
            self.history.append(row)
            window = self.history[-cfg.log_every:]
            bar.set_postfix({k: f"{mean:.3f}" for k in ("loss", "patch_acc", "answer_acc", "finding_recall")
                             if (mean := mean_of(window, k)) is not None})
            bar.update(1)
        bar.close()
        self.finish()
        return self.history

    def finish(self) -> Path:
        """OmniCT directory (pretrained tower, fresh projector / OSE / LLM) + stage-0 summary and history."""
        from omnict_core.modeling_omnict import save_omnict

        save_omnict(self.model, self.tokenizer, self.out_dir)
        tail = self.history[-max(1, len(self.history) // 10):]
        summary = {
            "stage": 0, "train_config": asdict(self.cfg), "steps": self.step,
            "images": len(self.images), "question_keys": len(self.vocab.keys),
            "questions": sum(len(i.questions) for i in self.images), "organ_groups": [g for g, _ in ORGAN_GROUPS],
            "train_seconds": round(self.elapsed_s, 1), "torch_threads": torch.get_num_threads(),
            "finding_types": list(FINDING_TYPES[:self.n_finding_types]),
            "last_10pct": {k: mean for k in ("loss", "patch_loss", "answer_loss", "patch_acc", "answer_acc",
                                             "finding_loss", "finding_recall")
                           if (mean := mean_of(tail, k)) is not None} if tail else None,
        }
        (self.out_dir / "training_summary.json").write_text(json.dumps(summary, indent=2, default=str))
        (self.out_dir / "loss_history.json").write_text(json.dumps(self.history))
        return self.out_dir
