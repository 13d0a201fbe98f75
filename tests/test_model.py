from __future__ import annotations

from collections.abc import Iterator

import pytest

import phi_session as ps
from phi_session.model import CompactedSection, TurnRange

T = ps.Timestamp.parse("2025-06-01T09:00:00Z")


def user(text: str) -> ps.UserMessage:
    return ps.UserMessage(content=(ps.TextContent(text=text),), timestamp=1)


def loop(loop_id: str, parent: str | None, *messages: str) -> ps.LoopRecord:
    record = ps.LoopRecord.start(
        loop_id=loop_id, session_id="s", agent_id="a", started_at=T, parent_loop_id=parent, status="Completed"
    )
    record.messages = [user(m) for m in messages]
    record.usage = ps.Usage(input=len(messages), output=1, total_tokens=len(messages) + 1)
    return record


def session(*loops: ps.LoopRecord) -> ps.Session:
    return ps.Session(
        session_id="s",
        agent_id="a",
        created_at=T,
        last_active_at=T,
        formation=ps.SessionFormation.first_loop(T),
        loops=list(loops),
    )


def test_context_at_follows_the_chain_root_first() -> None:
    s = session(
        loop("s.c.1", None, "a", "b"),
        loop("s.c.2", "s.c.1", "c"),
        loop("s.c.3", "s.c.1", "x"),
        loop("s.c.4", "s.c.2", "d"),
    )
    assert s.loop_chain_to("s.c.4") == ["s.c.1", "s.c.2", "s.c.4"]
    assert [m.content[0].text for m in s.context_at("s.c.4")] == ["a", "b", "c", "d"]  # type: ignore[union-attr]
    with pytest.raises(ps.LoopNotFound, match="no loop 'nope' in session 's'"):
        s.context_at("nope")
    assert issubclass(ps.LoopNotFound, ps.PhiSessionError)


def test_compaction_block_stands_in_for_a_loops_messages() -> None:
    first = loop("s.c.1", None, "a", "b", "c")
    first.compaction_block = ps.CompactionBlock(
        keep_compacted=CompactedSection(
            range=TurnRange(start_turn=0, end_turn=3), messages=(user("summary"),)
        ),
        keep_recent=CompactedSection(range=TurnRange(start_turn=4, end_turn=4), messages=(user("c"),)),
        created_at=T,
    )
    s = session(first, loop("s.c.2", "s.c.1", "d"))
    # As phi-core's build_context_from_session: the loop resumed from reads all of its
    # block; an earlier loop of the chain contributes only its compacted summary.
    assert [m.content[0].text for m in s.context_at("s.c.1")] == ["summary", "c"]  # type: ignore[union-attr]
    assert [m.content[0].text for m in s.context_at("s.c.2")] == ["summary", "d"]  # type: ignore[union-attr]


def test_keep_first_takes_message_groups_as_phi_core_does() -> None:
    # phi-core's TurnMap: consecutive messages of one turn are a group, a message without a
    # turn id one of its own. Joining the turns' messages put a turn's tool result (an
    # input of its turn too) twice, the first before its call.
    def said(text: str, turn: int | None) -> ps.UserMessage:
        turn_id = None if turn is None else ps.TurnId(loop_id="s.c.1", turn_index=turn)
        return ps.UserMessage(content=(ps.TextContent(text=text),), timestamp=1, turn_id=turn_id)

    record = loop("s.c.1", None)
    record.messages = [said("prompt", None), said("call", 0), said("result", 0), said("answer", 1)]
    s = session(record)
    for first, last, kept in [
        (0, 0, ["prompt"]),
        (0, 1, ["prompt", "call", "result"]),
        (1, 2, ["call", "result", "answer"]),
        (0, 3, []),  # past the last group: none, as in phi-core
    ]:
        record.compaction_block = ps.CompactionBlock(
            keep_first=TurnRange(start_turn=first, end_turn=last), created_at=T
        )
        assert [m.content[0].text for m in s.context_at("s.c.1")] == kept  # type: ignore[union-attr]


def test_a_rerun_of_a_loop_replaces_it_on_the_chain() -> None:
    # A rerun continues the parent of the loop it retries (phi-core: "reruns: only the
    # active ancestor chain"), so the context at the rerun does not hold the retried answer.
    s = session(
        loop("s.c.1", None, "ask"), loop("s.c.2", "s.c.1", "first try"), loop("s.c.3", "s.c.1", "retry")
    )
    assert [m.content[0].text for m in s.context_at("s.c.3")] == ["ask", "retry"]  # type: ignore[union-attr]


def test_iter_events_per_loop_by_sequence_then_session_scoped() -> None:
    def start(loop_id: str) -> ps.AgentStart:
        return ps.AgentStart(loop_id=loop_id, session_id="s", agent_id="a", timestamp=T)

    first, second = loop("s.c.1", None), loop("s.c.2", "s.c.1")
    first.events = [
        ps.LoopEvent(sequence=1, event=start("s.c.1b")),
        ps.LoopEvent(sequence=0, event=start("s.c.1")),
    ]
    second.events = [ps.LoopEvent(sequence=0, event=start("s.c.2"))]
    s = session(first, second)
    s.session_events = [start("s.session")]
    assert [
        (item.loop.loop_id if item.loop else None, item.sequence, item.event.loop_id)  # type: ignore[attr-defined]
        for item in s.iter_events()
    ] == [("s.c.1", 0, "s.c.1"), ("s.c.1", 1, "s.c.1b"), ("s.c.2", 0, "s.c.2"), (None, None, "s.session")]


def test_navigation_and_totals() -> None:
    root = loop("s.c.1", None, "a")
    root.children_loop_ids = ["s.c.2"]
    sub_root = loop("s.sub.1", "other.c.9", "z")
    s = session(root, loop("s.c.2", "s.c.1", "b", "c"), sub_root)
    assert [r.loop_id for r in s.root_loops()] == ["s.c.1", "s.sub.1"]
    assert [r.loop_id for r in s.children_of("s.c.1")] == ["s.c.2"]
    assert s.children_of("missing") == [] and s.parallel_siblings("s.c.1") == []
    assert s.total_usage() == ps.Usage(input=4, output=3, total_tokens=7)
    assert s.loop_chain_to("s.sub.1") == ["other.c.9", "s.sub.1"]
    assert s.get_loop("s.c.2").get_turn(0) is None  # type: ignore[union-attr]


def test_self_parented_loop_does_not_hang() -> None:
    # phi-core's compaction pass reuses its loop id as its own parent.
    s = session(loop("s.c.1", "s.c.1", "a"))
    assert s.loop_chain_to("s.c.1") == ["s.c.1"]


class CountedLoops(list[ps.LoopRecord]):
    """A session's loops that count the passes made over them."""

    passes = 0

    def __iter__(self) -> Iterator[ps.LoopRecord]:
        self.passes += 1
        return super().__iter__()

    def __reversed__(self) -> Iterator[ps.LoopRecord]:
        self.passes += 1
        return super().__reversed__()


def chain_of(count: int) -> ps.Session:
    """A session of `count` loops, each continuing the one before, loops counted."""
    s = session(*(loop(f"s.c.{i}", f"s.c.{i - 1}" if i else None, f"m{i}") for i in range(count)))
    s.loops = CountedLoops(s.loops)
    return s


def test_a_long_chain_is_walked_with_one_pass_over_the_loops() -> None:
    s = chain_of(200)
    last = "s.c.199"
    assert len(s.context_at(last)) == 200
    assert len(s.loop_chain_to(last)) == len(s.context_chain_to(last)) == 200
    assert s.loops.passes <= 3  # type: ignore[attr-defined]
    index = s.loop_index()
    assert s.context_at(last, index=index) == s.context_at(last)
    assert s.loop_chain_to(last, index=index) == s.loop_chain_to(last)


def test_the_loop_index_holds_the_first_loop_of_an_id() -> None:
    first, second = loop("s.c.1", None, "a"), loop("s.c.1", None, "b")
    s = session(first, second, loop("s.c.2", "s.c.1", "c"))
    assert s.loop_index()["s.c.1"] is first is s.get_loop("s.c.1")
    assert [m.content[0].text for m in s.context_at("s.c.2")] == ["a", "c"]  # type: ignore[union-attr]


def test_metadata_that_refers_back_to_its_records_is_collected() -> None:
    import gc
    import weakref

    class Agent:  # a user's object, in the metadata, that holds the recorder
        recorder: ps.SessionRecorder

    def record_with_a_cycle() -> weakref.ref[Agent]:
        agent = Agent()
        agent.recorder = ps.SessionRecorder()
        metadata = {"agent": agent}
        agent.recorder.on_event(
            ps.AgentStart(agent_id="a", session_id="s", loop_id="s.c.1", timestamp=T, metadata=metadata)
        )
        agent.recorder.on_event(
            ps.AgentStart(agent_id="a", session_id="s", loop_id="s.c.1", timestamp=T, metadata=metadata)
        )
        agent.recorder.on_event(
            ps.AgentEnd(loop_id="s.c.1", messages=(), usage=ps.Usage(input=0, output=0), timestamp=T)
        )
        agent.recorder.checkpoint()
        [session] = agent.recorder.sessions()
        metadata["session"] = session  # and straight back at the records
        metadata["loop"] = session.loops[0]
        return weakref.ref(agent)

    gone = record_with_a_cycle()
    gc.collect()
    assert gone() is None
