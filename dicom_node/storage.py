"""The instance store: where received DICOM instances land, durably, before anyone is told "success".

Layout: ``<root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``. UIDs are validated
(:func:`uid_problem`) before they become path components, so a crafted UID can never escape the root.

Durability protocol of :meth:`InstanceStore.store` (the SCP answers success only after it returns):

1. write preamble + file meta + dataset bytes to a temporary file *in the target directory* (same file system,
   so the rename below is atomic); the file may have been created ahead, empty, by :meth:`InstanceStore.prepare_spare`
   while the SCP waited for this instance;
2. ``rename`` it over the final name (atomic: a reader sees the old file or the new one, never half a file),
   then ``fsync`` the file (after the rename, so one journal commit can cover data, inode and directory entry);
3. ``fsync`` the directory so the rename itself survives a power cut on every file system. A directory created
   for the first time also gets its parent fsynced (otherwise the new directory entry could vanish).

Re-sent instances (the same SOP Instance UID again):

* **identical bytes** (same file meta + dataset as stored): nothing is written; outcome ``IDENTICAL``. The caller
  still registers it, so a crash between rename and database commit is repaired by the sender's retry.
* **different dataset**: the documented outcome is *replace, keep the old*: the previous file is first
  hard-linked into ``<superseded_root>/<Study>/<Series>/<SOP>.<UTC timestamp>.dcm`` (fsynced), then the new file
  is renamed over it. Nothing is lost at any point: a crash leaves either the old file in place, or the new file
  in place and the old one in ``superseded``. Outcome ``REPLACED``; the caller registers it with
  ``replaces_existing=True`` (the database bumps the instance revision and moves the completeness timers).

Bytes the SCP refuses (undecodable, invalid UIDs, wrong SOP class) go to :meth:`InstanceStore.quarantine`
(same durability) so an operator can look at them.

Free space is checked by :class:`DiskWatermark` (a cached ``statvfs``), so the SCP can refuse with
0xA700 (Out of Resources) before the disk is full.
"""

from __future__ import annotations

import datetime as dt
import enum
import errno
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

# A UID: components of digits separated by dots, no leading zero unless the component is "0" (PS3.5 9.1).
_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
MAX_UID_LENGTH = 64
_BufferLike = bytes | bytearray | memoryview


def uid_problem(uid: str | None) -> str | None:
    """Return why ``uid`` is not a valid DICOM UID (a short text), or ``None`` when it is valid."""
    if uid is None or uid == "":
        return "missing"
    if len(uid) > MAX_UID_LENGTH:
        return f"longer than {MAX_UID_LENGTH} characters"
    if not _UID_RE.fullmatch(uid):
        return "not digits and dots, or a component with a leading zero"
    return None


class StoreOutcome(str, enum.Enum):
    CREATED = "created"  # first time this SOP Instance UID is stored
    IDENTICAL = "identical"  # the same bytes were already stored: nothing written
    REPLACED = "replaced"  # a different dataset replaced the stored one; the old one is in superseded/


@dataclass(frozen=True)
class StoredInstance:
    relative_path: str  # relative to the store root, '/'-separated
    size_bytes: int
    outcome: StoreOutcome
    superseded_path: Path | None = None
    unsynced_dir: Path | None = None  # set when store(defer_dir_sync=True) left the directory fsync to the caller


MAX_SPARES = 16  # spare temporary files kept open at once (prepare_spare): about the series received at once


class InstanceStore:
    """Durable, UID-addressed file store. Thread-safe; one instance is shared by all associations."""

    def __init__(self, root: Path, quarantine_root: Path, superseded_root: Path, fsync: bool = True) -> None:
        self.root = Path(root)
        self.quarantine_root = Path(quarantine_root)
        self.superseded_root = Path(superseded_root)
        self.fsync = fsync
        for folder in (self.root, self.quarantine_root, self.superseded_root):
            self._ensure_dir(folder)
        self._known_dirs: set[Path] = set()
        self._dirs_lock = threading.Lock()
        # Striped locks: two associations storing the same SOP Instance UID at once must not interleave
        # their compare/replace steps; different instances almost never share a stripe.
        self._stripes = [threading.Lock() for _ in range(64)]
        self._spares: dict[Path, tuple[int, Path]] = {}  # folder -> an open, empty temporary file (prepare_spare)
        self._spares_lock = threading.Lock()

    # -- the main path -------------------------------------------------------------------------------------------

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Final path of an instance. Raises ``ValueError`` for an invalid UID (never build paths from raw UIDs)."""
        for name, uid in (("study", study_uid), ("series", series_uid), ("sop instance", sop_uid)):
            problem = uid_problem(uid)
            if problem:
                raise ValueError(f"invalid {name} UID: {problem}")
        return self.root / study_uid / series_uid / f"{sop_uid}.dcm"

    def store(self, study_uid: str, series_uid: str, sop_uid: str, header: bytes,
              dataset: _BufferLike, defer_dir_sync: bool = False) -> StoredInstance:
        """Store ``header`` (preamble + file meta) followed by ``dataset`` durably; see the module docstring.

        "Identical" compares the *dataset* bytes only: the file meta differs between senders (Source AE Title)
        without the instance being different.

        ``defer_dir_sync``: return right after the rename and leave the directory fsync (step 3) to the caller
        (:meth:`sync_dir` on ``unsynced_dir``), which must finish it before it acknowledges the instance (the SCP
        runs it outside the stripe lock, just before the database commit)."""
        target = self.path_for(study_uid, series_uid, sop_uid)
        size = len(header) + len(dataset)
        relative = f"{study_uid}/{series_uid}/{sop_uid}.dcm"
        with self._stripes[hash(sop_uid) % len(self._stripes)]:
            self._ensure_dir_chain(target.parent)
            existing_size = _size_or_none(target)
            if existing_size is not None and _same_dataset(target, dataset):
                self._fsync_file(target)  # a no-op when durable; completes a store whose fsync failed
                return StoredInstance(relative, existing_size, StoreOutcome.IDENTICAL)
            keep_old = (lambda: self._keep_superseded(target, study_uid, series_uid, sop_uid)) \
                if existing_size is not None else (lambda: None)
            superseded = self._write_in_place(target, [header, dataset], before_rename=keep_old)
            if not defer_dir_sync:
                self._fsync_dir(target.parent)
        outcome = StoreOutcome.CREATED if existing_size is None else StoreOutcome.REPLACED
        return StoredInstance(relative, size, outcome, superseded, target.parent if defer_dir_sync else None)

    def sync_dir(self, folder: Path) -> None:
        """fsync a directory (the deferred step 3 of :meth:`store`)."""
        self._fsync_dir(folder)

    def prepare_spare(self, folder: Path) -> None:
        """Create, now, the temporary file the next store into ``folder`` will write: the SCP calls this right
        after answering a C-STORE, while it waits for the sender's next instance, which takes the creation (a
        third of a millisecond here: an inode and a directory entry) off that instance's critical path. One spare
        per folder, only for folders this store already made, and at most :data:`MAX_SPARES` (the oldest goes:
        the folders of ended series would otherwise each hold an open file until the SCP stops). A spare left by a
        killed process is removed like any stale temporary file."""
        if folder not in self._known_dirs:
            return
        with self._spares_lock:
            if folder in self._spares:
                return
        spare = self._new_temp(folder)
        unused = [spare]
        with self._spares_lock:
            if folder not in self._spares:
                self._spares[folder] = spare
                unused.clear()
                while len(self._spares) > MAX_SPARES:  # a series that has ended keeps no file open for ever
                    unused.append(self._spares.pop(next(iter(self._spares))))
        for temp in unused:
            _discard_temp(temp)

    def close_spares(self) -> None:
        """Remove the unused spare temporary files (when the SCP stops)."""
        with self._spares_lock:
            spares, self._spares = list(self._spares.values()), {}
        for spare in spares:
            _discard_temp(spare)

    def quarantine(self, chunks: Sequence[_BufferLike], reason: str) -> Path:
        """Keep refused bytes durably under ``<quarantine>/<YYYYMMDD>/<reason>-<uuid>.dcm``; return the path."""
        day = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d")
        folder = self.quarantine_root / day
        self._ensure_dir_chain(folder)
        safe_reason = re.sub(r"[^a-z0-9_]", "_", reason.lower())[:32]
        target = folder / f"{safe_reason}-{uuid.uuid4().hex}.dcm"
        self._write_in_place(target, chunks)
        self._fsync_dir(folder)
        return target

    # -- helpers -------------------------------------------------------------------------------------------------

    def _write_in_place(self, target: Path, chunks: Sequence[_BufferLike],
                        before_rename: Callable[[], Path | None] = lambda: None) -> Path | None:
        """Write ``chunks`` to a temporary file beside ``target``, run ``before_rename``, rename the file over
        ``target``, then fsync it; return what ``before_rename`` returned. The directory fsync is the caller's.

        The fsync comes after the rename so that one journal commit can carry data, inode and directory entry
        (no speed difference measured here either way). Readers never see half a file: the rename follows the
        complete write. After a power cut the final name may hold unsynced bytes, but then no success was sent,
        and the sender's retry replaces them (see :meth:`store`), the old bytes kept in superseded/."""
        with self._spares_lock:
            spare = self._spares.pop(target.parent, None)
        fd, tmp = spare if spare is not None else self._new_temp(target.parent)
        try:
            _writev_all(fd, chunks)
            kept = before_rename()
            os.replace(tmp, target)
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        finally:
            os.close(fd)
        return kept

    @staticmethod
    def _new_temp(folder: Path) -> tuple[int, Path]:
        tmp = folder / f".tmp-{uuid.uuid4().hex}"
        return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640), tmp

    def _fsync_file(self, path: Path) -> None:
        if not self.fsync:
            return
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _keep_superseded(self, target: Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        # A hard link, not a move: until the new file is renamed in, the old bytes stay at their usual place too.
        folder = self.superseded_root / study_uid / series_uid
        self._ensure_dir_chain(folder)
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        kept = folder / f"{sop_uid}.{stamp}.dcm"
        os.link(target, kept)
        self._fsync_dir(folder)
        return kept

    def _ensure_dir_chain(self, folder: Path) -> None:
        if folder in self._known_dirs:
            return
        with self._dirs_lock:
            if folder in self._known_dirs:
                return
            self._ensure_dir(folder)
            self._remove_stale_temps(folder)
            self._known_dirs.add(folder)

    @staticmethod
    def _remove_stale_temps(folder: Path) -> None:
        """Delete temporary files a killed process left behind (never acknowledged, so never needed).

        Safe because this process writes temporaries only into folders it already knows, and a store has one
        SCP process."""
        try:
            leftovers = [entry.path for entry in os.scandir(folder) if entry.name.startswith(".tmp-")]
        except FileNotFoundError:
            return
        for path in leftovers:
            _unlink_quietly(Path(path))

    def _ensure_dir(self, folder: Path) -> None:
        """Create ``folder`` (and missing parents); fsync the parent of each directory created here."""
        missing: list[Path] = []
        probe = folder
        while not probe.exists():
            missing.append(probe)
            probe = probe.parent
        for created in reversed(missing):
            try:
                os.mkdir(created)
            except FileExistsError:
                continue
            self._fsync_dir(created.parent)

    def _fsync_dir(self, folder: Path) -> None:
        if not self.fsync:
            return
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _discard_temp(spare: tuple[int, Path]) -> None:
    fd, path = spare
    os.close(fd)
    _unlink_quietly(path)


def _writev_all(fd: int, chunks: Sequence[_BufferLike]) -> None:
    """Write all chunks with as few system calls as possible (one ``writev`` in the normal case)."""
    pending = [memoryview(c).cast("B") for c in chunks if len(c)]
    while pending:
        written = os.writev(fd, pending)
        while written and pending:
            first = pending[0]
            if written >= len(first):
                written -= len(first)
                pending.pop(0)
            else:
                pending[0] = first[written:]
                written = 0


def dataset_offset(prefix: bytes) -> int | None:
    """Where the dataset starts in a Part 10 file whose first >= 144 bytes are ``prefix`` (None if not Part 10)."""
    if len(prefix) < 144 or prefix[128:132] != b"DICM" or prefix[132:138] != b"\x02\x00\x00\x00UL":
        return None
    return 144 + int.from_bytes(prefix[140:144], "little")


def _same_dataset(path: Path, dataset: _BufferLike) -> bool:
    view = memoryview(dataset).cast("B")
    try:
        with open(path, "rb") as handle:
            offset = dataset_offset(handle.read(144))
            if offset is None or os.fstat(handle.fileno()).st_size - offset != len(view):
                return False
            handle.seek(offset)
            step = 1 << 20
            for start in range(0, len(view), step):
                if handle.read(step) != view[start:start + step]:
                    return False
            return True
    except FileNotFoundError:
        return False


def _size_or_none(path: Path) -> int | None:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return None


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def is_out_of_space(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


class DiskWatermark:
    """Is the store's volume too full to accept data? ``statvfs`` at most every ``interval_s`` (it is cheap, but
    not free at hundreds of instances per second); between checks, bytes written are subtracted from the
    last known free space so a burst cannot overshoot the reserve by more than one check interval."""

    def __init__(self, path: Path, min_free_bytes: int, max_used_fraction: float, interval_s: float = 0.5) -> None:
        self.path = Path(path)
        self.min_free_bytes = min_free_bytes
        self.max_used_fraction = max_used_fraction
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._checked_at = 0.0
        self._free = 0
        self._total = 1
        self._written_since = 0

    def note_written(self, nbytes: int) -> None:
        self._written_since += nbytes

    def under_pressure(self) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._checked_at >= self.interval_s:
                stats = os.statvfs(self.path)
                self._free = stats.f_bavail * stats.f_frsize
                self._total = max(1, stats.f_blocks * stats.f_frsize)
                self._written_since = 0
                self._checked_at = now
            free = self._free - self._written_since
        used_fraction = 1.0 - free / self._total
        return free < self.min_free_bytes or used_fraction > self.max_used_fraction

    def snapshot(self) -> dict[str, float | int]:
        """Numbers for a log line (no side effects beyond a possible statvfs)."""
        self.under_pressure()
        return {"free_bytes": self._free - self._written_since, "total_bytes": self._total}
