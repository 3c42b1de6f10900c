"""The few top-level values the node reads from every received dataset, and the registration record built from them.

Only UIDs and routing facts are read (SOP Class/Instance, Study, Series, modality, numbers, study date, requested
priority): never a patient attribute. Values come from :func:`dicom_node.fastpath.scan_dataset` (raw bytes per
tag), so no pydicom Dataset is built on the ingest hot path. Used by the SCP for each C-STORE and by
:mod:`dicom_node.reconcile` for files found on disk without a database row.
"""

from __future__ import annotations

from dataclasses import dataclass

from db.ingest import InstanceRecord
from dicom_node.fastpath import uid_text

SOP_CLASS_UID, SOP_INSTANCE_UID, STUDY_DATE, MODALITY = 0x00080016, 0x00080018, 0x00080020, 0x00080060
STUDY_UID, SERIES_UID, SERIES_NUMBER, INSTANCE_NUMBER = 0x0020000D, 0x0020000E, 0x00200011, 0x00200013
REQUESTED_PRIORITY = 0x00401003
WANTED_TAGS = frozenset({SOP_CLASS_UID, SOP_INSTANCE_UID, STUDY_DATE, MODALITY, STUDY_UID, SERIES_UID,
                         SERIES_NUMBER, INSTANCE_NUMBER, REQUESTED_PRIORITY})

# File Meta Information (PS3.10 7.1) tags read back from stored files.
META_TRANSFER_SYNTAX_UID, META_SOURCE_AE_TITLE = 0x00020010, 0x00020016
META_WANTED_TAGS = frozenset({META_TRANSFER_SYNTAX_UID, META_SOURCE_AE_TITLE})


@dataclass(frozen=True)
class DatasetFacts:
    """What the node needs to know about one instance to store and register it."""

    sop_class_uid: str | None
    sop_instance_uid: str | None
    study_uid: str | None
    series_uid: str | None
    modality: str | None
    series_number: int | None
    instance_number: int | None
    study_date: str | None
    requested_priority: str | None

    @property
    def uids(self) -> dict[str, str | None]:
        """The four UIDs every instance must carry, by the name used in status details."""
        return {"sop_class": self.sop_class_uid, "sop_instance": self.sop_instance_uid, "study": self.study_uid,
                "series": self.series_uid}

    def record(self, *, transfer_syntax_uid: str, path: str, size_bytes: int, calling_ae_title: str | None,
               association_id: int | None, replaces_existing: bool) -> InstanceRecord:
        """The registration record of this instance, stored at ``path`` (relative to the storage root)."""
        return InstanceRecord(
            study_instance_uid=self.study_uid, series_instance_uid=self.series_uid,  # type: ignore[arg-type]
            sop_instance_uid=self.sop_instance_uid, sop_class_uid=self.sop_class_uid,  # type: ignore[arg-type]
            transfer_syntax_uid=transfer_syntax_uid, path=path, size_bytes=size_bytes, modality=self.modality,
            series_number=self.series_number, instance_number=self.instance_number, study_date=self.study_date,
            requested_priority=self.requested_priority, calling_ae_title=calling_ae_title,
            association_id=association_id, replaces_existing=replaces_existing,
        )


def dataset_facts(values: dict[int, bytes]) -> DatasetFacts:
    """Decode the raw values returned by ``scan_dataset(..., WANTED_TAGS)``."""
    return DatasetFacts(
        sop_class_uid=uid_text(values.get(SOP_CLASS_UID)), sop_instance_uid=uid_text(values.get(SOP_INSTANCE_UID)),
        study_uid=uid_text(values.get(STUDY_UID)), series_uid=uid_text(values.get(SERIES_UID)),
        modality=short_text(values.get(MODALITY), 16), series_number=first_int(values.get(SERIES_NUMBER)),
        instance_number=first_int(values.get(INSTANCE_NUMBER)), study_date=short_text(values.get(STUDY_DATE), 8),
        requested_priority=short_text(values.get(REQUESTED_PRIORITY), 16),
    )


def short_text(raw: bytes | None, limit: int) -> str | None:
    """A short string value (CS, DA, SH, AE), stripped and cut to the database column's ``limit``."""
    if not raw:
        return None
    text = raw.decode("ascii", errors="replace").strip(" \x00")
    return text[:limit] or None


def first_int(raw: bytes | None) -> int | None:
    """The first value of an IS element, ``None`` when absent or not an integer."""
    text = short_text(raw, 16)
    if text is None:
        return None
    try:
        return int(text.split("\\")[0])
    except ValueError:
        return None
