"""A DICOMweb subset (PS3.18) over the objects the node generated (SR, SEG, KOS): QIDO-RS search and WADO-RS
retrieve (instances, series, studies; and their metadata).

Only generated objects are served here, not the received CT: the PACS that sent the study already has those.
Attributes come from the ``result_objects`` and ``studies`` tables (UIDs, SOP class, modality derived from the SOP
class, study date, counts); the node keeps no patient attributes in its database, so patient-level matching keys
are refused with 400 rather than silently ignored. Files are returned as stored (no transcoding: the
``transfer-syntax`` Accept parameter may be ``*`` or absent).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pydicom
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.auth import require_read
from api.queries import NotFound, safe_path
from db.models import ResultObject, Study

DICOM_JSON = "application/dicom+json"

# Modality (0008,0060) of the SOP classes the node generates (PS3.4 B.5 / PS3.3 A.35, A.51).
SOP_CLASS_MODALITY: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.88.11": "SR",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22": "SR",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33": "SR",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34": "SR",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.88.35": "SR",  # Extensible SR
    "1.2.840.10008.5.1.4.1.1.88.59": "KO",  # Key Object Selection Document
    "1.2.840.10008.5.1.4.1.1.66.4": "SEG",  # Segmentation Storage
}

# Matching keys we can answer, by keyword and by tag (PS3.18 10.6.1.2 allows either form).
TAGS = {
    "StudyInstanceUID": "0020000D",
    "SeriesInstanceUID": "0020000E",
    "SOPInstanceUID": "00080018",
    "SOPClassUID": "00080016",
    "Modality": "00080060",
    "ModalitiesInStudy": "00080061",
    "StudyDate": "00080020",
}
KEYWORD_BY_TAG = {tag: keyword for keyword, tag in TAGS.items()}
CONTROL_PARAMS = {"limit", "offset", "includefield", "fuzzymatching"}
LEVEL_KEYS = {
    "study": {"StudyInstanceUID", "ModalitiesInStudy", "Modality", "StudyDate", "SOPClassUID"},
    "series": {"StudyInstanceUID", "SeriesInstanceUID", "Modality", "SOPClassUID", "StudyDate"},
    "instance": {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality", "StudyDate"},
}
MAX_LIMIT = 1000

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])


def modality_of(sop_class_uid: str) -> str:
    return SOP_CLASS_MODALITY.get(sop_class_uid, "OT")


# ---------------------------------------------------------------------------------------------------------------
# QIDO-RS
# ---------------------------------------------------------------------------------------------------------------
class QidoQuery:
    """Matching keys and paging of one QIDO-RS request, validated."""

    def __init__(self, params: Sequence[tuple[str, str]], level: str) -> None:
        self.filters: dict[str, str] = {}
        self.limit, self.offset = MAX_LIMIT, 0
        for name, value in params:
            if name in CONTROL_PARAMS:
                if name == "limit":
                    self.limit = _int_param(name, value, 1, MAX_LIMIT)
                elif name == "offset":
                    self.offset = _int_param(name, value, 0, 10**9)
                continue
            keyword = KEYWORD_BY_TAG.get(name.upper(), name)
            if keyword not in LEVEL_KEYS[level]:
                raise HTTPException(400, f"unsupported matching key {name!r} at {level} level; "
                                         f"supported: {sorted(LEVEL_KEYS[level])}")
            self.filters[keyword] = value

    def apply(self, statement):
        """Add the SQL conditions of the filters to a SELECT over result_objects (joined to studies)."""
        for keyword, value in self.filters.items():
            if keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
                column = {"StudyInstanceUID": ResultObject.study_instance_uid,
                          "SeriesInstanceUID": ResultObject.series_instance_uid,
                          "SOPInstanceUID": ResultObject.sop_instance_uid,
                          "SOPClassUID": ResultObject.sop_class_uid}[keyword]
                # UID list matching (PS3.4 C.2.2.2.2): a backslash- or comma-separated list.
                statement = statement.where(column.in_(_uid_list(value)))
            elif keyword in ("Modality", "ModalitiesInStudy"):
                wanted = {m.strip().upper() for m in re.split(r"[\\,]", value) if m.strip()}
                classes = [uid for uid, modality in SOP_CLASS_MODALITY.items() if modality in wanted]
                statement = statement.where(ResultObject.sop_class_uid.in_(classes))
            elif keyword == "StudyDate":
                low, high = _date_range(value)
                if low:
                    statement = statement.where(Study.study_date >= low)
                if high:
                    statement = statement.where(Study.study_date <= high)
        return statement


def _int_param(name: str, value: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise HTTPException(400, f"{name} must be an integer, got {value!r}") from None
    if not low <= number <= high:
        raise HTTPException(400, f"{name} must be within {low}..{high}")
    return number


def _uid_list(value: str) -> list[str]:
    uids = [u.strip() for u in re.split(r"[\\,]", value) if u.strip()]
    if not uids or any(not re.fullmatch(r"[0-9.]{1,64}", u) for u in uids):
        raise HTTPException(400, f"not a UID list: {value!r}")
    return uids


def _date_range(value: str) -> tuple[str | None, str | None]:
    """DA matching (PS3.4 C.2.2.2.5): YYYYMMDD, YYYYMMDD-YYYYMMDD, -YYYYMMDD, YYYYMMDD-."""
    match = re.fullmatch(r"(\d{8})?(-)?(\d{8})?", value.replace("/", "").strip())
    if not value.strip() or match is None or (match.group(2) is None and match.group(3)):
        raise HTTPException(400, f"not a DICOM date or date range: {value!r}")
    low, dash, high = match.groups()
    return (low, high) if dash else (low, low)


def _element(vr: str, *values: Any) -> dict[str, Any]:
    return {"vr": vr, "Value": list(values)} if values and values[0] is not None else {"vr": vr}


def _qido_response(request: Request, body: list[dict[str, Any]]) -> JSONResponse:
    accept = request.headers.get("accept", "*/*")
    if not any(t in accept for t in (DICOM_JSON, "application/json", "*/*", "application/*")):
        raise HTTPException(406, f"QIDO-RS answers {DICOM_JSON}")
    return JSONResponse(body, media_type=DICOM_JSON)


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/") + "/dicomweb"


@router.get("/studies", summary="QIDO-RS: search for studies with generated objects")
def search_studies(request: Request, _=Depends(require_read)) -> JSONResponse:
    query = QidoQuery(list(request.query_params.multi_items()), "study")
    with request.app.state.session_factory() as session:
        rows = _grouped_rows(session, query)
    studies: dict[str, dict[str, Any]] = {}
    for study_uid, series_uid, sop_class, count, study_date in rows:
        entry = studies.setdefault(study_uid, {"date": study_date, "series": set(), "count": 0, "modalities": set()})
        entry["series"].add(series_uid)
        entry["count"] += count
        entry["modalities"].add(modality_of(sop_class))
    page = list(studies.items())[query.offset:query.offset + query.limit]
    base = _base_url(request)
    return _qido_response(request, [{
        "0020000D": _element("UI", uid),
        "00080020": _element("DA", v["date"]),
        "00080061": _element("CS", *sorted(v["modalities"])),
        "00201206": _element("IS", len(v["series"])),
        "00201208": _element("IS", v["count"]),
        "00081190": _element("UR", f"{base}/studies/{uid}"),
    } for uid, v in page])


@router.get("/studies/{study_uid}/series", summary="QIDO-RS: search for series of a study")
def search_series(study_uid: str, request: Request, _=Depends(require_read)) -> JSONResponse:
    query = QidoQuery(list(request.query_params.multi_items()), "series")
    query.filters["StudyInstanceUID"] = study_uid
    with request.app.state.session_factory() as session:
        rows = _grouped_rows(session, query)
    series: dict[str, dict[str, Any]] = {}
    for s_uid, se_uid, sop_class, count, _study_date in rows:
        entry = series.setdefault(se_uid, {"study": s_uid, "count": 0, "modality": modality_of(sop_class)})
        entry["count"] += count
    page = list(series.items())[query.offset:query.offset + query.limit]
    base = _base_url(request)
    return _qido_response(request, [{
        "0020000D": _element("UI", v["study"]),
        "0020000E": _element("UI", uid),
        "00080060": _element("CS", v["modality"]),
        "00201209": _element("IS", v["count"]),
        "00081190": _element("UR", f"{base}/studies/{v['study']}/series/{uid}"),
    } for uid, v in page])


@router.get("/studies/{study_uid}/series/{series_uid}/instances", summary="QIDO-RS: search for instances of a series")
def search_instances(study_uid: str, series_uid: str, request: Request, _=Depends(require_read)) -> JSONResponse:
    query = QidoQuery(list(request.query_params.multi_items()), "instance")
    query.filters["StudyInstanceUID"] = study_uid
    query.filters["SeriesInstanceUID"] = series_uid
    statement = (select(ResultObject).join(Study, Study.study_instance_uid == ResultObject.study_instance_uid,
                                           isouter=True)
                 .order_by(ResultObject.id).limit(query.limit).offset(query.offset))
    with request.app.state.session_factory() as session:
        objects = session.scalars(query.apply(statement)).all()
    base = _base_url(request)
    return _qido_response(request, [{
        "00080016": _element("UI", o.sop_class_uid),
        "00080018": _element("UI", o.sop_instance_uid),
        "00080060": _element("CS", modality_of(o.sop_class_uid)),
        "0020000D": _element("UI", o.study_instance_uid),
        "0020000E": _element("UI", o.series_instance_uid),
        "00081190": _element("UR", f"{base}/studies/{o.study_instance_uid}/series/{o.series_instance_uid}"
                                   f"/instances/{o.sop_instance_uid}"),
    } for o in objects])


def _grouped_rows(session: Session, query: QidoQuery):
    """(study uid, series uid, SOP class, count, study date) per group of matching result objects."""
    statement = (
        select(ResultObject.study_instance_uid, ResultObject.series_instance_uid, ResultObject.sop_class_uid,
               func.count(ResultObject.id), Study.study_date)
        .join(Study, Study.study_instance_uid == ResultObject.study_instance_uid, isouter=True)
        .group_by(ResultObject.study_instance_uid, ResultObject.series_instance_uid, ResultObject.sop_class_uid,
                  Study.study_date)
        .order_by(ResultObject.study_instance_uid, ResultObject.series_instance_uid)
    )
    return session.execute(query.apply(statement)).all()


# ---------------------------------------------------------------------------------------------------------------
# WADO-RS
# ---------------------------------------------------------------------------------------------------------------
def _check_wado_accept(request: Request) -> None:
    """Accept multipart/related; type="application/dicom" (or anything that admits it); no transcoding."""
    accept = request.headers.get("accept")
    if not accept:
        return
    for media_range in accept.split(","):
        parts = [p.strip() for p in media_range.split(";")]
        media = parts[0].lower()
        params = {k.strip().lower(): v.strip().strip('"') for k, _, v in (p.partition("=") for p in parts[1:])}
        if media in ("*/*", "multipart/*") or (media == "multipart/related" and
                                                params.get("type", "application/dicom") == "application/dicom"):
            if params.get("transfer-syntax", "*") == "*":
                return
    raise HTTPException(406, 'WADO-RS here answers multipart/related; type="application/dicom" in the stored '
                             "transfer syntax (transfer-syntax=* or none)")


def _objects(session: Session, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None) -> list[ResultObject]:
    statement = select(ResultObject).where(ResultObject.study_instance_uid == study_uid).order_by(ResultObject.id)
    if series_uid is not None:
        statement = statement.where(ResultObject.series_instance_uid == series_uid)
    if sop_uid is not None:
        statement = statement.where(ResultObject.sop_instance_uid == sop_uid)
    return list(session.scalars(statement))


def _files(request: Request, study_uid: str, series_uid: str | None, sop_uid: str | None) -> list[Path]:
    with request.app.state.session_factory() as session:
        objects = _objects(session, study_uid, series_uid, sop_uid)
    if not objects:
        raise HTTPException(404, "no generated objects match")
    data_dir = Path(request.app.state.settings.data_dir)
    try:
        return [safe_path(data_dir, o.path) for o in objects]
    except NotFound as exc:
        raise HTTPException(404, str(exc)) from exc


def multipart_dicom(paths: Sequence[Path], boundary: str, chunk: int = 1 << 16) -> Iterator[bytes]:
    """The multipart/related body (RFC 2387) of the files, streamed."""
    for path in paths:
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\nContent-Length: {path.stat().st_size}\r\n\r\n".encode()
        with open(path, "rb") as handle:
            while block := handle.read(chunk):
                yield block
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def _multipart_response(request: Request, study_uid: str, series_uid: str | None = None,
                        sop_uid: str | None = None) -> StreamingResponse:
    _check_wado_accept(request)
    paths = _files(request, study_uid, series_uid, sop_uid)
    boundary = secrets.token_hex(16)
    return StreamingResponse(multipart_dicom(paths, boundary),
                             media_type=f'multipart/related; type="application/dicom"; boundary={boundary}')


@router.get("/studies/{study_uid}", summary="WADO-RS: retrieve every generated object of a study",
            response_class=StreamingResponse)
def retrieve_study(study_uid: str, request: Request, _=Depends(require_read)):
    return _multipart_response(request, study_uid)


@router.get("/studies/{study_uid}/series/{series_uid}", summary="WADO-RS: retrieve a series",
            response_class=StreamingResponse)
def retrieve_series(study_uid: str, series_uid: str, request: Request, _=Depends(require_read)):
    return _multipart_response(request, study_uid, series_uid)


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}", summary="WADO-RS: retrieve an instance",
            response_class=StreamingResponse)
def retrieve_instance(study_uid: str, series_uid: str, sop_uid: str, request: Request, _=Depends(require_read)):
    return _multipart_response(request, study_uid, series_uid, sop_uid)


def _metadata(request: Request, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None) -> JSONResponse:
    paths = _files(request, study_uid, series_uid, sop_uid)
    body = []
    for path in paths:
        dataset = pydicom.dcmread(path)
        # Large binary values (pixel data, segment frames) are left out of metadata; retrieve the instance for them.
        body.append(dataset.to_json_dict(bulk_data_threshold=4096, bulk_data_element_handler=lambda _e: None))
    for item in body:
        for tag in [t for t, v in item.items() if "BulkDataURI" in v and v["BulkDataURI"] is None]:
            item[tag] = {"vr": item[tag]["vr"]}
    return JSONResponse(body, media_type=DICOM_JSON)


@router.get("/studies/{study_uid}/metadata", summary="WADO-RS: metadata of a study's generated objects")
def study_metadata(study_uid: str, request: Request, _=Depends(require_read)) -> JSONResponse:
    return _metadata(request, study_uid)


@router.get("/studies/{study_uid}/series/{series_uid}/metadata", summary="WADO-RS: metadata of a series")
def series_metadata(study_uid: str, series_uid: str, request: Request, _=Depends(require_read)) -> JSONResponse:
    return _metadata(request, study_uid, series_uid)


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/metadata",
            summary="WADO-RS: metadata of an instance")
def instance_metadata(study_uid: str, series_uid: str, sop_uid: str, request: Request,
                      _=Depends(require_read)) -> JSONResponse:
    return _metadata(request, study_uid, series_uid, sop_uid)
