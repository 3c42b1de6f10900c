"""The one segmentation interface: a CT volume in Hounsfield units goes in, an organ label map aligned voxel for
voxel with that volume comes out, with TotalSegmentator v2 (`total` task) label names.

Array convention (the whole of ``omnict_core``): volumes are ``(z, y, x)`` numpy arrays, ``spacing_zyx_mm`` gives the
voxel size along those axes, and ``axis_codes`` says towards which patient direction (DICOM LPS letters) the index
of each axis grows. A DICOM axial series sorted by ascending slice position with the usual row/column cosines
(1,0,0)/(0,1,0) is ``("S", "P", "L")``: z goes to the head, y to the back, x to the patient's left.
Backends need the orientation only for anatomical rules (which lung is the left one); the label map itself is
always returned in the caller's array order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

# DICOM patient directions; the opposite letter is the same axis reversed.
OPPOSITE = {"L": "R", "R": "L", "P": "A", "A": "P", "S": "I", "I": "S"}
DEFAULT_AXIS_CODES: tuple[str, str, str] = ("S", "P", "L")


# TotalSegmentator v2 `total` task label values and names (totalsegmentator 2.18 map_to_binary.class_map['total']),
# copied so that label names are available without the optional TotalSegmentator install.
TOTAL_LABELS: dict[int, str] = {
    1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver", 6: "stomach", 7: "pancreas",
    8: "adrenal_gland_right", 9: "adrenal_gland_left", 10: "lung_upper_lobe_left", 11: "lung_lower_lobe_left",
    12: "lung_upper_lobe_right", 13: "lung_middle_lobe_right", 14: "lung_lower_lobe_right", 15: "esophagus",
    16: "trachea", 17: "thyroid_gland", 18: "small_bowel", 19: "duodenum", 20: "colon", 21: "urinary_bladder",
    22: "prostate", 23: "kidney_cyst_left", 24: "kidney_cyst_right", 25: "sacrum", 26: "vertebrae_S1",
    27: "vertebrae_L5", 28: "vertebrae_L4", 29: "vertebrae_L3", 30: "vertebrae_L2", 31: "vertebrae_L1",
    32: "vertebrae_T12", 33: "vertebrae_T11", 34: "vertebrae_T10", 35: "vertebrae_T9", 36: "vertebrae_T8",
    37: "vertebrae_T7", 38: "vertebrae_T6", 39: "vertebrae_T5", 40: "vertebrae_T4", 41: "vertebrae_T3",
    42: "vertebrae_T2", 43: "vertebrae_T1", 44: "vertebrae_C7", 45: "vertebrae_C6", 46: "vertebrae_C5",
    47: "vertebrae_C4", 48: "vertebrae_C3", 49: "vertebrae_C2", 50: "vertebrae_C1", 51: "heart", 52: "aorta",
    53: "pulmonary_vein", 54: "brachiocephalic_trunk", 55: "subclavian_artery_right", 56: "subclavian_artery_left",
    57: "common_carotid_artery_right", 58: "common_carotid_artery_left", 59: "brachiocephalic_vein_left",
    60: "brachiocephalic_vein_right", 61: "atrial_appendage_left", 62: "superior_vena_cava",
    63: "inferior_vena_cava", 64: "portal_vein_and_splenic_vein", 65: "iliac_artery_left", 66: "iliac_artery_right",
    67: "iliac_vena_left", 68: "iliac_vena_right", 69: "humerus_left", 70: "humerus_right", 71: "scapula_left",
    72: "scapula_right", 73: "clavicula_left", 74: "clavicula_right", 75: "femur_left", 76: "femur_right",
    77: "hip_left", 78: "hip_right", 79: "spinal_cord", 80: "gluteus_maximus_left", 81: "gluteus_maximus_right",
    82: "gluteus_medius_left", 83: "gluteus_medius_right", 84: "gluteus_minimus_left", 85: "gluteus_minimus_right",
    86: "autochthon_left", 87: "autochthon_right", 88: "iliopsoas_left", 89: "iliopsoas_right", 90: "brain",
    91: "skull", 92: "rib_left_1", 93: "rib_left_2", 94: "rib_left_3", 95: "rib_left_4", 96: "rib_left_5",
    97: "rib_left_6", 98: "rib_left_7", 99: "rib_left_8", 100: "rib_left_9", 101: "rib_left_10", 102: "rib_left_11",
    103: "rib_left_12", 104: "rib_right_1", 105: "rib_right_2", 106: "rib_right_3", 107: "rib_right_4",
    108: "rib_right_5", 109: "rib_right_6", 110: "rib_right_7", 111: "rib_right_8", 112: "rib_right_9",
    113: "rib_right_10", 114: "rib_right_11", 115: "rib_right_12", 116: "sternum", 117: "costal_cartilages",
}


@dataclass
class SegmentationResult:
    """An organ label map aligned to the input volume.

    ``label_map`` has the input's shape ``(z, y, x)``; 0 is background, ``labels`` maps each value present to its
    TotalSegmentator v2 name (only organs the backend actually found are listed).
    """

    label_map: np.ndarray
    labels: dict[int, str]
    backend: str
    backend_version: str
    spacing_zyx_mm: tuple[float, float, float]
    axis_codes: tuple[str, str, str] = DEFAULT_AXIS_CODES
    notes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.label_map.ndim != 3:
            raise ValueError(f"label_map must be 3-D (z, y, x), got shape {self.label_map.shape}")
        if self.label_map.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"label_map must be uint8 or uint16, got {self.label_map.dtype}")

    @property
    def names(self) -> list[str]:
        return [self.labels[value] for value in sorted(self.labels)]

    def value_of(self, name: str) -> int:
        """Label value of organ ``name``; KeyError if this result does not contain it."""
        for value, label_name in self.labels.items():
            if label_name == name:
                return value
        raise KeyError(f"organ {name!r} not in this segmentation (have: {', '.join(self.names)})")

    def mask(self, name: str) -> np.ndarray:
        """Boolean ``(z, y, x)`` mask of one organ."""
        return self.label_map == self.value_of(name)


class SegmentationError(RuntimeError):
    """A backend could not segment this volume (bad input, missing weights, failed inference)."""


class Segmenter(ABC):
    """One organ segmentation backend."""

    name: str = "base"

    @property
    @abstractmethod
    def version(self) -> str:
        """Backend version string recorded with every result."""

    @abstractmethod
    def segment(
        self,
        hu: np.ndarray,
        spacing_zyx_mm: Sequence[float],
        axis_codes: Sequence[str] = DEFAULT_AXIS_CODES,
    ) -> SegmentationResult:
        """Segment ``hu`` (Hounsfield units, ``(z, y, x)``); the label map has ``hu.shape``."""


def validate_input(hu: np.ndarray, spacing_zyx_mm: Sequence[float], axis_codes: Sequence[str]) -> tuple[
        tuple[float, float, float], tuple[str, str, str]]:
    """Clear errors for inputs no backend can use; returns normalised spacing and axis codes."""
    if not isinstance(hu, np.ndarray) or hu.ndim != 3:
        raise SegmentationError(f"expected a 3-D (z, y, x) HU array, got {getattr(hu, 'shape', type(hu))}")
    if min(hu.shape) < 1 or hu.size == 0:
        raise SegmentationError(f"empty volume of shape {hu.shape}")
    spacing = tuple(float(s) for s in spacing_zyx_mm)
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise SegmentationError(f"spacing must be three positive numbers in mm, got {spacing_zyx_mm!r}")
    codes = tuple(str(c).upper() for c in axis_codes)
    if len(codes) != 3 or any(c not in OPPOSITE for c in codes) or len({_axis_of(c) for c in codes}) != 3:
        raise SegmentationError(
            f"axis_codes must name three different patient axes (L/R, A/P, S/I), got {axis_codes!r}")
    return spacing, codes  # type: ignore[return-value]


def _axis_of(code: str) -> str:
    return {"L": "LR", "R": "LR", "A": "AP", "P": "AP", "S": "SI", "I": "SI"}[code]


def axis_codes_from_direction(direction_zyx_lps: np.ndarray) -> tuple[str, str, str]:
    """Nearest patient direction of each array axis, from a 3x3 matrix whose column i is the LPS unit vector along
    array axis i (z, y, x). Oblique acquisitions get their closest axis, which is what anatomical rules need."""
    codes = []
    for column in np.asarray(direction_zyx_lps, dtype=float).T:
        k = int(np.argmax(np.abs(column)))
        positive = "LPS"[k]
        codes.append(positive if column[k] > 0 else OPPOSITE[positive])
    return tuple(codes)  # type: ignore[return-value]


def axis_codes_from_affine_zyx(affine_zyx_lps: np.ndarray) -> tuple[str, str, str]:
    """Axis codes from a 4x4 affine mapping (z, y, x, 1) voxel indices to LPS millimetres."""
    return axis_codes_from_direction(np.asarray(affine_zyx_lps, dtype=float)[:3, :3])


def axis_codes_from_ct_volume(volume: object) -> tuple[str, str, str]:
    """Axis codes of an ``omnict_core.io.CtVolume``: its ``direction`` columns are the LPS directions of the x, y
    and slice (z) indices, i.e. our (z, y, x) axes in reverse order."""
    direction = np.asarray(getattr(volume, "direction"), dtype=float)
    return axis_codes_from_direction(direction[:, ::-1])


def segment_ct_volume(segmenter: "Segmenter", volume: object) -> SegmentationResult:
    """Run ``segmenter`` on an ``omnict_core.io.CtVolume`` (hu (z, y, x), spacing (dz, dy, dx), direction)."""
    return segmenter.segment(np.asarray(getattr(volume, "hu")), tuple(getattr(volume, "spacing")),
                             axis_codes_from_ct_volume(volume))


def reorient(array: np.ndarray, axis_codes: Sequence[str], target: Sequence[str]) -> np.ndarray:
    """Transpose/flip ``array`` (given in ``axis_codes``) so its axes run along ``target``. Views, no copies."""
    source = list(axis_codes)
    order = []
    flips = []
    for want in target:
        for i, have in enumerate(source):
            if _axis_of(have) == _axis_of(want):
                order.append(i)
                flips.append(have != want)
                break
    out = np.transpose(array, order)
    for axis, flip in enumerate(flips):
        if flip:
            out = np.flip(out, axis)
    return out


def smallest_label_dtype(max_value: int) -> type:
    return np.uint8 if max_value < 256 else np.uint16
