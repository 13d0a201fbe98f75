"""Session identity for a producer: agent and session ids, rotation, loop-id allocation.

`AgentSession` plays the part phi-core's ``BasicAgent`` plays for its own loops: it
owns an ``agent_id`` and the current ``session_id``, hands out loop ids of the form
``{session_id}.{config_id}.{N}`` (one counter per session and config, from 1), and
rotates to a new session on request (`AgentSession.new_session`) or after a period of
inactivity (`AgentSession.check_and_rotate`).

Unlike phi-core, the reason a session was opened reaches the record: the first loop
of every session carries a `SessionFormation` (``FirstLoop`` or
``InactivityTimeout``) that the instrumentation API writes into that loop's
``AgentStart`` event, where the recorder reads it and phi-core ignores it.

Time comes from an injectable clock (a callable returning nanoseconds since the Unix
epoch), so tests and the demo run on simulated time without sleeping; `FakeClock` is
one.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Protocol, cast

from ._checks import check_callable, check_index, check_seconds, check_text, check_type
from ._fork import fork_generation, forked_copy_lock
from ._time import Timestamp
from .errors import InvalidArgument
from .events import LoopConfigSnapshot, SessionFormation
from .ids import derive_config_id
from .stores.base import validate_loop_session_id

if TYPE_CHECKING:
    from .model import Session

__all__ = ["AgentSession", "Clock", "FakeClock", "IdFactory", "config_id_of"]

logger = logging.getLogger(__name__)

Clock = Callable[[], int]
"""A source of time: nanoseconds since the Unix epoch (``time.time_ns`` by default)."""

IdFactory = Callable[[], str]
"""A source of fresh agent and session ids (lower-case UUID v4 strings by default)."""


class RecordedLoop(Protocol):
    """What `AgentSession.resume_recorded` reads of a recorded loop (a `LoopRecord`, or
    a store's `LoopOutline` of one)."""

    @property
    def loop_id(self) -> str: ...

    @property
    def started_at(self) -> Timestamp: ...


_NS_PER_S = 1_000_000_000
_NS_PER_MS = 1_000_000


def _is_loop_number(text: str) -> bool:
    """Whether `text` is a loop number a counter could have written: ASCII digits, at most
    20 (a 64-bit count). ``str.isdigit`` alone takes "²" and other scripts' digits, and
    int() refuses huge numbers."""
    return len(text) <= 20 and text.isascii() and text.isdigit()


def _uuid4() -> str:
    return str(uuid.uuid4())


def config_id_of(config: LoopConfigSnapshot) -> str:
    """The loop-id segment of a configuration, as phi-core computes it.

    The snapshot's own ``config_id`` when set; otherwise ``{provider}.{model slug}``,
    followed by ``.thinking`` when reasoning is on: a thinking level other than
    ``"off"`` or, with no level given, ``reasoning`` true.
    """
    check_type("config", config, LoopConfigSnapshot)
    if config.config_id is not None:
        return config.config_id
    level = config.thinking_level
    thinking = level != "off" if isinstance(level, str) else config.reasoning is True
    return derive_config_id(config.provider, config.model, thinking=thinking)


def _nanoseconds(reading: object) -> int:
    """A clock reading that is no int, or is negative: an integer of another type (a NumPy
    one) as int; `TypeError` for others, at the first reading (seconds as a float:
    ``time.time``); `InvalidArgument` before the epoch, which phi-core's message
    timestamps (unsigned) cannot hold."""
    ns = check_index(
        "the clock's reading", reading, "int nanoseconds since the epoch (as time.time_ns gives)"
    )
    if ns < 0:
        raise InvalidArgument(f"the clock's reading is before the epoch: {ns}")
    return ns


class _Stamper:
    """Turns clock readings into `Timestamp`s, reusing the formatted date of the last second.

    Events of one loop mostly fall within the same second, and formatting the
    calendar date is most of the cost of a timestamp.
    """

    __slots__ = ("_cache",)

    def __init__(self) -> None:
        # (second, its "YYYY-MM-DDTHH:MM:SS"), replaced as one object so that
        # concurrent readers never pair a second with another second's text.
        self._cache: tuple[int, str] | None = None

    def __call__(self, ns: int) -> Timestamp:
        if type(ns) is not int or ns < 0:
            ns = _nanoseconds(ns)
        second, fraction = divmod(ns, _NS_PER_S)
        cache = self._cache
        if cache is not None and cache[0] == second:
            prefix = cache[1]
        else:
            # Years outside 0000-9999 are written with a sign and never cached.
            text = str(Timestamp.from_ns(second * _NS_PER_S))
            if len(text) != 20:
                return Timestamp.from_ns(ns)
            prefix = text[:19]
            self._cache = (second, prefix)
        if not fraction:
            return Timestamp(prefix + "Z")
        if fraction % 1_000_000 == 0:
            return Timestamp(f"{prefix}.{fraction // 1_000_000:03d}Z")
        if fraction % 1_000 == 0:
            return Timestamp(f"{prefix}.{fraction // 1_000:06d}Z")
        return Timestamp(f"{prefix}.{fraction:09d}Z")


class _LoopCounters:
    """The loop counters of one session: ``config_id -> N`` of its latest loop id.

    Shared (`_joined_counters`) by every identity of a session in the process: the one
    that made its id (a UUID v4), those given it (two concurrent requests of one
    conversation, each with an `AgentSession` of its id) and those going on with a
    recording of it (`AgentSession.continuing`), so two of them never hand out the same
    loop id. Not by identities of ids an injected factory made (a test's ``s1``,
    ``s2``…), which may name unrelated sessions, nor by those a holder of one identity per
    session of its destination makes (`AgentSession.of_destination`, a framework
    adapter's: a framework's thread id may name another destination's session too).
    Held by the identities sharing them and, once those are gone, while their session is
    among the `_RECENT_SESSIONS` whose loops were numbered last: a new identity of it goes
    on numbering however late the collector frees the last one (an identity that an
    exception's traceback keeps goes only when the collector runs); after that it counts
    from 1, or after the loops a store holds (`AgentSession.resume`)."""

    __slots__ = ("__weakref__", "_counts", "_generation", "_lock", "_shared_as")

    def __init__(self, shared_as: str | None = None) -> None:
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._generation = fork_generation()
        self._shared_as = shared_as  # the session id it is shared under (`_joined_counters`)

    def follow_fork(self) -> None:
        """In a forked child, under `forked_copy_lock`: a lock of its own, once."""
        if self._generation != fork_generation():
            self._generation = fork_generation()
            self._lock = threading.Lock()

    def allocate(self, session_id: str, config_ids: Iterable[str]) -> list[str]:
        with self._lock:
            counts = self._counts
            loop_ids = []
            for config_id in config_ids:
                count = counts.get(config_id, 0) + 1
                counts[config_id] = count
                loop_ids.append(f"{session_id}.{config_id}.{count}")
        if self._shared_as is not None:
            _SESSION_COUNTERS.keep(self._shared_as, self)
        return loop_ids

    def raise_to(self, counts: Iterable[tuple[str, int]]) -> None:
        """Go on after these counts (a counter never goes back: its ids may be in use)."""
        with self._lock:
            for config_id, count in counts:
                if count > self._counts.get(config_id, 0):
                    self._counts[config_id] = count

    def items(self) -> list[tuple[str, int]]:
        with self._lock:
            return list(self._counts.items())


_RECENT_SESSIONS = 4096
"""How many sessions' loop counters are kept after their last identity is gone (a few
hundred bytes each): those that handed out loop ids last."""


class _SharedCounters:
    """The loop counters of the sessions of this process: those its identities hold, and
    the `_RECENT_SESSIONS` used last (see `_LoopCounters`)."""

    def __init__(self) -> None:
        self._held: weakref.WeakValueDictionary[str, _LoopCounters] = weakref.WeakValueDictionary()
        self._recent: OrderedDict[str, _LoopCounters] = OrderedDict()
        self._lock = threading.Lock()

    def join(self, session_id: str) -> _LoopCounters:
        """The counters of `session_id`, new if none are kept."""
        with self._lock:
            counters = self._held.get(session_id) or self._recent.get(session_id)
            if counters is None:
                counters = _LoopCounters(session_id)
            self._held[session_id] = counters
            return counters

    def keep(self, session_id: str, counters: _LoopCounters) -> None:
        """Note that `counters` just handed out loop ids: they are kept the longest. (Not
        when joined: an identity that numbers no loop, as one `AgentSession.from_progress`
        seeds before its own counters replace them, must not push others out.)"""
        with self._lock:
            recent = self._recent
            recent[session_id] = counters
            recent.move_to_end(session_id)
            while len(recent) > _RECENT_SESSIONS:
                recent.popitem(last=False)

    def after_fork(self) -> None:
        """A lock of its own in a forked child (a parent's thread may have held it)."""
        self._lock = threading.Lock()


_SESSION_COUNTERS = _SharedCounters()

if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_SESSION_COUNTERS.after_fork)


def _joined_counters(session_id: str) -> _LoopCounters:
    """The loop counters shared by the identities of `session_id` in this process (see
    `_LoopCounters`), new if none are kept."""
    return _SESSION_COUNTERS.join(session_id)


# One for every agent: its cache holds across them (a framework adapter makes an
# `AgentSession` per framework session, often one per run).
_STAMPER = _Stamper()


class AgentSession:
    """The identity of one agent: its id, its current session, and loop-id allocation.

    * ``agent_id``: given, or a fresh UUID v4; never changes.
    * ``session_id``: a UUID v4, replaced by `new_session` and `check_and_rotate`. One
      given (or made by `id_factory`) holding a ``.`` (which would end it inside its loop
      ids), or that no store can save (empty, ``/``, ``../x``), raises `InvalidSessionId`.
    * `next_loop_id(config_id)`: ``{session_id}.{config_id}.{N}``; ``N`` counts from 1
      per (session, config) and restarts in every new session; `allocate_loop`
      returns it with its session id, read atomically.

    The `Tracer` calls `loop_started` when a loop's ``AgentStart`` is emitted; that
    is what "the last loop started" means for `check_and_rotate`, and it hands the
    pending `SessionFormation` to the first loop of each session.

    In a forked child (a pre-fork server's worker), an identity made before the fork
    moves, at its first use there, to a new session of its own (``FirstLoop``) when it
    made the session's id itself: the parent and every sibling go on numbering the
    loops of the one they shared, and a store merges two loops of one id alive at the
    same time into one. A session id it was given (or `continuing`) is kept, with a
    warning: nothing coordinates the processes' loop counters.

    All methods are thread-safe. `clock` (nanoseconds since the epoch) and
    `id_factory` are injectable for deterministic tests and demos.
    """

    def __init__(
        self,
        agent_id: str | None = None,
        *,
        session_id: str | None = None,
        clock: Clock | None = None,
        id_factory: IdFactory | None = None,
    ) -> None:
        agent_id = check_text("agent_id", agent_id, optional=True)
        session_id = check_text("session_id", session_id, optional=True)
        check_callable("clock", clock, optional=True)
        check_callable("id_factory", id_factory, optional=True)
        self.clock: Clock = clock if clock is not None else time.time_ns
        self.id_factory: IdFactory = id_factory if id_factory is not None else _uuid4
        self.agent_id: str = agent_id if agent_id is not None else self._fresh_id()
        self._lock = threading.Lock()
        self._stamper = _STAMPER
        # One phi-core reads back from its loop ids, and every store can save.
        self._session_id = validate_loop_session_id(
            session_id if session_id is not None else self._fresh_id()
        )
        self._made = session_id is None  # the current session's id is this identity's own
        self._generation = fork_generation()
        self._counters = self._counters_of_new_session(made=self._made)
        self._last_loop_id: str | None = None
        self._last_started_ns: int | None = None
        # Why the current session was opened, until its first loop claims it.
        # None for FirstLoop, whose timestamp is that first loop's start.
        self._pending_formation: SessionFormation | None = None
        self._formation_claimed = False

    def _fresh_id(self) -> str:
        """A new id from `id_factory`, which must make text (ids are written as strings)."""
        return check_text("id_factory()", self.id_factory())

    # -- identity -----------------------------------------------------------------------

    @property
    def session_id(self) -> str:
        """The current session id."""
        self._follow_fork()
        return self._session_id

    @property
    def last_loop_id(self) -> str | None:
        """The most recently started loop of the current session (None after a rotation)."""
        self._follow_fork()
        return self._last_loop_id

    @property
    def last_loop_started_at(self) -> Timestamp | None:
        """When the last loop of the current session started (None before the first)."""
        self._follow_fork()
        started = self._last_started_ns
        return None if started is None else Timestamp.from_ns(started)

    def now(self) -> Timestamp:
        """The clock's current time."""
        return self._stamper(self.clock())

    def millis(self) -> int:
        """The clock's current time in milliseconds since the epoch (message timestamps)."""
        ns = self.clock()
        if type(ns) is not int or ns < 0:
            ns = _nanoseconds(ns)
        return ns // _NS_PER_MS

    def stamp(self, ns: int) -> Timestamp:
        """A clock reading as a `Timestamp` (fast for readings within the same second)."""
        return self._stamper(ns)

    # -- rotation -----------------------------------------------------------------------

    def new_session(self) -> str:
        """Rotate now: a fresh session id; loop counters restart at 1. Returns the new id.

        The new session's first loop is recorded with formation ``FirstLoop``.
        """
        self._follow_fork()
        with self._lock:
            return self._rotate(None)

    def check_and_rotate(self, threshold: float | timedelta) -> str | None:
        """Rotate if more than `threshold` (seconds or a timedelta) passed since the last loop started.

        Returns the new session id, or None when no rotation happened. A session
        that has not run a loop is never rotated. The new session's first loop is
        recorded with formation ``InactivityTimeout`` (``threshold_secs`` is the
        threshold in whole seconds, ``previous_session_id`` the idle session).
        """
        seconds = check_seconds("threshold", threshold, duration=True)
        self._follow_fork()
        with self._lock:
            last = self._last_started_ns
            if last is None:
                return None
            now = self.clock()
            if (now - last) / _NS_PER_S <= seconds:
                return None
            formation = SessionFormation.inactivity_timeout(
                threshold_secs=math.floor(seconds),
                previous_session_id=self._session_id,
                timestamp=self._stamper(now),
            )
            return self._rotate(formation)

    def _rotate(self, formation: SessionFormation | None) -> str:
        self._session_id = validate_loop_session_id(self._fresh_id())
        self._made = True
        self._counters = self._counters_of_new_session(made=True)
        self._last_loop_id = None
        self._last_started_ns = None  # a fresh session has not run a loop
        self._pending_formation = formation
        self._formation_claimed = False
        return self._session_id

    def _counters_of_new_session(self, *, made: bool) -> _LoopCounters:
        """Shared (`_joined_counters`), but when this identity `made` the session's id with an
        injected factory (a test's ``s1``, ``s2``…, which may name unrelated sessions)."""
        if made and self.id_factory is not _uuid4:
            return _LoopCounters()
        return _joined_counters(self._session_id)

    def _follow_fork(self) -> None:
        """At the first use in a forked child: a session of its own, or a warning (see the
        class's docstring). Its counters and last loop are the parent's as they stood at
        the fork, which goes on with them."""
        if self._generation == fork_generation():
            return
        with forked_copy_lock():
            generation = fork_generation()
            if self._generation == generation:  # another thread of the child was first
                return
            # A thread of the parent the child does not have may have held these at the fork.
            self._lock = threading.Lock()
            self._counters.follow_fork()
            with self._lock:
                self._generation = generation
                if self._made:
                    self._rotate(None)
                    return
        logger.warning(
            "session %r was made before this process forked and is recorded by both: "
            "their loop ids may collide (make its AgentSession after the fork)",
            self._session_id,
        )

    # -- loops --------------------------------------------------------------------------

    def next_loop_id(self, config_id: str) -> str:
        """Allocate the next loop id of the current session for `config_id`."""
        return self.allocate_loop(config_id)[1]

    def allocate_loop(self, config_id: str) -> tuple[str, str]:
        """``(session_id, loop_id)``: the next loop id for `config_id` and the session it
        belongs to, read in one step (a concurrent rotation cannot split them)."""
        session_id, (loop_id,) = self.allocate_loops((config_id,))
        return session_id, loop_id

    def allocate_loops(self, config_ids: Iterable[str]) -> tuple[str, list[str]]:
        """``(session_id, loop_ids)``: the next loop id for each of `config_ids`, in order,
        all of one session (allocated in one step, as a parallel group's branches need)."""
        self._follow_fork()
        with self._lock:
            return self._session_id, self._counters.allocate(self._session_id, config_ids)

    def loop_started(self, session_id: str, loop_id: str, at_ns: int) -> SessionFormation | None:
        """Note that `loop_id` of `session_id` started at `at_ns`.

        Returns the formation to record when this is the first loop to start in the
        current session, else None. Loops of an earlier session (a parallel branch
        allocated before a rotation) change nothing.
        """
        self._follow_fork()
        with self._lock:
            if session_id != self._session_id:
                return None
            self._last_loop_id = loop_id
            self._last_started_ns = at_ns
            if self._formation_claimed:
                return None
            self._formation_claimed = True
            formation = self._pending_formation
            self._pending_formation = None
            return formation if formation is not None else SessionFormation.first_loop(self._stamper(at_ns))

    def resume(self, loop_ids: Iterable[str], last_loop_id: str | None) -> None:
        """Go on with the current session as recorded earlier (e.g. loaded from a store).

        Loop counters continue after the given loop ids of the current session, so new
        loop ids never repeat old ones, and continuations follow `last_loop_id`.
        """
        counts = [count for count in map(self._count_of, loop_ids) if count is not None]
        with self._lock:
            self._counters.raise_to(counts)
            if last_loop_id is not None:
                self._last_loop_id = last_loop_id

    def _count_of(self, loop_id: str) -> tuple[str, int] | None:
        """``(config_id, N)`` of a loop id of the current session; None for another's."""
        prefix = f"{self.session_id}."
        config_id, _, number = loop_id.removeprefix(prefix).rpartition(".")
        if loop_id.startswith(prefix) and config_id and _is_loop_number(number):
            return config_id, int(number)
        return None

    def go_on_after(self, loops: Sequence[tuple[str, int]]) -> None:
        """Go on after `loops` (each one's id and start, in nanoseconds since the epoch):
        loops of the current session another process may have recorded since this identity
        last read them (`LoopStarts.loop_starts`), some maybe its own. Loop counters go
        past them; the latest started of those numbered beyond this identity's counters
        (newer loops it did not number) becomes the loop continuations follow, unless its
        own last loop started later."""
        if not loops:
            return
        counted = [(self._count_of(loop_id), loop_id, started) for loop_id, started in loops]
        with self._lock:
            known = dict(self._counters.items())
            newer = [
                (started, loop_id)
                for count, loop_id, started in counted
                if count is not None and count[1] > known.get(count[0], 0)
            ]
            self._counters.raise_to(count for count, _, _ in counted if count is not None)
            if newer:
                started, loop_id = max(newer)
                if self._last_started_ns is None or started > self._last_started_ns:
                    self._last_loop_id, self._last_started_ns = loop_id, started
            self._formation_claimed = True
            self._pending_formation = None

    def resume_session(self, session: Session) -> None:
        """Go on with `session`, a recording of the current session (e.g. loaded from a
        store): `resume_recorded` with its loops."""
        if session.session_id != self.session_id:
            raise InvalidArgument(
                f"session {session.session_id!r} is not the current session {self._session_id!r}"
            )
        self.resume_recorded(session.loops)

    def resume_recorded(self, loops: Sequence[RecordedLoop]) -> None:
        """Go on after `loops`, the recorded loops of the current session (its records, or
        a store's outlines of them, which are cheaper to read): `resume` after them, the
        one that started last being the loop continuations follow; the session has had
        its first loop, so no new loop records a formation."""
        if not loops:
            return
        last = max(loops, key=lambda loop: loop.started_at.ns)
        self.resume((loop.loop_id for loop in loops), last.loop_id)
        with self._lock:
            self._formation_claimed = True
            self._pending_formation = None

    @classmethod
    def continuing(
        cls, session: Session, *, clock: Clock | None = None, id_factory: IdFactory | None = None
    ) -> AgentSession:
        """The identity that goes on recording into `session`: its agent and session
        ids, loop ids after its loops' (`resume_session`). Every identity going on with
        that session in the process shares one loop counter: two of them never hand out
        the same loop id, even when both are made before either records a loop."""
        agent = cls(session.agent_id, session_id=session.session_id, clock=clock, id_factory=id_factory)
        agent.resume_session(session)
        return agent

    def progress(self) -> tuple[object, ...]:
        """Where this identity stands in its current session, as one small flat tuple that
        `AgentSession.from_progress` goes on from: what a holder of many sessions (a
        framework adapter, `AdapterCore`) keeps of one it no longer holds the identity of.

        ``(agent_id, session_id, first loop claimed, last loop, config_id, N, ...)``, one
        pair per config's loop counter; the last loop is the index of its pair when it is
        that config's latest loop (as it usually is: no string of its own), else its id.
        """
        self._follow_fork()
        with self._lock:
            session_id, last = self._session_id, self._last_loop_id
            flat: list[object] = [self.agent_id, session_id, self._formation_claimed, last]
            for index, (config_id, count) in enumerate(
                self._counters.items()
            ):  # a copy, read under the counters' lock
                flat += (config_id, count)
                if last == f"{session_id}.{config_id}.{count}":
                    flat[3] = index
            return tuple(flat)

    @classmethod
    def from_progress(
        cls, progress: tuple[object, ...], *, clock: Clock | None = None, id_factory: IdFactory | None = None
    ) -> AgentSession:
        """The identity that goes on from `progress` (an `AgentSession.progress`): same agent
        and session, loop counters (its own, as `of_destination` makes them), last loop,
        and whether its first loop was recorded. Not kept: the last loop's start time
        (`check_and_rotate` leaves the session alone until its next loop starts) and the
        formation of a rotation no loop has claimed yet."""
        agent_id, session_id, claimed, last = cast("tuple[str, str, bool, str | int | None]", progress[:4])
        config_ids = cast("tuple[str, ...]", progress[4::2])
        counters = dict(zip(config_ids, cast("tuple[int, ...]", progress[5::2]), strict=True))
        if isinstance(last, int):
            last = f"{session_id}.{config_ids[last]}.{counters[config_ids[last]]}"
        agent = cls(agent_id, session_id=session_id, clock=clock, id_factory=id_factory)
        with agent._lock:
            agent._counters = _LoopCounters()  # its holder's alone (see `of_destination`)
            agent._counters.raise_to(counters.items())
            agent._last_loop_id = last
            agent._formation_claimed = claimed
        return agent

    @classmethod
    def of_destination(
        cls,
        agent_id: str,
        session_id: str,
        *,
        clock: Clock | None = None,
        id_factory: IdFactory | None = None,
    ) -> AgentSession:
        """An identity of the given `session_id` counting its loops alone, not with every
        identity of that id in the process: for a holder of the one identity of each session
        of its destination, seeded from it (a framework adapter's), where the id (a
        framework's thread id) may name another destination's session too, numbered apart."""
        return cls.from_progress((agent_id, session_id, False, None), clock=clock, id_factory=id_factory)

    def set_last_loop(self, loop_id: str, *, session_id: str | None = None) -> None:
        """Make `loop_id` the loop that continuations follow by default (e.g. a parallel winner).

        With `session_id`, the session `loop_id` belongs to, only while that is the current
        session: a loop of a session rotated away from changes nothing (as in `loop_started`).
        """
        loop_id = check_text("loop_id", loop_id)
        check_type("session_id", session_id, str, optional=True)
        self._follow_fork()
        with self._lock:
            if session_id is None or session_id == self._session_id:
                self._last_loop_id = loop_id

    def spawn(self, agent_id: str | None = None) -> AgentSession:
        """A new identity (fresh agent and session ids) sharing this one's clock and id factory.

        Sub-agents run in a session of their own, as in phi-core.
        """
        return AgentSession(agent_id, clock=self.clock, id_factory=self.id_factory)

    def __repr__(self) -> str:
        return f"AgentSession(agent_id={self.agent_id!r}, session_id={self._session_id!r})"


class FakeClock:
    """A simulated clock for tests and demos: it only moves when told to.

    Each reading returns the current time, then advances it by `tick` seconds, so
    successive events get distinct, increasing timestamps. `advance(seconds)` jumps
    ahead (simulated idleness). Thread-safe.
    """

    def __init__(self, start: Timestamp | str | int = "2025-06-01T09:00:00Z", *, tick: float = 0.001) -> None:
        if isinstance(start, str):
            start = Timestamp.parse(start)
        self._ns = start.ns if isinstance(start, Timestamp) else int(start)
        self._tick = round(tick * _NS_PER_S)
        self._lock = threading.Lock()

    def __call__(self) -> int:
        with self._lock:
            now = self._ns
            self._ns += self._tick
            return now

    def advance(self, seconds: float | timedelta) -> None:
        """Move the clock forward by `seconds` (or a timedelta)."""
        if isinstance(seconds, timedelta):
            seconds = seconds.total_seconds()
        if seconds < 0:
            raise InvalidArgument("a clock does not go backwards")
        with self._lock:
            self._ns += round(seconds * _NS_PER_S)

    def peek(self) -> Timestamp:
        """The current simulated time, without advancing."""
        with self._lock:
            return Timestamp.from_ns(self._ns)
