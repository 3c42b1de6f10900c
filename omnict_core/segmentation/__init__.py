"""Organ segmentation behind one interface (``Segmenter.segment(hu, spacing_zyx_mm, axis_codes)`` ->
``SegmentationResult``), with TotalSegmentator v2 label names.

Backends: ``classical`` (no weights; thresholds, connected components, anatomical rules) and ``totalsegmentator``
(optional extra ``totalseg``; local weights only). ``make_segmenter`` picks one from settings values.
"""

from __future__ import annotations

from pathlib import Path

from omnict_core.segmentation.base import (
    DEFAULT_AXIS_CODES,
    SegmentationError,
    SegmentationResult,
    Segmenter,
    axis_codes_from_affine_zyx,
    axis_codes_from_ct_volume,
    axis_codes_from_direction,
    segment_ct_volume,
)
from omnict_core.segmentation.measurements import OrganMeasurement, measure_organs

BACKENDS = ("classical", "totalsegmentator")


def make_segmenter(backend: str = "classical", *, weights_dir: Path | str | None = None, fast: bool = True,
                   device: str = "cpu") -> Segmenter:
    """The backend named by ``settings.model.segmentation_backend`` ('classical' or 'totalsegmentator');
    ``weights_dir`` is ``settings.model.totalseg_weights``."""
    if backend == "classical":
        from omnict_core.segmentation.classical import ClassicalSegmenter

        return ClassicalSegmenter()
    if backend in ("totalsegmentator", "totalseg"):
        from omnict_core.segmentation.totalseg import TotalSegmentatorSegmenter, check_weights

        check_weights(weights_dir, fast)  # fail before any work, naming the missing path
        return TotalSegmentatorSegmenter(weights_dir, fast=fast, device=device)
    raise SegmentationError(f"unknown segmentation backend {backend!r} (choose from {', '.join(BACKENDS)})")


__all__ = [
    "BACKENDS",
    "DEFAULT_AXIS_CODES",
    "OrganMeasurement",
    "SegmentationError",
    "SegmentationResult",
    "Segmenter",
    "axis_codes_from_affine_zyx",
    "axis_codes_from_ct_volume",
    "axis_codes_from_direction",
    "make_segmenter",
    "measure_organs",
    "segment_ct_volume",
]
