"""Where adapters record to, shared: one session book per destination, one embedded
store writer per store.

A framework session's identity (its loop counters and last loop, an `AgentSession`)
must be one object for every adapter instance recording it, or two instances number
loops afresh and both write loop 1: a handler or capability made per call
(``config={"callbacks": [PhiCallbackHandler()]}``) is the common case, and the store
cannot tell the second instance about the first one's loops, which it saves later, on
another thread. So every `AdapterCore` recording into the same place takes its
sessions from one `SessionBook`:

* the embedded store (no sink given): one `EmbeddedStore` per store location (the
  resolved file, directory or database URL, however it was named) and process, which
  also holds the one `AutoPersistingRecorder` (and writer thread) saving into it,
  however many adapter instances there are;
* sinks given: the book of cores given the same sinks (the same objects, by identity,
  in any order), which lives as long as those objects do.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .._exit import ExitHook
from ..identity import AgentSession, Clock, IdFactory
from ..sinks import SinkLike, recorder_receiver
from ..stores.base import SessionStore

if TYPE_CHECKING:
    from ..persist import AutoPersistingRecorder

__all__ = ["EmbeddedStore", "SessionBook", "book_for_sinks", "embedded_store"]


_NOTES_KEPT = 4096  # notes of each kind a book keeps, the least recently used let go of


class _Notes:
    """Notes under keys, the last `_NOTES_KEPT` used kept. Used under its book's lock."""

    def __init__(self) -> None:
        self._notes: OrderedDict[object, Any] = OrderedDict()

    def put(self, key: object, note: Any) -> None:
        self._notes.pop(key, None)
        self._notes[key] = note
        if len(self._notes) > _NOTES_KEPT:
            self._notes.popitem(last=False)

    def pop(self, key: object) -> Any:
        return self._notes.pop(key, None)

    def get(self, key: object) -> Any:
        """The note under `key`, if any, now the most recently used."""
        note = self._notes.get(key)
        if note is not None:
            self._notes.move_to_end(key)
        return note


class SessionBook:
    """The identities of framework sessions recorded into one destination.

    A session with an open run is *busy* (held, with its count of runs); one whose
    runs all ended is *idle*, least recently used first; beyond `max_idle` idle
    sessions, the oldest are let go of, leaving their compact progress
    (`AgentSession.progress`) from which they come back exactly. For a session read from
    a store, the book also counts the stored loops read so far, from which a run that
    finds it idle reads what other processes saved since (`LoopStarts.loop_starts`).
    Thread-safe: every method takes the book's lock, and never calls out under it.
    """

    def __init__(self, max_idle: int) -> None:
        self.max_idle = max_idle
        self._lock = threading.Lock()
        self._busy: dict[str, tuple[AgentSession, int]] = {}
        self._idle: OrderedDict[str, AgentSession] = OrderedDict()
        self._progress: dict[str, tuple[object, ...]] = {}
        self._stored: dict[str, int] = {}  # session id -> its stored loops read (a store's sessions)
        self._claims: dict[object, object] = {}
        # Two kinds of notes, each bounded on its own: the notes a run keeps for any
        # number of later ones, one per run, never push out the few left for one run
        # to take (an interrupted thread's, waiting for its human).
        self._left = _Notes()
        self._kept = _Notes()

    def claim(self, run: object, owner: object) -> object:
        """Who records framework run `run` here: `owner` if no one did yet (a handler
        attached twice to one run, or two recording into one place, would record it twice)."""
        with self._lock:
            return self._claims.setdefault(run, owner)

    def unclaim(self, run: object, owner: object) -> None:
        """`owner` is done with run `run` (its end)."""
        with self._lock:
            if self._claims.get(run) is owner:
                del self._claims[run]

    def leave(self, key: object, note: Any) -> None:
        """Leave `note` for the next run of framework session `key` to `take`, whichever
        core records it (an interrupted run's state for the run resuming it: a handler
        made per call is the common case); the last `_NOTES_KEPT` left are kept."""
        with self._lock:
            self._left.put(key, note)

    def take(self, key: object) -> Any:
        """The note left for framework session `key` (then forgotten), if any."""
        with self._lock:
            return self._left.pop(key)

    def keep(self, key: object, note: Any) -> None:
        """Keep `note` under `key` for any later run to `read` (the loop of a framework
        run, for the runs going on from it); the last `_NOTES_KEPT` used are kept."""
        with self._lock:
            self._kept.put(key, note)

    def read(self, key: object) -> Any:
        """The note kept under `key`, if any, kept on (as the most recently used)."""
        with self._lock:
            return self._kept.get(key)

    def allow_idle(self, max_idle: int) -> None:
        """Keep at least `max_idle` idle sessions (cores sharing a book may ask for more)."""
        with self._lock:
            self.max_idle = max(self.max_idle, max_idle)

    @property
    def idle(self) -> int:
        return len(self._idle)

    def hold(
        self, session_id: str, clock: Clock, id_factory: IdFactory
    ) -> tuple[AgentSession, int | None] | None:
        """The identity of session `session_id`, held for one more run, and how many of its
        stored loops were read when it was idle (None while another run of it is open, or
        for a session not read from a store); None if the book has never seen the session."""
        with self._lock:
            agent = self._held(session_id, clock, id_factory)
            if agent is None:
                return None
            return agent, self._stored.get(session_id) if self._busy[session_id][1] == 1 else None

    def add(self, agent: AgentSession, stored: int | None = None) -> AgentSession:
        """Hold `agent`, made for a session `hold` found no identity of, for a run
        (`stored`: how many of its stored loops it went on after, if read from a store);
        if a concurrent run of the session added one meanwhile (and may even have ended),
        that one is held and returned instead."""
        with self._lock:
            known = self._held(agent.session_id, agent.clock, agent.id_factory)
            if known is not None:
                return known
            self._busy[agent.session_id] = (agent, 1)
            if stored is not None:
                self._stored[agent.session_id] = stored
            return agent

    def read_stored(self, session_id: str, count: int) -> None:
        """The first `count` stored loops of `session_id` were read (a run caught up)."""
        with self._lock:
            self._stored[session_id] = max(count, self._stored.get(session_id, 0))

    def _held(self, session_id: str, clock: Clock, id_factory: IdFactory) -> AgentSession | None:
        """Under the lock: `hold`'s identity."""
        busy = self._busy.get(session_id)
        if busy is not None:
            self._busy[session_id] = (busy[0], busy[1] + 1)
            return busy[0]
        agent = self._idle.pop(session_id, None)
        if agent is None:
            progress = self._progress.pop(session_id, None)
            if progress is None:
                return None
            agent = AgentSession.from_progress(progress, clock=clock, id_factory=id_factory)
        self._busy[session_id] = (agent, 1)
        return agent

    def hold_again(self, agent: AgentSession) -> None:
        """Hold `agent`'s session for one more run, if the book holds that identity (not
        a sub-agent's or an adapter's own)."""
        with self._lock:
            busy = self._busy.get(agent.session_id)
            if busy is not None and busy[0] is agent:
                self._busy[agent.session_id] = (agent, busy[1] + 1)

    def release(self, agent: AgentSession) -> None:
        """A run of `agent` ended (or never started); its session becomes the most
        recently used idle one when that was its last run."""
        with self._lock:
            busy = self._busy.get(agent.session_id)
            if busy is None or busy[0] is not agent:
                return
            if busy[1] > 1:
                self._busy[agent.session_id] = (agent, busy[1] - 1)
            else:
                del self._busy[agent.session_id]
                self._idle[agent.session_id] = agent

    def let_go(self) -> None:
        """Keep `max_idle` idle identities, the progress of the rest (amortized O(1) when
        called at each run start: each run end leaves at most one more idle session)."""
        with self._lock:
            idle = self._idle
            while len(idle) > self.max_idle:
                session_id, agent = idle.popitem(last=False)
                self._progress[session_id] = agent.progress()


# -- books of cores given the same sinks ----------------------------------------------------------

_books_lock = threading.Lock()
# The identity of a set of sinks -> weak references to the objects it is made of, and
# their book. The book lives as long as those objects (a handler made per call comes and
# goes, the recorder it writes to stays); the references tell a live entry from one whose
# objects died and whose ids were reused. Dead entries are dropped every _PRUNE_EVERY
# books made.
_books: dict[tuple[tuple[int, int], ...], tuple[tuple[weakref.ref[Any], ...], SessionBook]] = {}
_PRUNE_EVERY = 64
_made_since_prune = 0


def _parts(sink: SinkLike) -> tuple[object, object | None]:
    """What tells a sink apart: a bound method's object and function (``recorder.on_event``
    is made anew at each access; ``obj.to_a`` and ``obj.to_b`` are two destinations),
    else the sink itself. A recorder is its ``on_event``, which is what receives."""
    sink = recorder_receiver(sink) or sink
    owner = getattr(sink, "__self__", None)
    return (sink, None) if owner is None else (owner, getattr(sink, "__func__", None))


def book_for_sinks(sinks: Sequence[SinkLike], max_idle: int) -> SessionBook:
    """The book of the cores recording into `sinks`, in any order. Sinks made of objects
    that cannot be weakly referenced (a list's ``append``) get a book of their own."""
    parts = sorted((_parts(sink) for sink in sinks), key=lambda part: (id(part[0]), id(part[1])))
    try:
        refs = tuple(weakref.ref(owner) for owner, _ in parts)
    except TypeError:
        return SessionBook(max_idle)
    if not refs:
        return SessionBook(max_idle)
    # A bound method's function belongs to its class, which outlives the objects: its id lasts.
    key = tuple((id(owner), id(function)) for owner, function in parts)
    global _made_since_prune
    with _books_lock:
        entry = _books.get(key)
        if entry is not None and all(ref() is owner for ref, (owner, _) in zip(entry[0], parts, strict=True)):
            entry[1].allow_idle(max_idle)
            return entry[1]
        book = SessionBook(max_idle)
        _books[key] = (refs, book)
        _made_since_prune += 1
        if _made_since_prune >= _PRUNE_EVERY:
            _made_since_prune = 0
            for dead in [k for k, (rs, _) in _books.items() if any(ref() is None for ref in rs)]:
                del _books[dead]
        return book


# -- the embedded store ---------------------------------------------------------------------------


class EmbeddedStore:
    """The embedded store as adapters record into it: the store, the one recorder saving
    into it (`AutoPersistingRecorder`), the book of its sessions, and the cores using it.

    The last core to close it closes the recorder (saving what is left); at interpreter
    exit, the runs still open in its cores end failed, saying why, before the recorder
    saves and closes.
    """

    def __init__(self, key: tuple[object, ...], store: SessionStore, max_idle: int) -> None:
        from ..persist import AutoPersistingRecorder
        from ..recorder import SessionRecorderConfig

        self._key = key
        self.store = store
        # Requests are kept whenever an adapter records them (`capture_requests`); those
        # that do not, send none.
        self.persister: AutoPersistingRecorder = AutoPersistingRecorder(
            store, config=SessionRecorderConfig(capture_turn_requests=True)
        )
        self.book = SessionBook(max_idle)
        self._cores: weakref.WeakSet[Any] = weakref.WeakSet()
        self._closed = False
        # Made after the recorder's own exit hook, so it runs before it: open runs end
        # with their reason before the recorder aborts the rest.
        self._exit_hook = ExitHook(self.store, self._close_at_exit)

    def join(self, core: Any) -> bool:
        """Count `core` in (False: this one closed already; take a new one)."""
        if self._closed:
            return False
        self._cores.add(core)
        return True

    def leave(self, core: Any) -> None:
        """`core` closed: save what is finished now; the last core out closes the recorder."""
        with _stores_lock:
            self._cores.discard(core)
            last = not self._cores and not self._closed
            if last:
                self._closed = True
                if _stores.get(self._key) is self:
                    del _stores[self._key]
                self._exit_hook.cancel()
                # Under the registry lock: a core opening this store next reads it only
                # once everything recorded here is saved.
                self.persister.close()
        if not last:
            self.save_finished()

    def save_finished(self) -> None:
        """Save, before returning, the sessions that have no open loop."""
        self.persister.checkpoint()
        self.persister.wait_saved()

    def _close_at_exit(self) -> None:
        for core in list(self._cores):
            core.end_open_runs("the interpreter exited during the run")
        self._closed = True
        self.persister.close()


_stores_lock = threading.Lock()
_stores: dict[tuple[object, ...], EmbeddedStore] = {}


def _location(store: SessionStore | None) -> tuple[object, ...]:
    """Where `store` (None: the default one) keeps its sessions, the same however it was
    named: a resolved file or directory path, a database URL, else the object itself."""
    from ..stores.json_dir import JsonDirStore
    from ..stores.sqlite import SqliteStore
    from ..stores.urls import default_store_url, store_path

    if store is None:
        url = default_store_url()
        path = store_path(None)  # (a bad $PHI_SESSION_STORE: the error names the variable)
        return ("url", url) if path is None else ("file", str(path.resolve()))
    if isinstance(store, SqliteStore):
        return ("file", str(store.path.resolve()))
    if isinstance(store, JsonDirStore):
        return ("file", str(store.directory.resolve()))
    return ("object", id(store))  # held by its EmbeddedStore while registered: the id stays its


def embedded_store(
    store: SessionStore | None, max_idle: int, opened: Callable[[], SessionStore], core: Any
) -> EmbeddedStore:
    """The embedded store `core` records into: `store`, or the default one (`opened`
    opens it), shared with every other core recording there in this process."""
    key = (os.getpid(), *_location(store))
    with _stores_lock:
        shared = _stores.get(key)
        if shared is None or not shared.join(core):
            shared = _stores[key] = EmbeddedStore(key, store if store is not None else opened(), max_idle)
            shared.join(core)
        else:
            shared.book.allow_idle(max_idle)
        return shared


def _after_fork_in_child() -> None:
    """A forked child starts with no registered store or book (its parent's writer
    threads do not exist in it), and with locks no parent thread can be holding."""
    global _stores_lock, _books_lock
    _stores_lock, _books_lock = threading.Lock(), threading.Lock()
    _stores.clear()
    _books.clear()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)
