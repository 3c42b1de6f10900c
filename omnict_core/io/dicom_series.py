"""Pick the CT series to analyse and build a volume from it (shared by the node's first stage and the model).

Selection follows MONAI Deploy's series-selector rules made deterministic: Modality CT, a CT image SOP class (CT
Image, Enhanced CT, Legacy Converted Enhanced CT; a blank SOPClassUID is accepted when Modality is CT), not a
LOCALIZER, axial (slice normal within ``max_tilt_deg`` of patient z), at least ``min_slices`` slices; among the
survivors the one with the most slices (ties: ORIGINAL before DERIVED, thinner slices, lower SeriesNumber).
Every rejected series is returned with its reason.

The volume is sorted along the slice normal by ImagePositionPatient (never InstanceNumber), rescaled to HU, with the
slice spacing measured from the positions (never SliceThickness).  Problems are either fatal (``DicomSeriesError``
subclasses: several series, different image sizes / orientations / pixel spacings, no positions) or reported in
``CtVolume.report`` (duplicate positions, gaps and irregular spacing -- resampled to a uniform grid by default --,
gantry tilt, blank UIDs).
"""

from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.2"
CT_SOP_CLASSES = {CT_IMAGE, ENHANCED_CT, LEGACY_ENHANCED_CT}
MULTIFRAME_CT = {ENHANCED_CT, LEGACY_ENHANCED_CT}


# ---------------------------------------------------------------------------------------------------------------
class DicomSeriesError(ValueError):
    """A series that cannot become one volume.  The message says why (it is shown to operators)."""


class MixedSeriesError(DicomSeriesError):
    """Instances from more than one series were given to ``load_volume``."""


class InconsistentGeometryError(DicomSeriesError):
    """Slices differ in size, orientation or pixel spacing, or lack positions."""


class NoImageError(DicomSeriesError):
    """Nothing loadable: no files, no pixel data, unreadable files."""


# ---------------------------------------------------------------------------------------------------------------
@dataclass
class FrameGeometry:
    position: np.ndarray | None  # ImagePositionPatient (3,)
    orientation: np.ndarray | None  # ImageOrientationPatient (6,)
    pixel_spacing: tuple[float, float] | None  # (row spacing, column spacing) mm
    slice_thickness: float | None
    slope: float
    intercept: float
    frame_type: tuple[str, ...] = ()


@dataclass
class InstanceInfo:
    """What the selector and loader need from one file (read with ``stop_before_pixels``)."""

    path: Path | None
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    study_uid: str
    frame_of_reference_uid: str
    modality: str
    image_type: tuple[str, ...]
    series_number: int | None
    series_description: str
    instance_number: int | None
    rows: int
    columns: int
    frames: list[FrameGeometry]  # one per frame (one for classic single-frame images)
    pixel_padding: float | None = None
    # the dataset it was summarised from: as given, or the header read from ``path`` (no pixel data)
    dataset: Dataset | None = field(default=None, repr=False)
    pixel_layout: "PixelLayout | None" = field(default=None, repr=False)  # where the native pixels lie in ``path``

    @property
    def is_multiframe(self) -> bool:
        return len(self.frames) > 1 or self.sop_class_uid in MULTIFRAME_CT

    @property
    def series_key(self) -> str:
        """SeriesInstanceUID, or a stand-in for de-identified files where it is blank."""
        if self.series_uid:
            return self.series_uid
        return f"no-uid:{self.frame_of_reference_uid}:{self.series_number}:{self.series_description}"


def _floats(v: Any) -> np.ndarray | None:
    if v is None or v == "" or (hasattr(v, "__len__") and len(v) == 0):
        return None
    try:
        return np.asarray([float(x) for x in v], float)
    except (TypeError, ValueError):
        return None


def _float(v: Any, default: float | None = None) -> float | None:
    try:
        return float(v) if v not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _int(v: Any) -> int | None:
    try:
        return int(v) if v not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _seq_item(ds: Dataset | None, keyword: str) -> Dataset | None:
    if ds is None:
        return None
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _frame_geometry(ds: Dataset, shared: Dataset | None, per_frame: Dataset | None) -> FrameGeometry:
    """Functional groups first (per-frame, then shared), then the top-level attributes of classic images."""

    def find(seq_kw: str, attr: str):
        for group in (per_frame, shared):
            item = _seq_item(group, seq_kw)
            if item is not None and attr in item:
                return item.get(attr)
        return ds.get(attr)

    position = _floats(find("PlanePositionSequence", "ImagePositionPatient"))
    orientation = _floats(find("PlaneOrientationSequence", "ImageOrientationPatient"))
    spacing = _floats(find("PixelMeasuresSequence", "PixelSpacing"))
    thickness = _float(find("PixelMeasuresSequence", "SliceThickness"))
    slope = _float(find("PixelValueTransformationSequence", "RescaleSlope"), 1.0)
    intercept = _float(find("PixelValueTransformationSequence", "RescaleIntercept"), 0.0)
    ftype = find("CTImageFrameTypeSequence", "FrameType")
    return FrameGeometry(position, orientation, (float(spacing[0]), float(spacing[1])) if spacing is not None else None,
                         thickness, float(slope), float(intercept), tuple(ftype) if ftype else ())


def instance_info(ds: Dataset, path: str | os.PathLike | None = None) -> InstanceInfo:
    """Summarise a (header-only is enough) dataset."""
    shared = _seq_item(ds, "SharedFunctionalGroupsSequence")
    per_frames = ds.get("PerFrameFunctionalGroupsSequence")
    n_frames = _int(ds.get("NumberOfFrames")) or 1
    if per_frames:
        frames = [_frame_geometry(ds, shared, pf) for pf in per_frames]
    else:
        g = _frame_geometry(ds, shared, None)
        frames = [g] * n_frames if n_frames > 1 else [g]
    image_type = ds.get("ImageType") or []
    if isinstance(image_type, str):
        image_type = image_type.split("\\")
    image_type = tuple(str(v).upper() for v in image_type)
    return InstanceInfo(
        path=Path(path) if path is not None else None,
        sop_class_uid=str(ds.get("SOPClassUID", "") or ""), sop_instance_uid=str(ds.get("SOPInstanceUID", "") or ""),
        series_uid=str(ds.get("SeriesInstanceUID", "") or ""), study_uid=str(ds.get("StudyInstanceUID", "") or ""),
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "") or ""),
        modality=str(ds.get("Modality", "") or "").upper(), image_type=image_type,
        series_number=_int(ds.get("SeriesNumber")), series_description=str(ds.get("SeriesDescription", "") or ""),
        instance_number=_int(ds.get("InstanceNumber")), rows=_int(ds.get("Rows")) or 0,
        columns=_int(ds.get("Columns")) or 0, frames=frames, pixel_padding=_float(ds.get("PixelPaddingValue")),
    )


@dataclass(frozen=True)
class PixelLayout:
    """Native (uncompressed, little endian) single-frame pixel data at a known place in a file: ``count`` values of
    ``dtype`` starting at byte ``offset``. Read with one ``np.fromfile`` instead of a second parse of the file and
    pydicom's pixel handlers (a third of the time of assembling a 300-slice series)."""

    offset: int
    dtype: str
    count: int
    stored_mask: int | None = None  # unsigned values stored in fewer bits than allocated: keep these bits (as pydicom)


_NATIVE_LITTLE_ENDIAN = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}  # Implicit / Explicit VR Little Endian
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"


def _pixel_layout(ds: Dataset, fp, element_offset: int) -> PixelLayout | None:
    """Where the pixel values of a header-only read lie, or None when only pydicom's handlers can decode them
    (compressed, big endian, deflated, multi-frame, colour, float, or stored bits that need sign correction)."""
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""
    if syntax not in _NATIVE_LITTLE_ENDIAN:
        return None
    bits, stored = _int(ds.get("BitsAllocated")), _int(ds.get("BitsStored"))
    representation, samples = _int(ds.get("PixelRepresentation")), _int(ds.get("SamplesPerPixel")) or 1
    rows, columns = _int(ds.get("Rows")) or 0, _int(ds.get("Columns")) or 0
    if (bits not in (8, 16, 32) or representation not in (0, 1) or samples != 1 or not rows or not columns
            or stored is None or not 0 < stored <= bits or (representation == 1 and stored != bits)
            or (_int(ds.get("NumberOfFrames")) or 1) != 1 or "FloatPixelData" in ds or "DoubleFloatPixelData" in ds):
        return None
    fp.seek(element_offset)
    head = fp.read(12)
    if head[:4] != _PIXEL_DATA_TAG:
        return None
    if syntax == "1.2.840.10008.1.2":  # implicit VR: tag, 4-byte length
        length, start = int.from_bytes(head[4:8], "little"), element_offset + 8
    elif head[4:6] in (b"OW", b"OB") and head[6:8] == b"\x00\x00":  # explicit VR: tag, VR, reserved, 4-byte length
        length, start = int.from_bytes(head[8:12], "little"), element_offset + 12
    else:
        return None
    count = rows * columns
    if length == 0xFFFFFFFF or length < count * bits // 8:  # encapsulated, or shorter than the image
        return None
    return PixelLayout(start, f"<{'i' if representation else 'u'}{bits // 8}", count,
                       (1 << stored) - 1 if stored < bits else None)


def _read_header(path: str | os.PathLike) -> tuple[Dataset, PixelLayout | None]:
    with open(path, "rb") as fp:
        ds = pydicom.dcmread(fp, stop_before_pixels=True)
        element_offset = fp.tell()  # pydicom stops in front of (7FE0,0010)
        try:
            layout = _pixel_layout(ds, fp, element_offset)
        except (OSError, ValueError, TypeError):
            layout = None
    return ds, layout


def read_instance(item: str | os.PathLike | Dataset | InstanceInfo) -> InstanceInfo:
    """Path -> header read (no pixels; kept, with where the pixels lie in the file); Dataset -> summarised (kept for
    pixel access); InstanceInfo -> itself."""
    if isinstance(item, InstanceInfo):
        return item
    if isinstance(item, Dataset):
        info = instance_info(item, getattr(item, "filename", None) if isinstance(getattr(item, "filename", None), str) else None)
        info.dataset = item
        return info
    try:
        ds, layout = _read_header(item)
    except Exception as exc:  # noqa: BLE001 - any parse failure is "unreadable" for the caller
        raise NoImageError(f"{item}: not a readable DICOM file ({exc.__class__.__name__}: {exc})") from exc
    info = instance_info(ds, item)
    info.dataset = ds
    info.pixel_layout = layout
    return info


def group_by_series(items: Iterable[str | os.PathLike | Dataset | InstanceInfo]) -> dict[str, list[InstanceInfo]]:
    """Read headers and group by SeriesInstanceUID (``InstanceInfo.series_key`` where the UID is blank)."""
    out: dict[str, list[InstanceInfo]] = defaultdict(list)
    for item in items:
        info = read_instance(item)
        out[info.series_key].append(info)
    return dict(out)


def dicom_files(folder: str | os.PathLike) -> list[Path]:
    """All files under ``folder`` that carry the DICOM preamble (or a .dcm suffix)."""
    out = []
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            p = Path(root) / name
            try:
                with open(p, "rb") as fh:
                    head = fh.read(132)
            except OSError:
                continue
            if head[128:132] == b"DICM" or name.lower().endswith(".dcm"):
                out.append(p)
    return out


# ---------------------------------------------------------------------------------------------------------------
@dataclass
class RejectedSeries:
    series_uid: str
    reason: str
    instances: int
    description: str = ""


@dataclass
class SeriesChoice:
    """The chosen series (``series_uid`` None when nothing qualifies) and why; every other series with its reason."""

    series_uid: str | None
    reason: str
    instances: list[InstanceInfo] = field(default_factory=list)
    rejected: list[RejectedSeries] = field(default_factory=list)
    slices: int = 0
    orientation: str = ""

    @property
    def paths(self) -> list[Path]:
        return [i.path for i in self.instances if i.path is not None]

    @property
    def ok(self) -> bool:
        return self.series_uid is not None


def slice_normal(orientation: np.ndarray) -> np.ndarray:
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:6], float)
    n = np.cross(row, col)
    return n / (np.linalg.norm(n) or 1.0)


def classify_orientation(orientation: np.ndarray | None, max_tilt_deg: float = 30.0) -> tuple[str, float]:
    """('axial' | 'coronal' | 'sagittal' | 'oblique' | 'unknown', angle of the normal to patient z in degrees)."""
    if orientation is None or len(orientation) != 6:
        return "unknown", float("nan")
    n = slice_normal(orientation)
    angles = [math.degrees(math.acos(min(1.0, abs(float(n[a]))))) for a in range(3)]  # to x, y, z
    if angles[2] <= max_tilt_deg:
        return "axial", angles[2]
    if angles[1] <= max_tilt_deg:
        return "coronal", angles[2]
    if angles[0] <= max_tilt_deg:
        return "sagittal", angles[2]
    return "oblique", angles[2]


def _series_slices(infos: Sequence[InstanceInfo]) -> int:
    return sum(len(i.frames) for i in infos)


def _is_localizer(info: InstanceInfo) -> bool:
    return "LOCALIZER" in info.image_type or any("LOCALIZER" in f.frame_type for f in info.frames)


def _evaluate(infos: list[InstanceInfo], max_tilt_deg: float, min_slices: int) -> str | None:
    """None if the series is a candidate, else the reason it is rejected."""
    modalities = {i.modality for i in infos}
    if modalities != {"CT"}:
        return f"modality {'/'.join(sorted(m or '(blank)' for m in modalities))}, not CT"
    classes = {i.sop_class_uid for i in infos} - {""}
    if classes - CT_SOP_CLASSES:
        return f"SOP class {', '.join(sorted(classes - CT_SOP_CLASSES))} is not a CT image"
    if all(_is_localizer(i) for i in infos):
        return "LOCALIZER image type (scout)"
    if not all(i.rows and i.columns for i in infos):
        return "no image pixel attributes (Rows/Columns)"
    orientations = [f.orientation for i in infos for f in i.frames]
    if any(o is None for o in orientations):
        return "no ImageOrientationPatient"
    kinds = Counter(classify_orientation(o, max_tilt_deg)[0] for o in orientations)
    kind = kinds.most_common(1)[0][0]
    if kind != "axial":
        angle = classify_orientation(orientations[0], max_tilt_deg)[1]
        return f"{kind} orientation (normal {angle:.0f} deg from patient z; axial needs <= {max_tilt_deg:g})"
    n = _series_slices(infos)
    if n < min_slices:
        return f"too few slices ({n} < {min_slices})"
    return None


def select_ct_series(instances_by_series: Mapping[str, Sequence[Any]] | Iterable[Any], *, max_tilt_deg: float = 30.0,
                     min_slices: int = 3) -> SeriesChoice:
    """Choose the series to analyse.

    ``instances_by_series``: {series uid: [path | pydicom Dataset | InstanceInfo, ...]} or a flat iterable of those
    (grouped here by SeriesInstanceUID).  Unreadable files are rejected as their own entry, never raised."""
    if isinstance(instances_by_series, Mapping):
        groups: dict[str, list[InstanceInfo]] = {}
        unreadable: list[RejectedSeries] = []
        for uid, items in instances_by_series.items():
            infos = []
            for item in items:
                try:
                    infos.append(read_instance(item))
                except NoImageError as exc:
                    unreadable.append(RejectedSeries(str(uid), str(exc), 1))
            if infos:
                groups[str(uid)] = infos
    else:
        groups, unreadable = {}, []
        for item in instances_by_series:
            try:
                info = read_instance(item)
            except NoImageError as exc:
                unreadable.append(RejectedSeries("", str(exc), 1))
                continue
            groups.setdefault(info.series_key, []).append(info)

    rejected = list(unreadable)
    candidates: list[tuple[tuple, str, list[InstanceInfo]]] = []
    notes: dict[str, str] = {}
    for uid, infos in groups.items():
        scouts = [i for i in infos if _is_localizer(i)]
        if scouts and len(scouts) < len(infos):  # a scout filed inside the axial series: ignore it, keep the rest
            infos = [i for i in infos if not _is_localizer(i)]
            notes[uid] = f"; {len(scouts)} LOCALIZER instance(s) in the series ignored"
        reason = _evaluate(infos, max_tilt_deg, min_slices)
        if reason:
            rejected.append(RejectedSeries(uid, reason, len(infos), infos[0].series_description))
            continue
        n = _series_slices(infos)
        original = 0 if any("ORIGINAL" in i.image_type for i in infos) else 1
        thickness = np.median([f.slice_thickness or 0.0 for i in infos for f in i.frames])
        series_number = min((i.series_number for i in infos if i.series_number is not None), default=1 << 30)
        candidates.append(((-n, original, thickness, series_number, uid), uid, infos))
    if not candidates:
        detail = "; ".join(f"{r.series_uid or '?'}: {r.reason}" for r in rejected) or "no instances"
        return SeriesChoice(None, f"no axial CT series ({detail})", [], rejected)
    candidates.sort(key=lambda c: c[0])
    key, uid, infos = candidates[0]
    for _, other_uid, other in candidates[1:]:
        rejected.append(RejectedSeries(other_uid, f"fewer slices ({_series_slices(other)}) than the chosen series "
                                                  f"({-key[0]}) or a lower preference on a tie", len(other),
                                       other[0].series_description))
    reason = f"axial CT with the most slices ({-key[0]})"
    if len(candidates) > 1:
        reason += f" among {len(candidates)} axial CT series"
    reason += notes.get(uid, "")
    return SeriesChoice(uid, reason, sorted(infos, key=lambda i: (i.instance_number or 0)), rejected, slices=-key[0],
                        orientation="axial")


# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Problem:
    # duplicate_position | gap | irregular_spacing | instance_number_gap | tilt | missing_uid | missing_sop_class |
    # padding | no_pixel_spacing | single_slice
    kind: str
    detail: str
    count: int = 1


@dataclass
class VolumeReport:
    problems: list[Problem] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # SOP instance UIDs / paths of instances not used
    resampled: bool = False  # slices were interpolated onto a uniform z grid
    slice_positions_mm: list[float] = field(default_factory=list)  # original positions along the normal (sorted)

    def add(self, kind: str, detail: str, count: int = 1) -> None:
        self.problems.append(Problem(kind, detail, count))

    def has(self, kind: str) -> bool:
        return any(p.kind == kind for p in self.problems)

    def kinds(self) -> list[str]:
        return [p.kind for p in self.problems]


@dataclass
class CtVolume:
    """HU volume, array (z, y, x) = (slice, row, column), slices ascending along the slice normal."""

    hu: np.ndarray  # float32 (or int16 when asked)
    spacing: tuple[float, float, float]  # (dz, dy, dx) mm: dz from positions, dy = row spacing, dx = column spacing
    origin: np.ndarray  # patient LPS (x, y, z) of voxel (0, 0, 0)
    direction: np.ndarray  # 3x3, columns = row direction (x index), column direction (y index), slice step direction
    affine: np.ndarray  # 4x4: (i, j, k, 1) -> patient LPS mm
    series_uid: str
    study_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: list[str]
    report: VolumeReport

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]


@dataclass
class _Slice:
    info: InstanceInfo
    frame: int
    geom: FrameGeometry
    along: float = 0.0


def _read_samples(fh, layout: PixelLayout, scratch: dict | None) -> np.ndarray:
    """``layout.count`` samples from ``fh`` (fewer if the file is short), into a buffer of ``scratch`` reused from
    slice to slice when given: a new 512 KB array per slice is a fresh memory mapping whose pages fault in one by
    one, which cost more than the read itself on a 300-slice series."""
    if scratch is None:
        return np.fromfile(fh, dtype=layout.dtype, count=layout.count)
    key = (np.dtype(layout.dtype).str, layout.count)
    buffer = scratch.get(key)
    if buffer is None:
        buffer = scratch[key] = np.empty(layout.count, layout.dtype)
    read = fh.readinto(memoryview(buffer).cast("B"))
    return buffer if read == buffer.nbytes else buffer[: read // buffer.itemsize]


def _pixels(info: InstanceInfo, scratch: dict | None = None) -> np.ndarray:
    """The instance's frames ``(frames, rows, columns)``; with ``scratch`` (single-frame instances read straight from
    their file) the array is a reused buffer, valid until the next call with the same ``scratch``."""
    layout = info.pixel_layout
    if layout is not None and info.path is not None and (info.dataset is None or "PixelData" not in info.dataset):
        with open(info.path, "rb") as fh:
            fh.seek(layout.offset)
            flat = _read_samples(fh, layout, scratch)
        if flat.size == layout.count and info.rows * info.columns == layout.count:
            if layout.stored_mask is not None:
                flat &= layout.stored_mask
            return flat.reshape(1, info.rows, info.columns)
    ds = info.dataset
    if ds is None or "PixelData" not in ds:
        if info.path is None:
            raise NoImageError("dataset without pixel data and without a file path")
        ds = pydicom.dcmread(info.path)
    if "PixelData" not in ds:
        raise NoImageError(f"{info.path or info.sop_instance_uid}: no PixelData")
    arr = ds.pixel_array
    return arr if arr.ndim == 3 else arr[None]


class _OutOfInt16(Exception):
    """A slice's HU values do not fit int16 (decoded again as float32)."""


def _decode_slices(slices: list, shape: tuple[int, int, int], dtype: Any,
                   allocate: Callable[[tuple[int, int, int], Any], np.ndarray] | None) -> tuple[np.ndarray, int]:
    """The sorted slices' HU values (raw * slope + intercept; PixelPaddingValue pixels -1024) in an array of
    ``dtype`` (float32, or int16 for integer HU), and the number of slices with padding."""
    vol = allocate(shape, dtype) if allocate is not None else np.empty(shape, dtype)
    if vol.shape != shape or vol.dtype != dtype:
        raise ValueError(f"allocate() gave {vol.dtype} {vol.shape}, needed {np.dtype(dtype)} {shape}")
    integer = vol.dtype == np.int16
    cache: dict[int, np.ndarray] = {}
    scratch: dict = {}  # one read buffer for every single-frame slice (see _read_samples)
    padded = 0
    for k, s in enumerate(slices):
        key = id(s.info)
        if key not in cache:
            cache[key] = _pixels(s.info, None if s.info.is_multiframe else scratch)
        raw = cache[key][s.frame]
        if raw.shape != shape[1:]:
            raise InconsistentGeometryError(f"pixel data {raw.shape} does not match Rows/Columns {shape[1:]}")
        if integer:
            intercept = int(s.geom.intercept)  # slope 1 and an integer intercept (checked by the caller)
            if raw.size and (int(raw.min()) + intercept < -32768 or int(raw.max()) + intercept > 32767):
                raise _OutOfInt16
            # summed in int32 by numpy's buffered loop, straight into the volume: no temporary slice array
            np.add(raw, np.int32(intercept), out=vol[k], dtype=np.int32, casting="unsafe")
        else:
            np.multiply(raw, np.float32(s.geom.slope), out=vol[k], casting="unsafe")
            vol[k] += np.float32(s.geom.intercept)
        if s.info.pixel_padding is not None:
            pad = raw == s.info.pixel_padding
            if pad.any():
                vol[k][pad] = -1024
                padded += 1
        if not s.info.is_multiframe:
            cache.pop(key, None)
    return vol, padded


def load_volume(items: Sequence[str | os.PathLike | Dataset | InstanceInfo], *, resample_gaps: bool = True,
                spacing_tolerance: float = 0.1, orientation_tolerance: float = 1e-3, dtype: Any = np.float32,
                allocate: Callable[[tuple[int, int, int], Any], np.ndarray] | None = None,
                integer_when_exact: bool = False) -> CtVolume:
    """Build the HU volume of ONE series.

    ``resample_gaps``: when slice spacing varies by more than ``spacing_tolerance`` (relative) -- missing slices,
    irregular reconstruction -- interpolate linearly onto a uniform grid at the median spacing so the affine is
    true everywhere (reported either way).  ``dtype``: float32 (default) or int16 (rounded HU).
    ``allocate(shape, dtype)``: returns the array ``(slices, rows, columns)`` of ``dtype`` the slices are decoded
    into (default a new one), e.g. a memory-mapped .npy file, so that a caller who stores the volume does not copy
    it; the returned ``hu`` is that array unless the slices were resampled or ``dtype`` is int16.
    ``integer_when_exact``: decode into int16 when every HU value is an integer within int16's range (RescaleSlope
    1 and an integral RescaleIntercept on every slice, as nearly every CT: the same values in half the memory),
    float32 otherwise; a slice found out of range restarts the decoding in float32."""
    if not items:
        raise NoImageError("no instances given")
    infos = [read_instance(i) for i in items]
    report = VolumeReport()
    keys = Counter(i.series_key for i in infos)
    if len(keys) > 1:
        raise MixedSeriesError(f"instances of {len(keys)} series given to one volume: "
                               + ", ".join(f"{k} ({n})" for k, n in keys.most_common()))
    if not infos[0].series_uid:
        report.add("missing_uid", "SeriesInstanceUID is blank (de-identified?)")
    if any(not i.sop_class_uid for i in infos):
        report.add("missing_sop_class", "SOPClassUID is blank; taken as CT from Modality",
                   sum(1 for i in infos if not i.sop_class_uid))
    sizes = Counter((i.rows, i.columns) for i in infos)
    if len(sizes) > 1:
        raise InconsistentGeometryError("slices of different sizes: " + ", ".join(f"{r}x{c} ({n})" for (r, c), n in sizes.items()))

    slices = [_Slice(i, f, g) for i in infos for f, g in enumerate(i.frames)]
    if any(s.geom.position is None or s.geom.orientation is None for s in slices):
        raise InconsistentGeometryError("ImagePositionPatient/ImageOrientationPatient missing on some slices")
    ref = slices[0].geom.orientation
    for s in slices:
        if np.max(np.abs(s.geom.orientation - ref)) > orientation_tolerance:
            raise InconsistentGeometryError(f"slices with different orientations: {list(ref)} vs {list(s.geom.orientation)}")
    spacings = Counter(s.geom.pixel_spacing for s in slices)
    if len(spacings) > 1:
        raise InconsistentGeometryError(f"slices with different pixel spacings: {sorted(map(str, spacings))}")
    pixel_spacing = slices[0].geom.pixel_spacing or (1.0, 1.0)
    if slices[0].geom.pixel_spacing is None:
        report.add("no_pixel_spacing", "PixelSpacing missing; 1 mm assumed")

    row = np.asarray(ref[:3], float)
    row /= np.linalg.norm(row)
    col = np.asarray(ref[3:6], float)
    col /= np.linalg.norm(col)
    normal = slice_normal(ref)
    for s in slices:
        s.along = float(np.dot(s.geom.position, normal))
    slices.sort(key=lambda s: (s.along, s.info.instance_number or 0, s.frame))

    # duplicates: same position (within 1% of a voxel-ish 0.01 mm) -> keep the first, report the rest
    kept: list[_Slice] = []
    for s in slices:
        if kept and abs(s.along - kept[-1].along) < 1e-2:
            report.dropped.append(str(s.info.path or s.info.sop_instance_uid) + (f"#frame{s.frame}" if s.info.is_multiframe else ""))
            continue
        kept.append(s)
    n_dup = len(slices) - len(kept)
    if n_dup:
        report.add("duplicate_position", f"{n_dup} slice(s) at an already-used position dropped", n_dup)
    slices = kept

    numbers = sorted(i.instance_number for i in infos if i.instance_number is not None and not i.is_multiframe)
    if len(numbers) == len(infos) and len(set(numbers)) == len(numbers) and numbers[-1] - numbers[0] + 1 > len(numbers):
        missing = numbers[-1] - numbers[0] + 1 - len(numbers)
        report.add("instance_number_gap", f"{missing} InstanceNumber(s) missing between {numbers[0]} and {numbers[-1]}",
                   missing)

    # decode (multi-frame files once)
    shape = (len(slices), infos[0].rows, infos[0].columns)
    as_int16 = integer_when_exact and all(
        s.geom.slope == 1 and float(s.geom.intercept).is_integer() for s in slices)
    try:
        vol, padded = _decode_slices(slices, shape, np.int16 if as_int16 else np.float32, allocate)
    except _OutOfInt16:
        vol, padded = _decode_slices(slices, shape, np.float32, allocate)
    nz = shape[0]
    if padded:
        report.add("padding", f"PixelPaddingValue pixels set to -1024 HU in {padded} slice(s)", padded)

    along = np.array([s.along for s in slices])
    report.slice_positions_mm = [round(float(a), 4) for a in along]
    positions = np.array([s.geom.position for s in slices])
    if nz > 1:
        steps = np.diff(along)
        dz = float(np.median(steps))
        irregular = np.abs(steps - dz) > spacing_tolerance * dz
        if irregular.any():
            for idx in np.nonzero(irregular)[0]:
                missing = int(round(steps[idx] / dz)) - 1
                kind = "gap" if missing >= 1 else "irregular_spacing"
                detail = (f"{steps[idx]:.3g} mm between slices at {along[idx]:.2f} and {along[idx + 1]:.2f} mm "
                          f"(median {dz:.3g} mm)" + (f", ~{missing} slice(s) missing" if missing >= 1 else ""))
                report.add(kind, detail, max(missing, 1))
            if resample_gaps:
                vol, along = _resample_uniform(vol, along, dz)
                report.resampled = True
                nz = len(along)
        # slice step vector from the end positions (handles gantry tilt: sheared affine); dz along the normal
        extent = positions[-1] - positions[0]
        step_vec = extent / float(extent.dot(normal)) * dz
        tilt = math.degrees(math.acos(min(1.0, abs(float(np.dot(step_vec / np.linalg.norm(step_vec), normal))))))
        if tilt > 0.5:
            report.add("tilt", f"slice positions deviate {tilt:.1f} deg from the slice normal (gantry tilt); affine sheared")
    else:
        dz = float(slices[0].geom.slice_thickness or 1.0)
        step_vec = normal * dz
        report.add("single_slice", "one slice: z spacing taken from SliceThickness")

    origin = positions[0].astype(float)
    dy, dx = float(pixel_spacing[0]), float(pixel_spacing[1])
    direction = np.stack([row, col, step_vec / np.linalg.norm(step_vec)], 1)
    affine = np.eye(4)
    affine[:3, 0] = row * dx
    affine[:3, 1] = col * dy
    affine[:3, 2] = step_vec
    affine[:3, 3] = origin
    uids = [s.info.sop_instance_uid for s in slices] if not report.resampled else []
    if dtype == np.int16 and vol.dtype != np.int16:
        vol = np.clip(np.round(vol), -32768, 32767).astype(np.int16)
    return CtVolume(hu=vol, spacing=(dz, dy, dx), origin=origin, direction=direction, affine=affine,
                    series_uid=infos[0].series_uid, study_uid=infos[0].study_uid,
                    frame_of_reference_uid=infos[0].frame_of_reference_uid, sop_instance_uids=uids, report=report)


def _resample_uniform(vol: np.ndarray, along: np.ndarray, dz: float) -> tuple[np.ndarray, np.ndarray]:
    """Linear interpolation along z onto along[0] + k*dz covering the original extent."""
    n = int(round((along[-1] - along[0]) / dz)) + 1
    target = along[0] + dz * np.arange(n)
    idx = np.clip(np.searchsorted(along, target, side="right") - 1, 0, len(along) - 2)
    w = ((target - along[idx]) / (along[idx + 1] - along[idx])).astype(np.float32)
    w = np.clip(w, 0, 1)
    out = np.empty((n,) + vol.shape[1:], np.float32)
    for k in range(n):
        out[k] = vol[idx[k]] * (1 - w[k]) + vol[idx[k] + 1] * w[k]
    return out, target


def load_series_from_folder(folder: str | os.PathLike, **kwargs) -> tuple[SeriesChoice, CtVolume]:
    """Convenience: select the CT series among the DICOM files under ``folder`` and load it."""
    choice = select_ct_series(dicom_files(folder))
    if not choice.ok:
        raise NoImageError(choice.reason)
    return choice, load_volume(choice.instances, **kwargs)
