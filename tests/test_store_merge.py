"""merge_sessions: what a save does when the session id is already stored."""

from __future__ import annotations

from collections import Counter

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from phi_session.codec import encode_session
from phi_session.events import COMPACTION, ParallelLoopStart
from phi_session.messages import ZERO_USAGE
from phi_session.model import ChildLoopRef, LoopRecord, LoopStatus, ParallelGroupRecord, Session, SpawnRef
from phi_session.stores.base import merge_sessions
from phi_session.stores.conformance import at, make_loop, make_session

STATUSES: tuple[LoopStatus, ...] = ("Pending", "Running", "Completed", "Rejected", "Aborted")


def _ids(session: Session) -> list[str]:
    return [record.loop_id for record in session.loops]


def _keys(loops: list[LoopRecord]) -> list[tuple[str, int]]:
    """(loop_id, occurrence) of each record: how merge_sessions matches loops."""
    seen: Counter[str] = Counter()
    keys = []
    for record in loops:
        keys.append((record.loop_id, seen[record.loop_id]))
        seen[record.loop_id] += 1
    return keys


def _without_links(record: LoopRecord) -> LoopRecord:
    return msgspec.structs.replace(record, children_loop_ids=[], child_loop_refs=[])


def _ended(record: LoopRecord) -> int:
    """2: it ended (Completed, Rejected); 1: cut short (Aborted); 0: still running."""
    return {"Completed": 2, "Rejected": 2, "Aborted": 1}.get(record.status, 0)


# -- examples ----------------------------------------------------------------------------


def test_new_loops_are_appended_and_stored_ones_keep_their_place() -> None:
    stored = make_session("s", loops=[make_loop("s", 1), make_loop("s", 2, status="Running")])
    incoming = make_session("s", loops=[make_loop("s", 3), make_loop("s", 2, events=2), make_loop("s", 4)])
    merged = merge_sessions(stored, incoming)
    assert _ids(merged) == ["s.cfg.1", "s.cfg.2", "s.cfg.3", "s.cfg.4"]
    assert merged.loops[1] == incoming.loops[1]


def test_which_version_of_a_loop_wins() -> None:
    def winner(stored: LoopRecord, incoming: LoopRecord) -> LoopRecord:
        return merge_sessions(make_session("s", loops=[stored]), make_session("s", loops=[incoming])).loops[0]

    done, running = make_loop("s", 1, events=1), make_loop("s", 1, status="Running", events=9)
    assert winner(done, running) is done  # a running snapshot never replaces a finished loop
    assert winner(running, done) is done
    fewer, more = make_loop("s", 1, events=1), make_loop("s", 1, events=2)
    assert winner(fewer, more) is more  # among ended versions, more events win
    assert winner(more, fewer) is more
    # A version cut short never replaces one that ended, even with as many events or
    # more (it arrived later, out of order, or was sent again and never ended).
    for events in (2, 3):
        aborted = make_loop("s", 1, status="Aborted", events=events)
        assert winner(more, aborted) is more
        assert winner(aborted, more) is more
    assert winner(make_loop("s", 1, status="Rejected"), aborted).status == "Rejected"
    assert winner(running, aborted) is aborted  # but it replaces a running snapshot
    first, second = make_loop("s", 1, events=1, tokens=1), make_loop("s", 1, events=1, tokens=2)
    assert winner(first, second) is second  # a tie goes to the incoming save


def test_repeated_loop_ids_match_by_occurrence() -> None:
    # phi-core's compaction reuses a loop id: two records, matched first with first.
    stored = make_session("s", loops=[make_loop("s", 1), make_loop("s", 1, status="Running")])
    incoming = make_session("s", loops=[make_loop("s", 1), make_loop("s", 1, events=3), make_loop("s", 1)])
    merged = merge_sessions(stored, incoming)
    assert _ids(merged) == ["s.cfg.1"] * 3
    assert [r.status for r in merged.loops] == ["Completed", "Completed", "Completed"]
    assert len(merged.loops[1].events) == 3


def test_the_same_loop_saved_with_another_start_time_is_one_record() -> None:
    # A restarted or re-stamped AgentStart: the two versions were alive at the same
    # time, so they are one loop, whatever their start times say.
    running = make_loop("s", 1, status="Running", events=2, started_at=at(0))
    done = make_loop("s", 1, events=3, started_at=at(5))
    for stored, incoming in ((running, done), (done, running)):
        merged = merge_sessions(make_session("s", loops=[stored]), make_session("s", loops=[incoming]))
        assert merged.loops == [done]  # the finished version wins, its start time with it
    # Finished versions whose lifetimes overlap (each lasts half a second).
    fewer = make_loop("s", 1, events=1, started_at=at(0))
    more = make_loop("s", 1, events=4, started_at=at(0.25))
    for stored, incoming in ((fewer, more), (more, fewer)):
        merged = merge_sessions(make_session("s", loops=[stored]), make_session("s", loops=[incoming]))
        assert merged.loops == [more]  # more events win
    tied = make_loop("s", 1, events=1, tokens=7, started_at=at(0.25))
    merged = merge_sessions(make_session("s", loops=[fewer]), make_session("s", loops=[tied]))
    assert merged.loops == [tied]  # a tie goes to the incoming save


def test_one_loop_id_run_by_two_agents_at_the_same_time_is_two_records() -> None:
    # Two processes' adapters each numbered their run of one session N (both started
    # before either was saved): one agent's record replaced the other's, a run lost.
    mine = make_loop("s", 1, events=2, started_at=at(0), agent_id="worker-a")
    theirs = make_loop("s", 1, events=3, started_at=at(0.25), agent_id="worker-b")
    twin = make_loop("s", 1, events=1, started_at=at(0), agent_id="worker-b")  # the same instant too
    for other in (theirs, twin):
        merged = merge_sessions(make_session("s", loops=[mine]), make_session("s", loops=[other]))
        assert merged.loops == [mine, other]
        again = merge_sessions(merged, make_session("s", loops=[other, mine]))
        assert again.loops == merged.loops  # saving either again matches it with itself
    # A branch the recorder registered before it started has no agent yet: the same loop.
    pending = make_loop("s", 1, status="Pending", started_at=at(0), agent_id="")
    for stored, incoming in ((pending, mine), (mine, pending)):
        merged = merge_sessions(make_session("s", loops=[stored]), make_session("s", loops=[incoming]))
        assert merged.loops == [mine]


def test_an_id_used_again_after_its_loop_ended_is_a_second_record() -> None:
    # phi-core's compaction pass starts a record under the id of the last, finished
    # loop (as its own parent); phi-core keeps both, and so does the merge.
    original = make_loop("s", 1, events=2, started_at=at(0))  # ends at 0.5 s
    first_pass = make_loop("s", 1, events=1, parent_index=1, started_at=at(0.5))
    second_pass = make_loop("s", 1, events=1, parent_index=1, started_at=at(20))
    merged = merge_sessions(make_session("s", loops=[original]), make_session("s", loops=[first_pass]))
    merged = merge_sessions(merged, make_session("s", loops=[second_pass]))
    assert [record.started_at for record in merged.loops] == [at(0), at(0.5), at(20)]
    again = merge_sessions(merged, make_session("s", loops=[original, first_pass, second_pass]))
    assert again.loops == merged.loops  # saving them all again matches each with itself
    # A snapshot taken while the second pass was still running is that pass.
    running_pass = make_loop("s", 1, status="Running", parent_index=1, started_at=at(19.9))
    assert merge_sessions(merged, make_session("s", loops=[running_pass])).loops == merged.loops


def test_a_compaction_pass_is_never_its_loops_record() -> None:
    # Passes stamped with their loop's start (a clock of ms) while its record lasts on, each
    # saved on its own: the first pass replaced the loop's record, the second the first pass.
    loop = make_loop("s", 1, events=2, started_at=at(0))  # ends at 0.5 s
    passes = []
    for ended in (at(0.5), at(0.75)):
        compaction = make_loop("s", 1, events=1, parent_index=1, started_at=at(0))
        compaction.continuation_kind, compaction.ended_at = COMPACTION, ended
        passes.append(compaction)
    merged = make_session("s", loops=[loop])
    for compaction in passes:
        merged = merge_sessions(merged, make_session("s", loops=[compaction]))
    assert [_without_links(record) for record in merged.loops] == [loop, *passes]
    again = merge_sessions(merged, make_session("s", loops=[loop, *passes]))
    assert again.loops == merged.loops  # saving them all again matches each with itself


def test_session_header() -> None:
    stored = make_session("s", created_at=at(10), last_active_at=at(20))
    incoming = make_session("s", created_at=at(5), last_active_at=at(15))
    incoming.scope = "persistent"
    incoming.rejected = True
    merged = merge_sessions(stored, incoming)
    assert (merged.created_at, merged.last_active_at) == (at(5), at(20))
    assert merged.formation == stored.formation
    assert merged.scope == "persistent"
    assert merged.is_rejected
    assert merge_sessions(incoming, stored).is_rejected  # rejection is never undone


def test_parent_spawn_ref() -> None:
    complete = make_session("s", parent_session_id="p")
    bare = make_session("s")
    provisional = make_session("s")
    provisional.parent_spawn_ref = SpawnRef(
        parent_session_id="p", parent_loop_id="p.cfg.1", tool_call_id="", tool_name=""
    )
    assert merge_sessions(bare, complete).parent_spawn_ref == complete.parent_spawn_ref
    assert merge_sessions(complete, bare).parent_spawn_ref == complete.parent_spawn_ref
    assert merge_sessions(complete, provisional).parent_spawn_ref == complete.parent_spawn_ref
    assert merge_sessions(provisional, complete).parent_spawn_ref == complete.parent_spawn_ref


def test_session_events_are_combined() -> None:
    def start(*loop_ids: str) -> ParallelLoopStart:
        return ParallelLoopStart(session_id="s", loop_ids=loop_ids, timestamp=at(1))

    stored, incoming = make_session("s"), make_session("s")
    stored.session_events = [start("a")]
    incoming.session_events = [start("a"), start("b"), start("a")]
    assert merge_sessions(stored, incoming).session_events == [start("a"), start("b"), start("a")]
    assert merge_sessions(stored, make_session("s")).session_events == [start("a")]
    assert merge_sessions(make_session("s"), stored).session_events == [start("a")]
    assert merge_sessions(make_session("s"), make_session("s")).session_events is msgspec.UNSET


def test_a_continuation_saved_after_a_drain_is_linked_to_its_parent() -> None:
    stored = make_session("s", loops=[make_loop("s", 1)])
    incoming = make_session("s", loops=[make_loop("s", 2, parent_index=1), make_loop("s", 3, parent_index=9)])
    merged = merge_sessions(stored, incoming)
    assert merged.loops[0].children_loop_ids == ("s.cfg.2",)  # .9 is not in this session
    assert stored.loops[0].children_loop_ids == ()  # the inputs are not modified
    running = make_session("s", loops=[make_loop("s", 2, status="Running", parent_index=1)])
    assert merge_sessions(stored, running).loops[0].children_loop_ids == ()  # not finished yet


def test_a_parent_saved_after_its_continuation_is_linked_to_it() -> None:
    """Its continuation's trace exported first: the parent, saved later, never got its child."""
    child, running = make_loop("s", 2, parent_index=1), make_loop("s", 3, status="Running", parent_index=1)
    stored = make_session("s", loops=[child, running, make_loop("s", 4, parent_index=2)])
    merged = merge_sessions(stored, make_session("s", loops=[make_loop("s", 1)]))
    assert [(r.loop_id, r.children_loop_ids) for r in merged.loops] == [
        ("s.cfg.2", ()),  # its child .4 was saved with it, linked by its recorder (or not at all)
        ("s.cfg.3", ()),
        ("s.cfg.4", ()),
        ("s.cfg.1", ("s.cfg.2",)),  # not the running .3: not finished yet
    ]


def test_unchanged_loops_are_not_linked() -> None:
    # phi-core does not link aborted loops; re-saving its file must not change it.
    aborted = make_loop("s", 2, status="Aborted", parent_index=1)
    session = make_session("s", loops=[make_loop("s", 1), aborted])
    assert encode_session(merge_sessions(session, session)) == encode_session(session)


def test_links_of_a_replaced_version_are_kept() -> None:
    ref = ChildLoopRef(tool_call_id="c", tool_name="t", child_loop_id="k.cfg.1", child_session_id="k")
    linked = make_loop("s", 1, events=1)
    linked.children_loop_ids = ("s.cfg.2",)
    linked.child_loop_refs = (ref,)
    later = make_loop("s", 1, events=2)
    merged = merge_sessions(make_session("s", loops=[linked]), make_session("s", loops=[later]))
    assert len(merged.loops[0].events) == 2
    assert merged.loops[0].children_loop_ids == ("s.cfg.2",)
    assert merged.loops[0].child_loop_refs == (ref,)


def test_a_replacing_version_without_its_parallel_group_keeps_the_group() -> None:
    # A producer that sent the loop again without its group's events (OTel ingest
    # linking a remote caller) must not take the loop out of its group.
    group = ParallelGroupRecord(
        all_loop_ids=("s.cfg.1", "s.cfg.2"),
        selected_loop_id="s.cfg.1",
        selected_config_index=0,
        evaluation_usage=ZERO_USAGE,
        is_selected=True,
    )
    grouped = make_loop("s", 1, events=1)
    grouped.parallel_group = group
    later = make_loop("s", 1, events=2)
    merged = merge_sessions(make_session("s", loops=[grouped]), make_session("s", loops=[later]))
    assert len(merged.loops[0].events) == 2
    assert merged.loops[0].parallel_group == group


# -- properties ----------------------------------------------------------------------------


@st.composite
def loops(draw: st.DrawFn) -> LoopRecord:
    return make_loop(
        "s",
        draw(st.integers(1, 4)),
        status=draw(st.sampled_from(STATUSES)),
        events=draw(st.integers(0, 3)),
        tokens=draw(st.integers(0, 2)),
        parent_index=draw(st.none() | st.integers(1, 4)),
    )


@st.composite
def sessions(draw: st.DrawFn) -> Session:
    created = draw(st.integers(0, 100))
    return make_session(
        "s",
        loops=draw(st.lists(loops(), max_size=6)),
        created_at=at(created),
        last_active_at=at(created + draw(st.integers(0, 100))),
    )


@given(sessions(), sessions())
def test_no_loop_is_lost_and_order_is_kept(stored: Session, incoming: Session) -> None:
    merged = merge_sessions(stored, incoming)
    stored_keys, incoming_keys = _keys(stored.loops), _keys(incoming.loops)
    new_keys = [key for key in incoming_keys if key not in stored_keys]
    assert _keys(merged.loops) == stored_keys + new_keys


@given(sessions(), sessions())
def test_each_loop_is_the_better_version(stored: Session, incoming: Session) -> None:
    merged = merge_sessions(stored, incoming)
    before = dict(zip(_keys(stored.loops), stored.loops, strict=True))
    after = dict(zip(_keys(incoming.loops), incoming.loops, strict=True))
    for key, record in zip(_keys(merged.loops), merged.loops, strict=True):
        old, new = before.get(key), after.get(key)
        # Ended beats cut short beats running, then more events win, then the incoming version.
        if new is None or (
            old is not None and (_ended(old), len(old.events)) > (_ended(new), len(new.events))
        ):
            expected = old
        else:
            expected = new
        assert expected is not None
        assert _without_links(record) == _without_links(expected)
        # Links of either version survive.
        for version in (old, new):
            if version is not None:
                assert set(version.children_loop_ids) <= set(record.children_loop_ids)
                assert all(ref in record.child_loop_refs for ref in version.child_loop_refs)


@given(sessions())
def test_merging_a_session_with_itself_changes_nothing(session: Session) -> None:
    assert merge_sessions(session, session) == session


@given(sessions(), sessions())
def test_saving_the_same_thing_twice_changes_nothing(stored: Session, incoming: Session) -> None:
    once = merge_sessions(stored, incoming)
    assert merge_sessions(once, incoming) == once


@given(sessions(), sessions())
def test_inputs_are_not_modified(stored: Session, incoming: Session) -> None:
    stored_bytes, incoming_bytes = encode_session(stored), encode_session(incoming)
    merge_sessions(stored, incoming)
    assert (encode_session(stored), encode_session(incoming)) == (stored_bytes, incoming_bytes)
