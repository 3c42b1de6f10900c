"""Speed-ups for receiving C-STORE with pynetdicom 3.0.x, plus the cheap parsing the SCP needs per instance.

Measured on this machine (docs: /work/shared/ENVIRONMENT.md), a plain pynetdicom SCP spends most of its time in
two 1 ms polling sleeps (the DUL reactor's ``_run_loop_delay`` and the association reactor's ``time.sleep(0.001)``),
then in copies (4 KiB ``recv`` calls appended to a ``bytearray``, ``bytes()`` of every PDU, ``getvalue()``) and in
pydicom encoding of the file meta. This module removes those costs for **acceptor associations of our server only**
(requestor associations and other servers in the process keep pynetdicom's own code):

* waits become event-driven: the DUL thread blocks in ``select`` on the peer socket plus a wake-up socketpair
  that is poked whenever the association thread queues a primitive for it; the association thread blocks on a
  ``threading.Event`` set whenever the DUL queues a DIMSE message or an ACSE primitive for it. Both waits have a
  short timeout (:data:`IDLE_WAIT_S`) so timers (ARTIM, network idle) and kill flags are still honoured;
* P-DATA-TF PDUs are read with ``recv_into`` into one buffer and their PDVs are handed on as ``memoryview`` slices
  (no per-4 KiB ``recv``, no ``bytes()`` copy, no per-item decode objects); other PDU types use pynetdicom's code;
* TCP_NODELAY on accepted sockets (our C-STORE responses are small; Nagle would delay them);
* the wait for the A-ASSOCIATE-RQ ends as soon as the peer closes the connection (pynetdicom waits the whole ACSE
  timeout, which also holds up server shutdown after a mere port probe);
* :func:`part10_header` hand-encodes the File Meta Information (pydicom's writer costs ~0.1 ms per instance);
* :func:`scan_dataset` walks the dataset's element headers once, checks the structure is complete (truncated data
  are refused) and returns the few top-level values the node needs, without building a pydicom Dataset.

The patches are installed by :func:`install` (idempotent), only for pynetdicom 3.0.x: another version raises
``RuntimeError`` (the patched methods are copies of 3.0.4's, so they must be re-checked on upgrade).
The functional tests in ``tests/dicom_node`` run with the patches on.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import pynetdicom
from pydicom.uid import UID
from pynetdicom import _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.transport import RequestHandler

from omnict_node.logs import log_event

LOGGER = logging.getLogger("pynetdicom")  # the patched copies log exactly where pynetdicom's originals did
_log = logging.getLogger("omnict.scp")
SUPPORTED_PYNETDICOM = "3.0."
MAX_CONTROL_PDU_BYTES = 4 << 20  # A-ASSOCIATE etc. are a few KiB; refuse absurd length fields
IDLE_WAIT_S = 0.02  # longest a reactor sleeps without an event: bounds timer/kill latency, not throughput

# Our implementation identity in the file meta of every stored file (a UUID-derived UID, PS3.5 B.2).
IMPLEMENTATION_CLASS_UID = "2.25.203472185393409436281796236475013416251"
IMPLEMENTATION_VERSION_NAME = "OMNICT_NODE_01"

_installed = False
_install_lock = threading.Lock()


# ---------------------------------------------------------------------------------------------------------------
# File meta, hand-encoded
# ---------------------------------------------------------------------------------------------------------------

def _short_element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _text(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b" " if len(raw) % 2 else raw


def part10_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str,
                  source_ae_title: str | None = None) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group (explicit VR little endian, PS3.10 7.1).

    Fills (0002,0000) group length, (0002,0001) version 00\\01, (0002,0002) Media Storage SOP Class UID,
    (0002,0003) Media Storage SOP Instance UID, (0002,0010) Transfer Syntax UID (the one negotiated on the
    presentation context, i.e. the encoding of the bytes that follow), (0002,0012) Implementation Class UID,
    (0002,0013) Implementation Version Name and, when known, (0002,0016) Source Application Entity Title.
    """
    body = b"".join((
        struct.pack("<HH2sHL", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01",
        _short_element(0x0002, 0x0002, b"UI", _ui(sop_class_uid)),
        _short_element(0x0002, 0x0003, b"UI", _ui(sop_instance_uid)),
        _short_element(0x0002, 0x0010, b"UI", _ui(transfer_syntax_uid)),
        _short_element(0x0002, 0x0012, b"UI", _ui(IMPLEMENTATION_CLASS_UID)),
        _short_element(0x0002, 0x0013, b"SH", _text(IMPLEMENTATION_VERSION_NAME)),
        _short_element(0x0002, 0x0016, b"AE", _text(source_ae_title.strip())) if source_ae_title else b"",
    ))
    group_length = struct.pack("<HH2sHL", 0x0002, 0x0000, b"UL", 4, len(body))
    return b"\x00" * 128 + b"DICM" + group_length + body


# ---------------------------------------------------------------------------------------------------------------
# C-STORE-RSP, hand-encoded
# ---------------------------------------------------------------------------------------------------------------

def _implicit_element(group: int, elem: int, value: bytes) -> bytes:
    return struct.pack("<HHL", group, elem, len(value)) + value


def c_store_rsp_pdu(context_id: int, message_id: int, sop_class_uid: str, sop_instance_uid: str,
                    status: int) -> bytes:
    """A whole P-DATA-TF PDU carrying a C-STORE-RSP command set without data set (PS3.7 9.3.1.2, E.1-1; PS3.8
    9.3.5): implicit VR little endian (0000,0000) CommandGroupLength, (0000,0002) AffectedSOPClassUID,
    (0000,0100) CommandField 0x8001, (0000,0120) MessageIDBeingRespondedTo, (0000,0800) CommandDataSetType
    0x0101 (no data set), (0000,0900) Status, (0000,1000) AffectedSOPInstanceUID. pydicom's encoder costs
    ~0.3 ms per response here; this ~5 us."""
    body = b"".join((
        _implicit_element(0x0000, 0x0002, _ui(sop_class_uid)),
        _implicit_element(0x0000, 0x0100, struct.pack("<H", 0x8001)),
        _implicit_element(0x0000, 0x0120, struct.pack("<H", message_id)),
        _implicit_element(0x0000, 0x0800, struct.pack("<H", 0x0101)),
        _implicit_element(0x0000, 0x0900, struct.pack("<H", status)),
        _implicit_element(0x0000, 0x1000, _ui(sop_instance_uid)),
    ))
    command = _implicit_element(0x0000, 0x0000, struct.pack("<L", len(body))) + body
    pdv = struct.pack(">LBB", len(command) + 2, context_id, 0x03) + command  # 0x03: command, last fragment
    return struct.pack(">BBL", 0x04, 0x00, len(pdv)) + pdv


def _plain_store_response(primitive: Any) -> bool:
    """A C-STORE response carrying only what :func:`c_store_rsp_pdu` encodes (no Error Comment etc.)."""
    return (isinstance(primitive, C_STORE) and primitive.MessageIDBeingRespondedTo is not None
            and isinstance(primitive.Status, int) and primitive.ErrorComment is None
            and primitive.OffendingElement is None and primitive.AffectedSOPClassUID is not None
            and primitive.AffectedSOPInstanceUID is not None)


# ---------------------------------------------------------------------------------------------------------------
# C-STORE-RQ command set, hand-decoded
# ---------------------------------------------------------------------------------------------------------------

_C_STORE_RQ_ELEMENTS = frozenset({0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000, 0x1030, 0x1031})


@dataclass(frozen=True)
class StoreCommand:
    """The fields of a C-STORE-RQ command set (PS3.7 9.3.1.1, Table 9.3-1)."""

    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    priority: int
    move_originator_ae: str | None
    move_originator_message_id: int | None


def parse_c_store_rq(command: bytes | memoryview) -> StoreCommand | None:
    """Decode an implicit VR little endian command set if it is a plain C-STORE-RQ with a data set; ``None`` for
    anything else (another command, an unexpected element, a malformed encoding): the caller then hands the
    message to pynetdicom, which decodes everything."""
    values: dict[int, bytes] = {}
    pos, end = 0, len(command)
    while pos < end:
        if pos + 8 > end:
            return None
        group, elem, length = _TAG_LEN.unpack_from(command, pos)
        if group != 0x0000 or elem not in _C_STORE_RQ_ELEMENTS or pos + 8 + length > end:
            return None
        values[elem] = bytes(command[pos + 8:pos + 8 + length])
        pos += 8 + length
    try:
        if _us(values[0x0100]) != 0x0001 or _us(values[0x0800]) == 0x0101:
            return None  # not a C-STORE-RQ, or one without a data set
        sop_class_uid, sop_instance_uid = uid_text(values[0x0002]), uid_text(values[0x1000])
        if not sop_class_uid or not sop_instance_uid:
            return None
        priority = _us(values.get(0x0700, b"\x02\x00"))
        move_id = values.get(0x1031)
        move_ae = values.get(0x1030)
        return StoreCommand(
            message_id=_us(values[0x0110]), sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid,
            priority=priority,
            move_originator_ae=move_ae.decode("ascii", "replace").strip() if move_ae else None,
            move_originator_message_id=_us(move_id) if move_id else None)
    except (KeyError, struct.error):
        return None


def _us(raw: bytes) -> int:
    return struct.unpack("<H", raw)[0]


def uid_text(raw: bytes | None) -> str | None:
    """A UI value without its padding (NUL or space); ``None`` when absent or empty."""
    if raw is None:
        return None
    return raw.rstrip(b"\x00 ").lstrip(b" ").decode("ascii", errors="replace") or None


# ---------------------------------------------------------------------------------------------------------------
# Dataset scan: structure check + the few top-level values we need
# ---------------------------------------------------------------------------------------------------------------

class UndecodableDataset(ValueError):
    """The dataset bytes are not a complete, well-formed DICOM dataset in the negotiated transfer syntax."""


_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_MAX_DEPTH = 32
_TAG_LEN = struct.Struct("<HHL")
_EXPLICIT = struct.Struct("<HH2sH")


def scan_dataset(data: bytes | bytearray | memoryview, implicit_vr: bool, deflated: bool,
                 wanted: frozenset[int]) -> dict[int, bytes]:
    """Walk every element header of ``data`` (little endian) and return ``{tag: raw value}`` for the top-level
    tags in ``wanted``. Raises :class:`UndecodableDataset` if an element or item runs past the end, a
    delimiter is missing or misplaced, or a deflated stream does not inflate."""
    if deflated:
        try:
            data = zlib.decompress(data, -15)
        except zlib.error as exc:
            raise UndecodableDataset(f"deflated data does not inflate: {exc}") from None
    buf = memoryview(data).cast("B")
    found: dict[int, bytes] = {}
    end = _walk(buf, 0, len(buf), implicit_vr, wanted, found, 0, False)
    if end != len(buf):  # pragma: no cover - _walk consumes to the end or raises
        raise UndecodableDataset("trailing bytes after the dataset")
    return found


def _walk(buf: memoryview, pos: int, end: int, implicit: bool, wanted: frozenset[int], found: dict[int, bytes],
          depth: int, in_item: bool) -> int:
    if depth > _MAX_DEPTH:
        raise UndecodableDataset("sequences nested too deeply")
    while pos < end:
        if pos + 8 > end:
            raise UndecodableDataset(f"element header truncated at offset {pos}")
        group, elem, length = _TAG_LEN.unpack_from(buf, pos)
        tag = group << 16 | elem
        if group == 0xFFFE:
            if tag == _ITEM_END and in_item:
                return pos + 8
            raise UndecodableDataset(f"unexpected delimiter ({group:04X},{elem:04X}) at offset {pos}")
        vr = b""
        header = 8
        if not implicit:
            _, _, vr, length = _EXPLICIT.unpack_from(buf, pos)
            if vr in _LONG_VRS:
                if pos + 12 > end:
                    raise UndecodableDataset(f"element header truncated at offset {pos}")
                length = struct.unpack_from("<L", buf, pos + 8)[0]
                header = 12
            elif not (vr[:1].isalpha() and vr[1:].isalpha() and vr.isupper()):
                raise UndecodableDataset(f"invalid VR at offset {pos}")
        value_at = pos + header
        if length == _UNDEFINED:
            if tag == _PIXEL_DATA and (implicit or vr in (b"OB", b"OW")):
                pos = _walk_fragments(buf, value_at, end)  # encapsulated (compressed) pixel data
            elif implicit or vr == b"SQ":
                pos = _walk_sequence(buf, value_at, end, implicit, depth + 1)
            elif vr == b"UN":  # undefined-length UN holds implicit VR little endian items (PS3.5 6.2.2)
                pos = _walk_sequence(buf, value_at, end, True, depth + 1)
            else:
                _bad(pos)
        else:
            if value_at + length > end:
                raise UndecodableDataset(
                    f"element ({group:04X},{elem:04X}) needs {length} bytes at offset {value_at}, "
                    f"only {end - value_at} left (truncated)")
            if depth == 0 and tag in wanted:
                found[tag] = bytes(buf[value_at:value_at + length])
            pos = value_at + length
    if in_item:
        raise UndecodableDataset("item delimiter missing (truncated)")
    return pos


def _bad(pos: int) -> int:
    raise UndecodableDataset(f"undefined length not allowed for the element at offset {pos}")


def _walk_sequence(buf: memoryview, pos: int, end: int, implicit: bool, depth: int) -> int:
    while pos + 8 <= end:
        group, elem, length = _TAG_LEN.unpack_from(buf, pos)
        tag = group << 16 | elem
        if tag == _SEQ_END:
            return pos + 8
        if tag != _ITEM:
            raise UndecodableDataset(f"expected a sequence item at offset {pos}")
        if length == _UNDEFINED:
            pos = _walk(buf, pos + 8, end, implicit, frozenset(), {}, depth, True)
        elif pos + 8 + length > end:
            raise UndecodableDataset(f"sequence item at offset {pos} runs past the end (truncated)")
        else:
            pos += 8 + length
    raise UndecodableDataset("sequence delimiter missing (truncated)")


def _walk_fragments(buf: memoryview, pos: int, end: int) -> int:
    while pos + 8 <= end:
        group, elem, length = _TAG_LEN.unpack_from(buf, pos)
        tag = group << 16 | elem
        if tag == _SEQ_END:
            return pos + 8
        if tag != _ITEM or length == _UNDEFINED or pos + 8 + length > end:
            raise UndecodableDataset(f"bad or truncated pixel data fragment at offset {pos}")
        pos += 8 + length
    raise UndecodableDataset("encapsulated pixel data not terminated (truncated)")


# ---------------------------------------------------------------------------------------------------------------
# pynetdicom patches
# ---------------------------------------------------------------------------------------------------------------

class _WakingQueue(queue.Queue):
    """A queue that calls ``wake()`` after every put, so the consumer can block instead of polling."""

    def __init__(self, wake) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class _FastPDataTF:
    """Stands in for ``pdu.P_DATA_TF`` between the socket and DT-2: only ``to_primitive`` is used there."""

    __slots__ = ("items",)

    def __init__(self, items: list[tuple[int, memoryview]]) -> None:
        self.items = items

    @property
    def presentation_data_value_items(self) -> list:  # pragma: no cover - compatibility only
        return self.items

    def to_primitive(self) -> P_DATA:
        primitive = P_DATA()
        # The public setter insists on ``bytes`` PDVs; DIMSE decoding only indexes and slices them, which a
        # memoryview supports, so set the backing attribute directly (no copy).
        primitive._presentation_data_value_list = self.items  # type: ignore[assignment]
        return primitive


def quiet_pynetdicom() -> None:
    """No identifier logging and no per-PDU debug handlers (also what keeps patient data out of our logs)."""
    _config.LOG_HANDLER_LEVEL = "none"
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def install() -> None:
    """Install the speed-ups (idempotent). Raises ``RuntimeError`` on a pynetdicom other than 3.0.x."""
    global _installed
    with _install_lock:
        if _installed:
            return
        if not pynetdicom.__version__.startswith(SUPPORTED_PYNETDICOM):
            raise RuntimeError(
                f"dicom_node.fastpath patches pynetdicom {SUPPORTED_PYNETDICOM}x internals; "
                f"found {pynetdicom.__version__}: re-check the patched copies or run with fast_path=False")
        quiet_pynetdicom()
        original_create = RequestHandler._create_association
        original_dul_reactor = DULServiceProvider.run_reactor
        original_read = DULServiceProvider._read_pdu_data
        original_assoc_reactor = Association._run_reactor

        def _create_association(self: RequestHandler) -> Association:
            assoc = original_create(self)
            if getattr(self.server, "_omnict_fast", False):
                _make_fast(assoc)
            return assoc

        def run_reactor(self: DULServiceProvider) -> None:
            if not hasattr(self, "_omnict_wake_sock"):
                return original_dul_reactor(self)
            try:
                return _dul_reactor(self)
            finally:
                for sock in (self._omnict_wake_sock, self._omnict_poke_sock):
                    sock.close()

        def _read_pdu_data(self: DULServiceProvider) -> None:
            if not hasattr(self, "_omnict_wake_sock") or _has_handlers(self.assoc):
                return original_read(self)
            return _fast_read_pdu(self, original_read)

        def _run_reactor(self: Association) -> None:
            if getattr(self, "_omnict_wake", None) is None or not self.is_acceptor:
                return original_assoc_reactor(self)
            return _assoc_reactor(self)

        original_receive = DULServiceProvider.receive_pdu

        def receive_pdu(self: DULServiceProvider, wait: bool = False, timeout: float | None = None):
            if not (wait and hasattr(self, "_omnict_wake_sock") and self.assoc.requestor.primitive is None):
                return original_receive(self, wait, timeout)
            return _wait_for_association_request(self, original_receive, timeout)

        DULServiceProvider.receive_pdu = receive_pdu  # type: ignore[method-assign]
        RequestHandler._create_association = _create_association  # type: ignore[method-assign]
        DULServiceProvider.run_reactor = run_reactor  # type: ignore[method-assign]
        DULServiceProvider._read_pdu_data = _read_pdu_data  # type: ignore[method-assign]
        Association._run_reactor = _run_reactor  # type: ignore[method-assign]
        _installed = True


def mark_fast(server: Any) -> None:
    """Make the associations of ``server`` (a pynetdicom AssociationServer) use the fast path."""
    install()
    server._omnict_fast = True


def _has_handlers(assoc: Association) -> bool:
    return bool(assoc.get_handlers(evt.EVT_DATA_RECV)) or bool(assoc.get_handlers(evt.EVT_PDU_RECV))


def _make_fast(assoc: Association) -> None:
    dul = assoc.dul
    wake_sock, poke_sock = socket.socketpair()
    wake_sock.setblocking(False)
    poke_sock.setblocking(False)
    dul._omnict_wake_sock = wake_sock  # type: ignore[attr-defined]
    dul._omnict_poke_sock = poke_sock  # type: ignore[attr-defined]

    def poke_dul() -> None:
        try:
            poke_sock.send(b"\0")
        except OSError:  # buffer full (already poked) or closed (DUL gone): nothing to do
            pass

    wake = threading.Event()
    assoc._omnict_wake = wake  # type: ignore[attr-defined]
    dul.to_provider_queue = _WakingQueue(poke_dul)
    dul.to_user_queue = _WakingQueue(wake.set)
    assoc.dimse.msg_queue = _WakingQueue(wake.set)
    raw = assoc.dul.socket.socket if assoc.dul.socket else None
    if raw is not None:
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
    _fast_store_responses(assoc)
    assoc.dimse.receive_primitive = _FastStoreReceiver(assoc)  # type: ignore[method-assign]


def _fast_store_responses(assoc: Association) -> None:
    """Plain C-STORE responses are encoded by hand and written to the socket by the association thread itself.

    pynetdicom would encode them with pydicom, queue them to the DUL thread and encode the PDU there. Writing
    directly is safe for a storage SCP: in state Sta6 a P-DATA-TF changes no DUL state, and nothing else writes
    to the socket while the association thread answers a request (the DUL thread only sends what this thread
    queued, or an A-ABORT after which nothing matters). Everything else (failure statuses with an Error
    Comment, other services, handlers bound to sent-data events) takes pynetdicom's path."""
    dimse = assoc.dimse
    original_send = dimse.send_msg

    def send_msg(primitive: Any, context_id: int) -> None:
        if not _plain_store_response(primitive) or not _send_store_rsp(
                assoc, context_id, primitive.MessageIDBeingRespondedTo, str(primitive.AffectedSOPClassUID),
                str(primitive.AffectedSOPInstanceUID), primitive.Status):
            original_send(primitive, context_id)

    dimse.send_msg = send_msg  # type: ignore[method-assign]


def _send_store_rsp(assoc: Association, context_id: int, message_id: int, sop_class_uid: str,
                    sop_instance_uid: str, status: int) -> bool:
    """Write a plain C-STORE-RSP to the peer; False when pynetdicom must send it (no socket, sent-data handlers)."""
    sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    if sock is None or _has_sent_handlers(assoc):
        return False
    try:
        sock.sendall(c_store_rsp_pdu(context_id, message_id, sop_class_uid, sop_instance_uid, status))
    except OSError:
        assoc.dul.event_queue.put("Evt17")  # transport closed: as pynetdicom's AssociationSocket.send does
        return True
    assoc.dul._idle_timer.restart()
    return True


_AFTER_RESPONSE = "omnict_after_response"


def after_response(assoc: Association, work: Callable[[], None]) -> None:
    """Run ``work`` once this C-STORE's response is sent (fast path), while the association waits for the
    sender's next message: preparation for the next instance that should not delay this one's answer."""
    assoc.__dict__[_AFTER_RESPONSE] = work


def _run_after_response(assoc: Association) -> None:
    work = assoc.__dict__.pop(_AFTER_RESPONSE, None)
    if work is None:
        return
    try:
        work()
    except Exception as exc:  # noqa: BLE001 - only preparation: the next store does the work itself
        log_event(_log, "scp.after_response_failed", logging.WARNING, error=type(exc).__name__)


def _serve_store(assoc: Association, request: C_STORE, context_id: int) -> bool:
    """Serve a C-STORE-RQ assembled by :class:`_FastStoreReceiver`: trigger EVT_C_STORE, answer. False: leave it
    to pynetdicom's ``_serve_request`` (release under way, unknown context, extended negotiation in use).

    What pynetdicom's path adds here is a service-class lookup, a response primitive whose UIDs are validated
    again, and pydicom encoding (~0.2 ms per instance); the handler contract is the same: its int status (or
    status Dataset) is the answer, an exception in it answers 0xC211."""
    context = assoc._accepted_cx.get(context_id)
    if (context is None or assoc._sent_release or assoc.acceptor.accepted_common_extended
            or _config.UNRESTRICTED_STORAGE_SERVICE):
        return False
    assoc.dimse.cancel_req = {}
    assoc._is_paused = True  # as pynetdicom: a handler may call the association's send_* methods
    try:
        status = evt.trigger(assoc, evt.EVT_C_STORE, {"request": request, "context": context.as_tuple})
    except Exception as exc:  # noqa: BLE001 - pynetdicom's contract for a failing handler
        LOGGER.error("Exception in handler bound to 'evt.EVT_C_STORE'")
        LOGGER.exception(exc)
        status = 0xC211
    finally:
        assoc._is_paused = False
    if not assoc.is_established:
        return True
    sop_class_uid, sop_instance_uid = str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID)
    if isinstance(status, int) and 0 <= status <= 0xFFFF and _send_store_rsp(
            assoc, context_id, request.MessageID, sop_class_uid, sop_instance_uid, status):
        _run_after_response(assoc)
        return True
    response = C_STORE()  # a status Dataset (Error Comment...): pynetdicom's validation and encoding
    response.MessageIDBeingRespondedTo = request.MessageID
    response.AffectedSOPClassUID = sop_class_uid
    response.AffectedSOPInstanceUID = sop_instance_uid
    response = StorageServiceClass(assoc).validate_status(status, response)
    assoc.dimse.send_msg(response, context_id)
    _run_after_response(assoc)  # this response's own hook, never a later one's
    return True


class _FastStoreReceiver:
    """Stands in for ``DIMSEServiceProvider.receive_primitive``: C-STORE-RQ messages are assembled here (command
    set hand-decoded, data set fragments joined once) and queued for the association thread as pynetdicom's own
    ``C_STORE`` primitive. Any other message, or one whose command set is not a plain C-STORE-RQ complete in its
    first fragment, is handed to pynetdicom's method from its first fragment on, until pynetdicom has queued it.

    pynetdicom decodes every command set with pydicom and converts it element by element, with UID validation on
    each attribute set (~0.2 ms per instance here). Runs on the DUL thread, like the method it replaces."""

    def __init__(self, assoc: Association) -> None:
        self.assoc = assoc
        self.dimse = assoc.dimse
        self.original = assoc.dimse.receive_primitive
        self.passthrough = False  # the current message belongs to pynetdicom
        self.command: StoreCommand | None = None
        self.context_id = 0
        self.fragments: list[memoryview] = []

    def __call__(self, primitive: P_DATA) -> None:
        if self.passthrough or self.assoc.get_handlers(evt.EVT_DIMSE_RECV):
            self._hand_over(primitive)
            return
        items = primitive.presentation_data_value_list
        for index, (context_id, data) in enumerate(items):
            header = data[0]
            if self.command is None:
                command = parse_c_store_rq(data[1:]) if header & 0x03 == 0x03 else None
                if command is None:  # not ours: pynetdicom takes this message from its first fragment
                    rest = P_DATA()
                    rest._presentation_data_value_list = items[index:]  # type: ignore[assignment]
                    self._hand_over(rest)
                    return
                self.command, self.context_id = command, context_id
            elif header & 0x01:  # a command fragment inside a data set: not a valid DIMSE message
                LOGGER.error("Received an invalid DIMSE message")
                self._reset()
                self.dimse.dul.event_queue.put("Evt19")
                return
            else:
                self.fragments.append(data[1:])
                if header & 0x02:
                    self._deliver()

    def _hand_over(self, primitive: P_DATA) -> None:
        self.passthrough = True
        self.original(primitive)
        if self.dimse.message is None:  # pynetdicom queued the message (or is waiting for no more fragments)
            self.passthrough = False

    def _deliver(self) -> None:
        command = self.command
        assert command is not None
        request = C_STORE()
        request.MessageID = command.message_id
        # The UIDs go in unvalidated (pynetdicom's setters validate each one with a regex): the SCP validates
        # the data set's own UIDs before storing and answers the command's Affected SOP Instance UID mismatch.
        request._affected_sop_class_uid = UID(command.sop_class_uid)
        request._affected_sop_instance_uid = UID(command.sop_instance_uid)
        request.Priority = command.priority
        if command.move_originator_ae:
            request.MoveOriginatorApplicationEntityTitle = command.move_originator_ae
        if command.move_originator_message_id is not None:
            request.MoveOriginatorMessageID = command.move_originator_message_id
        request.DataSet = BytesIO(b"".join(self.fragments))
        request._context_id = self.context_id
        request._dataset_path = None
        request._dataset_file = None
        request._omnict_fast = True  # type: ignore[attr-defined]  # see _serve_store
        context_id = self.context_id
        self._reset()
        self.dimse.msg_queue.put((context_id, request))

    def _reset(self) -> None:
        self.command, self.fragments = None, []


def _has_sent_handlers(assoc: Association) -> bool:
    return any(assoc.get_handlers(event) for event in (evt.EVT_DIMSE_SENT, evt.EVT_PDU_SENT, evt.EVT_DATA_SENT))


def _wait_for_association_request(dul: DULServiceProvider, original_receive, timeout: float | None):
    """The acceptor's wait for the A-ASSOCIATE-RQ, in short slices, giving up as soon as the connection is gone.

    pynetdicom waits the whole ACSE timeout even when the peer has already closed the connection (a port probe,
    a health check): that thread then holds up server shutdown (``server_close`` joins it) for up to 30 s."""
    deadline = None if timeout is None else time.monotonic() + timeout
    seen_connected = False
    while True:
        primitive = original_receive(dul, True, 0.05)
        if primitive is not None:
            return primitive
        state = dul.state_machine.current_state
        if state != "Sta1":
            seen_connected = True
        elif seen_connected or dul._kill_thread:
            return None  # connected, then closed (or killed) before any A-ASSOCIATE-RQ
        if deadline is not None and time.monotonic() >= deadline:
            return None


def _dul_wait(dul: DULServiceProvider) -> None:
    """Block until the peer socket is readable, the association thread queued a primitive, or IDLE_WAIT_S."""
    wake_sock = dul._omnict_wake_sock  # type: ignore[attr-defined]
    sock = dul.socket.socket if dul.socket is not None else None
    readers = [wake_sock]
    if sock is not None:
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # decrypted bytes already buffered: select would not see them
        readers.append(sock)
    try:
        ready, _, _ = select.select(readers, [], [], IDLE_WAIT_S)
    except (OSError, ValueError):  # socket closed under us: the loop's own checks handle it
        time.sleep(0.001)
        return
    if wake_sock in ready:
        try:
            while wake_sock.recv(4096):
                pass
        except OSError:
            pass


def _dul_reactor(self: DULServiceProvider) -> None:
    """Copy of pynetdicom 3.0.4 ``DULServiceProvider.run_reactor`` with ``time.sleep`` replaced by ``_dul_wait``."""
    self._idle_timer.start()
    sleep = False
    while True:
        if not self.assoc._dul_ready.is_set():
            self.assoc._dul_ready.set()
            sleep = True
        if sleep:
            _dul_wait(self)
        if self._kill_thread:
            break
        if self.artim_timer.expired:
            self.event_queue.put("Evt18")
        try:
            if self._process_recv_primitive():
                pass
            elif self._is_transport_event():
                self._idle_timer.restart()
        except Exception as exc:
            LOGGER.error("Exception in DUL.run(), aborting association")
            LOGGER.exception(exc)
            abort_pdu = A_ABORT_RQ()
            abort_pdu.source = 0x02
            abort_pdu.reason_diagnostic = 0x00
            self.socket.send(abort_pdu.encode())  # type: ignore[union-attr]
            self.assoc.is_aborted = True
            self.assoc.is_established = False
            self.assoc._kill = True
            self._kill_thread = True
            return
        try:
            event = self.event_queue.get(block=False)
        except queue.Empty:
            sleep = True
            continue
        self.state_machine.do_action(event)
        sleep = False


def _recv_exact(sock: socket.socket, view: memoryview) -> bool:
    """Fill ``view`` from ``sock``; False if the peer closed first."""
    got = 0
    total = len(view)
    while got < total:
        n = sock.recv_into(view[got:], total - got)
        if n == 0:
            return False
        got += n
    return True


def _fast_read_pdu(self: DULServiceProvider, original_read) -> None:
    """``_read_pdu_data`` for P-DATA-TF with one ``recv_into`` buffer and memoryview PDVs (PS3.8 9.3.5)."""
    sock = self.socket.socket  # type: ignore[union-attr]
    header = bytearray(6)
    try:
        complete = _recv_exact(sock, memoryview(header))
    except (OSError, TimeoutError) as exc:
        LOGGER.error("Connection closed before the entire PDU was received")
        LOGGER.exception(exc)
        self.event_queue.put("Evt17")
        return
    if not complete:
        self.event_queue.put("Evt17")
        return
    pdu_type, _, length = struct.unpack(">BBL", header)
    if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
        LOGGER.error(f"Unknown PDU type received '0x{pdu_type:02X}'")
        self.event_queue.put("Evt19")
        return
    # The body buffer is allocated up front, so a length field must be plausible before we trust it: a P-DATA-TF
    # may not exceed the maximum we announced (PS3.8 D.1), other PDUs are small.
    limit = self.assoc.acceptor.maximum_length if pdu_type == 0x04 else MAX_CONTROL_PDU_BYTES
    if limit and length > limit:
        LOGGER.error(f"PDU of type 0x{pdu_type:02X} announces {length} bytes, more than the {limit} allowed")
        self.event_queue.put("Evt19")
        return
    body = bytearray(length)
    try:
        complete = _recv_exact(sock, memoryview(body))
    except (OSError, TimeoutError) as exc:
        LOGGER.error("Connection closed before the entire PDU was received")
        LOGGER.exception(exc)
        self.event_queue.put("Evt17")
        return
    if not complete:
        LOGGER.error("The received PDU is shorter than expected")
        self.event_queue.put("Evt17")
        return
    if pdu_type != 0x04:
        try:
            pdu, event = self._decode_pdu(header + body)
        except Exception as exc:
            LOGGER.error("Unable to decode the received PDU data")
            LOGGER.exception(exc)
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)
        return
    items = _split_pdvs(body)
    if items is None:
        LOGGER.error("Unable to decode the received PDU data")
        self.event_queue.put("Evt19")
        return
    self.event_queue.put("Evt10")
    self._recv_pdu.put(_FastPDataTF(items))  # type: ignore[arg-type]


def _split_pdvs(body: bytearray) -> list[tuple[int, memoryview]] | None:
    """PDV items of a P-DATA-TF body: 4-byte length, 1-byte context ID, then message control header + fragment."""
    view = memoryview(body)
    items: list[tuple[int, memoryview]] = []
    pos = 0
    end = len(body)
    while pos < end:
        if pos + 6 > end:
            return None
        item_length = struct.unpack_from(">L", body, pos)[0]
        if item_length < 2 or pos + 4 + item_length > end:
            return None
        items.append((body[pos + 4], view[pos + 5:pos + 4 + item_length]))
        pos += 4 + item_length
    return items or None


def _assoc_reactor(self: Association) -> None:
    """Copy of pynetdicom 3.0.4 ``Association._run_reactor`` (acceptor) with the 1 ms sleep replaced by an event
    wait that is skipped while messages keep coming."""
    wake: threading.Event = self._omnict_wake  # type: ignore[attr-defined]
    self._is_paused = False
    busy = False
    while not self._kill:
        self._is_paused = True
        if not busy:
            wake.wait(IDLE_WAIT_S)
        wake.clear()
        self._reactor_checkpoint.wait()
        self._is_paused = False

        context_id, msg = self.dimse.get_msg(block=False)
        busy = msg is not None
        if msg and not (getattr(msg, "_omnict_fast", False) and _serve_store(self, msg, context_id)):
            self._serve_request(msg, context_id)  # type: ignore[arg-type]

        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            LOGGER.info("Association Released")
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return

        if self.acse.is_aborted():
            log_msg = "Association Aborted"
            if self.acse.is_aborted("a-p-abort"):
                log_msg += " (A-P-ABORT)"
            LOGGER.info(log_msg)
            self.dul.receive_pdu(wait=False)
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return

        if not self.dul.is_alive():
            self.kill()
            return

        if self.dul.idle_timer_expired():
            LOGGER.error("Network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
            return
