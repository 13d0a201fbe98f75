"""SessionRecorder: turns an AgentEvent stream into Sessions, as phi-core does, minus its gaps.

The recorder is an in-memory state machine: it does no I/O. It reproduces
phi-core 0.10's rules (wire-format §9) so that the same stream gives the same
session files, and fixes the gaps that lose, split or misattribute data (§14):

* events for loops it does not know are kept as *orphans*, never dropped;
* ``before_task`` returning False marks the session rejected (it is still recorded);
* ``after_task`` fires once each time a session is completed, by `flush` or `checkpoint`;
* ``ParallelLoopStart`` pre-registers Pending loop records; a branch that never
  starts is Aborted at `flush` instead of vanishing;
* a repeated ``AgentStart`` for an open loop keeps what was recorded; one for a loop
  that ended (not yet drained) is an orphan, its loop's later events too (a compaction
  pass, which reuses the id, is a second record), unless it starts the loop at the same
  instant: the loop sent again, whose record replaces the ended one once it ends, if it
  holds as many events (else, or if it never ends, its events are orphans; meanwhile its
  session is what it was, complete and drained with the ended record if its loops had
  ended); a session id seen again while the session is still held joins it;
* ``RevertApplied`` is stored; parallel and loop-less events are kept; a parallel event
  naming another session's loop is kept in its own session's events, not applied;
* `flush` aborts open loops in the order they were opened, and links them to their parent;
  a loop that closed before its parent of the session did (an OTLP ingest's continuation
  whose trace came first) is linked to it once it closes;
* `checkpoint` completes every session whose loops have all ended, as phi-core does;
  what a drained session learns later (its parallel winner, the tool call that
  spawned it) is handed over again by the next drain, as an amendment to merge;
* sub-agent links use what the recorder saw, not only the loop-id prefix; a sub-agent
  that starts after its spawner's session was drained still gets the tool call (the
  latest `_AWAITED_SPAWNS` such tool calls are remembered, until `flush`);
* every ``on_event`` is O(1) amortized, and safe to call from several threads (a
  parent's ``children_loop_ids`` tuple is brought up to date when its session is
  looked at or completed, not rebuilt per child).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Iterable
from functools import partial
from itertools import count, repeat
from typing import Any, ClassVar, TypeVar

import msgspec
from msgspec.structs import replace

from . import codec
from ._checks import check_callable, check_each, check_seconds, check_type
from ._collector import release_leaves, release_records, release_tuple
from ._owning import copy_failures, recordable_event
from ._time import Timestamp
from .errors import InvalidArgument
from .events import (
    COMPACTION,
    EVENT_TYPES,
    AgentEnd,
    AgentEvent,
    AgentStart,
    LoopConfigSnapshot,
    MessageEnd,
    MessageUpdate,
    ParallelLoopEnd,
    ParallelLoopStart,
    SessionFormation,
    ToolExecutionEnd,
    TurnEnd,
    TurnRequest,
    TurnStart,
)
from .ids import config_segment_from_loop_id, session_id_from_loop_id
from .messages import AgentMessage, AnnotatedRequestPayload, AssistantMessage, TurnId, message_role
from .model import (
    ChildLoopRef,
    LoopEvent,
    LoopRecord,
    ParallelGroupRecord,
    Session,
    SpawnRef,
    Turn,
    keep_links,
)

__all__ = ["OrphanEvent", "SessionRecorder", "SessionRecorderConfig", "SpawnGap"]

logger = logging.getLogger("phi_session.recorder")

SessionCallback = Callable[[Session], Any]

# Drained records of a parallel branch owed its group's end, with their sessions.
_Owed = list[tuple[Session, LoopRecord]]

# Sub-agents named by a drained spawner's tool call that the recorder does not hold,
# remembered for when they start (the latest ones only: one never may, or ran already).
_AWAITED_SPAWNS = 10_000
# Sub-agent links the recorder could not complete, not yet handed over (`drain_spawn_gaps`;
# the latest ones only: a caller that drains sessions alone never takes them).
_SPAWN_GAPS = 10_000
# Branches of parallel groups that `flush` ended or that were given up, remembered once
# their session is drained, so that a late end is an orphan even if the session goes on
# (the latest ones only: such an end may never come).
_DRAINED_GROUP_BRANCHES = 10_000

_V = TypeVar("_V")


class SessionRecorderConfig(msgspec.Struct, kw_only=True, frozen=True):
    """How a recorder records. Every option is keyword-only and optional, and checked
    when given: `TypeError` for a flag that is no bool or a hook that is no callable,
    `InvalidArgument` for a ``group_end_timeout`` negative, NaN or infinite.

    * ``include_streaming_events``: store ``MessageUpdate`` deltas in loop events.
    * ``capture_turn_requests``: copy each ``TurnRequest`` payload into its Turn.
    * ``before_task(session)``: called once when a session is opened; returning
      ``False`` marks it rejected (it is still recorded, ``"rejected": true``).
    * ``after_task(session)``: called each time a session is completed.
      Both run after the recorder's lock is released, in the order their sessions
      were opened and completed, before the call that triggered them returns (unless
      another thread is running callbacks: it runs them): they may use the recorder.
    * ``keep_session_events``: also write ParallelLoopStart/End into the session file
      (extra ``session_events`` field, ignored by phi-core). Off by default so that
      files stay byte-identical to phi-core's; the recorder keeps them in memory
      either way (`SessionRecorder.session_events`).
    * ``group_end_timeout``: how long, in seconds of stream time (the latest
      ``AgentStart`` timestamp seen), a drained session waits for the end of a parallel
      group of its that never ended (a killed agent's), counted from the stream time it
      was drained at (not its own timestamps: another host's clock may be ahead); then
      `checkpoint` gives the group up: its branches that never started are aborted as at
      `flush`, and an end that comes later is an orphan, even if the session goes on
      (unless a branch runs after all while the session is held: its run replaces its
      Aborted record, and the end marks the branches). So too a group whose session has
      no loop yet, counted from the stream time its announcement arrived at. None: wait
      until `flush`.
    """

    include_streaming_events: bool = False
    capture_turn_requests: bool = False
    before_task: SessionCallback | None = None
    after_task: SessionCallback | None = None
    keep_session_events: bool = False
    group_end_timeout: float | None = 3600.0

    def __post_init__(self) -> None:
        # Checked here, where they are given: a "false" read from a file would turn an
        # option on, and a hook that is no callable would fail (logged) at every session.
        for name in ("include_streaming_events", "capture_turn_requests", "keep_session_events"):
            check_type(name, getattr(self, name), bool)
        check_callable("before_task", self.before_task, optional=True)
        check_callable("after_task", self.after_task, optional=True)
        # Infinite: the cutoff in nanoseconds cannot be computed (None waits for ever).
        check_seconds("group_end_timeout", self.group_end_timeout, optional=True, finite=True)


class OrphanEvent(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """An event the recorder could not attach to a loop, kept instead of dropped."""

    event: AgentEvent
    reason: str


class SpawnGap(msgspec.Struct, frozen=True, kw_only=True):
    """A link between a sub-agent's session and the tool call that spawned it that the
    recorder could not complete: the other end was recorded elsewhere (another process's
    recorder, another adapter's tracer), so the sub-agent is saved with a spawn ref
    lacking its tool call. `SessionSaver` completes it from the store once the session
    that noted it (`noted_by`) is saved: one read, the other end's outline.

    * The spawner's side (`header` None), noted as the spawner's session is drained:
      its loop ``spawn.parent_loop_id`` named ``loop_ids`` by the tool call in `spawn`,
      and the sub-agent never started here. The sub-agent's session `session_id`, if
      stored with a spawn ref from that loop lacking the tool call, gets `spawn`.
    * The sub-agent's side (`header`: its session without loops), noted as it is
      drained with `spawn` lacking the tool call and that loop not held here: if the
      spawner's stored loop names one of ``loop_ids``, the session gets its tool call.
    """

    session_id: str
    """The sub-agent's session."""
    loop_ids: tuple[str, ...]
    """Its loops that the spawner's loop spawned."""
    spawn: SpawnRef
    header: Session | None = None

    @property
    def noted_by(self) -> str:
        """The drained session that noted the gap: it is linked once that one is saved, so
        that of two recorders' sides the later read sees the other's save."""
        return self.session_id if self.header is not None else self.spawn.parent_session_id


class _PartialTurn:
    __slots__ = ("inputs", "payload", "started_at", "trigger", "turn_id")

    def __init__(self, event: TurnStart) -> None:
        self.turn_id = TurnId(loop_id=event.loop_id, turn_index=event.turn_index)
        self.trigger = event.triggered_by
        self.started_at = event.timestamp
        self.inputs: list[AgentMessage] = []
        self.payload: AnnotatedRequestPayload | None = None


# In `SessionRecorder._steps`: an event type with a handler of its own, not stored by `_store`.
_OWN: Any = object()
_ALL_OWN = dict.fromkeys(EVENT_TYPES, _OWN)  # the steps `on_event` takes inline with a write-ahead hook


class _OpenLoop:
    """A loop being recorded: what it gathers is kept here, in lists, and handed to its
    record as tuples when it closes (`finish`)."""

    __slots__ = ("child_loop_refs", "events", "named", "record", "session_id", "started", "turn", "turns")

    def __init__(self, record: LoopRecord, *, started: bool = True) -> None:
        self.record = record
        self.session_id = record.session_id
        self.turn: _PartialTurn | None = None
        # The events in arrival order, numbered (as LoopEvents, in C) when handed over.
        self.events: list[AgentEvent] = []
        self.turns: list[Turn] = []
        self.child_loop_refs: list[ChildLoopRef] = []
        # The child loops its tool calls named, once one does (most loops name none).
        self.named: set[str] | None = None
        # Pending parallel branches are not started: they do not hold their session open.
        self.started = started

    def append(self, event: AgentEvent) -> None:
        self.events.append(event)

    def names_first(self, child_loop_id: str) -> bool:
        """Whether a tool call of the loop names `child_loop_id` for the first time (a tool
        end delivered again names it again)."""
        if self.named is None:
            self.named = set()
        elif child_loop_id in self.named:
            return False
        self.named.add(child_loop_id)
        return True

    def finish(self) -> None:
        record, events = self.record, self.events
        record.events, record.turns = self._numbered(), tuple(self.turns)
        record.child_loop_refs = tuple(self.child_loop_refs)
        # Out of the collector's walk (`_collector`), innermost first: the record's
        # instants are its events' (the turns and the record share them), found in C as
        # most events have none; then what is still tracked (gc=True types: an
        # AgentStart, its LoopEvent) and now holds nothing tracked; then the tuples and
        # the record, if nothing in them is.
        release_leaves(filter(None, map(getattr, events, repeat("timestamp"), repeat(None))), Timestamp)
        release_records(filter(gc.is_tracked, events))
        release_records(filter(gc.is_tracked, record.events))
        for held in (record.events, record.turns, record.messages, record.child_loop_refs):
            release_tuple(held)
        release_records((record,))

    def _numbered(self) -> tuple[LoopEvent, ...]:
        return tuple(map(LoopEvent, count(), self.events))  # positional: no keyword matching

    def snapshot(self) -> LoopRecord:
        """A copy of the record with what the loop has gathered so far."""
        return replace(
            self.record,
            events=self._numbered(),
            turns=tuple(self.turns),
            child_loop_refs=tuple(self.child_loop_refs),
        )


class _Resent:
    """An ended loop being sent again (`SessionRecorder._resend`): what its record, once
    it ends, replaces, and what it then tells its session."""

    __slots__ = ("record", "session", "spawn")

    def __init__(self, session: Session, record: LoopRecord, spawn: SpawnRef | None) -> None:
        self.session = session  # the one holding `record` (drained meanwhile: amended)
        self.record = record
        self.spawn = spawn


class _Children:
    """The children of one parent record, gathered in place (an ordered set, so a repeat
    is a no-op) and handed to the record as a tuple by `link`, once per look at the
    session rather than once per child (a tuple grown per child is quadratic). Kept
    while its session is open: made again from the tuple, every look at the session
    would cost each later child all its siblings."""

    __slots__ = ("ids", "record")

    def __init__(self, record: LoopRecord) -> None:
        self.record = record
        self.ids = dict.fromkeys(record.children_loop_ids)

    def link(self) -> None:
        self.record.children_loop_ids = tuple(self.ids)


class _LateSpawns:
    """The sub-agent sessions of an open parent loop drained before the tool call that
    spawned them ended, indexed by their loops' ids: a tool call's end finds its child's
    session without looking through every sibling's loops (a hub loop has thousands)."""

    __slots__ = ("loops", "sessions")

    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}
        # Loop id -> its session's id; a session no longer owed may leave some (`session_of` checks).
        self.loops: dict[str, str] = {}

    def add(self, session: Session) -> None:
        session_id = session.session_id
        self.sessions[session_id] = session
        for record in session.loops:
            self.loops[record.loop_id] = session_id

    def take(self, session_id: str) -> Session | None:
        """The session of `session_id`, no longer owed, if it was."""
        session = self.sessions.pop(session_id, None)
        if session is not None:
            for record in session.loops:
                if self.loops.get(record.loop_id) == session_id:
                    del self.loops[record.loop_id]
        return session

    def session_of(self, loop_id: str) -> str | None:
        """The id of the session owed here that holds `loop_id`, if any."""
        session_id = self.loops.get(loop_id)
        return session_id if session_id in self.sessions else None


class _HeldSession:
    """A session the recorder still holds (open or completed-but-not-drained)."""

    __slots__ = (
        "before_task_due",
        "children",
        "closed",
        "early_children",
        "events",
        "latest",
        "open_loops",
        "places",
        "session",
        "spawner_here",
        "unlinked",
    )

    def __init__(self, session: Session) -> None:
        self.session = session
        self.open_loops = 0
        # Its ``before_task`` has not run yet (another thread runs the callbacks): not
        # complete before it has, so that a rejection is in what is handed over.
        self.before_task_due = False
        # First closed record per loop id: O(1) parent lookups (phi-core scans).
        self.closed: dict[str, LoopRecord] = {}
        # The last closed record of an id closed more than once (a compaction pass, an id
        # used again by a later loop): rare, so only those ids are here.
        self.latest: dict[str, LoopRecord] = {}
        # id(record) -> its place in ``session.loops``: a record sent again takes the place
        # of the one it replaces without a scan of the loops.
        self.places: dict[int, int] = {}
        # Session-scoped events: most sessions have none, and hold an empty tuple rather
        # than a list for the collector to walk; a list once they have some (appended to).
        self.events: list[AgentEvent] | tuple[()] = ()
        # Parent loop id -> its children, while the session is open (`link_child`).
        self.children: dict[str, _Children] = {}
        # The same, for those with children not yet in their record's tuple (`link_children`).
        self.unlinked: dict[str, _Children] = {}
        # Parent loop id -> the children that closed before it did (a continuation whose
        # trace an OTLP ingest got first); None while there are none, as in most sessions.
        self.early_children: dict[str, list[str]] | None = None
        # The loop that spawned it (``session.parent_spawn_ref``) was held here as it
        # started: every tool call naming it came here, so one that never did leaves
        # nothing for the store to complete.
        self.spawner_here = False

    def last_closed(self, loop_id: str) -> LoopRecord | None:
        """The record of `loop_id` that closed last, if any did."""
        return self.latest.get(loop_id) or self.closed.get(loop_id)

    def has_closed(self, loop_id: str, started_at: Timestamp) -> bool:
        """Whether the first or last closed record of `loop_id` started at `started_at`."""
        return any(
            record is not None and record.started_at == started_at
            for record in (self.closed.get(loop_id), self.latest.get(loop_id))
        )

    def link_child(self, parent: LoopRecord, child_id: str) -> None:
        parent_id = parent.loop_id
        children = self.children.get(parent_id)
        if children is None or children.record is not parent:
            if children is not None and self.unlinked.pop(parent_id, None) is not None:
                children.link()  # another record of the parent's id (a compaction pass)
            children = self.children[parent_id] = _Children(parent)
        children.ids[child_id] = None
        self.unlinked[parent_id] = children

    def await_parent(self, parent_id: str, child_id: str) -> None:
        """Link `child_id` to the first record of `parent_id` once it closes here."""
        if self.early_children is None:
            self.early_children = {}
        self.early_children.setdefault(parent_id, []).append(child_id)

    def link_early_children(self, record: LoopRecord) -> None:
        """Link the children that closed before `record`, if it is the first record of its id."""
        if self.early_children and self.closed.get(record.loop_id) is record:
            for child_id in self.early_children.pop(record.loop_id, ()):
                self.link_child(record, child_id)

    def link_children(self) -> Session:
        """The session, its records' ``children_loop_ids`` brought up to date."""
        for children in self.unlinked.values():
            children.link()
        self.unlinked.clear()
        return self.session

    def complete(self) -> None:
        """Link every child, and let the gathering go: nothing links to a completed
        session (it is reopened first)."""
        self.link_children()
        self.children.clear()


class _Deferral:
    """`SessionRecorder.deferred_callbacks`: one per recorder, its depth kept per thread,
    so a wrapper may enter it for every event it feeds (a generator-based one cost more
    than the rest of a journaled event's overhead)."""

    __slots__ = ("_deferring", "_run_callbacks")

    def __init__(self, deferring: threading.local, run_callbacks: Callable[[], None]) -> None:
        self._deferring, self._run_callbacks = deferring, run_callbacks

    def __enter__(self) -> None:
        self._deferring.depth = getattr(self._deferring, "depth", 0) + 1

    def __exit__(self, *exc_info: object) -> None:
        self._deferring.depth -= 1
        self._run_callbacks()


_CHECKING_ENTRIES: set[Callable[..., Any]] = set()
"""The library's entries that check an event, then record it by ``on_checked_event``
(`checking_entry`)."""

_Entry = TypeVar("_Entry", bound=Callable[..., Any])


def checking_entry(function: _Entry) -> _Entry:
    """Marks a library class's event entry (``on_event``, a sink's ``__call__``) as checking
    an event as `SessionRecorder.on_event` does, then recording it by the class's
    ``on_checked_event``: what `checked_entry` may skip for a `Tracer`'s events."""
    _CHECKING_ENTRIES.add(function)
    return function


def checked_entry(receiver: object, entry: str = "on_event") -> Callable[..., Any] | None:
    """`receiver.on_checked_event`, where a `Tracer`'s events (checked and copied as it makes
    them) skip the checks its `entry` makes of a hand-built one, if that entry is the
    library's own (`checking_entry`); None if it was set on the object (a spy), patched
    on the class (``mock.patch.object(..., autospec=True)``) or overridden by a subclass:
    whatever it does to every event must see the tracer's too."""
    if entry in getattr(receiver, "__dict__", ()):
        return None
    if getattr(type(receiver), entry, None) not in _CHECKING_ENTRIES:
        return None
    return getattr(receiver, "on_checked_event", None)


class SessionRecorder:
    """Records an AgentEvent stream into Sessions.

    Typical use: feed every event (`on_event`, or `on_json` for JSON lines), call
    `flush()` at the end, then `drain_completed()` and save each session.
    `checkpoint()` + `drain_completed()` hand over finished sessions as you go.
    All methods are thread-safe; `on_event` never raises for odd event sequences
    (unknown loops become orphans) and runs in O(1) amortized time.
    """

    def __init__(self, config: SessionRecorderConfig | None = None, **options: Any) -> None:
        if config is not None and options:
            raise TypeError("pass either a SessionRecorderConfig or keyword options, not both")
        check_type("config", config, SessionRecorderConfig, optional=True)
        self.config = config if config is not None else SessionRecorderConfig(**options)
        self._keep_deltas = self.config.include_streaming_events  # read on every delta
        self._lock = threading.RLock()
        self._open: dict[str, _HeldSession] = {}
        self._completed: dict[str, _HeldSession] = {}
        self._loops: dict[str, _OpenLoop] = {}
        self._loop_session: dict[str, str] = {}  # every loop id seen -> its session id
        # Loop id -> the held sessions with a closed record of it (`_HeldSession.closed`);
        # session ids, not records: tuples of strings the GC does not track.
        self._closed_by_id: dict[str, tuple[str, ...]] = {}
        # Branch id -> the start of its open group: its ids, session and beginning.
        self._groups: dict[str, ParallelLoopStart] = {}
        self._open_groups: dict[str, int] = {}  # session id -> parallel groups not yet ended
        # Session id -> branch id -> the start of its group still open when `flush` ended it,
        # with the branch's drained records owed its end (`_late_branches`: a later end is
        # applied to its every branch, as phi-core keeps partial groups), or when it was
        # given up (None: a later end is an orphan); kept while the session is held, since
        # only a held session's records (and those owed with them) take a late end.
        self._ended_groups: dict[str, dict[str, tuple[ParallelLoopStart, _Owed | None]]] = {}
        # Branch id -> session id of those groups once their session is drained (the latest
        # `_DRAINED_GROUP_BRANCHES`): their end is an orphan even if the session goes on.
        # Ordered: the oldest goes first in O(1). A new group naming a branch id takes it.
        self._drained_groups: OrderedDict[str, str] = OrderedDict()
        # What drained sessions are still owed, so the late information can be handed
        # over again (see `drain_completed`); all of it ends with the group or parent loop.
        self._late_branches: dict[str, _Owed] = {}  # loop in an open group
        self._late_groups: dict[str, Session] = {}  # session drained with a group open
        # Such a session, and one whose parallel starts wait in `_early_events` -> the
        # stream time when it was drained or the latest arrived (None: before any
        # AgentStart; the first checkpoint puts its own): what `group_end_timeout`
        # counts from, not the events' own times, which another host's clock sets.
        self._late_since: dict[str, Timestamp | None] = {}
        self._early_since: dict[str, Timestamp | None] = {}
        # The header of such a session once its group ended with a branch never started.
        self._unstarted_homes: dict[str, Session] = {}
        self._stream_time: Timestamp | None = None  # the latest AgentStart's (`group_end_timeout`)
        self._late_spawns: dict[str, _LateSpawns] = {}  # open parent loop -> sub-agents
        self._spawner_owing: dict[str, str] = {}  # such a sub-agent's session -> that loop (`may_amend`)
        self._spawns: dict[str, tuple[str, str, str, str]] = {}  # child loop -> parent ref
        # The same, once the parent's session was drained before the child started
        # (an OTLP ingest sends a caller's loop whole, then its sub-agent's).
        # Ordered: the oldest goes first in O(1) (a plain dict finds its first entry past
        # every one deleted before it).
        self._awaited_spawns: OrderedDict[str, tuple[str, str, str, str]] = OrderedDict()
        self._resending: dict[str, _Resent] = {}  # open loop sent again -> what it replaces
        # Child loops a tool call named whose session is not recorded here (so far): their
        # links are completed from the store (`_forget`), unless they start here after all.
        self._unheld_children: set[str] = set()
        self._spawn_gaps: deque[SpawnGap] = deque(maxlen=_SPAWN_GAPS)  # `drain_spawn_gaps`
        self._gaps_dropped = False  # the oldest of them were dropped (warned of)
        self._orphans: list[OrphanEvent] = []
        # Session-scoped events that arrive before their session's first AgentStart.
        self._early_events: dict[str, list[AgentEvent]] = {}
        self._warned_loops: set[str] = set()
        self._dropped_deltas = 0
        # Write-ahead hook (a journal): called with each kept event's JSON, under the
        # lock and before the event is applied, so the journal's order is ours.
        self._write_ahead: Callable[[bytes | str], object] | None = None
        self._inline_steps = self._steps  # what `on_event` stores inline (`set_write_ahead`)
        self._settled_hook: Callable[[str], object] | None = None  # `set_settled_hook`
        # before_task/after_task wait here (callback, session, its held session for a
        # before_task) and run once the lock is released, in order (`_run_callbacks`).
        self._callbacks: deque[tuple[SessionCallback, Session, _HeldSession | None]] = deque()
        self._callback_runner = threading.Lock()  # held by the one thread running them
        self._deferring = threading.local()  # `deferred_callbacks` blocks open in this thread
        self._deferral = _Deferral(self._deferring, self._run_callbacks)
        self._copy_failures = copy_failures(logger)
        """Free-form values `on_event` recorded as their JSON copy (`recordable_event`)."""

    # -- feeding ------------------------------------------------------------------

    def on_json(self, data: bytes | str) -> None:
        """Decode one phi-core JSON event and record it. Raises `DecodeError`.

        Streaming deltas that the configuration drops are checked for shape but
        not materialized: they are the bulk of a stream and are never kept.
        """
        decoded = _decode_for_recording(data)
        if type(decoded) is _LazyMessageUpdate:
            with self._lock:
                if not self._keep_deltas and decoded.loop_id in self._loops:
                    self._dropped_deltas += 1
                    return
            decoded = codec.decode_event(data, strict=False)
        handler = self._handlers[type(decoded)]
        with self._lock:
            if self._write_ahead is not None:
                self._write_ahead(data)
            handler(self, decoded)
        if self._callbacks:
            self._run_callbacks()

    @checking_entry
    def on_event(self, event: AgentEvent) -> None:
        """Record one event, built by hand, as `Tracer.emit` would record it.

        Raises `TypeError` (a field of the wrong type) or `InvalidArgument` (a value
        phi-core cannot hold: a negative count, an unknown stop reason) for an event
        holding such a field, in the records it carries too (its messages, tool results,
        config snapshot, request: `codec.check_recordable`), recording nothing of it; the
        error names the field. Free-form values (tool arguments, loop metadata, tool result
        details, extension message data, a request's tool parameters and schema) are
        converted, not refused, as a `Tracer` converts them: held as given when every
        store writes them so and the copy would not change them, else copied as their JSON
        (`_owning._own_copy`: a `pathlib.Path` or an object as its ``str``, a dict key that
        is no text as text, a NaN or an integer beyond 64 bits as text, bytes as their
        text), the copy counted and logged once. A streaming delta dropped unkept is not looked at.
        """
        self.on_checked_event(self.recordable(event))

    def recordable(self, event: AgentEvent) -> AgentEvent:
        """`event` as `on_event` records it (itself, or a copy of its free-form values as
        JSON), or its error; a wrapper checking what it is given, then feeding
        `on_checked_event`, checks so."""
        # A delta of an open loop, deltas not kept: dropped unread (were the loop to end
        # meanwhile, it is kept as an orphan, as it came).
        if type(event) is MessageUpdate and not self._keep_deltas and event.loop_id in self._loops:
            return event
        return recordable_event(event, self._copy_failures)

    def on_checked_event(self, event: AgentEvent) -> None:
        """`on_event` for an event whose records were checked and whose free-form values
        are copied as JSON where it was made (a `Tracer`'s, which its `FanOut` delivers
        here): only its own fields are checked (`codec.check_event_fields`), at a cost
        small beside recording it."""
        if type(event) is MessageUpdate:  # most events of a stream: handled inline
            with self._lock:
                loop = self._loops.get(event.loop_id)
                if loop is not None and self._write_ahead is None:
                    if self._keep_deltas:
                        loop.events.append(event)  # `loop.append`, inline
                    else:
                        self._dropped_deltas += 1
                    return
        _check_event_fields(event)  # before anything changes: a refused event leaves no trace
        with self._lock:
            # The usual event, for an open loop: `_store`, inline (`_inline_steps` maps
            # every type to _OWN while a write-ahead hook is set: each takes its handler).
            try:
                step = self._inline_steps[type(event)]
            except KeyError:
                raise TypeError(f"not an AgentEvent: {type(event).__name__}") from None
            loop = None if step is _OWN else self._loops.get(event.loop_id)  # type: ignore[union-attr]
            if loop is not None:
                loop.events.append(event)  # `loop.append`, inline
                if step is not None:
                    step(self, loop, event)
                return  # no step queues callbacks (only opening a session does)
            if self._write_ahead is not None and not self._drops(event):
                self._write_ahead(codec.encode_event(event))
            self._handlers[type(event)](self, event)
        if self._callbacks:
            self._run_callbacks()

    def _drops(self, event: AgentEvent) -> bool:
        """Will this event be dropped (a streaming delta of a known loop, deltas off)?"""
        return type(event) is MessageUpdate and not self._keep_deltas and event.loop_id in self._loops

    def set_write_ahead(self, hook: Callable[[bytes | str], object] | None) -> None:
        """Call `hook(json_line)` with every event the recorder keeps, before applying it.

        A journal uses this to make recording write-ahead; the hook runs under the
        recorder's lock, so its order is the recorder's. Dropped deltas are not
        passed (replaying them would drop them again); malformed lines neither.
        One hook at a time: `InvalidArgument` while another is set (a `JournaledRecorder`'s,
        whose journal would silently stop getting events); None removes it.
        """
        with self._lock:
            _check_free("write-ahead", hook, self._write_ahead)
            self._write_ahead = hook
            self._inline_steps = self._steps if hook is None else _ALL_OWN

    def set_settled_hook(self, hook: Callable[[str], object] | None) -> None:
        """Call `hook(session_id)` when a drained session may no longer be owed anything
        (`may_amend` may have turned False without an amendment to drain): its parallel
        group ended or was given up, the loop that spawned it ended, a loop of it sent
        again ended. A caller keeping what it needs to redo such sessions (a journal's
        records) asks about those, not about every session owed at every checkpoint (a
        hub's thousands of sub-agents). The hook runs under the recorder's lock: it may
        only note the id. One hook at a time: `InvalidArgument` while another is set (an
        `AutoPersistingRecorder`'s, whose journal would silently be kept for ever); None
        removes it.
        """
        with self._lock:
            _check_free("settled", hook, self._settled_hook)
            self._settled_hook = hook

    def release_hooks(self, *hooks: Callable[..., object]) -> None:
        """Remove those of `hooks` still set (`set_write_ahead`, `set_settled_hook`): their
        owner closed (a journal), and the recorder may be journaled again. A hook set since
        in place of one of them, another's, stays."""
        with self._lock:
            if self._write_ahead in hooks:
                self.set_write_ahead(None)
            if self._settled_hook in hooks:
                self.set_settled_hook(None)

    def _owed_less(self, session_ids: Iterable[str]) -> None:
        """`session_ids`, drained, may no longer be owed anything (`set_settled_hook`)."""
        hook = self._settled_hook
        if hook is not None:
            for session_id in session_ids:
                hook(session_id)

    def record_all(self, events: Iterable[AgentEvent]) -> None:
        for event in events:
            self.on_event(event)

    # -- event handlers -----------------------------------------------------------

    def _store(self, event: Any) -> None:
        """Store the event in its open loop (or keep it as an orphan), then take its type's step."""
        loop = self._loops.get(event.loop_id)
        if loop is None:
            self._no_loop(event)
            return
        loop.events.append(event)  # `loop.append`, inline
        step = self._steps[type(event)]
        if step is not None:
            step(self, loop, event)

    def _no_loop(self, event: Any) -> None:
        """Keep an event whose loop is not open as an orphan."""
        self._orphan(event, "unknown or already closed loop" if event.loop_id else "event without a loop")

    def _orphan(self, event: AgentEvent, reason: str) -> None:
        self._orphans.append(OrphanEvent(event=event, reason=reason))
        loop_id = getattr(event, "loop_id", "")
        self._warn_once(
            loop_id, "%s event for %s kept as orphan: %s", type(event).__name__, loop_id or "no loop", reason
        )

    def _warn_once(self, loop_id: str, message: str, *args: object) -> None:
        """Log a warning about `loop_id`, once per loop rather than once per event."""
        if loop_id not in self._warned_loops:
            self._warned_loops.add(loop_id)
            logger.warning(message, *args)

    def _session_of(self, loop_id: str, claimed: str | None = None) -> str:
        """The session of `loop_id`: the one the recorder saw it in, else `claimed` (the
        session an event naming it is of) if the id starts with it, else its id's prefix.
        A session id may hold dots (phi-core's own stream): the first one ends no session."""
        known = self._loop_session.get(loop_id)
        if known is None:
            pending = self._loops.get(loop_id)  # a Pending branch: its group's session
            if pending is not None:
                known = pending.session_id
            elif claimed is not None and loop_id.startswith(f"{claimed}."):
                known = claimed
            else:
                known = session_id_from_loop_id(loop_id)
        return known

    def _misrouted(self, event: ParallelLoopStart | ParallelLoopEnd, loop_ids: Iterable[str]) -> bool:
        """Whether a parallel event names a loop of another session (which it must not edit)."""
        for loop_id in loop_ids:
            owner = self._session_of(loop_id, event.session_id)
            if owner != event.session_id:
                self._warn_once(
                    loop_id,
                    "%s of session %s names loop %s of session %s: kept in its session's events, not applied",
                    type(event).__name__,
                    event.session_id,
                    loop_id,
                    owner,
                )
                return True
        return False

    def _on_agent_start(self, event: AgentStart) -> None:
        if self._stream_time is None or event.timestamp > self._stream_time:
            self._stream_time = event.timestamp
        if (
            event.loop_id in self._closed_by_id
            and event.continuation_kind != COMPACTION
            and not self._starts_again(event.session_id, event.loop_id, event.timestamp)
        ):
            # Its loop ended and is still held: a second record would hold the loop twice.
            if not self._resend(event):
                self._orphan(event, "repeated AgentStart for an already closed loop")
            return
        existing = self._loops.get(event.loop_id)
        if existing is not None and existing.started:
            # phi-core would replace the open record and lose it; keep it, and let the
            # repeat change nothing else (it may name another session or parent).
            existing.append(event)
            logger.warning("repeated AgentStart for open loop %s: kept the existing record", event.loop_id)
            return
        held = self._open.get(event.session_id)
        if held is None:
            held = self._completed.pop(event.session_id, None)  # still held: it joins
            if held is not None:
                self._open[event.session_id] = held
            else:
                held = self._open_session(event)
                self._unstarted_homes.pop(event.session_id, None)  # held: amended in place
        session = held.session
        if event.timestamp > session.last_active_at:
            session.last_active_at = event.timestamp
        if session.parent_spawn_ref is None:
            session.parent_spawn_ref = self._spawn_ref(event)
            parent = event.parent_loop_id
            held.spawner_here = parent is not None and (parent in self._loops or parent in self._loop_session)
        record = _started(event)
        loop = _OpenLoop(record)
        if existing is not None:  # a Pending branch starts: keep what arrived before it
            loop.events = existing.events
            record.parallel_group = existing.record.parallel_group
            loop.turn = existing.turn
        self._loops[event.loop_id] = loop
        self._loop_session[event.loop_id] = event.session_id
        if self._unheld_children:
            self._unheld_children.discard(event.loop_id)  # a child started here after all
        held.open_loops += 1
        loop.append(event)

    def _starts_again(self, session_id: str, loop_id: str, timestamp: Timestamp) -> bool:
        """Whether a loop of `loop_id` starting at `timestamp` in `session_id` is a new loop
        of an id used before: the id's last record there ended by then. phi-core names
        loops so that ids come again (wire-format §8.1): a compaction pass reuses its
        loop's id, a second parallel evaluation its branches' `{segment}.{k}`, which an
        agent's own `{segment}.{N}` may also reach. A start at the ended record's own
        instant is that loop sent again (`_resend`), no new loop."""
        held = self._open.get(session_id) or self._completed.get(session_id)
        record = held.last_closed(loop_id) if held is not None else None
        return (
            record is not None
            and record.ended_at is not None
            and timestamp >= record.ended_at
            and timestamp != record.started_at
        )

    def _spawn_ref(self, event: AgentStart) -> SpawnRef | None:
        """The link of `event`'s session to the loop that spawned it, if its parent loop is
        another session's. What the recorder saw decides; the loop-id prefix is only the fallback."""
        parent = event.parent_loop_id
        if parent is None:
            return None
        # The parent's tool call ended first (its session maybe drained since).
        known = self._spawns.get(event.loop_id) or self._awaited_spawns.get(event.loop_id)
        if known is not None and known[1] == parent:
            parent_session, tool_call_id, tool_name = known[0], known[2], known[3]
        elif (
            event.continuation_kind.kind != "Initial"
            and parent not in self._loop_session
            and parent not in self._loops
            and session_id_from_loop_id(parent) == parent
        ):
            # A continuation of a bare-id loop no longer held (drained): the id names no
            # session, and a continuation goes on in its parent's session.
            return None
        else:
            parent_session, tool_call_id, tool_name = self._session_of(parent, event.session_id), "", ""
        if parent_session == event.session_id:
            return None
        return SpawnRef(
            parent_session_id=parent_session,
            parent_loop_id=parent,
            tool_call_id=tool_call_id,
            tool_name=tool_name,
        )

    def _resend(self, event: AgentStart) -> bool:
        """Open `event`'s loop again if `event` starts its ended record, held, at the same
        instant: the loop sent again by a producer that learned more (an OTLP ingest that
        found its caller). Until it ends it changes nothing held: its session keeps the
        ended record (and is complete if it was), and only its AgentEnd lets its record
        take that one's place (`_end_resend`), as a store's merge of the two saves would.
        So too the late run of a parallel branch Aborted before it started, its group given
        up (the stream time jumped ahead, a host's clock) or ended by `flush`: its group's
        end, come while the session is held, then marks the branches, as after `flush`."""
        held = self._open.get(event.session_id) or self._completed.get(event.session_id)
        record = None
        if held is not None:  # the first record of its id, or the last (an id used again)
            record = held.closed.get(event.loop_id)
            if record is not None and not _restarted_by(record, event):
                record = held.latest.get(event.loop_id)
        if held is None or record is None or not _restarted_by(record, event) or event.loop_id in self._loops:
            return False  # (an open one of its id: a compaction pass, or the loop sent again already)
        if _never_ran(record):
            self._group_end_applies(event.session_id, event.loop_id)
        self._resending[event.loop_id] = _Resent(held.session, record, self._spawn_ref(event))
        loop = _OpenLoop(_started(event))
        self._loops[event.loop_id] = loop
        loop.append(event)
        return True

    def _group_end_applies(self, session_id: str, loop_id: str) -> None:
        """A branch of a group given up ran after all: the group's end, if it comes while
        the session is held, is no orphan but marks its branches (as for `flush`'s)."""
        branches = self._ended_groups.get(session_id, {})
        ended = branches.get(loop_id)
        if ended is not None and ended[1] is None:
            group = ended[0]
            for branch_id in group.loop_ids:
                if branches.get(branch_id, (None,))[0] is group:
                    branches[branch_id] = (group, [])

    def _end_resend(self, loop: _OpenLoop, *, ended: bool) -> None:
        """The loop sent again is over: if it ended and holds as many events, its record
        replaces the ended one in place, keeping its links, and a completed session is
        completed again, as any session a loop closes in (one drained meanwhile gets the
        record as an amendment); else its events are orphans, the ended record untouched.
        A branch's run replaces its record that never ran even unended, Aborted."""
        record = loop.record
        resent = self._resending.pop(record.loop_id)
        self._owed_less((resent.session.session_id,))
        del self._loops[record.loop_id]
        self._spawner_ended(record.loop_id)
        replaced = resent.record
        if _never_ran(replaced):
            if not ended:  # as `_abort` ends a loop
                loop.turn = None
                record.status = "Aborted"
        elif not ended or len(loop.events) < len(replaced.events):
            # `merge_sessions` too keeps, of two finished versions, the one with more events.
            reason = (
                "loop sent again with fewer events than its ended record, which is kept"
                if ended
                else "loop sent again that never ended: its ended record is kept"
            )
            for event in loop.events:
                self._orphan(event, reason)
            return
        loop.finish()
        session_id = record.session_id
        held = self._open.get(session_id)
        if held is None:
            held = self._completed.get(session_id)
            if held is not None and held.session is resent.session:
                del self._completed[session_id]
                self._open[session_id] = held
            else:
                held = self._amendable(resent.session)  # drained meanwhile
        held.link_children()  # every child of the record replaced is in its tuple
        record = keep_links(replaced, record)
        self._link_to_parent(held, record)
        session = held.session
        spawn = resent.spawn
        if spawn is not None and (
            session.parent_spawn_ref is None
            or (spawn.tool_call_id and not session.parent_spawn_ref.tool_call_id)
        ):
            session.parent_spawn_ref = spawn
        self._add_closed(held, record, replaced)

    def _open_session(self, event: AgentStart) -> _HeldSession:
        formation = event.formation
        session = Session(
            session_id=event.session_id,
            agent_id=event.agent_id,
            created_at=event.timestamp,
            last_active_at=event.timestamp,
            formation=formation
            if isinstance(formation, SessionFormation)
            else SessionFormation.first_loop(event.timestamp),
            loops=[],
        )
        held = self._held_with_early_events(session)
        self._open[event.session_id] = held
        if self.config.before_task is not None:
            held.before_task_due = True
            self._callbacks.append((self.config.before_task, session, held))
        return held

    def _run_callbacks(self) -> None:
        """Run the queued callbacks in order, outside the recorder's lock.

        A callback may use the recorder, from its own thread or from another one it
        waits for. One thread runs them at a time; a thread that finds another one
        running them leaves its own to that thread (waiting could deadlock).
        """
        while (
            self._callbacks
            and not getattr(self._deferring, "depth", 0)
            and self._callback_runner.acquire(blocking=False)
        ):
            try:
                while self._callbacks:
                    callback, session, opened = self._callbacks.popleft()
                    result = None
                    try:
                        result = self._call(callback, session)
                    finally:  # even interrupted (Ctrl-C): a session waiting for it never completes
                        if opened is not None:
                            with self._lock:
                                self._before_task_ran(opened, rejected=result is False)
            finally:
                self._callback_runner.release()

    def _before_task_ran(self, held: _HeldSession, *, rejected: bool) -> None:
        held.before_task_due = False
        if not rejected:
            return
        session = held.session
        if self._open.get(session.session_id) is held or self._completed.get(session.session_id) is held:
            session.rejected = True
        else:  # `flush` completed it and it was drained: what was handed over is never modified
            self._amendable(session).session.rejected = True

    def deferred_callbacks(self) -> contextlib.AbstractContextManager[None]:
        """Hold ``before_task``/``after_task`` back until the block ends, then run them.

        For a wrapper that calls the recorder under a lock of its own: enter this
        first, then take that lock, so the callbacks run once both are released.
        """
        return self._deferral

    def _call(self, callback: SessionCallback, session: Session) -> Any:
        # A failing callback must not break recording: report it and go on.
        try:
            return callback(session)
        except Exception:
            logger.exception("session callback %r failed for %s", callback, session.session_id)
            return None

    # -- steps: what follows an event's storing in its open loop (`_store`) -------------

    def _on_agent_end(self, loop: _OpenLoop, event: AgentEnd) -> None:
        if not loop.started:
            self._end_unstarted(loop, event)
            return
        record = loop.record
        record.ended_at = event.timestamp
        record.rejection = event.rejection
        record.messages = tuple(event.messages)  # the event's own tuple, not a copy
        record.usage = event.usage
        if isinstance(event.error, str):
            record.status, record.error = "Aborted", event.error
        else:
            record.status = "Rejected" if event.rejection is not None else "Completed"
        if record.config is None:
            for message in event.messages:
                if isinstance(message, AssistantMessage):
                    record.config = _fallback_config(record.loop_id, message)
                    break
        if self._resending and record.loop_id in self._resending:
            self._end_resend(loop, ended=True)
        else:
            self._close(loop)

    def _end_unstarted(self, loop: _OpenLoop, event: AgentEnd) -> None:
        """A lone `AgentEnd` for an announced parallel branch: phi-core's loop sends only that
        when a ``before_loop`` hook vetoes the run (wire-format §10). The branch never ran:
        it ends Aborted now, its events kept, into its session if it is held or was drained
        (an amendment); else it stays Pending, the event in its log, until `flush` or a start
        (a session opened for it would take its header from no AgentStart). Its record ends
        at the event's instant: a later loop may use its id again (`_starts_again`)."""
        session_id = loop.session_id
        if not (
            session_id in self._open
            or session_id in self._completed
            or session_id in self._late_groups
            or session_id in self._unstarted_homes
        ):
            return
        loop.turn = None
        loop.record.status = "Aborted"
        loop.record.ended_at = event.timestamp
        self._close(loop)

    def _close(self, loop: _OpenLoop) -> None:
        """Move a loop out of the open map into its session, linking it to its parent."""
        record = loop.record
        held = self._open.get(loop.session_id)
        if held is None:
            # Only a Pending branch can outlive its open session (it does not hold it open):
            # drained with its group open, the session is amended; else a header is made up.
            held = self._completed.pop(loop.session_id, None)
            if held is None:
                late = self._late_groups.get(loop.session_id) or self._unstarted_homes.pop(
                    loop.session_id, None
                )
                held = self._amendment(late) if late is not None else self._placeholder_session(record)
            self._open[loop.session_id] = held
        del self._loops[record.loop_id]
        loop.finish()
        self._spawner_ended(record.loop_id)
        if loop.started:
            held.open_loops -= 1
        self._link_to_parent(held, record)
        self._add_closed(held, record)
        held.link_early_children(record)

    def _spawner_ended(self, loop_id: str) -> None:
        """The loop `loop_id` is over: its tool calls have all ended, no sub-agent is owed one."""
        owed = self._late_spawns.pop(loop_id, None)
        if owed is not None:
            for session_id in owed.sessions:
                if self._spawner_owing.get(session_id) == loop_id:
                    del self._spawner_owing[session_id]
            self._owed_less(owed.sessions)

    def _link_to_parent(self, held: _HeldSession, record: LoopRecord) -> None:
        parent_id = record.parent_loop_id
        if parent_id is not None:
            parent = held.closed.get(parent_id)
            if parent is None:
                open_parent = self._loops.get(parent_id)
                if open_parent is not None and open_parent.record.session_id == record.session_id:
                    parent = open_parent.record
            if parent is not None:
                held.link_child(parent, record.loop_id)
            elif (
                parent_id != record.loop_id
                and self._session_of(parent_id, record.session_id) == record.session_id
            ):
                held.await_parent(parent_id, record.loop_id)  # not here yet

    def _add_closed(self, held: _HeldSession, record: LoopRecord, replaced: LoopRecord | None = None) -> None:
        loops = held.session.loops
        slot = None if replaced is None else held.places.pop(id(replaced), None)
        if slot is None:
            slot = len(loops)
            loops.append(record)
        else:
            loops[slot] = record
        held.places[id(record)] = slot
        first = held.closed.get(record.loop_id)
        if first is None or first is replaced:
            held.closed[record.loop_id] = record
        elif replaced is None or held.latest.get(record.loop_id) is replaced:
            held.latest[record.loop_id] = record
        if first is None:
            session_id = held.session.session_id
            self._closed_by_id[record.loop_id] = (*self._closed_by_id.get(record.loop_id, ()), session_id)

    def _on_turn_start(self, loop: _OpenLoop, event: TurnStart) -> None:
        loop.turn = _PartialTurn(event)

    def _on_turn_request(self, loop: _OpenLoop, event: TurnRequest) -> None:
        if loop.turn is not None and self.config.capture_turn_requests:
            loop.turn.payload = event.payload

    def _on_message_end(self, loop: _OpenLoop, event: MessageEnd) -> None:
        # By role (wire-format §3.5): an extension message may say "assistant" too.
        if loop.turn is not None and message_role(event.message) != "assistant":
            loop.turn.inputs.append(event.message)

    def _on_message_update(self, event: MessageUpdate) -> None:
        loop = self._loops.get(event.loop_id)
        if loop is None:
            self._no_loop(event)
        elif self._keep_deltas:  # most events of a stream: one lookup of their loop
            loop.append(event)
        else:
            self._dropped_deltas += 1

    def _on_turn_end(self, loop: _OpenLoop, event: TurnEnd) -> None:
        pending, loop.turn = loop.turn, None
        record = loop.record
        if pending is not None:
            turn_id = pending.turn_id
            loop.turns.append(
                Turn(
                    turn_id=turn_id,
                    triggered_by=pending.trigger,
                    usage=event.usage,
                    input_messages=tuple(pending.inputs),
                    output_message=event.message,
                    tool_results=tuple(
                        map(partial(codec.stamped_plain, turn_id=turn_id), event.tool_results)
                    ),
                    started_at=pending.started_at,
                    ended_at=event.timestamp,
                    request_payload=pending.payload,
                )
            )
        if record.config is None and isinstance(event.message, AssistantMessage):
            record.config = _fallback_config(record.loop_id, event.message)

    def _on_tool_end(self, loop: _OpenLoop, event: ToolExecutionEnd) -> None:
        child_loop_id = event.result.child_loop_id
        if not isinstance(child_loop_id, str):
            return
        child_session_id = (
            self._loop_session.get(child_loop_id)
            or self._late_child_session(event.loop_id, child_loop_id)
            or session_id_from_loop_id(child_loop_id)
        )
        named_first = loop.names_first(child_loop_id)
        loop.child_loop_refs.append(
            ChildLoopRef(
                tool_call_id=event.tool_call_id,
                tool_name=event.tool_name,
                child_loop_id=child_loop_id,
                child_session_id=child_session_id,
            )
        )
        parent_ref = (loop.session_id, event.loop_id, event.tool_call_id, event.tool_name)
        owed = self._late_spawns.get(event.loop_id)
        late = None if owed is None else owed.take(child_session_id)
        if late is not None and self._spawner_owing.get(child_session_id) == event.loop_id:
            del self._spawner_owing[child_session_id]
        if late is None:  # for a child that starts later, or is sent again
            self._spawns[child_loop_id] = parent_ref
        held = self._open.get(child_session_id) or self._completed.get(child_session_id)
        if held is None and late is not None:
            held = self._amendable(late)  # drained before this tool call ended
        if (
            held is None
            and late is None
            and event.tool_call_id
            # Named before (the tool end delivered again), its link was settled then; one
            # awaited was named by a loop drained before, which noted its link.
            and named_first
            and child_loop_id not in self._awaited_spawns
        ):
            self._unheld_children.add(child_loop_id)  # recorded elsewhere, or later (`_forget`)
        if held is not None:
            spawn = held.session.parent_spawn_ref
            if (spawn is None and late is not None) or (spawn is not None and not spawn.tool_call_id):
                held.session.parent_spawn_ref = SpawnRef(
                    parent_session_id=parent_ref[0],
                    parent_loop_id=parent_ref[1],
                    tool_call_id=parent_ref[2],
                    tool_name=parent_ref[3],
                )

    def _late_child_session(self, parent_loop_id: str, child_loop_id: str) -> str | None:
        """The id of a drained sub-agent session holding `child_loop_id`, if one is owed its tool call."""
        owed = self._late_spawns.get(parent_loop_id)
        return None if owed is None else owed.session_of(child_loop_id)

    def _amendable(self, drained: Session) -> _HeldSession:
        """Where late information for a drained session goes: the session if it is held
        again, else an amendment (its header, then only what changed) for the next drain."""
        held = self._open.get(drained.session_id) or self._completed.get(drained.session_id)
        if held is None:
            held = self._completed[drained.session_id] = self._amendment(drained)
        return held

    @staticmethod
    def _amendment(drained: Session) -> _HeldSession:
        return _HeldSession(replace(drained, loops=[], session_events=msgspec.UNSET))

    def _on_parallel_start(self, event: ParallelLoopStart) -> None:
        self._session_event(event)
        if self._misrouted(event, event.loop_ids):
            return
        loop_ids = event.loop_ids
        # A group no end can name (no branch) or a repeat is no new group to wait for.
        open_group = self._groups.get(loop_ids[0]) if loop_ids else None
        if loop_ids and (open_group is None or open_group.loop_ids != loop_ids):
            self._open_groups[event.session_id] = self._open_groups.get(event.session_id, 0) + 1
        for loop_id in event.loop_ids:
            self._groups.setdefault(loop_id, event)
            self._drained_groups.pop(loop_id, None)
            if loop_id in self._loops or (
                loop_id in self._loop_session
                and not self._starts_again(event.session_id, loop_id, event.timestamp)
            ):
                continue
            # Pre-register the branch so it is visible (and cannot vanish) before it starts.
            record = LoopRecord.start(
                loop_id=loop_id,
                session_id=event.session_id,
                agent_id="",
                started_at=event.timestamp,
                status="Pending",
            )
            self._loops[loop_id] = _OpenLoop(record, started=False)

    def _on_parallel_end(self, event: ParallelLoopEnd) -> None:
        group_start = self._groups.get(event.selected_loop_id)
        ended = None if group_start is not None else self._take_ended_group(event)
        # Branch id -> its drained records owed this end; None: the end is an orphan.
        owed: dict[str, _Owed] | None = self._late_branches
        if ended is not None:
            group_start, owed = ended
        elif group_start is None and self._drained_groups.get(event.selected_loop_id) == event.session_id:
            owed = None
        if owed is None:
            self._orphan(event, "end of a parallel group given up, or ended by flush and drained since")
            return
        group_ids = None if group_start is None else group_start.loop_ids
        all_ids = group_ids or (event.selected_loop_id,)
        if self._misrouted(event, all_ids):
            self._session_event(event)
            return
        grouped = group_ids is not None
        for loop_id in all_ids:
            group = ParallelGroupRecord(
                all_loop_ids=all_ids,
                selected_loop_id=event.selected_loop_id,
                selected_config_index=event.selected_config_index,
                evaluation_usage=event.evaluation_usage,
                is_selected=loop_id == event.selected_loop_id,
            )
            loop = self._loops.get(loop_id)
            if loop is not None and _takes_group(loop.record, event, grouped):
                loop.record.parallel_group = group
            branch_of = group_start if ended is not None else self._groups.get(loop_id)
            since = None if branch_of is None else branch_of.timestamp
            for session_id in self._closed_by_id.get(loop_id, ()):
                held = self._open.get(session_id) or self._completed[session_id]
                record = held.last_closed(loop_id)
                assert record is not None  # `_closed_by_id` lists the sessions holding one
                # With a loop of its id open (a compaction pass, the loop sent again), a
                # record that ended before the group began is an earlier loop's.
                if (
                    loop is None or since is None or record.ended_at is None or record.ended_at >= since
                ) and _takes_group(record, event, grouped):
                    record.parallel_group = group
            for session, record in owed.pop(loop_id, ()):
                if self._sent_again(session.session_id, record):
                    continue  # its version sent again has the group (set above, or as it ends)
                # Drained already: amend a copy, never what was handed over.
                self._add_closed(
                    self._amendable(session),
                    replace(record, parallel_group=group),
                )
        if ended is None:  # (an ended group's ids may be a newer open group's)
            for loop_id in all_ids:
                self._groups.pop(loop_id, None)
        self._session_event(event)  # after the amendments, which hold a drained session again
        if group_ids is None or ended is not None:  # no open group: it must not end another one
            return
        remaining = self._open_groups.get(event.session_id, 0) - 1
        if remaining > 0:
            self._open_groups[event.session_id] = remaining
        else:
            self._open_groups.pop(event.session_id, None)
            late = self._late_groups.pop(event.session_id, None)
            if late is not None:
                del self._late_since[event.session_id]
                self._owed_less((event.session_id,))
            if late is not None and any(not self._loops[i].started for i in all_ids if i in self._loops):
                # A branch that never started ends at `flush`: into this session's header.
                self._unstarted_homes[event.session_id] = replace(
                    late, loops=[], session_events=msgspec.UNSET
                )

    def _take_ended_group(
        self, event: ParallelLoopEnd
    ) -> tuple[ParallelLoopStart, dict[str, _Owed] | None] | None:
        """The group `event` ends among `_ended_groups`, forgotten there: its start and, by
        branch id, the drained records owed its end (None: it was given up); None if it
        is none of them."""
        branches = self._ended_groups.get(event.session_id, {})
        ended = branches.get(event.selected_loop_id)
        if ended is None:
            return None
        group_start = ended[0]
        owed = {}
        for loop_id in group_start.loop_ids:
            _, late = branches.pop(loop_id, (group_start, None))
            if late:
                owed[loop_id] = late
        return group_start, None if ended[1] is None else owed

    def _sent_again(self, session_id: str, drained: LoopRecord) -> bool:
        """Whether the loop of the `drained` record was started again at its instant since
        (an OTLP ingest given a late span of it): open, or closed in its session held
        again. That version takes the drained one's place in a store's merge (which keeps
        the group of either): an amended copy of the drained one would be a second record."""
        loop = self._loops.get(drained.loop_id)
        if (
            loop is not None
            and loop.started
            and loop.session_id == session_id
            and loop.record.started_at == drained.started_at
        ):
            return True
        held = self._open.get(session_id) or self._completed.get(session_id)
        return held is not None and held.has_closed(drained.loop_id, drained.started_at)

    def _session_event(self, event: ParallelLoopStart | ParallelLoopEnd) -> None:
        held = self._open.get(event.session_id) or self._completed.get(event.session_id)
        late = self._late_groups.get(event.session_id)
        if held is None and late is not None and isinstance(event, ParallelLoopEnd):
            held = self._amendable(late)  # drained while this group was open
        if held is None:
            if isinstance(event, ParallelLoopStart):  # announced before its branches start
                self._early_events.setdefault(event.session_id, []).append(event)
                self._early_since[event.session_id] = self._stream_time
            else:  # the session was drained already (or never seen): keep, don't hoard
                self._orphan(event, "parallel event for a session the recorder no longer holds")
            return
        events = held.events
        if not events:
            events = held.events = []
        events.append(event)
        if self.config.keep_session_events:
            held.session.session_events = events  # the same list: O(1), not a copy per event

    # -- lifecycle ------------------------------------------------------------------

    def flush(self) -> None:
        """End of stream: abort open loops (in start order), complete every open session.

        Unfinished turns are discarded (their events stay in the loop's log).
        Aborted loops keep ``ended_at`` null and are linked to their parent. Open parallel
        groups are kept, as phi-core keeps them: a ``ParallelLoopEnd`` that comes before
        their sessions are drained marks every branch; one that comes after is an orphan,
        even if the session goes on (the latest ``_DRAINED_GROUP_BRANCHES`` branches of
        such groups are remembered; a new group naming one takes its own end).
        """
        with self._lock:
            for loop in list(self._loops.values()):
                self._abort(loop)
            self._keep_ended_groups(self._groups.items(), applies=True)  # before `_late_branches` goes
            self._groups.clear()
            self._open_groups.clear()
            # No sub-agent starts after the stream's end: none is awaited, even by a
            # spawner drained after this.
            self._spawns.clear()
            self._awaited_spawns.clear()
            self._late_branches.clear()
            self._owed_less(self._late_groups)
            self._late_groups.clear()
            self._late_since.clear()
            self._unstarted_homes.clear()
            for session_id in list(self._early_events):
                self._orphan_early_events(session_id)
            for session_id in list(self._open):
                self._complete(session_id)
        self._run_callbacks()

    def abort_session(self, session_id: str) -> int:
        """End of stream for one session (its agent died): `flush`, for it alone; returns
        how many open loops it aborted.

        Its open loops are aborted, its open parallel groups given up (their
        ``ParallelLoopEnd``, if it comes, is an orphan, even if the session goes on, as
        after `flush`), parallel events waiting for its first loop kept as orphans, and it
        is completed. Later events of its loops are orphans, as after `flush` (but the run
        of a branch that never started replaces its Aborted record while held). Costs
        O(open loops + open groups).
        """
        check_type("session_id", session_id, str)
        return self.abort_sessions((session_id,))[session_id]

    def abort_sessions(self, session_ids: Iterable[str]) -> dict[str, int]:
        """`abort_session` for each of `session_ids` (a broker worker ending every session
        of a host that died), in one pass over the open loops and groups, however many
        they are; returns how many open loops it aborted in each."""
        aborted = dict.fromkeys(check_each("session_ids", session_ids, str, "str"), 0)
        with self._lock:
            loops = [loop for loop in self._loops.values() if loop.session_id in aborted]
            for loop in loops:
                self._abort(loop)
                aborted[loop.session_id] += 1
            self._give_up_groups(aborted.keys())
            for session_id in aborted:
                self._unstarted_homes.pop(session_id, None)
                self._orphan_early_events(session_id)
                if session_id in self._open:
                    self._complete(session_id)
        self._run_callbacks()
        return aborted

    def _abort(self, loop: _OpenLoop) -> None:
        """End an open loop that never ends: Aborted, its unfinished turn discarded (a loop
        sent again: its ended record is kept)."""
        if self._resending and loop.record.loop_id in self._resending:
            self._end_resend(loop, ended=False)
            return
        loop.turn = None
        loop.record.status = "Aborted"
        self._close(loop)

    def _orphan_early_events(self, session_id: str) -> None:
        """Announced, but no branch ever started: its parallel events are orphans."""
        self._early_since.pop(session_id, None)
        for event in self._early_events.pop(session_id, ()):
            self._orphan(event, "parallel group whose session never started")

    def _placeholder_session(self, record: LoopRecord) -> _HeldSession:
        session = Session(
            session_id=record.session_id,
            agent_id=record.agent_id,
            created_at=record.started_at,
            last_active_at=record.started_at,
            formation=SessionFormation.first_loop(record.started_at),
            loops=[],
        )
        return self._held_with_early_events(session)

    def _held_with_early_events(self, session: Session) -> _HeldSession:
        """A new held session, with the parallel events that arrived before it."""
        held = _HeldSession(session)
        early = self._early_events.pop(session.session_id, None)
        self._early_since.pop(session.session_id, None)
        if early:
            held.events = early
            if self.config.keep_session_events:
                session.session_events = early  # the same list, which `_session_event` appends to
        return held

    def _complete(self, session_id: str) -> None:
        held = self._open.pop(session_id)
        self._completed[session_id] = held
        held.complete()
        if self.config.after_task is not None:
            self._callbacks.append((self.config.after_task, held.session, None))

    def checkpoint(self, *, loop_id: str | None = None) -> int:
        """Complete every open session whose loops have all ended; returns how many.

        phi-core's contract: a session is complete once every loop of it has received
        ``AgentEnd`` (Pending parallel branches that never started do not count),
        even if its parallel group has not ended or the tool call that spawned it is
        still running; until drained it is still enriched by such later events.
        A drained session's group still open after ``group_end_timeout`` is given up
        first (see `SessionRecorderConfig`). A session whose ``before_task`` has not run
        yet (another thread is running callbacks) waits for a later checkpoint (if `flush`
        completes it, a rejection comes as an amendment once drained). Costs
        O(open sessions + drained sessions owed a group's end + groups awaiting
        their session's first loop). ``after_task`` fires for
        each completed session.

        With `loop_id` (whose ``AgentEnd`` was just recorded), only the session of that
        loop is looked at, in O(1): for a caller that checkpoints after every loop's end
        (and now and then in full, for what completes otherwise).
        """
        check_type("loop_id", loop_id, str, optional=True)
        with self._lock:
            if loop_id is None:
                self._give_up_stale_groups()
                candidates: Iterable[tuple[str, _HeldSession]] = self._open.items()
            else:
                session_id = self._session_of(loop_id)
                held = self._open.get(session_id)
                candidates = () if held is None else ((session_id, held),)
            # A thread deferring callbacks runs them itself once its block ends: only another
            # thread's pending ``before_task`` holds a session back.
            deferring = getattr(self._deferring, "depth", 0)
            ready = [
                sid
                for sid, held in candidates
                if held.open_loops == 0 and (deferring or not held.before_task_due)
            ]
            for session_id in ready:
                self._complete(session_id)
        self._run_callbacks()
        return len(ready)

    def _give_up_stale_groups(self) -> None:
        """Give up the open parallel groups of sessions drained more than
        ``group_end_timeout`` of stream time ago: a killed agent's group never ends, and what
        the recorder keeps for its end (the session, its journal records) must not stay.
        So too a group announced by an agent killed before any loop of its session
        started, as long ago: its Pending branches are Aborted into a session made up for
        them, which this checkpoint completes (parallel events left waiting are orphans).
        Ages count from the stream time then (`_late_since`, `_early_since`)."""
        timeout = self.config.group_end_timeout
        if not (self._late_groups or self._early_events) or timeout is None or self._stream_time is None:
            return
        cutoff = self._stream_time.ns - round(timeout * 1_000_000_000)
        stale = []
        for session_id in self._waited(self._late_since, cutoff):
            held = self._open.get(session_id)
            if held is None or not held.open_loops:  # (a branch still running holds it)
                stale.append(session_id)
        # Only parallel starts wait there (an end for a session not held is an orphan).
        unstarted = self._waited(self._early_since, cutoff)
        stale += unstarted
        for session_id in stale:
            logger.warning(
                "session %s: parallel group without ParallelLoopEnd after %s s given up", session_id, timeout
            )
        if stale:
            self._give_up_groups(set(stale))
        for session_id in unstarted:
            self._orphan_early_events(session_id)  # those no branch took into its session

    def _waited(self, since: dict[str, Timestamp | None], cutoff: int) -> list[str]:
        """The session ids of `since` waiting since before `cutoff` (ns of stream time);
        one waiting since before any AgentStart waits from now on."""
        waited = []
        for session_id, at in since.items():
            if at is None:
                since[session_id] = self._stream_time  # (no key added: iterating stays safe)
            elif at.ns < cutoff:
                waited.append(session_id)
        return waited

    def _give_up_groups(self, session_ids: Collection[str]) -> None:
        """Forget the open parallel groups of `session_ids` (a set, in one pass over the
        groups): their branches that never started are aborted as at `flush`; an end that
        comes later is an orphan."""
        for session_id in session_ids:
            self._open_groups.pop(session_id, None)
        given_up = [
            (loop_id, group)
            for loop_id, group in self._groups.items()
            if self._session_of(loop_id, group.session_id) in session_ids
        ]
        for loop_id, _ in given_up:
            del self._groups[loop_id]
            self._late_branches.pop(loop_id, None)
            branch = self._loops.get(loop_id)
            # Never started: a started one holds its session open, or is its loop sent
            # again, which its AgentEnd or `flush` ends.
            if branch is not None and not branch.started:
                branch.record.status = "Aborted"
                self._close(branch)  # into the late group's session, amended
        self._keep_ended_groups(given_up, applies=False)
        for session_id in session_ids:
            if self._late_groups.pop(session_id, None) is not None:
                del self._late_since[session_id]
                self._owed_less((session_id,))

    def _keep_ended_groups(self, groups: Iterable[tuple[str, ParallelLoopStart]], *, applies: bool) -> None:
        """Remember the branches of `groups` (branch id, its group's start), open groups
        `flush` ended or given up, for a late end: in `_ended_groups` while their session
        is held, an ended one with the drained records it is owed; else in `_drained_groups`."""
        for loop_id, group in groups:
            if group.session_id in self._open or group.session_id in self._completed:
                owed = self._late_branches.pop(loop_id, []) if applies else None
                self._ended_groups.setdefault(group.session_id, {})[loop_id] = (group, owed)
            else:
                self._remember_drained_group(loop_id, group.session_id)

    def _remember_drained_group(self, loop_id: str, session_id: str) -> None:
        _remember_latest(self._drained_groups, loop_id, session_id, _DRAINED_GROUP_BRANCHES)

    def drain_completed(self) -> list[Session]:
        """Hand over the completed sessions and forget them (at most one per session id).

        A drained session can still learn something: its parallel group's winner
        (``ParallelLoopEnd``), the tool call that spawned it (the parent's
        ``ToolExecutionEnd``), the record of a loop of it sent again, that ended since.
        Such late information is handed over again by a later drain, as an *amendment*:
        a `Session` with the same id and header holding only the loops that changed
        (copies; what was handed over is never modified) and the new header fields and
        session events. A store's ``save`` merges it into
        the saved session (by loop id), so saving every drained session, amendments
        included, gives the same files as saving once at the end.
        """
        with self._lock:
            drained = list(self._completed.values())
            self._completed.clear()
            for held in drained:
                self._forget(held)
            return [held.session for held in drained]

    def _forget(self, held: _HeldSession) -> None:
        # Bounded memory: drop every index entry that points into a drained session;
        # remember only what it is still owed, until its group or parent loop ends.
        session = held.session
        for loop_id in self._ended_groups.pop(session.session_id, ()):
            self._remember_drained_group(loop_id, session.session_id)
        if session.session_id in self._open_groups:
            self._late_groups[session.session_id] = session
            self._late_since[session.session_id] = self._stream_time
        spawn = session.parent_spawn_ref
        if spawn is not None and not spawn.tool_call_id and spawn.parent_loop_id in self._loops:
            owed = self._late_spawns.get(spawn.parent_loop_id)
            if owed is None:
                owed = self._late_spawns[spawn.parent_loop_id] = _LateSpawns()
            owed.add(session)
            self._spawner_owing[session.session_id] = spawn.parent_loop_id
        elif spawn is not None and not spawn.tool_call_id and not held.spawner_here:
            # Its spawner's loop is not held here (recorded elsewhere): the store may hold it.
            spawned = tuple(r.loop_id for r in session.loops if r.parent_loop_id == spawn.parent_loop_id)
            if spawned:  # (else an amendment of loops that were not spawned: noted at its drain)
                header = replace(session, loops=[], session_events=msgspec.UNSET)
                self._note_gap(
                    SpawnGap(session_id=session.session_id, loop_ids=spawned, spawn=spawn, header=header)
                )
        for record in session.loops:
            group = self._groups.get(record.loop_id)
            if group is not None and (record.ended_at is None or record.ended_at >= group.timestamp):
                # (One that ended before its id's group began is an earlier loop of that id.)
                self._owe_group_end(session, record)
            self._loop_session.pop(record.loop_id, None)
            self._spawns.pop(record.loop_id, None)
            self._awaited_spawns.pop(record.loop_id, None)
            for ref in record.child_loop_refs:
                parent_ref = self._spawns.pop(ref.child_loop_id, None)
                if parent_ref is not None and ref.child_loop_id not in self._loop_session:
                    self._await_spawn(ref.child_loop_id, parent_ref)
                if ref.child_loop_id in self._unheld_children:
                    self._unheld_children.discard(ref.child_loop_id)
                    spawn = SpawnRef(
                        parent_session_id=session.session_id,
                        parent_loop_id=record.loop_id,
                        tool_call_id=ref.tool_call_id,
                        tool_name=ref.tool_name,
                    )
                    self._note_gap(
                        SpawnGap(session_id=ref.child_session_id, loop_ids=(ref.child_loop_id,), spawn=spawn)
                    )
            self._warned_loops.discard(record.loop_id)
            holders = self._closed_by_id.pop(record.loop_id, ())
            kept = tuple(session_id for session_id in holders if session_id != session.session_id)
            if kept:
                self._closed_by_id[record.loop_id] = kept

    def _note_gap(self, gap: SpawnGap) -> None:
        if len(self._spawn_gaps) == _SPAWN_GAPS and not self._gaps_dropped:
            self._gaps_dropped = True  # said once until they are taken
            logger.warning(
                "%d sub-agent links to complete from the store were not taken (drain_spawn_gaps):"
                " the oldest are dropped, their sub-agents saved without the tool call",
                _SPAWN_GAPS,
            )
        self._spawn_gaps.append(gap)

    def drain_spawn_gaps(self) -> list[SpawnGap]:
        """Hand over the sub-agent links that the sessions drained so far left incomplete
        (`SpawnGap`), and forget them: the latest `_SPAWN_GAPS`. None arise while one
        recorder holds both a sub-agent and its spawner. `SessionSaver.drain` takes them
        with the sessions and completes them from the store once they are saved."""
        with self._lock:
            gaps = list(self._spawn_gaps)
            self._spawn_gaps.clear()
            self._gaps_dropped = False
            return gaps

    def _owe_group_end(self, session: Session, record: LoopRecord) -> None:
        """Remember the drained branch `record` for its group's end. A version of it drained
        before (the loop sent again since: the same start) is forgotten: amended too, it
        would be a second record of the loop."""
        owed = self._late_branches.setdefault(record.loop_id, [])
        owed[:] = [
            (other, older)
            for other, older in owed
            if other.session_id != session.session_id or older.started_at != record.started_at
        ]
        owed.append((session, record))

    def _await_spawn(self, child_loop_id: str, parent_ref: tuple[str, str, str, str]) -> None:
        """Remember the tool call naming `child_loop_id` past its spawner's drain, for its start."""
        _remember_latest(self._awaited_spawns, child_loop_id, parent_ref, _AWAITED_SPAWNS)

    # -- queries ------------------------------------------------------------------------

    def sessions(self) -> list[Session]:
        """Completed sessions, then open ones (open loops are not in ``loops`` yet)."""
        with self._lock:
            return [h.session for h in self._completed.values()] + [
                h.link_children() for h in self._open.values()
            ]

    def holds(self, session_id: str) -> bool:
        """Whether the recorder holds `session_id` (open, or completed and not drained):
        `get_session` without bringing the session up to date."""
        with self._lock:
            return session_id in self._open or session_id in self._completed

    def get_session(self, session_id: str) -> Session | None:
        with self._lock:
            held = self._completed.get(session_id) or self._open.get(session_id)
            return held.link_children() if held is not None else None

    def current_loop(self, loop_id: str) -> LoopRecord | None:
        """A snapshot of the open (Running or Pending) record of `loop_id`, or None."""
        with self._lock:
            loop = self._loops.get(loop_id)
            if loop is None:
                return None
            held = self._open.get(loop.session_id)
            if held is not None:  # its children are linked there
                held.link_children()
            return loop.snapshot()

    def has_open_loop(self, loop_id: str) -> bool:
        """Whether `loop_id` is open (Running or Pending): `current_loop` without its copy."""
        with self._lock:
            return loop_id in self._loops

    def in_open_group(self, loop_id: str) -> bool:
        """Whether `loop_id` is a branch of a parallel group whose ``ParallelLoopStart``
        was recorded and whose ``ParallelLoopEnd`` was not."""
        with self._lock:
            return loop_id in self._groups

    def open_loop_ids(self) -> list[str]:
        with self._lock:
            return list(self._loops)

    def orphans(self) -> list[OrphanEvent]:
        """Events that belonged to no known loop, in arrival order."""
        with self._lock:
            return list(self._orphans)

    def drain_orphans(self) -> list[OrphanEvent]:
        """Hand over the orphans and forget them; a loop that has more warns once again."""
        with self._lock:
            orphans, self._orphans = self._orphans, []
            self._warned_loops.clear()  # else every loop that ever had an orphan stays here
            return orphans

    def session_events(self, session_id: str) -> list[AgentEvent]:
        """The session-scoped events (ParallelLoopStart/End) of a held session."""
        with self._lock:
            held = self._open.get(session_id) or self._completed.get(session_id)
            return list(held.events) if held is not None else []

    def may_amend(self, session_id: str) -> bool:
        """Whether a drained `session_id` may still come back as an amendment.

        True while it is owed its parallel group's end or the tool call that spawned
        it, or a loop of it is being sent again; a caller that must keep what it needs
        to redo the session (a journal's events) keeps it until this turns False.
        """
        with self._lock:
            return (
                session_id in self._late_groups
                or session_id in self._spawner_owing
                or any(resent.session.session_id == session_id for resent in self._resending.values())
            )

    def lacks_spawner(self, child_loop_id: str, parent_loop_id: str) -> bool:
        """Whether the sub-agent loop `child_loop_id` would start with a provisional spawn
        ref (no tool call): the recorder holds neither its parent loop nor the tool call."""
        with self._lock:
            return (
                child_loop_id not in self._spawns
                and child_loop_id not in self._awaited_spawns
                and parent_loop_id not in self._loop_session
                and parent_loop_id not in self._loops
            )

    def await_spawn(self, parent_session_id: str, parent_loop_id: str, ref: ChildLoopRef) -> None:
        """The tool call that spawned ``ref.child_loop_id``, learned outside the stream (a
        store holding the spawner that a journal's recovery no longer replays): the
        sub-agent's session gets its whole spawn ref when it starts."""
        with self._lock:
            parent_ref = (parent_session_id, parent_loop_id, ref.tool_call_id, ref.tool_name)
            self._await_spawn(ref.child_loop_id, parent_ref)

    def has_early_events(self, session_id: str) -> bool:
        """Whether parallel events wait for `session_id`'s first loop to start."""
        with self._lock:
            return session_id in self._early_events

    @property
    def dropped_deltas(self) -> int:
        """Streaming deltas not stored because ``include_streaming_events`` is off."""
        return self._dropped_deltas

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "open_sessions": len(self._open),
                "completed_sessions": len(self._completed),
                "open_loops": len(self._loops),
                "orphans": len(self._orphans),
                "dropped_deltas": self._dropped_deltas,
            }

    # Event type -> its step once stored in its open loop (None: none), for the events
    # stored there (`_store`); _OWN for those with a handler of their own.
    _steps: ClassVar[dict[type, Callable[[SessionRecorder, _OpenLoop, Any], object] | None]] = {
        **dict.fromkeys(EVENT_TYPES),
        AgentStart: _OWN,
        MessageUpdate: _OWN,
        ParallelLoopStart: _OWN,
        ParallelLoopEnd: _OWN,
        AgentEnd: _on_agent_end,
        TurnStart: _on_turn_start,
        TurnRequest: _on_turn_request,
        TurnEnd: _on_turn_end,
        MessageEnd: _on_message_end,
        ToolExecutionEnd: _on_tool_end,
    }
    # Event type -> handler (what `on_json` calls, and `on_event` off its inline path).
    _handlers: ClassVar[dict[type, Callable[[SessionRecorder, Any], object]]] = {
        **dict.fromkeys(EVENT_TYPES, _store),
        AgentStart: _on_agent_start,
        MessageUpdate: _on_message_update,
        ParallelLoopStart: _on_parallel_start,
        ParallelLoopEnd: _on_parallel_end,
    }


def _check_free(what: str, hook: object, current: object) -> None:
    """Refuse to put `hook` in place of `current`, another's: a hook slot is cleared first."""
    if hook is not None and current is not None and hook != current:
        raise InvalidArgument(f"the recorder already has a {what} hook (clear it with None first)")


def _remember_latest(latest: OrderedDict[str, _V], key: str, value: _V, bound: int) -> None:
    """Set `key` in `latest`, forgetting the oldest key past `bound` of them (bounded memory)."""
    latest[key] = value
    if len(latest) > bound:
        latest.popitem(last=False)


def _started(event: AgentStart) -> LoopRecord:
    """The Running record `event` starts."""
    snapshot = event.config_snapshot
    return LoopRecord.start(
        loop_id=event.loop_id,
        session_id=event.session_id,
        agent_id=event.agent_id,
        parent_loop_id=event.parent_loop_id,
        continuation_kind=event.continuation_kind,
        started_at=event.timestamp,
        metadata=event.metadata,
        config=snapshot if isinstance(snapshot, LoopConfigSnapshot) else None,
    )


def _restarted_by(record: LoopRecord, event: AgentStart) -> bool:
    """Whether `event` starts the ended `record` again: its loop sent again (at its
    instant), or the run of a parallel branch Aborted before it started."""
    return record.started_at == event.timestamp or _never_ran(record)


def _never_ran(record: LoopRecord) -> bool:
    """Whether `record` is a parallel branch Aborted before it started (its group given
    up, or ended by `flush`), not one vetoed by its ``before_loop`` hook (which ended)."""
    return (
        record.status == "Aborted"
        and record.ended_at is None
        and not any(isinstance(kept.event, AgentStart) for kept in record.events)
    )


def _takes_group(record: LoopRecord, end: ParallelLoopEnd, grouped: bool) -> bool:
    """Whether `end` marks `record`. Without its group (`grouped`), a repeat say, it is
    phi-core's group of its winner alone, which must not undo a group of that winner."""
    held = record.parallel_group
    return grouped or held is None or held.selected_loop_id != end.selected_loop_id


def _fallback_config(loop_id: str, message: AssistantMessage) -> LoopConfigSnapshot:
    return LoopConfigSnapshot(
        model=message.model,
        provider=message.provider,
        config_id=config_segment_from_loop_id(loop_id),
    )


_decode_for_recording = codec.decode_for_recording
_check_event_fields = codec.check_event_fields
_LazyMessageUpdate = codec.LazyMessageUpdate
