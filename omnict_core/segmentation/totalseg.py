"""TotalSegmentator backend (optional extra ``totalseg``: ``pip install totalsegmentator==2.18.0``).

Weights come ONLY from a local folder (``weights_dir``); nothing is ever downloaded: the task folder is checked
before TotalSegmentator is called (it would otherwise fetch it from GitHub) and a missing folder raises
``MissingWeightsError`` naming the exact path. ``config.json`` with ``"send_usage_stats": false`` is written into
``TOTALSEG_HOME_DIR`` before any TotalSegmentator code runs (it posts usage statistics after every run otherwise).

Two environment facts shape this module (see /work/shared/ENVIRONMENT.md):
- with CPU torch, torchvision fails to import, and nnU-Net's trainer lookup walks every trainer module (one
  imports timm -> torchvision). ``_install_direct_trainer_lookup`` resolves the trainers TotalSegmentator uses by
  their module instead.
- nnU-Net spawns preprocessing/export worker processes, and Celery prefork workers are daemonic (they may not have
  children). By default inference therefore runs in a fresh ``python -m omnict_core.segmentation.totalseg``
  subprocess — a spawn-safe ``__main__`` — which also keeps torch's memory out of the long-lived worker.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from omnict_core.segmentation.base import (
    DEFAULT_AXIS_CODES,
    SegmentationError,
    SegmentationResult,
    Segmenter,
    smallest_label_dtype,
    validate_input,
)

TOTALSEG_VERSION = "2.18.0"
# TotalSegmentator 2.18 `total` task (totalsegmentator/map_tasks_config.py): fast = 3 mm single model.
TASK_FOLDERS = {
    True: ("Dataset297_TotalSegmentator_total_3mm_1559subj", "nnUNetTrainer_4000epochs_NoMirroring"),
}
FULL_RESOLUTION_TASKS = {  # fast=False: five 1.5 mm part models
    291: "Dataset291_TotalSegmentator_part1_organs_1559subj",
    292: "Dataset292_TotalSegmentator_part2_vertebrae_1532subj",
    293: "Dataset293_TotalSegmentator_part3_cardiac_1559subj",
    294: "Dataset294_TotalSegmentator_part4_muscles_1559subj",
    295: "Dataset295_TotalSegmentator_part5_ribs_1559subj",
}
FULL_RESOLUTION_TRAINER = "nnUNetTrainerNoMirroring"
PLANS_CONFIGURATION = "nnUNetPlans__3d_fullres"

# Trainer name -> module defining it; resolved directly so nnU-Net never walks (and imports) every trainer module.
TRAINER_MODULES = {
    "nnUNetTrainer": "nnunetv2.training.nnUNetTrainer.nnUNetTrainer",
    "nnUNetTrainerNoMirroring": "nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring",
    "nnUNetTrainer_4000epochs_NoMirroring":
        "nnunetv2.training.nnUNetTrainer.variants.training_length.nnUNetTrainer_Xepochs_NoMirroring",
    "nnUNetTrainer_2000epochs_NoMirroring":
        "nnunetv2.training.nnUNetTrainer.variants.training_length.nnUNetTrainer_Xepochs_NoMirroring",
}


class MissingWeightsError(SegmentationError):
    """The local TotalSegmentator weights folder lacks what the requested task needs."""


def _task_layout(fast: bool) -> list[tuple[str, str]]:
    """(dataset folder, trainer) of each model the `total` task runs: read from the installed TotalSegmentator
    when it is there (so a future layout change cannot silently make it download), else the 2.18 constants."""
    try:
        from totalsegmentator.map_tasks_config import TASK_CONFIGS, TASK_ID_WEIGHTS_CONFIGS
    except ImportError:
        if fast:
            return [TASK_FOLDERS[True]]
        return [(name, FULL_RESOLUTION_TRAINER) for name in FULL_RESOLUTION_TASKS.values()]
    mode = TASK_CONFIGS["total"]["sub_modes"]["fast" if fast else "default"]
    task_ids = mode["task_id"] if isinstance(mode["task_id"], list) else [mode["task_id"]]
    layout = []
    for task_id in task_ids:
        info = TASK_ID_WEIGHTS_CONFIGS[task_id]
        folder = str(Path(info["rel_path"]) / info["foldername"]) if info.get("rel_path") else info["foldername"]
        layout.append((folder, mode["trainer"]))
    return layout


def required_weight_files(weights_dir: Path, fast: bool = True) -> list[Path]:
    """Files nnU-Net reads for the `total` task, in TotalSegmentator's folder layout under ``weights_dir``."""
    files = []
    for dataset, trainer in _task_layout(fast):
        model = weights_dir / dataset / f"{trainer}__{PLANS_CONFIGURATION}"
        files += [model / "dataset.json", model / "plans.json", model / "fold_0" / "checkpoint_final.pth"]
    return files


def check_weights(weights_dir: Path | str | None, fast: bool = True) -> Path:
    if weights_dir is None:
        raise MissingWeightsError("TotalSegmentator backend needs a local weights folder (settings: "
                                  "model.totalseg_weights); weights are never downloaded")
    weights_dir = Path(weights_dir).expanduser().absolute()
    for path in required_weight_files(weights_dir, fast):
        if not path.is_file():
            raise MissingWeightsError(f"TotalSegmentator weights missing: {path} does not exist "
                                      f"(provision the task folder under {weights_dir}; nothing is downloaded)")
    return weights_dir


def prepare_environment(weights_dir: Path, home_dir: Path) -> None:
    """Point TotalSegmentator at the local weights and switch its usage statistics off before it runs."""
    home_dir.mkdir(parents=True, exist_ok=True)
    config_file = home_dir / "config.json"
    config: dict[str, Any] = {}
    if config_file.exists():
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError):
            config = {}
    config.update({"totalseg_id": config.get("totalseg_id", "totalseg_omnict_offline"), "send_usage_stats": False,
                   "prediction_counter": int(config.get("prediction_counter", 0)),
                   "statistics_disclaimer_shown": True})
    config_file.write_text(json.dumps(config, indent=4))
    os.environ["TOTALSEG_WEIGHTS_PATH"] = str(weights_dir)
    os.environ["TOTALSEG_HOME_DIR"] = str(home_dir)


def _install_direct_trainer_lookup() -> list[str]:
    """Make nnU-Net resolve trainer classes by module (see module docstring). Returns the list the lookup appends
    each resolved trainer name to, so a caller can prove nnU-Net's predictor asked for it."""
    import nnunetv2.inference.predict_from_raw_data as predict_module
    import nnunetv2.utilities.find_objects as find_objects

    resolved: list[str] = []

    def find_trainer(trainer_name: str) -> type:
        module_name = TRAINER_MODULES.get(trainer_name)
        if module_name is None:
            raise SegmentationError(f"unknown nnU-Net trainer {trainer_name!r} (known: {', '.join(TRAINER_MODULES)})")
        resolved.append(trainer_name)
        return getattr(importlib.import_module(module_name), trainer_name)

    find_objects.recursive_find_trainer_class_by_name = find_trainer
    predict_module.recursive_find_trainer_class_by_name = find_trainer
    return resolved


# ----------------------------------------------------------------------------------------------------------------
# NIfTI in, NIfTI out (TotalSegmentator's API works on RAS NIfTI images)

_RAS_VECTORS = {"R": (1, 0, 0), "L": (-1, 0, 0), "A": (0, 1, 0), "P": (0, -1, 0), "S": (0, 0, 1), "I": (0, 0, -1)}


def nifti_affine(spacing_zyx_mm: Sequence[float], axis_codes: Sequence[str]) -> np.ndarray:
    """RAS affine of a volume stored as NIfTI array (x, y, z) = our (z, y, x) transposed."""
    affine = np.eye(4)
    for column, (code, spacing) in enumerate(zip(reversed(list(axis_codes)), reversed(list(spacing_zyx_mm)))):
        affine[:3, column] = np.array(_RAS_VECTORS[code], dtype=float) * spacing
    return affine


def _predict_in_process(input_path: Path, output_path: Path, weights_dir: Path, home_dir: Path, fast: bool,
                        device: str, threads: int | None) -> dict[str, Any]:
    prepare_environment(weights_dir, home_dir)
    check_weights(weights_dir, fast)
    import nibabel as nib
    import torch

    if threads:
        torch.set_num_threads(threads)
    resolved = _install_direct_trainer_lookup()
    from totalsegmentator.python_api import totalsegmentator

    started = time.perf_counter()
    segmentation = totalsegmentator(str(input_path), None, ml=True, fast=fast, task="total", device=device,
                                    quiet=True, nr_thr_resamp=1, nr_thr_saving=1, skip_saving=True)
    nib.save(nib.Nifti1Image(np.asanyarray(segmentation.dataobj).astype(np.uint8), segmentation.affine),
             str(output_path))
    return {"trainers_resolved": resolved, "seconds": round(time.perf_counter() - started, 2),
            "totalsegmentator_version": _installed_version()}


def _installed_version() -> str:
    try:
        from importlib.metadata import version

        return version("TotalSegmentator")
    except Exception:  # noqa: BLE001 - metadata is informational only
        return TOTALSEG_VERSION


class TotalSegmentatorSegmenter(Segmenter):
    """TotalSegmentator v2 `total` task on local weights. ``fast=True`` is the 3 mm model (task 297)."""

    name = "totalsegmentator"

    def __init__(self, weights_dir: Path | str | None, *, fast: bool = True, device: str = "cpu",
                 home_dir: Path | str | None = None, subprocess_mode: bool = True, threads: int | None = None,
                 timeout_s: float = 3600.0) -> None:
        self.weights_dir = Path(weights_dir).expanduser().absolute() if weights_dir is not None else None
        self.fast = fast
        self.device = device
        # TotalSegmentator writes config.json (and its statistics counter) here; keep it next to the weights.
        self.home_dir = Path(home_dir) if home_dir is not None else (
            (self.weights_dir.parent / "totalseg_home") if self.weights_dir is not None else None)
        self.subprocess_mode = subprocess_mode
        self.threads = threads
        self.timeout_s = timeout_s
        self.last_run: dict[str, Any] = {}

    @property
    def version(self) -> str:
        return f"totalsegmentator-{TOTALSEG_VERSION}-total{'-fast' if self.fast else ''}"

    def segment(self, hu: np.ndarray, spacing_zyx_mm: Sequence[float],
                axis_codes: Sequence[str] = DEFAULT_AXIS_CODES) -> SegmentationResult:
        spacing, codes = validate_input(hu, spacing_zyx_mm, axis_codes)
        weights_dir = check_weights(self.weights_dir, self.fast)
        assert self.home_dir is not None
        import nibabel as nib
        from totalsegmentator.map_to_binary import class_map

        with tempfile.TemporaryDirectory(prefix="omnict-totalseg-") as tmp:
            input_path, output_path = Path(tmp) / "ct.nii.gz", Path(tmp) / "seg.nii.gz"
            image = nib.Nifti1Image(np.ascontiguousarray(hu.transpose(2, 1, 0)).astype(np.int16),
                                    nifti_affine(spacing, codes))
            nib.save(image, str(input_path))
            if self.subprocess_mode:
                self.last_run = self._run_subprocess(input_path, output_path, weights_dir)
            else:
                self.last_run = _predict_in_process(input_path, output_path, weights_dir, self.home_dir, self.fast,
                                                    self.device, self.threads)
            segmentation = np.asanyarray(nib.load(str(output_path)).dataobj)
        label_map = np.ascontiguousarray(segmentation.transpose(2, 1, 0))
        if label_map.shape != hu.shape:
            raise SegmentationError(f"TotalSegmentator returned shape {label_map.shape} for input {hu.shape}")
        names = class_map["total"]
        present = [int(v) for v in np.unique(label_map) if v != 0]
        unknown = [v for v in present if v not in names]
        if unknown:
            raise SegmentationError(f"TotalSegmentator returned label values outside the total task: {unknown}")
        label_map = label_map.astype(smallest_label_dtype(max(present, default=0)))
        return SegmentationResult(label_map=label_map, labels={v: names[v] for v in present}, backend=self.name,
                                  backend_version=self.version, spacing_zyx_mm=spacing, axis_codes=codes,
                                  notes={k: str(v) for k, v in self.last_run.items()})

    def _run_subprocess(self, input_path: Path, output_path: Path, weights_dir: Path) -> dict[str, Any]:
        command = [sys.executable, "-m", "omnict_core.segmentation.totalseg", "--input", str(input_path),
                   "--output", str(output_path), "--weights-dir", str(weights_dir), "--home-dir", str(self.home_dir),
                   "--device", self.device] + ([] if self.fast else ["--full"]) + (
                       ["--threads", str(self.threads)] if self.threads else [])
        completed = subprocess.run(command, capture_output=True, text=True, timeout=self.timeout_s)
        if completed.returncode != 0 or not output_path.exists():
            tail = (completed.stderr or completed.stdout)[-2000:]
            if "TotalSegmentator weights missing" in tail:
                raise MissingWeightsError(tail.strip().splitlines()[-1])
            raise SegmentationError(f"TotalSegmentator subprocess failed (exit {completed.returncode}): {tail}")
        info_line = [line for line in completed.stdout.splitlines() if line.startswith("OMNICT_TOTALSEG ")]
        return json.loads(info_line[-1].split(" ", 1)[1]) if info_line else {}


def _main(argv: Sequence[str] | None = None) -> int:
    """Spawn-safe entry point: ``python -m omnict_core.segmentation.totalseg --input CT.nii.gz --output SEG.nii.gz``."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--weights-dir", required=True, type=Path)
    parser.add_argument("--home-dir", required=True, type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full", action="store_true", help="1.5 mm five-part model instead of the 3 mm fast one")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        info = _predict_in_process(args.input, args.output, args.weights_dir, args.home_dir, not args.full,
                                   args.device, args.threads)
    except MissingWeightsError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    print("OMNICT_TOTALSEG " + json.dumps(info), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
