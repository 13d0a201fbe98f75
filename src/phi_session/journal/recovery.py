"""Reading a journal back: `recover` (replay into a recorder, save into a store) and `read_records`."""

from __future__ import annotations

import logging
import os
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from .. import codec
from ..errors import (
    DecodeError,
    InvalidArgument,
    NotAJournal,
    PhiSessionError,
    RecoveryError,
    StoreError,
)
from ..events import AgentEvent, AgentStart, ParallelLoopEnd
from ..ids import session_id_from_loop_id
from ..model import Session
from ..recorder import SessionRecorder, SessionRecorderConfig
from ..saver import SavedSpawners, SaveTarget, SessionSaver, not_saved
from .format import (
    CHECKPOINT_FILE,
    ORPHANS_FILE,
    Checkpoint,
    DirectoryLock,
    SegmentDamage,
    SegmentReader,
    append_orphans,
    check_ours,
    cut_unsettled_orphans,
    fsync_directory,
    orphans_size,
    out_of_space,
    read_checkpoint,
    remove_checkpoint_tmp,
    segment_paths,
    settle_orphans,
    write_checkpoint,
)
from .writer import Journal, StrPath

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JournalRecord:
    """One record (event) read back from a segment."""

    seq: int
    payload: bytes
    segment: Path


@dataclass
class RecoveryReport(SegmentDamage):
    """What `recover` found and did (and, inherited, what damage it skipped)."""

    segments_read: int = 0
    events_replayed: int = 0
    events_already_stored: int = 0
    """Records a live writer had marked as saved (`Journal.release`), not replayed."""
    undecodable: int = 0
    """Records that are not an event this phi-session knows (an event of a newer phi-core,
    a line another producer journaled with `Journal.append_json`); written as journaled to
    ``orphans.jsonl`` with the orphans when the segments are removed."""
    sessions_saved: int = 0
    """Store saves made (a session whose loops span a save point is saved more than once)."""
    failed_sessions: list[str] = field(default_factory=list)
    orphans: int = 0
    """Events no loop claimed; appended to ``orphans.jsonl`` when the segments are removed
    (until then they stay in the journal)."""
    segments_removed: int = 0


def read_records(directory: StrPath, damage: SegmentDamage | None = None) -> Iterator[JournalRecord]:
    """Every valid frame of every segment in `directory`, in order (damage is skipped;
    with `damage`, counted there and logged as `recover` does).

    For inspection; it takes no lock, so a live writer's last frame may be missing.
    """
    reader = SegmentReader(damage)
    for _, path in segment_paths(Path(directory)):
        for seq, payload in reader.read(path):
            yield JournalRecord(seq, payload, path)
    reader.finish()


def recover(
    journal: Journal | StrPath,
    store: SaveTarget,
    *,
    config: SessionRecorderConfig | None = None,
    remove: bool = True,
    save_every: int = 10_000,
    retry_for: float = 10.0,
) -> RecoveryReport:
    """Rebuild every session from a journal and save it into `store`.

    `journal` is a directory no live writer holds (`JournalLocked` otherwise), or an
    open `Journal`, whose `leftover_segments` (those of an earlier run) are recovered.
    A path that does not exist has nothing to recover (an empty report); one that is
    no directory (the segment itself, given for its directory) is refused (`NotAJournal`).
    A directory whose ``NNNN.wal`` files or checkpoint are not this journal's
    (`format.check_ours`), segments or none, is refused (`NotAJournal`) before anything
    in it is touched.
    Events are replayed into a fresh `SessionRecorder(config)` (its callbacks run),
    completed sessions are saved every `save_every` events (memory stays bounded),
    and at the end open loops are aborted and every session is saved.

    Sessions are saved by a `SessionSaver` (a transient failure is retried for
    `retry_for` seconds; a session whose id no store accepts joins the orphans).

    Damage never raises: torn records at a segment's end and corrupt or missing
    stretches are skipped, logged as warnings and counted in the report (with the
    records lost, from the gaps in the sequence numbers).

    Idempotent: `SessionStore.save` merges by loop id, so saving what is already
    stored changes nothing. With `remove`, once every session is saved, events that no
    loop claimed and records that are not events (`RecoveryReport.undecodable`) are
    appended to ``orphans.jsonl`` in the journal directory and the
    replayed segments, the checkpoint and (given a directory) the lock file are deleted.
    If a save fails nothing is written or deleted and `RecoveryError` (carrying the
    report) is raised: recovering again is safe. On a full disk, when nothing but the
    checkpoint is to be written, the segments (all saved) are removed newest first
    until it fits, so that a journal that filled its disk can always be cleared.
    """
    return _recover(journal, store, config, remove, save_every, retry_for, None)[0]


@dataclass
class KeptUnsaved:
    """The sessions a recovery into an open journal could not save (`recover_keeping_unsaved`)."""

    sessions: list[Session]
    first_seq: int
    """Where their records, journaled again, begin in the journal's own segments."""
    error: Exception | None
    """What kept the last of them unsaved."""


def recover_keeping_unsaved(
    journal: Journal, store: SaveTarget, *, config: SessionRecorderConfig | None, retry_for: float
) -> tuple[RecoveryReport, KeptUnsaved | None]:
    """`recover` the leftovers of an open `journal`, except that sessions the store does not
    take do not keep every leftover: their records are journaled again, in order, in the
    journal's own segments (from `KeptUnsaved.first_seq`), and the leftovers go. What
    `AutoPersistingRecorder` does on start, so that one session the store refuses does
    not stop recording; the sessions, not saved, come back in the result.

    A crash between the new records' fsync and the checkpoint that covers the leftovers
    (one file written) has the next recovery replay those sessions' events twice.
    """
    return _recover(journal, store, config, True, 10_000, retry_for, _Keeping())


def _recover(
    journal: Journal | StrPath,
    store: SaveTarget,
    config: SessionRecorderConfig | None,
    remove: bool,
    save_every: int,
    retry_for: float,
    keeping: _Keeping | None,
) -> tuple[RecoveryReport, KeptUnsaved | None]:
    """`recover`; with `keeping` (and an open `Journal`), `recover_keeping_unsaved`."""
    if save_every < 1:
        raise InvalidArgument(f"save_every must be at least 1, got {save_every!r}")
    if isinstance(journal, Journal):
        directory, lock = journal.directory, None
        segments = journal.leftover_segments  # checked when it was opened
    else:
        directory = Path(journal)
        if not directory.is_dir():
            if not os.path.lexists(directory):  # no journal was ever made there: nothing to recover
                return RecoveryReport(), None
            raise NotAJournal(
                f"{directory} is a file, not a journal directory: give the directory "
                f"that holds its segments ({directory.parent}?); nothing was touched"
            )
        found = [path for _, path in segment_paths(directory)]
        # Before the lock file is made there; with no segment too: a checkpoint that is
        # not ours is refused as `Journal` refuses it.
        check_ours(directory, found)
        if not found:
            return RecoveryReport(), None
        try:
            lock = DirectoryLock(directory)
        except OSError as error:
            raise StoreError(f"cannot lock journal {directory}: {error}") from error
        segments = [path for _, path in segment_paths(directory)]  # as they are with no writer
    cleared = False  # the segments are gone: the lock file goes too
    try:
        if lock is not None:  # an open `Journal` did it when it was opened
            remove_checkpoint_tmp(directory)
        unstorable: list[AgentEvent] = []  # the events of sessions no store accepts
        saver = SessionSaver(store, orphans=unstorable.extend, retry_for=retry_for)
        report, orphans, rejected, replayed = _replay(directory, segments, saver, config, save_every, keeping)
        orphans += unstorable
        report.orphans = len(orphans)
        kept = None
        if report.failed_sessions:
            if keeping is None or not isinstance(journal, Journal):
                raise RecoveryError(
                    f"recovery of {directory}: {not_saved(report.failed_sessions, saver.last_error)}; "
                    "the journal was kept",
                    report,
                )
            try:
                first = _journal_again(journal, segments, keeping.numbers_of(report.failed_sessions))
            except PhiSessionError as error:
                raise RecoveryError(
                    f"recovery of {directory}: {not_saved(report.failed_sessions, saver.last_error)}, "
                    f"nor journaled again ({error}); the journal was kept",
                    report,
                ) from error
            kept = KeptUnsaved(keeping.sessions, first, saver.last_error)
        if remove and segments:
            removed: list[Path] = []
            try:
                # Orphans the dead writer wrote after its last checkpoint are derived again
                # from these segments (an open `Journal` cut them when it was opened).
                checkpoint = read_checkpoint(directory)
                if lock is not None:
                    cut_unsettled_orphans(directory, checkpoint)
                if orphans or rejected:
                    settle_orphans(directory, checkpoint)
                    append_orphans(directory, orphans, rejected)
                    logger.warning(
                        "journal %s: %d events belonged to no loop and %d records were not events; "
                        "written to %s",
                        directory,
                        len(orphans),
                        len(rejected),
                        directory / ORPHANS_FILE,
                    )
                # Everything replayed is now stored. A recovery cut short while removing the
                # segments must not replay those left: it would write these orphans a second
                # time, and take the events of loops begun in a removed segment for orphans.
                left = list(segments)
                _write_checkpoint_making_room(
                    directory,
                    replace(replayed, orphans_size=orphans_size(directory)),
                    left,
                    removed,
                    may_remove=not (orphans or rejected),
                )
                for path in left:
                    path.unlink(missing_ok=True)
                    removed.append(path)
                if lock is not None:  # an open `Journal` still has segments the checkpoint guards
                    (directory / CHECKPOINT_FILE).unlink(missing_ok=True)
                fsync_directory(directory)
            except OSError as error:
                raise StoreError(
                    f"recovery of {directory}: the sessions are saved but the journal could not be "
                    f"cleared ({error}); recovering again is safe"
                ) from error
            finally:
                if isinstance(journal, Journal):  # recovering again reads only what is left
                    journal.forget_leftovers(removed)
            report.segments_removed = len(segments)
            cleared = True
        return report, kept
    finally:
        if lock is not None:
            lock.release(remove=cleared)


def _write_checkpoint_making_room(
    directory: Path, checkpoint: Checkpoint, segments: list[Path], removed: list[Path], *, may_remove: bool
) -> None:
    """Write `checkpoint`; on a full disk (the journal filled it), with `may_remove`, remove
    `segments`, whose every record is stored, newest first until it can be written (or
    none is left for it to guard).

    Newest first: a recovery cut short in between leaves a prefix of what it replayed,
    whose replay again loses nothing and saves nothing the store does not already hold
    whole (a loop cut short there loses to its stored end; no loop lacks its start). Not
    when orphans were written: the next recovery cuts those appended after the old
    checkpoint, and must derive them all again.
    """
    warned = False
    while True:
        try:
            write_checkpoint(directory, checkpoint)
            return
        except OSError as error:
            if not (out_of_space(error) and may_remove):
                raise
            remove_checkpoint_tmp(directory)
            if not segments:
                return
            if not warned:
                warned = True
                logger.warning(
                    "journal %s: no space left for its checkpoint (%s); removing its segments, "
                    "all saved, newest first until it fits",
                    directory,
                    error,
                )
        newest = segments.pop()
        newest.unlink(missing_ok=True)
        removed.append(newest)
        fsync_directory(directory)


class _Keeping:
    """What a recovery that keeps the sessions it cannot save notes while replaying: the
    sessions the saver gave up, and the numbers of the records replayed into each session."""

    def __init__(self) -> None:
        self.sessions: list[Session] = []
        self._records: dict[str, array[int]] = {}
        self._loops: dict[str, str] = {}  # loop id -> the session its AgentStart named

    def note(self, seq: int, event: object) -> None:
        """Record `seq`, just replayed as `event`, as its session's (as the recorder routes it)."""
        session_id = getattr(event, "session_id", None)
        loop_id = getattr(event, "loop_id", None)
        if type(event) is AgentStart:
            self._loops[event.loop_id] = event.session_id
        if session_id is None and loop_id is not None:
            session_id = self._loops.get(loop_id) or session_id_from_loop_id(loop_id)
        if session_id is not None:
            numbers = self._records.get(session_id)
            if numbers is None:
                numbers = self._records[session_id] = array("q")
            numbers.append(seq)

    def numbers_of(self, session_ids: list[str]) -> set[int]:
        return {seq for sid in set(session_ids) for seq in self._records.get(sid, ())}


def _journal_again(journal: Journal, segments: list[Path], numbers: set[int]) -> int:
    """Append the records `numbers` of `segments` to `journal`, in order, durably; the
    number the first one gets there."""
    first = journal.last_seq + 1
    reader = SegmentReader()
    for path in segments:
        for seq, payload in reader.read(path):
            if seq in numbers:
                journal.append_json(payload, commit=False)
    journal.sync()
    return first


def _replay(
    directory: Path,
    segments: list[Path],
    saver: SessionSaver,
    config: SessionRecorderConfig | None,
    save_every: int,
    keeping: _Keeping | None,
) -> tuple[RecoveryReport, list[AgentEvent], list[bytes], Checkpoint]:
    """Replay `segments` into a recorder, saving as it goes; the report, the recorder's
    orphans, the records that are not events and the checkpoint that marks every record
    read as stored."""
    report = RecoveryReport()
    rejected: list[bytes] = []
    checkpoint = read_checkpoint(directory)
    reader = SegmentReader(report, stored_below=checkpoint.stored_below)
    recorder = SessionRecorder(config)
    spawners = SavedSpawners(saver.store)
    for path in segments:
        report.segments_read += 1
        for seq, payload in reader.read(path):
            if seq < checkpoint.stored_below:
                report.events_already_stored += 1
                continue
            try:
                event = codec.decode_for_recording(payload)
                loop_id = getattr(event, "loop_id", None)
                if (
                    seq <= checkpoint.settled_through
                    and loop_id is not None
                    and type(event) is not AgentStart
                    and not recorder.has_open_loop(loop_id)
                ):
                    # Its loop started before the checkpoint: the live writer saved it (`release`).
                    report.events_already_stored += 1
                    continue
                if (
                    seq <= checkpoint.settled_through
                    and type(event) is ParallelLoopEnd
                    and not recorder.in_open_group(event.selected_loop_id)
                ):
                    # Its group started before the checkpoint: the live writer saved it whole.
                    # Replayed, its start unseen, it would make a group of the selected loop alone.
                    report.events_already_stored += 1
                    continue
                if spawners.needs_spawner(event, recorder):
                    spawners.hand_to(recorder, event)
                if isinstance(event, codec.LazyMessageUpdate):
                    recorder.on_json(payload)  # the recorder's own path: it drops or decodes it
                else:  # decoded, as `on_json` records it: checked when it was journaled
                    recorder.on_checked_event(event)
            except DecodeError as error:
                report.undecodable += 1
                rejected.append(payload)
                logger.warning("journal %s: record %d is not an event, kept aside: %s", path, seq, error)
                continue
            report.events_replayed += 1
            if keeping is not None:
                keeping.note(seq, event)
            if report.events_replayed % save_every == 0:
                _save_completed(saver, recorder, report, keeping)
    reader.finish()
    _save_completed(saver, recorder, report, keeping, flush=True)
    replayed = Checkpoint(
        max(checkpoint.stored_below, reader.last + 1), max(checkpoint.settled_through, reader.last)
    )
    return report, [orphan.event for orphan in recorder.drain_orphans()], rejected, replayed


def _save_completed(
    saver: SessionSaver,
    recorder: SessionRecorder,
    report: RecoveryReport,
    keeping: _Keeping | None,
    *,
    flush: bool = False,
) -> None:
    """The recovery's one save step: checkpoint (or flush), drain, save.

    A session that is not saved stays in the journal, which `recover` then keeps:
    the report lists its id, and it leaves memory (`keeping` holds it).
    """
    saver.drain(recorder, flush=flush)
    unsaved = saver.take_unsaved()
    report.failed_sessions.extend(session.session_id for session in unsaved)
    if keeping is not None:
        keeping.sessions += unsaved
    report.sessions_saved = saver.stats().saved
