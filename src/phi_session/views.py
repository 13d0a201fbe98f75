"""Read-only views over stored sessions: the loop forest, the spawn graph, the event stream.

The command line and the web viewer draw these; they live here so that every front
end (and a user's own script) walks a session the same way.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from ._time import Timestamp
from .errors import InvalidSessionId, SessionNotFound
from .events import AgentEvent
from .model import LoopRecord, Session
from .stores.base import SessionStore, SessionSummary, summarize

__all__ = ["LoopNode", "SpawnNode", "event_stream", "loop_forest", "spawn_graph"]


@dataclass(frozen=True)
class LoopNode:
    """A loop in `loop_forest`: its index in ``session.loops`` and its same-session children."""

    index: int
    record: LoopRecord
    children: list[LoopNode] = field(default_factory=list)


def loop_forest(session: Session) -> list[LoopNode]:
    """The loops as a forest following ``parent_loop_id``, roots and children in session order.

    Roots are loops without a parent in this session. A loop caught in a parent
    cycle (phi-core's compaction pass can make a loop its own parent) appears
    once, as a root, rather than lost or repeated. A duplicated loop id is the
    parent of its children through its first record.
    """
    first_index: dict[str, int] = {}
    for index, record in enumerate(session.loops):
        first_index.setdefault(record.loop_id, index)
    children: dict[int, list[int]] = {}
    roots: list[int] = []
    for index, record in enumerate(session.loops):
        parent = first_index.get(record.parent_loop_id) if record.parent_loop_id is not None else None
        if parent is None or parent == index:
            roots.append(index)
        else:
            children.setdefault(parent, []).append(index)
    seen: set[int] = set()
    forest: list[LoopNode] = []
    # Depth-first with an explicit stack: a chain of thousands of continued loops
    # must not hit Python's recursion limit. Loops only reachable through a cycle
    # are picked up as roots by the second half of the candidates.
    for root in itertools.chain(roots, range(len(session.loops))):
        if root in seen:
            continue
        seen.add(root)
        forest.append(LoopNode(root, session.loops[root]))
        stack: list[tuple[LoopNode, Iterator[int]]] = [(forest[-1], iter(children.get(root, [])))]
        while stack:
            node, pending = stack[-1]
            for child in pending:
                if child not in seen:
                    seen.add(child)
                    node.children.append(LoopNode(child, session.loops[child]))
                    stack.append((node.children[-1], iter(children.get(child, []))))
                    break
            else:
                stack.pop()
    return forest


@dataclass
class SpawnNode:
    """A session in `spawn_graph`.

    `summary` is None when the session is not in the store (`found` false) or was
    already shown higher up (`repeated`: not expanded again). `via` is the link
    that spawned it (None at the root): ``parent_loop_id``, ``tool_name``,
    ``tool_call_id``, ``child_loop_id``.
    """

    session_id: str
    via: dict[str, str] | None
    found: bool = True
    repeated: bool = False
    summary: SessionSummary | None = None
    children: list[SpawnNode] = field(default_factory=list)


def spawn_graph(store: SessionStore, root: Session) -> SpawnNode:
    """The sub-agent sessions reachable from `root` through ``child_loop_refs``, loaded from `store`."""
    expanded = {root.session_id}
    top = SpawnNode(root.session_id, None)
    # Explicit stack: a deep chain of sub-agents must not hit the recursion limit.
    pending: list[tuple[SpawnNode, Session | None]] = [(top, root)]
    while pending:
        node, session = pending.pop()
        if session is None:
            try:
                session = store.load(node.session_id)
            except (SessionNotFound, InvalidSessionId):
                node.found = False
                continue
        node.summary = summarize(session)
        for record in session.loops:
            for ref in record.child_loop_refs:
                repeated = ref.child_session_id in expanded
                expanded.add(ref.child_session_id)
                child = SpawnNode(ref.child_session_id, {
                    "parent_loop_id": record.loop_id, "tool_name": ref.tool_name,
                    "tool_call_id": ref.tool_call_id, "child_loop_id": ref.child_loop_id,
                }, repeated=repeated)
                node.children.append(child)
                if not repeated:
                    pending.append((child, None))
    return top


def event_stream(sessions: Sequence[Session]) -> Iterator[AgentEvent]:
    """The stored events of `sessions`, merged in time order.

    Every loop's events keep their sequence order; between loops (and sessions)
    the event times decide, so the stream reads like the one that was recorded,
    minus what the recorder did not store (streaming deltas, by default).
    """
    streams: list[Iterator[tuple[int, AgentEvent]]] = []
    for session in sessions:
        for _, group in itertools.groupby(session.iter_events(), key=lambda item: id(item.loop)):
            items = list(group)
            loop = items[0].loop
            start = loop.started_at if loop is not None else session.created_at
            streams.append(_timed([item.event for item in items], start))
    for _, event in heapq.merge(*streams, key=lambda item: item[0]):
        yield event


def _timed(events: Sequence[AgentEvent], fallback: Timestamp) -> Iterator[tuple[int, AgentEvent]]:
    """`events` (one loop's, in order) as ``(ns, event)`` with non-decreasing times.

    Many events carry no timestamp (messages, tool executions); each takes the time
    of the next timestamped event of its loop, since it happened no later than
    that: a tool's end then sorts after the sub-agent run it waited for. Events
    after the last timestamp take that timestamp (or `fallback`).
    """
    keys: list[int] = []
    upcoming: int | None = None
    for event in reversed(events):
        stamp = getattr(event, "timestamp", None)
        if isinstance(stamp, Timestamp):
            upcoming = stamp.ns if upcoming is None else min(upcoming, stamp.ns)
        keys.append(upcoming if upcoming is not None else -1)
    keys.reverse()
    latest = fallback.ns
    for key, event in zip(keys, events, strict=True):
        latest = key if key >= 0 else latest
        yield latest, event
