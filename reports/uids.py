"""Deterministic UIDs and series identity of the node's result objects.

A UID is a function of (study, run, object kind, qualifier). Without an organisation root it is
``2.25.<decimal of a name-based UUID>`` (PS3.5 B.2: UUID-derived UIDs need no registered root); with a root it is
``<root>.<decimal digits of a SHA-256>``, cut to the 64 characters a UID may have.
"""

from __future__ import annotations

import enum
import hashlib
import uuid
from dataclasses import dataclass

from pydicom.uid import UID

from reports.inputs import RunIdentity

# Fixed namespace: the same names give the same UUIDs on every node and every version of this code.
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:omnict-node:dicom-result-objects")
_MAX_UID_LENGTH = 64


@dataclass(frozen=True)
class SeriesSpec:
    slug: str
    series_number: int
    series_description: str


class ObjectKind(enum.Enum):
    """The result objects the node writes; each goes to its own new series in the source study.

    One instance per series: OHIF shows only the newest SR instance of a series, so kinds never share one.
    Series numbers start at 7001 to stay clear of the scanner's own numbering.
    """

    SEGMENTATION = SeriesSpec("seg", 7001, "OmniCT organ segmentation")
    MEASUREMENT_REPORT = SeriesSpec("measurements", 7002, "OmniCT organ measurements")
    FINDINGS_REPORT = SeriesSpec("findings", 7003, "OmniCT VQA findings")
    NARRATIVE_REPORT = SeriesSpec("narrative", 7004, "OmniCT narrative report")
    KEY_OBJECTS = SeriesSpec("key-objects", 7005, "OmniCT key images")

    @property
    def series_number(self) -> int:
        return self.value.series_number

    @property
    def series_description(self) -> str:
        return self.value.series_description


def derive_uid(run: RunIdentity, *parts: str) -> UID:
    """A UID that depends only on the run identity and ``parts`` (e.g. ``("seg", "series")``)."""
    name = "/".join((run.study_instance_uid, run.run_id, *parts))
    if run.uid_root is None:
        return UID(f"2.25.{uuid.uuid5(_NAMESPACE, name).int}")
    root = run.uid_root.rstrip(".")
    room = _MAX_UID_LENGTH - len(root) - 1
    if room < 10:  # fewer digits than this would make collisions plausible
        raise ValueError(f"UID root {root!r} is too long to derive unique UIDs under it")
    digits = str(int.from_bytes(hashlib.sha256(name.encode()).digest(), "big"))[:room]
    return UID(f"{root}.{digits}")


def series_instance_uid(run: RunIdentity, kind: ObjectKind) -> UID:
    """Series Instance UID (0020,000E) of the new series of ``kind``."""
    return derive_uid(run, kind.value.slug, "series")


def sop_instance_uid(run: RunIdentity, kind: ObjectKind) -> UID:
    """SOP Instance UID (0008,0018) of the one instance of ``kind``."""
    return derive_uid(run, kind.value.slug, "instance")


def tracking_uid(run: RunIdentity, kind: ObjectKind, item: str) -> UID:
    """Tracking Unique Identifier (112040, DCM) / Tracking UID (0062,0021) of one organ or question."""
    return derive_uid(run, kind.value.slug, "tracking", item)


def device_observer_uid(manufacturer: str, algorithm_name: str) -> UID:
    """Device Observer UID (121012, DCM): stable per algorithm, the same across runs (it names the device)."""
    return UID(f"2.25.{uuid.uuid5(_NAMESPACE, f'device/{manufacturer}/{algorithm_name}').int}")
