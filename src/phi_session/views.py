"""Read-only views over stored sessions: the loop forest, the spawn graph, the event stream.

The command line and the web viewer draw these; they live here so that every front
end (and a user's own script) walks a session the same way.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Literal

import msgspec

from ._checks import check_type
from ._time import Timestamp
from .errors import InvalidArgument, InvalidSessionId, SessionNotFound, StoreError
from .events import AgentEvent, AgentStart, ParallelLoopEnd, ParallelLoopStart
from .messages import AssistantMessage, ToolCall, ToolResultMessage, Usage
from .model import LoopRecord, Session, Turn, counted_usage
from .stores.base import SessionStore, SessionSummary, summarize
from .stores.outline import SessionOutline

__all__ = [
    "SUB_AGENT_LOOPS",
    "LoopNode",
    "SpawnNode",
    "TimelineBar",
    "event_stream",
    "loop_forest",
    "loop_order",
    "loops_timeline",
    "outline_span",
    "outline_timeline",
    "read_loops",
    "session_bar",
    "spawn_graph",
    "timeline",
    "tree_order",
]

logger = logging.getLogger(__name__)


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
    forest: list[LoopNode] = []
    path: list[LoopNode] = []  # the nodes from a root down to the last one placed
    for index, depth in loop_order(session):
        node = LoopNode(index, session.loops[index])
        del path[depth:]
        (path[-1].children if path else forest).append(node)
        path.append(node)
    return forest


def loop_order(session: Session) -> list[tuple[int, int]]:
    """``(index in session.loops, depth)`` of every loop, in `loop_forest`'s depth-first order.

    The order the loop tree is drawn in: each loop before the loops that continue it.
    """
    check_type("session", session, Session)
    return tree_order([(record.loop_id, record.parent_loop_id) for record in session.loops])


def tree_order(links: Sequence[tuple[str, str | None]]) -> list[tuple[int, int]]:
    """`loop_order` of loops given as ``(loop_id, parent_loop_id)`` (a session's outline
    gives them without decoding a record): ``(index, depth)`` in depth-first order."""
    first_index: dict[str, int] = {}
    for index, (loop_id, _) in enumerate(links):
        first_index.setdefault(loop_id, index)
    children: dict[int, list[int]] = {}
    roots: list[int] = []
    for index, (_, parent_id) in enumerate(links):
        parent = first_index.get(parent_id) if parent_id is not None else None
        if parent is None or parent == index:
            roots.append(index)
        else:
            children.setdefault(parent, []).append(index)
    seen = bytearray(len(links))
    order: list[tuple[int, int]] = []
    # Depth-first with an explicit stack: a chain of thousands of continued loops must
    # not hit Python's recursion limit. Each loop has one parent, so marking it seen when
    # pushed equals marking it when drawn. Loops only reachable through a cycle are picked
    # up as roots by the second half of the candidates.
    for root in itertools.chain(roots, range(len(links))):
        if seen[root]:
            continue
        seen[root] = 1
        stack = [(root, 0)]
        while stack:
            index, depth = stack.pop()
            order.append((index, depth))
            for child in reversed(children.get(index, ())):
                if not seen[child]:
                    seen[child] = 1
                    stack.append((child, depth + 1))
    return order


@dataclass
class SpawnNode:
    """A session in `spawn_graph`.

    `summary` is None when the store does not hold the session or cannot read it
    (`found` false) or when it was already shown higher up (`repeated`: not expanded
    again). `via` is the link that spawned it (None at the root): ``parent_loop_id``,
    ``tool_name``, ``tool_call_id``, ``child_loop_id``.
    """

    session_id: str
    via: dict[str, str] | None
    found: bool = True
    repeated: bool = False
    summary: SessionSummary | None = None
    children: list[SpawnNode] = field(default_factory=list)


def _sub_agent_session(store: SessionStore, session_id: str) -> Session | None:
    """The sub-agent session `session_id`; None when the store does not hold it or cannot
    read it (logged, as listings skip such a session): the parent is still shown."""
    try:
        return store.load(session_id)
    except (SessionNotFound, InvalidSessionId):
        return None
    except StoreError as error:
        _unreadable(session_id, error)
        return None


def _unreadable(session_id: str, error: Exception) -> None:
    logger.warning("skipping unreadable session %r: %s", session_id, error)


def spawn_graph(store: SessionStore, root: Session) -> SpawnNode:
    """The sub-agent sessions reachable from `root` through ``child_loop_refs``, loaded from `store`."""
    check_type("store", store, SessionStore)
    check_type("root", root, Session)
    expanded = {root.session_id}
    top = SpawnNode(root.session_id, None)
    # Explicit stack: a deep chain of sub-agents must not hit the recursion limit.
    pending: list[tuple[SpawnNode, Session | None]] = [(top, root)]
    while pending:
        node, session = pending.pop()
        if session is None:
            session = _sub_agent_session(store, node.session_id)
            if session is None:
                node.found = False
                continue
        node.summary = summarize(session)
        for record in session.loops:
            for ref in record.child_loop_refs:
                repeated = ref.child_session_id in expanded
                expanded.add(ref.child_session_id)
                child = SpawnNode(
                    ref.child_session_id,
                    {
                        "parent_loop_id": record.loop_id,
                        "tool_name": ref.tool_name,
                        "tool_call_id": ref.tool_call_id,
                        "child_loop_id": ref.child_loop_id,
                    },
                    repeated=repeated,
                )
                node.children.append(child)
                if not repeated:
                    pending.append((child, None))
    return top


def event_stream(sessions: Sequence[Session], *, parallel_groups: bool = False) -> Iterator[AgentEvent]:
    """The stored events of `sessions`, merged in time order.

    Every loop's events keep their sequence order; between loops (and sessions)
    the event times decide, so the stream reads like the one that was recorded,
    minus what the recorder did not store (streaming deltas, by default).

    With `parallel_groups`, also a ``ParallelLoopStart`` and a ``ParallelLoopEnd`` for
    each parallel group the loops record but the session did not keep the events of
    (``keep_session_events`` is off by default): at its first branch's start and its
    last branch's end, so that recording the stream rebuilds the group and its winner;
    and a ``ParallelLoopStart`` for the branches that never started of a group that
    never ended, at their announcement, so that recording the stream keeps them.
    """
    streams: list[Iterator[tuple[int, AgentEvent]]] = []
    starts: list[Iterator[tuple[int, AgentEvent]]] = []
    ends: list[Iterator[tuple[int, AgentEvent]]] = []
    for session in sessions:
        check_type("session", session, Session)
        for _, group in itertools.groupby(session.iter_events(), key=lambda item: id(item.loop)):
            items = list(group)
            loop = items[0].loop
            start = loop.started_at if loop is not None else session.created_at
            streams.append(_timed([item.event for item in items], start))
        if parallel_groups:
            for opening, closing in _parallel_events(session):
                starts.append(iter([(opening.timestamp.ns, opening)]))
                if closing is not None:
                    ends.append(iter([(closing.timestamp.ns, closing)]))
    # At one instant a group starts before its branches and ends after them (the merge is stable).
    for _, event in heapq.merge(*starts, *streams, *ends, key=lambda item: item[0]):
        yield event


def _parallel_events(session: Session) -> Iterator[tuple[ParallelLoopStart, ParallelLoopEnd | None]]:
    """The start and end events of the parallel groups `session`'s loops record, but
    those whose start the session kept; then the starts of its groups that never ended
    and have a branch that never started (`_unended_starts`)."""
    kept = set()
    if not isinstance(session.session_events, msgspec.UnsetType):
        kept = {tuple(e.loop_ids) for e in session.session_events if isinstance(e, ParallelLoopStart)}
    branches: dict[tuple[str, ...], list[LoopRecord]] = {}
    for record in session.loops:
        group = record.parallel_group
        if group is not None and tuple(group.all_loop_ids) not in kept:
            branches.setdefault(tuple(group.all_loop_ids), []).append(record)
    for loop_ids, records in branches.items():
        group = records[0].parallel_group
        assert group is not None  # only loops with a group were gathered
        first = min(record.started_at for record in records)
        last = max((record.ended_at for record in records if record.ended_at is not None), default=first)
        yield (
            ParallelLoopStart(session_id=session.session_id, loop_ids=loop_ids, timestamp=first),
            ParallelLoopEnd(
                session_id=session.session_id,
                selected_loop_id=group.selected_loop_id,
                selected_config_index=group.selected_config_index,
                evaluation_usage=group.evaluation_usage,
                timestamp=last,
            ),
        )
    for opening in _unended_starts(session, {loop_id for loop_ids in kept for loop_id in loop_ids}):
        yield opening, None


def _unended_starts(session: Session, announced: set[str]) -> Iterator[ParallelLoopStart]:
    """A ``ParallelLoopStart`` for the branches of `session` that never started, of groups
    that never ended (named by no kept start): the recorder keeps such a branch (Aborted,
    with no AgentStart, no group), but no event of the stream names it.

    One per announcement instant (the branch's `started_at`). It also names the loops
    aborted before the branch that started after that instant: the announcement opened
    them too, and `flush` aborts loops in the order they were opened, which is their
    order in ``loops``; the group's winner is never known, so naming them changes
    nothing else."""
    names: dict[Timestamp, list[str]] = {}
    aborted: list[LoopRecord] = []  # started loops that never ended, so far
    for record in session.loops:
        if record.parallel_group is not None or record.loop_id in announced:
            continue
        if any(isinstance(item.event, AgentStart) for item in record.events):
            if record.status == "Aborted" and record.ended_at is None:
                aborted.append(record)
            continue
        if record.status != "Aborted" or record.agent_id:  # not an announced branch: no group opened it
            continue
        since = record.started_at
        loop_ids = names.setdefault(since, [])
        loop_ids.extend(
            loop.loop_id for loop in aborted if loop.started_at >= since and loop.loop_id not in loop_ids
        )
        loop_ids.append(record.loop_id)
    for since, loop_ids in names.items():
        yield ParallelLoopStart(session_id=session.session_id, loop_ids=tuple(loop_ids), timestamp=since)


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


TimelineKind = Literal["session", "loop", "turn", "model", "tool"]


@dataclass(frozen=True)
class TimelineBar:
    """One bar of a session's waterfall (`timeline`).

    `start`/`end` place it on the time axis (`end` None: still running when last
    saved). `depth` is its nesting: loops under the loop they continue, turns under
    their loop, model and tool calls under their turn, a sub-agent's session under
    the tool call that spawned it. `session_id`, `loop_index` (in ``session.loops``)
    and `turn_index` (in the loop's ``turns``) say where the bar comes from;
    `usage` is the bar's own tokens (None for tool calls, which use none).
    """

    kind: TimelineKind
    depth: int
    label: str
    start: Timestamp
    end: Timestamp | None
    session_id: str
    loop_index: int | None = None
    turn_index: int | None = None
    loop_id: str | None = None
    status: str | None = None
    usage: Usage | None = None
    detail: str = ""


@dataclass(frozen=True)
class _SubAgent:
    """Where a sub-agent session's bars go in the parent's waterfall."""

    session_id: str
    depth: int


SUB_AGENT_LOOPS = 3
"""How many loops of a sub-agent session a page of a waterfall draws (`loops_timeline`):
a sub-agent session may go on for thousands of loops, and a page is a few loops (the
sub-agents of a sub-agent are not drawn at all)."""


def timeline(session: Session, store: SessionStore | None = None) -> list[TimelineBar]:
    """The waterfall of `session`: its loops, turns, model calls and tool calls in order.

    Loops follow `loop_forest` (continuations and branches nested under their
    parent); each turn is split into its model call (turn start to the assistant
    message's time) and its tool calls (from then until each result's time: the
    recorded events carry no finer tool times). With `store`, every sub-agent
    session a tool call spawned is loaded and drawn, inline, under that call; one
    missing from the store, or already drawn, is skipped.
    """
    check_type("session", session, Session)
    check_type("store", store, SessionStore, optional=True)
    expand = None if store is None else partial(_whole_sub_agent, store)
    return _drawn(_session_bars(session, 0), expand, {session.session_id})


def loops_timeline(
    session_id: str,
    loops: Iterable[tuple[int, int, LoopRecord]],
    store: SessionStore | None = None,
    drawn: set[str] | None = None,
    sub_agent_ends: dict[str, Timestamp] | None = None,
) -> list[TimelineBar]:
    """The bars `timeline` draws for some of a session's loops, each given as ``(index in
    session.loops, depth in the loop tree, record)``: a page of `tree_order`, so that a
    huge session's waterfall is drawn a page of loops at a time. Sub-agent sessions as in
    `timeline`, but for those in `drawn` (the sessions drawn on earlier pages, updated;
    by default each page draws every sub-agent its loops spawned once), and bounded as a
    page is: a sub-agent session's bar, then only its first `SUB_AGENT_LOOPS` loops in
    tree order (read from its outline, `SessionStore.load_outline`, and `load_loops`),
    not the sub-agent sessions those spawned in turn (open the sub-agent's session for
    them); the session bar's `detail` counts what it leaves out, and it ends where its
    `outline_span` does (kept in `sub_agent_ends` by session id, and taken from there: a
    cache for the pages of one session)."""
    bars = (
        item for index, depth, record in loops for item in _loop_bars(session_id, index, record, depth + 1)
    )
    ends = {} if sub_agent_ends is None else sub_agent_ends
    drawn = {session_id} if drawn is None else drawn
    expand = None if store is None else partial(_sub_agent_page, store, ends, drawn)
    return _drawn(bars, expand, drawn)


_SEEN_BATCH = 32
"""How many loops `outline_span` reads from the store at a time."""


def outline_span(outline: SessionOutline, store: SessionStore | None = None) -> tuple[Timestamp, Timestamp]:
    """The time axis of an outlined session's waterfall: its creation (or its first loop's
    start, if earlier) to its last activity, loop start or loop end; a loop that never ended
    (aborted, or running when saved) ends at its last recorded event (`LoopOutline.last_seen`).
    With `store`, such a loop whose outline was stored without that time is read from it,
    `_SEEN_BATCH` loops at a time (only the latest time is kept). A sub-agent session drawn
    inline may reach beyond it."""
    header, loops = outline.session, outline.loops
    first = min([header.created_at, *(loop.started_at for loop in loops)])
    seen = [loop.last_seen for loop in loops]
    ends = [stamp for stamp in seen if stamp is not None]
    if store is not None:
        unknown = [index for index, stamp in enumerate(seen) if stamp is None]
        for start in range(0, len(unknown), _SEEN_BATCH):
            records = read_loops(store, header.session_id, unknown[start : start + _SEEN_BATCH])
            ends.append(max(record.last_seen() for record in records.values()))
    return first, max([first, header.last_active_at, *(loop.started_at for loop in loops), *ends])


def read_loops(store: SessionStore, session_id: str, indexes: Iterable[int]) -> dict[int, LoopRecord]:
    """The session's loops at `indexes` (positions in ``session.loops``), read from `store`
    a run of consecutive positions at a time (`SessionStore.load_loops`)."""
    wanted = sorted(set(indexes))
    records: dict[int, LoopRecord] = {}
    run_start = 0
    while run_start < len(wanted):
        run_end = run_start + 1
        while run_end < len(wanted) and wanted[run_end] == wanted[run_end - 1] + 1:
            run_end += 1
        start, stop = wanted[run_start], wanted[run_end - 1] + 1
        records.update(zip(range(start, stop), store.load_loops(session_id, start, stop), strict=True))
        run_start = run_end
    return records


def outline_timeline(
    store: SessionStore,
    outline: SessionOutline,
    loops_per_page: int = 200,
    *,
    span: tuple[Timestamp, Timestamp] | None = None,
) -> Iterator[list[TimelineBar]]:
    """`timeline` of an outlined session, a page of `loops_per_page` loops (in tree order)
    at a time, each page's loops read from `store` when it is asked for: a huge session's
    waterfall without the whole session in memory. The first page starts with the
    session's bar, which ends where `span` (its `outline_span`, if the caller has it)
    does; a sub-agent session is drawn once."""
    check_type("loops_per_page", loops_per_page, int)
    if loops_per_page < 1:
        raise InvalidArgument(f"loops_per_page must be at least 1, got {loops_per_page}")
    session_id = outline.session.session_id
    order = _outline_order(outline)
    drawn = {session_id}
    end = (outline_span(outline, store) if span is None else span)[1]
    first: list[TimelineBar] = [_outline_bar(outline, 0, end)]
    for start in range(0, max(len(order), 1), loops_per_page):
        placed = order[start : start + loops_per_page]
        records = read_loops(store, session_id, (index for index, _ in placed))
        page = loops_timeline(
            session_id, ((index, depth, records[index]) for index, depth in placed), store, drawn
        )
        yield first + page
        first = []


def _outline_order(outline: SessionOutline) -> list[tuple[int, int]]:
    return tree_order([(loop.loop_id, loop.parent_loop_id) for loop in outline.loops])


def _outline_bar(outline: SessionOutline, depth: int, end: Timestamp) -> TimelineBar:
    """`session_bar` of an outlined session, ending at `end` (its header holds no loops:
    `outline_span`'s end)."""
    return replace(session_bar(outline.session, depth), end=end)


def session_bar(session: Session, depth: int = 0) -> TimelineBar:
    """The bar of a whole session: from its creation to its last activity or loop end (a
    loop that never ended: its last recorded event). (Of an outline's header too: it reads
    the loops' ends only if it has them.)"""
    ends = [loop.last_seen() for loop in session.loops]
    return TimelineBar(
        "session",
        depth,
        f"session {session.session_id} ({session.agent_id})",
        session.created_at,
        max([session.last_active_at, *ends]),
        session.session_id,
    )


_Items = Iterator[TimelineBar | _SubAgent]


def _drawn(
    items: _Items, expand: Callable[[_SubAgent], _Items | None] | None, drawn: set[str]
) -> list[TimelineBar]:
    """`items` with each sub-agent session they name replaced in place by its bars
    (`expand`: None when the session cannot be read; no `expand`, none drawn), except
    those in `drawn` (the sessions already drawn, updated)."""
    bars: list[TimelineBar] = []
    # An explicit stack of pending bars: deep sub-agent chains must not recurse.
    stack: list[_Items] = [items]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
        elif isinstance(item, TimelineBar):
            bars.append(item)
        elif expand is not None and item.session_id not in drawn:
            drawn.add(item.session_id)
            child = expand(item)
            if child is not None:
                stack.append(child)
    return bars


def _whole_sub_agent(store: SessionStore, sub_agent: _SubAgent) -> _Items | None:
    """The bars of the whole sub-agent session (`timeline`)."""
    child = _sub_agent_session(store, sub_agent.session_id)
    return None if child is None else _session_bars(child, sub_agent.depth)


def _sub_agent_page(
    store: SessionStore, ends: dict[str, Timestamp], drawn: set[str], sub_agent: _SubAgent
) -> _Items | None:
    """The sub-agent session's bar and its first `SUB_AGENT_LOOPS` loops (`loops_timeline`),
    reading only those loops (and, for the bar's end unless `ends` has it, those whose
    outline lacks it: `outline_span`). The sub-agent sessions those loops spawned are not
    drawn (a chain of 2,000 sessions, each spawning the next, was one page of 14,000
    bars): the bar's `detail` counts those not in `drawn`."""
    session_id, depth = sub_agent.session_id, sub_agent.depth
    try:
        outline = store.load_outline(session_id)
        placed = _outline_order(outline)[:SUB_AGENT_LOOPS]
        records = read_loops(store, session_id, (index for index, _ in placed))
        end = ends.get(session_id)
        if end is None:
            end = ends[session_id] = outline_span(outline, store)[1]
        bar = _outline_bar(outline, depth, end)
    except (SessionNotFound, InvalidSessionId):
        return None
    except (StoreError, ValueError) as error:  # ValueError: fewer loops stored than outlined
        _unreadable(session_id, error)
        return None
    bars: list[TimelineBar] = []
    spawned: set[str] = set()
    for index, level in placed:
        for item in _loop_bars(session_id, index, records[index], depth + 1 + level):
            if isinstance(item, TimelineBar):
                bars.append(item)
            elif item.session_id not in drawn:
                spawned.add(item.session_id)
    left_out = []
    if len(placed) < len(outline.loops):
        left_out.append(f"{len(placed)} of {len(outline.loops):,} loops drawn")
    if spawned:
        sessions = "session" if len(spawned) == 1 else "sessions"
        left_out.append(f"{len(spawned):,} sub-agent {sessions} of its own not drawn (open it)")
    if left_out:
        bar = replace(bar, detail="; ".join(left_out))
    return iter([bar, *bars])


def _session_bars(session: Session, depth: int) -> Iterator[TimelineBar | _SubAgent]:
    yield session_bar(session, depth)
    for index, level in loop_order(session):
        yield from _loop_bars(session.session_id, index, session.loops[index], depth + 1 + level)


def _loop_bars(
    session_id: str, index: int, loop: LoopRecord, depth: int
) -> Iterator[TimelineBar | _SubAgent]:
    kind = loop.continuation_kind
    notes = []
    if kind is not None and kind.kind != "Initial":
        notes.append(f"{kind.kind}:{kind.tag}" if kind.tag else kind.kind)
    group = loop.parallel_group
    if group is not None:
        notes.append("parallel winner" if group.is_selected else "parallel, not selected")
    label = f"loop #{index + 1}"
    if loop.config is not None:
        label += f" {loop.config.provider}/{loop.config.model}"
    # An aborted loop has no end, but is not running: it ends where its record does.
    yield TimelineBar(
        "loop",
        depth,
        label,
        loop.started_at,
        loop.last_seen() if loop.status == "Aborted" else loop.ended_at,
        session_id,
        index,
        loop_id=loop.loop_id,
        status=loop.status,
        usage=loop.billed_usage(),
        detail=" ".join(notes),
    )
    # Tool call id -> the sessions its calls spawned, in order: some providers number their
    # tool calls per turn, so one id may be a call of several turns, each taking the next.
    spawned: dict[str, deque[str]] = {}
    for ref in loop.child_loop_refs:
        spawned.setdefault(ref.tool_call_id, deque()).append(ref.child_session_id)
    results = _result_times(loop.turns)
    for turn_index, turn in enumerate(loop.turns):
        where = (index, loop.loop_id)
        yield from _turn_bars(
            session_id, where, turn_index, turn, loop.turn_usage(turn), depth + 1, results, spawned
        )
    for children in spawned.values():  # spawned outside a recorded turn: under the loop
        for child in children:
            yield _SubAgent(child, depth + 1)


def _result_times(turns: Iterable[Turn]) -> dict[str, int]:
    """Tool call id -> the time of its first result in `turns`, ms (Timestamps are dear to build)."""
    results: dict[str, int] = {}
    for turn in turns:
        for message in (*turn.tool_results, *turn.input_messages):
            if isinstance(message, ToolResultMessage):
                results.setdefault(message.tool_call_id, message.timestamp)
    return results


def _turn_bars(
    session_id: str,
    loop: tuple[int, str],
    turn_index: int,
    turn: Turn,
    usage: Usage,
    depth: int,
    results: dict[str, int],
    spawned: dict[str, deque[str]],
) -> Iterator[TimelineBar | _SubAgent]:
    def bar(
        kind: TimelineKind,
        level: int,
        label: str,
        start: Timestamp,
        end: Timestamp,
        usage: Usage | None,
        detail: str,
    ) -> TimelineBar:
        return TimelineBar(
            kind,
            level,
            label,
            start,
            end,
            session_id,
            loop[0],
            turn_index,
            loop[1],
            usage=usage,
            detail=detail,
        )

    yield bar(
        "turn",
        depth,
        f"turn {turn.turn_id.turn_index}",
        turn.started_at,
        turn.ended_at,
        usage,
        str(turn.triggered_by),
    )
    output = turn.output_message
    if not isinstance(output, AssistantMessage):
        return
    # Message clocks may disagree with the turn's: the answer is kept inside the turn.
    start_ns, end_ns = turn.started_at.ns, turn.ended_at.ns
    answered_ns = min(max(output.timestamp * _NS_PER_MS, start_ns), end_ns)
    answered = Timestamp.from_ns(answered_ns)
    model, stop = f"{output.provider}/{output.model}", f"stop: {output.stop_reason}"
    usage = counted_usage(output.usage, (output.usage,))
    yield bar("model", depth + 1, model, turn.started_at, answered, usage, stop)
    # The turn's own results first: a provider that numbers its calls per turn has the
    # same id in several turns. The loop's are for results recorded in a later turn.
    own = _result_times((turn,))
    for block in output.content:
        if not isinstance(block, ToolCall):
            continue
        done = own.get(block.id, results.get(block.id))
        end = turn.ended_at if done is None else Timestamp.from_ns(max(done * _NS_PER_MS, answered_ns))
        yield bar("tool", depth + 1, block.name, answered, end, None, block.id)
        if spawned.get(block.id):
            yield _SubAgent(spawned[block.id].popleft(), depth + 2)


_NS_PER_MS = 1_000_000
