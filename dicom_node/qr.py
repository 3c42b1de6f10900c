"""Query/Retrieve SCP (C-FIND, C-GET, C-MOVE; PS3.4 Annex C) over everything the node holds.

A viewer can find and fetch from the node itself both the instances it received (``Instance`` rows, files under
``settings.storage.root``) and the objects it generated (``ResultObject`` rows: SR, SEG, KOS, files under
``settings.data_dir``). Information models: Study Root (STUDY, SERIES, IMAGE) and Patient Root (PATIENT, STUDY,
SERIES, IMAGE).

Where the values come from:

* the database: UIDs, SOP classes, Modality, StudyDate, SeriesNumber, InstanceNumber and the counts;
* everything else (PatientName, PatientID, StudyTime, AccessionNumber, SeriesDescription, ...) from the header of
  one representative file per study / series (the instance file itself at IMAGE level), read without pixel data
  and kept in a small LRU cache. The database deliberately holds no patient data.

Matching (PS3.4 C.2.2.2): single value, UID list (``uid1\\uid2``), wildcards ``*``/``?`` on text keys (person
names case-insensitively), ranges on DA/TM/DT (``A-B``, ``A-``, ``-B``), universal matching for empty keys.
Sequence keys are returned empty (no sequence matching).

Retrieval uses the unique keys of the level (PatientID, StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID;
lists allowed). C-MOVE destinations are known AE titles only (an explicit ``move_destinations`` map, then
``settings.dicom.destinations``, then allow-listed peers that give a port); anything else answers 0xA801.

Logs carry UIDs, AE titles and counts only; pynetdicom's identifier logging is switched off.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, UID
from pynetdicom import AE, build_context, evt
from pynetdicom import sop_class as sop
from pynetdicom.presentation import PresentationContext
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Instance, ResultObject, Series, Study
from dicom_node import fastpath
from dicom_node.scp import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES
from dicom_node.security import client_ssl_context
from omnict_node.config import Settings, TlsSettings
from omnict_node.logs import log_event

log = logging.getLogger("omnict.qr")

STUDY_ROOT_FIND = str(sop.StudyRootQueryRetrieveInformationModelFind)
STUDY_ROOT_GET = str(sop.StudyRootQueryRetrieveInformationModelGet)
STUDY_ROOT_MOVE = str(sop.StudyRootQueryRetrieveInformationModelMove)
PATIENT_ROOT_FIND = str(sop.PatientRootQueryRetrieveInformationModelFind)
PATIENT_ROOT_GET = str(sop.PatientRootQueryRetrieveInformationModelGet)
PATIENT_ROOT_MOVE = str(sop.PatientRootQueryRetrieveInformationModelMove)
QR_SOP_CLASSES = [STUDY_ROOT_FIND, STUDY_ROOT_GET, STUDY_ROOT_MOVE,
                  PATIENT_ROOT_FIND, PATIENT_ROOT_GET, PATIENT_ROOT_MOVE]
_PATIENT_ROOT = {PATIENT_ROOT_FIND, PATIENT_ROOT_GET, PATIENT_ROOT_MOVE}
LEVELS_BY_MODEL = {"STUDY_ROOT": ("STUDY", "SERIES", "IMAGE"), "PATIENT_ROOT": ("PATIENT", "STUDY", "SERIES", "IMAGE")}

# Storage classes the node sends as C-STORE SCU in C-GET sub-operations: what it generates (every SR class incl.
# Comprehensive 3D SR, SEG, KOS) and what it receives (CT and the rest of the storage SCP's list).
GENERATED_SOP_CLASSES = [
    str(sop.BasicTextSRStorage), str(sop.EnhancedSRStorage), str(sop.ComprehensiveSRStorage),
    str(sop.Comprehensive3DSRStorage), str(sop.SegmentationStorage), str(sop.KeyObjectSelectionDocumentStorage),
]
RETRIEVE_SOP_CLASSES = list(dict.fromkeys([*GENERATED_SOP_CLASSES, str(sop.CTImageStorage), *STORAGE_SOP_CLASSES]))

# Modality of a generated object, by SOP class (the DB row has no Modality column).
_MODALITY_BY_SOP_CLASS = {str(sop.SegmentationStorage): "SEG", str(sop.KeyObjectSelectionDocumentStorage): "KO"}

# DIMSE statuses (PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4).
PENDING, CANCEL, SUCCESS = 0xFF00, 0xFE00, 0x0000
IDENTIFIER_DOES_NOT_MATCH = 0xA900
MOVE_DESTINATION_UNKNOWN = 0xA801
UNABLE_TO_PROCESS = 0xC001

# Which keys a level may return (the unique keys and the level's attributes, PS3.4 C.6). Keys of higher levels are
# also allowed below them; a key of a lower level asked at a higher one is returned empty.
_PATIENT_KEYS = {"PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientBirthTime",
                 "PatientSex", "OtherPatientIDs", "OtherPatientNames", "EthnicGroup", "PatientComments",
                 "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries", "NumberOfPatientRelatedInstances"}
_STUDY_KEYS = {"StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription",
               "ReferringPhysicianName", "NameOfPhysiciansReadingStudy", "PatientAge", "PatientSize", "PatientWeight",
               "ModalitiesInStudy", "SOPClassesInStudy", "NumberOfStudyRelatedSeries",
               "NumberOfStudyRelatedInstances", "AdmittingDiagnosesDescription", "InstitutionName"}
_SERIES_KEYS = {"SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "SeriesDate", "SeriesTime",
                "BodyPartExamined", "ProtocolName", "Manufacturer", "ManufacturerModelName", "Laterality",
                "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
                "NumberOfSeriesRelatedInstances", "FrameOfReferenceUID"}
_ALLOWED_KEYS = {
    "PATIENT": _PATIENT_KEYS,
    "STUDY": _PATIENT_KEYS | _STUDY_KEYS,
    "SERIES": _PATIENT_KEYS | _STUDY_KEYS | _SERIES_KEYS,
}
_UNIQUE_KEY = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
               "IMAGE": "SOPInstanceUID"}
_PERSON_NAME_VRS = {"PN"}
_RANGE_VRS = {"DA", "TM", "DT"}
_TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UR", "UT"}


class QueryError(Exception):
    """An identifier we cannot answer; ``status`` is the DIMSE failure status."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status, self.comment = status, comment


# -- what the node holds ----------------------------------------------------------------------------------------


@dataclass
class Item:
    """One SOP instance the node can serve (received or generated)."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    path: Path
    generated: bool
    transfer_syntax_uid: str | None = None  # None for generated objects until read from the file meta
    modality: str | None = None
    study_date: str | None = None
    series_number: int | None = None
    instance_number: int | None = None


@dataclass
class Entity:
    """One match at a query level, with the values the database knows and a file that knows the rest."""

    level: str
    study_uid: str | None
    series_uid: str | None = None
    sop_uid: str | None = None
    values: dict[str, Any] = field(default_factory=dict)  # keyword -> value known from the DB
    representative: Path | None = None  # header source for everything else
    study_uids: set[str] = field(default_factory=set)  # PATIENT level: the patient's studies


@dataclass
class _SeriesRow:
    study_uid: str
    series_uid: str
    modality: str | None
    series_number: int | None
    study_date: str | None
    instances: int
    representative: Path
    sop_classes: set[str]
    generated: bool


@dataclass(frozen=True)
class UidKeys:
    """UID-list restrictions taken from an identifier (``None``: no restriction)."""

    study: tuple[str, ...] | None = None
    series: tuple[str, ...] | None = None
    sop: tuple[str, ...] | None = None


class NodeCatalog:
    """Reads what the node holds from the database, and file headers through an LRU cache."""

    def __init__(self, settings: Settings, session_factory: sessionmaker[Session], header_cache_size: int = 2048):
        self.storage_root = Path(settings.storage.root)  # type: ignore[arg-type]
        self.data_dir = Path(settings.data_dir)
        self.session_factory = session_factory
        self.headers = HeaderCache(header_cache_size)

    # instances ----------------------------------------------------------------------------------------------

    def items(self, keys: UidKeys) -> list[Item]:
        """Every received and generated instance inside the UID restrictions (ordered by series, number)."""
        received = (select(Instance, Series, Study).join(Series, Instance.series_id == Series.id)
                    .join(Study, Series.study_id == Study.id))
        generated = select(ResultObject, Study.study_date).join(
            Study, Study.study_instance_uid == ResultObject.study_instance_uid, isouter=True)
        if keys.study is not None:
            received = received.where(Study.study_instance_uid.in_(keys.study))
            generated = generated.where(ResultObject.study_instance_uid.in_(keys.study))
        if keys.series is not None:
            received = received.where(Series.series_instance_uid.in_(keys.series))
            generated = generated.where(ResultObject.series_instance_uid.in_(keys.series))
        if keys.sop is not None:
            received = received.where(Instance.sop_instance_uid.in_(keys.sop))
            generated = generated.where(ResultObject.sop_instance_uid.in_(keys.sop))
        out: list[Item] = []
        with self.session_factory() as session:
            for inst, series, study in session.execute(received.order_by(Series.id, Instance.instance_number,
                                                                         Instance.id)):
                out.append(Item(study.study_instance_uid, series.series_instance_uid, inst.sop_instance_uid,
                                inst.sop_class_uid, self.storage_root / inst.path, False, inst.transfer_syntax_uid,
                                series.modality, study.study_date, series.series_number, inst.instance_number))
            for obj, study_date in session.execute(generated.order_by(ResultObject.id)):
                out.append(Item(obj.study_instance_uid, obj.series_instance_uid, obj.sop_instance_uid,
                                obj.sop_class_uid, self.data_dir / obj.path, True, None,
                                _generated_modality(obj.sop_class_uid), study_date))
        return out

    # series and studies -------------------------------------------------------------------------------------

    def series_rows(self, keys: UidKeys) -> list[_SeriesRow]:
        """One row per series (received or generated), aggregated in SQL."""
        received = (select(Study.study_instance_uid, Series.series_instance_uid, Series.modality,
                           Series.series_number, Study.study_date, func.count(Instance.id), func.min(Instance.path))
                    .join(Series, Series.study_id == Study.id).join(Instance, Instance.series_id == Series.id)
                    .group_by(Study.study_instance_uid, Series.series_instance_uid, Series.modality,
                              Series.series_number, Study.study_date, Series.id).order_by(Series.id))
        received_classes = (select(Series.series_instance_uid, Instance.sop_class_uid).distinct()
                            .join(Instance, Instance.series_id == Series.id).join(Study, Series.study_id == Study.id))
        generated = (select(ResultObject.study_instance_uid, ResultObject.series_instance_uid,
                            func.min(ResultObject.sop_class_uid), func.max(ResultObject.sop_class_uid),
                            func.count(ResultObject.id), func.min(ResultObject.path), func.min(ResultObject.id))
                     .group_by(ResultObject.study_instance_uid, ResultObject.series_instance_uid)
                     .order_by(func.min(ResultObject.id)))
        received = _restrict(received, Study.study_instance_uid, Series.series_instance_uid, keys)
        received_classes = _restrict(received_classes, Study.study_instance_uid, Series.series_instance_uid, keys)
        generated = _restrict(generated, ResultObject.study_instance_uid, ResultObject.series_instance_uid, keys)
        rows: list[_SeriesRow] = []
        with self.session_factory() as session:
            classes: dict[str, set[str]] = defaultdict(set)
            for series_uid, sop_class_uid in session.execute(received_classes):
                classes[series_uid].add(sop_class_uid)
            for study_uid, series_uid, modality, number, study_date, count, path in session.execute(received):
                rows.append(_SeriesRow(study_uid, series_uid, modality, number, study_date, count,
                                       self.storage_root / path, classes[series_uid], False))
            dates_query = select(Study.study_instance_uid, Study.study_date)
            if keys.study is not None:
                dates_query = dates_query.where(Study.study_instance_uid.in_(keys.study))
            dates = dict(session.execute(dates_query).all())
            for study_uid, series_uid, class_min, class_max, count, path, _first in session.execute(generated):
                rows.append(_SeriesRow(study_uid, series_uid, _generated_modality(class_min), None,
                                       dates.get(study_uid), count, self.data_dir / path, {class_min, class_max},
                                       True))
        return rows

    def header(self, path: Path | None) -> Dataset | None:
        return self.headers.get(path) if path is not None else None


def _restrict(statement, study_column, series_column, keys: UidKeys):
    if keys.study is not None:
        statement = statement.where(study_column.in_(keys.study))
    if keys.series is not None:
        statement = statement.where(series_column.in_(keys.series))
    return statement


def _generated_modality(sop_class_uid: str) -> str:
    return _MODALITY_BY_SOP_CLASS.get(sop_class_uid, "SR")


class HeaderCache:
    """Top-level, non-sequence header elements of DICOM files (no pixel data), LRU-cached by path + mtime + size.

    Values are decoded with the file's Specific Character Set when read, so the cached copy carries ``str``
    values and no longer needs it.
    """

    def __init__(self, maxsize: int = 2048) -> None:
        self.maxsize = maxsize
        self._entries: OrderedDict[tuple[str, int, int], Dataset | None] = OrderedDict()
        self._lock = threading.Lock()
        self.reads = 0  # files actually read (a cache miss), for tests and metrics

    def get(self, path: Path) -> Dataset | None:
        try:
            stat = os.stat(path)
        except OSError:
            return None
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        header = self._read(path)
        with self._lock:
            self.reads += 1
            self._entries[key] = header
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
        return header

    @staticmethod
    def _read(path: Path) -> Dataset | None:
        try:
            full = dcmread(str(path), stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - an unreadable file answers no header values; the caller decides
            log_event(log, "qr.header.unreadable", logging.WARNING, path=path)
            return None
        header = Dataset()
        for tag in list(full.keys()):
            if tag.is_private or tag.group == 0x0002:
                continue
            element = full[tag]  # converts a raw element, decoding text with the file's character set
            if element.VR == "SQ" or element.VR.startswith("O") or element.VR == "UN":
                continue
            header.add(element)
        return header


# -- matching ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueryKey:
    keyword: str
    tag: int
    vr: str
    value: Any  # as decoded from the identifier: str, MultiValue, PersonName, int, ...

    @property
    def texts(self) -> list[str]:
        """The request values as strings (a list for multi-valued keys; [] when empty)."""
        value = self.value
        if value is None or value == "":
            return []
        if isinstance(value, (MultiValue, list, tuple)):
            return [str(v) for v in value]
        text = str(value)
        return text.split("\\") if "\\" in text else [text]


def query_keys(identifier: Dataset) -> list[QueryKey]:
    keys = []
    for element in identifier:
        if element.tag.is_private or element.tag.group in (0x0000, 0x0002):
            continue
        keyword = element.keyword or keyword_for_tag(element.tag)
        if keyword in ("QueryRetrieveLevel", "SpecificCharacterSet", ""):
            continue
        keys.append(QueryKey(keyword, int(element.tag), element.VR, element.value))
    return keys


def matches(key: QueryKey, value: Any) -> bool:
    """Whether an entity's ``value`` (``None`` when it has none) matches the request key (PS3.4 C.2.2.2)."""
    wanted = key.texts
    if not wanted or all(set(w) <= {"*"} for w in wanted):
        return True  # universal matching
    if key.vr == "SQ":
        return True  # no sequence matching: the key is only returned
    actual = _as_texts(value)
    if not actual:
        return False
    return any(_match_one(key.vr, w, a) for w in wanted for a in actual)


def _as_texts(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, (MultiValue, list, tuple, set)):
        return [str(v) for v in value if str(v) != ""]
    return [str(value)]


def _match_one(vr: str, wanted: str, actual: str) -> bool:
    if _is_range(vr, wanted):
        low, _, high = wanted.partition("-")
        return (not low or _norm(vr, actual) >= _norm(vr, low)) and (not high or _norm(vr, actual) <= _norm(vr, high, True))
    if vr in _TEXT_VRS and ("*" in wanted or "?" in wanted):
        pattern = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in wanted)
        flags = re.IGNORECASE if vr in _PERSON_NAME_VRS else 0
        return re.fullmatch(pattern, actual, flags | re.DOTALL) is not None
    if vr in _PERSON_NAME_VRS:
        return wanted.strip().casefold() == actual.strip().casefold()
    if vr in ("IS", "US", "UL", "SS", "SL"):
        try:
            return int(wanted) == int(actual)
        except ValueError:
            return False
    if vr in _RANGE_VRS:
        return _norm(vr, actual)[: len(_norm(vr, wanted))] == _norm(vr, wanted)
    return wanted.strip() == actual.strip()


def _is_range(vr: str, wanted: str) -> bool:
    if vr not in _RANGE_VRS or "-" not in wanted:
        return False
    if vr != "DT":
        return True
    # A DT may carry a UTC offset ("20260101120000-0500"): a range has exactly one '-' between two DT values.
    parts = wanted.split("-")
    return len(parts) == 2 and all(len(part) == 0 or len(part) >= 8 for part in parts)


def _norm(vr: str, text: str, upper: bool = False) -> str:
    # Compare dates/times as digit strings; an open upper bound on a truncated time covers its whole span.
    digits = text.strip().replace(":", "").split("+")[0]
    if vr == "TM":
        head, _, fraction = digits.partition(".")
        digits = head.ljust(6, "9" if upper else "0") + ("." + fraction if fraction else "")
    return digits


def fnmatch_uid_list(texts: Iterable[str]) -> tuple[str, ...]:
    return tuple(t.strip() for t in texts if t.strip())


# -- the SCP ----------------------------------------------------------------------------------------------------


MoveDestination = tuple[str, int] | tuple[str, int, TlsSettings | None]


class QueryRetrieveSCP:
    """Event handlers of the Q/R service; see :func:`add_query_retrieve`."""

    def __init__(self, settings: Settings, session_factory: sessionmaker[Session],
                 move_destinations: dict[str, MoveDestination] | None = None) -> None:
        self.settings = settings
        self.catalog = NodeCatalog(settings, session_factory)
        self.ae_title = settings.dicom.ae_title
        self.move_destinations: dict[str, tuple[str, int, TlsSettings | None]] = {}
        for peer in settings.dicom.allowed_peers:  # a peer that gives its own SCP port can be a move destination
            if peer.port and peer.host != "*":
                self.move_destinations[peer.ae_title.strip()] = (peer.host, peer.port, peer.tls)
        for destination in settings.dicom.destinations:
            self.move_destinations[destination.ae_title.strip()] = (destination.host, destination.port,
                                                                    destination.tls)
        for title, target in (move_destinations or {}).items():
            host, port, *rest = target
            self.move_destinations[title.strip()] = (host, int(port), rest[0] if rest else None)

    @property
    def handlers(self) -> list[tuple[evt.EventType, Callable]]:
        return [(evt.EVT_C_FIND, self.on_find), (evt.EVT_C_GET, self.on_get), (evt.EVT_C_MOVE, self.on_move)]

    # C-FIND ---------------------------------------------------------------------------------------------------

    def on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        model = _model(str(event.request.AffectedSOPClassUID))
        calling = _calling_ae(event)
        try:
            identifier = event.identifier
        except Exception:  # noqa: BLE001 - undecodable identifier
            log_event(log, "qr.find.refused", logging.WARNING, calling_ae=calling, reason="undecodable identifier")
            yield _status(0xC000, "Unable to process: undecodable identifier"), None
            return
        try:
            level = _level(identifier, model)
            keys = query_keys(identifier)
            entities = self.find(level, keys)
        except QueryError as error:
            log_event(log, "qr.find.refused", logging.WARNING, calling_ae=calling, status=f"0x{error.status:04X}",
                      reason=error.comment)
            yield _status(error.status, error.comment), None
            return
        except Exception as exc:  # noqa: BLE001 - a database outage answers a failure, not an abort
            log_event(log, "qr.find.failed", logging.ERROR, calling_ae=calling, error=type(exc).__name__)
            yield _status(UNABLE_TO_PROCESS, "Unable to process: node database unavailable"), None
            return
        answered = 0
        for entity in entities:
            if event.is_cancelled:
                yield CANCEL, None
                return
            response = self.response(level, keys, entity)
            if response is not None:
                answered += 1
                yield PENDING, response
        log_event(log, "qr.find.done", calling_ae=calling, qr_level=level, model=model, matches=answered,
                  study_uid=_single_uid(keys, "StudyInstanceUID"))

    def find(self, level: str, keys: Sequence[QueryKey]) -> list[Entity]:
        """Candidate entities of ``level`` after the UID restrictions (the rest is matched in :meth:`response`)."""
        uids = _uid_keys(keys)
        if level == "IMAGE":
            return [self._image_entity(item) for item in self.catalog.items(uids)]
        rows = self.catalog.series_rows(UidKeys(uids.study, uids.series if level == "SERIES" else None))
        if uids.sop is not None and level != "IMAGE":
            wanted = {item.series_uid for item in self.catalog.items(uids)}
            rows = [row for row in rows if row.series_uid in wanted]
        if level == "SERIES":
            return [_series_entity(row) for row in rows]
        studies = _study_entities(rows)
        if level == "STUDY":
            return studies
        return self._patient_entities(studies)

    def response(self, level: str, keys: Sequence[QueryKey], entity: Entity) -> Dataset | None:
        """The identifier answered for ``entity``, or ``None`` when it does not match every key."""
        out = Dataset()
        header: Dataset | None = None
        header_read = False
        allowed = _ALLOWED_KEYS.get(level)
        for key in keys:
            if key.vr == "SQ":
                out.add_new(key.tag, "SQ", [])
                continue
            if key.keyword in entity.values:
                value = entity.values[key.keyword]
            elif key.keyword == "RetrieveAETitle":
                value = self.ae_title
            elif key.keyword == "InstanceAvailability":
                value = "ONLINE"
            elif allowed is not None and key.keyword not in allowed:
                value = None  # not an attribute of this level: returned empty, not matched
                out.add_new(key.tag, key.vr, None)
                continue
            else:
                if not header_read:
                    header, header_read = self.catalog.header(entity.representative), True
                value = _header_value(header, key.keyword)
            if not matches(key, value):
                return None
            out.add_new(key.tag, _vr(key), _dicom_value(value))
        out.QueryRetrieveLevel = level
        for name, uid in (("StudyInstanceUID", entity.study_uid), ("SeriesInstanceUID", entity.series_uid),
                          ("SOPInstanceUID", entity.sop_uid)):
            if uid and name not in out:
                out.add_new(name, "UI", uid)
        if level == "PATIENT" and "PatientID" not in out:
            out.PatientID = entity.values.get("PatientID") or ""
        if not all(text.isascii() for element in out for text in _as_texts(element.value)):
            out.SpecificCharacterSet = "ISO_IR 192"  # header values were decoded to str; send them as UTF-8
        return out

    def _image_entity(self, item: Item) -> Entity:
        values = {"StudyInstanceUID": item.study_uid, "SeriesInstanceUID": item.series_uid,
                  "SOPInstanceUID": item.sop_uid, "SOPClassUID": item.sop_class_uid}
        for keyword, value in (("Modality", item.modality), ("StudyDate", item.study_date),
                               ("SeriesNumber", item.series_number), ("InstanceNumber", item.instance_number)):
            if value is not None:
                values[keyword] = value
        return Entity("IMAGE", item.study_uid, item.series_uid, item.sop_uid, values, item.path)

    def _patient_entities(self, studies: list[Entity]) -> list[Entity]:
        by_patient: dict[str, Entity] = {}
        for study in studies:
            header = self.catalog.header(study.representative)
            patient_id = str(header.get("PatientID", "")) if header is not None else ""
            patient = by_patient.get(patient_id)
            if patient is None:
                patient = by_patient[patient_id] = Entity("PATIENT", None, values={"PatientID": patient_id},
                                                          representative=study.representative)
                patient.values.update({"NumberOfPatientRelatedStudies": 0, "NumberOfPatientRelatedSeries": 0,
                                       "NumberOfPatientRelatedInstances": 0})
            patient.study_uids.add(study.study_uid or "")
            patient.values["NumberOfPatientRelatedStudies"] += 1
            patient.values["NumberOfPatientRelatedSeries"] += study.values["NumberOfStudyRelatedSeries"]
            patient.values["NumberOfPatientRelatedInstances"] += study.values["NumberOfStudyRelatedInstances"]
        return list(by_patient.values())

    # C-GET / C-MOVE -------------------------------------------------------------------------------------------

    def retrieve_items(self, model: str, identifier: Dataset) -> tuple[str, list[Item]]:
        """The instances a C-GET/C-MOVE identifier names through the unique keys of its level."""
        level = _level(identifier, model)
        keys = query_keys(identifier)
        uids = _uid_keys(keys)
        if level == "PATIENT":
            patient_key = next((k for k in keys if k.keyword == "PatientID"), None)
            if patient_key is None or not patient_key.texts:
                raise QueryError(IDENTIFIER_DOES_NOT_MATCH, "PATIENT level retrieve needs PatientID")
            patients = [p for p in self.find("PATIENT", []) if matches(patient_key, p.values.get("PatientID"))]
            study_uids = tuple(sorted({uid for p in patients for uid in p.study_uids}))
            return level, self.catalog.items(UidKeys(study=study_uids)) if study_uids else []
        needed = {"STUDY": uids.study, "SERIES": uids.series, "IMAGE": uids.sop}[level]
        if not needed:
            raise QueryError(IDENTIFIER_DOES_NOT_MATCH, f"{level} level retrieve needs {_UNIQUE_KEY[level]}")
        # Only unique keys at or above the level restrict a retrieve (PS3.4 C.4.2.2.1).
        restricted = UidKeys(uids.study, uids.series if level in ("SERIES", "IMAGE") else None,
                             uids.sop if level == "IMAGE" else None)
        return level, self.catalog.items(restricted)

    def on_get(self, event: evt.Event) -> Iterator[Any]:
        model = _model(str(event.request.AffectedSOPClassUID))
        calling = _calling_ae(event)
        try:
            level, items = self.retrieve_items(model, event.identifier)
        except QueryError as error:
            log_event(log, "qr.get.refused", logging.WARNING, calling_ae=calling, status=f"0x{error.status:04X}",
                      reason=error.comment)
            yield 1
            yield _status(error.status, error.comment), None
            return
        except Exception as exc:  # noqa: BLE001
            log_event(log, "qr.get.failed", logging.ERROR, calling_ae=calling, error=type(exc).__name__)
            yield 1
            yield _status(UNABLE_TO_PROCESS, "Unable to process: node database unavailable"), None
            return
        log_event(log, "qr.get.start", calling_ae=calling, qr_level=level, instances=len(items),
                  study_uids=_joined({i.study_uid for i in items}))
        yield len(items)
        accepted = _accepted_storage(event.assoc)
        for item in items:
            if event.is_cancelled:
                yield CANCEL, None
                return
            yield PENDING, self._dataset_for(item, accepted)
        log_event(log, "qr.get.done", calling_ae=calling, qr_level=level, instances=len(items))

    def on_move(self, event: evt.Event) -> Iterator[Any]:
        model = _model(str(event.request.AffectedSOPClassUID))
        calling = _calling_ae(event)
        title = str(event.move_destination).strip()
        destination = self.move_destinations.get(title)
        if destination is None:
            log_event(log, "qr.move.unknown_destination", logging.WARNING, calling_ae=calling, destination=title)
            yield None, None  # pynetdicom answers 0xA801 Move Destination unknown
            return
        try:
            level, items = self.retrieve_items(model, event.identifier)
        except QueryError as error:
            log_event(log, "qr.move.refused", logging.WARNING, calling_ae=calling, status=f"0x{error.status:04X}",
                      reason=error.comment)
            yield destination[0], destination[1]
            yield 1
            yield _status(error.status, error.comment), None
            return
        except Exception as exc:  # noqa: BLE001
            log_event(log, "qr.move.failed", logging.ERROR, calling_ae=calling, error=type(exc).__name__)
            yield destination[0], destination[1]
            yield 1
            yield _status(UNABLE_TO_PROCESS, "Unable to process: node database unavailable"), None
            return
        host, port, tls = destination
        # pynetdicom opens the sub-association itself; this handler hands it to us so that files can be fitted to
        # the contexts the destination accepted (decompressed when it took no compressed syntax).
        store_association: list[Any] = []
        kwargs: dict[str, Any] = {"contexts": move_contexts(items),
                                  "evt_handlers": [(evt.EVT_ESTABLISHED, lambda e: store_association.append(e.assoc))]}
        ssl_context = client_ssl_context(tls) if tls is not None else None
        if ssl_context is not None:
            kwargs["tls_args"] = (ssl_context, None)
        log_event(log, "qr.move.start", calling_ae=calling, destination=title, address=f"{host}:{port}",
                  qr_level=level, instances=len(items), study_uids=_joined({i.study_uid for i in items}))
        yield host, port, kwargs
        yield len(items)
        accepted = _accepted_storage(store_association[0]) if store_association else None
        for item in items:
            if event.is_cancelled:
                yield CANCEL, None
                return
            yield PENDING, self._dataset_for(item, accepted)
        log_event(log, "qr.move.done", calling_ae=calling, destination=title, instances=len(items))

    def _dataset_for(self, item: Item, accepted: dict[str, set[str]] | None) -> Dataset:
        """The file of ``item``; decompressed when the peer accepted its SOP class only uncompressed (C-GET)."""
        try:
            dataset = dcmread(str(item.path))
        except Exception as exc:  # noqa: BLE001 - a missing/unreadable file fails only its own sub-operation
            log_event(log, "qr.retrieve.unreadable", logging.ERROR, sop_uid=item.sop_uid, error=type(exc).__name__)
            # pynetdicom counts a sub-operation whose C-STORE cannot even be built as failed and lists the
            # SOP Instance UID in the Failed SOP Instance UID List; a dataset without SOP Class UID is that.
            placeholder = Dataset()
            placeholder.SOPInstanceUID = item.sop_uid
            return placeholder
        if accepted is not None:
            syntax = str(dataset.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian))
            offered = accepted.get(str(dataset.SOPClassUID), set())
            if syntax not in offered and UID(syntax).is_compressed and offered & _UNCOMPRESSED:
                try:
                    dataset.decompress()
                except Exception as exc:  # noqa: BLE001 - then the sub-operation fails on its own
                    log_event(log, "qr.retrieve.decompress_failed", logging.WARNING, sop_uid=item.sop_uid,
                              error=type(exc).__name__)
        return dataset


_UNCOMPRESSED = {str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)}


def move_contexts(items: Sequence[Item]) -> list[PresentationContext]:
    """Requested contexts of a C-MOVE sub-association: per SOP class, one context with the compressed syntaxes its
    files are stored in (if any) and one with the uncompressed little-endian syntaxes."""
    syntaxes: dict[str, list[str]] = {}
    for item in items:
        syntax = item.transfer_syntax_uid
        if syntax is None:
            try:
                syntax = str(read_file_meta_info(str(item.path)).TransferSyntaxUID)
            except Exception:  # noqa: BLE001 - the sub-operation reports the unreadable file
                syntax = ExplicitVRLittleEndian
        entry = syntaxes.setdefault(item.sop_class_uid, [])
        if syntax not in entry:
            entry.append(syntax)
    contexts = []
    for sop_class_uid, own in syntaxes.items():
        # The uncompressed syntaxes go in their own context so that a compressed file still finds an exact match
        # when the receiver accepts both (pynetdicom sends a compressed dataset only on its own syntax).
        compressed = [syntax for syntax in own if UID(syntax).is_compressed]
        if compressed:
            contexts.append(build_context(sop_class_uid, compressed))
        contexts.append(build_context(sop_class_uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
    return contexts[:128]  # PS3.8: at most 128 presentation contexts per association


def add_query_retrieve(ae: AE, settings: Settings, session_factory: sessionmaker[Session],
                       move_destinations: dict[str, MoveDestination] | None = None) -> list[tuple]:
    """Add the Q/R contexts to ``ae`` and return the ``evt`` handlers to pass to ``ae.start_server``.

    Adds: Study Root and Patient Root FIND/GET/MOVE as SCP; the storage classes of :data:`RETRIEVE_SOP_CLASSES`
    with both roles allowed, so that a C-GET requestor may take the Storage SCP role (PS3.7 D.3.3.4) while
    ordinary senders still store to this AE. Call it AFTER the storage SCP added its own storage contexts: pynetdicom's
    ``add_supported_context`` resets the roles of an existing context.

    ``move_destinations`` maps AE titles to ``(host, port)`` or ``(host, port, TlsSettings)``; it is consulted
    after ``settings.dicom.destinations`` (explicit entries win).
    """
    fastpath.quiet_pynetdicom()
    for uid in QR_SOP_CLASSES:
        ae.add_supported_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    for uid in RETRIEVE_SOP_CLASSES:
        ae.add_supported_context(uid, TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
    return QueryRetrieveSCP(settings, session_factory, move_destinations).handlers


# -- helpers ------------------------------------------------------------------------------------------------------


def _model(sop_class_uid: str) -> str:
    return "PATIENT_ROOT" if sop_class_uid in _PATIENT_ROOT else "STUDY_ROOT"


def _level(identifier: Dataset, model: str) -> str:
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level not in LEVELS_BY_MODEL[model]:
        raise QueryError(IDENTIFIER_DOES_NOT_MATCH, f"QueryRetrieveLevel {level or '(none)'} not valid for {model}")
    return level


def _uid_keys(keys: Sequence[QueryKey]) -> UidKeys:
    found: dict[str, tuple[str, ...] | None] = {"StudyInstanceUID": None, "SeriesInstanceUID": None,
                                                 "SOPInstanceUID": None}
    for key in keys:
        if key.keyword in found and key.texts and not all(set(t) <= {"*"} for t in key.texts):
            found[key.keyword] = fnmatch_uid_list(key.texts)
    return UidKeys(found["StudyInstanceUID"], found["SeriesInstanceUID"], found["SOPInstanceUID"])


def _series_entity(row: _SeriesRow) -> Entity:
    values: dict[str, Any] = {"StudyInstanceUID": row.study_uid, "SeriesInstanceUID": row.series_uid,
                              "NumberOfSeriesRelatedInstances": row.instances}
    for keyword, value in (("Modality", row.modality), ("SeriesNumber", row.series_number),
                           ("StudyDate", row.study_date)):
        if value is not None:
            values[keyword] = value
    return Entity("SERIES", row.study_uid, row.series_uid, values=values, representative=row.representative)


def _study_entities(rows: Sequence[_SeriesRow]) -> list[Entity]:
    studies: dict[str, Entity] = {}
    received_representative: dict[str, bool] = {}
    for row in rows:
        study = studies.get(row.study_uid)
        if study is None:
            study = studies[row.study_uid] = Entity(
                "STUDY", row.study_uid, values={"StudyInstanceUID": row.study_uid, "NumberOfStudyRelatedSeries": 0,
                                                "NumberOfStudyRelatedInstances": 0, "ModalitiesInStudy": set(),
                                                "SOPClassesInStudy": set()},
                representative=row.representative)
            received_representative[row.study_uid] = not row.generated
        elif not received_representative[row.study_uid] and not row.generated:
            # Prefer a received file: its header is the source the generated objects copied theirs from.
            study.representative, received_representative[row.study_uid] = row.representative, True
        values = study.values
        values["NumberOfStudyRelatedSeries"] += 1
        values["NumberOfStudyRelatedInstances"] += row.instances
        if row.modality:
            values["ModalitiesInStudy"].add(row.modality)
        values["SOPClassesInStudy"] |= row.sop_classes
        if row.study_date and "StudyDate" not in values:
            values["StudyDate"] = row.study_date
    for study in studies.values():
        study.values["ModalitiesInStudy"] = sorted(study.values["ModalitiesInStudy"])
        study.values["SOPClassesInStudy"] = sorted(study.values["SOPClassesInStudy"])
    return list(studies.values())


def _header_value(header: Dataset | None, keyword: str) -> Any:
    if header is None or keyword not in header:
        return None
    value = header[keyword].value
    if value is None or value == "":
        return None
    return value


def _vr(key: QueryKey) -> str:
    if key.vr not in ("UN", ""):
        return key.vr
    try:
        return dictionary_VR(key.tag)
    except KeyError:
        return "UN"


def _dicom_value(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, list) and len(value) == 1:
        return value[0]
    return value


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]
    return status


def _accepted_storage(assoc: Any) -> dict[str, set[str]]:
    """SOP class -> transfer syntaxes of the contexts on which we may send C-STOREs (the peer is SCP)."""
    accepted: dict[str, set[str]] = defaultdict(set)
    for context in assoc.accepted_contexts:
        if context.as_scu:
            accepted[str(context.abstract_syntax)].add(str(context.transfer_syntax[0]))
    return accepted


def _calling_ae(event: evt.Event) -> str:
    try:
        return str(event.assoc.requestor.ae_title).strip()
    except Exception:  # noqa: BLE001
        return "?"


def _single_uid(keys: Sequence[QueryKey], keyword: str) -> str | None:
    for key in keys:
        if key.keyword == keyword and len(key.texts) == 1:
            return key.texts[0]
    return None


def _joined(uids: set[str]) -> str:
    ordered = sorted(uids)
    return ",".join(ordered[:5]) + (f",+{len(ordered) - 5}" if len(ordered) > 5 else "")
