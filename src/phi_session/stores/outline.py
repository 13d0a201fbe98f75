"""Partial loads of a session, so that a huge one opens fast: its outline, then a loop at a time.

A session of 10,000 loops or 1,000,000 events is too big to load whole just to show
its loop tree. Its **outline** (`SessionOutline`) is the session header and, per
loop, a `LoopOutline`: what a listing of loops, the loop tree and the session's
totals need (ids, parent, status, times, model, turn and tool-call counts, event
counts by type, billed usage, the model calls cost prices, first prompt) and the loop's **bare** record
(`bare_loop`: no messages, turns nor events) as JSON, decoded only when asked for
(`LoopOutline.record`). `SessionStore.load_outline` returns it and
`SessionStore.load_loops` whole loops, a range of positions at a time. The SQL
stores keep each loop's outline beside its record (`encode_loop_outline`), so
neither reads the records of other loops; the JSON directory store derives both
from the whole file, which it keeps split by loop while it is unchanged.

Opening a session of 23,000 loops decodes 23,000 outlines: that is why a
`LoopOutline` is flat (strings, counts and two usages) and keeps the record as raw
JSON, decoded for the few loops a page shows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from itertools import groupby
from operator import itemgetter
from typing import Any, TypeVar

import msgspec

from .._time import Timestamp
from ..codec import decode_loop, encode_loop
from ..messages import TextContent, Usage, UserMessage
from ..model import LoopRecord, ModelCall, Session

__all__ = [
    "PROMPT_CHARS",
    "LoopOutline",
    "SessionOutline",
    "bare_loop",
    "decode_calls",
    "decode_loop_outline",
    "encode_calls",
    "encode_loop_outline",
    "encode_outline_and_calls",
    "first_prompt",
    "loop_outline",
    "loop_prompt",
    "session_outline",
    "stored_first_prompts",
]


PROMPT_CHARS = 200
"""How much of a prompt an outline (and a session listing) keeps."""


def loop_prompt(record: LoopRecord) -> str | None:
    """The text of the first user message of the loop's `LoopRecord.conversation` (which a
    loop that never ended has in its events), cut to `PROMPT_CHARS` (None: it has none)."""
    for message in record.conversation():
        if isinstance(message, UserMessage):
            text = " ".join(block.text for block in message.content if isinstance(block, TextContent))
            return text if len(text) <= PROMPT_CHARS else text[: PROMPT_CHARS - 1] + "\u2026"
    return None


def first_prompt(session: Session) -> str | None:
    """The first user prompt of the session: that of its first loop that has one (`loop_prompt`)."""
    return next((prompt for prompt in map(loop_prompt, session.loops) if prompt is not None), None)


class LoopOutline(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One loop of an outline: what a listing and the session's totals show of it, and
    its bare record as JSON. Also the form the SQL stores keep (`encode_loop_outline`)."""

    loop_id: str
    parent_loop_id: str | None
    status: str
    started_text: str = msgspec.field(name="started_at")
    """``started_at`` as written (canonical RFC 3339): Timestamps are built only when read
    (`started_at`), which a huge session's listing mostly never does."""
    ended_text: str | None = msgspec.field(name="ended_at")
    provider: str | None
    """The loop config's provider and model (None: the loop has no config)."""
    model: str | None
    turn_count: int
    tool_calls: int
    """Tool results over the loop's turns."""
    event_types: dict[str, int]
    """How many stored events of each type (``AgentStart``, ``TurnEnd``…) the loop holds."""
    billed_usage: Usage
    """`LoopRecord.billed_usage` of the whole loop (it needs the turns and events)."""
    unfinished_usage: Usage
    """`LoopRecord.unfinished_usage` of the whole loop (it needs the events)."""
    prompt: str | None
    """`loop_prompt` of the loop."""
    record_json: msgspec.Raw = msgspec.field(name="record")
    """`bare_loop` of the loop as compact phi-core JSON (`record` decodes it)."""
    calls: tuple[ModelCall, ...] | None = None
    """`LoopRecord.model_calls` of the whole loop; None in an outline stored before they
    were (`model_calls` then stands the billed usage in for them)."""
    unended_seen_text: str | None = msgspec.field(default=None, name="last_seen")
    """`LoopRecord.last_seen` of a loop that never ended (its last event's time); None for
    one that ended, or in an outline stored before it was (`last_seen`)."""

    def model_calls(self) -> tuple[ModelCall, ...]:
        """The loop's model calls, what cost prices; for an outline stored without them,
        its billed usage as one call at the loop's start."""
        if self.calls is not None:
            return self.calls
        return (ModelCall.of(self.started_at, self.billed_usage),)

    @property
    def record(self) -> LoopRecord:
        """The loop without messages, turns and events (`bare_loop`), decoded on each call;
        `DecodeError` if the stored JSON is not a loop."""
        return decode_loop(bytes(self.record_json), strict=False)

    @property
    def started_at(self) -> Timestamp:
        return Timestamp.parse(self.started_text)

    @property
    def ended_at(self) -> Timestamp | None:
        return None if self.ended_text is None else Timestamp.parse(self.ended_text)

    @property
    def last_seen(self) -> Timestamp | None:
        """`LoopRecord.last_seen` of the loop; None if it never ended and its outline was
        stored before the time of its last event was (the loop holds it)."""
        if self.ended_text is not None:
            return self.ended_at
        return None if self.unended_seen_text is None else Timestamp.parse(self.unended_seen_text)

    @property
    def event_count(self) -> int:
        return sum(self.event_types.values())

    @property
    def model_key(self) -> str | None:
        """``provider/model`` as listings show it (None: the loop has no config)."""
        return None if self.provider is None else f"{self.provider}/{self.model}"


class SessionOutline(msgspec.Struct, frozen=True, kw_only=True):
    """A session's header and the outlines of its loops."""

    session: Session
    """The header and session-scoped events as stored; no loops (see `loops`)."""
    loops: tuple[LoopOutline, ...]

    @property
    def first_prompt(self) -> str | None:
        """`first_prompt` of the whole session."""
        return next((loop.prompt for loop in self.loops if loop.prompt is not None), None)


def bare_loop(record: LoopRecord) -> LoopRecord:
    """`record` without its messages, turns and events."""
    return msgspec.structs.replace(record, messages=(), turns=(), events=())


def _flat_fields(record: LoopRecord) -> dict[str, Any]:
    """The `LoopOutline` fields read from the bare record."""
    config = record.config
    return {
        "loop_id": record.loop_id,
        "parent_loop_id": record.parent_loop_id,
        "status": record.status,
        "started_text": str(record.started_at),
        "ended_text": None if record.ended_at is None else str(record.ended_at),
        "provider": None if config is None else config.provider,
        "model": None if config is None else config.model,
    }


def loop_outline(record: LoopRecord) -> LoopOutline:
    """The outline of one whole loop."""
    types = Counter(type(stored.event).__name__ for stored in record.events)
    return LoopOutline(
        **_flat_fields(record),
        turn_count=len(record.turns),
        tool_calls=record.tool_call_count(),
        event_types=dict(sorted(types.items())),
        billed_usage=record.billed_usage(),
        unfinished_usage=record.unfinished_usage(),
        prompt=loop_prompt(record),
        record_json=msgspec.Raw(encode_loop(bare_loop(record), pretty=False)),
        calls=tuple(record.model_calls()),
        unended_seen_text=None if record.ended_at is not None else str(record.last_seen()),
    )


def session_outline(session: Session, loops: Sequence[LoopOutline] | None = None) -> SessionOutline:
    """The outline of `session`; with `loops` (the outlines of its loops, which
    ``session.loops`` may then omit), those instead of outlining ``session.loops``."""
    outlines = tuple(loop_outline(record) for record in session.loops) if loops is None else tuple(loops)
    return SessionOutline(session=msgspec.structs.replace(session, loops=[]), loops=outlines)


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(LoopOutline)


class _StoredV1(msgspec.Struct, frozen=True, kw_only=True):
    """The first stored form (SQLite schema 4, PostgreSQL 3): the record first, no flat
    fields; still read, from stores written before the flat fields were added."""

    record: msgspec.Raw
    turn_count: int
    tool_calls: int
    event_types: dict[str, int]
    billed_usage: Usage
    unfinished_usage: Usage
    prompt: str | None


_v1_decoder = msgspec.json.Decoder(_StoredV1)


def encode_loop_outline(record: LoopRecord) -> bytes:
    """The stored form of `record`'s outline (compact JSON)."""
    return _encoder.encode(loop_outline(record))


def decode_loop_outline(data: bytes) -> LoopOutline:
    """A loop outline from `encode_loop_outline`'s bytes (or the first stored form's);
    `msgspec.DecodeError` or `DecodeError` when they are not one."""
    try:
        return _decoder.decode(data)
    except msgspec.ValidationError:
        stored = _v1_decoder.decode(data)  # the first form: the flat fields come from the record
    return LoopOutline(
        **_flat_fields(decode_loop(bytes(stored.record), strict=False)),
        turn_count=stored.turn_count,
        tool_calls=stored.tool_calls,
        event_types=stored.event_types,
        billed_usage=stored.billed_usage,
        unfinished_usage=stored.unfinished_usage,
        prompt=stored.prompt,
        record_json=stored.record,
    )


_Key = TypeVar("_Key")


def stored_first_prompts(rows: Iterable[tuple[_Key, bytes]]) -> Iterator[tuple[_Key, str | None]]:
    """`SessionOutline.first_prompt` of each session of `rows`: ``(key, outline)`` of its
    loops' stored outlines (`encode_loop_outline`), in loop order and together, under a
    key that stays the same over them (its id, or its id and what else a row brings).
    Each key with its session's first prompt; the outlines after the first loop that has
    one are not decoded. What a store's schema migrations list as the session's prompt."""
    for key, outlines in groupby(rows, key=itemgetter(0)):
        prompts = (decode_loop_outline(outline).prompt for _, outline in outlines)
        yield key, next((prompt for prompt in prompts if prompt is not None), None)


def encode_outline_and_calls(record: LoopRecord) -> tuple[bytes, bytes]:
    """`encode_loop_outline` and `encode_calls` of `record` (what a SQL store writes beside
    its record), finding its model calls once for both."""
    return encode_outline_parts(loop_outline(record))


def encode_outline_parts(outline: LoopOutline) -> tuple[bytes, bytes]:
    """`encode_outline_and_calls` of the loop whose `outline` this is."""
    return _encoder.encode(outline), _encoder.encode(outline.calls)


_calls_decoder = msgspec.json.Decoder(tuple[ModelCall, ...])


def encode_calls(record: LoopRecord) -> bytes:
    """The stored form of `record`'s model calls (`LoopRecord.model_calls`): compact JSON,
    an array of arrays (the integers, then `ModelCall.served_by`), what the SQL stores'
    priced totals read."""
    return _encoder.encode(record.model_calls())


def decode_calls(data: bytes) -> tuple[ModelCall, ...]:
    """The model calls of `encode_calls`' bytes; `msgspec.DecodeError` when they are not."""
    return _calls_decoder.decode(data)
