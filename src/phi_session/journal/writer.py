"""The journal writer: `Journal`, one thread-safe appender of records to segments.

Locks, in the only order in which a thread may hold them together (a thread holding
one takes only locks further down this list):

1. ``_close_lock``: `close`, one call at a time.
2. ``_release_lock``: `release` and `close` (the checkpoint, removing segments).
3. ``_sync_lock``: the active segment's descriptor: writing frames, rotating to a new
   segment, fsync, closing descriptors. Under ``"os"`` and ``"always"`` an append writes
   through under it.
4. ``_lock``: numbering and queueing records, the list of segments and leftovers, the
   closed and failed state. Held only for bookkeeping, never across I/O.
5. ``_acked_cond``: the waiters for the acknowledged sequence number (which only
   writers, under ``_sync_lock``, change).

A `JournaledRecorder` appends under the recorder's lock, which is thus taken before
all of these; nothing here calls back into a recorder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeAlias, get_args

from .. import codec
from .._checks import check_seconds, deadline_of, seconds_left, wait_limit
from .._daemon import DaemonThread
from .._exit import ExitHook
from .._fork import in_forked_child
from ..errors import InvalidArgument, JournalLocked, PhiSessionError, StoreError, UsedAfterFork
from ..events import AgentEvent
from .format import (
    CHECKPOINT_FILE,
    FRAME_OVERHEAD,
    MAGIC,
    MAX_FRAME,
    RECORDER,
    Checkpoint,
    DirectoryLock,
    append_orphans,
    check_ours,
    cut_unsettled_orphans,
    frame_header,
    fsync_directory,
    last_seq,
    open_new,
    orphans_size,
    read_checkpoint,
    remove_checkpoint_tmp,
    segment_path,
    segment_paths,
    settle_orphans,
    write_all,
    write_checkpoint,
)

logger = logging.getLogger(__name__)

Durability = Literal["always", "interval", "os"]
StrPath: TypeAlias = "str | os.PathLike[str]"

# Records waiting for the flusher: beyond the first bound it is woken early, beyond the
# second the appender writes them itself (in `commit`), so memory stays bounded.
_WAKE_PENDING_BYTES = 4 << 20
_MAX_PENDING_BYTES = 16 << 20


def as_bytes(data: bytes | bytearray | memoryview | str) -> bytes:
    return data.encode() if isinstance(data, str) else bytes(data)


@dataclass
class _Segment:
    number: int
    path: Path
    first_seq: int


class Journal:
    """An append-only, segmented write-ahead log of events. Thread-safe.

    Opening takes an exclusive lock on the directory (`JournalLocked` if another
    writer holds it); a directory whose ``NNNN.wal`` files are not this journal's
    (`format.check_ours`) is refused (`NotAJournal`) before anything in it is touched.
    Segments found there belong to an earlier run (`leftover_segments`): they are never
    appended to; `recover` replays and removes them.
    `close` (or leaving a ``with`` block; at the latest, an exit hook at interpreter
    exit) writes and fsyncs everything. With ``close_at_exit=False`` there is no exit
    hook: the object that owns the journal closes it, from its own hook if need be.

    I/O failures raise `StoreError`; after a failed write or fsync the journal refuses
    further appends (the kernel may have dropped the unsynced data, so a retry would lie).

    A process forked from the one that opened it must not write to it (`UsedAfterFork`):
    the parent goes on appending to the same segment. The child lets go of the directory
    lock at once (the parent keeps it); its `close` does nothing.
    """

    _kind = RECORDER  # what its records are (a subclass journals others: `format.Kind`)

    def __init__(
        self,
        directory: StrPath,
        *,
        durability: Durability = "interval",
        interval_ms: float = 50,
        segment_bytes: int = 64 << 20,
        close_at_exit: bool = True,
    ) -> None:
        if durability not in get_args(Durability):
            raise InvalidArgument(f"durability must be one of {get_args(Durability)}, got {durability!r}")
        interval = check_seconds("interval_ms", interval_ms, positive=True, finite=True, unit="milliseconds")
        if segment_bytes <= len(MAGIC):
            raise InvalidArgument(f"segment_bytes must exceed {len(MAGIC)}, got {segment_bytes!r}")
        self.directory = Path(directory)
        self.durability: Durability = durability
        self.interval = interval / 1000
        self.segment_bytes = segment_bytes
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            # Before the lock file is made: check_ours takes one for an earlier journal's.
            check_ours(self.directory, [path for _, path in segment_paths(self.directory)], self._kind)
            self._dir_lock = DirectoryLock(self.directory)
        except OSError as error:
            raise StoreError(f"cannot open journal {self.directory}: {error}") from error
        # See the module docstring for what each lock guards and their order.
        self._new_locks()
        self._opened_by = os.getpid()
        self._in_child = False  # a forked child's copy of the journal (`_give_up_in_child`)
        self._failure: BaseException | None = None
        self._claimed = False  # a recorder writes through it (`claim`)
        self._on_close: Callable[[], object] | None = None  # its `claim`, called once by `close`
        self._closed = False
        self._writable = True  # neither closed nor failed
        # Written by `append` itself: a failed write refuses the record before a recorder
        # applies the event (`JournaledRecorder`). Under "always", `commit` then fsyncs,
        # outside the recorder's lock, so that threads share an fsync.
        self._write_through = durability != "interval"
        self._acked_on_write = durability == "os"
        self._pending: list[bytes] = []  # records appended, not yet written
        self._singles: list[int] = []  # positions in _pending of records holding a newline
        self._pending_bytes = 0
        # What a sync took from `_pending` and has not yet written whole: a Ctrl-C wherever
        # it lands leaves it here, for the next sync to write (`_put_back`).
        self._in_flight: tuple[list[bytes], list[int], int] | None = None
        self._segments: list[_Segment] = []
        self._fd: int  # the active segment's (`_open_segment`), at `_size`
        self._size: int
        self._segment_number: int
        try:
            existing = segment_paths(self.directory)  # as they are with no other writer
            self._leftovers = [path for _, path in existing]
            earlier = read_checkpoint(self.directory)
            remove_checkpoint_tmp(self.directory)
            if self._leftovers:
                # Orphans the earlier run wrote after its last checkpoint: recovering the
                # leftovers writes them again. Cut now, before this run appends its own.
                cut_unsettled_orphans(self.directory, earlier)
            # Until the checkpoint records the size orphans.jsonl has, the first orphans are
            # appended after recording it (`write_orphans`).
            self._orphans_settled = earlier.orphans_size == orphans_size(self.directory)
            # Sequence numbers keep rising across runs, so an old checkpoint never covers new records.
            self._next_seq = max(
                last_seq(self._leftovers) + 1, earlier.stored_below, earlier.settled_through + 1
            )
            self._acked = self._synced = self._written = self._next_seq - 1
            # What this run promised (`release`). Records below its first are the leftovers',
            # which `release` refuses to cover until they are recovered, that is saved.
            self._checkpoint = Checkpoint(self._next_seq, self._next_seq - 1)
            self._open_segment(existing[-1][0] + 1 if existing else 0, self._next_seq)
        except OSError as error:
            self._dir_lock.release()
            raise StoreError(f"cannot open journal {self.directory}: {error}") from error
        self._stopping = False
        self._wake = threading.Event()
        self._flusher: DaemonThread | None = None
        if durability == "interval":
            self._flusher = DaemonThread(self._flush_loop, f"phi-session journal flusher {self.directory}")
        # At interpreter exit the flusher, a daemon thread, stops wherever it is: a journal
        # still open is closed first, so that what waits for it is written.
        self._exit_hook = ExitHook(self, self.close, self._unwritten_at_exit) if close_at_exit else None
        in_forked_child(self, Journal._give_up_in_child)

    def _new_locks(self) -> None:
        self._close_lock = threading.Lock()
        self._release_lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._lock = threading.Lock()
        self._acked_cond = threading.Condition(threading.Lock())
        self._waiting = 0  # threads in `wait_acknowledged`

    def _give_up_in_child(self) -> None:
        """In a forked child: the parent goes on appending to the active segment, so a
        record written here would share its numbers and tear its frames. Refuse every
        write, and close this process's copy of the segment's descriptor."""
        self._new_locks()  # a parent thread may have held them; it does not exist here
        if self._closed:
            return
        self._in_child = True
        self._closed = True  # `close` has nothing of this process's to do
        self._writable = False
        self._pending, self._singles, self._pending_bytes = [], [], 0  # the parent writes them
        self._in_flight = None
        self._flusher = None
        with contextlib.suppress(OSError):
            os.close(self._fd)

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
        return self._acked

    @property
    def leftover_segments(self) -> list[Path]:
        """Segments an earlier run left behind, not yet recovered (oldest first)."""
        with self._lock:
            return list(self._leftovers)

    def forget_leftovers(self, recovered: Iterable[Path]) -> None:
        """Note that `recover` saved and removed these leftover segments."""
        gone = set(recovered)
        with self._lock:
            self._leftovers = [path for path in self._leftovers if path not in gone]

    def segments(self) -> list[Path]:
        """The segments this journal wrote that still exist, oldest first (the last is active)."""
        with self._lock:
            return [segment.path for segment in self._segments]

    @property
    def closed(self) -> bool:
        return self._closed

    def claim(self, on_close: Callable[[], object]) -> None:
        """Make the caller the one recorder that writes through this journal; `JournalLocked`
        if another already does (its `release` would remove segments holding the caller's events).
        `close` calls `on_close()`: the recorder's hook into the journal goes with it."""
        with self._lock:
            if self._claimed:
                raise JournalLocked(f"journal {self.directory} is in use by another recorder")
            self._check_writable()  # closed: `on_close` would never be called
            self._claimed = True
            self._on_close = on_close

    # -- appending ----------------------------------------------------------------------------

    def append(self, event: AgentEvent, *, commit: bool = True) -> int:
        """Journal one event; returns its sequence number.

        With ``commit=False`` an ``"always"`` journal returns before the fsync; call
        `commit` with the number (this lets several threads share one fsync).
        `TypeError` for what is not an event.
        """
        if type(event) not in codec.EVENT_CLASSES:
            raise codec.not_an_event("append()", event)
        return self.append_json(codec.encode_event(event), commit=commit)

    def append_json(self, data: bytes | str, *, commit: bool = True) -> int:
        """Journal one event given as a phi-core JSON line; returns its sequence number.

        The line is stored as given, not validated: `recover` counts a record that does
        not decode (as `SessionRecorder.on_json` rejected it live) and keeps it in
        ``orphans.jsonl``.

        This is the hot path, a list append: frames are built, checksummed and written
        once per flush by whoever syncs (flusher, `commit`, `close`), outside `_lock`.
        Under ``"os"`` and ``"always"`` the record is written through before returning
        (a failure raises `StoreError`, the record not journaled); ``"always"`` fsyncs in `commit`.
        """
        payload = data if type(data) is bytes else as_bytes(data)
        if self._write_through:
            with self._sync_lock:
                first = self._next_seq  # here records are numbered under `_sync_lock` only
                try:
                    with self._lock:
                        payload, seq = self._number(payload)
                    self._write_or_fail(((payload, seq, 1),), "append failed")
                except BaseException:  # not journaled (Ctrl-C, a failure): no gap in the numbers
                    if self._written < first:  # written whole, its number stays taken
                        with self._lock:
                            self._next_seq = first
                    raise
                if self._acked_on_write:
                    self._set_acked(seq)
        else:
            with self._lock:
                seq = self._queue(payload)
            if self._pending_bytes >= _WAKE_PENDING_BYTES:
                self._wake.set()
        if commit:
            self.commit(seq)
        return seq

    def _number(self, payload: bytes) -> tuple[bytes, int]:
        """The record to write for `payload` and its sequence number (holding `_lock`)."""
        if not self._writable:
            self._check_writable()
        if 10 in payload:  # trailing newlines (a line read from a file) mean nothing in JSON
            payload = payload.rstrip(b"\r\n")
        if len(payload) > MAX_FRAME:
            raise ValueError(f"event of {len(payload)} bytes exceeds the journal's frame limit")
        seq = self._next_seq
        self._next_seq = seq + 1
        return payload, seq

    def _queue(self, payload: bytes) -> int:
        """Number `payload` and queue it for the next sync (holding `_lock`); its number.
        Interrupted (Ctrl-C) or refused, nothing of it is left: no gap in the numbers."""
        first, queued, singles, size = (
            self._next_seq,
            len(self._pending),
            len(self._singles),
            self._pending_bytes,
        )
        try:
            payload, seq = self._number(payload)
            if 10 in payload:  # a newline inside: it cannot share a newline-joined frame
                self._singles.append(queued)
            self._pending.append(payload)
            self._pending_bytes = size + len(payload)
            return seq
        except BaseException:
            del self._pending[queued:], self._singles[singles:]
            self._next_seq, self._pending_bytes = first, size
            raise

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
            raise InvalidArgument(f"sequence number {seq} was never appended (last: {self.last_seq})")
        deadline = deadline_of("timeout", timeout)
        with self._acked_cond:
            self._waiting += 1
            try:
                while self._acked < seq:
                    if self._failure is not None:
                        raise StoreError(f"journal {self.directory} failed: {self._failure}")
                    if self._closed:
                        return False
                    remaining = seconds_left(deadline)
                    if remaining == 0:
                        return False
                    self._acked_cond.wait(remaining)
                return True
            finally:
                self._waiting -= 1

    def orphans_size(self) -> int:
        """The size of ``orphans.jsonl`` in bytes, for `release`."""
        return orphans_size(self.directory)

    def write_orphans(self, events: Iterable[AgentEvent]) -> int:
        """Durably append events that no loop claimed to ``orphans.jsonl``; returns how many."""
        if self._in_child:
            raise self._used_after_fork()
        try:
            if not self._orphans_settled:
                with self._release_lock:  # `release` writes the checkpoint too
                    settle_orphans(self.directory, read_checkpoint(self.directory))
                    self._orphans_settled = True
            return append_orphans(self.directory, events)
        except OSError as error:
            raise StoreError(f"journal {self.directory}: cannot write orphans: {error}") from error

    # -- retiring segments -------------------------------------------------------------------

    def release(self, stored_below: int, *, settled_through: int, orphans_settled: int | None = None) -> int:
        """Record what is safely stored; remove the segments that hold nothing else.

        The caller promises: (1) every event with a sequence number below
        `stored_below` is saved in the store, was written to ``orphans.jsonl``, or is
        one the recorder never keeps; (2) every event numbered up to
        `settled_through` that belongs to a loop (or ends a parallel group) started
        below `stored_below` is saved or written to ``orphans.jsonl``. `recover` then skips those events.
        `orphans_settled` is the size `orphans_size` returned once those orphans were
        written (default: the size now); a recovery cuts what follows, which it writes again.

        A segment is removed once all its frames are below `stored_below` (never the
        active one). Raises `PhiSessionError` while leftover segments of an earlier run
        exist: the checkpoint would wrongly cover them; `recover` them first.
        Returns how many segments were removed.
        """
        settled_size = self.orphans_size() if orphans_settled is None else orphans_settled
        with self._release_lock:
            with self._lock:
                self._check_writable()
                if self._leftovers:
                    raise PhiSessionError(
                        f"journal {self.directory} holds segments of an earlier run; recover them first"
                    )
                checkpoint = Checkpoint(
                    max(self._checkpoint.stored_below, min(stored_below, self._next_seq)),
                    max(self._checkpoint.settled_through, min(settled_through, self._next_seq - 1)),
                    max(self._checkpoint.orphans_size or 0, settled_size),
                )
                covered = [s for s in self._segments[:-1] if self._end_of(s) <= checkpoint.stored_below]
            try:
                if checkpoint != self._checkpoint:
                    write_checkpoint(self.directory, checkpoint)
                    self._checkpoint = checkpoint
                    self._orphans_settled = True
                return self._remove(covered)
            except OSError as error:
                raise StoreError(f"journal {self.directory}: release failed: {error}") from error

    def _remove(self, segments: list[_Segment]) -> int:
        """Delete retired segments (holding `_release_lock`)."""
        for segment in segments:
            segment.path.unlink(missing_ok=True)
        if segments:
            fsync_directory(self.directory)
            with self._lock:
                self._segments = [s for s in self._segments if s not in segments]
        return len(segments)

    def _end_of(self, segment: _Segment) -> int:
        """One past the last sequence number `segment` can hold (holding `_lock`)."""
        index = self._segments.index(segment)
        if index + 1 < len(self._segments):
            return self._segments[index + 1].first_seq
        return self._next_seq

    # -- writing (holding `_sync_lock`) -------------------------------------------------------

    def _take_pending(self) -> tuple[list[bytes], list[int], int]:
        """Hand over the queued records, their newline positions, first number, keeping them
        in `_in_flight` until written (holding `_sync_lock` and `_lock`)."""
        taken = self._pending, self._singles, self._next_seq - len(self._pending)
        # One line: a Ctrl-C lands before it or after it, never with the records in both places.
        self._in_flight, self._pending, self._singles, self._pending_bytes = taken, [], [], 0
        return taken

    def _put_back(self) -> None:
        """Queue again, ahead of those appended since, the records an interrupted sync took
        (`_in_flight`) and did not write whole (holding `_sync_lock`)."""
        with self._lock:
            if self._in_flight is None:
                return
            records, singles, first = self._in_flight
            done = max(self._written + 1 - first, 0)
            kept = records[done:]
            moved = [i - done for i in singles if i >= done] + [i + len(kept) for i in self._singles]
            self._in_flight, self._pending, self._singles, self._pending_bytes = (
                None,
                kept + self._pending,
                moved,
                self._pending_bytes + sum(map(len, kept)),
            )

    def _write_or_fail(self, frames: Iterable[tuple[bytes, int, int]], what: str) -> None:
        try:
            self._write_frames(frames)
        except OSError as error:
            raise self._fail(error, what) from error

    def _write_frames(self, frames: Iterable[tuple[bytes, int, int]]) -> None:
        """Write frames (data, first seq, count) to the active segment, rotating when it is full.

        `_size` and `_written` follow each write once it is whole. Interrupted (Ctrl-C),
        wherever it was, the segment is cut back to them: the records after `_written`
        are written again after its last whole frame, never torn nor twice. A full segment
        is rotated out before the next frame, not after the one that filled it: a Ctrl-C
        in the rotation cuts short the write of records not yet written, never one done.
        """
        parts: list[bytes] = []
        size, last = self._size, self._written
        try:
            for data, first, count in frames:
                if size >= self.segment_bytes:
                    write_all(self._fd, parts)
                    parts = []
                    self._size, self._written = size, last
                    self._rotate(first)
                    size = self._size
                parts += (frame_header(data, first, count), data)
                size += FRAME_OVERHEAD + len(data)
                last = first + count - 1
            write_all(self._fd, parts)
            self._size, self._written = size, last
        except OSError:
            raise  # the journal fails (`_write_or_fail`): a torn last frame is recovery's to skip
        except BaseException:
            self._cut_back()
            raise

    def _cut_back(self) -> None:
        """Drop what follows the active segment's last whole frame (a write cut short)."""
        try:
            os.ftruncate(self._fd, self._size)
            os.lseek(self._fd, self._size, os.SEEK_SET)
        except OSError as error:
            self._fail(error, "cutting back an interrupted write failed")

    def _open_segment(self, number: int, first_seq: int) -> None:
        """Create segment `number`, starting at record `first_seq`, and make it the active one.
        Cut short (a failure, Ctrl-C), it leaves no trace, or a file the next try removes."""
        path = segment_path(self.directory, number)
        fd = None
        try:
            fd = _create(path)
            write_all(fd, [self._kind.magic])
            if self.durability != "os":
                os.fsync(fd)
                fsync_directory(self.directory)
            with self._lock:  # one statement: a Ctrl-C lands before it (nothing made) or after it
                self._segments, self._fd, self._size, self._segment_number = (
                    [*self._segments, _Segment(number, path, first_seq)],
                    fd,
                    len(MAGIC),
                    number,
                )
        except BaseException:
            with contextlib.suppress(OSError):
                # Ours unless already active (a Ctrl-C handled as the switch's lock let go); a
                # file made before `fd` was, holding no frame, `_create` removes next time.
                if fd is not None and getattr(self, "_fd", None) != fd:  # none yet: the first
                    os.close(fd)
                    path.unlink(missing_ok=True)
            raise

    def _rotate(self, next_seq: int) -> None:
        """Close the full segment, durably, and start the next one at `next_seq`."""
        os.fsync(self._fd)  # so that `_sync` need only fsync the active segment
        self._synced = next_seq - 1
        self._set_acked(next_seq - 1)
        old = self._fd
        self._open_segment(self._segment_number + 1, next_seq)
        try:
            os.close(old)
        except OSError as error:  # fsynced above: nothing is lost, and the descriptor is gone
            logger.warning("journal %s: closing a full segment failed: %s", self.directory, error)

    def _sync(self) -> None:
        """Write what is queued, fsync, acknowledge. Frames are built and written under
        `_sync_lock` only, so appenders are not held up by checksums and I/O."""
        with self._sync_lock:
            try:
                self._put_back()  # what a sync a Ctrl-C cut short took
                with self._lock:
                    self._check_writable()
                    taken = self._take_pending()
                    target = self._next_seq - 1  # everything up to here is written once `taken` is
                self._write_or_fail(_frames(*taken), "write failed")
                self._in_flight = None
            except BaseException:  # Ctrl-C: the next sync writes them (a failed journal, none)
                self._put_back()
                raise
            if target > self._synced:  # another thread's fsync may already cover it
                try:
                    os.fsync(self._fd)
                except OSError as error:
                    raise self._fail(error, "fsync failed") from error
                self._synced = target
                self._set_acked(target)

    def _set_acked(self, seq: int) -> None:
        # Only writers set it, under `_sync_lock`. A waiter counts itself before it reads
        # `_acked`, so it either sees the new value or is counted here and notified.
        if seq > self._acked:
            self._acked = seq
            if self._waiting:
                with self._acked_cond:
                    self._acked_cond.notify_all()

    def _fail(self, error: OSError, what: str) -> StoreError:
        """Refuse further appends after an I/O error; the error to raise."""
        with self._lock:
            self._failure = error
            self._writable = False
        logger.error("journal %s failed, refusing further appends: %s", self.directory, error)
        with self._acked_cond:
            self._acked_cond.notify_all()
        return StoreError(f"journal {self.directory}: {what}: {error}")

    def _check_writable(self) -> None:
        if self._in_child:
            raise self._used_after_fork()
        if self._closed:
            raise StoreError(f"journal {self.directory} is closed")
        if self._failure is not None:
            raise StoreError(f"journal {self.directory} failed earlier: {self._failure}")

    def _used_after_fork(self) -> UsedAfterFork:
        return UsedAfterFork(
            f"journal {self.directory} was opened by process {self._opened_by}; a forked process "
            "must open its own journal, in another directory, after the fork"
        )

    def _flush_loop(self) -> None:
        while not self._stopping:
            # The interval (an infinite one: until a backlog or a waiter), or earlier if a backlog builds up.
            self._wake.wait(wait_limit(self.interval))
            self._wake.clear()
            if self._stopping:
                return
            try:
                self._sync()
            except StoreError:
                return  # already logged by _fail; appends now raise

    # -- closing ------------------------------------------------------------------------------

    def close(self) -> None:
        """Write and fsync everything, remove the segments `release` covered, unlock. Idempotent.

        A clean close after everything was released leaves no segment behind. Raises
        `StoreError` if the journal failed (now or earlier: records appended after the
        acknowledged ones may be lost), after closing and unlocking all the same, so
        that `recover` can run at once. An interrupted close (Ctrl-C) is not done: the
        next call (at the latest, the exit hook's) writes what is still to be written.
        """
        with self._close_lock:
            if self._closed and self._dir_lock.released:  # a close cut short goes on: unlocking
                return
            self._stopping = True
            self._wake.set()
            if self._flusher is not None:
                self._flusher.join()
            if self._failure is None:
                with contextlib.suppress(StoreError):  # the failure, reported below once closed
                    self._sync()
            self._shut_down()
            if self._exit_hook is not None:
                self._exit_hook.cancel()
            on_close, self._on_close = self._on_close, None
        if on_close is not None:  # outside `_close_lock`: it takes the recorder's lock
            on_close()
        if self._failure is not None:
            raise StoreError(
                f"journal {self.directory} failed: {self._failure}; records after {self._acked} may be lost"
            )

    def _unwritten_at_exit(self) -> str:
        """What a close interrupted at interpreter exit leaves unwritten (`ExitHook`)."""
        return f"records after {self._acked} may be lost; those up to it are kept, for recover"

    def _shut_down(self) -> None:
        """Close the active segment, remove what `release` covered, unlock the directory."""
        try:
            with self._release_lock:
                with self._sync_lock:
                    with self._lock:
                        self._closed = True
                        self._writable = False
                    fd, self._fd = self._fd, -1  # once: a close cut short does the rest again
                    try:
                        if fd >= 0:
                            os.close(fd)
                    except OSError as error:
                        with self._lock:
                            self._failure = self._failure or error
                with self._acked_cond:
                    self._acked_cond.notify_all()
                with self._lock:
                    # Released segments go, and so does an active one that holds no frame.
                    covered = [
                        s
                        for s in self._segments
                        if self._end_of(s) <= max(self._checkpoint.stored_below, s.first_seq)
                    ]
                    everything = len(covered) == len(self._segments) and not self._leftovers
                try:
                    self._remove(covered)
                    if everything:
                        # Nothing left to replay: a stale checkpoint must not outlive its segments.
                        (self.directory / CHECKPOINT_FILE).unlink(missing_ok=True)
                except OSError as error:
                    logger.warning(
                        "journal %s: could not remove released segments: %s", self.directory, error
                    )
        finally:
            self._dir_lock.release()


def _create(path: Path) -> int:
    """A descriptor for writing segment `path`. A file there past every segment, holding
    no frame (at most the header), is one this run began making and an interrupted
    rotation left; one holding frames is another writer's (where the directory lock is
    none, on Windows) and is never removed: `FileExistsError`."""
    try:
        return open_new(path)
    except FileExistsError:
        if path.stat().st_size > len(MAGIC):
            raise
        path.unlink()
        return open_new(path)


def _frames(records: list[bytes], singles: list[int], first: int) -> Iterator[tuple[bytes, int, int]]:
    """Frames (data, first seq, count) for records numbered from `first`: newline-free runs
    joined, the rest alone."""
    start = 0
    for single in (*singles, len(records)):
        if single > start:
            run = records[start:single]
            yield run[0] if len(run) == 1 else b"\n".join(run), first + start, len(run)
        if single < len(records):
            yield records[single], first + single, 1
        start = single + 1
