"""A recorder that saves finished sessions into a store as it goes, in bounded memory.

`AutoPersistingRecorder` wraps a `SessionRecorder`. Every `checkpoint_every`
events (and every `checkpoint_interval` seconds while idle, and on `flush`/`close`)
it completes the sessions that have no open loop, drains them out of the
recorder and hands them to a background writer thread that saves them with a
`SessionSaver`. Memory holds the open sessions plus at most about
`max_pending_bytes` of finished sessions waiting to be saved.

Nothing is ever dropped, but orphan events without a journal (below):

* when the store falls behind, the producer that checkpoints blocks (backpressure)
  until the writer has room again, logging a warning when it starts and every
  `warn_after` seconds;
* a failed save follows the `SessionSaver` policy: retried for `retry_for` seconds,
  then kept in memory (`failed_sessions`), retried by `close`, and `close` raises
  `StoreError` if it still fails;
* with a `Journal`, every event is journaled before it is applied (write-ahead), a
  journal left by a crashed run is recovered into the store on start, and journal
  segments are removed once every session with events in them is saved
  (`Journal.release`). Events no loop claims, and sessions whose id no store
  accepts, go to the journal's ``orphans.jsonl``. Without a journal they go to the
  ``orphans`` sink if one is given; with none, such sessions stay in
  `failed_sessions`, and orphan events, which no store keeps, are readable in
  `recorder.orphans()` until the next checkpoint hands sessions over, then dropped
  (bounded memory: held, they would grow with every late event), with a warning
  saying how many and counted in ``stats()["orphans_dropped"]``;
* a program that ends, or dies of an exception, with the recorder still open closes
  it at exit (an ``atexit`` hook), saving everything before the stores' own exit
  hooks close their connections; a `close` interrupted (Ctrl-C) is not done: the
  next call, or that hook, goes on with what is left;
* in a process forked from the one that made it, the recorder starts afresh at the
  child's first event (its own writer thread and exit hook, none of the parent's
  sessions); with a journal, which is the parent's, it refuses (`UsedAfterFork`).

No lock of this class is held while the recorder runs (its ``before_task`` and
``after_task`` callbacks may wait on other threads that use this recorder) or while
the store saves.
"""

from __future__ import annotations

import functools
import itertools
import logging
import numbers
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, MutableSequence
from dataclasses import dataclass, field
from typing import TypeVar, cast

import msgspec

from ._checks import (
    check_callable,
    check_instance,
    check_seconds,
    check_type,
    deadline_of,
    seconds_left,
    wait_limit,
)
from ._daemon import DaemonThread
from ._exit import ExitHook
from ._fork import in_forked_child
from .codec import json_size
from .errors import InvalidArgument, PhiSessionError, StoreError, UsedAfterFork
from .events import (
    AgentEvent,
    AgentStart,
    ParallelLoopEnd,
    ParallelLoopStart,
    ToolExecutionEnd,
    ToolExecutionStart,
    ToolExecutionUpdate,
)
from .journal import Journal, JournaledRecorder, RecoveryReport, recover
from .journal.format import out_of_space
from .journal.recovery import KeptUnsaved, recover_keeping_unsaved
from .messages import ExtensionMessage, ToolCall, text_size
from .model import Session
from .recorder import OrphanEvent, SessionRecorder, SessionRecorderConfig, SpawnGap, checking_entry
from .saver import (
    INTERRUPTS,
    OrphanSink,
    SaveOutcome,
    SaveTarget,
    SessionSaver,
    check_save_target,
    not_saved,
)

__all__ = ["CLOSE_GRACE", "DEFAULT_MAX_PENDING_BYTES", "EVENT_BYTES", "AutoPersistingRecorder", "held_bytes"]

logger = logging.getLogger("phi_session.persist")

DEFAULT_MAX_PENDING_BYTES = 16 * 1024 * 1024
"""Finished sessions (estimated bytes of memory they hold, `held_bytes`) that
may wait for the writer."""

CLOSE_GRACE = 1.0
"""Seconds `AutoPersistingRecorder.close` gives a down store beyond `retry_for`."""

EVENT_BYTES = 600
"""What one recorded event is taken to hold in memory besides the text of its messages,
for the writer's budget: about what W1's events hold once recorded (README,
Performance). Estimating, not encoding sessions, keeps the producer's checkpoint cheap:
the writer encodes each session once, to save it."""

# The only events that carry a session id: they open (or join) a session in the recorder.
_SESSION_EVENTS = (AgentStart, ParallelLoopStart, ParallelLoopEnd)
_SessionEvent = AgentStart | ParallelLoopStart | ParallelLoopEnd


@functools.cache
def _opens_session(kind: type) -> bool:
    """Whether events of type `kind` carry a session id. Asked once per event and cached:
    isinstance() against msgspec's event classes goes through their metaclass."""
    return issubclass(kind, _SESSION_EVENTS)


_SESSION_KEY = b'"session_id"'
_RELEASE_EVERY = 1.0  # seconds
_SAVE_BATCH = 16  # sessions the writer saves at once: one commit, a short hold of the write lock


def held_bytes(session: Session) -> int:
    """What a session counts against the writer's budget: `EVENT_BYTES` per event (and one
    for the session itself) plus the text its loops' messages hold and the JSON size of the
    free-form data they carry (tool-call arguments, tool results' details, extension
    data), so that one huge tool output, image or argument counts for what it weighs. One
    object held in several places (a message resent in every ``TurnRequest``) counts once;
    a copy counts as what it is, another object in memory.

    Never raises: sized while a checkpoint hands sessions over, it would lose every
    session drained with this one. A session it cannot size (a message text that is
    no str, in hand-built events) counts its events only; saving it fails and says why,
    and the session is kept unsaved (`SessionSaver`)."""
    held = EVENT_BYTES * (1 + sum(len(record.events) for record in session.loops))
    try:
        return held + _content_bytes(session)
    except Exception:  # what no store can write either
        return held


def _content_bytes(session: Session) -> int:
    """`held_bytes` beyond its events: texts and free-form data."""
    held = 0
    seen: set[int] = set()
    for record in session.loops:
        for message in record.messages:
            for block in getattr(message, "content", ()):
                held += _block_bytes(block, seen)
            if isinstance(message, ExtensionMessage):
                held += _data_bytes(message.data, seen)
        for stored in record.events:
            event = stored.event
            kind = type(event)
            if kind is ToolExecutionStart:
                held += _data_bytes(cast(ToolExecutionStart, event).args, seen)
            elif kind is ToolExecutionEnd:
                held += _data_bytes(cast(ToolExecutionEnd, event).result.details, seen)
            elif kind is ToolExecutionUpdate:
                held += _data_bytes(cast(ToolExecutionUpdate, event).partial_result.details, seen)
    return held


def _block_bytes(block: object, seen: set[int]) -> int:
    if isinstance(block, ToolCall):
        return _data_bytes(block.arguments, seen)
    return text_size(block)


def _data_bytes(value: object, seen: set[int]) -> int:
    """The JSON size of free-form data, counted once per object (by identity)."""
    if value is None or isinstance(value, (bool, int, float)) or id(value) in seen:
        return 0
    seen.add(id(value))
    if isinstance(value, str):
        return len(value)
    try:
        return json_size(value)
    except Exception:  # not JSON (a Path, say): saving it fails and says why; sizing must not
        return 0


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


_Head = TypeVar("_Head")
_Moved = TypeVar("_Moved")


def _move_head(source: deque[_Head], target: MutableSequence[_Moved], moved: _Moved) -> None:
    """Append `moved`, made of `source`'s head, to `target`, and drop that head. A Ctrl-C
    anywhere leaves it in one of the two: never in both (saved twice), nor lost."""
    head = source[0]
    try:
        target.append(moved)
        source.popleft()
    except BaseException:
        if target and target[-1] is moved and source and source[0] is head:
            source.popleft()  # interrupted between the two
        raise


@dataclass
class _Pending:
    """A session drained from the recorder, not yet saved; `pin` is its first journal seq."""

    session: Session
    pin: int | None
    size: int  # `held_bytes`
    # The sub-agent links its drain left incomplete, completed from the store once it is
    # saved (`_linking`), each taken off as it is tried: its pin keeps its records until
    # they are all tried, for a recovery to note them again.
    gaps: deque[SpawnGap] = field(default_factory=deque)


class AutoPersistingRecorder:
    """Records events and saves every finished session into `store`, in bounded memory.

    * `store`: a `SessionStore`, or any other `SaveTarget` (`OtelExportSink` exports).
    * `journal`: a `Journal` or a directory to open one in (default policy), or None.
      The recorder owns it from now on: `close` closes it (`JournalLocked` if another
      recorder already writes through it). With ``recover_on_start``,
      segments left by a crashed run are first recovered into `store`
      (`recovery_report`); a session the store refuses then is kept as one this run
      failed to save (`failed_sessions`, its records journaled again).
    * `config`: the `SessionRecorderConfig` (also used for recovery).
    * `checkpoint_every`: events between checkpoints; `checkpoint_interval`: seconds
      after which an idle recorder checkpoints anyway (None: never).
    * `max_pending_bytes`: the writer's budget, in bytes of memory the waiting sessions
      hold, estimated by `held_bytes` (default 16 MiB). A checkpoint hands its
      sessions over one at a time while the writer holds less than this (a session
      larger than the budget goes alone), and the producer waits until they are all
      handed over. The writer's own idle checkpoint never waits.
    * `retry_for`: seconds a failing save is retried before the session is set aside.
    * `warn_after`: seconds between warnings while a producer is blocked.

    * `orphans`: without a journal, where events of no known loop
      (`SessionRecorder.orphans`) and the sessions no store accepts go (an `OrphanSink`:
      given a list of events, it keeps them; called with no lock held, from the
      producer that checkpoints or from the writer thread, so possibly from two
      threads at once: it is thread-safe). With a journal they go to
      its ``orphans.jsonl``. With neither, each checkpoint drops the orphan events, with
      a warning counting them (``stats()["orphans_dropped"]``), to keep memory bounded.

    Thread-safe. Query the wrapped recorder through `recorder` (open sessions only:
    saved sessions are no longer in memory). Use as a context manager or call `close`
    (at the latest, an exit hook closes it when the interpreter exits).
    """

    def __init__(
        self,
        store: SaveTarget,
        *,
        journal: Journal | str | os.PathLike[str] | None = None,
        config: SessionRecorderConfig | None = None,
        checkpoint_every: int = 1000,
        checkpoint_interval: float | None = 1.0,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        recover_on_start: bool = True,
        retry_for: float = 30.0,
        warn_after: float = 5.0,
        orphans: OrphanSink | None = None,
    ) -> None:
        check_save_target(store)
        check_callable("orphans", orphans, optional=True)
        if orphans is not None and journal is not None:
            raise InvalidArgument("orphans= is for a recorder without a journal: a journal keeps them itself")
        check_instance(
            "journal", journal, (Journal, str, os.PathLike, type(None)), "a Journal, a path or None"
        )
        check_type("config", config, SessionRecorderConfig, optional=True)
        check_type("checkpoint_every", checkpoint_every, int)
        budget: object = max_pending_bytes
        if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
            raise TypeError(f"max_pending_bytes must be a number of bytes, not {type(budget).__name__}")
        if not float(budget).is_integer():  # 64e6 is a count; 1.5 and NaN are not
            raise InvalidArgument(f"max_pending_bytes must be a whole number of bytes, got {budget!r}")
        max_pending_bytes = int(float(budget))
        if checkpoint_every < 1 or max_pending_bytes < 1:
            raise InvalidArgument("checkpoint_every and max_pending_bytes must be at least 1")
        checkpoint_interval = check_seconds(
            "checkpoint_interval", checkpoint_interval, optional=True, positive=True
        )
        retry_for = check_seconds("retry_for", retry_for)
        self.store = store
        self.recorder = SessionRecorder(config)
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval = checkpoint_interval
        self.max_pending_bytes = max_pending_bytes
        self.warn_after = check_seconds("warn_after", warn_after)
        self._orphan_sink = orphans
        self.recovery_report: RecoveryReport | None = None
        if isinstance(journal, Journal) or journal is None:
            self.journal = journal
        else:
            self.journal = self._open_journal(journal, config, recover_on_start, retry_for)
        kept = None  # the sessions recovery could not save, journaled again
        if self.journal is not None and recover_on_start and self.journal.leftover_segments:
            try:
                report, kept = recover_keeping_unsaved(
                    self.journal, store, config=config, retry_for=retry_for
                )
            except BaseException:
                if not isinstance(journal, Journal):
                    self.journal.close()  # we opened it: do not leave the directory locked
                raise
            self._recovered(report, self.journal.directory)
        elif self.journal is not None and self.journal.leftover_segments:
            # `release` refuses while they are there, so every segment of this run stays too.
            logger.warning(
                "journal %s holds %d segments of an earlier run, not recovered (recover_on_start=False): "
                "no segment of this run is removed until they are (`recover`), so the journal grows",
                self.journal.directory,
                len(self.journal.leftover_segments),
            )
        self._sink = JournaledRecorder(self.journal, self.recorder) if self.journal is not None else None
        self._saver = SessionSaver(
            store, orphans=self.journal.write_orphans if self.journal else orphans, retry_for=retry_for
        )
        self._made_by = os.getpid()
        self._forked = False  # a forked child's copy, not recording yet (`_give_up_in_child`)
        self._new_state()
        if kept is not None:
            self._keep_recovered(kept)
        self._start()
        in_forked_child(self, AutoPersistingRecorder._give_up_in_child)

    def _open_journal(
        self,
        directory: str | os.PathLike[str],
        config: SessionRecorderConfig | None,
        recover_on_start: bool,
        retry_for: float,
    ) -> Journal:
        try:
            return Journal(directory)
        except StoreError as error:
            if not (recover_on_start and out_of_space(error.__cause__)):
                raise
        # The journal filled its disk: no room for this run's first segment, but recovering
        # the earlier run's, which needs none, clears them.
        logger.warning("journal %s: no space left to open it; recovering it first", directory)
        self._recovered(recover(directory, self.store, config=config, retry_for=retry_for), directory)
        return Journal(directory)

    def _recovered(self, report: RecoveryReport, directory: str | os.PathLike[str]) -> None:
        self.recovery_report = report
        logger.warning(
            "recovered %d events of an earlier run from %s into %r: %d sessions saved",
            report.events_replayed,
            directory,
            self.store,
            report.sessions_saved,
        )

    def _keep_recovered(self, kept: KeptUnsaved) -> None:
        """Hold what recovery on start could not save as if this run had failed to save it:
        in `failed_sessions`, retried by `close`, its journal records kept meanwhile."""
        self._saver.keep_unsaved(kept.sessions, kept.error)
        for session in kept.sessions:
            self._unsaved_pins[session.session_id] = kept.first_seq
        logger.warning(
            "recovery of %s: %s; kept in the journal and in failed_sessions() (retried by close)",
            self.journal.directory if self.journal is not None else "",
            not_saved([session.session_id for session in kept.sessions], kept.error, self.store),
        )

    def _new_state(self) -> None:
        """Locks, and nothing held: what recording starts from."""
        # Lock order: _close_lock, then _lock, then _cond.
        # _close_lock: `close` runs one call at a time (a second waits, then finds it done).
        self._close_lock = threading.Lock()
        # _lock (and waits on it): _closed, _sealed, _producers, _feeding, _pins, _late_pins, _drained,
        # _drained_gaps, _gaps, _settled_through, _unwritten_orphans, _since_checkpoint, _events, _counters,
        # _warned_pins.
        # Every event takes it twice (`_enter`, `_leave`): there its lock `_mutex` is
        # acquired and released by hand, sparing the Python-level `Condition.__enter__`
        # and the bound methods a `with` statement makes.
        self._mutex = threading.Lock()
        self._lock = threading.Condition(self._mutex)
        # _cond: the writer's side: _queue, _queued_bytes, _waiting, _linking, _unsaved_pins, _stopping,
        # _releasing, _settle_due, _writer_ended, _backpressure_waits, _blocked_seconds, _last_warning.
        self._cond = threading.Condition(threading.Lock())
        self._closed = False  # no more events
        self._sealed = False  # `close` has drained the recorder for the last time
        # `close` did all its work; one interrupted (Ctrl-C) did not, and is done again.
        self._close_done = False
        self._exiting = False  # the exit hook is closing (`_close_at_exit`)
        self._release_failing = False  # the journal's release failed and has not worked since
        self._producers = 0  # producers inside the recorder now (`close` waits for them)
        # With a journal, the same by the journal seq they started from: their events are
        # numbered from there on, so the journal is kept from there on.
        self._feeding: dict[int, int] = {}
        self._pins: dict[str, int] = {}  # held session -> lowest seq of its journaled events
        self._late_pins: dict[str, int] = {}  # drained session that may be amended -> its pin
        # Drained sessions the recorder says may no longer be owed (`_forget_late_pins`):
        # appended to under the recorder's lock, taken under ours.
        self._maybe_settled: deque[str] = deque()
        self.recorder.set_settled_hook(self._maybe_settled.append if self.journal is not None else None)
        self._settled_through = -1  # every orphan up to this seq is in orphans.jsonl
        # Orphans drained, not yet in orphans.jsonl (or, with no journal, handed to the sink).
        self._unwritten_orphans: list[OrphanEvent] = []
        self._since_checkpoint = 0
        self._events = 0  # events recorded: every event adds one, cheaper to an attribute than in `_counters`
        self._counters = dict.fromkeys(
            ("checkpoints", "orphans_written", "orphans_dropped", "segments_removed"), 0
        )
        self._warned_pins: set[str] = set()
        # Drained from the recorder, not yet waiting (a hand-over interrupted): the next takes them first.
        self._drained: deque[Session] = deque()
        # The sub-agent links the drained sessions left incomplete, not yet filed in `_gaps`.
        self._drained_gaps: deque[SpawnGap] = deque()
        # Drained session -> the sub-agent links it left incomplete, until it is lined up.
        self._gaps: dict[str, list[SpawnGap]] = {}
        self._queue: deque[_Pending] = deque()  # handed to the writer
        self._queued_bytes = 0
        self._waiting: deque[_Pending] = deque()  # drained, waiting for room in the queue
        self._linking: deque[_Pending] = deque()  # saved, the links they left being completed
        self._unsaved_pins: dict[str, int] = {}  # sessions the saver gave up -> their pins
        self._stopping = False
        # The writer thread returned, or died: nothing waits for it then. Set under `_cond`
        # as it ends, which `DaemonThread.is_alive` is not: a waiter woken then would wait on.
        self._writer_ended = False
        self._releasing = False  # the writer is telling the journal what it saved
        self._settle_due = False  # orphans were written since the journal was last told
        self._backpressure_waits = 0
        self._blocked_seconds = 0.0
        self._writer_seconds = 0.0  # CPU time the writer thread spent saving
        self._last_warning = -float("inf")

    def _start(self) -> None:
        self._start_writer()
        # Runs before the exit hooks of the store (opened before us), which close
        # connections the writer may be saving with.
        self._exit_hook = ExitHook(self, self._close_at_exit, self._unsaved_at_exit)

    def _give_up_in_child(self) -> None:
        """In a forked child: the sessions held and queued, the writer thread and the exit
        hook are the parent's, which saves them. Without a journal the child records
        afresh into the same store from its first event on (`_check_open`); a journal is
        the parent's to write (`Journal`), so then the recorder refuses."""
        closed = self._closed
        self.recorder = SessionRecorder(self.recorder.config)
        self._saver = SessionSaver(self.store, orphans=self._orphan_sink, retry_for=self._saver.retry_for)
        self._new_state()  # a parent thread may have held the locks; it does not exist here
        # Until `_check_open`; `close` has nothing of this process's to save.
        self._closed = self._close_done = True
        self._forked = not closed

    def __enter__(self) -> AutoPersistingRecorder:
        return self

    @property
    def config(self) -> SessionRecorderConfig:
        """The recorder's settings (a `Tracer` sink builds streaming deltas only if it keeps them)."""
        return self.recorder.config

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"AutoPersistingRecorder({self.store!r})"

    # -- feeding ------------------------------------------------------------------------------

    @checking_entry
    def on_event(self, event: AgentEvent) -> None:
        """Record one event (journaled first if there is a journal), checked as
        `SessionRecorder.on_event` checks it."""
        if self._closed:  # a closed recorder says so first, whatever the event holds
            with self._mutex:
                self._check_open()
        self.on_checked_event(self.recorder.recordable(event))

    def on_checked_event(self, event: AgentEvent) -> None:
        """`on_event` for a `Tracer`'s event (`SessionRecorder.on_checked_event`)."""
        sink = self._sink
        if sink is None:  # the common case, kept short: every event pays for this wrapper
            self._enter()
            try:
                self.recorder.on_checked_event(event)
            except BaseException:
                self._leave(0)
                raise
            if self._leave(0, recorded=True):
                self.checkpoint()
            return
        start = self._enter()
        try:
            seq = sink.on_checked_event(event, commit=False)
        except BaseException:
            self._leave(start)
            raise
        # Only a journal is pinned by a session's events (`_leave`).
        session_id = cast(_SessionEvent, event).session_id if _opens_session(type(event)) else None
        self._after_event(seq, self._leave(start, session_id, recorded=True))

    def on_json(self, data: bytes | str) -> None:
        """Record one phi-core JSON event line. Raises `DecodeError` (see `JournaledRecorder.on_json`)."""
        start = self._enter()
        session_id = None
        try:
            if self._sink is None:
                self.recorder.on_json(data)
                seq = -1
            else:
                payload = data.encode() if isinstance(data, str) else bytes(data)
                seq = self._sink.on_json(payload, commit=False)  # nothing journaled if it raises
                session_id = _session_of_line(payload)
        except BaseException:
            self._leave(start)
            raise
        self._after_event(seq, self._leave(start, session_id, recorded=True))

    def record_all(self, events: Iterable[AgentEvent]) -> None:
        for event in events:
            self.on_event(event)

    def _enter(self) -> int:
        """A producer starts recording one event; returns the journal seq it may be numbered from."""
        self._mutex.acquire()
        try:
            if self._closed:
                self._check_open()
            self._producers += 1
            if self.journal is None:
                return 0
            start = self.journal.last_seq + 1
            self._feeding[start] = self._feeding.get(start, 0) + 1
            return start
        finally:
            self._mutex.release()

    def _leave(self, start: int, session_id: str | None = None, *, recorded: bool = False) -> bool:
        """The producer is done; pins `session_id` from `start`. Returns whether a checkpoint is due."""
        self._mutex.acquire()
        try:
            self._producers -= 1
            if not self._producers and self._closed:
                self._lock.notify_all()  # `close` waits for the last producer
            if self.journal is not None:
                feeding = self._feeding
                if feeding[start] == 1:
                    del feeding[start]
                else:
                    feeding[start] -= 1
                if session_id is not None:
                    self._pin(session_id, start)
            if not recorded:
                return False
            self._events += 1
            self._since_checkpoint += 1
            return self._since_checkpoint >= self.checkpoint_every
        finally:
            self._mutex.release()

    def _pin(self, session_id: str, seq: int) -> None:
        """Hold the journal from `seq` until `session_id` is saved, if the recorder holds it.

        An event the recorder did not attach to a held session (a late parallel event,
        an orphan) is protected by the orphans' own bookkeeping, not by a pin that
        would never be removed.
        """
        if self.recorder.holds(session_id) or self.recorder.has_early_events(session_id):
            self._pins[session_id] = min(seq, self._pins.get(session_id, seq))

    def _after_event(self, seq: int, due: bool) -> None:
        if self._sink is not None:
            self._sink.commit(seq)  # "always": fsynced before returning (outside the lock)
        if due:
            self.checkpoint()

    def _check_open(self) -> None:
        """Under `_lock`: raise unless events may be recorded."""
        if not self._closed:
            return
        if not self._forked:
            raise PhiSessionError("the AutoPersistingRecorder is closed")
        if self.journal is not None:
            raise UsedAfterFork(
                f"{self!r} journals into {self.journal.directory}, opened by process {self._made_by}; "
                "a forked process must make its own recorder, with its own journal, after the fork"
            )
        self._forked = self._closed = self._close_done = False
        self._start()

    # -- checkpoints ------------------------------------------------------------------------------

    def checkpoint(self, *, loop_id: str | None = None, timeout: float | None = None) -> int:
        """Hand every finished session to the writer now; returns how many.

        Blocks until they are all in the writer's queue, which holds at most
        `max_pending_bytes` (plus one session): backpressure when the store lags; for
        `timeout` seconds at most if given (None or infinite: no limit), those still
        waiting for room then going into the queue as it empties (`wait_saved` waits for
        them). With `loop_id`, of the open sessions only that loop's is looked at
        (`SessionRecorder.checkpoint`).
        """
        check_type("loop_id", loop_id, str, optional=True)
        deadline = deadline_of("timeout", timeout)
        with self._lock:
            if self._closed:  # `close` hands everything over itself
                return 0
        handed = self._hand_over(functools.partial(self.recorder.checkpoint, loop_id=loop_id))
        self._wait_for_room(deadline)
        return handed

    def _hand_over(self, complete: Callable[[], object], *, last: bool = False) -> int:
        """Complete sessions with `complete` (the recorder's checkpoint or flush), drain them
        and their orphans, and line them up for the writer; returns how many."""
        complete()  # runs after_task callbacks: no lock held
        with self._lock:
            handed = 0 if self._sealed else self._line_up(last)
        if self.journal is None:
            self._keep_orphans()  # no lock held; also what an interrupted one left
        return handed

    def _line_up(self, last: bool) -> int:
        """Under `_lock`: drain the completed sessions and line them up for the writer,
        and the orphans (journaled, or left for `_keep_orphans`); returns how many."""
        self._since_checkpoint = 0
        self._counters["checkpoints"] += 1
        if not last:
            self._restart_writer()
        # Read before draining: every event up to it has been applied by then.
        settled = self.journal.last_seq if self.journal is not None else -1
        self._drained.extend(self.recorder.drain_completed())
        self._drained_gaps.extend(self.recorder.drain_spawn_gaps())
        while self._drained_gaps:  # each left there until filed: a Ctrl-C keeps the rest
            gap = self._drained_gaps[0]
            _move_head(self._drained_gaps, self._gaps.setdefault(gap.noted_by, []), gap)
        handed = len(self._drained)
        while self._drained:  # each left there until lined up: a Ctrl-C keeps the rest
            session = self._drained[0]
            # Unpinned once lined up, carrying its pin: a Ctrl-C before leaves it drained
            # and pinned (one handled right between the two keeps the journal longer).
            gaps = deque(self._gaps.get(session.session_id, ()))
            item = _Pending(session, self._pin_of(session.session_id), held_bytes(session), gaps)
            with self._cond:
                _move_head(self._drained, self._waiting, item)
            self._gaps.pop(session.session_id, None)
            self._unpin(session.session_id)
            with self._cond:
                self._admit()
        self._forget_late_pins()
        if self.journal is not None:
            self._write_orphans(self.journal, settled)
        else:
            self._unwritten_orphans.extend(self.recorder.drain_orphans())
        # Only now: a `close` interrupted before, or failing to write the orphans, is
        # done again, and hands over (and writes) what is still there.
        self._sealed = last
        return handed

    def _restart_writer(self) -> None:
        """Start the writer again if it died (logged, `_run`): the sessions handed over are
        saved again, and the backpressure holds, from this checkpoint on."""
        with self._cond:
            if self._writer_ended and not self._stopping:
                self._writer_ended = False
                self._start_writer()

    def _start_writer(self) -> None:
        self._writer = DaemonThread(self._run, "phi-session auto-persist writer")

    def _pin_of(self, session_id: str) -> int | None:
        """The lowest journal seq a session's records start from (under `_lock`), or None."""
        pins = (self._pins.get(session_id), self._late_pins.get(session_id))
        return min((pin for pin in pins if pin is not None), default=None)

    def _unpin(self, session_id: str) -> None:
        """Unpin a session lined up for the writer (under `_lock`).

        A drained session that may still come back as an amendment (its parallel
        group's end, the tool call that spawned it, are still to come) keeps its
        journal records until it no longer may: recovery needs them to redo it.
        """
        pin = self._pin_of(session_id)
        self._pins.pop(session_id, None)
        self._late_pins.pop(session_id, None)
        if pin is not None and self.recorder.may_amend(session_id):
            self._late_pins[session_id] = pin

    def _forget_late_pins(self) -> None:
        """Drop the late pins of sessions no longer owed anything (under `_lock`): of those
        the recorder said may no longer be, not of every one owed (a hub's sub-agents
        owed their tool calls, each drained at its loop's checkpoint). One that comes back
        as an amendment is held (its pin goes when it is drained again, `_unpin`)."""
        settled = self._maybe_settled
        while settled:
            session_id = settled.popleft()
            if (
                session_id in self._late_pins
                and not self.recorder.may_amend(session_id)
                and not self.recorder.holds(session_id)
            ):
                del self._late_pins[session_id]

    def _write_orphans(self, journal: Journal, settled: int) -> None:
        """Journal the recorder's orphans; `settled` once they (and earlier ones) are written."""
        self._unwritten_orphans.extend(self.recorder.drain_orphans())
        if self._unwritten_orphans:
            # Kept until written: if the journal fails now, the next checkpoint tries again.
            written = journal.write_orphans(o.event for o in self._unwritten_orphans)
            self._counters["orphans_written"] += written
            self._unwritten_orphans.clear()
            with self._cond:
                # The checkpoint file must say so soon, even with no session to save: a
                # recovery would otherwise replay these events and write them again.
                self._settle_due = True
                self._cond.notify_all()
        self._settled_through = settled

    def _keep_orphans(self) -> None:
        """Without a journal, hand the orphans drained so far to the `orphans` sink, or drop
        them if there is none or it fails: held, they would grow without bound. Counted,
        and said. Interrupted (Ctrl-C), they wait for the next hand-over."""
        with self._lock:
            loose, self._unwritten_orphans = self._unwritten_orphans, []
        if not loose:
            return
        failure = "no orphans sink (AutoPersistingRecorder(orphans=...))"
        handed = False
        try:
            if self._orphan_sink is not None:
                self._orphan_sink([orphan.event for orphan in loose])
                handed = True
                with self._lock:
                    self._counters["orphans_written"] += len(loose)
                return
        except Exception as error:
            failure = f"the orphans sink failed: {type(error).__name__}: {error}"
        except BaseException:
            if not handed:  # the sink did not take them: the next hand-over does
                with self._lock:
                    self._unwritten_orphans[:0] = loose
            raise
        with self._lock:
            self._counters["orphans_dropped"] += len(loose)
            so_far = self._counters["orphans_dropped"]
        logger.warning(
            "%s of no known loop dropped, %s; %d so far",
            "1 event" if len(loose) == 1 else f"{len(loose)} events",
            failure,
            so_far,
        )

    def _admit(self) -> None:
        """Move waiting sessions into the writer's queue while it has room (under `_cond`).

        The queue always takes one session when empty, so a session larger than the
        budget cannot block, and nothing waits while the writer is idle.
        """
        while self._waiting and (not self._queue or self._queued_bytes < self.max_pending_bytes):
            item = self._waiting[0]
            _move_head(self._waiting, self._queue, item)
            self._queued_bytes += item.size
        self._cond.notify_all()

    def flush(self) -> None:
        """End of stream: abort open loops, hand every session over and wait until each is
        saved or, refused by the store, set aside in `failed_sessions` (which `close`
        retries, raising `StoreError` if they still fail). A writer thread that died is
        started again first; `PhiSessionError` if it dies (logged) during the flush, leaving
        sessions unsaved: the next checkpoint, or `close`, tries them again."""
        with self._lock:
            self._check_open()
        self._hand_over(self.recorder.flush)
        if not self.wait_saved():
            raise PhiSessionError(
                f"{self!r}: the writer thread died (logged), {self._left_to_save()} sessions not saved;"
                " the next checkpoint or close() tries them again"
            )

    def _left_to_save(self) -> int:
        """Sessions handed over to the writer, not yet tried."""
        with self._cond:
            return len(self._queue) + len(self._waiting)

    def wait_saved(self, timeout: float | None = None) -> bool:
        """Wait until every handed-over session is saved (or set aside) and the journal
        knows it (`Journal.release`); False on timeout, or if the writer thread died (logged)
        leaving some: the next checkpoint starts it again, `close` saves them. An infinite
        `timeout` is none."""
        deadline = deadline_of("timeout", timeout)
        with self._cond:
            while (
                self._queue or self._waiting or self._linking or self._releasing or self._settle_due
            ) and not self._writer_ended:
                remaining = seconds_left(deadline)
                if remaining == 0:
                    return False
                self._cond.wait(remaining)
            return not (self._queue or self._waiting)

    def _wait_for_room(self, deadline: float | None = None) -> None:
        """Backpressure: wait until every drained session is in the writer's queue (or
        `deadline`, a `time.monotonic()` instant, passes)."""
        with self._cond:
            if not self._waiting:
                return
            self._backpressure_waits += 1
            started = time.monotonic()
            if started - self._last_warning >= self.warn_after:  # one warning per episode, not per wait
                self._last_warning = started
                where = (
                    "its events are durable in the journal"
                    if self.journal is not None
                    else "nothing is dropped"
                )
                logger.warning(
                    "store %r is %d sessions (%d bytes) behind: blocking the producer until it catches "
                    "up (%s); %d waits so far",
                    self.store,
                    len(self._queue) + len(self._waiting),
                    self._queued_bytes,
                    where,
                    self._backpressure_waits,
                )
            while self._waiting and not self._stopping and not self._writer_ended:
                left = seconds_left(deadline)
                if left == 0:
                    break
                pause = wait_limit(self.warn_after if left is None else min(left, self.warn_after))
                if not self._cond.wait(pause) and self._waiting and pause == self.warn_after:
                    self._last_warning = time.monotonic()
                    logger.warning(
                        "producer still blocked after %.0f s: %d sessions waiting for %r",
                        time.monotonic() - started,
                        len(self._queue) + len(self._waiting),
                        self.store,
                    )
            self._blocked_seconds += time.monotonic() - started

    # -- the writer thread ---------------------------------------------------------------------

    def _run(self) -> None:
        """The writer thread. Should it die (a bug; a store raising a `BaseException`, as
        gevent's `Timeout` is), it says so and wakes whoever waits for it: `flush`, the
        backpressure; what it left is saved by `close` (`_save_leftovers`)."""
        try:
            self._write()
        except BaseException:
            logger.error(
                "%r: the writer thread died; the next checkpoint starts it again, %d sessions handed"
                " over wait for it (or close)",
                self,
                self._left_to_save(),
                exc_info=True,
            )
        finally:
            with self._cond:
                self._writer_ended = True
                # A release it died in is over (the next save or `close` releases again):
                # left raised, the flag would keep `wait_saved` waiting for ever.
                self._releasing = False
                self._cond.notify_all()

    def _write(self) -> None:
        self._link_saved()  # what a writer that died left
        last_release = time.monotonic()
        while True:
            with self._cond:
                while not self._queue and not self._stopping and not self._settle_due:
                    if not self._cond.wait(wait_limit(self.checkpoint_interval)):
                        break  # idle for a whole interval: checkpoint below
                if not self._queue and self._stopping:
                    return
                # Saved together, in one transaction where the store can: the queue's head,
                # left in the queue (unsaved, for `wait_saved` and the journal) until saved.
                batch = list(itertools.islice(self._queue, _SAVE_BATCH))
                # Orphans were written: the journal is told so at once, before any save.
                settle = self._releasing = self._settle_due
            if settle:
                self._released()
            if not batch:
                if not settle:
                    self._idle_checkpoint()
                continue
            started = time.thread_time()
            self._saver.save_many([item.session for item in batch], each=self._tried_head)
            self._link_saved()
            with self._cond:
                self._writer_seconds += time.thread_time() - started
                # Releasing costs a checkpoint-file fsync: when caught up, or now and then under load.
                self._releasing = (
                    self._settle_due or not self._queue or time.monotonic() - last_release >= _RELEASE_EVERY
                )
                self._admit()
            if self._releasing:
                self._released()
                last_release = time.monotonic()

    def _tried_head(self, outcome: SaveOutcome) -> None:
        """The queue's head was tried, with `outcome`: it leaves the queue at once (a writer
        dying on the next does not leave it to be saved again), for `_linking` if it left
        sub-agent links to complete (not if it went to the orphans: not stored, it links
        nothing)."""
        with self._cond:
            item = self._queue[0]
            if item.gaps and not outcome.orphaned:
                _move_head(self._queue, self._linking, item)
            else:
                self._queue.popleft()
            self._queued_bytes -= item.size
            if outcome.unsaved:
                self._keep_pin(item)

    def _link_saved(self) -> None:
        """Complete the sub-agent links the saved sessions left incomplete; each session
        leaves `_linking` once all its links are tried."""
        while True:
            with self._cond:
                if not self._linking:
                    return
                item = self._linking[0]
            self._saver.link_spawns(item.gaps)
            with self._cond:
                self._linking.popleft()

    def _released(self) -> None:
        """The writer tells the journal what is stored and settled; `wait_saved` waits for it."""
        self._release_journal()
        with self._cond:
            self._releasing = False
            self._cond.notify_all()

    def _keep_pin(self, item: _Pending) -> None:
        """The saver kept `item` unsaved: its journal records must stay (under `_cond`)."""
        if item.pin is not None:
            sid = item.session.session_id
            self._unsaved_pins[sid] = min(item.pin, self._unsaved_pins.get(sid, item.pin))

    def _idle_checkpoint(self) -> None:
        with self._lock:
            if self._closed:
                return
        try:
            self._hand_over(self.recorder.checkpoint)
        except PhiSessionError as error:  # e.g. the journal failed: producers see it too
            logger.error("periodic checkpoint failed: %s", error)

    def _release_journal(self) -> None:
        """Tell the journal what is stored: segments below every unsaved session can go."""
        if self.journal is None:
            return
        unsaved_ids = {session.session_id for session in self._saver.unsaved}
        with self._lock:
            with self._cond:
                self._settle_due = False  # `settled` is read below, under the same lock
                unsaved = [p.pin for p in (*self._queue, *self._waiting, *self._linking) if p.pin is not None]
                unsaved += [pin for sid, pin in self._unsaved_pins.items() if sid in unsaved_ids]
            settled = self._settled_through
            # The recorder's orphans are written under `_lock`, the saver's by this thread: the
            # size read now holds those of `settled` and of the sessions no longer pinned.
            orphans_settled = self.journal.orphans_size()
            # Orphans the recorder still holds are only safe once written (settled).
            stored_below = min(
                (*self._pins.values(), *self._late_pins.values(), *self._feeding, *unsaved, settled + 1)
            )
            self._warn_about_stuck_pin(stored_below)
        try:
            removed = self.journal.release(
                stored_below, settled_through=settled, orphans_settled=orphans_settled
            )
        except PhiSessionError as error:
            if not isinstance(error.__cause__, OSError):  # leftovers (warned about on start), closed
                logger.debug("journal not released: %s", error)
            elif not self._release_failing:  # the checkpoint or a removal failed: say so once
                self._release_failing = True
                logger.warning(
                    "journal %s keeps growing until a release works again (the sessions are saved): %s",
                    self.journal.directory,
                    error,
                )
            return
        self._release_failing = False
        with self._lock:
            self._counters["segments_removed"] += removed

    def _warn_about_stuck_pin(self, stored_below: int) -> None:
        """Say so when the journal is held back by events the recorder keeps outside any session.

        ParallelLoopStart/End for a session the recorder does not hold (it was saved and
        drained already) wait in the recorder for that session to start again; until
        then their segments cannot be released.
        """
        for session_id, pin in self._pins.items():
            if (
                pin == stored_below
                and session_id not in self._warned_pins
                and not self.recorder.holds(session_id)
                and all(session.session_id != session_id for session in self._drained)
            ):
                self._warned_pins.add(session_id)
                logger.warning(
                    "journal %s is kept from record %d on: session %s has session events "
                    "the recorder holds outside any session",
                    self.journal.directory if self.journal else "",
                    pin,
                    session_id,
                )

    # -- closing and inspection ----------------------------------------------------------------

    def failed_sessions(self) -> list[Session]:
        """Sessions the store refused (kept in memory, retried by `close`)."""
        return self._saver.unsaved

    def retry_failed(self, within: float | None = None) -> int:
        """Try to save the `failed_sessions` again (after `close` too); returns how many still fail.

        `within`: seconds at most (None or infinite: no limit), for an owner that must end
        in bounded time on a store whose every attempt waits for a timeout. Past them, with
        the store down, the sessions left are kept without being tried (the attempt then
        under way finishes); the next call tries them.
        """
        deadline = deadline_of("within", within)
        if deadline is None:
            return self._saver.retry_unsaved()
        with self._saver.trying_for(deadline - time.monotonic()):
            return self._saver.retry_unsaved()

    def close(self) -> None:
        """Flush the recorder, save everything, close the journal. Idempotent.

        Waits for producers still recording an event. Raises `StoreError` if some
        sessions still cannot be saved; they stay in `failed_sessions` (and in the
        journal, which then keeps their segments). On a store that is down, close
        gives up after `retry_for` seconds plus one (and the attempt then under way),
        however many sessions are pending: those left are kept without being tried.

        An interrupted close (Ctrl-C) takes no more events but is not done: the next
        call (at the latest, the exit hook's) goes on from where it stopped, and raises
        what it would have. A thread calling it while another closes waits for it.
        """
        with self._close_lock:
            if self._close_done:
                return
            with self._lock:
                self._closed = True
                while self._producers:
                    self._lock.wait()
            # Bounded even on a dead store whose every attempt waits for a timeout: past this,
            # what is left is kept (failed_sessions, the journal) without being tried; by this
            # close only, `retry_failed` tries them again.
            with self._saver.trying_for(self._saver.retry_for + CLOSE_GRACE, every_thread=True):
                orphans_error = None
                try:
                    self._hand_over(self.recorder.flush, last=True)
                except PhiSessionError as error:  # the sessions are handed over; the orphans stay journaled
                    orphans_error = error
                with self._cond:
                    self._stopping = True
                    self._cond.notify_all()
                self._writer.join()
                self._save_leftovers()
                unsaved = self._saver.retry_unsaved()  # last chance
            self._release_journal()
            journal_error = None
            if self.journal is not None:
                try:
                    self.journal.close()
                except StoreError as error:  # said below, with the sessions it leaves in memory only
                    journal_error = error
                # Its write-ahead hook went with the journal: the recorder may be journaled again.
                self.recorder.release_hooks(self._maybe_settled.append)
            self._close_done = True
            self._exit_hook.cancel()
        if unsaved:
            what = not_saved([s.session_id for s in self._saver.unsaved], self._saver.last_error, self.store)
            if journal_error is not None:
                where = f"; the journal failed too: {journal_error}"
            elif self._exiting:  # failed_sessions() goes with the process
                where = f"; {self._kept_in_journal()}" if self.journal else "; they are lost"
                raise StoreError(f"{what}{where}")
            else:
                where = f" and in the journal {self.journal.directory}" if self.journal else ""
            raise StoreError(f"{what}; they are in failed_sessions(){where}") from journal_error
        if journal_error is not None:
            raise journal_error
        if orphans_error is not None:
            raise orphans_error

    def _save_leftovers(self) -> None:
        """Save what the stopped writer left (it died); each session leaves the queue once
        tried, so that a `close` interrupted meanwhile goes on with the next. A link whose
        completion raises (gevent's `Timeout` on a hung read) is dropped, said here: one
        raising every time would keep `close` from ever finishing."""
        while True:
            with self._cond:
                self._admit()
                if not self._queue:
                    break
                session = self._queue[0].session
            self._tried_head(self._saver.save(session))
        while True:
            try:
                self._link_saved()
                return
            except INTERRUPTS:
                raise
            except BaseException:
                logger.error(
                    "%r: completing a sub-agent link failed; it keeps its spawn ref without the tool call",
                    self,
                    exc_info=True,
                )

    def _close_at_exit(self) -> None:
        """`close` from the exit hook: no caller is left to raise to, nor to read
        `failed_sessions`; what is left unsaved is said in one line, with where it is."""
        self._exiting = True
        try:
            self.close()
        except PhiSessionError as error:
            logger.error("%r at interpreter exit: %s", self, error)

    def _unsaved_at_exit(self) -> str:
        """What a close interrupted at interpreter exit leaves unsaved (`ExitHook`)."""
        held = self.recorder.stats()
        with self._cond:
            handed = len(self._queue) + len(self._waiting)
        count = (
            len(self._drained)
            + held["open_sessions"]
            + held["completed_sessions"]
            + handed
            + self._saver.stats().unsaved
        )
        if self.journal is None:
            return f"up to {count} sessions not saved into {self.store!r} are lost"
        return f"up to {count} sessions not saved into {self.store!r}; {self._kept_in_journal()}"

    def _kept_in_journal(self) -> str:
        directory = self.journal.directory if self.journal is not None else ""
        return (
            f"their events are kept in the journal {directory}, for recover "
            "(or the next AutoPersistingRecorder on it)"
        )

    def stats(self) -> dict[str, float]:
        """Counters: events, checkpoints, sessions saved/retried/orphaned/failed,
        sessions and bytes queued for the writer, sessions waiting for room,
        backpressure waits and seconds blocked, CPU seconds the writer spent saving
        (its share of the GIL, against the process's CPU time), orphan events written (or,
        without a journal, dropped), journal
        segments removed and sequence numbers, plus the recorder's own `stats`."""
        saver = self._saver.stats()
        with self._lock, self._cond:
            stats: dict[str, float] = {"events": self._events, **self._counters}
            stats.update(
                {
                    "sessions_saved": saver.saved,
                    "save_retries": saver.retried,
                    "sessions_orphaned": saver.orphaned,
                    "sessions_failed": saver.unsaved,
                    "sessions_queued": len(self._queue),
                    "bytes_queued": self._queued_bytes,
                    "sessions_waiting": len(self._waiting),
                    "backpressure_waits": self._backpressure_waits,
                    "backpressure_seconds": round(self._blocked_seconds, 3),
                    "writer_cpu_seconds": round(self._writer_seconds, 3),
                }
            )
            stats.update(self.recorder.stats())
            if self.journal is not None:
                stats["journal_last_seq"] = self.journal.last_seq
                stats["journal_acknowledged_seq"] = self.journal.acknowledged_seq
            return stats
