"""What every result object shares: it lives in the source study, in a new series of its own kind, made by the
"OmniCT node" equipment, dated by the run."""

from __future__ import annotations

import copy
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from reports.algorithm import NODE_MANUFACTURER
from reports.inputs import AlgorithmInfo, RunIdentity, SourceSeries
from reports.uids import ObjectKind, series_instance_uid, sop_instance_uid

# Model answers are free text in any script, so every object is written in UTF-8; the copied patient and study
# values are decoded from the source's character set by pydicom and re-encoded on write.
UTF8_CHARACTER_SET = "ISO_IR 192"

# Patient, Clinical Trial Subject and Patient Study attributes copied verbatim from the source beyond the ones
# highdicom copies itself (name, ID, birth date, sex), so the results sort under the same patient everywhere.
_PATIENT_AND_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "OtherPatientIDsSequence",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
)


def _detached_copy(element: DataElement) -> DataElement:
    """A copy sharing nothing with the source: a shared element (or a PersonName that still holds its source bytes
    and character set) would let writing one object change what the next one copies."""
    value = element.value
    if element.VR == "PN":
        value = [str(v) for v in value] if element.VM > 1 else (str(value) if value is not None else None)
    return DataElement(element.tag, element.VR, copy.deepcopy(value))


def node_software_versions(algorithm: AlgorithmInfo) -> tuple[str, str]:
    """Software Versions (0018,1020): the node's package version and the algorithm's."""
    try:
        node_version = version("omnict-node")
    except PackageNotFoundError:  # running from a source tree that is not installed
        node_version = "unknown"
    return (f"omnict-node {node_version}", f"{algorithm.name} {algorithm.version}")


def new_series_arguments(kind: ObjectKind, run: RunIdentity) -> dict[str, Any]:
    """Constructor arguments for a highdicom SOP class: Series Instance UID (0020,000E), Series Number (0020,0011),
    SOP Instance UID (0008,0018), Instance Number (0020,0013) and Manufacturer (0008,0070)."""
    return {
        "series_instance_uid": series_instance_uid(run, kind),
        "series_number": kind.series_number,
        "sop_instance_uid": sop_instance_uid(run, kind),
        "instance_number": 1,
        "manufacturer": NODE_MANUFACTURER,
    }


def stamp_node_identity(
    dataset: Dataset, source: SourceSeries, kind: ObjectKind, run: RunIdentity, algorithm: AlgorithmInfo
) -> None:
    """Fill what highdicom leaves to the caller and pin the dates to the run, so that encoding a run twice gives
    the same bytes: Specific Character Set (0008,0005) = ISO_IR 192, Series Description (0008,103E), Manufacturer's
    Model Name (0008,1090), Software Versions (0018,1020), Series/Content/Instance Creation Date and Time, Timezone
    Offset From UTC (0008,0201), Contribution DateTime (0018,A002) of highdicom's Contributing Equipment item, and
    the patient/study attributes of the source (detached copies)."""
    source_ds = source.first
    dataset.SpecificCharacterSet = UTF8_CHARACTER_SET
    for keyword in _PATIENT_AND_STUDY_KEYWORDS:
        if keyword in source_ds:
            dataset[keyword] = _detached_copy(source_ds[keyword])
    dataset.SeriesDescription = kind.series_description
    dataset.ManufacturerModelName = algorithm.name[:64]
    dataset.SoftwareVersions = list(node_software_versions(algorithm))
    day, time = run.created.strftime("%Y%m%d"), run.created.strftime("%H%M%S")
    dataset.SeriesDate, dataset.SeriesTime = day, time
    dataset.ContentDate, dataset.ContentTime = day, time
    dataset.InstanceCreationDate, dataset.InstanceCreationTime = day, time
    if run.created.utcoffset() is not None:
        dataset.TimezoneOffsetFromUTC = run.created.strftime("%z")
    # highdicom stamps its own Contributing Equipment item with the wall clock
    for item in dataset.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = day + time
