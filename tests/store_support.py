"""Checks shared by the SQL stores' tests."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from types import ModuleType

import pytest
from hypothesis import strategies as st

from phi_session import AgentMessage, LoopConfigSnapshot, LoopEvent, MessageEnd, TextContent, UserMessage
from phi_session.codec import encode_session
from phi_session.identity import AgentSession
from phi_session.instrument import Tracer
from phi_session.model import LoopRecord, LoopStatus, Session
from phi_session.recorder import SessionRecorder
from phi_session.stores.base import SessionStore, merge_sessions, summarize
from phi_session.stores.conformance import at, make_loop, make_session


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


def talking_versions(session_id: str, index: int) -> tuple[LoopRecord, LoopRecord]:
    """Loop `index` of a conversation (a continuation of the one before), as a running
    snapshot and finished: each says something of its own and repeats the first loop's
    question; the snapshot also holds a draft the finished loop no longer has, which is
    what another loop says."""
    question = UserMessage(content=(TextContent(text="the question"),), timestamp=1)
    own = UserMessage(content=(TextContent(text=f"answer {index}"),), timestamp=2)
    # Another loop's answer: its message, which that loop's record may still use.
    draft = UserMessage(content=(TextContent(text=f"answer {index % 5 + 1}"),), timestamp=2)
    started = at(index)

    def version(status: LoopStatus, said: Sequence[AgentMessage]) -> LoopRecord:
        record = make_loop(
            session_id, index, status=status, started_at=started, parent_index=index - 1 or None
        )
        events = [MessageEnd(loop_id=record.loop_id, message=message) for message in said]
        record.events = tuple(LoopEvent(sequence=n, event=event) for n, event in enumerate(events))
        return record

    return version("Running", [question, draft]), version("Completed", [question, own])


conversation_parts = st.lists(
    st.lists(st.tuples(st.integers(1, 5), st.booleans()), min_size=1, max_size=4), min_size=1, max_size=6
)
"""Parts of a conversation of 5 loops for `check_saves_in_parts`: (loop index, finished)."""


def check_saves_in_parts(store: SessionStore, parts: list[list[tuple[int, bool]]]) -> str:
    """Save `parts` of a new conversation (each a list of (loop index, finished)) one after
    the other; check that `store` holds what merging them gives, with its summary. Its id."""
    session_id = f"s{uuid.uuid4().hex[:12]}"
    expected: Session | None = None
    for part in parts:
        loops = [talking_versions(session_id, index)[finished] for index, finished in part]
        incoming = make_session(session_id, loops=loops)
        store.save(incoming)
        expected = incoming if expected is None else merge_sessions(expected, incoming)
    assert expected is not None
    assert encode_session(store.load(session_id)) == encode_session(expected)
    [row] = [row for row in store.query() if row.session_id == session_id]
    assert row == summarize(expected)
    return session_id
