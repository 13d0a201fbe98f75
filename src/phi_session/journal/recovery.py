"""Reading a journal back: `recover` (replay into a recorder, save into a store) and `read_records`."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .. import codec
from ..errors import DecodeError, InvalidSessionId, PhiSessionError, StoreError
from ..events import AgentEvent, AgentStart
from ..model import Session
from ..recorder import SessionRecorder, SessionRecorderConfig
from ..stores.base import SessionStore
from .format import (
    CHECKPOINT_FILE,
    ORPHANS_FILE,
    DirectoryLock,
    SegmentDamage,
    SegmentReader,
    append_orphans,
    fsync_directory,
    read_checkpoint,
    segment_paths,
)
from .writer import Journal, StrPath

logger = logging.getLogger(__name__)


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
class RecoveryReport(SegmentDamage):
    """What `recover` found and did (and, inherited, what damage it skipped)."""

    segments_read: int = 0
    events_replayed: int = 0
    events_already_stored: int = 0
    """Records a live writer had marked as saved (`Journal.release`), not replayed."""
    undecodable: int = 0
    """Records that are not an event; `on_json` rejected them when they were recorded."""
    sessions_saved: int = 0
    """Store saves made (a session whose loops span a save point is saved more than once)."""
    failed_sessions: list[str] = field(default_factory=list)
    orphans: int = 0
    """Events no loop claimed; appended to ``orphans.jsonl`` when the segments are removed
    (until then they stay in the journal)."""
    segments_removed: int = 0


def read_records(directory: StrPath) -> Iterator[JournalRecord]:
    """Every valid frame of every segment in `directory`, in order (damage is skipped).

    For inspection; it takes no lock, so a live writer's last frame may be missing.
    """
    reader = SegmentReader()
    for _, path in segment_paths(Path(directory)):
        for seq, payload in reader.read(path):
            yield JournalRecord(seq, payload, path)


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

    Damage never raises: torn records at a segment's end and corrupt or missing
    stretches are skipped, logged as warnings and counted in the report (with the
    records lost, from the gaps in the sequence numbers).

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
            lock = DirectoryLock(directory)
        except OSError as error:
            raise StoreError(f"cannot lock journal {directory}: {error}") from error
        segments = [path for _, path in segment_paths(directory)]
    try:
        report, orphans = _replay(directory, segments, store, config, save_every)
        if report.failed_sessions:
            raise RecoveryError(
                f"recovery of {directory}: {len(report.failed_sessions)} sessions could not be saved "
                f"({', '.join(report.failed_sessions[:5])}); the journal was kept", report)
        if remove and segments:
            if orphans:
                append_orphans(directory, orphans)
                logger.warning("journal %s: %d events belonged to no loop; written to %s",
                               directory, len(orphans), directory / ORPHANS_FILE)
            for path in segments:
                path.unlink(missing_ok=True)
            (directory / CHECKPOINT_FILE).unlink(missing_ok=True)
            fsync_directory(directory)
            report.segments_removed = len(segments)
            if isinstance(journal, Journal):
                journal.forget_leftovers(segments)
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
    checkpoint = read_checkpoint(directory)
    reader = SegmentReader(report, stored_below=checkpoint.stored_below)
    recorder = SessionRecorder(config)
    unstorable: list[AgentEvent] = []
    for path in segments:
        report.segments_read += 1
        for seq, payload in reader.read(path):
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
                _save_completed(recorder, store, report, unstorable)
    reader.finish()
    recorder.flush()
    _save_completed(recorder, store, report, unstorable)
    orphans = [orphan.event for orphan in recorder.drain_orphans()] + unstorable
    report.orphans = len(orphans)
    return report, orphans


def session_events(session: Session) -> list[AgentEvent]:
    """Every event a session holds, session-scoped ones included (for sessions no store can take)."""
    return [item.event for item in session.iter_events()]


def _save_completed(recorder: SessionRecorder, store: SessionStore, report: RecoveryReport,
                    unstorable: list[AgentEvent]) -> None:
    """Drain the recorder's completed sessions into `store`: the recovery's one save step.

    A session no store can take goes to `unstorable` (then ``orphans.jsonl``); a failed
    save is listed in the report, and `recover` then keeps the journal.
    """
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
