"""The journal's on-disk format: segments of checksummed frames, the checkpoint, the lock.

Layout of a journal directory::

    0000000000.wal, 0000000001.wal, ...   segments, numbered in creation order
    checkpoint.json                        what a live writer already saved, and how much
                                           of orphans.jsonl is settled (optional)
    orphans.jsonl                          events no loop claimed (phi-core JSON lines), and
                                           records recovery could not decode, as journaled
    journal.lock                           held (flock) by the one live writer

A segment starts with the 8 bytes of its journal's kind (`Kind`: ``PHIJRNL2`` a
recorder's, ``PHISPIL2`` a broker sink's spill journal) and holds frames; a frame carries
one or more consecutive records (group commit: whatever was appended since the
previous write). A segment whose header is damaged is read from its first valid frame
on (the header counts as damage)::

    4 bytes  marker FF 50 4A 46 (never in UTF-8 text: a reader resynchronises on it)
    u32 LE   data length
    u32 LE   CRC-32 of the next 12 + length bytes
    u64 LE   sequence number of the first record (0, 1, 2, ... across segments and runs)
    u32 LE   record count n
    data     n = 1: the record as is; n > 1: the records joined by ``\\n``

A record is one event as a phi-core JSON line (`codec.encode_event`, or the line given
to `Journal.append_json`); a record containing a newline always gets a frame of its own.
Sequence numbers only rise, so a gap between two records read back is records lost.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
import struct
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import msgspec

from .. import codec
from .._fork import in_forked_child
from .._jsonl import ends_mid_line
from ..errors import JournalLocked, NotAJournal
from ..events import AgentEvent

if sys.platform != "win32":
    import fcntl

logger = logging.getLogger(__name__)

MAGIC = b"PHIJRNL2"
SPILL_MAGIC = b"PHISPIL2"
SEGMENT_SUFFIX = ".wal"
CHECKPOINT_FILE = "checkpoint.json"
CHECKPOINT_TMP = CHECKPOINT_FILE + ".tmp"  # written, then renamed over the checkpoint
_CHECKPOINT_START = b'{"version": 1, "stored_below": '  # how `write_checkpoint` begins one
ORPHANS_FILE = "orphans.jsonl"
LOCK_FILE = "journal.lock"
FRAME_MARKER = b"\xffPJF"
MAX_FRAME = 2**32 - 1
_HEADER = struct.Struct("<4sIIQI")  # marker, data length, CRC-32, first sequence number, count
_TAIL = struct.Struct("<QI")  # the header fields the CRC covers (with the data)
_CRC_FROM = 12  # offset of the first byte the CRC covers
FRAME_OVERHEAD = _HEADER.size
_IOV_MAX = 1024  # the smallest IOV_MAX POSIX systems have


@dataclass(frozen=True)
class Kind:
    """What a journal's records are, told by its segments' header: a journal refuses
    (`check_ours`) segments of another kind, whose records it would take for damage."""

    magic: bytes
    """The header of the segments it writes."""
    what: str
    also: tuple[bytes, ...] = ()
    """Headers of segments it takes as its own too."""
    earlier: Callable[[bytes], bool] | None = None
    """Whether a record is one of its kind's: tells the segments an earlier version headed
    with another kind's header (one of `also`) from that kind's."""

    @property
    def heads(self) -> tuple[bytes, ...]:
        return (self.magic, *self.also)


class _Typed(msgspec.Struct):
    type: str


# Its records are [event id, session id, key, event] (`broker.sink`).
_SPILL_RECORD = msgspec.json.Decoder(tuple[str, str, str, _Typed])


def _spill_record(record: bytes) -> bool:
    """Whether `record` is a spill journal's (its event: an object with a type, any)."""
    try:
        _SPILL_RECORD.decode(record)
    except msgspec.DecodeError:
        return False
    return True


RECORDER = Kind(MAGIC, "a recorder's journal")
# Earlier spill journals were headed as a recorder's: their first record tells them apart.
SPILL = Kind(
    SPILL_MAGIC,
    "a broker spill journal (`phi-session record --to`; the next one sends it)",
    (MAGIC,),
    _spill_record,
)
_KINDS = (RECORDER, SPILL)
_HEADERS = tuple(kind.magic for kind in _KINDS)  # one length: `SegmentReader` reads both


def frame_header(data: bytes, first: int, count: int) -> bytes:
    """The header of a frame holding `count` records numbered from `first` (`data`)."""
    crc = zlib.crc32(data, zlib.crc32(_TAIL.pack(first, count)))
    return _HEADER.pack(FRAME_MARKER, len(data), crc, first, count)


def segment_path(directory: Path, number: int) -> Path:
    return directory / f"{number:010d}{SEGMENT_SUFFIX}"


def check_ours(directory: Path, segments: Sequence[Path], kind: Kind = RECORDER) -> None:
    """Raise `NotAJournal` unless the files of `directory` a journal would write, remove
    or replace are this journal's: `segments`, those named like segments (`holds_journal`,
    of this format version and of `kind`), the checkpoint and its temporary file, each a
    regular file.

    Call it before making the lock file there: an earlier journal's lock file is what
    marks the files whose writing a crash cut short as ours (and one that is not empty,
    or no regular file, is another program's: refused).
    """
    beside_lock = _lock_file_ours(directory)
    tmp = directory / CHECKPOINT_TMP
    for path in (*segments, directory / CHECKPOINT_FILE, tmp):
        if _not_a_file(path):
            raise NotAJournal(
                f"{directory} is not a phi-session journal: {path.name} is not a regular file; "
                "nothing was touched"
            )
    if (other := other_format(segments)) is not None:
        raise NotAJournal(
            f"{directory} holds a journal of another format version ({other[0].name} begins with "
            f"{other[1].decode()}, this version reads {MAGIC.decode()}): recover it "
            "with the phi-session that wrote it; nothing was touched"
        )
    if (other_kind := _other_kind(segments, kind)) is not None:
        raise NotAJournal(
            f"{directory} is {other_kind[0].what}, not {kind.what}: {other_kind[1]}; nothing was touched"
        )
    if segments and not holds_journal(segments, beside_lock=beside_lock, heads=kind.heads):
        names = ", ".join(path.name for path in segments[:3]) + (", ..." if len(segments) > 3 else "")
        raise NotAJournal(
            f"{directory} is not a phi-session journal: no file named like a segment ({names}) "
            "begins with a journal segment header; nothing was touched"
        )
    read_checkpoint(directory)  # raises NotAJournal for a checkpoint.json that is not ours
    if os.path.lexists(tmp):
        # A crash in `write_checkpoint` leaves a beginning of what it writes, and the lock file.
        head = _head(tmp, len(_CHECKPOINT_START))
        if not beside_lock or head is None or not _CHECKPOINT_START.startswith(head):
            raise NotAJournal(
                f"{directory} is not a phi-session journal: {CHECKPOINT_TMP} is not a journal "
                "checkpoint cut short; nothing was touched"
            )


def _lock_file_ours(directory: Path) -> bool:
    """Whether `directory` holds our lock file (`DirectoryLock` makes it empty, and never
    writes to it); `NotAJournal` for another program's file of that name."""
    try:
        info = os.lstat(directory / LOCK_FILE)
    except FileNotFoundError:
        return False
    if stat.S_ISREG(info.st_mode) and info.st_size == 0:
        return True
    raise NotAJournal(
        f"{directory} is not a phi-session journal: {LOCK_FILE} is not a phi-session lock file "
        "(ours is an empty regular file); nothing was touched"
    )


def _not_a_file(path: Path) -> bool:
    """Whether `path` is there as what a journal never makes (a directory, a FIFO, a link):
    reading it would fail, or wait for ever for a FIFO's writer."""
    try:
        return not stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def holds_journal(paths: Sequence[Path], *, beside_lock: bool, heads: Sequence[bytes] = (MAGIC,)) -> bool:
    """Whether the files `paths`, named like segments, are a journal's whose segments
    begin with one of `heads`.

    One at least begins with one of them (a header-less file beside it is damage); or,
    `beside_lock` (the lock file an earlier journal made before any segment), every one
    holds a beginning of one (segments whose creation a crash cut short), or one
    holds a valid frame (a segment whose header was damaged). Anything else (another
    program's ``0001.wal``) is not ours.
    """
    found = [_head(path) for path in paths]
    if any(head in heads for head in found):
        return True
    if not beside_lock:
        return False
    return all(head is not None and _begins_header(head) for head in found) or any(
        _holds_frame(path) for path, head in zip(paths, found, strict=True) if head
    )


def _begins_header(data: bytes) -> bool:
    """Whether `data` is a beginning of a segment header (of any kind): what a crash
    while creating a segment leaves."""
    return any(header.startswith(data) for header in _HEADERS)


def _other_kind(paths: Sequence[Path], kind: Kind) -> tuple[Kind, str] | None:
    """The other kind of journal than `kind` that `paths` belong to, and how it shows;
    None if they are `kind`'s (or do not tell).

    The first that begins as another kind's segment tells; so does, in segments headed
    as `kind`'s, the first record of the first of them, if it is a record of a kind an
    earlier version headed so (a journal of records of neither kind is `kind`'s: recovery
    keeps the records it cannot decode)."""
    heads = [_head(path) for path in paths]
    for head in heads:
        for other in _KINDS:
            if head == other.magic and head not in kind.heads:
                return other, f"its segments begin with {head.decode()}"
    earlier = [
        (other, other.earlier) for other in _KINDS if other.earlier is not None and kind.magic in other.also
    ]
    first = next((path for path, head in zip(paths, heads, strict=True) if head == kind.magic), None)
    if earlier and first is not None and (record := _first_record(first)) is not None:
        for other, ours in earlier:
            if ours(record):
                return other, (
                    f"its records are of that kind, in segments headed {kind.magic.decode()} "
                    "as an earlier version wrote them"
                )
    return None


def _first_record(path: Path) -> bytes | None:
    """The first record of segment `path`; None unless its first frame is intact."""
    try:
        with open(path, "rb") as file:
            start = file.read(len(MAGIC) + _HEADER.size)
            if len(start) < len(MAGIC) + _HEADER.size:
                return None
            data = memoryview(start + file.read(_HEADER.unpack_from(start, len(MAGIC))[1]))
    except OSError:
        return None
    frame = _frame_at(data, len(MAGIC), -1)
    records = None if frame is None else _records(data, len(MAGIC), frame[1], frame[2])
    return records[0] if records else None


def _holds_frame(path: Path) -> bool:
    """Whether `path` holds a valid frame anywhere (a checksummed one: not by chance)."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    return _resync(memoryview(data), 0, -1) is not None


def other_format(paths: Sequence[Path]) -> tuple[Path, bytes] | None:
    """The first of `paths` whose header is that of another version of this format (a
    newer phi-session's), with that header; None if there is none. Read as damage, its
    records would be skipped, then removed with the segments recovered."""
    for path in paths:
        head = _head(path)
        if head is not None and head != MAGIC and head[:-1] == MAGIC[:-1] and head[-1:].isdigit():
            return path, head
    return None


def _head(path: Path, size: int = len(MAGIC)) -> bytes | None:
    """The first `size` bytes of `path`; None if it cannot be read."""
    try:
        with open(path, "rb") as file:
            return file.read(size)
    except OSError:  # a directory, or unreadable: not ours
        return None


def segment_paths(directory: Path) -> list[tuple[int, Path]]:
    """The segments in `directory` as (number, path), oldest first."""
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


# -- files --------------------------------------------------------------------------------------


def open_new(path: Path) -> int:
    """A descriptor for writing a file that must not exist yet (raw: no buffer to flush later)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)


def write_all(fd: int, parts: list[bytes]) -> None:
    """Write `parts` in order at the descriptor's position, all of them (a short write is continued)."""
    while parts:
        batch = parts[:_IOV_MAX]
        if sys.platform == "win32":
            written = os.write(fd, b"".join(batch))
        else:
            written = os.writev(fd, batch)
        if not written and any(batch):
            raise OSError(errno.EIO, "write made no progress")
        done = 0
        while done < len(batch) and written >= len(batch[done]):
            written -= len(batch[done])
            done += 1
        parts = parts[done:]
        if written:
            parts[0] = parts[0][written:]


def out_of_space(error: BaseException | None) -> bool:
    """Whether `error` is a full disk (or quota): freeing space, not waiting, is the remedy."""
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def fsync_directory(directory: Path) -> None:
    # A created, renamed or removed file survives a power loss only once its directory is synced.
    if sys.platform == "win32":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno != errno.EINVAL:  # EINVAL: the file system cannot sync directories
            raise
    finally:
        os.close(fd)


class DirectoryLock:
    """An exclusive, non-blocking ``flock`` on ``journal.lock``: one writer per directory."""

    def __init__(self, directory: Path) -> None:
        self.path = path = directory / LOCK_FILE
        while True:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            if sys.platform == "win32":
                return
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if self._holds_path():
                    break
            except BlockingIOError:
                os.close(self._fd)
                raise JournalLocked(f"journal {directory} is in use by another writer") from None
            except BaseException:
                os.close(self._fd)
                raise
            # The file was removed (`release(remove=True)`) between our open and our flock:
            # locking it excludes nobody, as the next writer makes and locks a new one.
            os.close(self._fd)
        in_forked_child(self, DirectoryLock._forget_in_child)

    def _holds_path(self) -> bool:
        """Whether the locked descriptor is still the file at `path`."""
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(self._fd)
        return (held.st_ino, held.st_dev) == (named.st_ino, named.st_dev)

    def _forget_in_child(self) -> None:
        """In a forked child: close this process's copy of the descriptor, which would keep
        the directory locked for as long as the child lives; the parent keeps its lock."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)

    @property
    def released(self) -> bool:
        return self._fd < 0

    def release(self, *, remove: bool = False) -> None:
        """Unlock; with `remove`, delete the lock file first, while it is still held (once
        unlocked, another writer may hold it; one that opened it before finds it gone)."""
        if self._fd >= 0:
            if remove:
                try:
                    self.path.unlink(missing_ok=True)
                except OSError as error:  # only a leftover empty file
                    logger.warning("removing %s failed: %s", self.path, error)
            fd, self._fd = self._fd, -1
            try:
                os.close(fd)  # closing the descriptor releases the flock
            except OSError as error:  # the descriptor is gone all the same
                logger.warning("closing %s failed: %s", LOCK_FILE, error)


@dataclass(frozen=True)
class Checkpoint:
    """What a live writer recorded as saved (see `Journal.release`)."""

    stored_below: int = 0
    settled_through: int = -1
    orphans_size: int | None = None
    """The first bytes of ``orphans.jsonl`` that hold every orphan this checkpoint covers;
    what follows was written after it, so recovery derives it again from the segments.
    None: not recorded (a checkpoint of an older version), nothing is cut."""


def read_checkpoint(directory: Path) -> Checkpoint:
    """The checkpoint; `NotAJournal` if ``checkpoint.json`` is not one (`check_ours`)."""
    path = directory / CHECKPOINT_FILE
    try:
        data = json.loads(path.read_bytes())
        size = data.get("orphans_size")
        return Checkpoint(
            int(data["stored_below"]), int(data["settled_through"]), None if size is None else int(size)
        )
    except FileNotFoundError:
        return Checkpoint()
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        # Written atomically, ours is whole: this is another program's, not to be replaced.
        raise NotAJournal(
            f"{directory} is not a phi-session journal: its {CHECKPOINT_FILE} is not a journal "
            f"checkpoint ({type(error).__name__}: {error}); nothing was touched"
        ) from None


def write_checkpoint(directory: Path, checkpoint: Checkpoint) -> None:
    path = directory / CHECKPOINT_FILE
    tmp = directory / CHECKPOINT_TMP
    fields: dict[str, int] = {
        "version": 1,
        "stored_below": checkpoint.stored_below,
        "settled_through": checkpoint.settled_through,
    }
    if checkpoint.orphans_size is not None:
        fields["orphans_size"] = checkpoint.orphans_size
    with open(tmp, "wb") as file:
        file.write(json.dumps(fields).encode())
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    fsync_directory(directory)


def remove_checkpoint_tmp(directory: Path) -> None:
    """Delete a temporary checkpoint a crash left before its rename (the checkpoint is whole;
    `check_ours` found the temporary one ours)."""
    (directory / CHECKPOINT_TMP).unlink(missing_ok=True)


def orphans_size(directory: Path) -> int:
    """The size of ``orphans.jsonl`` in bytes (0 if there is none)."""
    try:
        return (directory / ORPHANS_FILE).stat().st_size
    except FileNotFoundError:
        return 0


def settle_orphans(directory: Path, checkpoint: Checkpoint) -> None:
    """Before appending orphans: make the checkpoint (`checkpoint`, as read) record the size
    ``orphans.jsonl`` has now, so that a recovery after a crash cuts what the append wrote."""
    size = orphans_size(directory)
    if checkpoint.orphans_size != size:
        write_checkpoint(directory, replace(checkpoint, orphans_size=size))


def cut_unsettled_orphans(directory: Path, checkpoint: Checkpoint) -> None:
    """Cut ``orphans.jsonl`` back to what `checkpoint` settled.

    Only while the segments that follow the checkpoint are still there: the orphans
    written after it are derived from them again, and would otherwise be written twice.
    """
    if checkpoint.orphans_size is None or orphans_size(directory) <= checkpoint.orphans_size:
        return
    fd = os.open(directory / ORPHANS_FILE, os.O_WRONLY | getattr(os, "O_BINARY", 0))
    try:
        os.ftruncate(fd, checkpoint.orphans_size)
        os.fsync(fd)
    finally:
        os.close(fd)


def append_orphans(directory: Path, events: Iterable[AgentEvent], records: Iterable[bytes] = ()) -> int:
    """Append events, and `records` that are not events (kept as journaled, one line
    each: `_one_line`), to ``orphans.jsonl`` durably; returns how many.

    Every line appended is whole, so that appending again after a failure is safe: a
    failed append (a full disk) is cut off again, and a line torn by a crash in an
    earlier append is ended first.
    """
    lines = [codec.encode_event(event) + b"\n" for event in events]
    lines += [_one_line(record) + b"\n" for record in records]
    count = len(lines)
    if not count:
        return 0
    path = directory / ORPHANS_FILE
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_BINARY", 0), 0o644)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        if ends_mid_line(fd):  # O_APPEND still writes at the end
            lines.insert(0, b"\n")
        try:
            write_all(fd, lines)
            os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):  # the error raised is the write's
                os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)
    if created:
        fsync_directory(directory)
    return count


def _one_line(record: bytes) -> bytes:
    """`record` on one line: JSON spread over several lines re-encoded compactly (the same
    value); anything else, which no reader could take for an event anyway, byte for byte."""
    if b"\n" not in record and b"\r" not in record:
        return record
    try:
        return msgspec.json.encode(msgspec.json.decode(record))
    except msgspec.MsgspecError:
        return record


# -- reading segments ---------------------------------------------------------------------------


@dataclass
class SegmentDamage:
    """What reading segments had to skip."""

    torn_records: int = 0
    """Incomplete or damaged frames at the end of a segment that lost no record: a write
    cut short by a crash (its records, never acknowledged, were numbered again later)."""
    corrupt_regions: int = 0
    """Damaged or missing stretches that were skipped (anywhere but a torn last write)."""
    records_lost: int = 0
    """Records missing between the records read (from the sequence numbers), not counting
    those the checkpoint marks as saved."""
    bytes_skipped: int = 0
    """Bytes present but unreadable."""


def _frame_at(data: memoryview, pos: int, after: int) -> tuple[int, int, int] | None:
    """(first seq, count, end) of a valid frame at `pos` numbered above `after`, else None."""
    if len(data) - pos < _HEADER.size:
        return None
    marker, length, crc, first, count = _HEADER.unpack_from(data, pos)
    end = pos + _HEADER.size + length
    if (
        marker != FRAME_MARKER
        or end > len(data)
        or first <= after
        or count < 1
        or zlib.crc32(data[pos + _CRC_FROM : end]) != crc
    ):
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
    body = bytes(data[pos + _HEADER.size : end])
    if count == 1:
        return [body]
    records = body.split(b"\n")
    return records if len(records) == count else None  # a CRC-valid frame the writer never made


@dataclass
class _Tail:
    """Unreadable bytes ending a segment: a torn write, or damage if records are missing after."""

    path: Path
    offset: int
    size: int


class SegmentReader:
    """Reads segments in order, oldest first, yielding each record once, numbered upwards.

    Damage is skipped; with `damage` it is counted there and logged (nothing is logged
    without it). Records numbered below `stored_below` are not counted as lost when missing.
    """

    def __init__(self, damage: SegmentDamage | None = None, *, stored_below: int = 0) -> None:
        self.damage = damage
        self.stored_below = stored_below
        self.last = -1
        """The sequence number of the last record read (-1 before the first)."""
        self._tail: _Tail | None = None
        self._damaged = False  # a damaged stretch was counted since the last record

    def read(self, path: Path) -> Iterator[tuple[int, bytes]]:
        """The records of one segment, as (seq, payload)."""
        data = memoryview(path.read_bytes())
        pos = len(MAGIC)
        if bytes(data[:pos]) not in _HEADERS:  # of which kind, `check_ours` saw to
            if _begins_header(bytes(data)):  # created, crashed before its header was written
                if len(data):
                    self._tail_at(path, 0, len(data))
                return
            # A damaged header (the file is ours: `check_ours`): the frames after it are intact.
            found = _resync(data, 0, self.last)
            if found is None:
                self._corrupt(path, 0, len(data), "not a journal segment")
                return
            self._corrupt(path, 0, found, "damaged segment header")
            pos = found
        while pos < len(data):
            frame = _frame_at(data, pos, self.last)
            records = frame and _records(data, pos, frame[1], frame[2])
            if frame is not None and records is not None:
                first, _, pos = frame
                self._reached(first, path)
                yield from enumerate(records, first)
                self.last = first + len(records) - 1
                continue
            found = _resync(data, pos + 1, self.last)
            if found is None:
                self._tail_at(path, pos, len(data) - pos)
                return
            self._corrupt(path, pos, found - pos, "corrupt bytes")
            pos = found

    def finish(self) -> None:
        """Call after the last segment: a tail still open was a write cut short."""
        if self._tail is not None:
            self._torn(self._tail)
            self._tail = None

    def _reached(self, first: int, path: Path) -> None:
        """A valid frame starting at record `first`: count the records missing before it."""
        # Numbering starts at 0, or where the checkpoint says the records still here begin.
        lost = first - max(self.last + 1, self.stored_below)
        tail, self._tail = self._tail, None
        if lost <= 0:
            if tail is not None:
                self._torn(tail)
        elif self.damage is not None:
            if tail is not None:  # the unreadable end of a segment held records: damage
                self._count_region(tail.path, tail.offset, tail.size, "unreadable end")
            elif not self._damaged:  # bytes missing without a trace (a cut at a frame boundary)
                self.damage.corrupt_regions += 1
            self.damage.records_lost += lost
            logger.warning(
                "journal %s: %d records missing before record %d (in %s)", path.parent, lost, first, path.name
            )
        self._damaged = False

    def _tail_at(self, path: Path, offset: int, size: int) -> None:
        if self.damage is not None:
            self.damage.bytes_skipped += size
        self._tail = _Tail(path, offset, size)

    def _torn(self, tail: _Tail) -> None:
        if self.damage is not None:
            self.damage.torn_records += 1
            logger.warning(
                "journal segment %s: torn record at offset %d (%d bytes) ignored",
                tail.path,
                tail.offset,
                tail.size,
            )

    def _corrupt(self, path: Path, offset: int, size: int, what: str) -> None:
        if self.damage is not None:
            self.damage.bytes_skipped += size
            self._count_region(path, offset, size, what)

    def _count_region(self, path: Path, offset: int, size: int, what: str) -> None:
        assert self.damage is not None
        self.damage.corrupt_regions += 1
        self._damaged = True
        logger.warning("journal segment %s: %s %d-%d skipped", path, what, offset, offset + size)


def last_seq(paths: Sequence[Path]) -> int:
    """The highest valid sequence number in these segments (oldest first), or -1."""
    for path in reversed(paths):
        reader = SegmentReader()
        for _ in reader.read(path):
            pass
        if reader.last >= 0:
            return reader.last
    return -1
