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

A loop or an event may hold texts of megabytes (a tool result, a file an argument
writes): in the loop list, a loop's and the event log's JSON every text longer than
`CLIP_BYTES` is cut (`clip`), and past `VIEW_CHARS` of text in one loop, row or event
every text longer than 4 KiB, each cut listed with its full size and the query of the
``field`` view that gives it whole, naming it by its digest (`CachedSession.loop_text`,
`CachedSession.scoped_text`);
an event-log page ends early once its events reach `PAGE_BYTES`. Only these views are
cut: the stores, the whole session's JSON and the CLI's exports never are.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from functools import cached_property
from itertools import islice
from typing import Any

import msgspec

from .._time import Timestamp
from ..codec import encode_event, encode_loop, encode_session
from ..cost import Cost, Pricer
from ..diff import PlacedLoop, loop_position
from ..errors import LoopNotFound
from ..model import LoopEvent, LoopRecord, Session
from ..stores.base import SessionStore, summarize_outline, to_builtins
from ..stores.outline import LoopOutline, SessionOutline, loop_outline
from ..views import TimelineBar, loops_timeline, outline_span, read_loops, session_bar, tree_order

__all__ = [
    "CLIP_BYTES",
    "PAGE_BYTES",
    "VIEW_CHARS",
    "CachedSession",
    "FieldNotFound",
    "Page",
    "SessionCache",
    "clip",
]

CLIP_BYTES = 64 * 1024
"""A text longer than this in UTF-8 is cut in the viewer's loop and event views to its first
`_CLIP_CHARS` characters and a marker saying its full size (a loop of twelve 5 MB tool
results was one answer of 91 MB, a page of 10 of its events 15 MB)."""
_CLIP_CHARS = CLIP_BYTES // 4  # at most CLIP_BYTES in UTF-8, whatever the characters
VIEW_CHARS = 1024 * 1024
"""Once the texts of a loop, a loop list row or an event hold this many characters as
shown, each text after them over `_SHORT_BYTES` in UTF-8 is cut too, to its first
`_SHORT_CHARS` characters (a loop of 150 tool results of 65,000 bytes, none over
`CLIP_BYTES`, was 29 MB)."""
_SHORT_BYTES = 4 * 1024
_SHORT_CHARS = _SHORT_BYTES // 4
PAGE_BYTES = 4 * 1024 * 1024
"""An event-log page ends once the JSON of its events reaches this, holding one event at
least (a page of 200 events of that loop was 303 MB)."""


@dataclass(frozen=True)
class Page:
    """Which slice of a list a request wants."""

    offset: int
    limit: int

    def of(self, items: list[Any]) -> list[Any]:
        return items[self.offset : self.offset + self.limit]


class FieldNotFound(LookupError):
    """The loop or event a ``field`` request names holds no text cut of its digest (the server's 404)."""


@dataclass(frozen=True)
class _Cut:
    """A text `clip` cuts to its first `head` characters, `bytes` long in UTF-8: ``holder[key]``,
    or with `is_key` the key `key` itself; `path` names the containers above, `name` the
    member as cut."""

    holder: Any  # the decoded dict or list
    key: Any  # its key or index
    text: str
    bytes: int
    head: int
    path: tuple[str, ...]
    name: str
    is_key: bool = False

    @property
    def pointer(self) -> str:
        """Where it is in the item as cut, as a JSON pointer (RFC 6901): a key's, its member's."""
        return "".join(f"/{_escaped(part)}" for part in (*self.path, self.name))


def _cuts(tree: Any, budget: int = VIEW_CHARS) -> Iterator[_Cut]:
    """The texts of `tree` (a decoded loop or event) that `clip` cuts, keys too, in
    document order: those over `CLIP_BYTES`, and once the texts before them show `budget`
    characters, those over `_SHORT_BYTES`. The one walk that both cuts them (`clip`) and
    finds one again (`_cut_text`, with no budget: whatever the texts before it now). A path
    holds keys as cut, as the page finds them."""
    # Depth first with a stack of the containers entered and what is left of each; the
    # path of each container kept, its pointer written only for a cut.
    stack: list[tuple[Any, tuple[str, ...], Iterator[tuple[Any, Any]]]] = [(tree, (), _members(tree))]
    names: dict[int, set[str]] = {}  # id of a dict -> the names its cut keys were given
    shown = 0  # characters of the texts walked, as cut
    while stack:
        node, path, members = stack[-1]
        for key, value in members:
            name = str(key)
            if isinstance(key, str):
                if cut := _cut_of(key, shown < budget):
                    size, head = cut
                    name = _key_name(node, key, size, head, names.setdefault(id(node), set()))
                    yield _Cut(node, key, key, size, head, path, name, is_key=True)
                shown += len(name)
            if isinstance(value, str):
                if cut := _cut_of(value, shown < budget):
                    size, head = cut
                    yield _Cut(node, key, value, size, head, path, name)
                    shown += head
                else:
                    shown += len(value)
            elif isinstance(value, (dict, list)):
                stack.append((value, (*path, name), _members(value)))
                break
        else:
            stack.pop()


def _cut_of(text: str, within_budget: bool) -> tuple[int, int] | None:
    """Whether `clip` cuts `text`, within the budget or past it: if so, its size in UTF-8
    and how many characters it keeps."""
    limit, head = (CLIP_BYTES, _CLIP_CHARS) if within_budget else (_SHORT_BYTES, _SHORT_CHARS)
    if len(text) > head and (size := len(text.encode())) > limit:
        return size, head
    return None


def _cut(text: str, size: int, head: int) -> str:
    return f"{text[:head]}\u2026 [clipped: {size:,} bytes]"


def _key_name(holder: dict[str, Any], key: str, size: int, head: int, taken: set[str]) -> str:
    """The name the cut key `key` of `holder` is shown under: `_cut`, numbered if another key
    of `holder` is or was cut to the same (two keys of the same head and size), none lost."""
    name, number = _cut(key, size, head), 1
    while name in holder or name in taken:
        number += 1
        name = f"{_cut(key, size, head)} ({number})"
    taken.add(name)
    return name


def _members(node: dict[str, Any] | list[Any]) -> Iterator[tuple[Any, Any]]:
    return iter(node.items()) if isinstance(node, dict) else enumerate(node)


def _digest(text: str) -> str:
    """What names a cut text in its ``field`` query: short whatever the keys above it (a
    JSON pointer under a key of 11,000 'é' made a query of 66 KB, past what the server
    reads), and the same text's however the item changed since (a loop saved again with
    more turns: an ordinal or a pointer may have moved)."""
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def clip(data: bytes, field: str) -> tuple[bytes, list[dict[str, Any]]]:
    """`data`, the JSON of a loop or an event, with every text longer than `CLIP_BYTES`, a
    key too, cut (`_CLIP_CHARS` characters, then ``… [clipped: N bytes]``), and past
    `VIEW_CHARS` every text over `_SHORT_BYTES` (`_SHORT_CHARS` characters), and the list of
    the cuts: ``{"path": JSON pointer (RFC 6901), "key": whether it is the key of the member
    there, "bytes": N, "field": the field view's query}``, `field` its query naming the loop
    or event, to which each cut adds ``&digest=`` its text's `_digest`. JSON too short to
    hold such a text is passed on unread."""
    if len(data) <= CLIP_BYTES:
        return data, []
    tree = msgspec.json.decode(data)
    cuts = list(_cuts(tree))  # cut once the walk is done: it goes on through the containers
    if not cuts:
        return data, []
    renamed: dict[int, tuple[dict[str, Any], dict[str, str]]] = {}  # id of a dict -> it, its keys' names
    for cut in cuts:
        if cut.is_key:
            renamed.setdefault(id(cut.holder), (cut.holder, {}))[1][cut.key] = cut.name
        else:  # before its key is renamed
            cut.holder[cut.key] = _cut(cut.text, cut.bytes, cut.head)
    for holder, names in renamed.values():  # in place and order
        members = [(names.get(key, key), value) for key, value in holder.items()]
        holder.clear()
        holder.update(members)
    listed = [
        {
            "path": cut.pointer,
            "key": cut.is_key,
            "bytes": cut.bytes,
            "field": f"{field}&digest={_digest(cut.text)}",
        }
        for cut in cuts
    ]
    return msgspec.json.encode(tree), listed


def _cut_text(data: bytes, digest: str) -> str:
    """The whole text that `clip` cuts in `data` (JSON) whose `_digest` is `digest` (any text
    it may cut, however much of the budget the texts before it spend now: a running loop
    saved again). Raises `FieldNotFound`."""
    for cut in _cuts(msgspec.json.decode(data), budget=0):
        if _digest(cut.text) == digest:
            return cut.text
    raise FieldNotFound(f"no text cut here has the digest {digest!r} (changed since it was shown?)")


def _escaped(key: str) -> str:
    """A key as a JSON pointer's token (RFC 6901: ``~`` as ``~0``, ``/`` as ``~1``)."""
    return key.replace("~", "~0").replace("/", "~1")


class StaleOutline(Exception):
    """The stored session is no longer the one a cached outline describes (deleted and
    saved anew meanwhile, or a loop saved again with more events: `_as_outlined`): its
    entry is dropped and the request served again. `changed`: the loops read, by index,
    when each is only its outlined loop saved again (same id, more events): the entry then
    takes their outlines (`CachedSession.patched`) instead of reading the whole outline,
    which a running agent saving faster than it loads would keep stale."""

    def __init__(self, session_id: str, changed: dict[int, LoopRecord] | None = None) -> None:
        super().__init__(session_id)
        self.changed = changed


def _as_outlined(record: LoopRecord, outline: LoopOutline) -> bool:
    """Whether `record`, as stored now, is still the loop `outline` describes: a running
    agent saves its session again under the same loop ids, with more events, another
    status or an end, and pages counted from the outline would skip or cut its rows."""
    return (
        record.loop_id == outline.loop_id
        and len(record.events) == outline.event_count
        and record.status == outline.status
        and record.ended_at == outline.ended_at
    )


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
        """The stored loops `start` to `stop`, which must be those the outline lists, as it
        lists them (`_as_outlined`; else `StaleOutline`)."""
        records = self.store.load_loops(self.session_id, start, stop)
        if len(records) != len(self.outline.loops[start:stop]):
            raise StaleOutline(self.session_id)
        self._check(dict(enumerate(records, start)))
        return records

    def _check(self, records: dict[int, LoopRecord]) -> None:
        """`StaleOutline` unless each of `records` (by index) is as outlined."""
        outlines = self.outline.loops
        if all(_as_outlined(record, outlines[index]) for index, record in records.items()):
            return
        same_ids = all(record.loop_id == outlines[index].loop_id for index, record in records.items())
        raise StaleOutline(self.session_id, records if same_ids else None)

    def patched(self, changed: dict[int, LoopRecord]) -> CachedSession:
        """This entry with the outlines of the `changed` loops (`StaleOutline.changed`)
        taken from them, as loaded when this one was: its other loops are checked as read."""
        loops = list(self.outline.loops)
        for index, record in changed.items():
            loops[index] = loop_outline(record)
        entry = CachedSession(msgspec.structs.replace(self.outline, loops=tuple(loops)), self.store)
        entry.loaded_at = self.loaded_at
        return entry

    def _loops_at(self, indexes: Iterable[int]) -> dict[int, LoopRecord]:
        try:
            records = read_loops(self.store, self.session_id, indexes)
        except ValueError:  # fewer loops stored than asked for
            raise StaleOutline(self.session_id) from None
        self._check(records)
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
        """Loops in tree order, each without messages, turns and events, with counts instead
        (and its long texts cut: `clip`)."""
        local = {loop.loop_id for loop in self.outline.loops}
        rows = []
        for index, depth in page.of(self.tree_order):
            loop = self.outline.loops[index]
            record, cuts = clip(bytes(loop.record_json), f"loop={index}")
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
                    "loop": msgspec.Raw(record),
                    "clipped": cuts,
                }
            )
        return msgspec.json.encode({"total": len(self.tree_order), "loops": rows})

    def _loop_json(self, index: int) -> bytes:
        [record] = self._loops(index, index + 1)  # the index is checked
        data = encode_loop(msgspec.structs.replace(record, events=[]), pretty=False)
        # Each turn's usage as it shows (`LoopRecord.turn_usage`): its total counts the replies
        # that reported none, which the turn's summed usage cannot tell (its events are not sent).
        usages = msgspec.json.encode([record.turn_usage(turn) for turn in record.turns])
        return data[:-1] + b',"turn_usages":' + usages + b"}"

    def loop(self, index: int) -> bytes:
        """One loop with its turns and messages (its events are on the event log's pages),
        its long texts cut (`clip`): then listed under its ``"clipped"`` key."""
        data, cuts = clip(self._loop_json(index), f"loop={index}")
        if not cuts:
            return data
        return data[:-1] + b',"clipped":' + msgspec.json.encode(cuts) + b"}"  # into the loop's object

    def loop_text(self, loop: int, event: int | None, digest: str) -> bytes:
        """The whole text of that `digest` (JSON, a string) that `clip` cut in loop `loop` as
        `loop` and `loops` serve it, or in its `event`-th event in the event log's order (not
        named by sequence: events may share one). Raises `FieldNotFound`."""
        if event is None:
            return msgspec.json.encode(_cut_text(self._loop_json(loop), digest))
        [record] = self._loops(loop, loop + 1)
        events = _in_log_order(record)
        if event >= len(events):
            raise FieldNotFound(f"loop #{loop + 1} holds {len(events)} events: none at {event}")
        return msgspec.json.encode(_cut_text(encode_event(events[event].event), digest))

    def scoped_text(self, event: int, digest: str) -> bytes:
        """The whole text of that `digest` that `clip` cut in the `event`-th session-scoped event."""
        return msgspec.json.encode(_cut_text(encode_event(self.scoped_events[event]), digest))

    def event_log(self, page: Page, event_type: str | None, loop: int | None) -> bytes:
        """A page of the stored events (each loop's by sequence, then the session-scoped
        ones), of one type and/or one loop when asked, with every type's count and the
        offset of the next page (null after the last). A page ends early once its events'
        JSON reaches `PAGE_BYTES`, their long texts cut (`clip`). Only the loops the page
        covers are read: the outline counts the others."""
        outlines = self.outline.loops
        wanted = range(len(outlines)) if loop is None else range(loop, loop + 1)
        scoped = [] if loop is not None else list(enumerate(self.scoped_events))
        if event_type is not None:
            scoped = [(position, event) for position, event in scoped if type(event).__name__ == event_type]
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
        size = 0
        for row in islice(self._event_rows(range(first, last), skip, event_type, scoped), page.limit):
            rows.append(row)
            size += len(row["event"])
            if size >= PAGE_BYTES:
                break
        total = sum(counts) + len(scoped)
        following = page.offset + len(rows)
        return msgspec.json.encode(
            {
                "total": total,
                "types": self.event_types,
                "next": following if following < total else None,
                "events": rows,
            }
        )

    def _event_rows(
        self, loops: range, skip: int, event_type: str | None, scoped: list[tuple[int, Any]]
    ) -> Iterator[dict[str, Any]]:
        """The event log's rows from the `skip`-th event of the first of `loops` on, of
        `event_type` if one is given, then the session-scoped events (each event with its
        position among its loop's or among the session-scoped ones, which names it in a
        cut's field). Each loop is read as
        its rows are taken, and let go before the next: a loop may hold hundreds of MB,
        and those past a full page are never read."""
        for index in loops:
            [record] = self._loops(index, index + 1)
            stored = list(enumerate(_in_log_order(record)))
            if event_type is not None:
                stored = [
                    (position, item) for position, item in stored if type(item.event).__name__ == event_type
                ]
            for position, item in stored[skip:]:
                field = f"loop={index}&event={position}"
                yield _event_row(index, record.loop_id, item.sequence, item.event, field)
            skip = 0
            del record, stored
        for position, event in scoped[skip:]:
            yield _event_row(None, None, None, event, f"event={position}")

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


def _in_log_order(record: LoopRecord) -> list[LoopEvent]:
    """A loop's events as the event log lists them: by sequence, those sharing one as stored."""
    return sorted(record.events, key=lambda item: item.sequence)


def _event_row(
    loop_index: int | None, loop_id: str | None, sequence: int | None, event: Any, field: str
) -> dict[str, Any]:
    data, cuts = clip(encode_event(event), field)
    return {
        "loop_index": loop_index,
        "loop_id": loop_id,
        "sequence": sequence,
        "event": msgspec.Raw(data),
        "clipped": cuts,
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


class _Load:
    """One outline load under way (`SessionCache.get`): what it ends with, for the
    requests that waited for it."""

    __slots__ = ("done", "entry", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.entry: CachedSession | None = None
        self.error: Exception | None = None


class SessionCache:
    """The last few sessions the viewer loaded, each kept `ttl` seconds.

    Paging through a huge session must not load it again for every page; a
    session saved meanwhile shows its new state once its entry expires (the
    viewer reads a store that agents may still be writing), or at once when a page
    reads one of its loops changed since (`StaleOutline`), and one found deleted
    is forgotten at once (the server's 404).
    """

    def __init__(self, store: SessionStore, *, size: int = 4, ttl: float = 60.0) -> None:
        self.store = store
        self.size = size
        self.ttl = ttl
        self._entries: OrderedDict[str, CachedSession] = OrderedDict()
        self._lock = threading.Lock()
        # Per session being loaded: its lock and the requests holding or awaiting it.
        self._loading: dict[str, _Load] = {}  # outline loads under way, by session

    def forget(self, session_id: str, entry: CachedSession | None = None) -> None:
        """Drop the session's entry (only if it is still `entry`, when given: one another
        request loaded since is fresher): the next `get` reads its outline again."""
        with self._lock:
            if entry is None or self._entries.get(session_id) is entry:
                self._entries.pop(session_id, None)

    def patch(self, entry: CachedSession, changed: dict[int, LoopRecord]) -> CachedSession:
        """`entry.patched(changed)`, kept in its place if it is still the session's entry."""
        patched = entry.patched(changed)
        with self._lock:
            if self._entries.get(entry.session_id) is entry:
                self._entries[entry.session_id] = patched
        return patched

    def _fresh(self, session_id: str) -> CachedSession | None:
        entry = self._entries.get(session_id)
        if entry is None or time.monotonic() - entry.loaded_at >= self.ttl:
            return None
        self._entries.move_to_end(session_id)
        return entry

    def get(self, session_id: str) -> CachedSession:
        """The session's entry (`SessionNotFound` and store errors as `load_outline` raises
        them). One outline load per session at a time: requests arriving during it (a page's
        parallel requests after a change) take what it ends with, its entry or its error."""
        with self._lock:
            if (entry := self._fresh(session_id)) is not None:
                return entry
            load = self._loading.get(session_id)
            if load is None:
                load = self._loading[session_id] = _Load()
                loading = True
            else:
                loading = False
        if not loading:
            load.done.wait()
            if load.entry is not None:
                return load.entry
            if load.error is not None:
                raise load.error
            return self.get(session_id)  # its loader was interrupted (a BaseException): load anew
        try:
            entry = CachedSession(self.store.load_outline(session_id), self.store)
        except Exception as error:
            load.error = error
            raise
        else:
            with self._lock:
                self._entries[session_id] = entry
                self._entries.move_to_end(session_id)
                while len(self._entries) > self.size:
                    self._entries.popitem(last=False)
            load.entry = entry
            return entry
        finally:
            with self._lock:
                del self._loading[session_id]
            load.done.set()
