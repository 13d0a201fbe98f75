"""AgentSession: ids, loop-id allocation, rotation and formations, on a fake clock."""

from __future__ import annotations

import gc
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import phi_session as ps
from phi_session._alphanumeric import is_alphanumeric
from phi_session.identity import AgentSession, FakeClock, config_id_of
from phi_session.instrument import Tracer

from .conftest import in_forked_child, needs_fork

START = "2025-06-01T09:00:00Z"


def agent(tick: float = 0.0) -> tuple[AgentSession, FakeClock]:
    clock = FakeClock(START, tick=tick)
    return AgentSession(clock=clock), clock


def first_loop(ns: int) -> ps.SessionFormation:
    return ps.SessionFormation.first_loop(ps.Timestamp.from_ns(ns))


def is_uuid4(text: str) -> bool:
    return uuid.UUID(text).version == 4 and str(uuid.UUID(text)) == text


def test_fresh_identity_is_two_uuid4s_and_a_given_agent_id_is_kept() -> None:
    fresh = AgentSession()
    assert is_uuid4(fresh.agent_id) and is_uuid4(fresh.session_id)
    assert fresh.agent_id != fresh.session_id
    assert AgentSession("my-agent").agent_id == "my-agent"
    assert AgentSession(session_id="s").session_id == "s"


def test_loop_ids_count_per_config_and_restart_in_a_new_session() -> None:
    a, _ = agent()
    first = a.session_id
    assert [a.next_loop_id("x.m"), a.next_loop_id("y.n"), a.next_loop_id("x.m")] == [
        f"{first}.x.m.1",
        f"{first}.y.n.1",
        f"{first}.x.m.2",
    ]
    second = a.new_session()
    assert second != first and a.session_id == second
    assert a.next_loop_id("x.m") == f"{second}.x.m.1"


def test_config_id_is_explicit_or_derived_like_phi_core() -> None:
    snap = ps.LoopConfigSnapshot
    assert config_id_of(snap(model="m", provider="p", config_id="mine")) == "mine"
    assert config_id_of(snap(model="claude-opus-4.5", provider="anthropic")) == "anthropic.claude-opus-4-5"
    assert config_id_of(snap(model="o3", provider="openai", thinking_level="high")) == "openai.o3.thinking"
    off = snap(model="o3", provider="openai", thinking_level="off", reasoning=True)
    assert config_id_of(off) == "openai.o3"
    assert config_id_of(snap(model="o3", provider="openai", reasoning=True)) == "openai.o3.thinking"
    assert config_id_of(snap(model="a/b c", provider="x")) == "x.a-b-c"


@pytest.mark.parametrize(
    ("model", "slug"),
    [
        ("a\u0345b", "a\u0345b"),  # an Other_Alphabetic mark: Rust's is_alphanumeric, not str.isalnum
        ("ka\u0903", "ka\u0903"),  # Devanagari visarga, a spacing mark that is Other_Alphabetic
        ("\U00011f04x", "\U00011f04x"),  # a Kawi letter (Unicode 15), unknown to Python 3.11's tables
        ("\u2160\u00b2\u2460", "\u2160\u00b2\u2460"),  # Nl and No numbers are alphanumeric in both
        ("e\u0301", "e-"),  # a combining accent is no letter in either
    ],
)
def test_model_slug_keeps_what_rusts_is_alphanumeric_keeps(model: str, slug: str) -> None:
    """str.isalnum replaced Other_Alphabetic marks, so the config id differed from phi-core's."""
    assert config_id_of(ps.LoopConfigSnapshot(model=model, provider="p")) == f"p.{slug}"


def test_rusts_alphanumeric_table_holds_every_python_alphanumeric() -> None:
    """Rust's set (Alphabetic or Numeric, of a newer Unicode) contains Python's isalnum."""
    missing = [hex(p) for p in range(0x110000) if chr(p).isalnum() and not is_alphanumeric(chr(p))]
    assert missing == []


def test_a_session_that_never_ran_a_loop_is_never_rotated() -> None:
    a, clock = agent()
    clock.advance(10_000)
    assert a.check_and_rotate(1) is None
    a.new_session()
    clock.advance(10_000)
    assert a.check_and_rotate(0) is None


def test_rotation_happens_only_strictly_after_the_threshold() -> None:
    a, clock = agent()
    session = a.session_id
    loop_id = a.next_loop_id("c")
    a.loop_started(session, loop_id, clock())
    clock.advance(60)
    assert a.check_and_rotate(60) is None  # exactly the threshold: not idle *longer*
    assert a.check_and_rotate(timedelta(seconds=59.5)) is not None
    assert a.session_id != session and a.last_loop_id is None and a.last_loop_started_at is None
    assert a.next_loop_id("c").endswith(".c.1")
    clock.advance(3600)
    assert a.check_and_rotate(1) is None  # the new session has not run a loop yet


def test_idleness_is_measured_from_the_last_loop_start() -> None:
    a, clock = agent()
    session = a.session_id
    a.loop_started(session, a.next_loop_id("c"), clock())
    clock.advance(50)
    a.loop_started(session, a.next_loop_id("c"), clock())
    clock.advance(50)
    assert a.check_and_rotate(60) is None
    assert a.last_loop_started_at == ps.Timestamp.parse("2025-06-01T09:00:50Z")


def test_threshold_must_be_a_non_negative_duration() -> None:
    a, _ = agent()
    for bad in (-1, float("nan"), timedelta(seconds=-1)):
        with pytest.raises(ValueError):
            a.check_and_rotate(bad)


def test_first_loop_of_each_session_gets_its_formation_once() -> None:
    a, clock = agent()
    first = a.session_id
    at = clock()
    assert a.loop_started(first, f"{first}.c.1", at) == first_loop(at)
    assert a.loop_started(first, f"{first}.c.2", clock()) is None

    clock.advance(7200.75)
    rotated_at = clock.peek()
    second = a.check_and_rotate(timedelta(minutes=30, seconds=0.9))
    assert second is not None
    formation = a.loop_started(second, f"{second}.c.1", clock())
    assert formation == ps.SessionFormation.inactivity_timeout(
        threshold_secs=1800, previous_session_id=first, timestamp=rotated_at
    )

    third = a.new_session()
    at = clock()
    assert a.loop_started(third, f"{third}.c.1", at) == first_loop(at)


def test_an_explicit_rotation_overrides_a_pending_inactivity_formation() -> None:
    a, clock = agent()
    a.loop_started(a.session_id, "l", clock())
    clock.advance(100)
    assert a.check_and_rotate(10) is not None
    fresh = a.new_session()
    formation = a.loop_started(fresh, "l2", clock())
    assert formation is not None and formation.kind == "FirstLoop"


def test_a_loop_of_an_earlier_session_changes_nothing() -> None:
    a, clock = agent()
    old = a.session_id
    early = a.next_loop_id("c")  # e.g. a parallel branch announced before the rotation
    new = a.new_session()
    assert a.loop_started(old, early, clock()) is None
    assert a.last_loop_id is None
    assert a.loop_started(new, "n", clock()) is not None


def test_spawn_gives_new_ids_on_the_same_clock_and_id_factory() -> None:
    counter = iter(range(100))
    a = AgentSession(clock=FakeClock(START), id_factory=lambda: f"id{next(counter)}")
    child = a.spawn()
    assert (a.agent_id, a.session_id) == ("id0", "id1")
    assert (child.agent_id, child.session_id) == ("id2", "id3")
    assert child.clock is a.clock and child.id_factory is a.id_factory
    assert a.spawn("named").agent_id == "named"


def test_loop_ids_from_many_threads_are_unique_and_contiguous() -> None:
    a, _ = agent()
    ids: list[str] = []
    lock = threading.Lock()

    def work() -> None:
        mine = [a.next_loop_id("c") for _ in range(500)]
        with lock:
            ids.extend(mine)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(int(i.rsplit(".", 1)[1]) for i in ids) == list(range(1, 4001))


def test_fake_clock_ticks_and_advances() -> None:
    clock = FakeClock(START, tick=0.5)
    start = ps.Timestamp.parse(START).ns
    assert [clock(), clock()] == [start, start + 500_000_000]
    clock.advance(timedelta(hours=1))
    assert clock.peek() == ps.Timestamp.from_ns(start + 3600 * 10**9 + 10**9)
    with pytest.raises(ValueError):
        clock.advance(-1)
    assert FakeClock(5)() == 5


@given(  # clock readings: none before the epoch, some past year 9999 (written with a sign)
    st.lists(st.integers(min_value=0, max_value=10**21), min_size=1, max_size=20),
    st.integers(min_value=0, max_value=10**9 - 1),
)
def test_fast_timestamps_equal_the_reference_formatting(seconds: list[int], fraction: int) -> None:
    a = AgentSession(clock=FakeClock(0))
    for ns in seconds:
        # Runs of readings within one second exercise the cached date.
        for value in (ns, ns - ns % 10**9 + fraction, ns - ns % 10**9):
            assert str(a.stamp(value)) == str(ps.Timestamp.from_ns(value))


@contextmanager
def rotating(agent: AgentSession) -> Iterator[None]:
    """Another thread rotates `agent`'s session again and again while the block runs."""
    stop = threading.Event()

    def rotate() -> None:
        while not stop.is_set():
            agent.new_session()

    thread = threading.Thread(target=rotate)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def test_allocate_loop_reads_the_session_and_the_loop_id_together() -> None:
    agent = AgentSession(clock=FakeClock())
    with rotating(agent):
        pairs = [agent.allocate_loop("c") for _ in range(20000)]
    assert all(loop_id.startswith(session_id + ".") for session_id, loop_id in pairs)


def unique_id(name: str) -> str:
    """A session id no other test gives: the loop counters of a session id given in a
    process outlive its identities (`identity._RECENT_SESSIONS`)."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


def test_allocate_loops_numbers_each_config_in_one_session() -> None:
    s = unique_id("s")
    agent = AgentSession(clock=FakeClock(), session_id=s)
    assert agent.allocate_loop("b") == (s, f"{s}.b.1")
    assert agent.allocate_loops(["a", "b", "a"]) == (s, [f"{s}.a.1", f"{s}.b.2", f"{s}.a.2"])
    assert agent.allocate_loops([]) == (s, [])
    assert agent.next_loop_id("a") == f"{s}.a.3"


def test_allocate_loops_is_one_step_against_a_concurrent_rotation() -> None:
    agent = AgentSession(clock=FakeClock())
    with rotating(agent):
        batches = [agent.allocate_loops(["c", "d", "c"]) for _ in range(5000)]
    for session_id, loop_ids in batches:
        assert all(loop_id.startswith(session_id + ".") for loop_id in loop_ids)
        counts = [int(loop_id.rsplit(".", 1)[1]) for loop_id in loop_ids]
        assert counts[2] == counts[0] + 1  # the batch's two "c" loops are adjacent


def test_agents_share_one_timestamp_cache() -> None:
    # An adapter makes an AgentSession per framework session: the formatted second carries over.
    assert AgentSession()._stamper is AgentSession()._stamper


@pytest.mark.parametrize("last", ["a.1", "b.1", None])
def test_an_identity_goes_on_from_its_progress(last: str | None) -> None:
    s = unique_id("s")
    last = None if last is None else f"{s}.{last}"
    a = AgentSession("agent", session_id=s, clock=FakeClock(START))
    a.allocate_loops(["a", "a", "b"])
    if last is not None:
        a.loop_started(s, last, a.clock())
    b = AgentSession.from_progress(a.progress(), clock=a.clock)
    assert (b.agent_id, b.session_id, b.last_loop_id) == ("agent", s, last)
    assert b.allocate_loops(["a", "b", "c"]) == (s, [f"{s}.a.3", f"{s}.b.2", f"{s}.c.1"])
    formation = b.loop_started(s, f"{s}.c.1", b.clock())  # the first loop's formation is recorded once
    assert (formation is None) == (last is not None)


@pytest.mark.parametrize("number", ["²", "١٢", "9" * 5000, "9" * 4300])
def test_resume_skips_a_loop_number_no_counter_could_have_written(number: str) -> None:
    """A stored loop id ending in a Unicode digit (``str.isdigit`` takes "²") or in a
    number past what int() reads raised ValueError, and resuming that session failed."""
    s = unique_id("s")
    agent = AgentSession("a", session_id=s)
    agent.resume([f"{s}.c.2", f"{s}.c.{number}"], f"{s}.c.{number}")
    assert agent.next_loop_id("c") == f"{s}.c.3"
    assert agent.last_loop_id == f"{s}.c.{number}"


def recorded_session(session_id: str) -> ps.Session:
    """A recorded session of one loop, ``{session_id}.c.1``."""
    loop = ps.LoopRecord.start(
        loop_id=f"{session_id}.c.1", session_id=session_id, agent_id="a", started_at=ps.Timestamp.parse(START)
    )
    return ps.Session(
        session_id=session_id,
        agent_id="a",
        created_at=loop.started_at,
        last_active_at=loop.started_at,
        formation=ps.SessionFormation.first_loop(loop.started_at),
        loops=[loop],
    )


def test_identities_going_on_with_one_recording_share_its_loop_counter() -> None:
    """Each counted from the recording alone: two made before either allocated both
    handed out ``.c.2``, and two replays of one session recorded one loop id twice."""
    joined = unique_id("joined")
    session = recorded_session(joined)
    first, second = AgentSession.continuing(session), AgentSession.continuing(session)
    ids = []

    def allocate(agent: AgentSession) -> None:
        ids.extend(agent.next_loop_id("c") for _ in range(500))

    threads = [threading.Thread(target=allocate, args=(agent,)) for agent in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(ids) == sorted(f"{joined}.c.{n}" for n in range(2, 1002))
    assert first.new_session() != joined and first.next_loop_id("c").endswith(".c.1")  # a new session's own
    del first, second
    gc.collect()
    # Kept once no identity holds the session (for a while: see the test of their lifetime).
    assert AgentSession.continuing(session).next_loop_id("c") == f"{joined}.c.1002"


def test_an_identity_made_for_a_session_another_made_shares_its_loop_counter() -> None:
    """A live agent's identity and one going on with its session (a replay of it through
    another tracer) counted apart: both handed out ``.c.2``, and the live loop's record
    was lost to the recorder's orphans."""
    live = AgentSession()
    first = live.next_loop_id("c")
    recorded = recorded_session(live.session_id)
    replay = AgentSession.continuing(recorded)
    assert first == f"{live.session_id}.c.1"
    assert [replay.next_loop_id("c"), live.next_loop_id("c")] == [
        f"{live.session_id}.c.2",
        f"{live.session_id}.c.3",
    ]
    # A rotation's fresh session is shared alike.
    rotated = live.new_session()
    assert live.next_loop_id("c") == f"{rotated}.c.1"
    assert AgentSession.continuing(recorded_session(rotated)).next_loop_id("c") == f"{rotated}.c.2"
    # An identity given the session's id takes part too.
    assert AgentSession(session_id=live.session_id).next_loop_id("c") == f"{live.session_id}.c.3"


def test_identities_given_one_session_id_share_its_loop_counter() -> None:
    """Two concurrent requests of one conversation, each with an `AgentSession` of its id,
    both handed out loop 1: the recorder kept one loop and orphaned the other's end."""
    conversation = unique_id("conversation")
    first, second = AgentSession(session_id=conversation), AgentSession(session_id=conversation)
    assert [first.next_loop_id("c"), second.next_loop_id("c"), first.next_loop_id("c")] == [
        f"{conversation}.c.1",
        f"{conversation}.c.2",
        f"{conversation}.c.3",
    ]
    # The one identity per session of a destination an adapter holds counts apart: the id
    # (a framework's thread id) may name another destination's session too.
    assert AgentSession.of_destination("a", conversation).next_loop_id("c") == f"{conversation}.c.1"
    # Ids an injected factory makes (a test's s1, s2...) may name other sessions: not shared.
    made = iter(["a", "s1", "b", "s1"])
    one, other = (AgentSession(id_factory=lambda: next(made)) for _ in range(2))
    assert one.next_loop_id("c") == other.next_loop_id("c") == "s1.c.1"


def test_a_session_ids_loop_numbers_go_on_however_late_its_last_identity_is_freed() -> None:
    """The counters went with the last identity holding them: a request's identity that
    its kept exception's traceback held (a cycle) went only when the collector ran, and
    the next request of the conversation numbered its loop 2, or 1 again after a
    collection (the first request's loop id: the recorder merged the two loops)."""
    conversation = unique_id("conversation")

    def request() -> str:
        agent = AgentSession(session_id=conversation)
        loop_id = agent.next_loop_id("c")
        try:
            raise ValueError("provider timeout")
        except ValueError as error:
            kept = error  # a cycle: its traceback holds this frame, which holds it and the identity
        assert kept
        return loop_id

    first = request()
    gc.collect()
    second = request()
    assert [first, second] == [f"{conversation}.c.1", f"{conversation}.c.2"]


def test_the_loop_counters_of_the_sessions_numbered_last_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    from phi_session import identity

    monkeypatch.setattr(identity, "_RECENT_SESSIONS", 2)
    old, middle, new = unique_id("old"), unique_id("middle"), unique_id("new")
    for session_id in (old, middle, new):
        AgentSession(session_id=session_id).next_loop_id("c")
    gc.collect()
    # Past the bound, the oldest is let go: a new identity of it counts from 1 (or after
    # the loops a store holds: `AgentSession.resume`).
    assert [AgentSession(session_id=s).next_loop_id("c") for s in (middle, new, old)] == [
        f"{middle}.c.2",
        f"{new}.c.2",
        f"{old}.c.1",
    ]
    # Identities counting alone (an adapter's, an injected factory's ids) keep nothing.
    made = iter(["a", middle])
    AgentSession.of_destination("a", new).next_loop_id("c")
    AgentSession(id_factory=lambda: next(made)).next_loop_id("c")
    assert AgentSession(session_id=new).next_loop_id("c") == f"{new}.c.3"


@pytest.mark.parametrize("bad", ["team.alpha", "", "../x", "a/b", "nul\x00", "x" * 201])
def test_a_session_id_no_loop_id_or_store_can_hold_is_refused(bad: str) -> None:
    # "team.alpha" was taken: its loop ids named session "team" to phi-core, and a later
    # continuation was recorded as spawned from it; the others failed only when saved.
    with pytest.raises(ps.InvalidSessionId):
        AgentSession(session_id=bad)
    made = iter(["agent", bad])
    with pytest.raises(ps.InvalidSessionId):
        AgentSession(id_factory=lambda: next(made))
    made = iter(["agent", "s1", bad])
    agent = AgentSession(id_factory=lambda: next(made))
    with pytest.raises(ps.InvalidSessionId):
        agent.new_session()
    assert agent.session_id == "s1"  # a refused rotation leaves the session as it was
    team = unique_id("team-alpha")
    assert AgentSession(session_id=team).next_loop_id("c") == f"{team}.c.1"


def test_an_identitys_arguments_are_checked_where_they_enter() -> None:
    # Taken in, an id that is no text was written into every loop of a session no store loads.
    with pytest.raises(TypeError, match="agent_id must be str or None, not int"):
        AgentSession(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="session_id must be str or None, not int"):
        AgentSession(session_id=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="clock must be callable or None, not int"):
        AgentSession(clock=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"id_factory\(\) must be str, not int"):
        AgentSession(id_factory=lambda: 5)  # type: ignore[arg-type,return-value]
    made = iter(["a", "s1", 7])
    agent = AgentSession(clock=FakeClock(), id_factory=lambda: next(made))  # type: ignore[arg-type]
    agent.loop_started(agent.session_id, agent.next_loop_id("c"), 0)
    with pytest.raises(TypeError, match=r"id_factory\(\) must be str, not int"):
        agent.new_session()
    assert agent.session_id == "s1"  # a refused rotation leaves the session as it was
    with pytest.raises(TypeError, match="threshold must be a number of seconds or a timedelta, not str"):
        agent.check_and_rotate("30")  # type: ignore[arg-type]
    with pytest.raises(ps.InvalidArgument, match="threshold must be a number of seconds >= 0, got -1"):
        agent.check_and_rotate(-1)
    with pytest.raises(TypeError, match="loop_id must be str, not int"):
        agent.set_last_loop(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="config must be LoopConfigSnapshot, not int"):
        config_id_of(5)  # type: ignore[arg-type]
    with pytest.raises(ps.InvalidArgument, match="backwards"):
        FakeClock().advance(-1)


class _Text(str):
    """Text of a library's own type, whose ``str`` is not its value."""

    def __str__(self) -> str:
        return "not the text"


def test_ids_given_as_a_str_subclass_are_kept_as_the_str_they_hold() -> None:
    # Kept as given, such an id went into every event and record of its loops, and no
    # store or JSONL file could write them.
    made = iter([_Text("s2")])
    agent = AgentSession(
        _Text("agent"), session_id=_Text("s1"), clock=FakeClock(), id_factory=lambda: next(made)
    )
    agent.set_last_loop(_Text("s1.c.7"))
    ids = (agent.agent_id, agent.session_id, agent.last_loop_id, agent.next_loop_id("c"))
    assert ids == ("agent", "s1", "s1.c.7", "s1.c.1") and {type(i) for i in ids} == {str}
    assert agent.new_session() == "s2" and type(agent.session_id) is str


@pytest.mark.parametrize("clock", [lambda: 1.7e9, lambda: 1.7e18, lambda: "2025", lambda: True])
def test_a_clock_that_gives_no_int_nanoseconds_is_refused_at_its_first_reading(clock: Any) -> None:
    # `clock=time.time` (float seconds) failed at the loop's start with "Unknown format
    # code 'd' for object of type 'float'", naming no clock.
    recorder = ps.SessionRecorder()
    tracer = Tracer(
        AgentSession(clock=clock), sinks=[recorder], config=ps.LoopConfigSnapshot(model="m", provider="p")
    )
    for read in (tracer.agent.now, tracer.agent.millis, tracer.loop().start):
        with pytest.raises(
            TypeError, match=r"the clock's reading must be int nanoseconds since the epoch .*, not "
        ):
            read()
    recorder.flush()
    assert recorder.drain_completed() == []


@pytest.mark.parametrize("reading", [-5, -1_748_768_400_000_000_000])
def test_a_clock_reading_before_the_epoch_is_refused_at_the_reading(reading: int) -> None:
    # Taken, it made message timestamps of -1 ms: the session was saved, and neither
    # decode_session nor the store could load it again (StoredSessionUnusable).
    recorder = ps.SessionRecorder()
    tracer = Tracer(
        AgentSession(clock=lambda: reading),
        sinks=[recorder],
        config=ps.LoopConfigSnapshot(model="m", provider="p"),
    )
    for read in (tracer.agent.now, tracer.agent.millis, tracer.loop().start):
        with pytest.raises(ps.InvalidArgument, match=rf"the clock's reading .* before the epoch: {reading}"):
            read()
    recorder.flush()
    assert recorder.drain_completed() == []


def test_a_clock_giving_another_integer_type_is_taken() -> None:
    class Nanoseconds:  # what a NumPy integer is to Python: an integer through __index__
        def __index__(self) -> int:
            return 1_748_768_400_123_000_000

    agent = AgentSession(clock=Nanoseconds)  # type: ignore[arg-type]
    assert str(agent.now()) == "2025-06-01T09:00:00.123Z" and agent.millis() == 1_748_768_400_123


@needs_fork
def test_a_forked_child_records_into_a_session_of_its_own_when_the_identity_made_its_id() -> None:
    """Every worker forked from a process whose tracer had made its session went on with
    that session and its loop counters: two workers wrote one loop id at the same time,
    and a store's merge kept one of the two loops."""
    tracer = Tracer()  # an identity of its own making, as a pre-fork server's tracer has
    parent = tracer.agent
    shared = parent.session_id
    assert tracer.loop(config_id="c").loop_id == f"{shared}.c.1"
    read, write = os.pipe()

    def work() -> None:
        loop = tracer.loop(config_id="c")  # its first use in the child
        assert loop.session_id == parent.session_id != shared and is_uuid4(loop.session_id)
        assert loop.loop_id == f"{loop.session_id}.c.1" and parent.last_loop_id is None
        assert parent.loop_started(loop.session_id, loop.loop_id, 5) == first_loop(5)
        os.write(write, loop.session_id.encode() + b"\n")

    assert [in_forked_child(work), in_forked_child(work)] == [0, 0]
    os.close(write)
    with os.fdopen(read) as children:
        first, second = children.read().split()
    assert len({first, second, shared}) == 3  # each worker a session of its own
    assert parent.session_id == shared and tracer.loop(config_id="c").loop_id == f"{shared}.c.2"


@needs_fork
def test_a_forked_child_keeps_a_given_session_id_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    thread, joined = unique_id("thread"), unique_id("joined")
    given = AgentSession(session_id=thread)
    continued = AgentSession.continuing(recorded_session(joined))
    given.next_loop_id("c")

    def work() -> None:
        with caplog.at_level(logging.WARNING, "phi_session.identity"):
            assert [given.next_loop_id("c"), given.next_loop_id("c")] == [f"{thread}.c.2", f"{thread}.c.3"]
            assert continued.session_id == joined
            assert continued.next_loop_id("c") == f"{joined}.c.2"
        warned = [record.getMessage() for record in caplog.records]
        assert len(warned) == 2, warned
        assert warned[0].startswith(f"session '{thread}' was made before this process forked")
        assert f"'{joined}'" in warned[1]

    with caplog.at_level(logging.WARNING, "phi_session.identity"):
        assert in_forked_child(work) == 0
        assert given.next_loop_id("c") == f"{thread}.c.2"
    assert caplog.records == []  # the parent goes on as it was


@needs_fork
def test_a_forked_child_does_not_wait_for_a_lock_a_parent_thread_held_at_the_fork() -> None:
    """A thread of the parent the child does not have held the identity's lock at the fork:
    the child's first use waited for it for ever."""
    import signal

    agent = AgentSession()

    def work() -> None:
        signal.alarm(10)  # a hang fails the child instead of the suite
        assert agent.session_id

    with agent._lock:  # as a parent thread allocating a loop id at the fork would
        assert in_forked_child(work) == 0
