"""Synthetic chest + upper-abdomen CT studies with ground truth (organ labels, findings).

API (stable)::

    spec = PhantomSpec(seed=3, slices=32, size=128, findings=[parse_finding("lung_nodule:size_mm=8")])
    study = generate_study(spec)          # study.hu (z, y, x) float32 HU, study.labels uint8, study.findings, ...
    paths = write_dicom_study(study, out)  # CT series + localizer + ground_truth.json + labels.npy
    spec = random_spec(np.random.default_rng(0), slices=32, size=128)   # random patient, 0-3 random findings

Volume convention: array index (k, j, i) = (z, y, x); k grows towards the head (ascending patient z, the order a
position-sorted DICOM loader produces), j posterior, i to the patient's left.  ``study.affine`` maps (i, j, k, 1)
to DICOM patient LPS mm.  The same spec always gives the same volume and the same UIDs; the anatomy depends on
the seed only, so adding a finding or changing the sampling does not move the organs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .anatomy import LABEL_IDS, LABELS, LUNG_LOBES, TEXTURE_AMPLITUDE, Z_MAX, Z_MIN, Anatomy, Patient
from .findings import (FINDING_TYPES, GLOBAL_TYPES, PAINT_ORDER, Finding, FindingPainter, FindingSpec, modifiers_for,
                       parse_finding, resolve_params)
from .geometry import Canvas, Grid
from .texture import TextureField, add_quantum_noise, apply_texture

__all__ = ["PhantomSpec", "PhantomStudy", "FindingSpec", "Finding", "generate_study", "write_dicom_study",
           "random_spec", "parse_finding", "LABELS", "LABEL_IDS", "FINDING_TYPES", "LUNG_LOBES"]

Z_EXTENT_MM = Z_MAX - Z_MIN  # 320 mm: thoracic inlet to the kidneys
_TEXTURE_EXTENT = np.array([[-260.0, 260.0], [-260.0, 260.0], [Z_MIN - 20, Z_MAX + 20]])


@dataclass
class PhantomSpec:
    """What to generate.  ``noise_hu=None`` draws 10-20 HU from the seed; 0 gives a noise-free volume."""

    seed: int = 0
    slices: int = 64
    size: int = 256
    findings: list[FindingSpec] = field(default_factory=list)
    noise_hu: float | None = None
    texture: bool = True

    def __post_init__(self) -> None:
        self.findings = [parse_finding(f) if isinstance(f, str) else f for f in self.findings]
        for f in self.findings:  # FindingSpec built in code: same checks as the text syntax
            if f.type not in FINDING_TYPES:
                raise ValueError(f"unknown finding type {f.type!r}; known: {', '.join(sorted(FINDING_TYPES))}")
            unknown = set(f.params) - set(FINDING_TYPES[f.type]["params"])
            if unknown:
                raise ValueError(f"{f.type}: unknown parameter(s) {sorted(unknown)}; known: "
                                 f"{', '.join(FINDING_TYPES[f.type]['params'])}")
        if self.slices < 1 or self.size < 16:
            raise ValueError(f"need slices >= 1 and size >= 16 (got {self.slices}, {self.size})")

    def fingerprint(self) -> str:
        """Stable hash of everything that changes the pixels (used to derive the UIDs)."""
        d = {"seed": self.seed, "slices": self.slices, "size": self.size, "noise_hu": self.noise_hu,
             "texture": self.texture, "findings": [f.to_text() for f in self.findings]}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class PatientInfo:
    name: str
    patient_id: str
    sex: str
    age: int
    birth_date: str
    study_date: str
    study_time: str
    accession: str


@dataclass
class PhantomStudy:
    """A generated study.  Arrays are (z, y, x), z ascending (inferior -> superior)."""

    spec: PhantomSpec
    hu: np.ndarray  # float32 HU
    labels: np.ndarray  # uint8 organ labels, ids in LABELS (fixed across studies)
    finding_mask: np.ndarray  # uint8, value i -> findings[i - 1]; 0 none
    findings: list[Finding]
    spacing: tuple[float, float, float]  # (dz, dy, dx) mm; dz = slice spacing = slice thickness
    origin: tuple[float, float, float]  # patient LPS (x, y, z) of voxel (0, 0, 0)
    affine: np.ndarray  # 4x4: (i, j, k, 1) -> patient LPS mm
    patient: PatientInfo
    uids: dict[str, str]  # study, ct_series, localizer_series, frame_of_reference
    table_z: float  # patient z = anatomical z + table_z
    noise_hu: float = 0.0  # quantum noise SD actually applied
    label_names: dict[int, str] = field(default_factory=lambda: dict(LABELS))

    def voxel_to_patient(self, zyx: Sequence[float]) -> np.ndarray:
        k, j, i = zyx
        return (self.affine @ np.array([i, j, k, 1.0]))[:3]

    def patient_to_voxel(self, xyz: Sequence[float]) -> np.ndarray:
        i, j, k = (np.linalg.inv(self.affine) @ np.array([*xyz, 1.0]))[:3]
        return np.array([k, j, i])

    def labels_present(self) -> dict[str, int]:
        """name -> voxel count for labels present in this volume."""
        counts = np.bincount(self.labels.ravel(), minlength=256)
        return {LABELS[i]: int(c) for i, c in enumerate(counts) if i and c}


def derived_uid(*parts: str) -> str:
    """Deterministic UID under the 2.25 root: a 128-bit integer hashed from ``parts`` (pydicom's generate_uid ignores
    its entropy sources when prefix is None, so it cannot be used for reproducible UIDs)."""
    digest = hashlib.sha256("\x1f".join(("omnict-phantom",) + parts).encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def _uid(fingerprint: str, role: str) -> str:
    return derived_uid(fingerprint, role)


def _patient_info(spec: PhantomSpec, patient: Patient, rng: np.random.Generator) -> PatientInfo:
    year = 2020 + int(rng.integers(0, 7))
    month, day = int(rng.integers(1, 13)), int(rng.integers(1, 29))
    hh, mm, ss = int(rng.integers(7, 19)), int(rng.integers(0, 60)), int(rng.integers(0, 60))
    return PatientInfo(name=f"PHANTOM^S{spec.seed}", patient_id=f"PH{spec.seed:08d}", sex=patient.sex, age=patient.age,
                       birth_date=f"{year - patient.age:04d}{month:02d}{day:02d}", study_date=f"{year:04d}{month:02d}{day:02d}",
                       study_time=f"{hh:02d}{mm:02d}{ss:02d}", accession=f"A{int(spec.fingerprint(), 16) % 10**8:08d}")


def make_grid(spec: PhantomSpec, patient: Patient) -> Grid:
    """Fixed 320 mm z range; square field of view that fits this patient and the table."""
    half = max(patient.half_width + abs(patient.offset_x), patient.half_depth * 1.25 + abs(patient.offset_y) + 25) + 25
    fov = float(np.ceil(2 * half / 10.0) * 10.0)
    px = fov / spec.size
    dz = Z_EXTENT_MM / spec.slices
    return Grid((spec.slices, spec.size, spec.size), (dz, px, px), (-fov / 2 + px / 2, -fov / 2 + px / 2, Z_MIN + dz / 2))


def generate_study(spec: PhantomSpec) -> PhantomStudy:
    """Render the study described by ``spec`` (deterministic)."""
    anat_rng = np.random.default_rng([spec.seed, 1])
    patient = Patient.sample(anat_rng)
    table_z = round(float(anat_rng.uniform(-400, 50)), 1)
    info = _patient_info(spec, patient, np.random.default_rng([spec.seed, 5]))
    noise_hu = float(np.random.default_rng([spec.seed, 4]).uniform(10, 20)) if spec.noise_hu is None else float(spec.noise_hu)

    resolved: list[tuple[int, str, dict[str, Any]]] = []
    for i, fs in enumerate(spec.findings, start=1):
        if fs.type not in FINDING_TYPES:
            raise ValueError(f"unknown finding type {fs.type!r}")
        resolved.append((i, fs.type, resolve_params(fs, np.random.default_rng([spec.seed, 2, i]))))
    anatomy = Anatomy(patient, np.random.default_rng([spec.seed, 3]), modifiers_for(resolved))

    grid = make_grid(spec, patient)
    canvas = Canvas(grid)
    anatomy.paint(canvas)
    painter = FindingPainter(anatomy, canvas, [spec.seed, 6])
    by_index: dict[int, Finding] = {}
    for index, kind, params in sorted(resolved, key=lambda r: (PAINT_ORDER.index(r[1]), r[0])):
        by_index[index] = painter.paint(index, kind, params)
    findings = [by_index[i] for i, _, _ in resolved]
    for f in findings:  # a later finding may cover an earlier one's voxels: recount
        f.voxels = int((canvas.findings == f.index).sum())
        f.visible = f.voxels > 0

    hu = canvas.hu
    if spec.texture:
        # the lattice covers this patient's field of view (fixed per seed, whatever the sampling)
        fov = grid.xs[-1] - grid.xs[0] + grid.spacing[2]
        extent = np.array([[-fov / 2 - 5, fov / 2 + 5], [-fov / 2 - 5, fov / 2 + 5], _TEXTURE_EXTENT[2]])
        apply_texture(hu, canvas.labels, TextureField(grid, np.random.default_rng([spec.seed, 8]), extent),
                      TEXTURE_AMPLITUDE)
    add_quantum_noise(hu, noise_hu, np.random.default_rng([spec.seed, 9, spec.slices, spec.size]))
    np.clip(hu, -1024, 3071, out=hu)

    dz, dy, dx = grid.spacing
    origin = (grid.origin[0], grid.origin[1], grid.origin[2] + table_z)
    affine = np.array([[dx, 0, 0, origin[0]], [0, dy, 0, origin[1]], [0, 0, dz, origin[2]], [0, 0, 0, 1.0]])
    fp = spec.fingerprint()
    uids = {role: _uid(fp, role) for role in ("study", "ct_series", "localizer_series", "frame_of_reference")}
    study = PhantomStudy(spec=spec, hu=hu, labels=canvas.labels, finding_mask=canvas.findings, findings=findings,
                         spacing=(dz, dy, dx), origin=origin, affine=affine, patient=info, uids=uids, table_z=table_z,
                         noise_hu=noise_hu)
    for f in findings:
        x, y, z = f.center_xyz_anat
        f.center_patient = (float(x), float(y), float(z + table_z))
        f.center_voxel = tuple(float(v) for v in study.patient_to_voxel(f.center_patient))
    return study


def random_spec(rng: np.random.Generator | int, *, slices: int = 64, size: int = 256, max_findings: int = 3,
                finding_types: Sequence[str] | None = None, noise_hu: float | None = None,
                visible_only: bool = True) -> PhantomSpec:
    """A random patient (fresh seed) with 0..max_findings random findings (other parameters drawn at generation).

    ``visible_only``: focal findings (nodules, liver lesions, stones, nodes) get a size of at least 0.8x the slice
    spacing this sampling will have, so they survive partial volume (labels stay meaningful for training)."""
    rng = np.random.default_rng(rng)
    dz = Z_EXTENT_MM / slices
    types = list(finding_types or FINDING_TYPES)
    n = int(rng.integers(0, max_findings + 1))
    chosen: list[FindingSpec] = []
    used_global: set[str] = set()
    used_sides: set[tuple[str, str]] = set()
    for _ in range(n):
        kind = str(types[int(rng.integers(len(types)))])
        if kind in GLOBAL_TYPES:
            if kind in used_global:
                continue
            used_global.add(kind)
        params: dict[str, Any] = {}
        if kind in ("pneumothorax", "pleural_effusion"):  # at most one per side (a second would have no room)
            free = [s for s in ("left", "right") if (kind, s) not in used_sides]
            if not free:
                continue
            params["side"] = str(free[int(rng.integers(len(free)))])
            used_sides.add((kind, params["side"]))
        size_range = FINDING_TYPES[kind]["params"].get("size_mm", (None, None))[1]
        if visible_only and size_range is not None:
            lo, hi = size_range
            lo = min(max(lo, 0.8 * dz), hi)
            params["size_mm"] = round(float(np.exp(rng.uniform(np.log(lo), np.log(hi)))), 1)
        chosen.append(FindingSpec(kind, params))
    return PhantomSpec(seed=int(rng.integers(0, 2**31 - 1)), slices=slices, size=size, findings=chosen, noise_hu=noise_hu)


def write_dicom_study(study: PhantomStudy, out_dir, *, localizer: bool = True, ground_truth: bool = True,
                      nifti: bool = False):
    """Write out_dir/CT/*.dcm (+ LOCALIZER/*.dcm, ground_truth.json, labels.npy, finding_mask.npy, optional
    labels.nii.gz); returns ``dicom_writer.StudyPaths`` (out_dir, ct_files, localizer_files, ground_truth, labels,
    finding_mask)."""
    from .dicom_writer import write_dicom_study as _write

    return _write(study, out_dir, localizer=localizer, ground_truth=ground_truth, nifti=nifti)
