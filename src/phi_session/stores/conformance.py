"""The behaviour every `SessionStore` backend must show, as a pytest suite.

A backend's test module subclasses `StoreConformance` and provides the store::

    class TestMyStore(StoreConformance):
        @pytest.fixture
        def store(self, tmp_path):
            store = MyStore(...)
            yield store
            store.close()

Each test gets a fresh, empty store. Test sessions are built with `make_session`
and `make_loop`, never written as JSON by hand. A few tests also use phi-core's
example files from ``$PHI_SESSION_SPEC_DIR/examples`` (by default
``shared/spec/examples`` beside the source checkout); without them they are skipped.

The module imports without pytest (its helpers serve other code too); the tests
import pytest when they run.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgspec

from .._time import Timestamp
from ..codec import (
    decode_event,
    decode_session,
    encode_event,
    encode_loop,
    encode_session,
    without_lone_surrogates,
)
from ..cost import ZERO_COST, Cost, Pricer, cost_totals, prices_available
from ..errors import InvalidQuery, InvalidSessionId, SessionNotFound, StoreError
from ..events import (
    COMPACTION,
    AgentEnd,
    AgentEvent,
    AgentStart,
    LoopConfigSnapshot,
    MessageEnd,
    ProgressMessage,
    SessionFormation,
    ToolExecutionEnd,
    TurnEnd,
    TurnStart,
)
from ..identity import AgentSession
from ..instrument import Tracer
from ..messages import (
    ZERO_USAGE,
    AnnotatedRequestPayload,
    AssistantMessage,
    TextContent,
    TextFormat,
    ThinkingContent,
    ToolCall,
    ToolResult,
    ToolResultMessage,
    TurnId,
    Usage,
    UserMessage,
)
from ..model import ChildLoopRef, LoopEvent, LoopRecord, LoopStatus, Session, SpawnRef, Turn
from ..recorder import SessionRecorder
from ..saver import SessionSaver
from .base import LoopStarts, SessionStore, SessionSummary, UsageTotal, merge_sessions, summarize
from .outline import PROMPT_CHARS, session_outline
from .query import LOOP_STATUSES, GroupBy, Order, PageCursor, PruneCriteria, SessionQuery
from .search import SearchHit

__all__ = [
    "EXAMPLES_DIR",
    "INVALID_SESSION_IDS",
    "StoreConformance",
    "at",
    "calls_loop",
    "conversation_loop",
    "cut_loop",
    "cut_streams",
    "make_loop",
    "make_session",
    "record_lines",
    "reported_usage",
    "save_in_parts",
    "spawned_apart",
]


def _spec_dir() -> Path:
    configured = os.environ.get("PHI_SESSION_SPEC_DIR")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[3].parent / "shared" / "spec"  # src/phi_session/stores/


EXAMPLES_DIR = _spec_dir() / "examples"
EXAMPLE_SESSIONS = sorted(EXAMPLES_DIR.glob("session-*.json"))

INVALID_SESSION_IDS = ("", ".", "..", "../x", "a/b", "/abs", "a\\b", "nul\x00byte", ".hidden", "x" * 201)


def _approx(value: float) -> Any:
    import pytest

    return pytest.approx(value)


def _raises(expected: type[BaseException], match: str | None = None) -> AbstractContextManager[Any]:
    import pytest  # only the tests need pytest, not importing this module

    return pytest.raises(expected, match=match)


def _examples() -> list[Path]:
    """phi-core's example sessions; the calling test is skipped without them."""
    if not EXAMPLE_SESSIONS:
        import pytest

        pytest.skip(f"phi-core reference data not found at {EXAMPLES_DIR} (set PHI_SESSION_SPEC_DIR)")
    return EXAMPLE_SESSIONS


_BASE_NS = Timestamp.parse("2024-05-01T12:00:00Z").ns


def at(seconds: float) -> Timestamp:
    """2024-05-01T12:00:00Z plus `seconds`, to the nanosecond."""
    return Timestamp.from_ns(_BASE_NS + round(seconds * 1_000_000_000))


def make_loop(
    session_id: str,
    index: int,
    *,
    agent_id: str = "agent",
    status: LoopStatus = "Completed",
    tokens: int = 0,
    model: str | None = "openai/gpt-4o",
    events: int = 0,
    started_at: Timestamp | None = None,
    parent_index: int | None = None,
) -> LoopRecord:
    """Loop ``{session_id}.cfg.{index}`` run by `model` (``provider/model``; None: no config).

    It carries `events` progress events and `tokens` total tokens; a finished loop
    ends half a second after it starts. `parent_index` makes it a continuation of
    loop `parent_index` of the same session.
    """
    start = started_at if started_at is not None else at(index)
    config = None
    if model is not None:
        provider, _, name = model.partition("/")
        config = LoopConfigSnapshot(model=name, provider=provider, config_id="cfg")
    record = LoopRecord.start(
        loop_id=f"{session_id}.cfg.{index}",
        session_id=session_id,
        agent_id=agent_id,
        started_at=start,
        config=config,
        status=status,
        parent_loop_id=None if parent_index is None else f"{session_id}.cfg.{parent_index}",
    )
    if status not in ("Running", "Pending"):
        record.ended_at = Timestamp.from_ns(start.ns + 500_000_000)
    record.usage = Usage(input=tokens - tokens // 4, output=tokens // 4, total_tokens=tokens)
    record.events = tuple(
        LoopEvent(
            sequence=n,
            event=ProgressMessage(
                loop_id=record.loop_id, tool_call_id=f"call-{n}", tool_name="step", text=f"step {n}"
            ),
        )
        for n in range(events)
    )
    return record


def make_session(
    session_id: str,
    agent_id: str = "agent",
    *,
    loops: Sequence[LoopRecord] | None = None,
    created_at: Timestamp | None = None,
    last_active_at: Timestamp | None = None,
    parent_session_id: str | None = None,
) -> Session:
    """A session of `agent_id` holding `loops` (default: one completed loop).

    `created_at` defaults to `at(0)`, `last_active_at` to `created_at`; with
    `parent_session_id` it is a sub-agent session spawned from that session.
    """
    created = created_at if created_at is not None else at(0)
    if loops is None:
        loops = [make_loop(session_id, 1, agent_id=agent_id, started_at=created)]
    spawn = None
    if parent_session_id is not None:
        spawn = SpawnRef(
            parent_session_id=parent_session_id,
            parent_loop_id=f"{parent_session_id}.cfg.1",
            tool_call_id="call-spawn",
            tool_name="delegate",
        )
    return Session(
        session_id=session_id,
        agent_id=agent_id,
        created_at=created,
        last_active_at=last_active_at if last_active_at is not None else created,
        formation=SessionFormation.first_loop(created),
        parent_spawn_ref=spawn,
        loops=list(loops),
    )


def talking_loop(
    session_id: str, index: int, said: str, *, agent_id: str = "agent", started_at: Timestamp | None = None
) -> LoopRecord:
    """`make_loop` whose conversation is a prompt, one turn (thinking, text, a tool call) and a tool
    result: the user asks ``Please {said}``, the model thinks ``plan {said}``, answers ``done {said}``,
    calls ``lookup`` with ``{"q": "{said} args"}``, and the tool returns ``result {said}``."""
    record = make_loop(session_id, index, agent_id=agent_id, started_at=started_at)
    turn_id = TurnId(loop_id=record.loop_id, turn_index=0)
    record.messages = (
        UserMessage(content=(TextContent(text=f"Please {said}"),), timestamp=0),
        AssistantMessage(
            content=(
                ThinkingContent(thinking=f"plan {said}"),
                TextContent(text=f"done {said}"),
                ToolCall(id="call-1", name="lookup", arguments={"q": f"{said} args"}),
            ),
            stop_reason="toolUse",
            model="gpt-4o",
            provider="openai",
            usage=ZERO_USAGE,
            timestamp=0,
            turn_id=turn_id,
        ),
        ToolResultMessage(
            tool_call_id="call-1",
            tool_name="lookup",
            content=(TextContent(text=f"result {said}"),),
            is_error=False,
            timestamp=0,
            turn_id=turn_id,
        ),
    )
    return record


def cut_loop(session_id: str, index: int, said: str) -> LoopRecord:
    """`talking_loop` cut off before its end (its process died): ``Aborted``, without
    messages (they come with ``AgentEnd``), what was said only in its ``TurnStart`` and
    ``MessageEnd`` events, whose messages phi-core writes without a ``turnId``."""
    record = make_loop(session_id, index, status="Aborted")
    ends = [
        MessageEnd(loop_id=record.loop_id, message=msgspec.structs.replace(message, turn_id=None))
        for message in talking_loop(session_id, index, said).messages
    ]
    events: list[AgentEvent] = [
        TurnStart(loop_id=record.loop_id, turn_index=0, timestamp=at(1), triggered_by="User"),
        *ends,
    ]
    record.events = tuple(LoopEvent(sequence=n, event=event) for n, event in enumerate(events))
    return record


TIERED_MODEL = "google/gemini-2.5-pro"
"""A model whose table price per token doubles above 200k input tokens of one request."""
TIERED_CALL = Usage(input=150_000, output=1_000, total_tokens=151_000)
"""A call below that tier: two of them, priced as one call, would cross it."""


def conversation_loop(session_id: str, index: int, *, finished: bool) -> LoopRecord:
    """Loop `index` of a conversation (a continuation of the one before), finished or as a
    running snapshot. Each says something of its own and repeats the first loop's question;
    the snapshot also holds a draft that the finished loop no longer has, and that is what
    another loop of the five says (a message a replaced version no longer uses, and another
    loop still does)."""
    question = UserMessage(content=(TextContent(text="the question"),), timestamp=1)
    own = UserMessage(content=(TextContent(text=f"answer {index}"),), timestamp=2)
    draft = UserMessage(content=(TextContent(text=f"answer {index % 5 + 1}"),), timestamp=2)
    status: LoopStatus = "Completed" if finished else "Running"
    record = make_loop(session_id, index, status=status, started_at=at(index), parent_index=index - 1 or None)
    said = (question, own) if finished else (question, draft)
    record.events = tuple(
        LoopEvent(sequence=n, event=MessageEnd(loop_id=record.loop_id, message=message))
        for n, message in enumerate(said)
    )
    return record


def save_in_parts(
    store: SessionStore, session_id: str, parts: Sequence[Sequence[tuple[int, bool]]]
) -> Session:
    """Save `parts` of the conversation `session_id` (each a list of (loop index 1-5,
    finished), `conversation_loop`) one after the other into `store`; what merging them gives."""
    expected: Session | None = None
    for part in parts:
        loops = [conversation_loop(session_id, index, finished=finished) for index, finished in part]
        incoming = make_session(session_id, loops=loops)
        store.save(incoming)
        expected = incoming if expected is None else merge_sessions(expected, incoming)
    if expected is None:
        raise ValueError("no parts to save")
    return expected


def calls_loop(
    session_id: str,
    index: int,
    calls: Sequence[Usage],
    *,
    model: str | None = TIERED_MODEL,
    started_at: Timestamp | None = None,
    served_by: Sequence[str] = (),
) -> LoopRecord:
    """`make_loop` of `model` whose turns are one model call each, of the `calls` usages,
    a second apart; the loop's usage is their sum. Call ``n``'s reply names the
    ``provider/model`` ``served_by[n]`` (default: the loop's `model`)."""
    record = make_loop(session_id, index, model=model, started_at=started_at)
    usage = ZERO_USAGE
    for number, call in enumerate(calls):
        serving = served_by[number] if number < len(served_by) else model
        provider, _, name = (serving or "").partition("/")
        turn_id = TurnId(loop_id=record.loop_id, turn_index=number)
        start = Timestamp.from_ns(record.started_at.ns + number * 1_000_000_000)
        reply = AssistantMessage(
            content=(TextContent(text=f"reply {number}"),),
            stop_reason="stop",
            model=name,
            provider=provider,
            usage=call,
            timestamp=0,
            turn_id=turn_id,
        )
        turn = Turn(
            turn_id=turn_id,
            triggered_by="User" if number == 0 else "Continuation",
            usage=call,
            input_messages=(),
            output_message=reply,
            tool_results=(),
            started_at=start,
            ended_at=Timestamp.from_ns(start.ns + 500_000_000),
        )
        record.turns = (*record.turns, turn)
        usage = usage + call
    record.usage = usage
    return record


def _hit_places(hits: Sequence[SearchHit]) -> list[tuple[str, str, int | None, int, str]]:
    return [(hit.session_id, hit.loop_id, hit.turn_index, hit.message_index, hit.kind) for hit in hits]


def _turn_with_tagged_tool_result(session_id: str) -> list[AgentEvent]:
    """One loop, one turn, whose TurnEnd carries a tool result with a ``turnId``."""
    loop_id = f"{session_id}.cfg.1"
    turn_id = TurnId(loop_id=loop_id, turn_index=0)
    answer = AssistantMessage(
        content=(TextContent(text="done"),),
        stop_reason="stop",
        model="m",
        provider="p",
        usage=ZERO_USAGE,
        timestamp=1,
        turn_id=turn_id,
    )
    result = ToolResultMessage(
        tool_call_id="call-1",
        tool_name="step",
        content=(TextContent(text="ok"),),
        is_error=False,
        timestamp=1,
        turn_id=turn_id,
    )
    return [
        AgentStart(agent_id="agent", session_id=session_id, loop_id=loop_id, timestamp=at(0)),
        TurnStart(loop_id=loop_id, turn_index=0, timestamp=at(1), triggered_by="User"),
        TurnEnd(loop_id=loop_id, message=answer, usage=ZERO_USAGE, timestamp=at(2), tool_results=(result,)),
        AgentEnd(loop_id=loop_id, messages=(answer,), usage=ZERO_USAGE, timestamp=at(3)),
    ]


def _with_tool_result_turn_id(event: AgentEvent) -> bytes:
    """`event`'s JSON line, its TurnEnd tool results given their turnId back (encoders drop it)."""
    data = msgspec.json.decode(encode_event(event))
    if isinstance(event, TurnEnd):
        for item, message in zip(data["tool_results"], event.tool_results, strict=True):
            item["turnId"] = msgspec.to_builtins(message.turn_id)
    return msgspec.json.encode(data)


def cut_streams(examples: Path) -> Iterator[tuple[str, int, list[bytes]]]:
    """Every prefix of every ``events-*.jsonl`` stream in `examples`: (file name, events kept, lines)."""
    for path in sorted(examples.glob("events-*.jsonl")):
        lines = [line for line in path.read_bytes().split(b"\n") if line]
        for cut in range(len(lines) + 1):
            yield path.name, cut, lines[:cut]


def reported_usage(lines: Sequence[bytes]) -> Usage:
    """The usage the assistant messages of the ``MessageEnd`` events of `lines` reported: what
    a provider billed for them."""
    total = ZERO_USAGE
    for line in lines:
        event = decode_event(line, strict=False)
        if isinstance(event, MessageEnd) and isinstance(event.message, AssistantMessage):
            total = total + event.message.usage
    return total


def _sum(usages: Iterable[Usage]) -> Usage:
    total = ZERO_USAGE
    for usage in usages:
        total = total + usage
    return total


def record_lines(lines: Iterable[bytes]) -> list[Session]:
    """The sessions a `SessionRecorder` makes of JSON event `lines`, flushed at their end
    (a loop without its ``AgentEnd`` ``Aborted``)."""
    recorder = SessionRecorder()
    for line in lines:
        recorder.on_json(line)
    recorder.flush()
    return recorder.drain_completed()


def spawned_apart() -> tuple[list[AgentEvent], list[AgentEvent], list[Session]]:
    """A spawner's events and its sub-agent's, and the sessions one recorder makes of both."""

    def start(session_id: str, loop_id: str, seconds: float, parent: str | None = None) -> AgentStart:
        return AgentStart(
            agent_id="a", session_id=session_id, loop_id=loop_id, parent_loop_id=parent, timestamp=at(seconds)
        )

    def end(loop_id: str, seconds: float) -> AgentEnd:
        return AgentEnd(loop_id=loop_id, messages=(), usage=_usage(1), timestamp=at(seconds))

    spawned = ToolExecutionEnd(
        loop_id="p.c.1",
        tool_call_id="toolu_1",
        tool_name="researcher",
        result=ToolResult(content=(), child_loop_id="k.sub.1"),
        is_error=False,
    )
    sub_agent: list[AgentEvent] = [start("k", "k.sub.1", 1, parent="p.c.1"), end("k.sub.1", 2)]
    spawner: list[AgentEvent] = [start("p", "p.c.1", 0), spawned, end("p.c.1", 4)]
    recorder = SessionRecorder()
    recorder.record_all([spawner[0], *sub_agent, *spawner[1:]])
    recorder.flush()
    return spawner, sub_agent, recorder.drain_completed()


def _save_apart(store: SessionStore, first: str) -> list[Session]:
    """`spawned_apart` saved into `store` by two recorders (the ``first`` side's saved and
    linked first, or both saved before either reads); the sessions one recorder makes."""
    spawner, sub_agent, reference = spawned_apart()
    recorders = {"spawner": SessionRecorder(), "sub-agent": SessionRecorder()}
    recorders["spawner"].record_all(spawner)
    recorders["sub-agent"].record_all(sub_agent)

    def drain(side: str) -> None:
        if side == "sub-agent":  # through the async path
            asyncio.run(SessionSaver(store).adrain(recorders[side], flush=True))
        else:
            SessionSaver(store).drain(recorders[side], flush=True)

    if first != "both saved first":
        drain(first)
        drain("sub-agent" if first == "spawner" else "spawner")
        return reference
    read = store.load_outline
    reads: list[str] = []

    def sub_agent_saved_first(session_id: str) -> Any:
        reads.append(session_id)
        if reads == ["k"]:  # the spawner's read of the sub-agent: saved (and linked) meanwhile
            drain("sub-agent")
        return read(session_id)

    store.load_outline = sub_agent_saved_first  # type: ignore[method-assign]
    try:
        drain("spawner")
    finally:
        del store.load_outline
    assert reads == ["k", "p"]
    return reference


def _recorded_parallel() -> Session:
    """The session recorded from the spec's ``events-parallel.jsonl`` (loops with events)."""
    _examples()
    [session] = record_lines((EXAMPLES_DIR / "events-parallel.jsonl").read_bytes().splitlines())
    return session


def _usage(tokens: int) -> Usage:
    return make_loop("u", 1, tokens=tokens).usage


def _populate(store: SessionStore) -> dict[str, Session]:
    """Four sessions the query, totals and prune tests share.

    ====  =====  ===========  ======  ==================================================  ======
    id    agent  created      active  loops (status, model, tokens)                       parent
    ====  =====  ===========  ======  ==================================================  ======
    s1    alpha  at(0)        at(10)  Completed openai/gpt-4o 100                          -
    s2    alpha  next day     +20 s   Completed anthropic/claude-sonnet-4-5 300,           -
                                      Aborted openai/gpt-4o 50
    s3    beta   at(30)       at(30)  Running, no config, 10                               s1
    s4    beta   at(40)       at(40)  Rejected anthropic/claude-sonnet-4-5 0               s1
    ====  =====  ===========  ======  ==================================================  ======

    Newest first: s2, s4, s3, s1. By tokens: s2 (350), s1 (100), s3 (10), s4 (0).
    """
    day = 86_400
    sessions = [
        make_session(
            "s1",
            "alpha",
            created_at=at(0),
            last_active_at=at(10),
            loops=[make_loop("s1", 1, agent_id="alpha", tokens=100, started_at=at(0))],
        ),
        make_session(
            "s2",
            "alpha",
            created_at=at(day),
            last_active_at=at(day + 20),
            loops=[
                make_loop(
                    "s2",
                    1,
                    agent_id="alpha",
                    tokens=300,
                    model="anthropic/claude-sonnet-4-5",
                    started_at=at(day),
                ),
                make_loop("s2", 2, agent_id="alpha", status="Aborted", tokens=50, started_at=at(day + 10)),
            ],
        ),
        make_session(
            "s3",
            "beta",
            created_at=at(30),
            parent_session_id="s1",
            loops=[
                make_loop(
                    "s3", 1, agent_id="beta", status="Running", tokens=10, model=None, started_at=at(30)
                )
            ],
        ),
        make_session(
            "s4",
            "beta",
            created_at=at(40),
            parent_session_id="s1",
            loops=[
                make_loop(
                    "s4",
                    1,
                    agent_id="beta",
                    status="Rejected",
                    model="anthropic/claude-sonnet-4-5",
                    started_at=at(40),
                )
            ],
        ),
    ]
    for session in sessions:
        store.save(session)
    return {session.session_id: session for session in sessions}


def _ids(rows: Sequence[SessionSummary]) -> list[str]:
    return [row.session_id for row in rows]


def _loop_ids(session: Session) -> list[str]:
    return [record.loop_id for record in session.loops]


class StoreConformance:
    """Subclass with a ``store`` fixture yielding a fresh store of the backend under test,
    and `open_read_only` if the backend has a read-only mode."""

    def open_read_only(self, store: SessionStore) -> SessionStore:
        """The store `store` is, opened read-only (the test is skipped without one)."""
        import pytest

        pytest.skip(f"{type(store).__name__} has no read-only mode")

    # -- basics -----------------------------------------------------------------------

    def test_is_a_session_store(self, store: SessionStore) -> None:
        assert isinstance(store, SessionStore)

    def test_empty_store(self, store: SessionStore) -> None:
        assert store.list_ids() == []
        assert store.list_for_agent("agent") == []
        assert store.query() == []
        assert store.usage_totals() == []
        assert store.prune(PruneCriteria(keep_last=0)) == 0

    def test_missing_session(self, store: SessionStore) -> None:
        store.save(make_session("present"))
        with _raises(SessionNotFound):
            store.load("absent")
        with _raises(SessionNotFound):
            store.delete("absent")
        assert store.list_ids() == ["present"]

    def test_invalid_ids_are_rejected_everywhere(self, store: SessionStore) -> None:
        for bad_id in INVALID_SESSION_IDS:
            with _raises(InvalidSessionId):
                store.save(make_session(bad_id))
            with _raises(InvalidSessionId):
                store.load(bad_id)
            with _raises(InvalidSessionId):
                store.delete(bad_id)
            with _raises(InvalidSessionId):
                asyncio.run(store.asave(make_session(bad_id)))
            with _raises(InvalidSessionId):
                asyncio.run(store.aload(bad_id))
            with _raises(InvalidSessionId):
                asyncio.run(store.adelete(bad_id))
        assert store.list_ids() == []

    def test_arguments_of_the_wrong_type_raise_type_error(self, store: SessionStore) -> None:
        for wrong in (None, 1, b"session", {"session_id": "s"}, "s"):
            with _raises(TypeError, match="session must be Session"):
                store.save(wrong)  # type: ignore[arg-type]
            with _raises(TypeError):
                asyncio.run(store.asave(wrong))  # type: ignore[arg-type]
            if wrong is not None:  # None asks for every session
                with _raises(TypeError, match="query must be SessionQuery"):
                    store.query(wrong)  # type: ignore[arg-type]
            with _raises(TypeError, match="criteria must be PruneCriteria"):
                store.prune(wrong)  # type: ignore[arg-type]
            if not isinstance(wrong, str):
                with _raises(TypeError, match="session id must be str"):
                    store.load(wrong)  # type: ignore[arg-type]
                with _raises(TypeError, match="session id must be str"):
                    store.delete(wrong)  # type: ignore[arg-type]
                with _raises(TypeError, match="^agent_id must be str, not "):
                    store.list_for_agent(wrong)  # type: ignore[arg-type]
        with _raises(TypeError, match="group_by must be str"):
            store.usage_totals(None)  # type: ignore[arg-type]
        assert store.list_ids() == []

    def test_a_read_only_store_refuses_every_write(self, store: SessionStore) -> None:
        store.save(make_session("kept"))
        reader = self.open_read_only(store)
        try:
            for write, action in (
                (lambda: reader.save(make_session("new")), "save session 'new'"),
                (lambda: asyncio.run(reader.asave(make_session("new"))), "save session 'new'"),
                (lambda: reader.delete("kept"), "delete session 'kept'"),
                (lambda: reader.delete("absent"), "delete session 'absent'"),
                (lambda: reader.prune(PruneCriteria(keep_last=0)), "prune"),
            ):
                with _raises(StoreError) as caught:
                    write()
                assert str(caught.value) == f"{reader!r} is open read-only: cannot {action}"
            assert reader.list_ids() == store.list_ids() == ["kept"]
        finally:
            reader.close()

    # -- round trips ------------------------------------------------------------------

    def test_example_sessions_round_trip(self, store: SessionStore) -> None:
        for path in _examples():
            data = path.read_bytes()
            session = decode_session(data)
            store.save(session)
            assert encode_session(store.load(session.session_id)) == data, path.name

    def test_recorded_session_round_trip(self, store: SessionStore) -> None:
        session = _recorded_parallel()
        store.save(session)
        assert encode_session(store.load(session.session_id)) == encode_session(session)

    def test_plain_form_metadata_round_trip(self, store: SessionStore) -> None:
        # A TurnEnd's tool results are plain-form messages: phi-core gives them no
        # turnId. One given anyway (by a producer's JSON or its own objects) is dropped
        # on every path, so what is saved encodes as what is loaded.
        for feed in ("on_json", "on_event"):
            session_id = f"plain-{feed}"
            recorder = SessionRecorder()
            for event in _turn_with_tagged_tool_result(session_id):
                if feed == "on_json":
                    recorder.on_json(_with_tool_result_turn_id(event))
                else:
                    recorder.on_event(event)
            recorder.flush()
            [session] = recorder.drain_completed()
            store.save(session)
            assert encode_session(store.load(session_id)) == encode_session(session), feed

    def test_text_holding_lone_surrogates_is_saved_escaped(self, store: SessionStore, caplog: Any) -> None:
        # Text decoded from undecodable bytes (`os.listdir`, ``surrogateescape``) holds lone
        # surrogates, which UTF-8 refuses: saved directly, the session is kept with them
        # escaped, as phi-session's JSON writes them, rather than refused.
        recorder = SessionRecorder()
        agent = AgentSession("agent-\udcff", session_id="surrogates")
        with Tracer(agent, sinks=[recorder]).loop(LoopConfigSnapshot(model="m-\udcfe", provider="p")) as loop:
            loop.user("list caf\udce9/")
            with loop.turn() as turn:
                call = ToolCall(id="c1", name="ls", arguments={"path\udcff": ["caf\udce9/"]})
                with turn.assistant() as reply:
                    reply.finish("looking \udcff", tool_calls=[call])
                with turn.tool(call) as tool:
                    tool.result("r\udce9sum\udce9.txt")
        recorder.flush()
        [session] = recorder.drain_completed()
        store.save(session)
        loaded = store.load("surrogates")
        assert loaded == without_lone_surrogates(session)
        assert encode_session(loaded) == encode_session(session)
        assert [row.agent_id for row in store.query()] == ["agent-\\xed\\xb3\\xbf"]
        # Found as the store encodes the session, not by encoding it once more first: said all the same.
        assert "session surrogates holds text no store accepts" in caplog.text

    def test_saving_text_holding_lone_surrogates_again_adds_nothing(self, store: SessionStore) -> None:
        # The stored copy holds them escaped: merged raw, the same session saved again
        # read as new links and events (inside a record) or loops (in an id) on every save.
        linked = make_loop("resurrogate", 1)
        linked.children_loop_ids = ("resurrogate.cfg\udc80.9",)
        linked.child_loop_refs = (
            ChildLoopRef(
                tool_call_id="c", tool_name="ls \udc80", child_loop_id="k.c.1", child_session_id="k"
            ),
        )
        renamed = make_loop("resurrogate", 2, parent_index=1)
        renamed.loop_id = "resurrogate.cfg\udc80.2"
        inside = make_session("resurrogate", loops=[linked])
        inside.session_events = [
            ProgressMessage(loop_id="x", tool_call_id="c", tool_name="t", text="caf\udce9")
        ]
        named = make_session("resurrogate-id", loops=[renamed])
        for session in (inside, named):
            for _ in range(3):
                store.save(session)
            assert encode_session(store.load(session.session_id)) == encode_session(session)

    def test_built_session_round_trip(self, store: SessionStore) -> None:
        session = make_session(
            "built",
            loops=[
                make_loop("built", 1, tokens=42, events=3),
                make_loop("built", 2, status="Aborted", model=None, parent_index=1),
                make_loop("built", 3, status="Running", model="anthropic/claude-sonnet-4-5", events=1),
            ],
            parent_session_id="origin",
        )
        store.save(session)
        loaded = store.load("built")
        assert loaded == session
        assert encode_session(loaded) == encode_session(session)

    def test_nanosecond_timestamps_are_preserved(self, store: SessionStore) -> None:
        created = Timestamp.parse("2024-05-01T12:00:00.123456789Z")
        started = Timestamp.parse("2024-05-01T12:00:00.000000001Z")
        session = make_session(
            "ns",
            created_at=created,
            last_active_at=Timestamp.parse("2024-05-01T12:00:01.100200300Z"),
            loops=[make_loop("ns", 1, started_at=started)],
        )
        store.save(session)
        loaded = store.load("ns")
        assert str(loaded.created_at) == "2024-05-01T12:00:00.123456789Z"
        assert str(loaded.last_active_at) == "2024-05-01T12:00:01.100200300Z"
        assert str(loaded.loops[0].started_at) == "2024-05-01T12:00:00.000000001Z"
        assert str(loaded.loops[0].ended_at) == "2024-05-01T12:00:00.500000001Z"

    def test_unsigned_64_bit_counts_and_extreme_instants_stay_exact(self, store: SessionStore) -> None:
        # phi-core's token counters and message timestamps are u64, its instants reach years
        # 1 to 9999: what overflows a SQL column is never lost from the session nor the sums.
        huge = 2**64 - 1
        call = Usage(
            input=huge, output=huge, reasoning=huge, cache_read=huge, cache_write=huge, total_tokens=huge
        )
        calls = calls_loop(
            "u64",
            1,
            [call, call],
            model="openai/gpt-4o",
            served_by=["openai/gpt-4o", "openai/gpt-4o-2024-08-06"],
        )
        calls.messages = (UserMessage(content=(TextContent(text="count"),), timestamp=huge),)
        late = make_loop("u64", 2, started_at=Timestamp.parse("9999-12-31T23:59:58.999999999Z"))
        late.usage = call
        session = make_session(
            "u64",
            created_at=Timestamp.parse("0001-01-01T00:00:00Z"),
            last_active_at=Timestamp.parse("9999-12-31T23:59:59.999999999Z"),
            loops=[calls, late],
        )
        store.save(session)
        store.save(make_session("small", loops=[make_loop("small", 1, tokens=7)]))
        assert encode_session(store.load("u64")) == encode_session(session)
        assert store.load_outline("u64") == session_outline(session)
        assert [encode_loop(loop) for loop in store.load_loops("u64", 0, 2)] == list(
            map(encode_loop, session.loops)
        )
        rows = {row.session_id: row for row in store.query()}
        assert rows["u64"] == summarize(session) and rows["u64"].total_tokens == 3 * huge
        # Counts either side of the signed 64-bit bound sort and filter by their exact value.
        for session_id, tokens in (("signed", 2**63 - 1), ("over", 2**63)):
            store.save(make_session(session_id, loops=[make_loop(session_id, 1, tokens=tokens)]))
        by_tokens = ["u64", "over", "signed", "small"]
        assert _ids(store.query(SessionQuery(order="tokens"))) == by_tokens
        assert _ids(store.query(SessionQuery(order="tokens", limit=2))) == by_tokens[:2]
        assert _ids(store.query(SessionQuery(min_tokens=2**63, order="tokens"))) == ["u64", "over"]
        assert _ids(store.query(SessionQuery(min_tokens=3 * huge))) == ["u64"]
        pages: list[str] = []
        cursor = None
        while page := store.query(SessionQuery(order="tokens", limit=1, after=cursor)):
            pages += _ids(page)
            cursor = PageCursor.after("tokens", page[0])
        assert pages == by_tokens
        others = _sum(make_loop("o", 1, tokens=tokens).usage for tokens in (7, 2**63 - 1, 2**63))
        assert [(row.key, row.usage) for row in store.usage_totals("model")] == [
            ("openai/gpt-4o", call + late.usage + others),
            ("openai/gpt-4o-2024-08-06", call),
        ]
        assert [(row.key, row.usage) for row in store.usage_totals("day")] == [
            ("0001-01-01", session.billed_usage()),
            ("2024-05-01", others),
        ]
        pricer = Pricer({"gpt-4o": {"input": 1, "output": 1}}, use_table=False)
        [total] = store.usage_totals("agent", pricer=pricer)
        assert total.usage == session.billed_usage() + others
        expected = pricer.session(session).usd
        assert isinstance(total.cost, Cost) and expected is not None
        assert total.cost.usd == _approx(expected + (others.input + others.output) / 1e6)

    def test_loaded_session_is_independent_of_the_store(self, store: SessionStore) -> None:
        session = make_session("own")
        store.save(session)
        session.loops.append(make_loop("own", 2))
        loaded = store.load("own")
        assert _loop_ids(loaded) == ["own.cfg.1"]
        loaded.loops.clear()
        assert _loop_ids(store.load("own")) == ["own.cfg.1"]

    # -- listing and deleting ---------------------------------------------------------

    def test_list_ids_most_recently_saved_first(self, store: SessionStore) -> None:
        for session_id in ("b", "c", "a"):
            store.save(make_session(session_id))
        assert store.list_ids() == ["a", "c", "b"]
        store.save(make_session("b", loops=[make_loop("b", 2)]))
        assert store.list_ids() == ["b", "a", "c"]

    def test_delete(self, store: SessionStore) -> None:
        store.save(make_session("keep"))
        store.save(make_session("drop"))
        store.delete("drop")
        with _raises(SessionNotFound):
            store.load("drop")
        assert store.list_ids() == ["keep"]
        with _raises(SessionNotFound):
            store.delete("drop")
        store.save(make_session("drop", loops=[make_loop("drop", 7)]))
        assert _loop_ids(store.load("drop")) == ["drop.cfg.7"]  # nothing of the deleted one is merged

    def test_list_for_agent(self, store: SessionStore) -> None:
        store.save(make_session("x1", "x"))
        store.save(make_session("y1", "y"))
        store.save(make_session("x2", "x"))
        sessions = store.list_for_agent("x")
        assert [s.session_id for s in sessions] == ["x2", "x1"]
        assert all(s.agent_id == "x" for s in sessions)
        assert store.list_for_agent("nobody") == []

    # -- merge on save ----------------------------------------------------------------

    def test_save_merges_with_the_stored_session(self, store: SessionStore) -> None:
        store.save(
            make_session(
                "m", loops=[make_loop("m", 1, events=2), make_loop("m", 2, status="Running", events=1)]
            )
        )
        store.save(
            make_session("m", loops=[make_loop("m", 2, events=4, tokens=9), make_loop("m", 3, events=1)])
        )
        loaded = store.load("m")
        assert _loop_ids(loaded) == ["m.cfg.1", "m.cfg.2", "m.cfg.3"]
        assert loaded.loops[1].status == "Completed"
        assert len(loaded.loops[1].events) == 4
        assert loaded.loops[1].usage.total_tokens == 9

    def test_running_snapshot_never_replaces_a_completed_loop(self, store: SessionStore) -> None:
        store.save(make_session("r", loops=[make_loop("r", 1, events=2)]))
        store.save(make_session("r", loops=[make_loop("r", 1, status="Running", events=5)]))
        [record] = store.load("r").loops
        assert record.status == "Completed"
        assert len(record.events) == 2

    def test_merge_widens_the_session_times(self, store: SessionStore) -> None:
        store.save(make_session("t", created_at=at(10), last_active_at=at(50)))
        store.save(make_session("t", created_at=at(5), last_active_at=at(20)))
        loaded = store.load("t")
        assert (loaded.created_at, loaded.last_active_at) == (at(5), at(50))

    def test_saving_the_same_session_again_changes_nothing(self, store: SessionStore) -> None:
        session = make_session("same", loops=[make_loop("same", 1, events=2), make_loop("same", 2)])
        store.save(session)
        store.save(session)
        assert encode_session(store.load("same")) == encode_session(session)

    def test_compaction_passes_starting_at_their_loops_instant_are_records_of_their_own(
        self, store: SessionStore
    ) -> None:
        # A producer's clock of ms: a loop and two compaction passes reusing its id (phi-core's
        # BasicAgent) all start at one instant, each drained and saved on its own. The merge
        # knew a record by its start: a pass replaced the loop's record (or was dropped).
        def records(session_id: str) -> list[LoopRecord]:
            loop = make_loop(session_id, 1, events=2, started_at=at(0))
            loop.ended_at = at(0)
            loop.children_loop_ids = (loop.loop_id,)  # its passes (phi-core links them)
            passes = []
            for ended in (at(0), at(0.001)):
                compaction = make_loop(session_id, 1, events=1, started_at=at(0), parent_index=1, model=None)
                compaction.continuation_kind, compaction.ended_at = COMPACTION, ended
                passes.append(compaction)
            return [loop, *passes]

        whole = make_session("instant", loops=records("instant"))
        store.save(whole)
        assert encode_session(store.load("instant")) == encode_session(whole)
        loop, first_pass, second_pass = records("instants")
        running = msgspec.structs.replace(first_pass, status="Running", ended_at=None, events=())
        for part in ([loop], [running], [first_pass], [second_pass]):  # a snapshot, then its pass
            store.save(make_session("instants", loops=part))
        expected = encode_session(make_session("instants", loops=[loop, first_pass, second_pass]))
        assert encode_session(store.load("instants")) == expected  # as if saved whole
        for part in ([second_pass], [loop], [first_pass], [loop, first_pass, second_pass]):
            store.save(make_session("instants", loops=part))  # each again: no record twice
        assert encode_session(store.load("instants")) == expected
        # The second pass still running when its recorder closed, saved Aborted with no end:
        # having none matched any end, it was taken for the first pass, which outweighed it.
        loop, first_pass, second_pass = records("cut")
        cut_short = msgspec.structs.replace(second_pass, status="Aborted", ended_at=None)
        running = msgspec.structs.replace(second_pass, status="Running", ended_at=None, events=())
        for part in ([loop], [first_pass], [running], [cut_short]):  # a checkpoint at each change
            store.save(make_session("cut", loops=part))
        expected = encode_session(make_session("cut", loops=[loop, first_pass, cut_short]))
        assert encode_session(store.load("cut")) == expected
        for part in ([cut_short], [running], [first_pass], [loop, first_pass, cut_short]):
            store.save(make_session("cut", loops=part))
        assert encode_session(store.load("cut")) == expected

    def test_saving_plain_form_metadata_again_changes_nothing(self, store: SessionStore) -> None:
        # A request's history may carry agent metadata (a turnId) that encoders drop: the
        # stored copy lacks it, and the same loop saved again is not a changed one (a
        # changed child would be linked into its parent's children_loop_ids).
        parent, child = make_loop("replain", 1), make_loop("replain", 2, parent_index=1)
        turn_id = TurnId(loop_id=child.loop_id, turn_index=0)
        hello = UserMessage(content=(TextContent(text="hi"),), timestamp=0, turn_id=turn_id)
        payload = AnnotatedRequestPayload(
            system_prompt="s",
            messages=(hello,),
            provenance=(),
            tools=(),
            model_id="m",
            thinking_level="off",
            response_format=TextFormat(),
        )
        child.turns = (
            Turn(
                turn_id=turn_id,
                triggered_by="User",
                usage=ZERO_USAGE,
                input_messages=(),
                output_message=hello,
                tool_results=(),
                started_at=at(2),
                ended_at=at(2),
                request_payload=payload,
            ),
        )
        session = make_session("replain", loops=[parent, child])
        store.save(session)
        store.save(session)
        assert encode_session(store.load("replain")) == encode_session(session)

    def test_a_sub_agent_recorded_apart_from_its_spawner_gets_its_tool_call(
        self, store: SessionStore
    ) -> None:
        # Two recorders, each saving through a saver of its own: the spawner's side and the
        # sub-agent's each read the other's end once saved, whichever is saved first (or
        # both before either reads), and the store ends as one recorder would leave it.
        for order in ("spawner", "sub-agent", "both saved first"):
            reference = _save_apart(store, order)
            for session in reference:
                assert encode_session(store.load(session.session_id)) == encode_session(session), order
                store.delete(session.session_id)

    def test_drained_and_continued_session_loses_nothing(self, store: SessionStore) -> None:
        _examples()
        # events-basic: loop .1 ends at line 21, its continuation .2 follows.
        lines = (EXAMPLES_DIR / "events-basic.jsonl").read_bytes().splitlines()
        recorder = SessionRecorder()
        for line in lines[:21]:
            recorder.on_json(line)
        assert recorder.checkpoint() == 1
        for session in recorder.drain_completed():
            store.save(session)
        for line in lines[21:]:
            recorder.on_json(line)
        recorder.flush()
        for session in recorder.drain_completed():
            store.save(session)
        expected = (EXAMPLES_DIR / "session-basic.json").read_bytes()
        assert encode_session(store.load(decode_session(expected).session_id)) == expected

    def test_saves_in_parts_hold_what_merging_them_gives(self, store: SessionStore) -> None:
        # Running snapshots replaced by finished loops, loops saved again, parents linked
        # later, in several orders: a store that reads only part of what it holds (the
        # loops a save may change) must give what merging the whole parts gives.
        cases = [
            [
                [(1, False)],
                [(1, True)],
                [(2, False), (3, True)],
                [(2, True)],
                [(4, True), (5, False)],
                [(5, True)],
            ],
            [[(3, True)], [(1, True)], [(2, False)], [(5, True), (4, False)], [(2, True), (4, True)]],
            [[(1, True), (2, True), (3, True)], [(3, False)], [(2, True)], [(1, False), (5, True)]],
        ]
        for n, parts in enumerate(cases):
            session_id = f"parts{n}"
            expected = save_in_parts(store, session_id, parts)
            assert encode_session(store.load(session_id)) == encode_session(expected), parts
            assert [row for row in store.query() if row.session_id == session_id] == [summarize(expected)]

    def test_a_parent_saved_after_its_child_is_linked_to_it(self, store: SessionStore) -> None:
        # A continuation whose trace was exported before its parent's.
        store.save(make_session("late", loops=[make_loop("late", 1), make_loop("late", 3, parent_index=2)]))
        store.save(make_session("late", loops=[make_loop("late", 2, parent_index=1)]))
        assert [(r.loop_id, r.children_loop_ids) for r in store.load("late").loops] == [
            ("late.cfg.1", ("late.cfg.2",)),
            ("late.cfg.3", ()),
            ("late.cfg.2", ("late.cfg.3",)),
        ]

    def test_loop_ids_holding_nul_merge_as_any_other(self, store: SessionStore) -> None:
        # PostgreSQL text cannot hold NUL: its loop id column shows U+FFFD, where the merge
        # read which stored loops a save touches, so the stored loop went unread, a copy
        # was appended at each save and a child was not linked into its parent.
        def loop(mark: str, index: int, **options: Any) -> LoopRecord:
            record = make_loop("nulid", index, **options)
            parent = record.parent_loop_id
            return msgspec.structs.replace(
                record,
                loop_id=record.loop_id.replace(".cfg.", f".c{mark}fg."),
                parent_loop_id=None if parent is None else parent.replace(".cfg.", f".c{mark}fg."),
            )

        parts = [
            [loop("\x00", 1, status="Running")],
            [loop("\x00", 1, tokens=10)],
            [loop("\ufffd", 1, tokens=5)],  # another loop, whose column text is the same
            [loop("\x00", 1, tokens=10)],  # the same save again
            [loop("\x00", 2, parent_index=1)],
        ]
        expected: Session | None = None
        for part in parts:
            incoming = make_session("nulid", loops=part)
            store.save(incoming)
            expected = incoming if expected is None else merge_sessions(expected, incoming)
        assert expected is not None
        loaded = store.load("nulid")
        assert [(r.loop_id, r.status, r.usage.total_tokens, r.children_loop_ids) for r in loaded.loops] == [
            ("nulid.c\x00fg.1", "Completed", 10, ("nulid.c\x00fg.2",)),
            ("nulid.c\ufffdfg.1", "Completed", 5, ()),
            ("nulid.c\x00fg.2", "Completed", 0, ()),
        ]
        assert encode_session(loaded) == encode_session(expected)
        [summary] = store.query()
        assert (summary.loop_count, summary.usage.total_tokens) == (3, 15)

    def test_concurrent_saves_of_one_session_lose_no_loop(self, store: SessionStore) -> None:
        writers = 8
        barrier = threading.Barrier(writers)
        errors: list[BaseException] = []

        def write(index: int) -> None:
            try:
                barrier.wait()
                store.save(make_session("shared", loops=[make_loop("shared", index)]))
            except BaseException as error:  # reported below, with the thread's traceback
                errors.append(error)

        threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert sorted(_loop_ids(store.load("shared"))) == sorted(f"shared.cfg.{i}" for i in range(writers))

    # -- async twins ------------------------------------------------------------------

    def test_async_twins(self, store: SessionStore) -> None:
        async def scenario() -> None:
            await store.asave(make_session("a1", "x"))
            await store.asave(make_session("a2", "y"))
            assert _loop_ids(await store.aload("a1")) == ["a1.cfg.1"]
            assert await store.alist_ids() == ["a2", "a1"]
            assert [s.session_id for s in await store.alist_for_agent("y")] == ["a2"]
            await store.adelete("a2")
            assert await store.alist_ids() == ["a1"]
            with _raises(SessionNotFound):
                await store.aload("a2")

        asyncio.run(scenario())

    # -- query ------------------------------------------------------------------------

    def test_query_summary_rows(self, store: SessionStore) -> None:
        _populate(store)
        rows = {row.session_id: row for row in store.query()}
        s2 = rows["s2"]
        assert (s2.agent_id, s2.created_at, s2.last_active_at) == ("alpha", at(86_400), at(86_420))
        assert (s2.loop_count, s2.turn_count, s2.formation, s2.rejected) == (2, 0, "FirstLoop", False)
        assert s2.loops_by_status == {"Completed": 1, "Aborted": 1}
        assert s2.usage == _usage(300) + _usage(50)
        assert s2.models == ("anthropic/claude-sonnet-4-5", "openai/gpt-4o")
        assert s2.parent_session_id is None
        assert rows["s3"].parent_session_id == "s1"
        assert rows["s3"].models == ()

    def test_query_counts_loops_by_status_in_one_order(self, store: SessionStore) -> None:
        # A listing's JSON was the same on every store but for this dict's key order.
        session = make_session(
            "statuses", loops=[make_loop("statuses", 1), make_loop("statuses", 2, status="Running")]
        )
        store.save(session)
        (row,) = store.query()
        assert list(row.loops_by_status.items()) == [
            (status, 1) for status in LOOP_STATUSES if status in ("Completed", "Running")
        ]

    def test_query_order(self, store: SessionStore) -> None:
        _populate(store)
        assert _ids(store.query()) == ["s2", "s4", "s3", "s1"]
        assert _ids(store.query(SessionQuery(order="oldest"))) == ["s1", "s3", "s4", "s2"]
        assert _ids(store.query(SessionQuery(order="tokens"))) == ["s2", "s1", "s3", "s4"]
        assert _ids(store.query(None)) == _ids(store.query(SessionQuery(order="newest")))

    def test_query_ties_are_ordered_by_id(self, store: SessionStore) -> None:
        for session_id in ("b", "c", "a"):
            store.save(make_session(session_id, last_active_at=at(5)))
        assert _ids(store.query()) == ["a", "b", "c"]
        assert _ids(store.query(SessionQuery(order="oldest"))) == ["a", "b", "c"]
        assert _ids(store.query(SessionQuery(order="tokens"))) == ["a", "b", "c"]

    def test_query_limit(self, store: SessionStore) -> None:
        _populate(store)
        assert _ids(store.query(SessionQuery(limit=2))) == ["s2", "s4"]
        assert _ids(store.query(SessionQuery(limit=2, order="oldest"))) == ["s1", "s3"]
        assert store.query(SessionQuery(limit=0)) == []
        assert _ids(store.query(SessionQuery(limit=10))) == ["s2", "s4", "s3", "s1"]

    def test_query_pages_by_keyset(self, store: SessionStore) -> None:
        _populate(store)
        for session_id in ("t2", "t1", "t3"):  # ties in every order: paging must split them by id
            store.save(make_session(session_id, last_active_at=at(30)))
        for order in ("newest", "oldest", "tokens"):
            expected = _ids(store.query(SessionQuery(order=order)))
            for size in (1, 2, 3):
                pages: list[str] = []
                query: SessionQuery | None = SessionQuery(order=order, limit=size)
                while query is not None:
                    rows = store.query(query)
                    assert len(rows) <= size
                    pages += _ids(rows)
                    query = query.next_page(rows)
                assert pages == expected, (order, size)

    def test_query_page_cursor_with_filters_and_text_form(self, store: SessionStore) -> None:
        _populate(store)
        first = store.query(SessionQuery(agent_id="alpha", limit=1))
        assert _ids(first) == ["s2"]
        cursor = PageCursor.after("newest", first[0])
        assert PageCursor.parse(str(cursor)) == cursor
        rest = store.query(SessionQuery.from_strings({"agent": "alpha", "after": str(cursor)}))
        assert _ids(rest) == ["s1"]
        # A cursor past the end, or before the start of a descending order.
        assert store.query(SessionQuery(after=PageCursor("newest", -(2**70), ""))) == []
        assert _ids(store.query(SessionQuery(order="tokens", after=PageCursor("tokens", 2**70, "")))) == [
            "s2",
            "s1",
            "s3",
            "s4",
        ]

    def test_query_page_sees_no_shift_when_sessions_arrive(self, store: SessionStore) -> None:
        _populate(store)
        first = SessionQuery(limit=2)
        rows = store.query(first)
        store.save(make_session("new", last_active_at=at(86_400 * 3)))  # newer than everything
        following = first.next_page(rows)
        assert following is not None
        assert _ids(store.query(following)) == ["s3", "s1"]

    def test_query_pages_list_a_session_saved_again_at_its_new_place(self, store: SessionStore) -> None:
        # No snapshot: a session saved again between pages moves, the others stay once each.
        for n, session_id in enumerate("abcd"):
            store.save(make_session(session_id, last_active_at=at(n)))

        def walk(order: Order, resaved: str, seconds: int) -> list[str]:
            query: SessionQuery | None = SessionQuery(order=order, limit=2)
            assert query is not None
            rows = store.query(query)
            listed = _ids(rows)
            loop = make_loop(resaved, seconds, started_at=at(seconds), tokens=seconds)
            store.save(make_session(resaved, loops=[loop], last_active_at=at(seconds)))
            query = query.next_page(rows)
            while query is not None:
                rows = store.query(query)
                listed += _ids(rows)
                query = query.next_page(rows)
            return listed

        assert walk("newest", "a", 20) == ["d", "c", "b"]  # 'a' moved before the cursor: not listed
        assert walk("oldest", "b", 30) == ["b", "c", "d", "a", "b"]  # 'b' moved after it: twice
        assert walk("tokens", "d", 40) == ["b", "a", "c"]  # 'd' gained the most tokens: not listed

    def test_a_call_without_a_total_counts_its_tokens(self, store: SessionStore) -> None:
        # phi-core's Anthropic provider sets no total: such a session listed 0 tokens, was
        # missed by min_tokens and sorted last by tokens. It counts its calls' tokens.
        store.save(make_session("small", loops=[make_loop("small", 1, tokens=1_000)], last_active_at=at(2)))
        untotalled = Usage(input=100_000, output=2_000, cache_read=50_000)
        mixed = [untotalled, Usage(input=1_000, output=100, cache_read=400, total_tokens=1_100)]
        record = calls_loop("anthropic", 1, mixed, model="anthropic/claude-sonnet-4-5")
        store.save(make_session("anthropic", loops=[record], last_active_at=at(1)))
        counted = 152_000 + 1_100  # the second call's cache counted inside its input, once
        assert [(row.session_id, row.total_tokens) for row in store.query(SessionQuery(order="tokens"))] == [
            ("anthropic", counted),
            ("small", 1_000),
        ]
        assert _ids(store.query(SessionQuery(min_tokens=counted))) == ["anthropic"]
        totals = {total.key: total.usage.total_tokens for total in store.usage_totals("model")}
        assert totals["anthropic/claude-sonnet-4-5"] == counted
        assert store.load_outline("anthropic").loops[0].billed_usage.total_tokens == counted
        assert store.load("anthropic").loops[0].usage.total_tokens == 1_100  # as recorded

    def test_query_by_agent(self, store: SessionStore) -> None:
        _populate(store)
        assert _ids(store.query(SessionQuery(agent_id="alpha"))) == ["s2", "s1"]
        assert _ids(store.query(SessionQuery(agent_id="beta"))) == ["s4", "s3"]
        assert store.query(SessionQuery(agent_id="gamma")) == []

    def test_query_by_time(self, store: SessionStore) -> None:
        _populate(store)
        assert _ids(store.query(SessionQuery(since=at(30)))) == ["s2", "s4", "s3"]  # since is inclusive
        assert _ids(store.query(SessionQuery(until=at(40)))) == ["s3", "s1"]  # until is exclusive
        assert _ids(store.query(SessionQuery(since=at(30), until=at(40)))) == ["s3"]
        assert store.query(SessionQuery(since=at(86_421))) == []

    def test_query_by_status(self, store: SessionStore) -> None:
        _populate(store)
        assert _ids(store.query(SessionQuery(status="Completed"))) == ["s2", "s1"]
        assert _ids(store.query(SessionQuery(status="Aborted"))) == ["s2"]
        assert _ids(store.query(SessionQuery(status="Running"))) == ["s3"]
        assert _ids(store.query(SessionQuery(status="Rejected"))) == ["s4"]
        assert store.query(SessionQuery(status="Pending")) == []
        assert _ids(store.query(SessionQuery(status="completed"))) == ["s2", "s1"]  # any case

    def test_query_by_model(self, store: SessionStore) -> None:
        _populate(store)
        assert _ids(store.query(SessionQuery(model="openai/gpt-4o"))) == ["s2", "s1"]
        assert _ids(store.query(SessionQuery(model="gpt-4o"))) == ["s2", "s1"]
        assert _ids(store.query(SessionQuery(model="claude-sonnet-4-5"))) == ["s2", "s4"]
        assert store.query(SessionQuery(model="gpt")) == []  # names match whole, not as substrings
        assert store.query(SessionQuery(model="openai")) == []

    def test_query_by_model_whose_provider_holds_a_slash(self, store: SessionStore) -> None:
        # A gateway's provider name ("openrouter/openai"): a bare model name matches, and
        # "provider/model" as a whole; a split at another slash is no name it ran.
        record = make_loop("gw", 1, model=None)
        record.config = LoopConfigSnapshot(model="gpt-4o", provider="openrouter/openai", config_id="cfg")
        store.save(make_session("gw", loops=[record]))
        for name, found in (("gpt-4o", ["gw"]), ("openrouter/openai/gpt-4o", ["gw"]), ("openai/gpt-4o", [])):
            assert _ids(store.query(SessionQuery(model=name))) == found, name

    def test_query_by_tokens(self, store: SessionStore) -> None:
        _populate(store)
        assert _ids(store.query(SessionQuery(min_tokens=100))) == ["s2", "s1"]
        assert _ids(store.query(SessionQuery(min_tokens=101))) == ["s2"]
        assert _ids(store.query(SessionQuery(min_tokens=0))) == ["s2", "s4", "s3", "s1"]

    def test_query_by_parent_session(self, store: SessionStore) -> None:
        _populate(store)
        assert _ids(store.query(SessionQuery(parent_session_id="s1"))) == ["s4", "s3"]
        assert store.query(SessionQuery(parent_session_id="s2")) == []

    def test_query_filters_combine(self, store: SessionStore) -> None:
        _populate(store)
        assert _ids(store.query(SessionQuery(agent_id="beta", status="Running"))) == ["s3"]
        assert _ids(store.query(SessionQuery(agent_id="alpha", model="gpt-4o", until=at(100)))) == ["s1"]
        assert store.query(SessionQuery(agent_id="beta", min_tokens=100)) == []

    def test_text_filters_are_exact_about_nul_and_the_replacement_character(
        self, store: SessionStore
    ) -> None:
        # A NUL and U+FFFD in the same place make different ids and names: neither filter
        # may select the other's sessions (PostgreSQL text cannot hold NUL).
        for session_id, mark, seconds in (("nul", "\x00", 10), ("fffd", "\ufffd", 20)):
            agent = f"a{mark}b"
            loop = talking_loop(session_id, 1, "coffee", agent_id=agent, started_at=at(seconds))
            loop.config = LoopConfigSnapshot(model=f"m{mark}x", provider="p", config_id="cfg")
            store.save(
                make_session(
                    session_id,
                    agent,
                    loops=[loop],
                    created_at=at(seconds),
                    parent_session_id=f"up{mark}",
                )
            )
        for session_id, mark in (("nul", "\x00"), ("fffd", "\ufffd")):
            for query in (
                SessionQuery(agent_id=f"a{mark}b"),
                SessionQuery(model=f"p/m{mark}x"),
                SessionQuery(model=f"m{mark}x"),
                SessionQuery(parent_session_id=f"up{mark}"),
            ):
                assert _ids(store.query(query)) == [session_id], query
                assert _ids(store.query(replace(query, limit=1))) == [session_id], query
                assert {hit.session_id for hit in store.search("coffee", query)} == {session_id}, query
                assert {hit.session_id for hit in store.search("coffee", replace(query, limit=1))} == {
                    session_id
                }, query
        assert store.prune(PruneCriteria(agent_id="a\x00b", older_than=at(1000))) == 1
        assert store.list_ids() == ["fffd"]

    def test_text_no_session_holds_is_a_bad_query_everywhere(self, store: SessionStore) -> None:
        # A lone surrogate (undecodable bytes of a command-line argument) is in no stored
        # text, and a NUL in no session id: one InvalidQuery from every store, never an
        # encoding error from its database.
        store.save(make_session("a"))
        bad = "x\udcff"
        for ask in (
            lambda: store.query(SessionQuery(agent_id=bad)),
            lambda: store.query(SessionQuery(model=bad)),
            lambda: store.query(SessionQuery(parent_session_id=bad)),
            lambda: store.query(SessionQuery(after=PageCursor("newest", 0, bad))),
            lambda: store.query(SessionQuery(limit=2, after=PageCursor.parse("newest:0:s\x00"))),
            lambda: store.search("agent", SessionQuery(agent_id=bad)),
            lambda: store.list_for_agent(bad),
            lambda: store.prune(PruneCriteria(keep_last=0, agent_id=bad)),
        ):
            with _raises(InvalidQuery):
                ask()
        assert store.list_ids() == ["a"]

    def test_summaries_keep_nul_and_the_replacement_character_apart(self, store: SessionStore) -> None:
        # PostgreSQL text cannot hold NUL: its columns show U+FFFD, the listing may not.
        for session_id, mark in (("nul", "\x00"), ("fffd", "\ufffd"), ("both", "\x00\ufffd")):
            loop = talking_loop(session_id, 1, f"hello{mark}world")
            loop.config = LoopConfigSnapshot(model=f"m{mark}x", provider=f"p{mark}", config_id="cfg")
            store.save(make_session(session_id, loops=[loop]))
        rows = {row.session_id: (row.models, row.first_prompt) for row in store.query()}
        assert rows == {
            "nul": (("p\x00/m\x00x",), "Please hello\x00world"),
            "fffd": (("p\ufffd/m\ufffdx",), "Please hello\ufffdworld"),
            "both": (("p\x00\ufffd/m\x00\ufffdx",), "Please hello\x00\ufffdworld"),
        }

    def test_query_sees_merged_saves(self, store: SessionStore) -> None:
        _populate(store)
        store.save(
            make_session(
                "s1",
                "alpha",
                last_active_at=at(50),
                loops=[
                    make_loop("s1", 2, agent_id="alpha", status="Aborted", tokens=1000, started_at=at(45))
                ],
            )
        )
        [row] = store.query(SessionQuery(agent_id="alpha", status="Aborted", until=at(100)))
        assert (row.session_id, row.loop_count, row.total_tokens) == ("s1", 2, 1100)
        assert row.last_active_at == at(50)

    # -- usage totals -----------------------------------------------------------------

    def test_bad_arguments_get_one_wording_from_every_store(self, store: SessionStore) -> None:
        # Values are checked where they are built (SessionQuery, PruneCriteria,
        # parse_group_by), so no backend can word them its own way.
        for build, message in (
            (
                lambda: SessionQuery(status="Finished"),
                "status: expected one of Pending, Running, Completed, Rejected, Aborted; got 'Finished'",
            ),
            (lambda: SessionQuery(limit=-1), "limit: must not be negative, got -1"),
            (
                lambda: SessionQuery(order="random"),  # type: ignore[arg-type]
                "order: expected one of newest, oldest, tokens; got 'random'",
            ),
            (
                lambda: store.usage_totals("week"),  # type: ignore[arg-type]
                "group_by: expected one of agent, model, day; got 'week'",
            ),
            (lambda: PruneCriteria(), "prune needs older_than, keep_last or both"),
            (lambda: PruneCriteria(agent_id="alpha"), "prune needs older_than, keep_last or both"),
            (lambda: PruneCriteria(keep_last=-1), "keep_last: must not be negative, got -1"),
        ):
            with _raises(InvalidQuery) as caught:
                build()
            assert str(caught.value) == message

    def test_async_query_twins(self, store: SessionStore) -> None:
        _populate(store)

        async def scenario() -> None:
            assert _ids(await store.aquery(SessionQuery(agent_id="beta"))) == ["s4", "s3"]
            assert await store.ausage_totals("agent") == store.usage_totals("agent")
            assert await store.aprune(PruneCriteria(keep_last=3)) == 1

        asyncio.run(scenario())
        assert sorted(store.list_ids()) == ["s2", "s3", "s4"]

    def test_usage_totals_by_agent(self, store: SessionStore) -> None:
        _populate(store)
        assert (
            store.usage_totals()
            == store.usage_totals("agent")
            == [
                UsageTotal(key="alpha", sessions=2, loops=3, usage=_usage(100) + _usage(300) + _usage(50)),
                UsageTotal(key="beta", sessions=2, loops=2, usage=_usage(10) + _usage(0)),
            ]
        )

    def test_usage_totals_by_model(self, store: SessionStore) -> None:
        _populate(store)
        assert store.usage_totals("model") == [
            UsageTotal(key="anthropic/claude-sonnet-4-5", sessions=2, loops=2, usage=_usage(300) + _usage(0)),
            UsageTotal(key="openai/gpt-4o", sessions=2, loops=2, usage=_usage(100) + _usage(50)),
            UsageTotal(key="unknown", sessions=1, loops=1, usage=_usage(10)),
        ]

    def test_usage_totals_by_day(self, store: SessionStore) -> None:
        _populate(store)
        assert store.usage_totals("day") == [
            UsageTotal(key="2024-05-01", sessions=3, loops=3, usage=_usage(100) + _usage(10) + _usage(0)),
            UsageTotal(key="2024-05-02", sessions=1, loops=2, usage=_usage(300) + _usage(50)),
        ]
        assert store.usage_totals("DAY") == store.usage_totals("day")  # type: ignore[arg-type]

    def test_cut_streams_bill_every_reported_token(self, store: SessionStore) -> None:
        # phi-core's example streams cut after every event (a stream cut off, a killed
        # process): every token an assistant MessageEnd reported is in every roll-up,
        # although phi-core leaves the cut loop's usage at zero.
        _examples()
        for name, cut, lines in cut_streams(EXAMPLES_DIR):
            recorder = SessionRecorder()
            for line in lines:
                recorder.on_json(line)
            recorder.flush()
            sessions = recorder.drain_completed()
            for session in sessions:
                store.save(session)
            reported, where = reported_usage(lines), f"{name} cut after {cut} events"
            assert _sum(row.usage for row in store.query()) == reported, where
            for by in ("agent", "model", "day"):
                assert _sum(row.usage for row in store.usage_totals(by)) == reported, (where, by)
            for session in sessions:
                store.delete(session.session_id)

    def test_usage_totals_with_a_pricer_carry_their_cost(self, store: SessionStore) -> None:
        sessions = _populate(store).values()
        store.save(make_session("empty", "idle", loops=[]))
        pricer = Pricer(
            {"openai/gpt-4o": {"input": 2, "output": 8}, "claude-sonnet-4-5": {"input": 3, "output": 15}},
            use_table=False,
        )
        groupings: tuple[GroupBy, ...] = ("agent", "model", "day")
        for by in groupings:
            priced = store.usage_totals(by, pricer=pricer)
            unpriced = [msgspec.structs.replace(row, cost=msgspec.UNSET) for row in priced]
            assert unpriced == store.usage_totals(by)
            # The same figures as pricing the loaded sessions (one home: `Pricer.row_costs`).
            expected = {row.key: row.cost for row in cost_totals(sessions, by, pricer)}
            for row in priced:
                cost = expected.get(row.key, ZERO_COST)
                assert isinstance(row.cost, Cost), (by, row.key)
                assert (row.cost.sources, row.cost.unpriced) == (cost.sources, cost.unpriced), (by, row.key)
                assert row.cost.usd == (None if cost.usd is None else _approx(cost.usd)), (by, row.key)
        by_model = {row.key: row.cost for row in store.usage_totals("model", pricer=pricer)}
        assert by_model["unknown"] == Cost(usd=None, unpriced=("unknown",))  # never 0
        gpt = by_model["openai/gpt-4o"]  # loops of 100 and 50 tokens: 75 + 38 in, 25 + 12 out
        assert isinstance(gpt, Cost) and gpt.sources == ("user",)
        assert gpt.usd == _approx((75 + 38) * 2e-6 + (25 + 12) * 8e-6)
        by_agent = {row.key: row.cost for row in store.usage_totals("agent", pricer=pricer)}
        assert by_agent["idle"] == ZERO_COST and by_agent["beta"] == Cost(usd=None, unpriced=("unknown",))
        by_day = store.usage_totals("day", pricer=pricer)
        assert asyncio.run(store.ausage_totals("day", pricer=pricer)) == by_day
        with _raises(TypeError, match="pricer"):
            store.usage_totals("agent", pricer="prices.toml")  # type: ignore[arg-type]

    def test_cost_prices_each_model_call(self, store: SessionStore) -> None:
        # A price tier applies to one request's input tokens: a loop of two calls of 150k
        # input costs twice one call, not one call of 300k (which crosses the 200k tier).
        import pytest

        if not prices_available():
            pytest.skip("needs the prices extra (genai-prices)")
        pricer = Pricer()
        provider, _, model = TIERED_MODEL.partition("/")
        one = pricer.price(TIERED_CALL, provider, model, at(1)).usd
        merged = pricer.price(TIERED_CALL + TIERED_CALL, provider, model, at(1)).usd
        assert one is not None and merged is not None and merged > 2 * one * 1.5  # the tier is real
        session = make_session("tiered", loops=[calls_loop("tiered", 1, [TIERED_CALL, TIERED_CALL])])
        store.save(session)
        for by in ("agent", "model", "day"):
            [row] = store.usage_totals(by, pricer=pricer)
            assert isinstance(row.cost, Cost) and row.cost.usd == _approx(2 * one), by
        assert pricer.outline(store.load_outline("tiered")).usd == _approx(2 * one)
        assert pricer.session(store.load("tiered")).usd == _approx(2 * one)

    def test_usage_totals_by_model_go_by_the_model_that_served_each_call(self, store: SessionStore) -> None:
        # An alias served by its dated snapshot, a model switched mid-loop, a loop without a
        # config: each call's usage (and cost) is its serving model's.
        def tokens(n: int) -> Usage:
            return Usage(input=n, output=n // 10, total_tokens=n + n // 10)

        gpt, snapshot, claude, mini = (
            "openai/gpt-4o",
            "openai/gpt-4o-2024-08-06",
            "anthropic/claude-sonnet-4-5",
            "openai/gpt-4o-mini",
        )
        sessions = [
            make_session(
                "alias",
                loops=[
                    calls_loop(
                        "alias", 1, [tokens(1000), tokens(2000)], model=gpt, served_by=[snapshot, snapshot]
                    ),
                    calls_loop("alias", 2, [tokens(300), tokens(400)], model=gpt, served_by=[gpt, claude]),
                ],
            ),
            make_session("plain", loops=[calls_loop("plain", 1, [tokens(50)], model=claude)]),
            make_session("bare", loops=[calls_loop("bare", 1, [tokens(70)], model=None, served_by=[mini])]),
        ]
        for session in sessions:
            store.save(session)
        pricer = Pricer(
            {"gpt-4o": {"input": 2, "output": 8}, "claude-sonnet-4-5": {"input": 3, "output": 15}},
            use_table=False,
        )
        by_model = store.usage_totals("model", pricer=pricer)
        assert [msgspec.structs.replace(row, cost=msgspec.UNSET) for row in by_model] == [
            UsageTotal(key=claude, sessions=2, loops=2, usage=tokens(400) + tokens(50)),
            UsageTotal(key=gpt, sessions=1, loops=1, usage=tokens(300)),
            UsageTotal(key=snapshot, sessions=1, loops=1, usage=tokens(1000) + tokens(2000)),
            UsageTotal(key=mini, sessions=1, loops=1, usage=tokens(70)),
        ]
        assert store.usage_totals("model") == [
            msgspec.structs.replace(row, cost=msgspec.UNSET) for row in by_model
        ]
        costs = {row.key: row.cost for row in by_model}
        # The snapshot is priced as the alias the user priced; the mini has no price.
        assert costs[snapshot] == Cost(usd=_approx(3000 * 2e-6 + 300 * 8e-6), sources=("user",))
        assert costs[mini] == Cost(usd=None, unpriced=(mini,))
        assert {row.key: row.cost for row in cost_totals(sessions, "model", pricer)} == costs
        [everything] = store.usage_totals("agent", pricer=pricer)
        assert everything.usage == _sum(row.usage for row in by_model)
        assert isinstance(everything.cost, Cost) and everything.cost.unpriced == (mini,)
        # The rows add up to the cost of the priced sessions, which price each call alike.
        priced = [cost.usd for key, cost in costs.items() if key != mini and isinstance(cost, Cost)]
        alias, plain = (pricer.session(session).usd for session in sessions[:2])
        assert alias is not None and plain is not None and math.fsum(priced) == _approx(alias + plain)  # type: ignore[arg-type]

    def test_usage_totals_count_sessions_without_loops(self, store: SessionStore) -> None:
        store.save(make_session("empty", "idle", loops=[]))
        assert store.usage_totals() == [UsageTotal(key="idle", sessions=1, loops=0, usage=_usage(0))]
        assert store.usage_totals("model") == []

    def test_usage_totals_keep_nul_and_the_replacement_character_apart(self, store: SessionStore) -> None:
        # A NUL and U+FFFD in the same place make different agents and models: each keeps
        # its own total under its own key (PostgreSQL text cannot hold NUL).
        sessions = []
        for session_id, mark, tokens in (("nul", "\x00", 100), ("fffd", "\ufffd", 300)):
            agent = f"a{mark}b"
            loop = make_loop(session_id, 1, agent_id=agent, tokens=tokens, model=f"p{mark}/m{mark}x")
            sessions.append(make_session(session_id, agent, loops=[loop]))
            store.save(sessions[-1])
        pricer = Pricer({}, use_table=False)
        keys: tuple[tuple[GroupBy, str], ...] = (("agent", "a{}b"), ("model", "p{0}/m{0}x"))
        for by, key in keys:
            expected = [
                UsageTotal(key=key.format(mark), sessions=1, loops=1, usage=_usage(tokens))
                for mark, tokens in (("\x00", 100), ("\ufffd", 300))
            ]
            assert store.usage_totals(by) == expected, by
            priced = store.usage_totals(by, pricer=pricer)
            assert [msgspec.structs.replace(row, cost=msgspec.UNSET) for row in priced] == expected, by
            costs = {row.key: row.cost for row in cost_totals(sessions, by, pricer)}
            assert {row.key: row.cost for row in priced} == costs, by

    def test_summaries_carry_the_first_prompt(self, store: SessionStore) -> None:
        long = "x" * 500
        store.save(make_session("quiet", last_active_at=at(1)))  # no message at all
        store.save(make_session("said", last_active_at=at(2), loops=[talking_loop("said", 1, long)]))
        rows = {row.session_id: row.first_prompt for row in store.query()}
        assert rows["quiet"] is None
        prompt = rows["said"]
        assert prompt is not None and prompt.startswith("Please xxx") and prompt.endswith("\u2026")
        assert len(prompt) == PROMPT_CHARS
        # A later save whose loop says something: the first loop with a prompt gives it.
        store.save(
            make_session(
                "quiet", last_active_at=at(3), loops=[talking_loop("quiet", 2, "go", started_at=at(3))]
            )
        )
        assert {row.session_id: row.first_prompt for row in store.query()}["quiet"] == "Please go"

    def test_a_loop_that_never_ended_has_its_first_prompt_too(self, store: SessionStore) -> None:
        # Its messages come with AgentEnd: a loop cut off (its process died) has none, and
        # its prompt is in its stored events.
        record = make_loop("cut", 1, status="Aborted")
        said = UserMessage(content=(TextContent(text="What is in notes.txt?"),), timestamp=0)
        record.events = (LoopEvent(sequence=0, event=MessageEnd(loop_id=record.loop_id, message=said)),)
        store.save(make_session("cut", loops=[record]))
        assert {row.session_id: row.first_prompt for row in store.query()}["cut"] == "What is in notes.txt?"

    # -- partial loads ----------------------------------------------------------------

    def _check_partial_loads(self, store: SessionStore, session_id: str) -> None:
        """The outline and every loop agree with the whole session."""
        whole = store.load(session_id)
        outline = store.load_outline(session_id)
        assert outline == session_outline(whole)
        assert encode_session(outline.session) == encode_session(session_outline(whole).session)
        count = len(whole.loops)
        for index, record in enumerate(whole.loops):
            assert store.load_loops(session_id, index, index + 1) == [record]
        assert store.load_loops(session_id, 0, count + 5) == whole.loops
        assert store.load_loops(session_id, 1, count) == whole.loops[1:]
        assert store.load_loops(session_id, count, count + 1) == []
        assert store.load_loops(session_id, 1, 0) == []

    def test_outline_and_loops_agree_with_the_whole_session(self, store: SessionStore) -> None:
        for path in _examples():
            session = decode_session(path.read_bytes())
            store.save(session)
            self._check_partial_loads(store, session.session_id)
        recorded = _recorded_parallel()
        store.save(recorded)
        self._check_partial_loads(store, recorded.session_id)
        outline = store.load_outline(recorded.session_id)
        assert all(not loop.record.events and not loop.record.messages for loop in outline.loops)
        assert sum(loop.event_count for loop in outline.loops) == sum(len(r.events) for r in recorded.loops)

    def test_outline_follows_merges(self, store: SessionStore) -> None:
        store.save(make_session("m", loops=[make_loop("m", 1, status="Running")]))
        store.save(make_session("m", loops=[talking_loop("m", 1, "done now"), make_loop("m", 2)]))
        self._check_partial_loads(store, "m")
        assert [loop.record.status for loop in store.load_outline("m").loops] == ["Completed", "Completed"]

    def test_partial_loads_refuse_what_is_missing(self, store: SessionStore) -> None:
        store.save(make_session("p"))
        with _raises(SessionNotFound):
            store.load_outline("absent")
        with _raises(SessionNotFound):
            store.load_loops("absent", 0, 1)
        with _raises(InvalidQuery, "start: must not be negative"):
            store.load_loops("p", -1, 1)
        with _raises(TypeError, match="stop must be int"):
            store.load_loops("p", 0, "1")  # type: ignore[arg-type]
        for bad_id in INVALID_SESSION_IDS:
            with _raises(InvalidSessionId):
                store.load_outline(bad_id)
            with _raises(InvalidSessionId):
                store.load_loops(bad_id, 0, 1)
        assert asyncio.run(store.aload_outline("p")) == store.load_outline("p")
        assert asyncio.run(store.aload_loops("p", 0, 1)) == store.load("p").loops

    def test_loop_starts_are_those_of_the_loops_from_a_position_on(self, store: SessionStore) -> None:
        if not isinstance(store, LoopStarts):
            import pytest

            pytest.skip(f"{type(store).__name__} has no loop_starts (an optional extension)")
        store.save(make_session("w", loops=[make_loop("w", 1, status="Running", started_at=at(1))]))
        store.save(
            make_session(
                "w", loops=[make_loop("w", 2, started_at=at(2)), make_loop("w", 1, started_at=at(1))]
            )
        )
        store.save(make_session("w", loops=[make_loop("w", 3, started_at=at(3))]))
        starts = [(record.loop_id, record.started_at.ns) for record in store.load("w").loops]
        assert [loop_id for loop_id, _ in starts] == ["w.cfg.1", "w.cfg.2", "w.cfg.3"]  # merged in place
        for start in range(4):
            assert store.loop_starts("w", start) == starts[start:]
        assert store.loop_starts("w", 10) == []
        # The ids as saved, whatever an index keeps of them (PostgreSQL text shows NUL as U+FFFD).
        odd = [
            msgspec.structs.replace(make_loop("odd", n, started_at=at(n)), loop_id=f"odd.c{mark}fg.1")
            for n, mark in ((1, "\x00"), (2, "\ufffd"), (3, "\x00\ufffd"))
        ]
        store.save(make_session("odd", loops=odd))
        assert store.loop_starts("odd", 1) == [(r.loop_id, r.started_at.ns) for r in odd[1:]]
        assert asyncio.run(store.aloop_starts("w", 2)) == starts[2:]
        store.save(make_session("empty", loops=[]))
        assert store.loop_starts("empty", 0) == []
        with _raises(SessionNotFound):
            store.loop_starts("absent", 0)
        with _raises(InvalidQuery, "start: must not be negative"):
            store.loop_starts("w", -1)
        with _raises(TypeError, match="start must be int"):
            store.loop_starts("w", "1")  # type: ignore[arg-type]
        for bad_id in INVALID_SESSION_IDS:
            with _raises(InvalidSessionId):
                store.loop_starts(bad_id, 0)

    # -- search -----------------------------------------------------------------------

    def _populate_talk(self, store: SessionStore) -> None:
        store.save(
            make_session(
                "t1",
                "alpha",
                last_active_at=at(10),
                loops=[talking_loop("t1", 1, "brew the Coffee", agent_id="alpha")],
            )
        )
        store.save(
            make_session(
                "t2",
                "beta",
                created_at=at(20),
                loops=[talking_loop("t2", 1, "water the plants", agent_id="beta", started_at=at(20))],
            )
        )

    def test_search_finds_every_kind_of_text(self, store: SessionStore) -> None:
        self._populate_talk(store)
        hits = store.search("coffee")  # case-insensitive whole words
        assert _hit_places(hits) == [
            ("t1", "t1.cfg.1", None, 0, "text"),
            ("t1", "t1.cfg.1", 0, 1, "thinking"),
            ("t1", "t1.cfg.1", 0, 1, "text"),
            ("t1", "t1.cfg.1", 0, 1, "tool_call"),
            ("t1", "t1.cfg.1", 0, 2, "tool_result"),
        ]
        assert hits[0].agent_id == "alpha"
        assert hits[0].snippet == "Please brew the Coffee"
        assert hits[0].highlights == ((16, 22),)
        assert hits[3].snippet == 'lookup {"q":"brew the Coffee args"}'

    def test_search_needs_every_word(self, store: SessionStore) -> None:
        self._populate_talk(store)
        assert _hit_places(store.search("plan WATER")) == [("t2", "t2.cfg.1", 0, 1, "thinking")]
        assert store.search("plan water coffee") == []
        assert store.search("cof") == []  # whole words only
        assert store.search("  ...  ") == []  # no word: nothing

    def test_search_order_filters_and_limit(self, store: SessionStore) -> None:
        self._populate_talk(store)
        assert [hit.session_id for hit in store.search("result")] == ["t2", "t1"]  # newest session first
        oldest_first = store.search("result", SessionQuery(order="oldest"))
        assert [hit.session_id for hit in oldest_first] == ["t1", "t2"]
        assert [hit.session_id for hit in store.search("result", SessionQuery(agent_id="alpha"))] == ["t1"]
        assert len(store.search("the", limit=3)) == 3
        # The query's limit picks the sessions first (the newest, t2), then the words.
        assert store.search("coffee", SessionQuery(limit=1)) == []
        assert [hit.session_id for hit in store.search("coffee", SessionQuery(limit=2))] == ["t1"] * 5
        assert store.search("the", limit=0) == []
        with _raises(InvalidQuery, "limit: must not be negative"):
            store.search("the", limit=-1)
        with _raises(TypeError):
            store.search(b"the")  # type: ignore[arg-type]

    def test_search_sees_merges_and_forgets_pruned_and_deleted(self, store: SessionStore) -> None:
        self._populate_talk(store)
        store.save(
            make_session(
                "t1",
                "alpha",
                last_active_at=at(30),
                loops=[talking_loop("t1", 2, "grind beans", agent_id="alpha", started_at=at(25))],
            )
        )
        assert [hit.loop_id for hit in store.search("beans")] == ["t1.cfg.2"] * 5
        assert len(store.search("coffee")) == 5  # the stored loop is still found
        assert store.prune(PruneCriteria(keep_last=1)) == 1
        assert store.search("plants") == []
        assert len(store.search("beans")) == 5
        store.delete("t1")
        assert store.search("beans") == []

    def test_search_words_are_the_rule_s_words_whatever_the_script(self, store: SessionStore) -> None:
        # The rule's words are runs of `\w` of the composed (NFC) text: a combining accent
        # (decomposed text) is its letter's, whichever form a query or a document has; a
        # private-use character and a lone "_" split or form words as Python splits them,
        # whatever an index's own tokenizer would make of them.
        said = {
            "u1": "the cafe\u0301 opens",
            "u2": "alpha\ue000beta",
            "u3": "\u0130stanbul trip",
            "u4": "a _ b",
        }
        for session_id, text in said.items():
            store.save(make_session(session_id, "agent", loops=[talking_loop(session_id, 1, text)]))
        for text, found in (
            ("caf\u00e9 opens", ["u1"]),
            ("cafe\u0301", ["u1"]),
            ("alpha beta", ["u2"]),
            ("\u0130stanbul", ["u3"]),
            ("_", ["u4"]),
            ("cafe opens", []),
        ):
            assert sorted({hit.session_id for hit in store.search(text)}) == found, text

    def test_search_folds_case_as_unicode_does(self, store: SessionStore) -> None:
        # Case folding, not lower case: "ß" is "ss", a ligature its letters, every sigma one.
        store.save(
            make_session(
                "cf",
                loops=[
                    talking_loop("cf", 1, "Stra\u00dfe \u03a3\u03af\u03c3\u03c5\u03c6\u03bf\u03c2 \ufb01le")
                ],
            )
        )
        for text in (
            "STRASSE",
            "strasse",
            "stra\u00dfe",
            "\u03c3\u03af\u03c3\u03c5\u03c6\u03bf\u03c3",
            "FILE",
            "\ufb01le",
        ):
            hits = store.search(text)
            assert [hit.kind for hit in hits] == ["text", "thinking", "text", "tool_call", "tool_result"], (
                text
            )
            assert all(hit.highlights for hit in hits), text

    def test_search_reads_a_tool_calls_arguments_as_their_text(self, store: SessionStore) -> None:
        # A file a tool writes: each line's first word follows an escaped newline in the
        # arguments' JSON, and is found as itself, never glued to the escape's letter.
        store.save(
            make_session("w1", "agent", loops=[talking_loop("w1", 1, "import os\nimport sys\ttabbed")])
        )
        assert [hit.kind for hit in store.search("tabbed")] == [
            "text",
            "thinking",
            "text",
            "tool_call",
            "tool_result",
        ]
        assert store.search("nimport") == store.search("ttabbed") == []
        assert store.search("tabbed")[3].snippet == 'lookup {"q":"import os import sys tabbed args"}'

    def test_search_reads_what_a_loop_that_never_ended_said(self, store: SessionStore) -> None:
        # Its messages come with AgentEnd: a loop cut off (its process died) has none, and
        # what was said is in its stored MessageEnd events.
        store.save(make_session("cut", loops=[cut_loop("cut", 1, "brew the coffee")]))
        assert _hit_places(store.search("coffee")) == [
            ("cut", "cut.cfg.1", None, 0, "text"),
            ("cut", "cut.cfg.1", 0, 1, "thinking"),
            ("cut", "cut.cfg.1", 0, 1, "text"),
            ("cut", "cut.cfg.1", 0, 1, "tool_call"),
            ("cut", "cut.cfg.1", 0, 2, "tool_result"),
        ]

    def test_search_of_thousands_of_words(self, store: SessionStore) -> None:
        # A pasted document as the query: PostgreSQL ran out of stack on 19,000 words.
        said = " ".join(f"w{n}" for n in range(300))
        store.save(make_session("long", loops=[talking_loop("long", 1, said)]))
        assert len(store.search(said)) == 5
        assert store.search(f"{said} w300") == []
        assert store.search(" ".join(f"w{n}" for n in range(20_000))) == []

    def test_async_search_twin(self, store: SessionStore) -> None:
        self._populate_talk(store)
        assert asyncio.run(store.asearch("coffee", limit=2)) == store.search("coffee", limit=2)

    # -- prune ------------------------------------------------------------------------

    def _prune_and_check(self, store: SessionStore, expected_left: list[str], **criteria: Any) -> None:
        sessions = _populate(store)
        removed = store.prune(PruneCriteria(**criteria))
        assert removed == len(sessions) - len(expected_left)
        assert sorted(store.list_ids()) == expected_left
        for session_id in expected_left:  # survivors are untouched, whole
            assert encode_session(store.load(session_id)) == encode_session(sessions[session_id])
        for session_id in set(sessions) - set(expected_left):
            with _raises(SessionNotFound):
                store.load(session_id)

    def test_prune_older_than(self, store: SessionStore) -> None:
        self._prune_and_check(store, ["s2", "s4"], older_than=at(35))

    def test_prune_older_than_is_strict(self, store: SessionStore) -> None:
        self._prune_and_check(store, ["s2", "s3", "s4"], older_than=at(30))

    def test_prune_keep_last(self, store: SessionStore) -> None:
        self._prune_and_check(store, ["s2", "s4"], keep_last=2)

    def test_prune_keep_last_per_agent(self, store: SessionStore) -> None:
        self._prune_and_check(store, ["s1", "s2", "s4"], keep_last=1, agent_id="beta")

    def test_prune_older_than_for_one_agent(self, store: SessionStore) -> None:
        self._prune_and_check(store, ["s2", "s3", "s4"], older_than=at(35), agent_id="alpha")

    def test_prune_both_conditions_must_hold(self, store: SessionStore) -> None:
        # Older than at(35): s1 and s3; but s3 is among the three most recent.
        self._prune_and_check(store, ["s2", "s3", "s4"], older_than=at(35), keep_last=3)

    def test_prune_keeping_more_than_stored_removes_nothing(self, store: SessionStore) -> None:
        self._prune_and_check(store, ["s1", "s2", "s3", "s4"], keep_last=10)
