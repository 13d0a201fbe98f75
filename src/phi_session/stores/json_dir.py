"""Sessions as JSON files in one directory, the layout phi-core uses (wire-format §11).

Each session lives in ``{dir}/{session_id}.json`` holding exactly
`encode_session(session)`, so phi-core reads these files and phi-session reads
phi-core's. Writers follow phi-core's locking store, so both can share a directory:
an exclusive BSD ``flock`` on the ``{session_id}.json.lock`` sidecar, a temporary
file ``{session_id}.json.tmp.{pid}.{nanos}`` that is fsynced and renamed over the
session file, then an fsync of the directory. Readers take no lock: a rename
never exposes a half-written file.

This is the backend without indexes: `JsonDirStore.query`, `usage_totals` and
`prune` read every file, but remember each file's summary in memory (keyed by
inode, modification time and size) so that only new or changed files are parsed
again. Likewise the last few files read in pages (`load_outline`, `load_loops`: the
viewer) are kept as their outline and each loop's JSON, so that a page decodes only
its own loops, not the whole file again; every read checks the file's key first. And a
save into a file as this store last wrote it decodes only the loops its merge may
change and copies the others' bytes (a conversation saved loop by loop is not decoded
and encoded whole at every loop).
Locking needs ``fcntl`` (POSIX); on Windows the store can read but not write.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, TypeAlias

import msgspec
from msgspec.structs import replace

from .._checks import check_type
from ..codec import decode_loop, decode_session, encode_loop, encode_session
from ..errors import (
    DecodeError,
    InvalidArgument,
    InvalidSessionId,
    PhiSessionError,
    SessionLocked,
    SessionNotFound,
    StoredSessionUnusable,
    StoreError,
)
from ..messages import ZERO_USAGE, Usage
from ..model import LoopRecord, Session
from .base import (
    AsyncTwins,
    ScanSearch,
    SessionSummary,
    UsageRow,
    UsageTotal,
    as_query,
    check_loop_range,
    check_pricer,
    check_writable,
    loop_usage_row,
    loops_a_merge_touches,
    merge_part,
    merge_sessions,
    model_key,
    model_totals,
    outline_loop_starts,
    query_selects,
    save_as_written,
    serving_rows,
    sort_summaries,
    summarize_parts,
    validate_session_id,
)
from .outline import SessionOutline, loop_outline, loop_prompt, session_outline
from .query import GroupBy, PruneCriteria, SessionQuery, check_text, parse_group_by

if sys.platform != "win32":
    import fcntl

if TYPE_CHECKING:
    from ..cost import Pricer

__all__ = [
    "JsonDirStore",
    "delete_session",
    "list_session_ids",
    "load_session",
    "load_sessions_for_agent",
    "save_session",
]

logger = logging.getLogger(__name__)

StrPath: TypeAlias = "str | os.PathLike[str]"

_SUFFIX = ".json"
_LOCK_RETRY_INTERVAL = 0.05  # seconds between lock attempts, as phi-core

# Identity of one version of a file: (inode, mtime in ns, size). Every save renames
# a new inode into place, so a matching key means the cached summary is current.
_FileKey = tuple[int, int, int]


def _file_key(info: os.stat_result) -> _FileKey:
    return (info.st_ino, info.st_mtime_ns, info.st_size)


SUMMARY_CACHE_LIMIT = 10_000
"""Summaries kept in memory for queries; beyond this, files are parsed again."""


@dataclass(frozen=True)
class _Entry:
    """What the store remembers of one version of one session file."""

    key: _FileKey
    summary: SessionSummary
    rows: tuple[UsageRow, ...]
    """Its loops, keyed by model (``provider/model`` or ``"unknown"``)."""


class _LoopFacts(NamedTuple):
    """What a session file's `_Entry` needs of one of its loops, and its id and parent's."""

    loop_id: str
    parent_loop_id: str | None
    listed: tuple[str, str | None, Usage, int]
    """Its status, ``provider/model`` (None: no config), billed usage and turn count."""
    prompt: str | None
    row: UsageRow


def _facts(record: LoopRecord) -> _LoopFacts:
    row = loop_usage_row(record, model_key(record))
    listed = (record.status, None if record.config is None else row.key, row.usage, len(record.turns))
    return _LoopFacts(record.loop_id, record.parent_loop_id, listed, loop_prompt(record), row)


def _entry(key: _FileKey, header: Session, facts: Sequence[_LoopFacts]) -> _Entry:
    """The entry of a file holding the session `header` whose loops' facts are `facts`."""
    prompt = next((fact.prompt for fact in facts if fact.prompt is not None), None)
    summary = summarize_parts(header, len(facts), (fact.listed for fact in facts), prompt)
    return _Entry(key=key, summary=summary, rows=tuple(fact.row for fact in facts))


@dataclass(frozen=True)
class _Written:
    """The last version of a session file this store wrote: where each loop's JSON lies in
    it, and the facts of its loops. The next save into an unchanged file decodes only the
    loops its merge may change (`loops_a_merge_touches`) and copies the others' bytes."""

    key: _FileKey
    header: Session
    """The session as written, without its loops."""
    spans: tuple[tuple[int, int], ...]
    """Where each loop's JSON lies in the file."""
    facts: tuple[_LoopFacts, ...]


WRITTEN_LOOPS_LIMIT = 100_000
"""How many loops the files this store wrote last are remembered for (`_Written`), together."""

# Where a session file's loops go: after the loops key of the session, written empty.
_NO_LOOPS = b'\n  "loops": []'
_LOOP_NEWLINE = b"\n    "  # a loop object's lines in the loops array, two levels in


def _loop_bytes(record: LoopRecord) -> bytes:
    """`record` as a session file holds it: its pretty JSON, indented two levels in."""
    return encode_loop(record).replace(b"\n", _LOOP_NEWLINE)


def _header_of(session_id: str) -> bytes:
    """How a file of `session_id` starts (`encode_session`, as phi-core: its id first)."""
    return b'{\n  "session_id": ' + msgspec.json.encode(session_id) + b","


# A loop in a session file: an object opening after "[" or "," two levels in, closing
# where its closing brace stands two levels in (what it holds is indented deeper, and a
# string holds no newline).
_FIRST_LOOP = b'\n  "loops": [' + _LOOP_NEWLINE
_LOOP_END = b"\n    }"


def _loop_spans(data: bytes, count: int) -> tuple[tuple[int, int], ...] | None:
    """Where each of the `count` loops lies in the session file `data` (`encode_session`'s
    bytes), or None if they cannot be told apart (not seen: then nothing is remembered)."""
    spans: list[tuple[int, int]] = []
    start = data.find(_FIRST_LOOP)
    if count and start == -1:
        return None
    at = start + len(_FIRST_LOOP)
    for index in range(count):
        end = data.find(_LOOP_END, at)
        if end == -1:
            return None
        end += len(_LOOP_END)
        spans.append((at, end))
        following = b"\n  ]" if index == count - 1 else b"," + _LOOP_NEWLINE
        if not data.startswith(following, end):
            return None
        at = end + len(following)
    return tuple(spans)


def _session_file(
    header: Session, loops: Sequence[bytes | memoryview]
) -> tuple[bytes, tuple[tuple[int, int], ...]]:
    """The file of session `header` holding `loops` (`_loop_bytes`, or their bytes in an
    earlier file): `encode_session` of the whole session. And where each loop lies in it."""
    text = encode_session(replace(header, loops=[]))
    at = text.find(_NO_LOOPS)
    if not loops:
        return text, ()
    if at == -1 or text.find(_NO_LOOPS, at + 1) != -1:  # not seen: a key of the session's own
        raise StoreError(f"session {header.session_id!r}: cannot place its loops in its file")
    parts: list[bytes | memoryview] = [text[: at + len(_NO_LOOPS) - 1]]
    spans: list[tuple[int, int]] = []
    offset = len(parts[0])
    for index, loop in enumerate(loops):
        separator = _LOOP_NEWLINE if index == 0 else b"," + _LOOP_NEWLINE
        offset += len(separator)
        spans.append((offset, offset + len(loop)))
        offset += len(loop)
        parts += [separator, loop]
    parts += [b"\n  ]", text[at + len(_NO_LOOPS) :]]
    return b"".join(parts), tuple(spans)


class _Changed(NamedTuple):
    """What a save merged in part changed in the file this store wrote before (`before`)."""

    before: _FileKey
    loops: list[tuple[int, LoopRecord]]
    """The loops changed, and those added after the last, by position."""


PAGED_BYTES_LIMIT = 512 * 2**20
"""How many bytes of session files `JsonDirStore.load_outline` and `load_loops` keep
split, together (the file read last is kept whatever its size); beyond this, the
least recently read are dropped. The viewer pages through a few sessions at a time."""


@dataclass(frozen=True)
class _Paged:
    """One version of one session file, split for partial loads."""

    key: _FileKey
    outline: SessionOutline
    loops: tuple[msgspec.Raw, ...]
    """Each loop's JSON as the file holds it (views of its bytes), decoded only when a
    page asks for the loop."""

    @property
    def size(self) -> int:
        """The file's bytes, which its loops keep alive."""
        return self.key[2]


class _LoopsOnly(msgspec.Struct):
    """A session file read only as far as its loops' JSON (the rest is skipped)."""

    loops: list[msgspec.Raw] = []


_split_loops = msgspec.json.Decoder(_LoopsOnly)


# Kernel file times are coarse (a clock tick, often several ms), so saves in quick
# succession would share a modification time and `list_ids` could not tell which
# came last. Each save therefore stamps its file from a nanosecond clock that never
# repeats or goes back within this process.
_mtime_lock = threading.Lock()
_last_mtime_ns = 0


def _next_mtime_ns() -> int:
    global _last_mtime_ns
    with _mtime_lock:
        _last_mtime_ns = max(time.time_ns(), _last_mtime_ns + 1)
        return _last_mtime_ns


def _session_id_of(file_name: str) -> str | None:
    """The session id a directory entry stores, or None for anything else.

    Only names whose last extension is exactly ``json`` count (sidecars end in
    ``.lock`` or ``.tmp.…``). Names that are not valid UTF-8 or not valid session
    ids cannot be loaded through the store, so they are not listed.
    """
    if not file_name.endswith(_SUFFIX):
        return None
    stem = file_name[: -len(_SUFFIX)]
    try:
        stem.encode("utf-8")  # undecodable bytes arrive as lone surrogates
        return validate_session_id(stem)
    except (UnicodeEncodeError, InvalidSessionId):
        return None


def _describe(error: OSError) -> str:
    return error.strerror or str(error)


# The sidecar locks held now, by saves on any thread. A child forked meanwhile closes its
# copies at once: it would keep the session locked for as long as it lives, and the
# thread that would have unlocked it does not exist there. (A flock is the open file
# description's: the parent's lock holds until the parent closes its descriptor.)
_held_locks: set[int] = set()


def _close_held_locks_in_child() -> None:
    for fd in _held_locks:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_locks.clear()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_close_held_locks_in_child)


class JsonDirStore(ScanSearch, AsyncTwins):
    """A `SessionStore` keeping one phi-core JSON file per session in `directory`.

    The directory is created on the first save. `save` waits at most
    `lock_timeout` seconds for another writer's lock (`SessionLocked` after
    that), merges with the stored session and replaces the file atomically; a
    failed write (full disk, …) raises `StoreError` and leaves the stored file
    as it was. Lock sidecars stay (phi-core never removes one: deleting one that
    another of its writers has open would let two writers lock different files),
    but for one created for an operation refused because the file is not that
    session (`_locked`).

    With `read_only`, the store only reads: `directory` must exist, and `save`,
    `delete` and `prune` raise `StoreError`.

    A directory that does not exist yet holds no session; once it has existed in this
    store's life (at its opening, a listing, a read of a session or a save), its removal is a `StoreError`
    ("no store directory at …"), not an empty store. A save makes it again.
    """

    def __init__(self, directory: StrPath, *, lock_timeout: float = 5.0, read_only: bool = False) -> None:
        if not lock_timeout >= 0:  # also rejects NaN
            raise InvalidArgument(
                f"lock_timeout must be a non-negative number of seconds, got {lock_timeout!r}"
            )
        self._dir = Path(directory)
        self.read_only = read_only
        self._directory_existed = self._dir.is_dir()
        if read_only and not self._directory_existed:
            raise self._no_directory()
        self._lock_timeout = lock_timeout
        self._cache: OrderedDict[str, _Entry] = OrderedDict()  # the oldest dropped in O(1)
        self._paged: OrderedDict[str, _Paged] = OrderedDict()  # least recently read first
        self._written: OrderedDict[str, _Written] = OrderedDict()  # least recently written first
        self._cache_lock = threading.Lock()

    @property
    def directory(self) -> Path:
        return self._dir

    def path_for(self, session_id: str) -> Path:
        """The file that stores `session_id` (which need not exist)."""
        return self._dir / f"{validate_session_id(session_id)}{_SUFFIX}"

    def __repr__(self) -> str:
        return f"JsonDirStore({str(self._dir)!r})"

    def __enter__(self) -> JsonDirStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Forget the cached summaries and split files. The store holds no other resource
        and stays usable."""
        with self._cache_lock:
            self._cache.clear()
            self._paged.clear()
            self._written.clear()

    # -- writing ----------------------------------------------------------------------

    def save(self, session: Session) -> None:
        """Write `session`, merged with the stored one of the same id, atomically.

        A stored file that cannot be read, or that holds another session (on a file
        system that ignores case, ``A.json`` is ``a.json``), is never overwritten: `StoreError`.
        """
        save_as_written([session], self._save_one)

    def _save_one(self, sessions: Sequence[Session]) -> None:
        (session,) = sessions
        session_id = session.session_id
        check_writable(self, f"save session {session_id!r}")
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StoreError(f"cannot create session directory {self._dir}: {_describe(error)}") from error
        self._directory_existed = True
        with self._locked(session_id):
            header, loops, facts, changed = self._merged(session_id, session)
            if loops is None:  # merged whole: `header` holds every loop
                data = encode_session(header)
                spans = _loop_spans(data, len(header.loops))
            else:
                data, spans = _session_file(header, loops)
            key = self._write_atomically(session_id, data)
            if spans is not None:
                written = _Written(key, replace(header, loops=[]), spans, tuple(facts))
                self._keep_written(session_id, written)
                if changed is not None:
                    self._keep_paged(session_id, changed, written, data)
        self._remember(session_id, _entry(key, header, facts))

    def _merged(
        self, session_id: str, session: Session
    ) -> tuple[Session, list[bytes | memoryview] | None, list[_LoopFacts], _Changed | None]:
        """What saving `session` writes: the merged session, None, each loop's facts and
        None; or, when the file is as this store last wrote it, where only the loops the
        merge may change are decoded: the merged header (its loops: those), each loop's
        bytes in the file, each loop's facts and the loops changed or added."""
        try:
            key, data = self._read_bytes(session_id)
        except SessionNotFound:
            return session, None, list(map(_facts, session.loops)), None
        with self._cache_lock:
            written = self._written.get(session_id)
        if written is not None and written.key == key:
            return self._merged_in_part(session_id, written, data, session)
        try:
            stored, _ = self._decode(session_id, key, data)
        except StoredSessionUnusable as error:
            raise StoredSessionUnusable(
                f"not saving session {session_id!r}: the stored file cannot be merged "
                f"({error}); move it aside to save"
            ) from error
        # Merging would make two sessions one, under the wrong id.
        self._check_named(
            session_id,
            stored,
            "not saving",
            " (a copy, or a file system that does not "
            "tell their names apart, e.g. ignoring case); nothing was written",
        )
        merged = merge_sessions(stored, session)
        return merged, None, list(map(_facts, merged.loops)), None

    def _merged_in_part(
        self, session_id: str, written: _Written, data: bytes, session: Session
    ) -> tuple[Session, list[bytes | memoryview], list[_LoopFacts], _Changed]:
        positions = loops_a_merge_touches(
            [(fact.loop_id, fact.parent_loop_id) for fact in written.facts], session
        )
        try:
            records = [decode_loop(data[slice(*written.spans[p])], strict=False) for p in positions]
        except DecodeError as error:  # not seen: this store wrote these bytes
            raise self._corrupt(session_id, error) from error
        kept = dict(zip(positions, records, strict=True))
        merged, pairs = merge_part(
            replace(written.header, loops=records), positions, len(written.spans), session
        )
        view = memoryview(data)
        loops: list[bytes | memoryview] = [view[start:end] for start, end in written.spans]
        facts = list(written.facts)
        changed = _Changed(written.key, [])
        for position, record in pairs:
            if record is kept.get(position):
                continue
            changed.loops.append((position, record))
            if position == len(loops):  # a new loop, after the last
                loops.append(_loop_bytes(record))
                facts.append(_facts(record))
            else:
                loops[position] = _loop_bytes(record)
                facts[position] = _facts(record)
        return merged, loops, facts, changed

    def _keep_paged(self, session_id: str, changed: _Changed, written: _Written, data: bytes) -> None:
        """The split file this store just wrote, from the one it replaced if that is split:
        its outline with the changed loops outlined again. An adapter reads the outline at
        every run of a session (`loop_starts`), which would decode the whole file after
        each save of this store."""
        with self._cache_lock:
            before = self._paged.get(session_id)
        if before is None or before.key != changed.before:
            return
        outlines = list(before.outline.loops)
        for position, record in changed.loops:
            if position == len(outlines):  # a new loop, after the last
                outlines.append(loop_outline(record))
            else:
                outlines[position] = loop_outline(record)
        view = memoryview(data)
        loops = tuple(msgspec.Raw(view[start:end]) for start, end in written.spans)
        paged = _Paged(key=written.key, outline=session_outline(written.header, outlines), loops=loops)
        self._put_paged(session_id, paged, over=before)

    def _keep_written(self, session_id: str, written: _Written) -> None:
        with self._cache_lock:
            self._written.pop(session_id, None)
            self._written[session_id] = written
            held = sum(len(entry.spans) for entry in self._written.values())
            while held > WRITTEN_LOOPS_LIMIT and len(self._written) > 1:  # the least recently written go
                held -= len(self._written.popitem(last=False)[1].spans)

    @contextlib.contextmanager
    def _locked(self, session_id: str) -> Iterator[None]:
        """Hold phi-core's writer lock of `session_id` (the sidecar's flock).

        A sidecar this call created for an operation refused inside the block (the file
        is not that session: `StoredSessionUnusable`; or is gone: `SessionNotFound`) is
        removed again, under the lock: it would only litter the directory beside a file
        that is not a session. A writer that opened it meanwhile finds it unlinked once
        it holds its lock, and takes the lock again on the sidecar now in place.
        """
        if sys.platform == "win32":
            raise StoreError("JsonDirStore needs POSIX flock to write; it is not available on Windows")
        lock_path = self._dir / f"{session_id}{_SUFFIX}.lock"
        deadline = time.monotonic() + self._lock_timeout
        while True:
            fd, created = self._open_sidecar(lock_path)
            _held_locks.add(fd)
            try:
                self._flock(fd, session_id, lock_path, deadline)
                if self._still_in_place(fd, lock_path):
                    try:
                        yield
                    except (StoredSessionUnusable, SessionNotFound):
                        if created:
                            with contextlib.suppress(OSError):
                                os.unlink(lock_path)
                        raise
                    return
            finally:
                _held_locks.discard(fd)
                os.close(fd)  # closing the descriptor releases the lock

    @staticmethod
    def _open_sidecar(lock_path: Path) -> tuple[int, bool]:
        """A descriptor of the lock sidecar, opened or created, and whether this call created it."""
        while True:
            try:
                return os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), True
            except FileExistsError:
                pass
            except OSError as error:  # FileNotFoundError too: the directory is gone
                raise StoreError(f"cannot open lock file {lock_path}: {_describe(error)}") from error
            try:
                return os.open(lock_path, os.O_RDWR | os.O_CLOEXEC), False
            except FileNotFoundError:  # removed between the two opens: create it
                continue
            except OSError as error:
                raise StoreError(f"cannot open lock file {lock_path}: {_describe(error)}") from error

    def _flock(self, fd: int, session_id: str, lock_path: Path, deadline: float) -> None:
        """Take the sidecar's exclusive lock, retrying as phi-core does until `deadline`."""
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SessionLocked(
                        f"session {session_id!r} is locked by another writer ({lock_path}); "
                        f"gave up after {self._lock_timeout:g} s"
                    ) from None
                time.sleep(min(_LOCK_RETRY_INTERVAL, remaining))
            except OSError as error:
                raise StoreError(f"cannot lock {lock_path}: {_describe(error)}") from error

    @staticmethod
    def _still_in_place(fd: int, lock_path: Path) -> bool:
        """Whether the locked sidecar `fd` is still the one at `lock_path` (a refused
        operation removes the sidecar it created: its lock then guards nothing)."""
        try:
            held, current = os.fstat(fd), os.stat(lock_path)
        except FileNotFoundError:
            return False
        except OSError as error:
            raise StoreError(f"cannot lock {lock_path}: {_describe(error)}") from error
        return (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino)

    def _write_atomically(self, session_id: str, data: bytes) -> _FileKey:
        """Replace the session file by `data`; returns the new file's key.

        The caller holds the lock, so the temporary name (pid + time) is unique.
        """
        target = self._dir / f"{session_id}{_SUFFIX}"
        temp = self._dir / f"{session_id}{_SUFFIX}.tmp.{os.getpid()}.{time.time_ns()}"
        fd = -1
        try:
            # Opened inside the try: an interrupt as it returns must not leave the file.
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                stamp = _next_mtime_ns()
                os.utime(fd, ns=(stamp, stamp))
                os.fsync(fd)
                key = _file_key(os.fstat(fd))  # rename keeps inode, mtime and size
            finally:
                os.close(fd)
            os.replace(temp, target)
        except BaseException as error:
            if fd != -1 or not isinstance(error, OSError):  # (a failed open created nothing)
                with contextlib.suppress(OSError):
                    os.unlink(temp)
            if isinstance(error, OSError):
                raise StoreError(f"cannot write {target}: {_describe(error)}") from error
            raise
        self._sync_directory()
        return key

    def _sync_directory(self) -> None:
        # Makes the rename (or unlink) itself durable, not just the file's bytes.
        try:
            fd = os.open(self._dir, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as error:
            if error.errno == errno.EINVAL:  # the file system cannot sync directories
                return
            raise StoreError(f"cannot sync directory {self._dir}: {_describe(error)}") from error

    def delete(self, session_id: str) -> None:
        """Remove the session file, under the writer lock. Its sidecar stays.

        A file that is not that session (one that holds another id, or that neither
        decodes as a session nor starts as that session's file does, such as a project's
        ``package.json``) is never deleted: `StoredSessionUnusable`. A damaged file of
        that session (truncated by a full disk) is.
        """
        validate_session_id(session_id)
        check_writable(self, f"delete session {session_id!r}")
        # Checked first so that deleting a missing session creates no sidecar.
        if not self.path_for(session_id).is_file() or not self._remove(session_id):
            raise self._missing(session_id)
        self._sync_directory()

    def _remove(self, session_id: str, *, only_if: _FileKey | None = None) -> bool:
        """Unlink the session file under the lock; False if it is gone or (with
        `only_if`) was saved again since that version was judged. Without `only_if`,
        the file is read first: `StoredSessionUnusable` unless it is that session."""
        path = self._dir / f"{session_id}{_SUFFIX}"
        with self._locked(session_id):
            if only_if is None:
                self._check_is_session(session_id)
            try:
                if only_if is not None and _file_key(os.stat(path)) != only_if:
                    return False
                os.unlink(path)
            except FileNotFoundError:
                return False
            except OSError as error:
                raise StoreError(f"cannot delete {path}: {_describe(error)}") from error
        self._forget(session_id)
        return True

    def _check_is_session(self, session_id: str) -> None:
        """`StoredSessionUnusable` unless the file of `session_id` holds that session, or
        starts as its file does (damaged); `SessionNotFound` if it is gone."""
        key, data = self._read_bytes(session_id)
        try:
            stored, _ = self._decode(session_id, key, data)
        except StoredSessionUnusable as error:
            if data.startswith(_header_of(session_id)):  # this session, damaged: its owner may remove it
                return
            raise StoredSessionUnusable(f"not deleting session {session_id!r}: {error}") from error
        self._check_named(session_id, stored, "not deleting")

    # -- reading ----------------------------------------------------------------------

    def load(self, session_id: str) -> Session:
        """The stored session. A file that does not parse raises `StoreError` naming it."""
        return self._read(validate_session_id(session_id))[0]

    def load_outline(self, session_id: str) -> SessionOutline:
        """See `SessionStore.load_outline`. Decodes the whole file unless it is unchanged
        since the last partial load."""
        return self._paged_file(validate_session_id(session_id)).outline

    def load_loops(self, session_id: str, start: int, stop: int) -> list[LoopRecord]:
        """See `SessionStore.load_loops`. Decodes those loops only, once the file has been
        split (by the first partial load of this version of it)."""
        check_loop_range(start, stop)
        session_id = validate_session_id(session_id)
        paged = self._paged_file(session_id)
        try:
            return [decode_loop(bytes(raw), strict=False) for raw in paged.loops[start:stop]]
        except DecodeError as error:  # not seen: the whole file decoded, so do its loops
            raise self._corrupt(session_id, error) from error

    def loop_starts(self, session_id: str, start: int) -> list[tuple[str, int]]:
        """See `LoopStarts.loop_starts`. From the outline (`load_outline`): the whole file
        is decoded unless it is unchanged since the last partial load."""
        return outline_loop_starts(self, session_id, start)

    def _paged_file(self, session_id: str) -> _Paged:
        """The split current version of the session file, from the cache if its key matches."""
        path = self._dir / f"{session_id}{_SUFFIX}"
        try:
            key = _file_key(os.stat(path))
        except FileNotFoundError:
            raise self._missing(session_id) from None
        except OSError as error:
            raise StoreError(f"cannot read session file {path}: {_describe(error)}") from error
        self._directory_existed = True  # another store may have made it since this one opened
        with self._cache_lock:
            paged = self._paged.get(session_id)
            if paged is not None and paged.key == key:
                self._paged.move_to_end(session_id)
                return paged
        key, data = self._read_bytes(session_id)
        session, _ = self._decode(session_id, key, data)
        self._check_named(session_id, session, "not loading")
        loops = tuple(_split_loops.decode(data).loops)
        if len(loops) != len(session.loops):  # both read one "loops" array: never, but pages would shift
            raise self._corrupt(session_id, "its loops do not split apart")
        paged = _Paged(key=key, outline=session_outline(session), loops=loops)
        self._put_paged(session_id, paged)
        return paged

    def _put_paged(self, session_id: str, paged: _Paged, *, over: _Paged | None = None) -> None:
        """Keep `paged` as the most recently read (with `over`: only if that is still kept)."""
        with self._cache_lock:
            if over is not None and self._paged.get(session_id) is not over:
                return
            self._paged.pop(session_id, None)
            self._paged[session_id] = paged
            kept = sum(entry.size for entry in self._paged.values())
            while kept > PAGED_BYTES_LIMIT and len(self._paged) > 1:  # drop the least recently read
                kept -= self._paged.popitem(last=False)[1].size

    def _read(self, session_id: str) -> tuple[Session, _Entry]:
        """The session stored as `session_id` (its summary remembered even if the file is
        not that session's: `_entries` then skips it without reading it again)."""
        session, entry = self._decode(session_id, *self._read_bytes(session_id))
        self._check_named(session_id, session, "not loading")
        return session, entry

    def _read_bytes(self, session_id: str) -> tuple[_FileKey, bytes]:
        path = self._dir / f"{session_id}{_SUFFIX}"
        try:
            with open(path, "rb") as file:
                self._directory_existed = True  # as in `_paged_file`
                # Key and bytes come from one open file, so they describe one version.
                return _file_key(os.fstat(file.fileno())), file.read()
        except FileNotFoundError:
            raise self._missing(session_id) from None
        except OSError as error:
            raise StoreError(f"cannot read session file {path}: {_describe(error)}") from error

    def _decode(self, session_id: str, key: _FileKey, data: bytes) -> tuple[Session, _Entry]:
        """The session `data` holds, its summary remembered under `key`."""
        try:
            session = decode_session(data, strict=False)  # what any writer of ours wrote
        except DecodeError as error:
            raise self._corrupt(session_id, error) from error
        entry = _entry(key, session, list(map(_facts, session.loops)))
        self._remember(session_id, entry)
        return session, entry

    def _check_named(self, session_id: str, stored: Session, refused: str, why: str = "") -> None:
        """`StoredSessionUnusable` unless `stored`, read from the file of `session_id`, is that
        session. A session file is named ``{session_id}.json`` (wire-format §11): a file named
        otherwise (a copy such as ``backup.json``; on a file system that ignores case, ``A.json``
        is ``a.json``) is no session of its own, and is never written over or deleted."""
        if stored.session_id != session_id:
            raise StoredSessionUnusable(
                f"{refused} session {session_id!r}: its file {self.path_for(session_id)} holds "
                f"session {stored.session_id!r}{why}"
            )

    def _corrupt(self, session_id: str, reason: object) -> StoredSessionUnusable:
        return StoredSessionUnusable(f"corrupt session file {self.path_for(session_id)}: {reason}")

    def _remember(self, session_id: str, entry: _Entry) -> None:
        with self._cache_lock:
            self._cache.pop(session_id, None)
            if len(self._cache) >= SUMMARY_CACHE_LIMIT:  # bounded: evict the oldest entry
                self._cache.popitem(last=False)
            self._cache[session_id] = entry

    def _forget(self, session_id: str) -> None:
        with self._cache_lock:
            self._cache.pop(session_id, None)
            self._paged.pop(session_id, None)
            self._written.pop(session_id, None)

    def _no_directory(self) -> StoreError:
        return StoreError(f"no store directory at {self._dir}")

    def _missing(self, session_id: str) -> PhiSessionError:
        """The error for a session file that is not there: `SessionNotFound`, unless the
        whole directory is gone after it existed."""
        if self._directory_existed and not self._dir.is_dir():
            return self._no_directory()
        return SessionNotFound(f"no session {session_id!r} in {self._dir}")

    def _scan(self) -> list[tuple[str, os.stat_result]]:
        """Session files with their metadata, most recently saved first (ties: by id)."""
        try:
            entries = os.scandir(self._dir)
        except FileNotFoundError:
            if self._directory_existed:
                raise self._no_directory() from None
            return []  # not made yet: it is made on the first save
        except OSError as error:
            raise StoreError(f"cannot list session directory {self._dir}: {_describe(error)}") from error
        self._directory_existed = True
        found: list[tuple[str, os.stat_result]] = []
        with entries:
            for dir_entry in entries:
                session_id = _session_id_of(dir_entry.name)
                if session_id is None:
                    continue
                try:
                    info = dir_entry.stat()
                except OSError:  # vanished meanwhile, or a dangling link
                    continue
                if stat.S_ISREG(info.st_mode):
                    found.append((session_id, info))
        found.sort(key=lambda item: (-item[1].st_mtime_ns, item[0]))
        return found

    def list_ids(self) -> list[str]:
        """Ids of the stored sessions, most recently saved first (by file time, ties by id)."""
        return [session_id for session_id, _ in self._scan()]

    def list_for_agent(self, agent_id: str) -> list[Session]:
        """The sessions of `agent_id`, most recently saved first.

        Unlike phi-core, an unreadable file is skipped with a logged warning.
        Files whose cached summary names another agent are not parsed again.
        """
        check_type("agent_id", agent_id, str)
        check_text("agent_id", agent_id)
        sessions: list[Session] = []
        for session_id, info in self._scan():
            with self._cache_lock:
                cached = self._cache.get(session_id)
            if (
                cached is not None
                and cached.key == _file_key(info)
                and (cached.summary.agent_id != agent_id or cached.summary.session_id != session_id)
            ):
                continue  # another agent's, or not that session's file (warned of as it was read)
            try:
                session, _ = self._read(session_id)
            except SessionNotFound:  # deleted since the scan
                continue
            except StoreError as error:
                logger.warning("skipping unreadable session %r: %s", session_id, error)
                continue
            if session.agent_id == agent_id:
                sessions.append(session)
        return sessions

    def _entries(self) -> list[tuple[str, _Entry]]:
        """A current entry for every readable session file holding the session it is named
        after (a file named otherwise is warned of once per version); drops stale cache entries."""
        files = self._scan()
        with self._cache_lock:
            present = {session_id for session_id, _ in files}
            for stale in [sid for sid in self._cache if sid not in present]:
                del self._cache[stale]
            cached = dict(self._cache)
        entries: list[tuple[str, _Entry]] = []
        for session_id, info in files:
            entry = cached.get(session_id)
            if entry is None or entry.key != _file_key(info):
                try:
                    _, entry = self._read(session_id)
                except SessionNotFound:
                    continue
                except StoreError as error:
                    logger.warning("skipping unreadable session %r: %s", session_id, error)
                    continue
            elif entry.summary.session_id != session_id:  # not that session's file: warned of as it was read
                continue
            entries.append((session_id, entry))
        return entries

    def query(self, query: SessionQuery | None = None) -> list[SessionSummary]:
        """Summaries matching `query` (see `SessionQuery`), from the cached summaries."""
        query = as_query(query)
        after = query.after
        rows = [
            entry.summary
            for _, entry in self._entries()
            if query_selects(query, entry.summary, ((row.provider, row.model) for row in entry.rows))
            and (after is None or after.passed(entry.summary))
        ]
        sort_summaries(rows, query.order)
        return rows if query.limit is None else rows[: query.limit]

    def usage_totals(self, group_by: GroupBy = "agent", *, pricer: Pricer | None = None) -> list[UsageTotal]:
        """Usage (and cost, with a pricer) per agent, model or UTC day, sorted by key (see
        `SessionStore.usage_totals`), from the cached summaries."""
        group_by = parse_group_by(group_by)
        check_pricer(pricer)
        entries = self._entries()
        if group_by == "model":
            served = [
                (session_id, part)
                for session_id, entry in entries
                for row in entry.rows
                for part in serving_rows(row)
            ]
            totals = model_totals(served)
            return totals if pricer is None else pricer.price_totals(totals, [row for _, row in served])
        groups: dict[str, tuple[int, int, Usage]] = {}
        rows: list[UsageRow] = []
        for _, entry in entries:
            summary = entry.summary
            key = summary.agent_id if group_by == "agent" else str(summary.created_at).partition("T")[0]
            if pricer is not None:
                rows.extend(row._replace(key=key) for row in entry.rows)
            sessions, loops, usage = groups.get(key, (0, 0, ZERO_USAGE))
            groups[key] = (sessions + 1, loops + summary.loop_count, usage + summary.usage)
        totals = [
            UsageTotal(key=key, sessions=sessions, loops=loops, usage=usage)
            for key, (sessions, loops, usage) in sorted(groups.items())
        ]
        return totals if pricer is None else pricer.price_totals(totals, rows)

    def prune(self, criteria: PruneCriteria) -> int:
        """Delete whole session files (see `PruneCriteria`); returns how many.

        A file saved again after it was judged is left alone.
        """
        check_type("criteria", criteria, PruneCriteria)
        check_writable(self, "prune")
        agent_id, keep_last, older_than = criteria.agent_id, criteria.keep_last, criteria.older_than
        candidates = [
            (session_id, entry)
            for session_id, entry in self._entries()
            if agent_id is None or entry.summary.agent_id == agent_id
        ]
        candidates.sort(key=lambda item: (-item[1].summary.last_active_at.ns, item[0]))
        if keep_last is not None:
            candidates = candidates[keep_last:]
        if older_than is not None:
            candidates = [c for c in candidates if c[1].summary.last_active_at < older_than]
        removed = sum(self._remove(session_id, only_if=entry.key) for session_id, entry in candidates)
        if removed:
            self._sync_directory()
        return removed


# -- phi-core's function names ----------------------------------------------------------
# Same names and arguments as phi-core's plain functions, but every one goes through
# JsonDirStore: saves are locked, atomic and merge with the stored session (phi-core
# truncates and rewrites in place), and ids are validated.


def save_session(session: Session, directory: StrPath) -> Path:
    """Save `session` in `directory` (see `JsonDirStore.save`); returns the file's path."""
    store = JsonDirStore(directory)
    store.save(session)
    return store.path_for(session.session_id)


def load_session(session_id: str, directory: StrPath) -> Session:
    """Load a session from `directory`; `SessionNotFound` if it is not there."""
    return JsonDirStore(directory).load(session_id)


def list_session_ids(directory: StrPath) -> list[str]:
    """Ids of the sessions in `directory`, most recently saved first; [] without the directory."""
    return JsonDirStore(directory).list_ids()


def load_sessions_for_agent(agent_id: str, directory: StrPath) -> list[Session]:
    """Every session of `agent_id` in `directory`; unreadable files are skipped with a warning."""
    return JsonDirStore(directory).list_for_agent(agent_id)


def delete_session(session_id: str, directory: StrPath) -> None:
    """Delete a session file from `directory`; `SessionNotFound` if it is not there."""
    JsonDirStore(directory).delete(session_id)
