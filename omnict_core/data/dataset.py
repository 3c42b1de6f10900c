"""Dataset + collator: cached phantom images -> the model's batch format.

A data directory written by ``omnict_core.data.build`` holds, per split (``train`` / ``bench``):

    {split}.jsonl             VQA samples (OmniCT message format, see ``vqa.py``)
    {split}_images2d.npy      float16 (N2, S, S)     windowed slices in [0, 1] at the model resolution
    {split}_labels2d.npy      uint8   (N2, S, S)     organ label map of each slice (TotalSegmentator ids)
    {split}_volumes3d.npy     float16 (N3, D, S, S)  windowed, resampled volumes in [0, 1]
    {split}_labels3d.npy      uint8   (N3, D, S, S)
    {split}_findings2d.npy    uint8   (N2, S, S)     finding-type map of each slice (0 none, 1 + FINDING_TYPES index)
    {split}_findings3d.npy    uint8   (N3, D, S, S)  (both optional: directories built before them lack them)
    manifest.json             seeds, counts, resolution, label names
    tokenizer/                tokenizer trained on the QA corpus

Images went through ``omnict_core.preprocessing`` (window [-1000, 1000], area-averaged resampling) when the cache
was built, so training sees exactly what inference sees; here we only normalise to [-1, 1], compose units (VSC)
and build the organ mask that feeds OSE. Samples reference images as ``cache://{split}/{2d|3d}/{index}``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from omnict_core.preprocessing import compose_units, normalise_for_vision
from omnict_core.tokenization_omnict import IGNORE_INDEX, collate_examples, encode_example

IMAGE_REF_PREFIX = "cache://"


def image_ref(split: str, dim: str, index: int) -> str:
    return f"{IMAGE_REF_PREFIX}{split}/{dim}/{index}"


def parse_image_ref(ref: str) -> tuple[str, str, int]:
    if not ref.startswith(IMAGE_REF_PREFIX):
        raise ValueError(f"not a cache image reference: {ref!r}")
    split, dim, index = ref[len(IMAGE_REF_PREFIX):].split("/")
    return split, dim, int(index)


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


class ImageCache:
    """Memory-mapped image arrays of one split."""

    def __init__(self, data_dir: Path, split: str) -> None:
        self.data_dir = Path(data_dir)
        self.split = split
        self.arrays: dict[str, np.ndarray] = {}
        for name in ("images2d", "labels2d", "volumes3d", "labels3d"):
            path = self.data_dir / f"{split}_{name}.npy"
            if not path.is_file():
                raise FileNotFoundError(f"phantom image cache missing: {path} (build it with omnict_core.data.build)")
            self.arrays[name] = np.load(path, mmap_mode="r")
        for name in ("findings2d", "findings3d"):  # optional: data directories built before they were written
            path = self.data_dir / f"{split}_{name}.npy"
            if path.is_file():
                self.arrays[name] = np.load(path, mmap_mode="r")

    def image(self, dim: str, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(windowed image in [0, 1] float32, label map uint8) of a 2D slice (S, S) or volume (D, S, S)."""
        if dim == "2d":
            return (np.asarray(self.arrays["images2d"][index], dtype=np.float32),
                    np.asarray(self.arrays["labels2d"][index]))
        return (np.asarray(self.arrays["volumes3d"][index], dtype=np.float32),
                np.asarray(self.arrays["labels3d"][index]))

    @property
    def has_finding_maps(self) -> bool:
        return "findings2d" in self.arrays and "findings3d" in self.arrays

    def require_finding_maps(self) -> None:
        """FileNotFoundError, naming the missing files, for a directory built without finding maps."""
        if not self.has_finding_maps:
            raise FileNotFoundError(f"{self.data_dir} has no {self.split}_findings2d/3d.npy: rebuild it with "
                                    "omnict_core.data.build (builds since the finding maps were added write them)")

    def finding_map(self, dim: str, index: int) -> np.ndarray:
        """Finding-type map uint8 (S, S) or (D, S, S) of an image (0 none, else 1 + index in
        ``vqa.FINDING_TYPES``); see :meth:`require_finding_maps`."""
        self.require_finding_maps()
        return np.asarray(self.arrays["findings2d" if dim == "2d" else "findings3d"][index])

    def count(self, dim: str) -> int:
        return int(self.arrays["images2d" if dim == "2d" else "volumes3d"].shape[0])


def to_units(image01: np.ndarray, labels: np.ndarray, dim: str, roi_label_ids: Sequence[int] | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Windowed image in [0, 1] -> (pixel_units (N_u, 3, S, S) in [-1, 1], organ mask (N_u, S, S) bool).

    2D: the slice is replicated to 3 channels (one unit). 3D: VSC, 3 adjacent slices per unit. The mask of a unit
    is the union over its slices of the ROI labels (all-false = no organ; OSE then pools the whole grid).
    """
    x = normalise_for_vision(torch.from_numpy(np.ascontiguousarray(image01)))
    lab = torch.from_numpy(np.ascontiguousarray(labels).astype(np.int32))
    ids = torch.tensor(list(roi_label_ids or []), dtype=torch.int32)
    if dim == "2d":
        units = x[None, None].expand(1, 3, *x.shape).contiguous()
        mask = torch.isin(lab, ids)[None] if len(ids) else torch.zeros(1, *x.shape, dtype=torch.bool)
        return units, mask
    units = compose_units(x)  # (N_u, 3, S, S)
    label_units = compose_units(lab)  # (N_u, 3, S, S)
    mask = torch.isin(label_units, ids).any(dim=1) if len(ids) else torch.zeros(
        units.shape[0], *x.shape[1:], dtype=torch.bool)
    return units, mask


def question_text(sample: dict) -> str:
    """The first human turn without the ``<image>`` placeholder line (the prompt format adds its own)."""
    text = sample["conversations"][0]["value"]
    return text.replace("<image>\n", "").replace("<image>", "").strip()


def answer_text(sample: dict) -> str:
    return sample["conversations"][1]["value"]


class PhantomVQADataset(torch.utils.data.Dataset):
    """Items: dict(sample, pixel_units, organ_mask, kind). ``image_override`` lets the robustness evaluation
    swap images ("mismatch") or replace them by noise without touching the samples."""

    def __init__(self, data_dir: str | Path, split: str = "train", max_samples: int | None = None,
                 samples: list[dict] | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.split = split
        self.samples = samples if samples is not None else read_jsonl(self.data_dir / f"{split}.jsonl")
        if max_samples is not None:
            self.samples = self.samples[:max_samples]
        self.cache = ImageCache(self.data_dir, split)
        self.image_override: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, sample: dict) -> tuple[np.ndarray, np.ndarray]:
        _, dim, index = parse_image_ref(sample["image"])
        return self.cache.image(dim, index)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        image, labels = self.image_override.get(index) or self.load_image(sample)
        units, mask = to_units(image, labels, sample["dim"], sample.get("roi_label_ids"))
        return {"sample": sample, "pixel_units": units, "organ_mask": mask, "kind": sample["dim"]}


class VQACollator:
    """Items -> the model batch: input_ids / attention_mask / labels (B, T), pixel_units and organ_masks as
    per-sample lists (2D and 3D samples mix in one batch), unit_kind per sample.

    ``with_answers=False`` builds left-padded generation prompts instead (evaluation).
    """

    def __init__(self, tokenizer, config, with_answers: bool = True) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.with_answers = with_answers

    def __call__(self, items: Sequence[dict]) -> dict:
        examples = []
        for item in items:
            sample = item["sample"]
            examples.append(encode_example(
                self.tokenizer, self.config, item["kind"], question_text(sample),
                answer_text(sample) if self.with_answers else None,
                num_units=int(item["pixel_units"].shape[0])))
        batch = collate_examples(examples, self.config.pad_token_id,
                                 padding_side="right" if self.with_answers else "left")
        if not self.with_answers:
            batch.pop("labels")
        batch["pixel_units"] = [item["pixel_units"] for item in items]
        batch["organ_masks"] = [item["organ_mask"] for item in items]
        batch["unit_kind"] = [item["kind"] for item in items]
        return batch


__all__ = ["PhantomVQADataset", "VQACollator", "ImageCache", "to_units", "image_ref", "parse_image_ref",
           "read_jsonl", "write_jsonl", "question_text", "answer_text", "IGNORE_INDEX"]
