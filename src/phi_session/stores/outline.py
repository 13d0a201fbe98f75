"""Partial loads of a session, so that a huge one opens fast: its outline, then a loop at a time.

A session of 10,000 loops or 1,000,000 events is too big to load whole just to show
its loop tree. Its **outline** (`SessionOutline`) is the session with every loop
**bare** (`bare_loop`: no messages, turns nor events) and, per loop, what a listing
of loops shows of what was left out (`LoopOutline`: turn and tool-call counts, event
counts by type, billed usage). `SessionStore.load_outline` returns it and
`SessionStore.load_loops` whole loops, a range of positions at a time. The SQL stores keep each loop's outline
beside its record (`encode_loop_outline`), so neither reads the records of other
loops; the JSON directory store derives both from the whole session.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import msgspec

from ..codec import decode_loop, encode_loop
from ..messages import TextContent, Usage, UserMessage
from ..model import LoopRecord, Session

__all__ = [
    "PROMPT_CHARS",
    "LoopOutline",
    "SessionOutline",
    "bare_loop",
    "decode_loop_outline",
    "encode_loop_outline",
    "first_prompt",
    "loop_outline",
    "loop_prompt",
    "session_outline",
]


PROMPT_CHARS = 200
"""How much of a prompt an outline (and a session listing) keeps."""


def loop_prompt(record: LoopRecord) -> str | None:
    """The text of the loop's first user message, cut to `PROMPT_CHARS` (None: it has none)."""
    for message in record.messages:
        if isinstance(message, UserMessage):
            text = " ".join(block.text for block in message.content if isinstance(block, TextContent))
            return text if len(text) <= PROMPT_CHARS else text[: PROMPT_CHARS - 1] + "\u2026"
    return None


def first_prompt(session: Session) -> str | None:
    """The first user prompt of the session: that of its first loop that has one (`loop_prompt`)."""
    return next((prompt for prompt in map(loop_prompt, session.loops) if prompt is not None), None)


class LoopOutline(msgspec.Struct, frozen=True, kw_only=True):
    """One loop of an outline: its bare record and the counts of what it leaves out."""

    record: LoopRecord
    """The loop without messages, turns and events (`bare_loop`)."""
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

    @property
    def event_count(self) -> int:
        return sum(self.event_types.values())


class SessionOutline(msgspec.Struct, frozen=True, kw_only=True):
    """A session whose loops are bare (``session.loops[i]`` is ``loops[i].record``)."""

    session: Session
    """The header and session-scoped events as stored; the loops bare."""
    loops: tuple[LoopOutline, ...]

    @property
    def first_prompt(self) -> str | None:
        """`first_prompt` of the whole session."""
        return next((loop.prompt for loop in self.loops if loop.prompt is not None), None)


def bare_loop(record: LoopRecord) -> LoopRecord:
    """`record` without its messages, turns and events."""
    return msgspec.structs.replace(record, messages=[], turns=[], events=[])


def loop_outline(record: LoopRecord) -> LoopOutline:
    """The outline of one whole loop."""
    types = Counter(type(stored.event).__name__ for stored in record.events)
    return LoopOutline(
        record=bare_loop(record),
        turn_count=len(record.turns),
        tool_calls=record.tool_call_count(),
        event_types=dict(sorted(types.items())),
        billed_usage=record.billed_usage(),
        unfinished_usage=record.unfinished_usage(),
        prompt=loop_prompt(record),
    )


def session_outline(session: Session, loops: Sequence[LoopOutline] | None = None) -> SessionOutline:
    """The outline of `session`; with `loops` (the outlines of its loops, which
    ``session.loops`` may then omit), those instead of outlining ``session.loops``."""
    outlines = tuple(loop_outline(record) for record in session.loops) if loops is None else tuple(loops)
    bare = msgspec.structs.replace(session, loops=[outline.record for outline in outlines])
    return SessionOutline(session=bare, loops=outlines)


class _Stored(msgspec.Struct, frozen=True, kw_only=True):
    """A loop outline as the SQL stores keep it: the bare record's phi-core JSON and the counts."""

    record: msgspec.Raw
    turn_count: int
    tool_calls: int
    event_types: dict[str, int]
    billed_usage: Usage
    unfinished_usage: Usage
    prompt: str | None


_stored_decoder = msgspec.json.Decoder(_Stored)


def encode_loop_outline(record: LoopRecord) -> bytes:
    """The stored form of `record`'s outline (compact JSON)."""
    outline = loop_outline(record)
    return msgspec.json.encode(
        _Stored(
            record=msgspec.Raw(encode_loop(outline.record, pretty=False)),
            turn_count=outline.turn_count,
            tool_calls=outline.tool_calls,
            event_types=outline.event_types,
            billed_usage=outline.billed_usage,
            unfinished_usage=outline.unfinished_usage,
            prompt=outline.prompt,
        )
    )


def decode_loop_outline(data: bytes) -> LoopOutline:
    """A loop outline from `encode_loop_outline`'s bytes; `msgspec.DecodeError` or
    `DecodeError` when they are not one."""
    stored = _stored_decoder.decode(data)
    return LoopOutline(
        record=decode_loop(bytes(stored.record), strict=False),
        turn_count=stored.turn_count,
        tool_calls=stored.tool_calls,
        event_types=stored.event_types,
        billed_usage=stored.billed_usage,
        unfinished_usage=stored.unfinished_usage,
        prompt=stored.prompt,
    )
