"""A write-ahead journal of agent events: append-only, segmented, checksummed, recoverable.

Every event is appended to the journal *before* a recorder applies it
(`JournaledRecorder`), so a process that dies mid-run loses no acknowledged
event: `recover` replays the journal into a fresh recorder and saves every session
into a store.

Layout of a journal directory::

    0000000000.wal, 0000000001.wal, ...   segments, numbered in creation order
    checkpoint.json                        what a live writer already saved (optional)
    orphans.jsonl                          events no loop claimed (phi-core JSON lines)
    journal.lock                           held (flock) by the one live writer

A segment starts with the 8 bytes ``PHIJRNL2`` and holds frames; a frame carries
one or more consecutive records (group commit: whatever was appended since the
previous write)::

    4 bytes  marker FF 50 4A 46 (never in UTF-8 text: a reader resynchronises on it)
    u32 LE   data length
    u32 LE   CRC-32 of the next 12 + length bytes
    u64 LE   sequence number of the first record (0, 1, 2, ... across segments and runs)
    u32 LE   record count n
    data     n = 1: the record as is; n > 1: the records joined by ``\n``

A record is one event as a phi-core JSON line (`codec.encode_event`, or the line given
to `Journal.append_json`); a record containing a newline always gets a frame of its own.

A writer never appends to a segment it did not create: a new `Journal` on an existing
directory starts a new segment after the ones left by an earlier run (the *leftovers*),
whose last frame may be torn.

Durability policies (what an *acknowledged* event survives):

* ``"always"``: `Journal.append` returns after the record is fsynced (threads
  appending at once share an fsync). Acknowledged = appended. Survives a process
  kill and an OS crash or power loss (if the disk honours fsync).
* ``"interval"``: records wait in the process; a flusher thread writes and fsyncs
  them every ``interval_ms`` (sooner once 4 MiB wait), then acknowledges them
  (`acknowledged_seq`, `wait_acknowledged`). Acknowledged events survive a process
  kill and a power loss; events appended in the last ``interval_ms`` or so (not yet
  acknowledged) may be lost by either.
* ``"os"``: every record is handed to the OS (``write``) before `append` returns;
  fsync only when a segment is full and on `close`. Acknowledged = appended. Survives
  a process kill, not an OS crash or power loss (the kernel writes dirty pages back
  within ~30 s).

When a segment is deleted (never before every event in it is safe elsewhere):

* `recover`, after it saved every session rebuilt from the segments it replayed (and
  wrote their orphans): all of those segments, i.e. every segment of a directory no
  writer holds, or the leftovers of an open `Journal` (never its own segments);
* `Journal.release(stored_below, ...)`: a segment other than the active one whose
  records are all numbered below `stored_below`. `AutoPersistingRecorder` passes the
  first record number of the oldest session not yet saved (held in memory, queued or
  refused by the store); the promise is recorded in ``checkpoint.json`` so that
  `recover` skips what was saved;
* `Journal.close`: the segments `release` covered, and an active one holding nothing.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import sys
import threading
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal, TypeAlias, get_args

from . import codec
from .errors import DecodeError, InvalidSessionId, JournalLocked, PhiSessionError, StoreError
from .events import AgentEvent, AgentStart
from .model import Session
from .recorder import SessionRecorder, SessionRecorderConfig
from .stores.base import SessionStore

if sys.platform != "win32":
    import fcntl

__all__ = [
    "Durability",
    "Journal",
    "JournalLocked",
    "JournalRecord",
    "JournaledRecorder",
    "RecoveryError",
    "RecoveryReport",
    "read_records",
    "recover",
]

logger = logging.getLogger("phi_session.journal")

Durability = Literal["always", "interval", "os"]
StrPath: TypeAlias = "str | os.PathLike[str]"

MAGIC = b"PHIJRNL2"
SEGMENT_SUFFIX = ".wal"
CHECKPOINT_FILE = "checkpoint.json"
ORPHANS_FILE = "orphans.jsonl"
LOCK_FILE = "journal.lock"
FRAME_MARKER = b"\xffPJF"
_HEADER = struct.Struct("<4sIIQI")  # marker, data length, CRC-32, first sequence number, count
_TAIL = struct.Struct("<QI")  # the header fields the CRC covers (with the data)
_CRC_FROM = 12  # offset of the first byte the CRC covers
_MAX_FRAME = 2**32 - 1
# Records waiting for the flusher: beyond the first bound it is woken early, beyond the
# second the appender writes them itself (in `commit`), so memory stays bounded.
_WAKE_PENDING_BYTES = 4 << 20
_MAX_PENDING_BYTES = 16 << 20


class RecoveryError(StoreError):
    """Some recovered sessions could not be saved; the journal was kept. See `report`."""

    def __init__(self, message: str, report: RecoveryReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class JournalRecord:
    """One record (event) read back from a segment."""

    seq: int
    payload: bytes
    segment: Path


@dataclass
class RecoveryReport:
    """What `recover` found and did."""

    segments_read: int = 0
    events_replayed: int = 0
    events_already_stored: int = 0
    """Records a live writer had marked as saved (`Journal.release`), not replayed."""
    undecodable: int = 0
    """Records that are not an event; `on_json` rejected them when they were recorded."""
    torn_records: int = 0
    """Incomplete or damaged frames at the end of a segment (a write cut short), ignored.
    A frame holds one or more records, none of them acknowledged if it was the last write."""
    corrupt_regions: int = 0
    """Damaged stretches in the middle of a segment that were skipped."""
    records_lost: int = 0
    """Records missing after the skipped corrupt regions (from the sequence numbers)."""
    bytes_skipped: int = 0
    sessions_saved: int = 0
    """Store saves made (a session whose loops span a save point is saved more than once)."""
    failed_sessions: list[str] = field(default_factory=list)
    orphans: int = 0
    """Events no loop claimed; appended to ``orphans.jsonl`` when the segments are removed
    (until then they stay in the journal)."""
    segments_removed: int = 0


@dataclass
class _Segment:
    number: int
    path: Path
    first_seq: int


class _DirectoryLock:
    """An exclusive, non-blocking ``flock`` on ``journal.lock``: one writer per directory."""

    def __init__(self, directory: Path) -> None:
        path = directory / LOCK_FILE
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if sys.platform != "win32":
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._fd)
                raise JournalLocked(f"journal {directory} is in use by another writer") from None

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = -1


def _as_bytes(data: bytes | bytearray | memoryview | str) -> bytes:
    return data.encode() if isinstance(data, str) else bytes(data)


def _fsync_directory(directory: Path) -> None:
    # A created, renamed or removed file survives a power loss only once its directory is synced.
    if sys.platform == "win32":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _segment_paths(directory: Path) -> list[tuple[int, Path]]:
    """The segments in `directory`, oldest first."""
    found = []
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        return []
    for path in entries:
        stem = path.name[: -len(SEGMENT_SUFFIX)]
        if path.name.endswith(SEGMENT_SUFFIX) and stem.isdigit():
            found.append((int(stem), path))
    found.sort()
    return found


@dataclass(frozen=True)
class _Checkpoint:
    """What a live writer recorded as saved (see `Journal.release`)."""

    stored_below: int = 0
    settled_through: int = -1


def _read_checkpoint(directory: Path) -> _Checkpoint:
    path = directory / CHECKPOINT_FILE
    try:
        data = json.loads(path.read_bytes())
        return _Checkpoint(int(data["stored_below"]), int(data["settled_through"]))
    except FileNotFoundError:
        return _Checkpoint()
    except (ValueError, KeyError, TypeError) as error:
        # Ignoring it only means replaying (and re-saving, idempotently) more frames.
        logger.warning("ignoring unreadable journal checkpoint %s: %s", path, error)
        return _Checkpoint()


def _write_checkpoint(directory: Path, checkpoint: _Checkpoint) -> None:
    path = directory / CHECKPOINT_FILE
    tmp = directory / f"{CHECKPOINT_FILE}.tmp"
    data = json.dumps({
        "version": 1,
        "stored_below": checkpoint.stored_below,
        "settled_through": checkpoint.settled_through,
    }).encode()
    with open(tmp, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    _fsync_directory(directory)


def _append_orphans(directory: Path, events: Iterable[AgentEvent]) -> int:
    """Append events to ``orphans.jsonl`` durably; returns how many."""
    lines = [codec.encode_event(event) + b"\n" for event in events]
    if not lines:
        return 0
    path = directory / ORPHANS_FILE
    created = not path.exists()
    with open(path, "ab") as file:
        file.write(b"".join(lines))
        file.flush()
        os.fsync(file.fileno())
    if created:
        _fsync_directory(directory)
    return len(lines)


# -- Reading segments ---------------------------------------------------------------------------


def _frame_at(data: memoryview, pos: int, after: int) -> tuple[int, int, int] | None:
    """(first seq, count, end) of a valid frame at `pos` numbered above `after`, else None."""
    if len(data) - pos < _HEADER.size:
        return None
    marker, length, crc, first, count = _HEADER.unpack_from(data, pos)
    end = pos + _HEADER.size + length
    if (marker != FRAME_MARKER or end > len(data) or first <= after or count < 1
            or zlib.crc32(data[pos + _CRC_FROM:end]) != crc):
        return None
    return first, count, end


def _resync(data: memoryview, start: int, after: int) -> int | None:
    """The position of the first valid frame at or after `start`, if there is one."""
    raw = data.obj  # the bytes object, for a fast search
    assert isinstance(raw, bytes)
    hit = raw.find(FRAME_MARKER, start)
    while hit != -1:
        if _frame_at(data, hit, after) is not None:
            return hit
        hit = raw.find(FRAME_MARKER, hit + 1)
    return None


def _records(data: memoryview, pos: int, count: int, end: int) -> list[bytes] | None:
    body = bytes(data[pos + _HEADER.size:end])
    if count == 1:
        return [body]
    records = body.split(b"\n")
    return records if len(records) == count else None  # a CRC-valid frame the writer never made


def _scan_segment(
    path: Path, after: int, report: RecoveryReport | None
) -> Iterator[tuple[int, bytes]]:
    """The records of one segment, as (seq, payload), numbered above `after`.

    Damage is counted in `report` and logged (nothing is logged without a report).
    A bad frame followed by no valid one is a torn tail: a write cut short.
    """
    data = memoryview(path.read_bytes())
    if bytes(data[:len(MAGIC)]) != MAGIC:
        if MAGIC.startswith(bytes(data)):  # created, crashed before its header was written
            if report is not None and len(data):
                report.torn_records += 1
                logger.warning("journal segment %s: torn header ignored", path)
            return
        if report is not None:
            report.corrupt_regions += 1
            report.bytes_skipped += len(data)
            logger.warning("journal segment %s: not a journal segment, skipped", path)
        return
    pos = len(MAGIC)
    while pos < len(data):
        frame = _frame_at(data, pos, after)
        records = frame and _records(data, pos, frame[1], frame[2])
        if frame is not None and records is not None:
            first, _, pos = frame
            yield from enumerate(records, first)
            after = first + len(records) - 1
            continue
        found = _resync(data, pos + 1, after)
        if found is None:
            if report is not None:
                report.torn_records += 1
                report.bytes_skipped += len(data) - pos
                logger.warning("journal segment %s: torn record at offset %d (%d bytes) ignored",
                               path, pos, len(data) - pos)
            return
        lost = _HEADER.unpack_from(data, found)[3] - after - 1
        if report is not None:
            report.corrupt_regions += 1
            report.records_lost += lost
            report.bytes_skipped += found - pos
            logger.warning("journal segment %s: corrupt bytes %d-%d skipped (%d records lost)",
                           path, pos, found, lost)
        pos = found


def _last_seq(paths: Sequence[Path]) -> int:
    """The highest valid sequence number in these segments (oldest first), or -1."""
    for path in reversed(paths):
        last = -1
        for seq, _ in _scan_segment(path, -1, None):
            last = seq
        if last >= 0:
            return last
    return -1


def read_records(directory: StrPath) -> Iterator[JournalRecord]:
    """Every valid frame of every segment in `directory`, in order (damage is skipped).

    For inspection; it takes no lock, so a live writer's last frame may be missing.
    """
    after = -1
    for _, path in _segment_paths(Path(directory)):
        for seq, payload in _scan_segment(path, after, None):
            after = seq
            yield JournalRecord(seq, payload, path)


# -- Writing ------------------------------------------------------------------------------------


class Journal:
    """An append-only, segmented write-ahead log of events. Thread-safe.

    Opening takes an exclusive lock on the directory (`JournalLocked` if another
    writer holds it). Segments found there belong to an earlier run
    (`leftover_segments`): they are never appended to; `recover` replays and removes them.
    `close` (or leaving a ``with`` block) writes and fsyncs everything.

    I/O failures raise `StoreError`; after a failed fsync the journal refuses further
    appends (the kernel may have dropped the unsynced data, so a retry would lie).
    """

    def __init__(
        self,
        directory: StrPath,
        *,
        durability: Durability = "interval",
        interval_ms: float = 50,
        segment_bytes: int = 64 << 20,
    ) -> None:
        if durability not in get_args(Durability):
            raise ValueError(f"durability must be one of {get_args(Durability)}, got {durability!r}")
        if interval_ms <= 0:
            raise ValueError(f"interval_ms must be positive, got {interval_ms!r}")
        if segment_bytes <= len(MAGIC):
            raise ValueError(f"segment_bytes must exceed {len(MAGIC)}, got {segment_bytes!r}")
        self.directory = Path(directory)
        self.durability: Durability = durability
        self.interval = interval_ms / 1000
        self.segment_bytes = segment_bytes
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._dir_lock = _DirectoryLock(self.directory)
        except OSError as error:
            raise StoreError(f"cannot open journal {self.directory}: {error}") from error
        # _lock orders records and frames; _sync_lock serialises fsyncs and closing files
        # (taken before _lock, never after).
        # Reentrant: a JournaledRecorder holds it while the recorder runs user callbacks.
        self._lock = threading.RLock()
        self._sync_lock = threading.Lock()
        self._acked_cond = threading.Condition(threading.Lock())
        self._release_lock = threading.Lock()
        self._failure: BaseException | None = None
        self._closed = False
        self._writable = True  # neither closed nor failed
        self._write_through = durability == "os"
        self._to_close: list[BinaryIO] = []
        self._pending: list[bytes] = []  # records appended, not yet written
        self._singles: list[int] = []  # positions in _pending of records holding a newline
        self._pending_bytes = 0
        self._segments: list[_Segment] = []
        try:
            existing = _segment_paths(self.directory)
            self._leftovers = [path for _, path in existing]
            checkpoint = _read_checkpoint(self.directory)
            # Sequence numbers keep rising across runs, so an old checkpoint never covers new records.
            self._next_seq = max(_last_seq(self._leftovers) + 1, checkpoint.stored_below,
                                 checkpoint.settled_through + 1)
            self._checkpoint = _Checkpoint(stored_below=0, settled_through=-1)
            self._acked = self._next_seq - 1
            self._file, self._size = self._open_segment(existing[-1][0] + 1 if existing else 0,
                                                        self._next_seq)
        except OSError as error:
            self._dir_lock.release()
            raise StoreError(f"cannot open journal {self.directory}: {error}") from error
        self._stopping = False
        self._wake = threading.Event()
        self._flusher: threading.Thread | None = None
        if durability == "interval":
            self._flusher = threading.Thread(
                target=self._flush_loop, name=f"phi-session journal flusher {self.directory}", daemon=True)
            self._flusher.start()

    def __repr__(self) -> str:
        return f"Journal({str(self.directory)!r}, durability={self.durability!r})"

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- state ------------------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        """The sequence number of the last appended record (-1 before the first)."""
        return self._next_seq - 1

    @property
    def acknowledged_seq(self) -> int:
        """Every record up to this sequence number is durable per the policy."""
        if self.durability == "os":
            return self._next_seq - 1  # written to the OS inside `append`
        return self._acked

    @property
    def leftover_segments(self) -> list[Path]:
        """Segments an earlier run left behind, not yet recovered (oldest first)."""
        with self._lock:
            return list(self._leftovers)

    def segments(self) -> list[Path]:
        """The segments this journal wrote that still exist, oldest first (the last is active)."""
        with self._lock:
            return [segment.path for segment in self._segments]

    @property
    def closed(self) -> bool:
        return self._closed

    # -- appending ----------------------------------------------------------------------------

    def append(self, event: AgentEvent, *, commit: bool = True) -> int:
        """Journal one event; returns its sequence number.

        With ``commit=False`` an ``"always"`` journal returns before the fsync; call
        `commit` with the number (this lets several threads share one fsync).
        """
        return self.append_json(codec.encode_event(event), commit=commit)

    def append_json(self, data: bytes | str, *, commit: bool = True) -> int:
        """Journal one event given as a phi-core JSON line; returns its sequence number.

        The line is stored as given, not validated: `recover` skips (and counts) a
        record that does not decode, as `SessionRecorder.on_json` rejected it live.
        """
        payload = data if type(data) is bytes else _as_bytes(data)
        self._lock.acquire()
        try:
            seq = self._append_locked(payload)
        finally:
            self._lock.release()
        if commit:
            self.commit(seq)
        return seq

    def _append_locked(self, payload: bytes) -> int:
        """Give `payload` the next sequence number and queue it (holding `_lock`).

        This is the hot path, a list append: frames are built, checksummed and written
        once per flush by whoever syncs (flusher, `commit`, `close`), outside `_lock`.
        Under ``"os"`` the record is written through before returning.
        """
        if not self._writable:
            self._check_writable()
        if 10 in payload:  # a newline; trailing ones (a line read from a file) mean nothing in JSON
            payload = payload.rstrip(b"\r\n")
            if 10 in payload:  # still one: it cannot share a newline-joined frame
                self._singles.append(len(self._pending))
        size = len(payload)
        if size > _MAX_FRAME:
            raise ValueError(f"event of {size} bytes exceeds the journal's frame limit")
        seq = self._next_seq
        self._next_seq = seq + 1
        self._pending.append(payload)
        self._pending_bytes += size
        if self._write_through:
            try:
                self._write_records(*self._take_pending())
                self._file.flush()  # in the kernel before returning
            except OSError as error:
                self._fail(error)
                raise StoreError(f"journal {self.directory}: append failed: {error}") from error
        elif self._pending_bytes >= _WAKE_PENDING_BYTES:
            self._wake.set()
        return seq

    def commit(self, seq: int) -> None:
        """Make record `seq` durable per the policy: under ``"always"``, return once it
        is fsynced; otherwise nothing to wait for (``"interval"`` acknowledges in the
        background, ``"os"`` on `append`), except that a large backlog is written now."""
        if self.durability == "always":
            if self._acked < seq:
                self._sync()
        elif self._pending_bytes >= _MAX_PENDING_BYTES:
            self._sync()

    def sync(self) -> int:
        """Write and fsync every appended record now, whatever the policy; returns the
        acknowledged sequence number."""
        self._sync()
        return self.acknowledged_seq

    def wait_acknowledged(self, seq: int, timeout: float | None = None) -> bool:
        """Wait until record `seq` is acknowledged; False if `timeout` seconds pass first
        (or if the journal is closed before)."""
        if seq >= self._next_seq:
            raise ValueError(f"sequence number {seq} was never appended (last: {self.last_seq})")
        if self.durability == "os":
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._acked_cond:
            while self._acked < seq:
                if self._failure is not None:
                    raise StoreError(f"journal {self.directory} failed: {self._failure}")
                if self._closed:
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._acked_cond.wait(remaining)
            return True

    def write_orphans(self, events: Iterable[AgentEvent]) -> int:
        """Durably append events that no loop claimed to ``orphans.jsonl``; returns how many."""
        try:
            return _append_orphans(self.directory, events)
        except OSError as error:
            raise StoreError(f"journal {self.directory}: cannot write orphans: {error}") from error

    # -- retiring segments -------------------------------------------------------------------

    def release(self, stored_below: int, *, settled_through: int) -> int:
        """Record what is safely stored; remove the segments that hold nothing else.

        The caller promises: (1) every event with a sequence number below
        `stored_below` is saved in the store, was written to ``orphans.jsonl``, or is
        one the recorder never keeps; (2) every event numbered up to
        `settled_through` that belongs to a loop started below `stored_below` is
        saved or written to ``orphans.jsonl``. `recover` then skips those events.

        A segment is removed once all its frames are below `stored_below` (never the
        active one). Raises `PhiSessionError` while leftover segments of an earlier run
        exist: the checkpoint would wrongly cover them; `recover` them first.
        Returns how many segments were removed.
        """
        with self._release_lock:
            with self._lock:
                self._check_writable()
                if self._leftovers:
                    raise PhiSessionError(
                        f"journal {self.directory} holds segments of an earlier run; recover them first")
                checkpoint = _Checkpoint(
                    max(self._checkpoint.stored_below, min(stored_below, self._next_seq)),
                    max(self._checkpoint.settled_through, min(settled_through, self._next_seq - 1)))
                covered = [s for s in self._segments[:-1] if self._end_of(s) <= checkpoint.stored_below]
            try:
                if checkpoint != self._checkpoint:
                    _write_checkpoint(self.directory, checkpoint)
                    self._checkpoint = checkpoint
                return self._remove(covered)
            except OSError as error:
                raise StoreError(f"journal {self.directory}: release failed: {error}") from error

    def _remove(self, segments: list[_Segment]) -> int:
        for segment in segments:
            segment.path.unlink(missing_ok=True)
        if segments:
            _fsync_directory(self.directory)
            with self._lock:
                self._segments = [s for s in self._segments if s not in segments]
        return len(segments)

    # -- internals ----------------------------------------------------------------------------

    def _take_pending(self) -> tuple[list[bytes], list[int], int]:
        """Hand over the queued records, their newline positions, first number (holding `_lock`)."""
        taken = self._pending, self._singles, self._next_seq - len(self._pending)
        self._pending, self._singles, self._pending_bytes = [], [], 0
        return taken

    def _write_records(self, records: list[bytes], singles: list[int], first: int) -> None:
        """Write records numbered from `first` as frames: newline-free runs joined, the
        rest alone. Only one thread at a time writes (see `_sync`)."""
        start = 0
        for single in (*singles, len(records)):
            if single > start:
                run = records[start:single]
                self._write_frame(run[0] if len(run) == 1 else b"\n".join(run), first + start, len(run))
            if single < len(records):
                self._write_frame(records[single], first + single, 1)
            start = single + 1

    def _write_frame(self, data: bytes, first: int, count: int) -> None:
        crc = zlib.crc32(data, zlib.crc32(_TAIL.pack(first, count)))
        self._file.write(_HEADER.pack(FRAME_MARKER, len(data), crc, first, count))
        self._file.write(data)
        self._size += _HEADER.size + len(data)
        if self._size >= self.segment_bytes:
            self._rotate(first + count)

    def _open_segment(self, number: int, first_seq: int) -> tuple[BinaryIO, int]:
        path = self.directory / f"{number:010d}{SEGMENT_SUFFIX}"
        file: BinaryIO = open(path, "xb")  # kept open: the active segment
        file.write(MAGIC)
        if self.durability != "os":
            file.flush()
            os.fsync(file.fileno())
            _fsync_directory(self.directory)
        self._segments.append(_Segment(number, path, first_seq))
        return file, len(MAGIC)

    def _rotate(self, next_seq: int) -> None:
        """Close the full segment, durably, and start the next one at `next_seq`."""
        old = self._file
        old.flush()
        os.fsync(old.fileno())  # so that `sync` need only fsync the active segment
        self._set_acked(next_seq - 1)
        with self._lock:
            self._file, self._size = self._open_segment(self._segments[-1].number + 1, next_seq)
            # A concurrent `sync` may be fsyncing `old`: close it only under the sync lock.
            self._to_close.append(old)
        if self._sync_lock.acquire(blocking=False):
            try:
                self._close_retired()
            finally:
                self._sync_lock.release()

    def _close_retired(self) -> None:
        retired, self._to_close = self._to_close, []
        for file in retired:
            file.close()

    def _sync(self) -> None:
        """Write what is queued, fsync, acknowledge. Frames are built and written under
        `_sync_lock` only, so appenders are not held up by checksums and I/O."""
        with self._sync_lock:
            with self._lock:
                self._check_writable()
                taken = self._take_pending()
                target = self._next_seq - 1  # everything up to here is written once `taken` is
                self._close_retired()
            try:
                self._write_records(*taken)
                with self._lock:
                    file = self._file
                file.flush()
                if target > self._acked:  # another thread's fsync may already cover it
                    os.fsync(file.fileno())
                    self._set_acked(target)
            except OSError as error:
                self._fail(error)
                raise StoreError(f"journal {self.directory}: write failed: {error}") from error

    def _set_acked(self, seq: int) -> None:
        with self._acked_cond:
            if seq > self._acked:
                self._acked = seq
                self._acked_cond.notify_all()

    def _fail(self, error: BaseException) -> None:
        self._failure = error
        self._writable = False
        logger.error("journal %s failed, refusing further appends: %s", self.directory, error)
        with self._acked_cond:
            self._acked_cond.notify_all()

    def _check_writable(self) -> None:
        if self._closed:
            raise StoreError(f"journal {self.directory} is closed")
        if self._failure is not None:
            raise StoreError(f"journal {self.directory} failed earlier: {self._failure}")

    def _flush_loop(self) -> None:
        while not self._stopping:
            self._wake.wait(self.interval)  # the interval, or earlier if a backlog builds up
            self._wake.clear()
            if self._stopping:
                return
            try:
                self._sync()
            except StoreError:
                return  # already logged by _fail; appends now raise

    def close(self) -> None:
        """Write and fsync everything, remove the segments `release` covered, unlock. Idempotent.

        A clean close after everything was released leaves no segment behind.
        """
        if self._closed:
            return
        self._stopping = True
        self._wake.set()
        if self._flusher is not None:
            self._flusher.join()
        try:
            if self._failure is None:
                self._sync()
        finally:
            with self._sync_lock, self._lock:
                self._closed = True
                self._writable = False
                self._to_close.append(self._file)
                self._close_retired()
                # Released segments go, and so does an active one that holds no frame.
                covered = [s for s in self._segments
                           if self._end_of(s) <= max(self._checkpoint.stored_below, s.first_seq)]
            with self._acked_cond:
                self._acked_cond.notify_all()
            try:
                with self._release_lock:
                    self._remove(covered)
                    if not self._segments and not self._leftovers:
                        # Nothing left to replay: a stale checkpoint must not outlive its segments.
                        (self.directory / CHECKPOINT_FILE).unlink(missing_ok=True)
            except OSError as error:
                logger.warning("journal %s: could not remove released segments: %s", self.directory, error)
            self._dir_lock.release()

    def _end_of(self, segment: _Segment) -> int:
        """One past the last sequence number `segment` can hold."""
        index = self._segments.index(segment)
        if index + 1 < len(self._segments):
            return self._segments[index + 1].first_seq
        return self._next_seq


# -- The write-ahead sink ------------------------------------------------------------------------


_DELTA_PREFIX = b'{"type":"MessageUpdate",'


class JournaledRecorder:
    """Feeds a `SessionRecorder` through a `Journal`: each event is journaled first.

    ``on_event``/``on_json`` return a sequence number ``s``: once the journal has
    acknowledged ``s`` this event and every earlier one survive a crash
    (`Journal.wait_acknowledged`; under ``"always"`` and ``"os"`` that is already the
    case on return). The recorder itself journals each event it keeps, under its
    lock and before applying it (`SessionRecorder.set_write_ahead`), so the journal's
    order is the recorder's whoever feeds it. Streaming deltas the recorder drops are
    not journaled (replaying would drop them again), nor lines that are not events
    (they raise `DecodeError` and record nothing).
    """

    def __init__(self, journal: Journal, recorder: SessionRecorder | None = None, *,
                 config: SessionRecorderConfig | None = None) -> None:
        if recorder is not None and config is not None:
            raise TypeError("pass either a recorder or a config, not both")
        self.journal = journal
        self.recorder = recorder if recorder is not None else SessionRecorder(config)
        self._always = journal.durability == "always"
        self._last_seq = journal.last_seq
        # Called for every kept event of a stream: bind what it uses once.
        self._acquire, self._release = journal._lock.acquire, journal._lock.release
        self._append = journal._append_locked
        self.recorder.set_write_ahead(self._write_ahead)
        self._apply_event, self._apply_json = self.recorder.on_event, self.recorder.on_json

    def _write_ahead(self, payload: bytes | str) -> None:
        self._acquire()
        try:
            self._last_seq = self._append(payload if type(payload) is bytes else _as_bytes(payload))
        finally:
            self._release()

    def _committed(self, commit: bool) -> int:
        # Under concurrency this may be a later event's number: acknowledging it
        # acknowledges ours too, since sequence numbers follow the recorder's order.
        seq = self._last_seq
        if commit and (self._always or self.journal._pending_bytes >= _MAX_PENDING_BYTES):
            self.journal.commit(seq)
        return seq

    def on_event(self, event: AgentEvent, *, commit: bool = True) -> int:
        """Journal `event` (unless the recorder drops it), then record it."""
        self._apply_event(event)
        return self._committed(commit)

    def on_json(self, data: bytes | str, *, commit: bool = True) -> int:
        """Journal one phi-core JSON line (unless the recorder drops it), then record it."""
        self._apply_json(data)
        return self._committed(commit)

    def record_all(self, events: Iterable[AgentEvent]) -> int:
        """Journal and record every event; returns the last sequence number."""
        for event in events:
            self.on_event(event, commit=False)
        seq = self._last_seq
        self.journal.commit(seq)
        return seq


# -- Recovery ----------------------------------------------------------------------------------


def recover(
    journal: Journal | StrPath,
    store: SessionStore,
    *,
    config: SessionRecorderConfig | None = None,
    remove: bool = True,
    save_every: int = 10_000,
) -> RecoveryReport:
    """Rebuild every session from a journal and save it into `store`.

    `journal` is a directory no live writer holds (`JournalLocked` otherwise), or an
    open `Journal`, whose `leftover_segments` (those of an earlier run) are recovered.
    Events are replayed into a fresh `SessionRecorder(config)` (its callbacks run),
    completed sessions are saved every `save_every` events (memory stays bounded),
    and at the end open loops are aborted and every session is saved.

    Damage never raises: torn records at a segment's end and corrupt stretches are
    skipped, logged as warnings and counted in the report.

    Idempotent: `SessionStore.save` merges by loop id, so saving what is already
    stored changes nothing. With `remove`, once every session is saved, events that no
    loop claimed are appended to ``orphans.jsonl`` in the journal directory and the
    replayed segments (and the checkpoint) are deleted. If a save fails nothing is
    written or deleted and `RecoveryError` (carrying the report) is raised: recovering
    again is safe.
    """
    if save_every < 1:
        raise ValueError(f"save_every must be at least 1, got {save_every!r}")
    if isinstance(journal, Journal):
        directory, lock = journal.directory, None
        segments = journal.leftover_segments
    else:
        directory = Path(journal)
        if not directory.is_dir():
            return RecoveryReport()
        try:
            lock = _DirectoryLock(directory)
        except OSError as error:
            raise StoreError(f"cannot lock journal {directory}: {error}") from error
        segments = [path for _, path in _segment_paths(directory)]
    try:
        report, orphans = _replay(directory, segments, store, config, save_every)
        if report.failed_sessions:
            raise RecoveryError(
                f"recovery of {directory}: {len(report.failed_sessions)} sessions could not be saved "
                f"({', '.join(report.failed_sessions[:5])}); the journal was kept", report)
        if remove and segments:
            if orphans:
                _append_orphans(directory, orphans)
                logger.warning("journal %s: %d events belonged to no loop; written to %s",
                               directory, len(orphans), directory / ORPHANS_FILE)
            for path in segments:
                path.unlink(missing_ok=True)
            (directory / CHECKPOINT_FILE).unlink(missing_ok=True)
            _fsync_directory(directory)
            report.segments_removed = len(segments)
            if isinstance(journal, Journal):
                with journal._lock:
                    journal._leftovers = [p for p in journal._leftovers if p not in segments]
        return report
    finally:
        if lock is not None:
            lock.release()


def _replay(
    directory: Path,
    segments: list[Path],
    store: SessionStore,
    config: SessionRecorderConfig | None,
    save_every: int,
) -> tuple[RecoveryReport, list[AgentEvent]]:
    """Replay `segments` into a recorder, saving as it goes; the report and the orphans."""
    report = RecoveryReport()
    checkpoint = _read_checkpoint(directory)
    recorder = SessionRecorder(config)
    unstorable: list[AgentEvent] = []
    after = -1
    for path in segments:
        report.segments_read += 1
        for seq, payload in _scan_segment(path, after, report):
            after = seq
            if seq < checkpoint.stored_below:
                report.events_already_stored += 1
                continue
            try:
                event = codec.decode_for_recording(payload)
                loop_id = getattr(event, "loop_id", None)
                if (seq <= checkpoint.settled_through and loop_id is not None
                        and type(event) is not AgentStart and recorder.current_loop(loop_id) is None):
                    # Its loop started before the checkpoint: the live writer saved it (`release`).
                    report.events_already_stored += 1
                    continue
                if isinstance(event, codec.LazyMessageUpdate):
                    recorder.on_json(payload)  # the recorder's own path: it drops or decodes it
                else:
                    recorder.on_event(event)
            except DecodeError as error:
                report.undecodable += 1
                logger.warning("journal %s: record %d is not an event, skipped: %s", path, seq, error)
                continue
            report.events_replayed += 1
            if report.events_replayed % save_every == 0:
                recorder.checkpoint()
                _save_all(recorder, store, report, unstorable)
    recorder.flush()
    _save_all(recorder, store, report, unstorable)
    orphans = [orphan.event for orphan in recorder.drain_orphans()] + unstorable
    report.orphans = len(orphans)
    return report, orphans


def session_events(session: Session) -> list[AgentEvent]:
    """Every event a session holds, loop by loop (for sessions no store can take)."""
    return [item.event for record in session.loops for item in record.events]


def _save_all(recorder: SessionRecorder, store: SessionStore, report: RecoveryReport,
              unstorable: list[AgentEvent]) -> None:
    for session in recorder.drain_completed():
        try:
            store.save(session)
        except InvalidSessionId as error:
            # No store can ever take this id: keep its events with the orphans rather
            # than blocking every later recovery.
            unstorable.extend(session_events(session))
            logger.warning("recovery: session %r cannot be stored (%s); its events go to %s",
                           session.session_id, error, ORPHANS_FILE)
        except (PhiSessionError, OSError) as error:
            report.failed_sessions.append(session.session_id)
            logger.error("recovery: saving session %s failed: %s", session.session_id, error)
        else:
            report.sessions_saved += 1

