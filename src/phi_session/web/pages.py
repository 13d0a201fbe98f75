"""The viewer's paged views of one session, so that a huge session opens fast.

A session of 10,000 loops or 1,000,000 events opens from its outline
(`SessionStore.load_outline`: per loop its ids, counts and totals, not its messages,
turns and events), kept for a short while in a `SessionCache`, and is served in
pages: the overview (header and totals), the loops in tree order, one loop's turns
(`load_loops`), the event log (filtered by type and/or loop: only the loops a page
covers are read), the timeline and the cost of a page of loops (only those loops are
read, and for the timeline's axis those that never ended if their outlines lack their
last event's time) and the two loops a loop diff compares. The browser asks only for
what it shows; only a diff of two sessions loads them whole. Everything here returns
JSON bytes.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import msgspec

from .._time import Timestamp
from ..codec import encode_event, encode_loop, encode_session
from ..cost import Cost, Pricer
from ..diff import PlacedLoop, loop_position
from ..errors import LoopNotFound
from ..model import LoopRecord, Session
from ..stores.base import SessionStore, summarize_outline, to_builtins
from ..stores.outline import SessionOutline
from ..views import TimelineBar, loops_timeline, outline_span, read_loops, session_bar, tree_order

__all__ = ["CachedSession", "Page", "SessionCache"]


@dataclass(frozen=True)
class Page:
    """Which slice of a list a request wants."""

    offset: int
    limit: int

    def of(self, items: list[Any]) -> list[Any]:
        return items[self.offset : self.offset + self.limit]


class StaleOutline(Exception):
    """The stored session is no longer the one a cached outline describes (deleted and
    saved anew meanwhile, say): its entry is dropped and the request served again."""


class CachedSession:
    """One session's outline, the indexes its pages need and, for a session diff, the
    whole session: each built on first use."""

    def __init__(self, outline: SessionOutline, store: SessionStore) -> None:
        self.outline = outline
        self.session_id = outline.session.session_id
        self.store = store
        self.loaded_at = time.monotonic()
        self.sub_agent_ends: dict[str, Timestamp] = {}  # the ends of sub-agent bars (`loops_timeline`)

    def _loops(self, start: int, stop: int) -> list[LoopRecord]:
        """The stored loops `start` to `stop`, which must be those the outline lists."""
        records = self.store.load_loops(self.session_id, start, stop)
        listed = [loop.loop_id for loop in self.outline.loops[start:stop]]
        if [record.loop_id for record in records] != listed:
            raise StaleOutline(self.session_id)
        return records

    def _loops_at(self, indexes: Iterable[int]) -> dict[int, LoopRecord]:
        try:
            records = read_loops(self.store, self.session_id, indexes)
        except ValueError:  # fewer loops stored than asked for
            raise StaleOutline(self.session_id) from None
        if any(record.loop_id != self.outline.loops[index].loop_id for index, record in records.items()):
            raise StaleOutline(self.session_id)
        return records

    @cached_property
    def session(self) -> Session:
        """The whole session (what a session diff compares), loaded on first use."""
        return self.store.load(self.session_id)

    def placed_loop(self, loop: str, asked_at: float) -> PlacedLoop:
        """The loop `loop` names (an id, or ``#N``: `loop_position`) and where it is, for a
        loop diff: only that loop is read. Raises `LoopNotFound`; but `StaleOutline` when
        the outline, read before `asked_at` (the request's `time.monotonic`), lacks it: the
        loop may have been saved since, and only an outline read afresh can tell."""
        loop_ids = [outline.loop_id for outline in self.outline.loops]
        try:
            position = loop_position(self.session_id, loop_ids, loop)
        except LoopNotFound:
            if self.loaded_at < asked_at:
                raise StaleOutline(self.session_id) from None
            raise
        [record] = self._loops(position, position + 1)
        return PlacedLoop(self.session_id, position, record)

    @cached_property
    def tree_order(self) -> list[tuple[int, int]]:
        """``(loop index, depth)`` in the loop tree's depth-first order."""
        return tree_order([(loop.loop_id, loop.parent_loop_id) for loop in self.outline.loops])

    @cached_property
    def scoped_events(self) -> list[Any]:
        """The session-scoped events (``ParallelLoopStart``/``End``), after every loop's in the log."""
        events = self.outline.session.session_events
        return [] if isinstance(events, msgspec.UnsetType) else list(events)

    @cached_property
    def event_types(self) -> dict[str, int]:
        """Event type name -> how many the session stores."""
        types: Counter[str] = Counter(type(event).__name__ for event in self.scoped_events)
        for loop in self.outline.loops:
            types.update(loop.event_types)
        return dict(sorted(types.items()))

    @cached_property
    def summary(self) -> Any:
        """`summarize_outline`, as JSON-ready builtins."""
        return to_builtins(summarize_outline(self.outline))

    @cached_property
    def span(self) -> tuple[Timestamp, Timestamp]:
        """The waterfall's time axis (`outline_span`: it may read loops that never ended)."""
        try:
            return outline_span(self.outline, self.store)
        except ValueError:  # fewer loops stored than outlined
            raise StaleOutline(self.session_id) from None

    # -- pages --------------------------------------------------------------------------

    def overview(self, cost: Cost | None) -> bytes:
        """The session without its loops, its summary, `cost` (None: not priced), its first
        prompt and event count."""
        header = msgspec.structs.replace(self.outline.session, loops=[], session_events=msgspec.UNSET)
        return msgspec.json.encode(
            {
                "session": msgspec.Raw(encode_session(header, pretty=False)),
                "summary": self.summary,
                "cost": None if cost is None else msgspec.to_builtins(cost),
                "first_prompt": self.outline.first_prompt,
                "event_count": len(self.scoped_events) + sum(loop.event_count for loop in self.outline.loops),
            }
        )

    def loops(self, page: Page) -> bytes:
        """Loops in tree order, each without messages, turns and events, with counts instead."""
        local = {loop.loop_id for loop in self.outline.loops}
        rows = []
        for index, depth in page.of(self.tree_order):
            loop = self.outline.loops[index]
            rows.append(
                {
                    "index": index,
                    "depth": depth,
                    "turn_count": loop.turn_count,
                    "tool_calls": loop.tool_calls,
                    "event_count": loop.event_count,
                    # What the loop's calls billed (a loop cut off mid-turn: more than its usage).
                    "billed_usage": msgspec.to_builtins(loop.billed_usage),
                    "unfinished_usage": msgspec.to_builtins(loop.unfinished_usage),
                    "parent_in_session": loop.parent_loop_id in local,
                    "loop": loop.record_json,
                }
            )
        return msgspec.json.encode({"total": len(self.tree_order), "loops": rows})

    def loop(self, index: int) -> bytes:
        """One loop with its turns and messages (its events are on the event log's pages)."""
        [record] = self._loops(index, index + 1)  # the index is checked
        return encode_loop(msgspec.structs.replace(record, events=[]), pretty=False)

    def event_log(self, page: Page, event_type: str | None, loop: int | None) -> bytes:
        """A page of the stored events (each loop's by sequence, then the session-scoped
        ones), of one type and/or one loop when asked, with every type's count. Only the
        loops the page covers are read: the outline counts the others."""
        outlines = self.outline.loops
        wanted = range(len(outlines)) if loop is None else range(loop, loop + 1)
        scoped = [] if loop is not None else self.scoped_events
        if event_type is not None:
            scoped = [event for event in scoped if type(event).__name__ == event_type]
        counts = [
            outlines[index].event_types.get(event_type, 0) if event_type else outlines[index].event_count
            for index in wanted
        ]
        # The loops the page covers: skip those before its first event, stop once it is full.
        skip, first = page.offset, wanted.start
        for count in counts:
            if skip < count:
                break
            skip -= count
            first += 1
        last, held = first, -skip
        while last < wanted.stop and held < page.limit:
            held += counts[last - wanted.start]
            last += 1
        rows: list[dict[str, Any]] = []
        records = self._loops(first, last) if first < last else []
        for index, record in enumerate(records, first):
            stored = sorted(record.events, key=lambda item: item.sequence)
            if event_type is not None:
                stored = [item for item in stored if type(item.event).__name__ == event_type]
            for item in stored[skip : skip + page.limit - len(rows)]:
                rows.append(_event_row(index, record.loop_id, item.sequence, item.event))
            skip = 0
        for event in scoped[skip : skip + page.limit - len(rows)]:
            rows.append(_event_row(None, None, None, event))
        total = sum(counts) + len(scoped)
        return msgspec.json.encode({"total": total, "types": self.event_types, "events": rows})

    def timeline(self, page: Page, pricer: Pricer) -> bytes:
        """The waterfall's bars of a page of loops in tree order (``offset`` and ``limit``
        count loops; the first page starts with the session's bar), placed in milliseconds
        from the axis start, with each of the session's loop and turn bars priced. Only
        the page's loops are read (and the first loops of the sub-agent sessions they
        spawned: `loops_timeline`)."""
        first, last = self.span
        placed = page.of(self.tree_order)
        records = self._loops_at(index for index, _ in placed)
        bars = loops_timeline(
            self.session_id,
            ((index, depth, records[index]) for index, depth in placed),
            self.store,
            sub_agent_ends=self.sub_agent_ends,
        )
        if page.offset == 0:
            bars.insert(0, replace(session_bar(self.outline.session), end=last))
        rows = []
        for bar in bars:
            row = _bar_json(bar, first, last)
            if bar.session_id == self.session_id and bar.loop_index is not None:
                record = records[bar.loop_index]
                if bar.kind == "loop":
                    row["cost"] = msgspec.to_builtins(pricer.loop(record))
                elif bar.kind == "turn" and bar.turn_index is not None:
                    row["cost"] = msgspec.to_builtins(pricer.turn(record.turns[bar.turn_index], record))
            rows.append(row)
        total = len(self.tree_order)
        following = page.offset + len(placed)
        return msgspec.json.encode(
            {
                "loops": total,
                "offset": page.offset,
                "next": following if following < total else None,
                "start": str(first),
                "end": str(last),
                "span_ms": _ms(first, last),
                "bars": rows,
            }
        )

    def cost(self, page: Page, pricer: Pricer) -> dict[str, Any]:
        """The session's cost (from its outline) and that of a page of its loops (in
        session order) and of their turns (`Pricer.breakdown`'s shape, paged)."""
        start = min(page.offset, len(self.outline.loops))
        records = self._loops(start, min(start + page.limit, len(self.outline.loops)))
        return {
            "session_id": self.session_id,
            "cost": msgspec.to_builtins(pricer.outline(self.outline)),
            "total": len(self.outline.loops),
            "offset": page.offset,
            "loops": [msgspec.to_builtins(pricer.loop_cost(record)) for record in records],
        }


def _event_row(
    loop_index: int | None, loop_id: str | None, sequence: int | None, event: Any
) -> dict[str, Any]:
    return {
        "loop_index": loop_index,
        "loop_id": loop_id,
        "sequence": sequence,
        "event": msgspec.Raw(encode_event(event)),
    }


def _ms(start: Timestamp, end: Timestamp) -> float:
    return (end.ns - start.ns) / 1e6


def _bar_json(bar: TimelineBar, first: Timestamp, last: Timestamp) -> dict[str, Any]:
    end = bar.end if bar.end is not None else last
    return {
        "kind": bar.kind,
        "depth": bar.depth,
        "label": bar.label,
        "detail": bar.detail,
        "status": bar.status,
        "session_id": bar.session_id,
        "loop_index": bar.loop_index,
        "loop_id": bar.loop_id,
        "turn_index": bar.turn_index,
        "start": str(bar.start),
        "end": None if bar.end is None else str(bar.end),
        "offset_ms": _ms(first, bar.start),
        "duration_ms": _ms(bar.start, end),
        "usage": None if bar.usage is None else msgspec.to_builtins(bar.usage),
    }


class SessionCache:
    """The last few sessions the viewer loaded, each kept `ttl` seconds.

    Paging through a huge session must not load it again for every page; a
    session saved meanwhile shows its new state once its entry expires (the
    viewer reads a store that agents may still be writing), and one found deleted
    is forgotten at once (the server's 404).
    """

    def __init__(self, store: SessionStore, *, size: int = 4, ttl: float = 60.0) -> None:
        self.store = store
        self.size = size
        self.ttl = ttl
        self._entries: OrderedDict[str, CachedSession] = OrderedDict()
        self._lock = threading.Lock()

    def forget(self, session_id: str) -> None:
        """Drop the session's entry: the next `get` reads its outline again."""
        with self._lock:
            self._entries.pop(session_id, None)

    def get(self, session_id: str) -> CachedSession:
        """The session's entry (`SessionNotFound` and store errors as `load_outline` raises them)."""
        with self._lock:
            entry = self._entries.get(session_id)
            if entry is not None and time.monotonic() - entry.loaded_at < self.ttl:
                self._entries.move_to_end(session_id)
                return entry
        entry = CachedSession(self.store.load_outline(session_id), self.store)
        with self._lock:
            self._entries[session_id] = entry
            self._entries.move_to_end(session_id)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return entry
