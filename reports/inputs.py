"""Plain inputs of the ``reports`` package: what the pipeline hands over, with no database or model attached."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import CTImageStorage

from reports.coding import OrganCoding, Urgency, organ_coding


class ReportInputError(ValueError):
    """An input cannot be encoded; the message says which one and why."""


# A blank SOP Class UID is tolerated for modalities whose storage class is unambiguous (real de-identified data has
# it blank, e.g. TotalSegmentator's example CT); anything else is refused.
_STORAGE_CLASS_BY_MODALITY = {"CT": CTImageStorage}


@dataclass(frozen=True)
class SourceSeries:
    """The CT series the results describe: its datasets (pixel data optional) sorted along the slice normal.

    Slice index ``i`` everywhere in this package means ``datasets[i]``: ascending position along the normal of the
    image plane (for axial CT, feet to head). A label map handed to :func:`reports.seg.build_segmentation` must be
    stacked in the same order, shape ``(n_slices, Rows, Columns)``.
    """

    datasets: tuple[Dataset, ...]

    @classmethod
    def from_datasets(cls, datasets: Iterable[Dataset]) -> SourceSeries:
        """Validate and sort the datasets of one series; fills a blank SOPClassUID for CT (see module note)."""
        items = list(datasets)
        if not items:
            raise ReportInputError("source series is empty")
        for ds in items:
            _repair_blank_sop_class(ds)
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPClassUID"):
            values = {str(getattr(ds, keyword, "") or "") for ds in items}
            if len(values) != 1 or "" in values:
                raise ReportInputError(f"source datasets must share one non-empty {keyword}, got {sorted(values)}")
        for ds in items:
            if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
                raise ReportInputError(f"source instance {ds.SOPInstanceUID} has no image position/orientation")
        if len({ds.SOPInstanceUID for ds in items}) != len(items):
            raise ReportInputError("source series holds the same SOPInstanceUID twice")
        normal = _slice_normal(items[0])
        ordered = sorted(items, key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))))
        return cls(tuple(ordered))

    @classmethod
    def from_files(cls, paths: Iterable[str | Path], *, with_pixels: bool = False) -> SourceSeries:
        """Read DICOM files (headers only unless ``with_pixels``) and build the series."""
        return cls.from_datasets(pydicom.dcmread(str(p), stop_before_pixels=not with_pixels) for p in paths)

    @property
    def first(self) -> Dataset:
        return self.datasets[0]

    @property
    def study_instance_uid(self) -> str:
        return str(self.first.StudyInstanceUID)

    @property
    def series_instance_uid(self) -> str:
        return str(self.first.SeriesInstanceUID)

    @property
    def frame_of_reference_uid(self) -> str:
        return str(self.first.FrameOfReferenceUID)

    @property
    def sop_class_uid(self) -> str:
        return str(self.first.SOPClassUID)

    @property
    def sop_instance_uids(self) -> tuple[str, ...]:
        return tuple(str(ds.SOPInstanceUID) for ds in self.datasets)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(n_slices, Rows, Columns)``: the shape a label map must have."""
        return (len(self.datasets), int(self.first.Rows), int(self.first.Columns))

    @cached_property
    def _index_by_uid(self) -> dict[str, int]:
        return {str(ds.SOPInstanceUID): index for index, ds in enumerate(self.datasets)}

    def index_of(self, reference: int | str) -> int:
        """The slice index of a slice index or a SOP Instance UID; raises ReportInputError if it is not in the
        series."""
        if isinstance(reference, (int, np.integer)):
            index = int(reference)
            if not 0 <= index < len(self.datasets):
                raise ReportInputError(f"slice index {index} outside the series (0..{len(self.datasets) - 1})")
            return index
        index = self._index_by_uid.get(str(reference))
        if index is None:
            raise ReportInputError(f"SOP Instance UID {reference} is not in the source series")
        return index

    def dataset_for(self, reference: int | str) -> Dataset:
        """The dataset for a slice index or a SOP Instance UID; raises ReportInputError if it is not in the series."""
        return self.datasets[self.index_of(reference)]


def _repair_blank_sop_class(ds: Dataset) -> None:
    if str(getattr(ds, "SOPClassUID", "") or ""):
        return
    storage_class = _STORAGE_CLASS_BY_MODALITY.get(str(getattr(ds, "Modality", "")))
    if storage_class is None:
        raise ReportInputError(f"instance {ds.get('SOPInstanceUID')} has a blank SOPClassUID and is not CT")
    ds.SOPClassUID = storage_class
    if getattr(ds, "file_meta", None) is not None and not str(ds.file_meta.get("MediaStorageSOPClassUID", "")):
        ds.file_meta.MediaStorageSOPClassUID = storage_class


def _slice_normal(ds: Dataset) -> np.ndarray:
    orientation = np.asarray(ds.ImageOrientationPatient, dtype=float)
    return np.cross(orientation[:3], orientation[3:])


class SegmentedOrgan:
    """What reports.seg encodes as a segment: an organ's ``label_name`` (TotalSegmentator-style, e.g. "liver",
    "kidney_left"), its ``label_value`` in the label map and its ``coding`` (None: looked up from the name)."""

    label_name: str
    label_value: int
    coding: OrganCoding | None

    @property
    def organ(self) -> OrganCoding:
        return self.coding if self.coding is not None else organ_coding(self.label_name)


@dataclass(frozen=True)
class SegmentLabel(SegmentedOrgan):
    """One segmented organ as a SEG segment: its label in the label map (the SEG needs no measurement)."""

    label_name: str
    label_value: int
    coding: OrganCoding | None = None


@dataclass(frozen=True)
class OrganMeasurement(SegmentedOrgan):
    """One segmented organ: its label in the label map and what was measured inside it."""

    label_name: str
    label_value: int
    volume_ml: float
    mean_hu: float
    std_hu: float
    coding: OrganCoding | None = None


@dataclass(frozen=True)
class VqaAnswer:
    """One question put to the model and its answer."""

    question: str
    answer: str  # the model's text answer, always kept
    coded_answer: Code | None = None  # e.g. coding.PRESENT / ABSENT, or a finding code
    finding: Code | None = None  # what the question asks about, e.g. coding.FINDINGS["pleural_effusion"]
    finding_site: str | OrganCoding | None = None  # organ label name or its coding
    key_images: tuple[int | str, ...] = ()  # slice indices into SourceSeries or SOP Instance UIDs
    urgency: Urgency | str = Urgency.ROUTINE

    @property
    def site(self) -> OrganCoding | None:
        if self.finding_site is None or isinstance(self.finding_site, OrganCoding):
            return self.finding_site
        return organ_coding(self.finding_site)

    @property
    def urgency_level(self) -> Urgency:
        return Urgency.parse(self.urgency)


@dataclass(frozen=True)
class AlgorithmInfo:
    """The algorithm that produced the results (TID 4019 / Algorithm Identification Sequence)."""

    name: str
    version: str
    parameters: Mapping[str, str] = field(default_factory=dict)
    family: Code | None = None  # None: Artificial Intelligence (123110, DCM)
    source: str | None = None  # e.g. the weights file name

    def parameter_strings(self) -> list[str]:
        """Parameters as "key=value" strings, sorted so the encoding does not depend on dict order."""
        return [f"{key}={value}" for key, value in sorted(self.parameters.items())]


@dataclass(frozen=True)
class RunIdentity:
    """What makes one pipeline run unique: every UID and date the objects carry is derived from it.

    Encoding the same run twice gives the same UIDs, so a re-delivery replaces the earlier objects in a PACS
    instead of duplicating them; a new run gives new ones.
    """

    study_instance_uid: str
    run_id: str  # e.g. the pipeline run's primary key or a UUID
    created: datetime = field(default_factory=lambda: datetime.now(UTC))
    uid_root: str | None = None  # org root ("1.2.826.0.1.3680043.10.xxx"); None: 2.25 UUID-derived UIDs

    def check_source(self, source: SourceSeries) -> None:
        """Refuse to encode results of one study into another."""
        if source.study_instance_uid != self.study_instance_uid:
            raise ReportInputError(
                f"run identity is for study {self.study_instance_uid}, source series is in {source.study_instance_uid}"
            )


def resolve_key_images(source: SourceSeries, references: Sequence[int | str]) -> list[Dataset]:
    """Datasets of the referenced slices, de-duplicated, in series order."""
    return [source.datasets[index] for index in sorted({source.index_of(ref) for ref in references})]
