"""Classical organ segmentation: Hounsfield thresholds, connected components and anatomical rules. No weights.

It runs on a working grid of about 3 mm (block means of the input), then paints the masks back onto the input
grid; threshold-defined organs (body, lungs, trachea) get their border re-decided at full resolution. Every organ
is returned only when its rules actually found it (and, for the soft-tissue organs, its volume is in an adult range).

Names are TotalSegmentator v2 names; ``lung_left``/``lung_right``/``vertebrae`` are the combined names of
``totalsegmentator.libs.combine_masks`` (lobes and single vertebrae are not separated). Dice figures are against
TotalSegmentator's own output shipped in its sdist: A = example_ct.nii.gz (3 mm, non-contrast abdomen/pelvis with
the lung bases), D = the 20-slice contrast DICOM series (upper abdomen), C = aorta_report CTA (1.5 mm chest/upper
abdomen; heart reference only). How far to trust each organ:

- ``body``: > -500 HU, couch removed by an in-plane opening, holes filled per slice; arms kept. Reliable. Its label
  marks body voxels no organ claims; measurements treat "body" as every labelled voxel.
- ``lung_left`` / ``lung_right``: internal air with lung texture (few voxels below -950 HU, unlike bowel gas),
  split by components, then by erosion, then at the mid-sagittal plane. Dice A 0.95/0.96. Reliable on normal
  lungs; severe emphysema (many voxels below -950 HU) can be taken for gas and dropped.
- ``trachea``: the air column followed slice by slice from the neck to the carina. Plausible on C (31 ml, midline,
  above the lungs' centre); absent when the scan starts below the apices. Includes larynx air if it is in the scan.
- ``liver``: largest soft-tissue core of the right upper abdomen after a 9 mm erosion, grown back within the
  core's own density range. Dice A 0.87, D 0.92.
- ``spleen``: the same rule in the left posterior-lateral upper abdomen, at the liver's levels. Dice A 0.92, D 0.90.
- ``kidney_left`` / ``kidney_right``: soft-tissue pieces wrapped in fat 55-110 mm lateral to the spine at the level
  of the lower liver. Dice A 0.89/0.71 (only one scan with kidneys to test on: treat as approximate).
- ``heart``: soft tissue/blood between the lungs below the carina, in front of the spine. Dice C 0.76; takes in
  the roots of the great vessels.
- ``vertebrae``: bone (> 200 HU, plus cancellous bone > 100 HU joined to it) around a per-slice spine axis.
  Dice A 0.72, D 0.65. On contrast CT a descending aorta touching the vertebral bodies leaks in (on C about 15 %
  of the classical vertebrae volume is TotalSegmentator's aorta); rib heads and sacro-iliac joints leak in too.

Never returned: lobes, single vertebrae and ribs, vessels, stomach, bowel, pancreas — use the TotalSegmentator
backend for those.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

from omnict_core.segmentation.base import (
    DEFAULT_AXIS_CODES,
    SegmentationResult,
    Segmenter,
    reorient,
    validate_input,
)

VERSION = "classical-1"
# Canonical working orientation: z to the head, y to the back, x to the patient's left.
CANONICAL = ("S", "P", "L")

# Label values: TotalSegmentator v2 `total` ids where the name exists there, fixed values above 117 otherwise.
LABEL_VALUES: dict[str, int] = {
    "spleen": 1,
    "kidney_right": 2,
    "kidney_left": 3,
    "liver": 5,
    "trachea": 16,
    "heart": 51,
    "lung_left": 118,
    "lung_right": 119,
    "vertebrae": 120,
    "body": 121,
}

AIR_HU = -400.0  # lung parenchyma and gas; soft tissue and fat are above
BODY_HU = -500.0
BONE_HU = 200.0
GAS_HU = -950.0  # pure gas; normal lung has few voxels below it even at 3 mm

_IN_PLANE = np.zeros((3, 3, 3), bool)
_IN_PLANE[1] = ndi.generate_binary_structure(2, 1)
_IN_PLANE_8 = np.zeros((3, 3, 3), bool)
_IN_PLANE_8[1] = True
_BALL = ndi.generate_binary_structure(3, 1)


@dataclass(frozen=True)
class ClassicalParams:
    working_spacing_mm: float = 3.0
    min_lung_ml: float = 15.0
    max_lung_gas_fraction: float = 0.35
    liver_min_ml: float = 300.0
    liver_max_ml: float = 4500.0
    spleen_min_ml: float = 60.0
    spleen_max_ml: float = 1200.0
    kidney_min_ml: float = 50.0
    kidney_max_ml: float = 400.0
    heart_min_ml: float = 250.0
    heart_max_ml: float = 1500.0


class ClassicalSegmenter(Segmenter):
    """Threshold/connected-component organ segmentation that needs no weights (see module docstring)."""

    name = "classical"

    def __init__(self, params: ClassicalParams | None = None) -> None:
        self.params = params or ClassicalParams()

    @property
    def version(self) -> str:
        return VERSION

    def segment(self, hu: np.ndarray, spacing_zyx_mm: Sequence[float],
                axis_codes: Sequence[str] = DEFAULT_AXIS_CODES) -> SegmentationResult:
        spacing, codes = validate_input(hu, spacing_zyx_mm, axis_codes)
        started = time.perf_counter()
        canonical = reorient(hu, codes, CANONICAL)
        canonical_spacing = _reorient_spacing(spacing, codes, CANONICAL)
        labels_canonical, found, notes = _segment_canonical(canonical, canonical_spacing, self.params)
        # Back to the caller's orientation: the inverse permutation/flip is reorient with the roles swapped.
        label_map = np.ascontiguousarray(reorient(labels_canonical, CANONICAL, codes))
        labels = {LABEL_VALUES[name]: name for name in sorted(found, key=LABEL_VALUES.get)}
        notes["seconds"] = f"{time.perf_counter() - started:.2f}"
        return SegmentationResult(label_map=label_map, labels=labels, backend=self.name, backend_version=VERSION,
                                  spacing_zyx_mm=spacing, axis_codes=codes, notes=notes)


def _reorient_spacing(spacing: tuple[float, float, float], codes: Sequence[str],
                      target: Sequence[str]) -> tuple[float, float, float]:
    pairs = {"L": 0, "R": 0, "P": 1, "A": 1, "S": 2, "I": 2}
    by_axis = {pairs[c]: s for c, s in zip(codes, spacing)}
    return tuple(by_axis[pairs[t]] for t in target)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------------
# Working grid


def _block_factors(spacing: Sequence[float], target_mm: float) -> tuple[int, int, int]:
    return tuple(max(1, int(round(target_mm / s))) for s in spacing)  # type: ignore[return-value]


def _block_mean(volume: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Mean over factor-sized blocks, one axis at a time (reshape-mean is numpy's fast path); a partial last block
    along an axis is averaged on its own, so no padded copy of the input is made."""
    out = volume
    for axis, f in enumerate(factors):
        if f == 1:
            continue
        n = out.shape[axis]
        whole = (n // f) * f
        lead = (slice(None),) * axis
        head = out[lead + (slice(0, whole),)]
        shape = list(head.shape)
        shape[axis: axis + 1] = [whole // f, f]
        parts = [head.reshape(shape).mean(axis=axis + 1, dtype=np.float32)]
        if whole < n:
            tail = out[lead + (slice(whole, n),)]
            parts.append(tail.mean(axis=axis, keepdims=True, dtype=np.float32))
        out = np.concatenate(parts, axis=axis) if len(parts) > 1 else parts[0]
    return out.astype(np.float32, copy=False)


def _upsample(mask: np.ndarray, factors: tuple[int, int, int], shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour upsampling back to the input grid."""
    out = mask
    for axis, f in enumerate(factors):
        if f > 1:
            out = np.repeat(out, f, axis=axis)
    return out[: shape[0], : shape[1], : shape[2]]


# ----------------------------------------------------------------------------------------------------------------
# The pipeline


def _segment_canonical(hu: np.ndarray, spacing: tuple[float, float, float],
                       params: ClassicalParams) -> tuple[np.ndarray, set[str], dict[str, str]]:
    factors = _block_factors(spacing, params.working_spacing_mm)
    work = _block_mean(hu, factors)
    work_spacing = tuple(s * f for s, f in zip(spacing, factors))
    voxel_ml = float(np.prod(work_spacing)) / 1000.0
    notes: dict[str, str] = {"working_spacing_mm": ",".join(f"{s:.2f}" for s in work_spacing)}

    body = _body(work, work_spacing)
    if not body.any():  # nothing denser than air: no patient in the field of view
        return np.zeros(hu.shape, np.uint8), set(), notes
    organs: dict[str, np.ndarray] = {}
    lungs = _lung_air(work, body, voxel_ml, params)
    trachea = _trachea(work, body, lungs, work_spacing) if lungs.any() else np.zeros_like(body)
    if trachea.any():
        organs["trachea"] = trachea
        lungs &= ~ndi.binary_dilation(trachea, _IN_PLANE_8)
    if lungs.any():
        left, right = _split_lungs(lungs, body, voxel_ml, params)
        for name, mask in (("lung_left", left), ("lung_right", right)):
            if mask.sum() * voxel_ml >= params.min_lung_ml:
                organs[name] = _fill_vessel_holes(mask)
    vertebrae = _vertebrae(work, body, work_spacing)
    if vertebrae.any():
        organs["vertebrae"] = vertebrae
    liver = _liver(work, body, organs, work_spacing, params)
    if liver.any():
        organs["liver"] = liver
    spleen = _spleen(work, body, organs, work_spacing, params)
    if spleen.any():
        organs["spleen"] = spleen
    for name, mask in _kidneys(work, body, organs, work_spacing, params).items():
        organs[name] = mask
    heart = _heart(work, body, organs, work_spacing, params)
    if heart.any():
        organs["heart"] = heart

    label_map, found = _compose_full_resolution(hu, body, organs, factors)
    return label_map, found, notes


def _compose_full_resolution(hu: np.ndarray, body: np.ndarray, organs: dict[str, np.ndarray],
                             factors: tuple[int, int, int]) -> tuple[np.ndarray, set[str]]:
    """Paint the working-grid masks onto the input grid. Threshold-defined organs get their border re-decided at
    full resolution (a 1-voxel working-grid band), so edges are not blocky; the rest is nearest-neighbour."""
    shape = hu.shape
    label_map = np.zeros(shape, np.uint8)
    refine_threshold = {"body": ("gt", BODY_HU), "lung_left": ("lt", AIR_HU), "lung_right": ("lt", AIR_HU),
                        "trachea": ("lt", AIR_HU)}

    boxes: dict[str, tuple[slice, ...]] = {}

    def full_box_of(work_box: tuple[slice, ...]) -> tuple[slice, ...]:
        return tuple(slice(b.start * f, min(b.stop * f, n)) for b, f, n in zip(work_box, factors, shape))

    def paint(name: str, mask: np.ndarray) -> None:
        # Work inside the organ's bounding box (plus the 1-voxel band): most organs are small next to the volume.
        box = ndi.find_objects(ndi.binary_dilation(mask, _BALL).astype(np.uint8))
        if not box or box[0] is None:
            return
        boxes[name] = full_box_of(box[0])
        work_box = box[0]
        full_box = boxes[name]
        sub_shape = tuple(b.stop - b.start for b in full_box)
        sub_mask = mask[work_box]
        target = label_map[full_box]
        rule = refine_threshold.get(name)
        if rule is None or factors == (1, 1, 1):
            target[_upsample(sub_mask, factors, sub_shape)] = LABEL_VALUES[name]
            return
        padded = np.pad(sub_mask, 1)  # erosion/dilation must see the box edge as outside
        inner = _upsample(ndi.binary_erosion(padded, _BALL)[1:-1, 1:-1, 1:-1], factors, sub_shape)
        band = _upsample(ndi.binary_dilation(padded, _BALL)[1:-1, 1:-1, 1:-1], factors, sub_shape) & ~inner
        side, threshold = rule
        sub_hu = hu[full_box]
        band &= (sub_hu > threshold) if side == "gt" else (sub_hu < threshold)
        target[inner | band] = LABEL_VALUES[name]

    paint("body", body)
    # Larger, less certain organs first so the smaller, surer ones win where they overlap.
    for name in ("liver", "spleen", "kidney_left", "kidney_right", "heart", "vertebrae", "lung_left", "lung_right",
                 "trachea"):
        if name in organs:
            paint(name, organs[name])
    # An organ counts as found only if some of it survived the painting (checked inside its own box: cheap).
    found = {name for name, box in boxes.items() if np.any(label_map[box] == LABEL_VALUES[name])}
    return label_map, found


# ----------------------------------------------------------------------------------------------------------------
# Body


def _body(work: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Patient body: > -500 HU, couch removed, holes (lungs, gas) filled per slice."""
    dense = work > BODY_HU
    # The couch is a thin plate; an in-plane opening of ~6 mm removes it and thin blankets/tubes.
    radius = max(1, int(round(6.0 / max(spacing[1], spacing[2]))))
    opened = ndi.binary_opening(dense, _IN_PLANE, iterations=radius)
    labels, count = ndi.label(opened)
    if count == 0:
        return np.zeros_like(dense)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    # Arms lifted beside the head are separate components; keep every piece at least 5 % of the trunk.
    keep = sizes >= max(1, 0.05 * sizes.max())
    keep[0] = False
    body = keep[labels]
    body = ndi.binary_dilation(body, _IN_PLANE, iterations=radius) & dense
    return ndi.binary_fill_holes(body, _IN_PLANE)


# ----------------------------------------------------------------------------------------------------------------
# Lungs and airway


def _lung_air(work: np.ndarray, body: np.ndarray, voxel_ml: float, params: ClassicalParams) -> np.ndarray:
    """Air inside the body that looks like lung: large components with few pure-gas voxels (bowel gas is mostly
    pure gas; lung parenchyma sits around -850 HU). The trachea and bronchi are still included here."""
    air = (work < AIR_HU) & body
    labels, count = ndi.label(air)
    if count == 0:
        return np.zeros_like(air)
    sizes = np.bincount(labels.ravel())
    gas = np.bincount(labels.ravel(), weights=(work < GAS_HU).ravel())
    candidate = (sizes * voxel_ml >= params.min_lung_ml) & (gas <= params.max_lung_gas_fraction * sizes)
    # Emphysema raises the pure-gas fraction of a lung; a big air space (>= 600 ml) that reaches the upper half of
    # the trunk and is not almost all pure gas (as a distended stomach or colon is) is still lung.
    body_z = np.nonzero(body.any(axis=(1, 2)))[0]
    upper_half = 0.5 * (body_z.min() + body_z.max())
    tops = ndi.maximum(np.arange(air.shape[0])[:, None, None] * np.ones_like(air, dtype=np.int32), labels,
                       np.arange(count + 1))
    candidate |= (sizes * voxel_ml >= 600.0) & (gas <= 0.9 * sizes) & (np.asarray(tops) >= upper_half)
    candidate[0] = False
    if not candidate.any():
        return np.zeros_like(air)
    lungs = candidate[labels]
    # Air outside the patient that the per-slice hole filling enclosed (between arms and trunk, under the back on
    # the couch) touches the body surface; lungs never do.
    surface = body & ~ndi.binary_erosion(body, _IN_PLANE)
    touching = np.unique(labels[surface & lungs])
    if touching.size:
        lungs &= ~np.isin(labels, touching[touching > 0])
    return lungs


def _trachea(work: np.ndarray, body: np.ndarray, lungs: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Follow the tracheal air column from the neck down to the carina, one axial slice at a time."""
    pixel_cm2 = spacing[1] * spacing[2] / 100.0
    # Pure gas only: the tracheal lumen is ~-1000 HU even at 3 mm, emphysematous lung next to it is not.
    air = (work < -900.0) & body
    lung_z = np.nonzero(lungs.any(axis=(1, 2)))[0]
    apex = int(lung_z.max())
    top = min(work.shape[0] - 1, apex + int(round(150.0 / spacing[0])))
    result = np.zeros_like(air)
    previous: np.ndarray | None = None
    previous_area = 0.0
    for z in range(top, int(lung_z.min()) - 1, -1):
        labels, count = ndi.label(air[z])
        if count == 0:
            if previous is not None:
                break
            continue
        if previous is None:
            component = _tracheal_candidate(labels, count, body[z], pixel_cm2, spacing)
            if component is None:
                continue
            mask = labels == component
        else:
            overlapping = np.unique(labels[previous & (labels > 0)])
            overlapping = overlapping[overlapping > 0]
            if overlapping.size != 1:  # 0: the column ended; 2+: the carina
                break
            mask = labels == overlapping[0]
            area = mask.sum() * pixel_cm2
            if area > max(2.5 * previous_area, 7.0):  # widened into lung: past the carina
                break
        result[z] = mask
        previous = mask
        previous_area = mask.sum() * pixel_cm2
    length_mm = result.any(axis=(1, 2)).sum() * spacing[0]
    # A real trachea is ~10-12 cm long; a short column is bowel gas or a bronchus.
    return result if length_mm >= 30.0 and result[: apex + 1].any() else np.zeros_like(result)


def _tracheal_candidate(labels: np.ndarray, count: int, body_slice: np.ndarray, pixel_cm2: float,
                        spacing: tuple[float, ...]) -> int | None:
    """A compact air component of tracheal size close to the body's left-right midline."""
    if not body_slice.any():
        return None
    body_x = np.nonzero(body_slice.any(axis=0))[0]
    mid_x = 0.5 * (body_x.min() + body_x.max())
    index = np.arange(1, count + 1)
    areas = ndi.sum_labels(np.ones_like(labels), labels, index) * pixel_cm2
    centres = ndi.center_of_mass(np.ones_like(labels), labels, index)
    best, best_distance = None, None
    for label, area, (cy, cx) in zip(index, areas, centres):
        distance_mm = abs(cx - mid_x) * spacing[2]
        if 0.5 <= area <= 6.0 and distance_mm <= 25.0:
            if best_distance is None or distance_mm < best_distance:
                best, best_distance = int(label), distance_mm
    return best


def _split_lungs(lungs: np.ndarray, body: np.ndarray, voxel_ml: float,
                 params: ClassicalParams) -> tuple[np.ndarray, np.ndarray]:
    """Left and right lung: separate components if they are; else erode until they come apart (anterior junction,
    main bronchi) and give each voxel to the nearer core; else cut at the mid-sagittal plane."""
    cores = _two_cores(lungs, voxel_ml, params)
    if cores is None:
        x = np.arange(lungs.shape[2])
        body_x = np.nonzero(body.any(axis=(0, 1)))[0]
        mid = 0.5 * (body_x.min() + body_x.max())
        left = lungs & (x > mid)[None, None, :]
        return left, lungs & ~left
    a, b = cores
    seeds = np.zeros(lungs.shape, np.uint8)
    seeds[a] = 1
    seeds[b] = 2
    _, nearest = ndi.distance_transform_edt(seeds == 0, return_indices=True)
    owner = seeds[tuple(nearest)]
    mask_a, mask_b = lungs & (owner == 1), lungs & (owner == 2)
    x = np.arange(lungs.shape[2])
    a_is_left = (mask_a * x).sum() / max(mask_a.sum(), 1) > (mask_b * x).sum() / max(mask_b.sum(), 1)
    return (mask_a, mask_b) if a_is_left else (mask_b, mask_a)


def _two_cores(lungs: np.ndarray, voxel_ml: float, params: ClassicalParams) -> tuple[np.ndarray, np.ndarray] | None:
    current = lungs
    for _ in range(6):
        labels, count = ndi.label(current)
        if count >= 2:
            sizes = np.bincount(labels.ravel())
            sizes[0] = 0
            order = np.argsort(sizes)[::-1]
            first, second = order[0], order[1]
            if sizes[second] >= 0.15 * sizes[first] and sizes[second] * voxel_ml >= params.min_lung_ml / 2:
                return labels == first, labels == second
        current = ndi.binary_erosion(current, _IN_PLANE)
        if not current.any():
            break
    return None


def _fill_vessel_holes(mask: np.ndarray) -> np.ndarray:
    """Vessels inside the lung belong to the lung; fill them per slice (3-D filling would also close the hilum)."""
    return ndi.binary_fill_holes(mask, _IN_PLANE)


# ----------------------------------------------------------------------------------------------------------------
# Spine


def _vertebrae(work: np.ndarray, body: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Bone around a per-slice spine axis: the vertebral column sits in the posterior midline of every trunk slice.
    Cortical bone (> 200 HU) finds the pieces; cancellous bone (100-200 HU, often below the bone threshold in older
    patients) joins when it touches them."""
    bone = (work > BONE_HU) & body
    spongy = (work > 100.0) & body
    nz, ny, nx = work.shape
    result = np.zeros_like(bone)
    if not bone.any():
        return result
    half_width = int(round(40.0 / spacing[2]))
    band = int(round(15.0 / spacing[2]))
    centres = np.full((nz, 2), np.nan)
    for z in range(nz):
        if not body[z].any():
            continue
        body_x = np.nonzero(body[z].any(axis=0))[0]
        mid = int(round(0.5 * (body_x.min() + body_x.max())))
        column = bone[z][:, max(0, mid - band): mid + band + 1]
        rows = np.nonzero(column.sum(axis=1) >= 2)[0]
        if rows.size == 0:
            continue
        body_y = np.nonzero(body[z].any(axis=1))[0]
        # The spine is the bone on the midline in the posterior half (the sternum is anterior).
        posterior_half = rows[rows > 0.5 * (body_y.min() + body_y.max())]
        if posterior_half.size == 0:
            continue
        # Left-right position from the posterior elements (last 30 mm of midline bone: laminae, spinous
        # process): nothing else is there, whereas a contrast-filled aorta beside the body would pull it sideways.
        arch_rows = posterior_half[posterior_half >= posterior_half.max() - 30.0 / spacing[1]]
        ys_arch, xs_arch = np.nonzero(column[arch_rows])
        centres[z] = (posterior_half.mean(), xs_arch.mean() + max(0, mid - band))
    valid = ~np.isnan(centres[:, 0])
    if valid.sum() < 3:
        return result
    # Smooth the axis along z: a vertebra does not jump sideways between slices.
    for k in range(2):
        centres[valid, k] = ndi.median_filter(centres[valid, k], size=min(7, int(valid.sum()) | 1), mode="nearest")
    depth_front = int(round(40.0 / spacing[1]))
    depth_back = int(round(45.0 / spacing[1]))
    xs = np.arange(nx)
    ys = np.arange(ny)
    boxes = np.zeros_like(bone)
    for z in np.nonzero(valid)[0]:
        cy, cx = centres[z]
        box = ((np.abs(xs - cx) <= half_width)[None, :]
               & ((ys >= cy - depth_front) & (ys <= cy + depth_back))[:, None])
        boxes[z] = box
        labels, count = ndi.label(bone[z] & box)
        if count == 0:
            continue
        # Keep the 2-D pieces that reach the spine axis (drops rib ends and calcifications).
        near_axis = (np.abs(xs - cx) <= band)[None, :] & (np.abs(ys - cy) <= depth_front)[:, None]
        keep = np.unique(labels[near_axis & (labels > 0)])
        result[z] = np.isin(labels, keep[keep > 0])
    # Cancellous bone (100-200 HU) connected to the cortex joins, then the shells are filled. Contrast-filled blood
    # in front of the vertebral bodies touches them and is as dense, so what lies in front of the cortical spine
    # at blood density is kept out (it does not stop an aorta that touches the cortex itself: see module notes).
    grow_into = spongy & boxes & ~_contrast_vessels(work, result)
    result = ndi.binary_propagation(result, structure=_IN_PLANE, mask=grow_into | result)
    result = ndi.binary_fill_holes(ndi.binary_closing(result, _IN_PLANE), _IN_PLANE)
    labels, count = ndi.label(result)
    if count > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        result = sizes[labels] >= 0.2 * sizes.max()
    return result


# ----------------------------------------------------------------------------------------------------------------
# Liver


def _liver(work: np.ndarray, body: np.ndarray, organs: dict[str, np.ndarray], spacing: tuple[float, ...],
           params: ClassicalParams) -> np.ndarray:
    """Largest soft-tissue region of the right upper abdomen, below the right lung and in front of the spine."""
    empty = np.zeros_like(body)
    right_lung = organs.get("lung_right")
    voxel_ml = float(np.prod(spacing)) / 1000.0
    nz, ny, nx = work.shape
    if right_lung is not None and right_lung.any():
        lung_z = np.nonzero(right_lung.any(axis=(1, 2)))[0]
        # The right dome of the diaphragm: the liver reaches up into the lowest third of the right lung's height.
        dome = int(lung_z.min() + 0.3 * (lung_z.max() - lung_z.min()))
        areas = right_lung.sum(axis=(1, 2))
        if lung_z.max() >= nz - 2 and areas[lung_z.max()] >= 0.5 * areas.max():
            # The scan starts at the lung bases (the lung is widest at its top slice, not tapering to an apex):
            # the liver dome may be above the field of view.
            dome = nz - 1
    else:
        # No lung in the scan (an abdominal series starting below the diaphragm): the liver may reach the top.
        dome = nz - 1
    bottom = max(0, dome - int(round(220.0 / spacing[0])))
    soft = (work > 0.0) & (work < 250.0) & body
    soft[dome + 1:] = False
    soft[:bottom] = False
    # Body wall muscles share the liver's density: peel a 10 mm shell off the body first.
    wall = int(round(10.0 / spacing[2]))
    soft &= ndi.binary_erosion(body, _IN_PLANE, iterations=wall)
    vertebrae = organs.get("vertebrae")
    if vertebrae is not None and vertebrae.any():
        # Paraspinal muscles (liver density, thick enough to survive the erosion): everything behind the
        # vertebral bodies within 6 cm of the spine axis.
        zs, ys, xs = np.nonzero(vertebrae)
        centre_x = xs.mean()
        for z in np.unique(zs):
            front = ys[zs == z].min()
            near = np.abs(np.arange(nx) - centre_x) * spacing[2] <= 60.0
            soft[z, front + int(round(20.0 / spacing[1])):, near] = False
    erosion = int(round(9.0 / spacing[2]))
    core = ndi.binary_erosion(soft, _BALL, iterations=erosion)
    body_x = np.nonzero(body.any(axis=(0, 1)))[0]
    mid = 0.5 * (body_x.min() + body_x.max())
    core[:, :, int(mid):] = False  # the liver's bulk is on the patient's right (low x)
    return _grow_from_largest_core(core, soft, work, erosion + 3, voxel_ml, params.liver_min_ml,
                                   params.liver_max_ml, empty)


def _grow_from_largest_core(core: np.ndarray, soft: np.ndarray, work: np.ndarray, grow_iterations: int,
                            voxel_ml: float, min_ml: float, max_ml: float, empty: np.ndarray) -> np.ndarray:
    """The organ grown back from the largest eroded core component through voxels of the core's own density range
    (organ HU depends on the contrast phase), only a few voxels beyond the erosion depth: unlimited region growing
    leaked into kidney, crus and stomach on real non-contrast CT, so organs stay slightly under-segmented rather
    than wrong. ``empty`` when there is no core or the volume is outside [min_ml, max_ml]."""
    labels, count = ndi.label(core)
    if count == 0:
        return empty
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    seed = labels == sizes.argmax()
    low, high = np.percentile(work[seed], [2, 98])
    similar = soft & (work >= low - 10.0) & (work <= high + 10.0)
    organ = ndi.binary_dilation(seed, _BALL, iterations=grow_iterations, mask=similar)
    organ = ndi.binary_fill_holes(ndi.binary_closing(organ, _IN_PLANE), _IN_PLANE)
    return organ if min_ml <= organ.sum() * voxel_ml <= max_ml else empty



# ----------------------------------------------------------------------------------------------------------------
# Heart


def _heart(work: np.ndarray, body: np.ndarray, organs: dict[str, np.ndarray], spacing: tuple[float, ...],
           params: ClassicalParams) -> np.ndarray:
    """Soft tissue/blood of the lower mediastinum: between the two lungs (per-slice closing of the lung pair),
    below the carina, in front of the spine, not liver; the largest compact piece after an erosion that cuts the
    great vessels and the descending aorta off."""
    empty = np.zeros_like(body)
    left, right = organs.get("lung_left"), organs.get("lung_right")
    if left is None or right is None:
        return empty
    voxel_ml = float(np.prod(spacing)) / 1000.0
    nz, ny, nx = work.shape
    lungs = left | right
    lung_z = np.nonzero(left.any(axis=(1, 2)) & right.any(axis=(1, 2)))[0]
    if lung_z.size < 3:
        return empty
    top = int(lung_z.max())
    trachea = organs.get("trachea")
    if trachea is not None and trachea.any():
        top = min(top, int(np.nonzero(trachea.any(axis=(1, 2)))[0].min()))  # the carina
    # Between the lungs: rows that have lung on both sides of a pixel, closed per slice.
    from_left = np.logical_or.accumulate(lungs, axis=2)
    from_right = np.logical_or.accumulate(lungs[:, :, ::-1], axis=2)[:, :, ::-1]
    between = from_left & from_right & ~lungs
    radius = int(round(15.0 / spacing[2]))
    between = ndi.binary_closing(between | lungs, _IN_PLANE, iterations=radius) & ~lungs
    between &= body
    between[top:] = False
    between[: int(lung_z.min())] = False
    for name in ("liver", "vertebrae"):
        if name in organs:
            between &= ~ndi.binary_dilation(organs[name], _IN_PLANE)
    vertebrae = organs.get("vertebrae")
    if vertebrae is not None:
        for z in np.nonzero(vertebrae.any(axis=(1, 2)))[0]:
            front = int(np.nonzero(vertebrae[z].any(axis=1))[0].min())
            between[z, front:, :] = False
    tissue = between & (work > -30.0) & (work < 700.0)  # no fat, no air, no bone
    erosion = int(round(9.0 / spacing[2]))
    core = ndi.binary_erosion(tissue, _BALL, iterations=erosion)
    labels, count = ndi.label(core)
    if count == 0:
        return empty
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    heart = ndi.binary_dilation(labels == sizes.argmax(), _BALL, iterations=erosion + 1, mask=tissue)
    heart = ndi.binary_fill_holes(ndi.binary_closing(heart, _IN_PLANE), _IN_PLANE)
    volume = heart.sum() * voxel_ml
    if not params.heart_min_ml <= volume <= params.heart_max_ml:
        return empty
    return heart


def _contrast_vessels(work: np.ndarray, spine: np.ndarray) -> np.ndarray:
    """Contrast-filled blood (150-500 HU) in front of the cortical spine: the aorta and heart chambers lie there,
    cancellous bone never does."""
    blood = (work > 150.0) & (work < 500.0)
    front = np.zeros_like(spine)
    for z in np.nonzero(spine.any(axis=(1, 2)))[0]:
        ys = np.nonzero(spine[z].any(axis=1))[0]
        front[z, : ys.min()] = True
    return blood & front


# ----------------------------------------------------------------------------------------------------------------
# Spleen


def _spleen(work: np.ndarray, body: np.ndarray, organs: dict[str, np.ndarray], spacing: tuple[float, ...],
            params: ClassicalParams) -> np.ndarray:
    """Largest soft-tissue piece of the left posterior-lateral upper abdomen (the stomach lies anterior-medial,
    the kidney medial and lower), grown back like the liver."""
    empty = np.zeros_like(body)
    liver = organs.get("liver")
    if liver is None or not liver.any():
        return empty  # the liver fixes the upper-abdomen level; without it there is no safe window
    voxel_ml = float(np.prod(spacing)) / 1000.0
    nz, ny, nx = work.shape
    liver_z = np.nonzero(liver.any(axis=(1, 2)))[0]
    top, bottom = int(liver_z.max()), int(liver_z.min())
    soft = (work > 0.0) & (work < 250.0) & body
    soft[top + 1:] = False
    soft[:bottom] = False
    soft &= ndi.binary_erosion(body, _IN_PLANE, iterations=int(round(10.0 / spacing[2])))
    soft &= ~ndi.binary_dilation(liver, _IN_PLANE)
    for name in ("vertebrae", "lung_left"):
        if name in organs:
            soft &= ~organs[name]
    body_x = np.nonzero(body.any(axis=(0, 1)))[0]
    body_y = np.nonzero(body.any(axis=(0, 2)))[0]
    mid_x = 0.5 * (body_x.min() + body_x.max())
    mid_y = 0.5 * (body_y.min() + body_y.max())
    erosion = int(round(6.0 / spacing[2]))
    core = ndi.binary_erosion(soft, _BALL, iterations=erosion)
    lateral = (np.arange(nx) > mid_x + 40.0 / spacing[2])[None, None, :]
    posterior = (np.arange(ny) > mid_y - 10.0 / spacing[1])[None, :, None]
    core &= lateral & posterior
    return _grow_from_largest_core(core, soft, work, erosion + 2, voxel_ml, params.spleen_min_ml,
                                   params.spleen_max_ml, empty)


# ----------------------------------------------------------------------------------------------------------------
# Kidneys


def _kidneys(work: np.ndarray, body: np.ndarray, organs: dict[str, np.ndarray], spacing: tuple[float, ...],
             params: ClassicalParams) -> dict[str, np.ndarray]:
    """Kidneys: compact soft-tissue pieces wrapped in perirenal fat on each side of the spine, level with the
    vertebral bodies (psoas is medial, the paraspinal and quadratus muscles are behind)."""
    vertebrae, liver = organs.get("vertebrae"), organs.get("liver")
    if vertebrae is None or liver is None or not vertebrae.any() or not liver.any():
        return {}
    voxel_ml = float(np.prod(spacing)) / 1000.0
    nz, ny, nx = work.shape
    liver_z = np.nonzero(liver.any(axis=(1, 2)))[0]
    top = int(liver_z.max())
    # Kidneys lie level with the lower half of the liver (T12-L3); lower down psoas and bowel look the same.
    bottom = max(0, int(liver_z.min()) - int(round(30.0 / spacing[0])))
    soft = (work > -10.0) & (work < 300.0) & body  # unenhanced renal parenchyma can be ~0-20 HU
    soft[top + 1:] = False
    soft[:bottom] = False
    soft &= ndi.binary_erosion(body, _IN_PLANE, iterations=int(round(10.0 / spacing[2])))
    for name in ("liver", "spleen", "vertebrae"):
        if name in organs:
            soft &= ~ndi.binary_dilation(organs[name], _IN_PLANE)
    window = vertebrae[bottom: top + 1]
    if not window.any():
        return {}
    zs, ys, xs = np.nonzero(window)
    spine_x, spine_y = xs.mean(), ys.mean()
    erosion = int(round(6.0 / spacing[2]))
    core = ndi.binary_erosion(soft, _BALL, iterations=erosion)
    labels, count = ndi.label(core)
    if count == 0:
        return {}
    index = np.arange(1, count + 1)
    sizes = ndi.sum_labels(core, labels, index)
    centres = np.array(ndi.center_of_mass(core, labels, index)).reshape(-1, 3)
    found: dict[str, np.ndarray] = {}
    for name, sign in (("kidney_left", 1.0), ("kidney_right", -1.0)):
        dx = sign * (centres[:, 2] - spine_x) * spacing[2]
        dy = (centres[:, 1] - spine_y) * spacing[1]
        plausible = (dx >= 55.0) & (dx <= 110.0) & (dy >= -45.0) & (dy <= 15.0)
        if not plausible.any():
            continue
        best = index[plausible][np.argmax(sizes[plausible])]
        seed = labels == best
        low, high = np.percentile(work[seed], [2, 98])
        similar = soft & (work >= low - 10.0) & (work <= high + 10.0)
        kidney = ndi.binary_dilation(seed, _BALL, iterations=erosion + 1, mask=similar)
        kidney = ndi.binary_fill_holes(ndi.binary_closing(kidney, _IN_PLANE), _IN_PLANE)
        if params.kidney_min_ml <= kidney.sum() * voxel_ml <= params.kidney_max_ml:
            found[name] = kidney
    return found
