"""Checks shared by the stores' tests."""

from __future__ import annotations

import uuid
from pathlib import Path
from types import ModuleType

import msgspec
import pytest
from hypothesis import strategies as st

from phi_session import LoopConfigSnapshot
from phi_session.codec import encode_session
from phi_session.identity import AgentSession
from phi_session.instrument import Tracer
from phi_session.messages import AssistantMessage, TextContent, Usage
from phi_session.model import LoopRecord, Session
from phi_session.recorder import SessionRecorder
from phi_session.stores.base import SessionStore, merge_sessions, summarize
from phi_session.stores.conformance import (
    calls_loop,
    cut_loop,
    make_loop,
    make_session,
    save_in_parts,
    talking_loop,
)
from phi_session.stores.json_dir import JsonDirStore
from phi_session.stores.outline import SessionOutline, session_outline
from phi_session.stores.query import SessionQuery


def check_saves_read_only_touched_loops(
    store: SessionStore, module: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A conversation saved loop by loop (each save merges one more loop into what is
    stored) costs what that loop touches, not the whole session: of the stored loops,
    `module`'s save decodes only the new loop's parent (which it links), and what it
    stores is what merging every part gives, summary included."""
    recorder = SessionRecorder()
    tracer = Tracer(AgentSession(), sinks=[recorder], config=LoopConfigSnapshot(model="m", provider="p"))
    decoded: list[str] = []
    real_decode = module.decode_loop

    def counting_decode(data: bytes, *, strict: bool = True) -> LoopRecord:
        record: LoopRecord = real_decode(data, strict=strict)
        decoded.append(record.loop_id)
        return record

    monkeypatch.setattr(module, "decode_loop", counting_decode)
    saved: list[Session] = []
    for n in range(12):
        with tracer.loop(continues=tracer.agent.last_loop_id) as loop:  # its parent: the loop before
            loop.user(f"question {n}")
            with loop.turn() as turn, turn.assistant() as reply:
                reply.text_delta(f"answer {n}")
        recorder.checkpoint()
        decoded.clear()
        for part in recorder.drain_completed():
            store.save(part)
            saved.append(part)
        if n:
            assert decoded == [saved[-2].loops[0].loop_id]
    whole = saved[0]
    for part in saved[1:]:
        whole = merge_sessions(whole, part)
    monkeypatch.undo()
    assert encode_session(store.load(whole.session_id)) == encode_session(whole)
    [row] = store.query()
    assert row == summarize(whole)


conversation_parts = st.lists(
    st.lists(st.tuples(st.integers(1, 5), st.booleans()), min_size=1, max_size=4), min_size=1, max_size=6
)
"""Parts of a conversation of 5 loops (`conformance.conversation_loop`): (loop index, finished)."""


def check_saves_in_parts(store: SessionStore, parts: list[list[tuple[int, bool]]]) -> str:
    """Save `parts` of a new conversation (`save_in_parts`) one after the other; check that
    `store` holds what merging them gives, with its summary. Its id."""
    session_id = f"s{uuid.uuid4().hex[:12]}"
    expected = save_in_parts(store, session_id, parts)
    assert encode_session(store.load(session_id)) == encode_session(expected)
    [row] = [row for row in store.query() if row.session_id == session_id]
    assert row == summarize(expected)
    return session_id


class UndecodableRecords(JsonDirStore):
    """Its outlines' loop records do not decode (`LoopOutline.record` raises `DecodeError`),
    as a stored copy something else wrote may hold; each outline read is noted in `reads`."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.reads: list[str] = []

    def load_outline(self, session_id: str) -> SessionOutline:
        self.reads.append(session_id)
        outline = super().load_outline(session_id)
        broken = msgspec.Raw(b'{"loop_id": 5}')
        loops = tuple(msgspec.structs.replace(loop, record_json=broken) for loop in outline.loops)
        return msgspec.structs.replace(outline, loops=loops)


_CUT_PROMPTS = ("cut", "retried", "plain")
"""The sessions of `save_as_before_cut_loops_had_prompts`."""


def _listed_prompts(store: SessionStore) -> dict[str, str | None]:
    return {row.session_id: row.first_prompt for row in store.query() if row.session_id in _CUT_PROMPTS}


def save_as_before_cut_loops_had_prompts(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch, *others: Session
) -> None:
    """Save sessions (and `others`) as phi-session did before a loop that never ended had its
    prompt read from its ``MessageEnd`` events (41544bf): their outlines and listed first
    prompts say it has none (`check_cut_loops_have_prompts` once the store is migrated)."""
    with monkeypatch.context() as before:  # a loop's messages only, as before
        before.setattr(LoopRecord, "conversation", lambda record: record.messages)
        store.save(make_session("cut", loops=[cut_loop("cut", 1, "brew coffee")]))
        retried = [cut_loop("retried", 1, "brew tea"), talking_loop("retried", 2, "brew more tea")]
        store.save(make_session("retried", loops=retried))
        store.save(make_session("plain", loops=[talking_loop("plain", 1, "brew water")]))
        for session in others:
            store.save(session)
    assert _listed_prompts(store) == {
        "cut": None,
        "retried": "Please brew more tea",
        "plain": "Please brew water",
    }


def check_cut_loops_have_prompts(store: SessionStore) -> None:
    """The sessions of `save_as_before_cut_loops_had_prompts` list and outline the prompts
    of their loops that never ended, as saved now."""
    assert _listed_prompts(store) == {
        "cut": "Please brew coffee",
        "retried": "Please brew tea",
        "plain": "Please brew water",
    }
    for session_id in _CUT_PROMPTS:
        assert store.load_outline(session_id) == session_outline(store.load(session_id))


OPUS_THEN_MINI = (
    ("anthropic", "claude-opus-4-1", Usage(input=100_000, output=2_000, total_tokens=102_000)),
    ("openai", "gpt-4o-mini", Usage(input=100_000, output=500, total_tokens=100_500)),
)


def replies_session(
    replies: tuple[tuple[str, str, Usage], ...] = OPUS_THEN_MINI,
    configured: tuple[str, str] = ("anthropic", "claude-opus-4-1"),
) -> Session:
    """A loop of one turn of several assistant replies (provider, model, usage), all but the
    last errored (by default: claude-opus-4-1, the config's, errored mid-stream, then a
    gpt-4o-mini fallback answered)."""
    recorder = SessionRecorder()
    config = LoopConfigSnapshot(model=configured[1], provider=configured[0])
    tracer = Tracer(AgentSession(), sinks=[recorder], config=config)
    with tracer.loop() as loop:
        loop.user("hi")
        with loop.turn() as turn:
            for number, (provider, model, usage) in enumerate(replies, 1):
                last = number == len(replies)
                message = AssistantMessage(
                    content=(TextContent(text="ok"),) if last else (),
                    stop_reason="stop" if last else "error",
                    model=model,
                    provider=provider,
                    usage=usage,
                    timestamp=0,
                )
                with turn.assistant() as reply:
                    reply.finish(message=message)
    tracer.close()
    recorder.flush()
    return recorder.drain_completed()[0]


def _untotalled_sessions() -> list[Session]:
    """A loop of a call that reported no total (phi-core's Anthropic provider), then one a
    fallback served that did; a loop of a Gemini call whose total counts its thoughts beyond
    input and output, then one without a total (its total is not below its input plus
    output); and a turn of two replies (`replies_session`: an errored claude-opus-4-1 one,
    then a gpt-4o-mini fallback's)."""
    calls = [
        Usage(input=100_000, output=2_000, cache_read=50_000),
        Usage(input=10, output=5, total_tokens=15),
    ]
    served = ["anthropic/claude-sonnet-4-5", "openai/gpt-4o-mini"]
    record = calls_loop("untotalled", 1, calls, model="anthropic/claude-sonnet-4-5", served_by=served)
    mixed = [
        Usage(input=1_000, output=100, total_tokens=3_100),
        Usage(input=500, output=50, cache_read=4_000),
    ]
    served = ["google/gemini-2.5-pro", "anthropic/claude-sonnet-4-5"]
    mixed_record = calls_loop("mixed", 1, mixed, model="google/gemini-2.5-pro", served_by=served)
    return [
        make_session("untotalled", loops=[record]),
        make_session("mixed", loops=[mixed_record]),
        replies_session(),
    ]


def save_as_before_untotalled_calls_counted(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> list[Session]:
    """Save `_untotalled_sessions` as phi-session did before a call without a total counted
    its tokens (`counted_usage`) and each reply of a turn was a call: listed at their
    recorded totals, the turn of two replies one call on the last one's model
    (`check_untotalled_calls_counted` once the store is migrated); and a session of 1000
    tokens."""
    import phi_session.model as model_module
    from phi_session.stores import base as base_module

    sessions = _untotalled_sessions()
    one_call = model_module._turn_calls
    with monkeypatch.context() as before:
        for module in (model_module, base_module):
            before.setattr(module, "counted_usage", lambda usage, calls: usage)
        before.setattr(
            model_module, "_turn_calls", lambda turn, replies, config: one_call(turn, None, config)
        )
        for session in sessions:
            store.save(session)
    store.save(make_session("plain", loops=[make_loop("plain", 1, tokens=1_000)]))
    assert {row.session_id: row.total_tokens for row in store.query()} == {
        "untotalled": 15,
        "mixed": 3_100,
        sessions[2].session_id: 202_500,
        "plain": 1_000,
    }
    assert {total.key: total.usage.total_tokens for total in store.usage_totals("model")}[
        "openai/gpt-4o-mini"
    ] == (15 + 202_500)
    return sessions


def check_untotalled_calls_counted(store: SessionStore, sessions: list[Session]) -> None:
    """The sessions of `save_as_before_untotalled_calls_counted` list, filter, sort and total
    the tokens of their calls without a total, and their turn of two replies as two calls,
    as saved now; their records are untouched."""
    rows = store.query(SessionQuery(order="tokens"))
    assert [(row.session_id, row.total_tokens) for row in rows] == [
        (sessions[2].session_id, 202_500),
        ("untotalled", 152_015),
        ("mixed", 7_650),
        ("plain", 1_000),
    ]
    assert [row.session_id for row in store.query(SessionQuery(min_tokens=152_015, order="tokens"))] == [
        sessions[2].session_id,
        "untotalled",
    ]
    totals = {total.key: total.usage.total_tokens for total in store.usage_totals("model")}
    assert totals == {
        "anthropic/claude-sonnet-4-5": 152_000 + 4_550,
        "openai/gpt-4o-mini": 15 + 100_500,
        "anthropic/claude-opus-4-1": 102_000,
        "google/gemini-2.5-pro": 3_100,
        "openai/gpt-4o": 1_000,
    }
    for session in sessions:
        assert store.load_outline(session.session_id) == session_outline(session)
        assert encode_session(store.load(session.session_id)) == encode_session(session)
