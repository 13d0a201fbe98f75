"""The viewer's paged views of one session, so that a huge session opens fast.

A session of 10,000 loops or 1,000,000 events is loaded from the store once,
kept for a short while in a `SessionCache`, and served in pages: the overview
(header and totals, no loops), the loops in tree order (each without its turns
and events), one loop's turns, the event log (filtered by type) and the timeline.
The browser asks only for what it shows. Everything here returns JSON bytes.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import msgspec

from .._time import Timestamp
from ..codec import encode_event, encode_loop, encode_session
from ..cost import Cost
from ..messages import TextContent, UserMessage
from ..model import LoopRecord, Session, SessionEvent
from ..stores.base import SessionStore, summarize, to_builtins
from ..views import TimelineBar, loop_order, timeline

__all__ = ["PROMPT_CHARS", "CachedSession", "SessionCache", "first_prompt"]

PROMPT_CHARS = 200
"""How much of a session's first user prompt the list shows."""


def first_prompt(session: Session) -> str | None:
    """The text of the first user message of the session's first loop, cut to `PROMPT_CHARS`."""
    for record in session.loops:
        for message in record.messages:
            if isinstance(message, UserMessage):
                text = " ".join(block.text for block in message.content if isinstance(block, TextContent))
                return text if len(text) <= PROMPT_CHARS else text[: PROMPT_CHARS - 1] + "\u2026"
    return None


@dataclass(frozen=True)
class Page:
    """Which slice of a list a request wants."""

    offset: int
    limit: int

    def of(self, items: list[Any]) -> list[Any]:
        return items[self.offset : self.offset + self.limit]


class CachedSession:
    """One loaded session and the indexes its pages need, each built on first use."""

    def __init__(self, session: Session, store: SessionStore) -> None:
        self.session = session
        self.store = store
        self.loaded_at = time.monotonic()

    @cached_property
    def tree_order(self) -> list[tuple[int, int]]:
        """``(loop index, depth)`` in the loop tree's depth-first order."""
        return loop_order(self.session)

    @cached_property
    def events(self) -> list[tuple[int | None, SessionEvent]]:
        positions = {id(record): index for index, record in enumerate(self.session.loops)}
        return [
            (None if item.loop is None else positions[id(item.loop)], item)
            for item in self.session.iter_events()
        ]

    @cached_property
    def event_types(self) -> dict[str, list[int]]:
        """Event type name -> positions in `events`."""
        types: dict[str, list[int]] = {}
        for position, (_, item) in enumerate(self.events):
            types.setdefault(type(item.event).__name__, []).append(position)
        return types

    @cached_property
    def bars(self) -> list[TimelineBar]:
        return timeline(self.session, self.store)

    @cached_property
    def span(self) -> tuple[Timestamp, Timestamp]:
        """The waterfall's first start and last end."""
        first = min((bar.start for bar in self.bars), default=self.session.created_at)
        return first, max([first, *(bar.end for bar in self.bars if bar.end is not None)])

    # -- pages --------------------------------------------------------------------------

    def overview(self, cost: Cost) -> bytes:
        """The session without its loops, its summary, `cost`, its first prompt and event count."""
        header = msgspec.structs.replace(self.session, loops=[], session_events=msgspec.UNSET)
        return msgspec.json.encode(
            {
                "session": msgspec.Raw(encode_session(header, pretty=False)),
                "summary": to_builtins(summarize(self.session)),
                "cost": msgspec.to_builtins(cost),
                "first_prompt": first_prompt(self.session),
                "event_count": _event_count(self.session),
            }
        )

    def loops(self, page: Page) -> bytes:
        """Loops in tree order, each without messages, turns and events, with counts instead."""
        local = {record.loop_id for record in self.session.loops}
        rows = []
        for index, depth in page.of(self.tree_order):
            record = self.session.loops[index]
            rows.append(
                {
                    "index": index,
                    "depth": depth,
                    "turn_count": len(record.turns),
                    "tool_calls": sum(len(turn.tool_results) for turn in record.turns),
                    "event_count": len(record.events),
                    # What the loop's calls billed (a loop cut off mid-turn: more than its usage).
                    "billed_usage": msgspec.to_builtins(record.billed_usage()),
                    "unfinished_usage": msgspec.to_builtins(record.unfinished_usage()),
                    "parent_in_session": record.parent_loop_id in local,
                    "loop": msgspec.Raw(encode_loop(_bare(record), pretty=False)),
                }
            )
        return msgspec.json.encode({"total": len(self.tree_order), "loops": rows})

    def loop(self, index: int) -> bytes:
        """One loop with its turns and messages (its events are on the event log's pages)."""
        return encode_loop(msgspec.structs.replace(self.session.loops[index], events=[]), pretty=False)

    def event_log(self, page: Page, event_type: str | None, loop: int | None) -> bytes:
        """A page of the stored events, of one type and/or one loop when asked, with every type's count."""
        if event_type is not None:
            positions = self.event_types.get(event_type, [])
            selected: list[tuple[int | None, SessionEvent]] = [self.events[p] for p in positions]
        else:
            selected = self.events
        if loop is not None:
            selected = [item for item in selected if item[0] == loop]
        rows = [
            {
                "loop_index": index,
                "loop_id": None if item.loop is None else item.loop.loop_id,
                "sequence": item.sequence,
                "event": msgspec.Raw(encode_event(item.event)),
            }
            for index, item in page.of(selected)
        ]
        types = {name: len(positions) for name, positions in sorted(self.event_types.items())}
        return msgspec.json.encode({"total": len(selected), "types": types, "events": rows})

    def timeline(self, page: Page) -> bytes:
        """A page of the waterfall's bars, placed in milliseconds from the first start."""
        bars = self.bars
        first, last = self.span
        return msgspec.json.encode(
            {
                "total": len(bars),
                "start": str(first),
                "end": str(last),
                "span_ms": _ms(first, last),
                "bars": [_bar_json(bar, first, last) for bar in page.of(bars)],
            }
        )


def _bare(record: LoopRecord) -> LoopRecord:
    return msgspec.structs.replace(record, messages=[], turns=[], events=[])


def _event_count(session: Session) -> int:
    scoped = 0 if isinstance(session.session_events, msgspec.UnsetType) else len(session.session_events)
    return sum(len(record.events) for record in session.loops) + scoped


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
    viewer reads a store that agents may still be writing).
    """

    def __init__(self, store: SessionStore, *, size: int = 4, ttl: float = 60.0) -> None:
        self.store = store
        self.size = size
        self.ttl = ttl
        self._entries: OrderedDict[str, CachedSession] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, session_id: str) -> CachedSession:
        """The session (`SessionNotFound` and store errors as `store.load` raises them)."""
        with self._lock:
            entry = self._entries.get(session_id)
            if entry is not None and time.monotonic() - entry.loaded_at < self.ttl:
                self._entries.move_to_end(session_id)
                return entry
        entry = CachedSession(self.store.load(session_id), self.store)
        with self._lock:
            self._entries[session_id] = entry
            self._entries.move_to_end(session_id)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return entry
