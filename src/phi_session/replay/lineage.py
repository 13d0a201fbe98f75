"""How a replayed or forked run is recorded: its own loop in the original session.

A `Lineage` says where a new run goes: into `Lineage.session` (the recording; new
loop ids continue after its loops' and after those the tracer recorded there since,
`Tracer.for_session`, so they never collide), continuing
`Lineage.parent_loop_id` with `Lineage.kind`, its ``AgentStart.metadata`` merged with
`Lineage.metadata`:

* a replay (`replay_lineage`): kind ``Rerun{"replay"}``, parent the replayed loop (the
  first of a replayed chain), metadata ``{"replay": {"session_id", "loop_id",
  "loop_ids"}}``, and ``"fallback"`` (the model's name) when a replay model hands over
  to a fallback on a divergence (`phi_session.adapters.replay_recording`);
* a fork (`fork_lineage`): kind ``Branch{tag}``, parent the same, metadata ``{"fork":
  {"session_id", "loop_id", "turn_index", "change"}}`` (the fork point and what
  changed, as given).

Such a loop runs its parent again from its start, so it stands in for its parent in
`Session.context_at` (`LoopRecord.reruns_parent`). A replay that handed over to its
fallback does too: its context is the replayed turns, then the fallback's. The metadata
is recorded as the loop starts, before any divergence: where the fallback took over is
the first turn that differs from the original's (`phi_session.diff.diff_loops`).
`ReplayScript.from_session` never picks a replay's loop by default, even one that
handed over; named, it replays that loop's turns as recorded.

Two ways to use a lineage:

* hand-instrumented loops: ``lineage.loop(tracer)`` is ``tracer.for_session(session)
  .loop(continues=parent, kind=kind, metadata=metadata)``;
* framework adapters: run the agent inside ``with recording_as(lineage):``. The first
  top-level run `AdapterCore.start_run` starts there is recorded with the lineage;
  later top-level runs of the block (a replayed conversation of several runs)
  continue the previous one (``Default``) with the same metadata. `active_lineage`
  is what the adapter core consults (a context variable: it follows threads'
  contexts and asyncio tasks created inside the block). A thread started inside the
  block does not see it (a new thread starts with empty context variables): a run
  there is recorded as an ordinary run, its replies billed; the first reply the
  block's cursor serves there logs a warning (logger ``phi_session.replay``). Run the
  thread's work with ``contextvars.copy_context().run`` (taken inside the block), or
  enter the block inside the thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

import msgspec

from .._checks import check_index, check_type
from ..events import DEFAULT, ContinuationKind, LoopConfigSnapshot
from ..instrument import Tracer
from ..model import Session
from .script import REPLAY_TAG, ReplayScript

if TYPE_CHECKING:
    from ..instrument import LoopScope
    from ..messages import ToolResultMessage
    from .cursor import ReplayCursor

__all__ = [
    "ActiveLineage",
    "Lineage",
    "active_lineage",
    "answered",
    "calling",
    "fork_lineage",
    "recording_as",
    "replay_lineage",
]


class Lineage(msgspec.Struct, frozen=True, kw_only=True):
    """Where a replayed or forked run is recorded (see the module docstring)."""

    session: Session
    parent_loop_id: str
    kind: ContinuationKind
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)

    def loop(
        self,
        tracer: Tracer,
        config: LoopConfigSnapshot | None = None,
        *,
        metadata: dict[str, Any] | None = None,
    ) -> LoopScope:
        """A loop of `tracer` (its sinks, processors, default config) recorded with this
        lineage, plus `metadata`; start it with ``with``."""
        check_type("tracer", tracer, Tracer)
        return tracer.for_session(self.session).loop(
            config,
            continues=self.parent_loop_id,
            kind=self.kind,
            metadata={**self.metadata, **(metadata or {})},
        )


def replay_lineage(script: ReplayScript, **details: Any) -> Lineage:
    """The lineage of a replay of `script`; `details` (JSON values) join ``metadata["replay"]``."""
    check_type("script", script, ReplayScript)
    info: dict[str, Any] = {"session_id": script.session_id, "loop_id": script.loop_id, **details}
    if len(script.loop_ids) > 1:
        info["loop_ids"] = list(script.loop_ids)
    return Lineage(
        session=script.session,
        parent_loop_id=script.loop_ids[0],
        kind=ContinuationKind.rerun(REPLAY_TAG),
        metadata={"replay": info},
    )


def fork_lineage(script: ReplayScript, turn: int, *, tag: str = "fork", change: Any = None) -> Lineage:
    """The lineage of a fork of `script` at position `turn` (a `ReplayCursor`'s
    ``until_turn``): ``Branch{tag}``; ``metadata["fork"]`` names the recorded turn the
    fork left from and `change` (a JSON value describing what changed, e.g.
    ``{"model": "gpt-5"}``). Raises `TurnNotFound` for a turn the script lacks."""
    check_type("script", script, ReplayScript)
    point = script.turn(check_index("turn", turn))
    return Lineage(
        session=script.session,
        parent_loop_id=script.loop_ids[0],
        kind=ContinuationKind.branch(tag),
        metadata={
            "fork": {
                "session_id": script.session_id,
                "loop_id": point.loop_id,
                "turn_index": point.turn_index,
                "change": change,
            }
        },
    )


class ActiveLineage:
    """The lineage of a ``recording_as`` block, the replay cursors answering its model calls
    (the one given, else the first replaying the session the lineage replays to answer one
    inside the block, and every other replaying the lineage's session: one per agent of a
    handoff, say), the replies they served to each of the block's loops, and whether its
    first run has started."""

    __slots__ = (
        "_claimed",
        "_cursors",
        "_lock",
        "_replayed_session_id",
        "_served",
        "_warned_outside",
        "lineage",
    )

    def __init__(self, lineage: Lineage, cursor: ReplayCursor | None = None) -> None:
        self.lineage = lineage
        self._replayed_session_id = _replayed_session_id(lineage)
        self._lock = threading.Lock()
        self._claimed = False
        # The block's cursors that served a reply in it (the given one from the start).
        self._cursors: list[ReplayCursor] = [] if cursor is None else [cursor]
        self._served: dict[str, int] = {}  # loop id -> the recorded replies served to its calls
        self._warned_outside = False

    @property
    def cursor(self) -> ReplayCursor | None:
        """The block's cursor (read-only): the one given to `recording_as`, else the first
        replaying the session the lineage replays to answer a model call inside the block,
        None until one has. Later cursors replaying the lineage's session are counted too
        (`served`) but never replace it."""
        with self._lock:
            return self._cursors[0] if self._cursors else None

    def served(self, cursor: ReplayCursor, loop_id: str) -> None:
        """`cursor` served a recorded reply to a model call of loop `loop_id`: counted if it
        is the block's given cursor (taken, if the block has none: the first replaying the
        session the lineage replays, which may not be the one it records into, or any if it
        names none) or a later one replaying the lineage's session. Another session's (a
        replayed sub-agent's, whose calls run inside the loop's run, whichever answers
        first) serves its own."""
        with self._lock:
            if cursor not in self._cursors:
                wanted = self.lineage.session.session_id if self._cursors else self._replayed_session_id
                if wanted is not None and cursor.script.session_id != wanted:
                    return
                self._cursors.append(cursor)
            self._served[loop_id] = self._served.get(loop_id, 0) + 1

    def served_in(self, loop_id: str) -> int:
        """How many recorded replies the block's cursors served to model calls of loop
        `loop_id` (what the loop marks as served, `phi_session.instrument.Tracer.loop`'s
        ``replay``): a live run's loop in the same block is served none."""
        with self._lock:
            return self._served.get(loop_id, 0)

    def take_answered(self, call_id: str) -> ToolResultMessage | None:
        """The recorded result one of the block's cursors answered tool call `call_id`
        with (`ReplayCursor.take_answered`), once; None for a call that ran."""
        with self._lock:
            cursors = tuple(self._cursors)
        for cursor in cursors:
            if (result := cursor.take_answered(call_id)) is not None:
                return result
        return None

    def served_outside(self) -> None:
        """The block's cursor served a reply in a context that does not see the block: warned
        of once per block (see the module docstring)."""
        with self._lock:
            if self._warned_outside:
                return
            self._warned_outside = True
        logger.warning(
            "replay of %s: a recorded reply was served in a thread that does not see its "
            "recording block: the run is recorded as an ordinary run and its replies billed; "
            "run the thread's work with contextvars.copy_context().run (taken inside the block), "
            "or enter the block inside the thread",
            self.lineage.parent_loop_id,
        )

    def continuation(self, last_loop_id: str | None) -> tuple[str | None, ContinuationKind]:
        """``(parent loop id, kind)`` of the next top-level run: the lineage's for the
        first, then a ``Default`` continuation of `last_loop_id` (the previous run's)."""
        with self._lock:
            if not self._claimed:
                self._claimed = True
                return self.lineage.parent_loop_id, self.lineage.kind
        return last_loop_id, DEFAULT


def _replayed_session_id(lineage: Lineage) -> str | None:
    """The id of the session whose run `lineage` replays or forks, as its metadata names it
    (`replay_lineage`, `fork_lineage`); None if it names none (a lineage built by hand,
    which may record into another session than the one replayed: any may be it)."""
    for key in ("replay", "fork"):
        info = lineage.metadata.get(key)
        if isinstance(info, dict) and isinstance(session_id := info.get("session_id"), str):
            return session_id
    return None


logger = logging.getLogger("phi_session.replay")

_active: ContextVar[ActiveLineage | None] = ContextVar("phi_session_replay_lineage", default=None)
# The open block given each cursor, seen from any context: a reply the cursor serves where
# the block is not active was meant for it.
_blocks: WeakKeyDictionary[ReplayCursor, ActiveLineage] = WeakKeyDictionary()
# The loop of the adapter run whose code runs in this thread or task: where a model call
# made here comes from, so that a reply served to it is that loop's, not a concurrent one's.
_calling: ContextVar[str | None] = ContextVar("phi_session_replay_calling", default=None)


@contextmanager
def recording_as(lineage: Lineage, cursor: ReplayCursor | None = None) -> Iterator[Lineage]:
    """Record the top-level framework runs started inside the block with `lineage`.

    `cursor`: the `ReplayCursor` answering their model calls (a framework replay
    model's): the replies it serves are recorded tagged as served, so that no roll-up
    bills them (`phi_session.instrument.Tracer.loop`'s ``replay``). Without it, the
    first cursor to answer a model call inside the block replaying the session the
    lineage replays (its ``metadata["replay"]`` or ``["fork"]`` ``session_id``, which a
    lineage built by hand may set apart from the session it records into) is taken
    (`answered`): a replayed sub-agent's, answering first, is not. A lineage naming none
    (built by the constructor alone) takes the first to answer, whichever session it
    replays. So are the replies of every later cursor replaying the lineage's session: a
    replay model per agent of a handoff. A reply is the served one of the run whose model
    call it answered (`calling`): a live run beside a replayed one in the block bills its
    own replies."""
    if not isinstance(lineage, Lineage):
        raise TypeError(f"expected a Lineage, got {type(lineage).__name__}")
    active = ActiveLineage(lineage, cursor)
    token = _active.set(active)
    if cursor is not None:
        _blocks[cursor] = active
    try:
        yield lineage
    finally:
        _active.reset(token)
        if cursor is not None and _blocks.get(cursor) is active:
            del _blocks[cursor]


def active_lineage() -> ActiveLineage | None:
    """The lineage of the enclosing `recording_as` block, if any (for adapters)."""
    return _active.get()


def calling(loop_id: str) -> None:
    """The adapter run of loop `loop_id` runs in this context (for adapters, as the run or
    a model call of it starts): the model calls made here are its loop's."""
    _calling.set(loop_id)


def answered(cursor: ReplayCursor) -> None:
    """`cursor` served a recorded reply to a model call made in this context: the
    enclosing `recording_as` block counts it for the calling run's loop
    (`ActiveLineage.served`), so that the reply bills nothing; one served outside the
    block given `cursor` (a thread that does not see it) is warned of."""
    active = _active.get()
    if active is None:
        if (block := _blocks.get(cursor)) is not None:
            block.served_outside()
    elif (loop_id := _calling.get()) is not None:
        active.served(cursor, loop_id)
