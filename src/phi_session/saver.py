"""Saving sessions into a store: one policy for every path that drains a recorder.

`SessionSaver` is what `AutoPersistingRecorder`, `consume`, journal recovery and the
command line use to save sessions, so all of them fail the same way. The policy:

* **Transient errors are retried.** `SessionLocked`, `StoreError`, `OSError` and
  `ExportError` (a busy database, a dropped connection, a full disk, a collector
  down) are retried with doubling
  pauses (0.05 s up to 2 s) until `retry_for` seconds have passed since the first
  attempt. Once a session has been given up, the store is taken to be down: later
  sessions get one attempt each until a save succeeds again, so a dead store costs
  `retry_for` once, not once per session. An owner trying the sessions it gave up
  again at each checkpoint (the ingest worker) gives each one attempt (``once``): one
  the store keeps failing must not hold up the others every time. An owner that must
  end in bounded time (`AutoPersistingRecorder.close`) sets a deadline
  (`stop_trying_after`, or `trying_for` for one thread's calls within a block): past it, a session
  being retried stops, and one is not even tried while the store is down, since each
  attempt on a dead server can itself take seconds (a connect or lock timeout); it is
  kept unsaved.
* **A closed store is not retried.** `StoreClosed` (its ``close`` was called: a
  `PostgresStore` left its ``with`` block before the recorder saving into it) cannot
  change with time: every session is kept in `unsaved` at once, with one error line
  for them all.
* **What the store holds unusable is not retried.** `StoredSessionUnusable` (the
  stored copy of the session does not decode) fails every save of that id until
  someone moves it aside: the session gets one attempt and one error line, and is
  kept in `unsaved`; the store is not taken to be down.
* **A session id no store accepts goes to the orphans.** `InvalidSessionId` cannot
  change on a retry or a restart: the session's events are handed to the `orphans`
  sink (the journal's ``orphans.jsonl``, the command line's ``--orphans`` file)
  instead of being retried forever. So do those of a session the store refuses
  (`SessionRefused`: a constraint, check or trigger of the database).
* **Nothing is dropped.** Any other exception is a bug in the store and is not
  retried. A session that is neither saved nor orphaned is kept in `unsaved`, where
  `retry_unsaved` tries it again; drained sessions are held until their save has
  finished, so an interrupt (Ctrl-C, task cancellation) in the middle of a save
  leaves them for the next `drain` rather than losing them.
* **A session's pieces keep their order.** A later piece of a session with pieces kept
  unsaved is saved merged after them (and takes them out of `unsaved`), so an outage
  never has a continuation stored before the loop it continues.
* **Sub-agent links recorded apart are completed from the store.** A sub-agent whose
  spawner another recorder holds (another process's, another adapter's tracer) is
  saved with a spawn ref lacking its tool call. The recorder notes such links
  (`SpawnGap`), and `drain` completes each once the session that noted it is saved:
  it reads the other end's outline (once) and, if that holds the link, saves the
  sub-agent's header with the tool call as an amendment. A read that fails is warned
  of, not retried. A target with nothing to read (an exporter) is told of each link
  instead, if it asks (`LinkingTarget`).
* **Every outcome is counted** (`SaveStats`) and logged on ``phi_session.saver``:
  a retry or a session orphaned as a warning, a session given up as an error. A store
  down is said once, not per session: the session given up that takes it to be down
  as an error (and, past `stop_trying_after`'s deadline, the first session not tried),
  those kept after it at debug level, and when a save succeeds again, how many
  sessions were kept unsaved meanwhile, as a warning (their owners say what is left
  unsaved at close).

Saving a session twice is harmless: stores merge what they already hold by loop id.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, TypeGuard, TypeVar, runtime_checkable

import msgspec
from msgspec.structs import replace

from ._checks import check_callable, check_seconds, check_type
from ._owning import copy_failures, owned_free_form
from .errors import (
    ExportError,
    InvalidSessionId,
    PhiSessionError,
    SessionLocked,
    SessionNotFound,
    SessionRefused,
    StoreClosed,
    StoredSessionUnusable,
    StoreError,
    UnwritableValue,
)
from .events import AgentEvent, AgentStart
from .ids import session_id_from_loop_id
from .model import ChildLoopRef, Session
from .recorder import SessionRecorder, SpawnGap
from .stores.base import SessionStore, escaped_to_save, merge_sessions
from .stores.outline import SessionOutline

__all__ = [
    "BatchStore",
    "LinkingTarget",
    "OrphanSink",
    "SaveOutcome",
    "SaveStats",
    "SaveTarget",
    "SessionSaver",
]

logger = logging.getLogger("phi_session.saver")

OrphanSink = Callable[[list[AgentEvent]], object]
"""Takes the events of a session no store can hold and keeps them durably (or raises)."""

_TRANSIENT = (SessionLocked, StoreError, OSError, ExportError)

_Drained = TypeVar("_Drained")


def one_at_a_time(drained: deque[_Drained]) -> Iterator[_Drained]:
    """Each of `drained` in turn, left at its head until the caller asks for the next.

    Sessions taken out of a recorder are held there, not in a local list: an
    interrupt (Ctrl-C, a cancelled task) while one is handled leaves it and those
    after it for the next pass, where a local list would go with the interrupted frame.
    """
    while drained:
        yield drained[0]
        drained.popleft()


INTERRUPTS = (KeyboardInterrupt, asyncio.CancelledError)
"""What interrupts work under way (Ctrl-C, a cancelled task), to be gone on with later; any
other `BaseException` (gevent's `Timeout`) may be raised again by every attempt."""
LINK_INTERRUPTS = 3
"""Interrupts a sub-agent link is put back after: one whose read hangs until a timeout
cancels it every time is then dropped, not tried by every later drain."""

_LASTING = (StoredSessionUnusable, StoreClosed, SessionRefused)  # store errors no retry helps
_FIRST_PAUSE = 0.05
_MAX_PAUSE = 2.0


def _may_pass(error: Exception | None) -> TypeGuard[Exception]:
    """Whether a store's `error` may pass with time (a busy database, a dropped connection):
    worth trying again."""
    return isinstance(error, _TRANSIENT) and not isinstance(error, _LASTING)


@dataclass(frozen=True)
class SaveOutcome:
    """What became of one session: saved, orphaned, or kept in `SessionSaver.unsaved`."""

    saved: bool
    orphaned: bool = False
    error: Exception | None = None
    """The last error met (None if the first attempt saved it)."""

    @property
    def unsaved(self) -> bool:
        return not (self.saved or self.orphaned)


# The policy yields the pause before each attempt and is sent the attempt's error
# (None on success); it returns the outcome.
_Policy = Generator[float, "Exception | None", SaveOutcome]


@dataclass(frozen=True)
class SaveStats:
    """What a `SessionSaver` did so far."""

    saved: int = 0
    """Successful saves (a session saved at two checkpoints counts twice)."""
    retried: int = 0
    """Attempts that repeated a failed one."""
    orphaned: int = 0
    """Sessions whose id no store accepts; their events went to the orphans sink."""
    unsaved: int = 0
    """Sessions held in `SessionSaver.unsaved` right now."""


class SaveTarget(Protocol):
    """What a `SessionSaver` saves into: a `SessionStore`, or anything else that takes whole
    sessions (`OtelExportSink` saves into its exporter)."""

    def save(self, session: Session) -> None: ...

    async def asave(self, session: Session) -> None: ...


@runtime_checkable
class BatchStore(Protocol):
    """A store that saves many sessions in one transaction, all or none (`SqliteStore`)."""

    def save_many(self, sessions: Sequence[Session]) -> None: ...


@runtime_checkable
class LinkingTarget(Protocol):
    """A `SaveTarget` with no stored outlines to complete sub-agent links from, told of each
    link its saver cannot complete (`SpawnGap`) once the session that noted it is saved:
    `OtelExportSink`'s, which holds a sub-agent for the tool call its recorder would name,
    and need not when the spawner is recorded elsewhere."""

    def unlinked(self, gap: SpawnGap) -> None: ...


def not_saved(ids: Sequence[str], error: BaseException | None, into: object = None) -> str:
    """``2 sessions could not be saved into <store> (s1, s2): <error>``: how the owners of
    a saver say what it could not save (at most five ids are named; a session kept in
    several pieces counts once)."""
    ids = list(dict.fromkeys(ids))
    noun = "session" if len(ids) == 1 else "sessions"
    target = f" into {into!r}" if into is not None else ""
    named = ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")
    # One line: a driver's message may span several (psycopg's hints).
    cause = "; ".join(line.strip() for line in str(error).splitlines() if line.strip()) if error else ""
    return f"{len(ids)} {noun} could not be saved{target} ({named}){f': {cause}' if cause else ''}"


def check_save_target(store: object) -> None:
    """`TypeError` unless `store` can be saved into (a `SaveTarget`, such as a `SessionStore`):
    checked where it is given, as every session saved into anything else is lost."""
    if not (callable(getattr(store, "save", None)) and callable(getattr(store, "asave", None))):
        raise TypeError(f"store must be a SessionStore (or another SaveTarget), not {type(store).__name__}")


def _check_session(session: object) -> None:
    if not isinstance(session, Session):
        raise TypeError(f"expected a Session, got {type(session).__name__}")


class SessionSaver:
    """Saves sessions into `store` under the module's policy; thread-safe.

    * `orphans`: where the events of a session with an id no store accepts go
      (called with a list of events; may raise, then the session stays unsaved).
      Without it such sessions stay in `unsaved`.
    * `retry_for`: seconds a transient failure is retried before the session is
      given up (kept in `unsaved`).
    * `on_saved`: called with each session once it is saved (a drain interrupted by
      Ctrl-C returns nothing, though it may have saved some).

    `save`/`asave` save one session; `drain`/`adrain` do a recorder's checkpoint (or
    flush), drain its completed sessions and save them. `drain` and `adrain` are
    meant for one caller at a time.
    """

    def __init__(
        self,
        store: SaveTarget,
        *,
        orphans: OrphanSink | None = None,
        retry_for: float = 10.0,
        on_saved: Callable[[Session], object] | None = None,
    ) -> None:
        check_save_target(store)
        check_callable("orphans", orphans, optional=True)
        self.store = store
        self.retry_for = check_seconds("retry_for", retry_for)
        self._orphans = orphans
        self._on_saved = on_saved
        self._lock = threading.Lock()  # guards the counters, `_unsaved` and `_store_down`
        self._saved = self._retried = self._orphaned = 0
        self._unsaved: list[Session] = []
        self._in_retry: list[deque[Session]] = []  # what `retry_unsaved` takes out, not yet tried
        self._store_down = False  # a session was given up and no save succeeded since
        self._down_error: Exception | None = None  # the error that gave the last session up
        self._kept_while_down: set[str] = set()  # the ids of the sessions kept since it went down
        self._untried_said = False  # past the deadline with the store down: said, for all sessions
        self._last_error: Exception | None = None  # the error that kept the last session unsaved
        self._closed_said = False  # the store's `StoreClosed` was logged, and no save succeeded since
        self._no_attempts_after: float | None = None  # `stop_trying_after`'s monotonic instant
        # `trying_for`'s, one per block under way: (the thread it bounds, None for every one;
        # its monotonic instant). Each block removes only its own: overlapping ones keep theirs.
        self._bounds: list[tuple[int | None, float]] = []
        self._drained: deque[Session] = deque()  # drained, not yet through `save`
        self._gaps: deque[SpawnGap] = deque()  # drained with them, not yet linked
        self._link_interrupts: dict[int, int] = {}  # id of a link put back -> interrupts so far
        self._copy_failures = copy_failures(logger)  # `_saved_instead`'s copies, how at DEBUG

    def __repr__(self) -> str:
        return f"SessionSaver({self.store!r})"

    def stop_trying_after(self, seconds: float) -> None:
        """From `seconds` from now on, keep sessions unsaved without trying them while the
        store is down (a session was given up and none saved since); a session already
        being retried stops retrying then. A store that is up is still tried."""
        with self._lock:
            self._no_attempts_after = time.monotonic() + seconds

    @contextmanager
    def trying_for(self, seconds: float, *, every_thread: bool = False) -> Iterator[None]:
        """`stop_trying_after(seconds)` for the calls this thread makes within only (with
        `every_thread`, every call while it lasts: an owner's close bounding its worker's
        saves too). Another thread's calls, and its own block, keep their own bounds; the
        sessions kept are tried again by later calls (`retry_unsaved`), as their owners promise."""
        bound = (None if every_thread else threading.get_ident(), time.monotonic() + seconds)
        with self._lock:
            self._bounds.append(bound)
        try:
            yield
        finally:
            with self._lock:
                self._bounds.remove(bound)  # an equal one left by another block bounds as this did

    def _stop_at(self) -> float | None:
        """The instant past which this thread's calls stop trying a down store, if any
        (`stop_trying_after`, `trying_for`); the caller holds `_lock`."""
        me = threading.get_ident()
        instants = [at for thread, at in self._bounds if thread is None or thread == me]
        if self._no_attempts_after is not None:
            instants.append(self._no_attempts_after)
        return min(instants, default=None)

    # -- one session -----------------------------------------------------------------------

    def save(self, session: Session, *, once: bool = False) -> SaveOutcome:
        """Save `session` under the policy; what became of it. With `once`, one attempt and
        no retry: for an owner trying sessions it gave up again at each checkpoint (the ingest
        worker), so that one the store keeps failing holds up no other."""
        with self._after_unsaved(session) as session:
            if (kept := self._kept_untried(session)) is not None:
                return kept
            policy = self._policy(session, once)
            pause = next(policy)
            while True:
                if pause:
                    time.sleep(pause)
                error: Exception | None = None
                try:
                    self.store.save(session)
                except (UnicodeEncodeError, UnwritableValue) as caught:
                    if (instead := self._saved_instead(session, caught)) is None:
                        error = caught
                    else:
                        session, pause = instead, 0.0
                        continue
                except Exception as caught:
                    error = caught
                try:
                    pause = policy.send(error)
                except StopIteration as done:
                    outcome: SaveOutcome = done.value
                    return self._told(session, outcome)

    def save_many(
        self, sessions: Sequence[Session], *, each: Callable[[SaveOutcome], object] | None = None
    ) -> list[SaveOutcome]:
        """Save `sessions`; what became of each, also given to `each` in order as soon as it
        is known: an owner holding them until saved lets go of those tried before a
        `BaseException` (gevent's `Timeout`) ends the call, not to save them again.

        A store that saves many sessions in one transaction (`BatchStore`, such as
        `SqliteStore`) gets them in one attempt; if that fails, each is saved on its
        own under the policy, so that one the store refuses does not hold back the others.
        """
        for session in sessions:
            _check_session(session)
        if (
            len(sessions) > 1
            and isinstance(self.store, BatchStore)
            and not self._past_deadline_while_down()
            and not self._holds_unsaved(sessions)
        ):
            try:
                self.store.save_many(sessions)
            except Exception as error:  # each is tried again below, and reported there
                logger.debug(
                    "saving %d sessions at once into %r failed: %s", len(sessions), self.store, error
                )
            else:
                self._count_saved(len(sessions))
                return [self._outcome(self._told(s, SaveOutcome(saved=True)), each) for s in sessions]
        return [self._outcome(self.save(session), each) for session in sessions]

    @staticmethod
    def _outcome(outcome: SaveOutcome, each: Callable[[SaveOutcome], object] | None) -> SaveOutcome:
        if each is not None:
            each(outcome)
        return outcome

    async def asave(self, session: Session, *, once: bool = False) -> SaveOutcome:
        """`save` through the store's `asave`, pausing with ``asyncio.sleep``."""
        with self._after_unsaved(session) as session:
            if (kept := self._kept_untried(session)) is not None:
                return kept
            policy = self._policy(session, once)
            pause = next(policy)
            while True:
                if pause:
                    await asyncio.sleep(pause)
                error: Exception | None = None
                try:
                    await self.store.asave(session)
                except (UnicodeEncodeError, UnwritableValue) as caught:
                    if (instead := self._saved_instead(session, caught)) is None:
                        error = caught
                    else:
                        session, pause = instead, 0.0
                        continue
                except Exception as caught:
                    error = caught
                try:
                    pause = policy.send(error)
                except StopIteration as done:
                    outcome: SaveOutcome = done.value
                    return self._told(session, outcome)

    def _saved_instead(self, session: Session, error: UnicodeEncodeError | UnwritableValue) -> Session | None:
        """What to save in place of `session`, which the store refused for what a `Tracer`
        records otherwise: text with lone surrogates (`escaped_to_save`), or a free-form
        value JSON cannot hold, put there after it was recorded (a processor changing an
        event in place): the session with such values copied as a tracer copies them
        (`_owning.owned_free_form`), said once per session; None if nothing changes."""
        if isinstance(error, UnicodeEncodeError):
            return escaped_to_save(session, error)
        owned = owned_free_form(session, self._copy_failures)
        if owned is session:
            return None
        logger.warning(
            "session %s holds a value no store can write (%s): saving it with its free-form values "
            "copied as JSON, as a Tracer records them",
            session.session_id,
            error,
        )
        return owned

    def _told(self, session: Session, outcome: SaveOutcome) -> SaveOutcome:
        if outcome.saved and self._on_saved is not None:
            self._on_saved(session)
        return outcome

    @contextmanager
    def _after_unsaved(self, session: Session) -> Iterator[Session]:
        """`session` after the unsaved earlier pieces of its id, taken out of `unsaved`:
        a later piece saved first would be merged in before them (its loops first, a
        continuation's link to a parent saved later lost). They go back if the save is
        interrupted (Ctrl-C, a task cancelled): the caller keeps only its own piece."""
        _check_session(session)
        with self._lock:
            earlier = [kept for kept in self._unsaved if kept.session_id == session.session_id]
            if earlier:
                self._unsaved = [kept for kept in self._unsaved if kept.session_id != session.session_id]
        if not earlier:
            yield session
            return
        merged = earlier[0]
        for piece in [*earlier[1:], session]:
            merged = merge_sessions(merged, piece)
        try:
            yield merged
        except BaseException:
            with self._lock:
                self._unsaved[:0] = earlier
            raise

    def _holds_unsaved(self, sessions: Sequence[Session]) -> bool:
        with self._lock:
            if not self._unsaved:
                return False
            ids = {session.session_id for session in sessions}
            return any(kept.session_id in ids for kept in self._unsaved)

    def _past_deadline_while_down(self) -> bool:
        with self._lock:
            if not self._store_down:
                return False
            stop_at = self._stop_at()
            return stop_at is not None and time.monotonic() >= stop_at

    def _kept_untried(self, session: Session) -> SaveOutcome | None:
        """The outcome of keeping `session` without an attempt, if `stop_trying_after`'s
        deadline has passed with the store down; else None (it is to be tried)."""
        _check_session(session)
        if not self._past_deadline_while_down():
            return None
        with self._lock:
            error = self._down_error or StoreError(f"{self.store!r} is down")
            first, self._untried_said = not self._untried_said, True
            self._kept_while_down.add(session.session_id)
        # Said once for every session left while the store stays down (how many, when it
        # saves again or by the owner at close): a line per session would bury this one.
        logger.log(
            logging.ERROR if first else logging.DEBUG,
            "not saving session %s nor any after it while %r is down: the time to save is up, "
            "keeping them unsaved: %s",
            session.session_id,
            self.store,
            error,
        )
        return self._keep(session, error)

    def _policy(self, session: Session, once: bool) -> _Policy:
        with self._lock:
            deadline = None if self._store_down or once else time.monotonic() + self.retry_for
        pause = _FIRST_PAUSE
        error = yield 0.0
        last = error
        while _may_pass(error):
            with self._lock:  # read at every retry: `stop_trying_after` may come during one
                stop_at = self._stop_at()
            if deadline is not None and stop_at is not None:
                deadline = min(deadline, stop_at)
            if deadline is None or time.monotonic() + pause > deadline:
                return self._give_up(session, error, once)
            logger.warning(
                "saving session %s into %r failed, retrying in %.2f s: %s",
                session.session_id,
                self.store,
                pause,
                error,
            )
            with self._lock:
                self._retried += 1
            error = yield pause
            last = error or last
            pause = min(pause * 2, _MAX_PAUSE)
        if error is None:
            self._count_saved(1)
            return SaveOutcome(saved=True, error=last)
        if isinstance(error, (InvalidSessionId, SessionRefused)):
            return self._orphan(session, error)
        if isinstance(error, StoreClosed):
            return self._closed_store(session, error)
        # Not an I/O problem (an unusable stored copy, a bug in a custom store): retrying
        # cannot help. A bug's message alone may not say what was raised.
        logger.error(
            "session %s cannot be saved into %r, keeping it unsaved: %s",
            session.session_id,
            self.store,
            error if isinstance(error, StoredSessionUnusable) else repr(error),
        )
        return self._keep(session, error)

    def _closed_store(self, session: Session, error: StoreClosed) -> SaveOutcome:
        """Keep `session`: the store is closed. Said once while it stays closed, not per session."""
        with self._lock:
            first, self._closed_said = not self._closed_said, True
        if first:
            logger.error(
                "%r is closed: not saving session %s, nor any after it while it is, keeping them unsaved: %s",
                self.store,
                session.session_id,
                error,
            )
        return self._keep(session, error)

    def _orphan(self, session: Session, error: InvalidSessionId | SessionRefused) -> SaveOutcome:
        if self._orphans is None:
            logger.error(
                "session %r cannot be stored (%s) and there is no orphans sink: keeping it unsaved",
                session.session_id,
                error,
            )
            return self._keep(session, error)
        try:
            self._orphans([item.event for item in session.iter_events()])
        except (OSError, StoreError) as sink_error:
            logger.error(
                "session %r cannot be stored (%s) nor kept as orphans (%s): keeping it unsaved",
                session.session_id,
                error,
                sink_error,
            )
            return self._keep(session, error)
        logger.warning(  # nothing lost, as a recorder's orphan events
            "session %r cannot be stored (%s); its events are kept as orphans", session.session_id, error
        )
        with self._lock:
            self._orphaned += 1
        return SaveOutcome(saved=False, orphaned=True, error=error)

    def _give_up(self, session: Session, error: Exception, once: bool) -> SaveOutcome:
        """Keep `session`, whose transient `error` outlasted its retries (its one attempt, if
        `once` or the store is down). The store is then taken to be down, unless `once` (one
        session failing again says nothing of the others). Said once while it stays down:
        the sessions kept after the first at debug level, counted for when it saves again."""
        with self._lock:
            said = self._store_down
            if not once:
                self._store_down = True
                self._down_error = error
            if self._store_down:
                self._kept_while_down.add(session.session_id)
        if said:
            logger.debug(
                "saving session %s into %r failed, keeping it unsaved (the store is down): %s",
                session.session_id,
                self.store,
                error,
            )
        else:
            logger.error(
                "saving session %s into %r failed, keeping it unsaved: %s%s",
                session.session_id,
                self.store,
                error,
                ""
                if once
                else "; the store is taken to be down: the sessions after it get one attempt each, "
                "kept unsaved (said at debug level) until a save succeeds",
            )
        return self._keep(session, error)

    def _count_saved(self, count: int) -> None:
        """`count` sessions were saved: the store is up, said if it was down, with how many
        sessions were kept unsaved meanwhile."""
        with self._lock:
            self._saved += count
            kept, self._kept_while_down = len(self._kept_while_down), set()
            self._store_down = self._untried_said = self._closed_said = False
        if kept:
            logger.warning(
                "%r saves again: %d %s kept unsaved while it was down",
                self.store,
                kept,
                "session was" if kept == 1 else "sessions were",
            )

    def _keep(self, session: Session, error: Exception) -> SaveOutcome:
        with self._lock:
            self._unsaved.append(session)
            self._last_error = error
        return SaveOutcome(saved=False, error=error)

    # -- a recorder's completed sessions ---------------------------------------------------

    def drain(self, recorder: SessionRecorder, *, flush: bool = False) -> list[Session]:
        """Checkpoint (or, with `flush`, flush) `recorder`, then save what it completed.

        Returns the sessions saved (not those orphaned or kept unsaved), including
        any an interrupted earlier `drain` had left.
        """
        saved = []
        for session in one_at_a_time(self._take(recorder, flush)):
            outcome = self.save(session)
            if outcome.saved:
                saved.append(session)
            elif outcome.orphaned:
                self._not_stored(session.session_id)
        self.link_spawns(self._gaps)
        return saved

    async def adrain(self, recorder: SessionRecorder, *, flush: bool = False) -> list[Session]:
        """`drain` through `asave`."""
        saved = []
        for session in one_at_a_time(self._take(recorder, flush)):
            outcome = await self.asave(session)
            if outcome.saved:
                saved.append(session)
            elif outcome.orphaned:
                self._not_stored(session.session_id)
        await self.alink_spawns(self._gaps)
        return saved

    def _take(self, recorder: SessionRecorder, flush: bool) -> deque[Session]:
        check_type("recorder", recorder, SessionRecorder)
        if flush:
            recorder.flush()
        else:
            recorder.checkpoint()
        self._drained.extend(recorder.drain_completed())
        self._gaps.extend(recorder.drain_spawn_gaps())  # linked once those sessions are saved
        return self._drained

    def _not_stored(self, session_id: str) -> None:
        """`session_id` went to the orphans: not stored, it links nothing."""
        self._gaps = deque(gap for gap in self._gaps if gap.noted_by != session_id)

    # -- links between sub-agents and spawners recorded apart ------------------------------

    def link_spawns(self, gaps: deque[SpawnGap]) -> None:
        """Complete `gaps` from the store, each taken from `gaps` as it is tried: one that
        raises is not tried again, one interrupted is left for the next call. Their sessions
        (`SpawnGap.noted_by`) must be saved first: of two recorders' sides, the later read
        then sees the other's save."""
        while gaps:
            with self._tried_once(gaps) as gap:
                amendment = self._completed_link(gap)
                if amendment is not None:
                    self.save(amendment)

    async def alink_spawns(self, gaps: deque[SpawnGap]) -> None:
        """`link_spawns` through `asave` (the read runs in a worker thread)."""
        while gaps:
            with self._tried_once(gaps) as gap:
                amendment = await asyncio.to_thread(self._completed_link, gap)
                if amendment is not None:
                    await self.asave(amendment)

    @contextmanager
    def _tried_once(self, gaps: deque[SpawnGap]) -> Iterator[SpawnGap]:
        """The head of `gaps`, taken off as it is tried: one whose completion raises (the host's
        `on_saved`, a bug, a gevent `Timeout` on a hung read) is not tried again, and raised
        again, by every later drain. An interrupt (`INTERRUPTS`) puts it back for the next,
        `LINK_INTERRUPTS` times at most."""
        gap = gaps.popleft()
        with self._lock:
            interrupts = self._link_interrupts.pop(id(gap), 0) + 1
        try:
            yield gap
        except INTERRUPTS:
            if interrupts < LINK_INTERRUPTS:
                with self._lock:
                    self._link_interrupts[id(gap)] = interrupts
                gaps.appendleft(gap)
            else:
                logger.warning(
                    "completing sub-agent session %r's link was interrupted %d times: dropped, its"
                    " spawn ref keeps no tool call",
                    gap.session_id,
                    interrupts,
                )
            raise

    def _completed_link(self, gap: SpawnGap) -> Session | None:
        """The amendment that completes `gap` (the sub-agent's header with the tool call),
        if the other end's stored outline holds the link; read once, not retried."""
        store = self.store
        if not isinstance(store, SessionStore):  # an exporter: nothing to read
            if isinstance(store, LinkingTarget):
                store.unlinked(gap)
            return None
        mine = gap.header is not None
        read = gap.spawn.parent_session_id if mine else gap.session_id
        if self._past_deadline_while_down():
            logger.warning(
                "not reading session %r: %r is down; sub-agent session %r keeps its spawn ref"
                " without the tool call",
                read,
                store,
                gap.session_id,
            )
            return None
        try:
            # The other end's records are decoded here too: one that does not decode
            # (`DecodeError`) is as unreadable as a failed read.
            return _spawn_amendment(gap, store.load_outline(read))
        except (SessionNotFound, InvalidSessionId):  # not stored (yet): its own save links it
            return None
        except Exception as error:  # a link is not worth failing the drain
            logger.warning(
                "session %r could not be read (%s): sub-agent session %r keeps its spawn ref"
                " without the tool call",
                read,
                error if isinstance(error, PhiSessionError) else repr(error),
                gap.session_id,
            )
            return None

    @property
    def pending(self) -> list[Session]:
        """Sessions a `drain` took from its recorder and was interrupted before saving
        (Ctrl-C, a task cancelled): the next `drain` saves them first."""
        return list(self._drained)

    # -- what could not be saved -----------------------------------------------------------

    @property
    def unsaved(self) -> list[Session]:
        """Sessions neither saved nor orphaned, oldest first (those a retry is going
        through included: until saved, their journal records must stay)."""
        with self._lock:
            return self._unsaved_now()

    def _unsaved_now(self) -> list[Session]:
        # A session failing its retry is kept again just before it leaves its batch: once.
        kept = {id(session) for session in self._unsaved}
        retried = [session for batch in self._in_retry for session in batch if id(session) not in kept]
        return [*retried, *self._unsaved]

    @property
    def last_error(self) -> Exception | None:
        """The error that kept the last unsaved session unsaved (None if none was)."""
        with self._lock:
            return self._last_error

    def keep_unsaved(self, sessions: Iterable[Session], error: Exception | None = None) -> None:
        """Hold `sessions`, which another saver gave up (`error`), as unsaved: `retry_unsaved`
        tries them, and a later piece of one of them is saved merged after it."""
        kept = list(sessions)
        for session in kept:
            _check_session(session)
        with self._lock:
            self._unsaved.extend(kept)
            if kept and error is not None:
                self._last_error = error

    def take_unsaved(self) -> list[Session]:
        """Hand the unsaved sessions over to the caller (they are no longer held here)."""
        with self._lock:
            unsaved, self._unsaved = self._unsaved, []
            return unsaved

    def retry_unsaved(self) -> int:
        """Try every unsaved session again; returns how many are still unsaved."""
        with self._retrying() as batch:
            while batch:
                self.save(batch[0])
                with self._lock:  # `unsaved` reads the batch
                    batch.popleft()
        return self.stats().unsaved

    async def aretry_unsaved(self) -> int:
        """`retry_unsaved` through `asave`."""
        with self._retrying() as batch:
            while batch:
                await self.asave(batch[0])
                with self._lock:
                    batch.popleft()
        return self.stats().unsaved

    @contextmanager
    def _retrying(self) -> Iterator[deque[Session]]:
        """The unsaved sessions to retry; those not yet tried when interrupted go back."""
        with self._lock:
            batch, self._unsaved = deque(self._unsaved), []
            self._in_retry.append(batch)
        try:
            yield batch
        finally:
            with self._lock:
                self._in_retry = [other for other in self._in_retry if other is not batch]
                self._unsaved[:0] = batch

    def stats(self) -> SaveStats:
        with self._lock:
            return SaveStats(
                saved=self._saved,
                retried=self._retried,
                orphaned=self._orphaned,
                unsaved=len(self._unsaved_now()),
            )


def _spawn_amendment(gap: SpawnGap, outline: SessionOutline) -> Session | None:
    """The amendment completing `gap` from the other end's stored `outline`, or None if that
    end holds no such link: the sub-agent's header (loops and session events left out, as
    the recorder's amendments do), its spawn ref with the tool call. `merge_sessions` lets a
    spawn ref with the tool call win over one without."""
    spawn = gap.spawn
    header = gap.header
    if header is None:  # the spawner's side: `outline` is the sub-agent's
        header = outline.session
        stored = header.parent_spawn_ref
        if (
            stored is None
            or stored.tool_call_id
            or stored.parent_loop_id != spawn.parent_loop_id
            or not any(
                loop.loop_id in gap.loop_ids and loop.parent_loop_id == spawn.parent_loop_id
                for loop in outline.loops
            )
        ):
            return None
    else:  # the sub-agent's side: `outline` is the spawner's
        named = next(
            (
                ref
                for loop in outline.loops
                if loop.loop_id == spawn.parent_loop_id
                for ref in loop.record.child_loop_refs
                if ref.child_loop_id in gap.loop_ids and ref.tool_call_id
            ),
            None,
        )
        if named is None:
            return None
        spawn = replace(spawn, tool_call_id=named.tool_call_id, tool_name=named.tool_name)
    return replace(header, parent_spawn_ref=spawn, loops=[], session_events=msgspec.UNSET)


class SavedSpawners:
    """The tool calls that spawned sub-agents, read from the store their spawner was saved
    in. A recorder that never held the spawner, or no longer does (a journal's recovery
    replays no released record; an ingest worker taking a partition over replays no event
    marked saved), would give a sub-agent that starts after it a spawn ref without its
    tool call. Read once per spawner session holding tool calls (the latest 64); one not
    stored yet, or holding none, is read again for the next sub-agent (it may be saved by
    then: recorded elsewhere, by another partition's worker).

    For `caller_retries_for` seconds from a spawner session's first failed read, a store
    error that may pass (`StoreError`: a dropped connection, a lock held) is raised by
    `hand_to`, for the caller to start the sub-agent again later (warned of once); past
    that, or with 0 (a journal's recovery, run once), it is warned of and that spawner
    session is not read again: a `StoreError` may also be one that never passes (a
    permission denied), and the sub-agent, and whatever waits behind it, must go on. One
    that cannot pass (an unusable stored copy) is given up at once."""

    def __init__(self, store: SaveTarget, *, caller_retries_for: float = 0.0) -> None:
        self._store = store if isinstance(store, SessionStore) else None
        self._caller_retries_for = caller_retries_for
        # session id -> child loop id -> (spawning loop id, its ref)
        self._sessions: OrderedDict[str, dict[str, tuple[str, ChildLoopRef]]] = OrderedDict()
        # Spawner session id -> when its read first failed (`time.monotonic()`), the latest 64.
        self._failing: OrderedDict[str, float] = OrderedDict()

    def needs_spawner(self, event: object, recorder: SessionRecorder) -> TypeGuard[AgentStart]:
        """Whether `event` starts a sub-agent whose spawner `recorder` lacks (`hand_to` may find it)."""
        return (
            self._store is not None
            and type(event) is AgentStart
            and event.parent_loop_id is not None
            and recorder.lacks_spawner(event.loop_id, event.parent_loop_id)
        )

    def hand_to(self, recorder: SessionRecorder, start: AgentStart) -> None:
        """Give `recorder` the tool call that spawned the loop `start` starts, if the store
        holds it (read from the store until its spawner's session holds tool calls).
        `StoreError` with `caller_retries_for`, if the read failed in a way that may pass."""
        parent_loop_id = start.parent_loop_id
        if self._store is None or parent_loop_id is None:
            return
        session_id = session_id_from_loop_id(parent_loop_id)
        refs = self._sessions.get(session_id)
        if refs is None:
            refs = self._read(self._store, session_id)
            if refs is None:
                return
            self._sessions[session_id] = refs
            if len(self._sessions) > 64:
                self._sessions.popitem(last=False)
        found = refs.get(start.loop_id)
        if found is not None and found[0] == parent_loop_id:
            recorder.await_spawn(session_id, parent_loop_id, found[1])

    def _read(self, store: SessionStore, session_id: str) -> dict[str, tuple[str, ChildLoopRef]] | None:
        """The sub-agents spawned in `session_id` as stored; None while it holds none (to be
        read again); empty once given up (an error warned of)."""
        try:
            outline = store.load_outline(session_id)
        except (SessionNotFound, InvalidSessionId):  # no spawner saved there (yet)
            return None
        except PhiSessionError as error:
            if self._caller_retries_for and _may_pass(error) and self._may_retry(session_id, error):
                raise
            self._failing.pop(session_id, None)
            logger.warning(
                "session %r, where sub-agents were spawned, could not be read (%s): "
                "their spawn refs are saved without the tool call",
                session_id,
                error,
            )
            return {}
        self._failing.pop(session_id, None)
        refs = {
            ref.child_loop_id: (loop.loop_id, ref)
            for loop in outline.loops
            for ref in loop.record.child_loop_refs
        }
        return refs or None

    def _may_retry(self, session_id: str, error: Exception) -> bool:
        """Whether the caller may read `session_id` again, failed with `error`: for
        `caller_retries_for` seconds from its first failure (warned of then)."""
        now = time.monotonic()
        first = self._failing.get(session_id)
        if first is None:
            logger.warning(
                "session %r, where sub-agents were spawned, could not be read (%s): its sub-agents"
                " wait, read again for up to %g s",
                session_id,
                error,
                self._caller_retries_for,
            )
            self._failing[session_id] = first = now
            if len(self._failing) > 64:
                self._failing.popitem(last=False)
        return now - first < self._caller_retries_for
