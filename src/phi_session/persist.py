"""A recorder that saves finished sessions into a store as it goes, in bounded memory.

`AutoPersistingRecorder` wraps a `SessionRecorder`. Every `checkpoint_every`
events (and every `checkpoint_interval` seconds while idle, and on `flush`/`close`)
it completes the sessions that have no open loop, drains them out of the
recorder and hands them to a background writer thread that saves them. Memory
holds the open sessions plus at most about `max_pending_sessions` waiting to be saved.

Nothing is ever dropped:

* when the store falls behind, the producer blocks (backpressure) until the writer
  has room again, logging a warning when it starts and every `warn_after` seconds;
* a failed save is retried with growing pauses for `retry_for` seconds; a session
  that still cannot be saved is kept in memory (`failed_sessions`), retried by
  `close`, and `close` raises `StoreError` if it still fails;
* with a `Journal`, every event is journaled before it is applied (write-ahead), a
  journal left by a crashed run is recovered into the store on start, and journal
  segments are removed once every session with events in them is saved
  (`Journal.release`). Events no loop claims go to the journal's ``orphans.jsonl``;
  without a journal they stay in the recorder (`SessionRecorder.orphans`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import msgspec

from .errors import InvalidSessionId, PhiSessionError, SessionLocked, StoreError
from .events import AgentEvent, AgentStart, ParallelLoopEnd, ParallelLoopStart
from .journal import Journal, JournaledRecorder, RecoveryReport, recover, session_events
from .model import Session
from .recorder import SessionRecorder, SessionRecorderConfig
from .stores.base import SessionStore

__all__ = ["AutoPersistingRecorder"]

logger = logging.getLogger("phi_session.persist")

# The only events that carry a session id: they open (or join) a session in the recorder.
_SESSION_EVENTS = (AgentStart, ParallelLoopStart, ParallelLoopEnd)
_SESSION_KEY = b'"session_id"'
_MAX_RETRY_PAUSE = 2.0
_RELEASE_EVERY = 1.0  # seconds


class _SessionProbe(msgspec.Struct):
    session_id: str | None = None


_probe = msgspec.json.Decoder(_SessionProbe)


def _session_of_line(payload: bytes) -> str | None:
    """The top-level ``session_id`` of a JSON line, if it has one (cheap pre-check first)."""
    if _SESSION_KEY not in payload:
        return None
    try:
        return _probe.decode(payload).session_id
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None  # not an event: the recorder will reject it


@dataclass
class _Pending:
    """A session drained from the recorder, not yet saved; `pin` is its first journal seq."""

    session: Session
    pin: int | None


class AutoPersistingRecorder:
    """Records events and saves every finished session into `store`, in bounded memory.

    * `journal`: a `Journal` or a directory to open one in (default policy), or None.
      The recorder owns it from now on: `close` closes it. With ``recover_on_start``,
      segments left by a crashed run are first recovered into `store`
      (`recovery_report`).
    * `config`: the `SessionRecorderConfig` (also used for recovery).
    * `checkpoint_every`: events between checkpoints; `checkpoint_interval`: seconds
      after which an idle recorder checkpoints anyway (None: never).
    * `max_pending_sessions`: sessions waiting for the writer before producers block.
    * `retry_for`: seconds a failing save is retried before the session is set aside.
    * `warn_after`: seconds between warnings while a producer is blocked.

    Thread-safe. Query the wrapped recorder through `recorder` (open sessions only:
    saved sessions are no longer in memory). Use as a context manager or call `close`.
    """

    def __init__(
        self,
        store: SessionStore,
        *,
        journal: Journal | str | os.PathLike[str] | None = None,
        config: SessionRecorderConfig | None = None,
        checkpoint_every: int = 1000,
        checkpoint_interval: float | None = 1.0,
        max_pending_sessions: int = 1000,
        recover_on_start: bool = True,
        retry_for: float = 30.0,
        warn_after: float = 5.0,
    ) -> None:
        if checkpoint_every < 1 or max_pending_sessions < 1:
            raise ValueError("checkpoint_every and max_pending_sessions must be at least 1")
        if checkpoint_interval is not None and checkpoint_interval <= 0:
            raise ValueError("checkpoint_interval must be positive or None")
        self.store = store
        self.recorder = SessionRecorder(config)
        self.journal = journal if isinstance(journal, Journal) or journal is None else Journal(journal)
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval = checkpoint_interval
        self.max_pending_sessions = max_pending_sessions
        self.retry_for = retry_for
        self.warn_after = warn_after
        self.recovery_report: RecoveryReport | None = None
        if self.journal is not None and recover_on_start and self.journal.leftover_segments:
            try:
                self.recovery_report = recover(self.journal, store, config=config)
            except BaseException:
                if not isinstance(journal, Journal):
                    self.journal.close()  # we opened it: do not leave the directory locked
                raise
            logger.warning("recovered %d events of an earlier run from %s into %r: %d sessions saved",
                           self.recovery_report.events_replayed, self.journal.directory, store,
                           self.recovery_report.sessions_saved)
        self._sink = JournaledRecorder(self.journal, self.recorder) if self.journal is not None else None
        # _lock: the recorder, pins and counters (producer side). _cond: the writer's queue.
        # Order: _lock before _cond, never the reverse.
        self._lock = threading.RLock()
        self._cond = threading.Condition(threading.Lock())
        self._pins: dict[str, int] = {}  # held session -> seq of its first journaled event
        self._settled_through = -1  # every orphan up to this seq is in orphans.jsonl
        self._queue: deque[_Pending] = deque()
        self._failed: list[_Pending] = []
        self._closed = False
        self._stopping = False
        self._since_checkpoint = 0
        self._counters = dict.fromkeys((
            "events", "checkpoints", "sessions_saved", "save_errors", "backpressure_waits",
            "orphans_written", "segments_removed"), 0)
        self._blocked_seconds = 0.0
        self._last_warning = -float("inf")
        self._warned_pins: set[str] = set()
        self._writer = threading.Thread(target=self._run, name="phi-session auto-persist writer", daemon=True)
        self._writer.start()

    def __enter__(self) -> AutoPersistingRecorder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- feeding ------------------------------------------------------------------------------

    def on_event(self, event: AgentEvent) -> None:
        """Record one event (journaled first if there is a journal)."""
        with self._lock:
            self._check_open()
            if self._sink is None:
                self.recorder.on_event(event)
                seq = -1
            else:
                seq = self._sink.on_event(event, commit=False)
                if isinstance(event, _SESSION_EVENTS):
                    self._pin(event.session_id, seq)
            due = self._count_event()
        self._after_event(seq, due)

    def on_json(self, data: bytes | str) -> None:
        """Record one phi-core JSON event line. Raises `DecodeError` (see `JournaledRecorder.on_json`)."""
        with self._lock:
            self._check_open()
            if self._sink is None:
                self.recorder.on_json(data)
                seq = -1
            else:
                payload = data.encode() if isinstance(data, str) else bytes(data)
                seq = self._sink.on_json(payload, commit=False)  # nothing journaled if it raises
                session_id = _session_of_line(payload)
                if session_id is not None:
                    self._pin(session_id, seq)
            due = self._count_event()
        self._after_event(seq, due)

    def record_all(self, events: Iterable[AgentEvent]) -> None:
        for event in events:
            self.on_event(event)

    def _pin(self, session_id: str, seq: int) -> None:
        """Hold the journal at `seq` until `session_id` is saved, if the recorder holds it.

        An event the recorder did not attach to a held session (a late parallel event,
        an orphan) is protected by the orphans' own bookkeeping, not by a pin that
        would never be removed.
        """
        if self.recorder.get_session(session_id) is not None or self.recorder.has_early_events(session_id):
            self._pins.setdefault(session_id, seq)

    def _count_event(self) -> bool:
        self._counters["events"] += 1
        self._since_checkpoint += 1
        return self._since_checkpoint >= self.checkpoint_every

    def _after_event(self, seq: int, due: bool) -> None:
        if self.journal is not None:
            self.journal.commit(seq)  # "always": fsynced before returning (outside the lock)
        if due:
            self.checkpoint()

    def _check_open(self) -> None:
        if self._closed:
            raise PhiSessionError("the AutoPersistingRecorder is closed")

    # -- checkpoints ------------------------------------------------------------------------------

    def checkpoint(self) -> int:
        """Hand every finished session to the writer now; returns how many.

        Blocks first while the writer has `max_pending_sessions` or more waiting.
        """
        self._wait_for_room()
        with self._lock:
            if self._closed:  # `close` handed everything over already
                return 0
            return self._checkpoint_locked()

    def _checkpoint_locked(self) -> int:
        self._since_checkpoint = 0
        self._counters["checkpoints"] += 1
        self.recorder.checkpoint()
        sessions = self.recorder.drain_completed()
        if self.journal is not None:
            orphans = self.recorder.drain_orphans()
            if orphans:
                self._counters["orphans_written"] += self.journal.write_orphans(o.event for o in orphans)
            self._settled_through = self.journal.last_seq
        if sessions:
            pending = [_Pending(s, self._pins.pop(s.session_id, None)) for s in sessions]
            with self._cond:
                self._queue.extend(pending)
                self._cond.notify_all()
        return len(sessions)

    def flush(self) -> None:
        """End of stream: abort open loops, hand every session over and wait until saved."""
        with self._lock:
            self._check_open()
            self.recorder.flush()
            self._checkpoint_locked()
        self.wait_saved()

    def wait_saved(self, timeout: float | None = None) -> bool:
        """Wait until every handed-over session is saved (or set aside); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue and self._writer.is_alive():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return not self._queue

    def _wait_for_room(self) -> None:
        with self._cond:
            if len(self._queue) < self.max_pending_sessions:
                return
            self._counters["backpressure_waits"] += 1
            started = time.monotonic()
            if started - self._last_warning >= self.warn_after:  # one warning per episode, not per wait
                self._last_warning = started
                where = ("its events are durable in the journal" if self.journal is not None
                         else "nothing is dropped")
                logger.warning(
                    "store %r is %d sessions behind: blocking the producer until it catches up (%s); "
                    "%d waits so far", self.store, len(self._queue), where,
                    self._counters["backpressure_waits"])
            while (len(self._queue) >= self.max_pending_sessions and not self._stopping
                   and self._writer.is_alive()):
                if not self._cond.wait(self.warn_after) and len(self._queue) >= self.max_pending_sessions:
                    self._last_warning = time.monotonic()
                    logger.warning("producer still blocked after %.0f s: %d sessions waiting for %r",
                                   time.monotonic() - started, len(self._queue), self.store)
            self._blocked_seconds += time.monotonic() - started

    # -- the writer thread ---------------------------------------------------------------------

    def _run(self) -> None:
        last_release = time.monotonic()
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    if not self._cond.wait(self.checkpoint_interval):
                        break  # idle for a whole interval: checkpoint below
                if not self._queue and self._stopping:
                    return
                item = self._queue[0] if self._queue else None
            if item is None:
                self._idle_checkpoint()
                continue
            saved = self._save(item.session)
            with self._cond:
                self._queue.popleft()
                if not saved:
                    self._failed.append(item)
                self._cond.notify_all()
                caught_up = not self._queue
            # Releasing costs a checkpoint-file fsync: when caught up, or now and then under load.
            if caught_up or time.monotonic() - last_release >= _RELEASE_EVERY:
                self._release_journal()
                last_release = time.monotonic()

    def _idle_checkpoint(self) -> None:
        try:
            with self._lock:
                if not self._closed:
                    self._checkpoint_locked()
        except PhiSessionError as error:  # e.g. the journal failed: producers see it too
            logger.error("periodic checkpoint failed: %s", error)

    def _save(self, session: Session) -> bool:
        """Save with retries; False if the session had to be set aside."""
        deadline = time.monotonic() + self.retry_for
        pause = 0.05
        while True:
            try:
                self.store.save(session)
            except (StoreError, SessionLocked, OSError) as error:
                self._counters["save_errors"] += 1
                if time.monotonic() + pause > deadline:
                    logger.error("saving session %s failed for %.0f s, keeping it in memory: %s",
                                 session.session_id, self.retry_for, error)
                    return False
                logger.warning("saving session %s failed, retrying in %.2f s: %s",
                               session.session_id, pause, error)
                time.sleep(pause)
                pause = min(pause * 2, _MAX_RETRY_PAUSE)
            except InvalidSessionId as error:
                # No store can take this id, now or after a restart: keep its events with
                # the orphans (durably, in the journal directory) instead of pinning forever.
                self._counters["save_errors"] += 1
                logger.error("session %r cannot be stored (%s); its events are kept as orphans",
                             session.session_id, error)
                if self.journal is None:
                    return False
                self.journal.write_orphans(session_events(session))
                return True
            except Exception as error:
                # Not an I/O problem (a bug in a custom store): retrying cannot help.
                # The session stays in memory (and in the journal).
                self._counters["save_errors"] += 1
                logger.error("session %s cannot be saved, keeping it in memory: %r",
                             session.session_id, error)
                return False
            else:
                self._counters["sessions_saved"] += 1
                return True

    def _release_journal(self) -> None:
        """Tell the journal what is stored: segments below every unsaved session can go."""
        if self.journal is None:
            return
        with self._lock:
            with self._cond:
                unsaved = [p.pin for p in (*self._queue, *self._failed) if p.pin is not None]
            settled = self._settled_through
            # Orphans the recorder still holds are only safe once written (settled).
            stored_below = min((*self._pins.values(), *unsaved, settled + 1))
            self._warn_about_stuck_pin(stored_below)
        try:
            self._counters["segments_removed"] += self.journal.release(stored_below, settled_through=settled)
        except PhiSessionError as error:
            logger.debug("journal not released: %s", error)  # leftovers not recovered, or closed

    def _warn_about_stuck_pin(self, stored_below: int) -> None:
        """Say so when the journal is held back by events the recorder keeps outside any session.

        ParallelLoopStart/End for a session the recorder does not hold (it was saved and
        drained already) wait in the recorder for that session to start again; until
        then their segments cannot be released.
        """
        for session_id, pin in self._pins.items():
            if (pin == stored_below and session_id not in self._warned_pins
                    and self.recorder.get_session(session_id) is None):
                self._warned_pins.add(session_id)
                logger.warning("journal %s is kept from record %d on: session %s has session events "
                               "the recorder holds outside any session",
                               self.journal.directory if self.journal else "", pin, session_id)

    # -- closing and inspection ----------------------------------------------------------------

    def failed_sessions(self) -> list[Session]:
        """Sessions the store refused (kept in memory, retried by `close`)."""
        with self._cond:
            return [p.session for p in self._failed]

    def close(self) -> None:
        """Flush the recorder, save everything, close the journal. Idempotent.

        Raises `StoreError` if some sessions still cannot be saved; they stay in
        `failed_sessions` (and in the journal, which then keeps their segments).
        """
        with self._lock:
            if self._closed:
                return
            self.recorder.flush()
            self._checkpoint_locked()
            self._closed = True
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._writer.join()
        with self._cond:
            retry, self._failed = [*self._queue, *self._failed], []
            self._queue.clear()
        for item in retry:  # last chance, and the writer's work if it died
            if not self._save(item.session):
                self._failed.append(item)
        self._release_journal()
        if self.journal is not None:
            self.journal.close()
        if self._failed:
            ids = ", ".join(p.session.session_id for p in self._failed[:5])
            raise StoreError(f"{len(self._failed)} sessions could not be saved into {self.store!r} ({ids}); "
                             "they are in failed_sessions()"
                             + (f" and in the journal {self.journal.directory}" if self.journal else ""))

    def stats(self) -> dict[str, float]:
        """Counters: events, checkpoints, sessions saved/queued/failed, save errors,
        backpressure waits and seconds blocked, orphans written, journal segments
        removed and sequence numbers, plus the recorder's own `stats`."""
        with self._lock, self._cond:
            stats: dict[str, float] = dict(self._counters)
            stats["sessions_queued"] = len(self._queue)
            stats["sessions_failed"] = len(self._failed)
            stats["backpressure_seconds"] = round(self._blocked_seconds, 3)
            stats.update(self.recorder.stats())
            if self.journal is not None:
                stats["journal_last_seq"] = self.journal.last_seq
                stats["journal_acknowledged_seq"] = self.journal.acknowledged_seq
            return stats
