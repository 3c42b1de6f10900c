"""OmniCT input layer (the paper's MedEval-CT-Factory front end, App. G + App. E pre-processing).

Every input — a DICOM series (via ``omnict_core.io.dicom_series.load_volume``), NIfTI, NRRD, a numpy HU array, one
DICOM slice, a PNG — becomes a ``PreparedStudy``: reconstruction units ready for the vision tower plus the bookkeeping
to map units back to source slices and to select organ masks for OSE.

Steps for a volume (App. E: "windowed to [-1000, 1000] and resampled to 32 x 384 x 384"):

1. window HU to [-1000, 1000] -> [0, 1];
2. resample (D0, H0, W0) -> (D, S, S) (D = config.volume_depth, S = config.image_size): area averaging along axes that
   shrink (anti-aliasing: 300 slices -> 32 averages ~9 slices instead of picking one), then trilinear;
3. Volumetric Slice Composition: slices (3i, 3i+1, 3i+2) -> unit i, for i < ceil(D / 3). When D is not a multiple of
   3 the last unit is completed by repeating the last slice (edge replication), so no slice is dropped (the paper's
   floor(D/3) would drop up to two): 32 slices -> 11 units, the last = (30, 31, 31);
4. SigLIP normalisation (mean = std = 0.5): [0, 1] -> [-1, 1].

A 2D slice is windowed (HU inputs) or scaled to [0, 1] (8/16-bit images such as PNG), resized to S x S and replicated
to 3 channels = one unit. Label maps (TotalSegmentator-style integer maps on the source grid) are resampled with
nearest neighbour onto the same (D, S, S) grid and laid out like the units.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

HU_WINDOW = (-1000.0, 1000.0)
SIGLIP_MEAN, SIGLIP_STD = 0.5, 0.5
SLICES_PER_UNIT = 3


# --------------------------------------------------------------------------------------------- data container
@dataclass
class PreparedStudy:
    """One image ready for OmniCT.

    pixel_units         float32 (N_u, 3, S, S), normalised to [-1, 1]
    kind                '3d' (volume) or '2d' (independent slice[s])
    unit_source_slices  per unit, the indices of the SOURCE slices it drew on (input order: DICOM series order after
                        the loader's sort, NIfTI/NRRD k index)
    label_units         int32 (N_u, 3, S, S) organ label map on the unit grid, or None
    source_shape        shape of the source array (D0, H0, W0) or (H0, W0)
    spacing             source voxel spacing (z, y, x) in mm when known
    slice_uids          SOPInstanceUID per source slice (DICOM series input), else None
    """

    pixel_units: torch.Tensor
    kind: str
    unit_source_slices: list[list[int]]
    label_units: torch.Tensor | None = None
    source_shape: tuple[int, ...] = ()
    spacing: tuple[float, ...] | None = None
    label_names: dict[int, str] = field(default_factory=dict)
    slice_uids: list[str] | None = None

    @property
    def num_units(self) -> int:
        return int(self.pixel_units.shape[0])

    def organ_mask(self, label_ids: int | Iterable[int] | None) -> torch.Tensor | None:
        """bool (N_u, S, S): pixels of unit u whose label is one of ``label_ids`` in ANY of its 3 slices.
        None when there is no label map or no label was asked for (the model then uses the whole grid).
        Non-negative integer labels go through a lookup table (~3x cheaper than ``torch.isin`` on CPU, the same
        mask; the engine asks it for every organ group of every battery)."""
        labels = self.label_units
        if labels is None or label_ids is None:
            return None
        ids = [label_ids] if isinstance(label_ids, int) else list(label_ids)
        if labels.numel() == 0 or labels.is_floating_point() or int(labels.min()) < 0:
            return torch.isin(labels, torch.tensor(ids, dtype=torch.int32)).any(dim=1)
        table = torch.zeros(int(labels.max()) + 1, dtype=torch.bool, device=labels.device)
        table[[i for i in ids if 0 <= i < table.shape[0]]] = True
        return table[labels].any(dim=1)

    def organ_label_ids(self, organ: str | Sequence[str] | None) -> list[int] | None:
        """Label ids whose name matches ``organ``: the exact name, else every name starting with it ('kidney' ->
        kidney_left + kidney_right), also after dropping a plural 's' ('lungs' -> the five lobes). [] if none.
        A sequence of names is the union of their regions (e.g. the three right lobes: the right hemithorax)."""
        if organ is None:
            return None
        if not isinstance(organ, str):
            return sorted({i for name in organ for i in (self.organ_label_ids(name) or [])})
        wanted = organ.strip().lower().replace(" ", "_")
        for candidate in (wanted, wanted[:-1] if wanted.endswith("s") else wanted):  # 'lungs' -> 'lung*'
            ids = [i for i, name in self.label_names.items() if name.lower() == candidate]
            ids = ids or [i for i, name in self.label_names.items() if name.lower().startswith(candidate)]
            if ids:
                return sorted(ids)
        return []

    def source_slices(self, unit_indices: Iterable[int]) -> list[int]:
        """Every source slice index drawn on by the given units (sorted, unique)."""
        return sorted({s for u in unit_indices for s in self.unit_source_slices[u]})

    def key_slices(self, unit_indices: Iterable[int]) -> list[int]:
        """One key image per unit: the middle of the source slices it drew on (sorted, unique). A unit of a
        300-slice series spans ~75 source slices; a radiologist wants one image to open per region, not all."""
        middles = set()
        for unit in unit_indices:
            slices = self.unit_source_slices[unit]
            if slices:
                middles.add(slices[len(slices) // 2])
        return sorted(middles)


# ------------------------------------------------------------------------------------------------ primitives
def window_hu(hu: np.ndarray | torch.Tensor, window: tuple[float, float] = HU_WINDOW) -> torch.Tensor:
    """Clip HU to ``window`` and scale to [0, 1] (float32)."""
    lo, hi = window
    x = torch.as_tensor(np.asarray(hu) if not isinstance(hu, torch.Tensor) else hu)
    # One new volume (a 300x512x512 study: 300 MB a copy), clamped and scaled in place: the clamp of a float32
    # input, else its float32 conversion (integer HU: the assembled volume of the pipeline).
    x = x.clamp(lo, hi) if x.dtype == torch.float32 else x.float().clamp_(lo, hi)
    return x.contiguous().sub_(lo).div_(hi - lo)


def resample_volume(volume: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """(D0, H0, W0) -> ``shape`` (D, H, W): area-average the axes that shrink, then trilinear to the target."""
    x = volume.float()[None, None]  # (1, 1, D0, H0, W0)
    reduced = tuple(min(a, b) for a, b in zip(x.shape[2:], shape))
    if reduced != tuple(x.shape[2:]):
        x = F.adaptive_avg_pool3d(x, reduced)
    if tuple(x.shape[2:]) != tuple(shape):
        x = F.interpolate(x, size=tuple(shape), mode="trilinear", align_corners=False)
    return x[0, 0]


def resample_labels(labels: np.ndarray | torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resampling of an integer label map (2D or 3D) to ``shape``; int32."""
    # converted by numpy, not shared with torch: the map may be a read-only memory mapping of the segment stage's file
    x = labels.to(torch.float32) if isinstance(labels, torch.Tensor) else torch.from_numpy(
        np.asarray(labels, dtype=np.float32))
    out = F.interpolate(x[None, None], size=tuple(shape), mode="nearest-exact")
    return out[0, 0].round().to(torch.int32)


def compose_units(slices: torch.Tensor, slices_per_unit: int = SLICES_PER_UNIT) -> torch.Tensor:
    """VSC: (D, H, W) -> (ceil(D / 3), 3, H, W); the last unit is completed by repeating the last slice."""
    depth = slices.shape[0]
    n_units = max(1, math.ceil(depth / slices_per_unit))
    index = torch.arange(n_units * slices_per_unit).clamp(max=depth - 1)  # edge replication
    return slices[index].view(n_units, slices_per_unit, *slices.shape[1:])


def unit_slice_indices(depth: int, slices_per_unit: int = SLICES_PER_UNIT) -> list[list[int]]:
    """Resampled slice indices of each unit (the padded unit repeats the last index)."""
    n_units = max(1, math.ceil(depth / slices_per_unit))
    return [[min(u * slices_per_unit + k, depth - 1) for k in range(slices_per_unit)] for u in range(n_units)]


def resampled_to_source(index: int, depth: int, source_depth: int) -> list[int]:
    """Source slices covered by resampled slice ``index`` (area / align_corners=False geometry)."""
    scale = source_depth / depth
    first = int(math.floor(index * scale + 1e-9))
    last = max(first, int(math.ceil((index + 1) * scale - 1e-9)) - 1)
    return list(range(first, min(last, source_depth - 1) + 1))


def unit_source_slices(source_depth: int, depth: int, slices_per_unit: int = SLICES_PER_UNIT) -> list[list[int]]:
    """For each unit, the sorted source slice indices it drew on — used to point answers at key images."""
    return [sorted({s for i in set(unit) for s in resampled_to_source(i, depth, source_depth)})
            for unit in unit_slice_indices(depth, slices_per_unit)]


def normalise_for_vision(x01: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> SigLIP input range [-1, 1]."""
    return (x01 - SIGLIP_MEAN) / SIGLIP_STD


# -------------------------------------------------------------------------------------------------- prepare
def _sizes(config: Any | None, depth: int | None, size: int | None) -> tuple[int, int]:
    depth = depth if depth is not None else (config.volume_depth if config is not None else 32)
    size = size if size is not None else (config.image_size if config is not None else 384)
    return int(depth), int(size)


def prepare_volume(hu: np.ndarray | torch.Tensor, config: Any | None = None, *, labels: np.ndarray | None = None,
                   spacing: Sequence[float] | None = None, label_names: dict[int, str] | None = None,
                   depth: int | None = None, size: int | None = None,
                   window: tuple[float, float] = HU_WINDOW) -> PreparedStudy:
    """HU volume (D0, H0, W0) (+ optional label map, same shape) -> 3D ``PreparedStudy``."""
    hu = np.asarray(hu) if not isinstance(hu, torch.Tensor) else hu
    if hu.ndim != 3:
        raise ValueError(f"a volume must be (slices, rows, cols); got shape {tuple(hu.shape)}")
    if labels is not None and tuple(np.shape(labels)) != tuple(hu.shape):
        raise ValueError(f"label map shape {tuple(np.shape(labels))} differs from the volume {tuple(hu.shape)}")
    depth, size = _sizes(config, depth, size)
    grid = (depth, size, size)
    slices = normalise_for_vision(resample_volume(window_hu(hu, window), grid))  # (D, S, S)
    units = compose_units(slices)  # (N_u, 3, S, S)
    label_units = None
    if labels is not None:
        label_units = compose_units(resample_labels(labels, grid))  # (N_u, 3, S, S)
    return PreparedStudy(
        pixel_units=units.contiguous(), kind="3d", unit_source_slices=unit_source_slices(hu.shape[0], depth),
        label_units=label_units, source_shape=tuple(int(s) for s in hu.shape),
        spacing=tuple(float(s) for s in spacing) if spacing is not None else None, label_names=dict(label_names or {}),
    )


def prepare_slice(image: np.ndarray | torch.Tensor, config: Any | None = None, *, is_hu: bool = True,
                  labels: np.ndarray | None = None, label_names: dict[int, str] | None = None,
                  size: int | None = None, slice_index: int = 0,
                  window: tuple[float, float] = HU_WINDOW) -> PreparedStudy:
    """One 2D slice (H0, W0): HU (``is_hu``) or display intensities (uint8/uint16/[0,1] float) -> 2D study."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] in (3, 4):  # RGB(A) picture of a slice -> luminance
        image = image[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"a slice must be (rows, cols); got shape {image.shape}")
    _, size = _sizes(config, 1, size)
    if is_hu:
        x01 = window_hu(image, window)
    else:
        x = torch.as_tensor(image.astype(np.float32))
        peak = 255.0 if image.dtype == np.uint8 else (65535.0 if image.dtype == np.uint16 else max(float(x.max()), 1.0))
        x01 = (x / peak).clamp(0, 1)
    x01 = F.interpolate(x01[None, None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0, 0]
    unit = normalise_for_vision(x01)[None, None].expand(1, SLICES_PER_UNIT, size, size).contiguous()  # replicate
    label_units = None
    if labels is not None:
        label_units = resample_labels(labels, (size, size))[None, None].expand(1, SLICES_PER_UNIT, size, size)
    return PreparedStudy(pixel_units=unit, kind="2d", unit_source_slices=[[slice_index]],
                         label_units=None if label_units is None else label_units.contiguous(),
                         source_shape=tuple(int(s) for s in image.shape), label_names=dict(label_names or {}))


# ---------------------------------------------------------------------------------------------------- loaders
@dataclass
class LoadedImage:
    """A decoded source before resampling: HU (or display intensities for pictures) in (z, y, x) / (y, x) order."""

    array: np.ndarray
    spacing: tuple[float, ...] | None
    is_hu: bool = True
    slice_uids: list[str] | None = None  # SOPInstanceUID of each slice (DICOM series), for key-image references


def load_nifti(path: str | Path) -> LoadedImage:
    """NIfTI -> (z, y, x) array in DICOM-like display orientation: rows anterior->posterior, columns patient
    right->left, slices inferior->superior (the NIfTI is first reoriented to RAS+)."""
    import nibabel as nib

    image = nib.as_closest_canonical(nib.load(str(path)))
    data = np.asarray(image.dataobj, dtype=np.float32)
    if data.ndim == 4:
        data = data[..., 0]
    if data.ndim == 2:
        return LoadedImage(data[::-1, ::-1].T.copy(), tuple(float(z) for z in image.header.get_zooms()[1::-1]))
    zooms = image.header.get_zooms()[:3]
    volume = data[::-1, ::-1, :].transpose(2, 1, 0).copy()  # (k, j reversed, i reversed)
    return LoadedImage(volume, (float(zooms[2]), float(zooms[1]), float(zooms[0])))


def load_nrrd(path: str | Path) -> LoadedImage:
    """NRRD (pynrrd, Fortran index order = x, y, z) -> (z, y, x) array; spacing from 'space directions'/'spacings'."""
    import nrrd

    data, header = nrrd.read(str(path))
    data = np.asarray(data, dtype=np.float32)
    spacing = None
    if header.get("space directions") is not None:
        vectors = [np.asarray(d, dtype=float) for d in header["space directions"] if d is not None]
        dirs = [d for d in vectors if not np.any(np.isnan(d))]  # 'none' axes (e.g. a vector axis) carry NaN
        spacing = tuple(float(np.linalg.norm(d)) for d in dirs)
    elif header.get("spacings") is not None:
        spacing = tuple(float(s) for s in header["spacings"])
    if data.ndim == 2:
        return LoadedImage(data.T.copy(), spacing[::-1] if spacing else None)
    return LoadedImage(data.transpose(2, 1, 0).copy(), spacing[::-1] if spacing else None)


def load_dicom_slice(path: str | Path) -> LoadedImage:
    """One DICOM image -> HU (RescaleSlope/Intercept applied)."""
    import pydicom

    ds = pydicom.dcmread(str(path))
    pixels = ds.pixel_array.astype(np.float32)
    hu = pixels * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)
    spacing = tuple(float(v) for v in getattr(ds, "PixelSpacing", [])) or None
    uid = str(getattr(ds, "SOPInstanceUID", "") or "")
    return LoadedImage(hu, spacing, slice_uids=[uid] if uid else None)


def load_picture(path: str | Path) -> LoadedImage:
    """PNG / JPEG of a slice: display intensities, not HU."""
    from PIL import Image

    with Image.open(path) as img:
        array = np.asarray(img.convert("L") if img.mode not in ("L", "I;16", "I") else img)
    return LoadedImage(array, None, is_hu=False)


def _volume_from_ctvolume(volume: Any) -> LoadedImage:
    """Adapter for ``omnict_core.io.dicom_series.CtVolume`` (``hu`` (z, y, x), ``spacing`` (dz, dy, dx),
    ``sop_instance_uids`` in slice order) and look-alikes."""
    for attribute in ("hu", "array", "voxels"):
        if hasattr(volume, attribute):
            array = np.asarray(getattr(volume, attribute), dtype=np.float32)
            spacing = getattr(volume, "spacing", None)
            uids = list(getattr(volume, "sop_instance_uids", None) or [])
            return LoadedImage(array, tuple(float(s) for s in spacing) if spacing is not None else None,
                               slice_uids=uids if len(uids) == array.shape[0] else None)
    raise TypeError(f"unsupported volume object {type(volume).__name__}: no HU array attribute")


def load_dicom_series(paths: Sequence[str | Path] | str | Path) -> LoadedImage:
    """A DICOM series -> HU volume via the node's loader: a folder goes through its CT series selection
    (``load_series_from_folder``: localizers etc. are skipped), a list of files must be one series (``load_volume``)."""
    from omnict_core.io.dicom_series import load_series_from_folder, load_volume

    if isinstance(paths, (str, Path)):
        _, volume = load_series_from_folder(paths)
        return _volume_from_ctvolume(volume)
    return _volume_from_ctvolume(load_volume([str(p) for p in paths]))


def load_source(source: Any) -> LoadedImage:
    """Dispatch on what we were given: path (folder = DICOM series, .nii/.nii.gz, .nrrd/.nhdr, .npy, .png/.jpg,
    .dcm), list of DICOM paths, numpy array (HU), or a CtVolume-like object."""
    if isinstance(source, LoadedImage):
        return source
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return LoadedImage(np.asarray(source, dtype=np.float32), None)
    if isinstance(source, (list, tuple)):
        return load_dicom_series(source)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"image source not found: {path}")
        name = path.name.lower()
        if path.is_dir():
            return load_dicom_series(path)
        if name.endswith((".nii", ".nii.gz")):
            return load_nifti(path)
        if name.endswith((".nrrd", ".nhdr")):
            return load_nrrd(path)
        if name.endswith(".npy"):  # a HU array (or label map) in (z, y, x) / (y, x) order
            return LoadedImage(np.load(path).astype(np.float32), None)
        if name.endswith((".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")):
            return load_picture(path)
        return load_dicom_slice(path)  # .dcm or extension-less DICOM
    return _volume_from_ctvolume(source)


def prepare_input(source: Any, config: Any | None = None, *, labels: Any = None,
                  label_names: dict[int, str] | None = None, **sizes: Any) -> PreparedStudy:
    """Any supported source -> ``PreparedStudy`` (3D when it has several slices, 2D for a single slice).
    ``labels`` may be an array on the source grid or anything ``load_source`` reads (e.g. a NIfTI label map)."""
    image = load_source(source)
    label_array = None
    if labels is not None:
        label_array = labels if isinstance(labels, np.ndarray) else load_source(labels).array
        label_array = np.rint(np.asarray(label_array)).astype(np.int32)
    array = image.array
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
        label_array = None if label_array is None else label_array.reshape(array.shape)
    if array.ndim == 2:
        study = prepare_slice(array, config, is_hu=image.is_hu, labels=label_array, label_names=label_names,
                              size=sizes.get("size"))
        study.slice_uids = image.slice_uids if image.slice_uids and len(image.slice_uids) == 1 else None
        return study
    study = prepare_volume(array, config, labels=label_array, spacing=image.spacing, label_names=label_names,
                           depth=sizes.get("depth"), size=sizes.get("size"))
    study.slice_uids = image.slice_uids
    return study


def batch_units(studies: Sequence[PreparedStudy], organ_masks: Sequence[torch.Tensor | None] | None = None
                ) -> dict[str, Any]:
    """Stack studies of one kind and unit count into ``pixel_units`` (B, N_u, 3, S, S) / ``organ_masks``
    (B, N_u, S, S) (zeros = no organ -> whole grid); mixed kinds/sizes stay lists."""
    units = [s.pixel_units for s in studies]
    same = len({tuple(u.shape) for u in units}) == 1
    masks = list(organ_masks) if organ_masks is not None else [None] * len(studies)
    filled = [m if m is not None else torch.zeros(u.shape[0], *u.shape[2:], dtype=torch.bool)
              for m, u in zip(masks, units)]
    return {
        "pixel_units": torch.stack(units) if same else units,
        "organ_masks": torch.stack(filled) if same else filled,
        "unit_kind": [s.kind for s in studies],
    }
