"""Per-organ measurements from a label map: volume (ml) and mean/std of Hounsfield units.

Combined organs (TotalSegmentator's ``combine_masks`` names: ``lung_left``, ``lung_right``, ``lung``,
``vertebrae``, ``ribs``) are added when their parts are present, so the classical backend (which finds whole lungs)
and the TotalSegmentator backend (which finds lobes) report comparable numbers. ``body`` (classical backend) marks
body voxels no organ claims; its measurement covers every labelled voxel, i.e. the whole body.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np

COMBINED: dict[str, tuple[str, ...]] = {
    "lung_left": ("lung_upper_lobe_left", "lung_lower_lobe_left"),
    "lung_right": ("lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right"),
    "lung": ("lung_left", "lung_right", "lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right",
             "lung_middle_lobe_right", "lung_lower_lobe_right"),
    "vertebrae": tuple(["sacrum"] + [f"vertebrae_{level}" for level in
                                     ["S1"] + [f"L{i}" for i in range(1, 6)] + [f"T{i}" for i in range(1, 13)]
                                     + [f"C{i}" for i in range(1, 8)]]),
    "ribs": tuple(f"rib_{side}_{i}" for side in ("left", "right") for i in range(1, 13)),
}


@dataclass(frozen=True)
class OrganMeasurement:
    name: str
    voxels: int
    volume_ml: float
    hu_mean: float
    hu_std: float
    combined: bool = False

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def measure_organs(label_map: np.ndarray, hu: np.ndarray, spacing_zyx_mm: Sequence[float],
                   labels: Mapping[int, str], *, add_combined: bool = True) -> dict[str, OrganMeasurement]:
    """Volume and HU mean/std of every labelled organ (label sums over slabs of the volume, :func:`_label_sums`)."""
    if label_map.shape != hu.shape:
        raise ValueError(f"label map {label_map.shape} and HU volume {hu.shape} are not aligned")
    voxel_ml = float(np.prod([float(s) for s in spacing_zyx_mm])) / 1000.0
    values = np.array(sorted(labels), dtype=np.int64)
    if values.size == 0:
        return {}
    counts, sums, squares = _label_sums(label_map, hu, values)
    per_value = {int(v): (float(c), float(s), float(q)) for v, c, s, q in zip(values, counts, sums, squares)}

    results: dict[str, OrganMeasurement] = {}
    by_name = {name: value for value, name in labels.items()}
    for value, name in labels.items():
        if name == "body":
            continue
        results[name] = _measurement(name, [per_value[int(value)]], voxel_ml, combined=False)
    if "body" in by_name:
        results["body"] = _measurement("body", list(per_value.values()), voxel_ml, combined=False)
    if add_combined:
        for name, parts in COMBINED.items():
            present = [p for p in parts if p in by_name]
            if name in by_name or not present:
                continue
            results[name] = _measurement(name, [per_value[int(by_name[p])] for p in present], voxel_ml, combined=True)
    return results


# Voxels per pass of _label_sums: its float64 temporaries are ~16 MB and reused from pass to pass, where whole-volume
# float64 copies (hu, hu², ones: 1.8 GB for 300x512x512) cost seconds of fresh memory on every study.
SLAB_VOXELS = 1 << 21


def _label_sums(label_map: np.ndarray, hu: np.ndarray, values: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel count, sum of HU and sum of HU² (float64 accumulators) of each label in ``values``, in slabs of
    whole planes along the first axis."""
    size = int(values.max()) + 1
    counts, sums, squares = (np.zeros(size, np.float64) for _ in range(3))
    plane = max(1, int(np.prod(label_map.shape[1:])))
    step = max(1, SLAB_VOXELS // plane)
    for z in range(0, label_map.shape[0], step):
        labels = np.asarray(label_map[z:z + step]).ravel()
        if labels.dtype.kind == "i" and labels.size and labels.min() < 0:
            raise ValueError("label maps hold non-negative label values")
        h = np.asarray(hu[z:z + step], dtype=np.float64).ravel()
        counts += np.bincount(labels, minlength=size)[:size]
        sums += np.bincount(labels, weights=h, minlength=size)[:size]
        squares += np.bincount(labels, weights=h * h, minlength=size)[:size]
    return counts[values], sums[values], squares[values]


def _measurement(name: str, parts: list[tuple[float, float, float]], voxel_ml: float,
                 combined: bool) -> OrganMeasurement:
    count = sum(p[0] for p in parts)
    total = sum(p[1] for p in parts)
    squares = sum(p[2] for p in parts)
    if count == 0:
        return OrganMeasurement(name, 0, 0.0, float("nan"), float("nan"), combined)
    mean = total / count
    variance = max(0.0, squares / count - mean * mean)
    return OrganMeasurement(name, int(count), round(count * voxel_ml, 3), round(mean, 2), round(variance ** 0.5, 2),
                            combined)
