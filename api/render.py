"""PNG renderings of stored CT slices for the study page: modality LUT (HU), then a window, then 8-bit grey.

Windows are the usual CT presets (centre/width in HU); ``auto`` uses the slice's own Window Center/Width
(0028,1050)/(0028,1051) when present, else the soft-tissue preset.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_modality_lut

WINDOWS: dict[str, tuple[float, float]] = {
    "soft": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "liver": (60.0, 160.0),
}
MAX_SIZE = 1024


class RenderError(ValueError):
    """The file has no renderable image (an SR, a broken file): answered as 422."""


def window_for(dataset: pydicom.Dataset, window: str) -> tuple[float, float]:
    if window in WINDOWS:
        return WINDOWS[window]
    if window != "auto":
        raise RenderError(f"unknown window {window!r}; use one of {['auto', *WINDOWS]}")
    center, width = dataset.get("WindowCenter"), dataset.get("WindowWidth")
    if center is not None and width is not None:
        # Multi-valued windows: the first is the primary one (PS3.3 C.11.2.1.2).
        first = lambda v: float(v[0]) if isinstance(v, pydicom.multival.MultiValue) else float(v)  # noqa: E731
        if first(width) > 0:
            return first(center), first(width)
    return WINDOWS["soft"]


def apply_window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear window of PS3.3 C.11.2.1.2.1 to uint8 (``width`` ≥ 1)."""
    width = max(width, 1.0)
    low = center - 0.5 - (width - 1) / 2
    scaled = (hu.astype(np.float32) - low) / (width - 1)
    return (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def render_png(path: Path, window: str = "auto", frame: int = 0) -> bytes:
    """The windowed slice (frame ``frame`` of a multi-frame image) of the DICOM file at ``path`` as PNG bytes."""
    try:
        dataset = pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad stored file
        raise RenderError(f"cannot read DICOM file: {exc}") from exc
    if "PixelData" not in dataset:
        raise RenderError("the instance has no pixel data")
    try:
        pixels = dataset.pixel_array
    except Exception as exc:  # noqa: BLE001 - missing decoder, corrupt pixel data
        raise RenderError(f"cannot decode pixel data: {exc}") from exc
    if int(dataset.get("NumberOfFrames", 1) or 1) > 1:
        if not 0 <= frame < pixels.shape[0]:
            raise RenderError(f"frame {frame} out of range 0..{pixels.shape[0] - 1}")
        pixels = pixels[frame]
    if pixels.ndim != 2:
        raise RenderError(f"only monochrome slices are rendered (got shape {pixels.shape})")
    hu = apply_modality_lut(pixels, dataset)
    center, width = window_for(dataset, window)
    grey = apply_window(hu, center, width)
    if dataset.get("PhotometricInterpretation") == "MONOCHROME1":
        grey = 255 - grey
    image = Image.fromarray(grey, mode="L")
    if max(image.size) > MAX_SIZE:
        image.thumbnail((MAX_SIZE, MAX_SIZE))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
