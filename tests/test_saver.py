"""SessionSaver: one policy for saving sessions (retries, orphans, nothing dropped), sync and async."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import msgspec
import pytest
from click.testing import CliRunner

import phi_session as ps
from phi_session import saver as saver_module
from phi_session.cli import main
from phi_session.codec import encode_event
from phi_session.journal import Journal, JournaledRecorder, recover
from phi_session.recorder import SessionRecorder
from phi_session.saver import SavedSpawners, SaveOutcome, SaveStats, SessionSaver
from phi_session.stores.base import SessionStore, merge_sessions
from phi_session.stores.conformance import spawned_apart
from phi_session.stores.json_dir import JsonDirStore

from .journal_kill_worker import stream
from .store_support import UndecodableRecords


class MemoryStore:
    """A merging store whose `save` runs `trouble(session)` first (which may raise)."""

    def __init__(self, trouble: Callable[[ps.Session], None] | None = None) -> None:
        self.sessions: dict[str, ps.Session] = {}
        self.attempts = 0
        self.trouble = trouble

    def save(self, session: ps.Session) -> None:
        self.attempts += 1
        if self.trouble is not None:
            self.trouble(session)
        if "/" in session.session_id:
            raise ps.InvalidSessionId(f"unsafe session id {session.session_id!r}")
        stored = self.sessions.get(session.session_id)
        self.sessions[session.session_id] = session if stored is None else merge_sessions(stored, session)

    async def asave(self, session: ps.Session) -> None:
        await asyncio.sleep(0)
        self.save(session)


def failing(times: int, error: Exception) -> Callable[[ps.Session], None]:
    left = [times]

    def trouble(session: ps.Session) -> None:
        if left[0] > 0:
            left[0] -= 1
            raise error

    return trouble


class FakeTime:
    """The saver's clock: sleeping advances it, and records the pause."""

    def __init__(self) -> None:
        self.now = 0.0
        self.pauses: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(saver_module, "time", SimpleNamespace(monotonic=fake.monotonic, sleep=fake.sleep))
    return fake


def sessions(count: int = 3) -> list[ps.Session]:
    recorder = SessionRecorder()
    recorder.record_all(stream(sessions=count, loops=1))
    recorder.flush()
    return recorder.drain_completed()


def saver_for(memory: MemoryStore, **options: Any) -> SessionSaver:
    return SessionSaver(cast(SessionStore, memory), **options)


@pytest.mark.parametrize(
    "error",
    [ps.SessionLocked("busy"), ps.StoreError("connection lost"), OSError(28, "No space left on device")],
)
def test_transient_errors_are_retried_with_doubling_pauses(clock: FakeTime, error: Exception) -> None:
    memory = MemoryStore(failing(4, error))
    saver = saver_for(memory, retry_for=10)
    [session] = sessions(1)
    outcome = saver.save(session)
    assert outcome.saved and not outcome.unsaved and outcome.error is error
    assert clock.pauses == [0.05, 0.1, 0.2, 0.4]
    assert saver.stats() == SaveStats(saved=1, retried=4, orphaned=0, unsaved=0)
    assert list(memory.sessions) == [session.session_id]


def test_pauses_are_capped_and_a_session_is_given_up_after_retry_for(
    clock: FakeTime, caplog: pytest.LogCaptureFixture
) -> None:
    memory = MemoryStore(failing(10**6, ps.SessionLocked("busy")))
    saver = saver_for(memory, retry_for=6)
    [session] = sessions(1)
    assert saver.save(session).unsaved
    assert clock.pauses == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0]  # then 2 more would pass 6 s
    assert saver.unsaved == [session] and saver.stats().unsaved == 1
    assert "keeping it unsaved" in caplog.text


def test_once_a_session_is_given_up_later_ones_get_one_attempt_until_a_save_succeeds(clock: FakeTime) -> None:
    memory = MemoryStore(failing(10**6, ps.StoreError("down")))
    saver = saver_for(memory, retry_for=1)
    first, second, third = sessions(3)
    saver.save(first)
    attempts = memory.attempts
    saver.save(second)  # the store is down: no second wait of retry_for
    assert memory.attempts == attempts + 1
    memory.trouble = failing(1, ps.StoreError("still down"))
    saver.save(third)  # one attempt, fails
    assert [s.session_id for s in saver.unsaved] == [first.session_id, second.session_id, third.session_id]
    assert saver.retry_unsaved() == 0  # the store is back: all saved
    assert sorted(memory.sessions) == sorted(s.session_id for s in (first, second, third))
    memory.trouble = failing(2, ps.StoreError("a blip"))
    [fourth] = sessions(1)
    assert saver.save(fourth).saved  # healthy again: retried as usual


def _conversation_in_pieces() -> tuple[ps.Session, list[ps.Session]]:
    """A loop and its continuation, whole and as the two pieces a recorder hands over."""

    def loop(n: int, parent: str | None) -> list[ps.AgentEvent]:
        at = ps.Timestamp.from_ns(1_750_000_000 * 10**9 + n * 10**9)
        return [
            ps.AgentStart(
                agent_id="a",
                session_id="s",
                loop_id=f"s.c.{n}",
                parent_loop_id=parent,
                continuation_kind=ps.DEFAULT if parent else ps.INITIAL,
                timestamp=at,
            ),
            ps.AgentEnd(loop_id=f"s.c.{n}", messages=(), usage=ps.Usage(input=n, output=1), timestamp=at),
        ]

    whole = SessionRecorder()
    whole.record_all([*loop(1, None), *loop(2, "s.c.1")])
    whole.flush()
    pieces = SessionRecorder()
    handed: list[ps.Session] = []
    for events in (loop(1, None), loop(2, "s.c.1")):
        pieces.record_all(events)
        pieces.checkpoint()
        handed += pieces.drain_completed()
    return whole.drain_completed()[0], handed


@pytest.mark.parametrize("batch", [False, True])
def test_a_later_piece_of_a_session_is_saved_after_its_unsaved_earlier_pieces(
    clock: FakeTime, batch: bool
) -> None:
    """A store outage gave a conversation's first piece up; the continuation, saved once the
    store was back, went in first, and the first piece was merged in after it: its loops
    out of order, and the continuation's link to its parent lost."""
    whole, (first, second) = _conversation_in_pieces()
    memory = BatchMemoryStore() if batch else MemoryStore()
    memory.trouble = failing(10**6, ps.StoreError("down"))
    saver = saver_for(memory, retry_for=1)
    assert saver.save(first).unsaved
    memory.trouble = None
    [other] = sessions(1)
    outcomes = saver.save_many([second, other]) if batch else [saver.save(second)]
    assert all(outcome.saved for outcome in outcomes) and saver.unsaved == []
    assert ps.encode(memory.sessions["s"]) == ps.encode(whole)


def test_an_interrupted_save_of_a_later_piece_keeps_the_earlier_pieces(clock: FakeTime) -> None:
    """The earlier pieces were taken out of `unsaved` before the save: Ctrl-C during it lost
    them (the caller keeps only the piece it was saving)."""
    whole, (first, second) = _conversation_in_pieces()
    memory = MemoryStore(failing(10**6, ps.StoreError("down")))
    saver = saver_for(memory, retry_for=1)
    assert saver.save(first).unsaved

    def interrupted(session: ps.Session) -> None:
        raise KeyboardInterrupt

    memory.trouble = interrupted
    with pytest.raises(KeyboardInterrupt):
        saver.save(second)
    assert saver.unsaved == [first]
    memory.trouble = None
    assert saver.save(second).saved
    assert ps.encode(memory.sessions["s"]) == ps.encode(whole)


def test_a_session_id_no_store_accepts_goes_to_the_orphans(clock: FakeTime) -> None:
    [session] = sessions(1)
    bad = ps.Session(
        session_id="../etc",
        agent_id="a",
        created_at=session.created_at,
        last_active_at=session.last_active_at,
        formation=session.formation,
        loops=session.loops,
    )
    kept: list[ps.AgentEvent] = []
    saver = saver_for(MemoryStore(), orphans=kept.extend)
    outcome = saver.save(bad)
    assert outcome.orphaned and not outcome.saved and isinstance(outcome.error, ps.InvalidSessionId)
    assert kept == [item.event for item in session.loops[0].events]
    assert clock.pauses == []  # never retried
    assert saver.stats() == SaveStats(saved=0, retried=0, orphaned=1, unsaved=0)

    no_sink = saver_for(MemoryStore())
    assert no_sink.save(bad).unsaved and no_sink.unsaved == [bad]

    def broken_sink(events: list[ps.AgentEvent]) -> None:
        raise OSError(28, "No space left on device")

    full_disk = saver_for(MemoryStore(), orphans=broken_sink)
    assert full_disk.save(bad).unsaved and full_disk.unsaved == [bad]


class BatchMemoryStore(MemoryStore):
    """A `MemoryStore` that also saves many sessions at once, all or none."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def save_many(self, sessions: Sequence[ps.Session]) -> None:
        self.batches.append(len(sessions))
        before = dict(self.sessions)
        try:
            for session in sessions:
                self.save(session)
        except BaseException:
            self.sessions = before
            raise


def test_many_sessions_are_saved_at_once_where_the_store_can(clock: FakeTime) -> None:
    memory = BatchMemoryStore()
    saver = saver_for(memory)
    batch = sessions(3)
    assert [outcome.saved for outcome in saver.save_many(batch)] == [True] * 3
    assert memory.batches == [3] and sorted(memory.sessions) == sorted(s.session_id for s in batch)
    assert saver.stats() == SaveStats(saved=3)


def test_a_batch_that_fails_is_saved_one_by_one_under_the_policy(clock: FakeTime) -> None:
    [first, second] = sessions(2)
    bad = msgspec.structs.replace(first, session_id="../etc")
    memory = BatchMemoryStore()
    kept: list[ps.AgentEvent] = []
    saver = saver_for(memory, orphans=kept.extend)
    outcomes = saver.save_many([first, bad, second])
    assert [(o.saved, o.orphaned) for o in outcomes] == [(True, False), (False, True), (True, False)]
    assert memory.batches == [3] and sorted(memory.sessions) == sorted([first.session_id, second.session_id])
    assert saver.stats() == SaveStats(saved=2, orphaned=1)
    with pytest.raises(TypeError, match="expected a Session"):
        saver.save_many([first, "not a session"])  # type: ignore[list-item]


def test_a_store_without_batches_saves_each_session(clock: FakeTime) -> None:
    memory = MemoryStore()
    outcomes = saver_for(memory).save_many(sessions(2))
    assert [outcome.saved for outcome in outcomes] == [True, True] and memory.attempts == 2


def test_a_bug_in_the_store_is_not_retried_and_the_session_is_kept(clock: FakeTime) -> None:
    memory = MemoryStore(failing(1, RuntimeError("bug")))
    saver = saver_for(memory)
    [session] = sessions(1)
    outcome = saver.save(session)
    assert outcome.unsaved and isinstance(outcome.error, RuntimeError)
    assert memory.attempts == 1 and clock.pauses == []
    assert saver.take_unsaved() == [session] and saver.unsaved == []


def test_an_unusable_stored_session_gets_one_attempt_and_one_error_line(
    clock: FakeTime, caplog: pytest.LogCaptureFixture
) -> None:
    unusable = ps.StoredSessionUnusable("stored session 's' is corrupt")
    memory = MemoryStore(failing(1, unusable))
    saver = saver_for(memory, retry_for=10)
    first, second = sessions(2)
    outcome = saver.save(first)
    assert outcome.unsaved and outcome.error is unusable
    assert memory.attempts == 1 and clock.pauses == []
    assert saver.unsaved == [first] and saver.stats().retried == 0
    assert [record.getMessage() for record in caplog.records] == [
        f"session {first.session_id} cannot be saved into {memory!r}, keeping it unsaved: {unusable}"
    ]
    memory.trouble = failing(2, ps.StoreError("a blip"))
    assert saver.save(second).saved  # the store is not taken to be down: still retried


def test_a_closed_store_is_not_retried_and_said_once(
    clock: FakeTime, caplog: pytest.LogCaptureFixture
) -> None:
    """Every error of a closed store was taken for a transient one: retried for retry_for
    seconds (at interpreter exit, a hang), then each session lost all the same."""
    closed = ps.StoreClosed("the MemoryStore is closed")
    assert isinstance(closed, ps.StoreError)
    memory = MemoryStore(failing(10, closed))
    saver = saver_for(memory, retry_for=30)
    first, second = sessions(2)
    assert saver.save(first).error is closed and saver.save(second).unsaved
    assert memory.attempts == 2 and clock.pauses == [] and saver.stats().retried == 0
    assert saver.unsaved == [first, second] and saver.last_error is closed
    assert [record.getMessage() for record in caplog.records] == [
        f"{memory!r} is closed: not saving session {first.session_id}, nor any after it while it "
        f"is, keeping them unsaved: {closed}"
    ]


def test_a_store_used_after_fork_gets_one_attempt(clock: FakeTime) -> None:
    """A forked child's refusal to use its parent's PostgresStore was a StoreError, taken
    for a transient one: the child's exit hung for retry_for seconds before giving up."""
    refused = ps.UsedAfterFork(
        "this PostgresStore was opened by process 1; a forked process must open its own"
    )
    memory = MemoryStore(failing(10, refused))
    saver = saver_for(memory, retry_for=30)
    [session] = sessions(1)
    outcome = saver.save(session)
    assert outcome.unsaved and outcome.error is refused
    assert memory.attempts == 1 and clock.pauses == [] and saver.stats().retried == 0


def test_an_unusable_stored_session_gets_one_attempt_through_asave_too(clock: FakeTime) -> None:
    memory = MemoryStore(failing(1, ps.StoredSessionUnusable("stored session 's' is corrupt")))
    [session] = sessions(1)
    assert asyncio.run(saver_for(memory).asave(session)).unsaved
    assert memory.attempts == 1


def test_drain_checkpoints_saves_and_returns_what_was_saved() -> None:
    memory = MemoryStore()
    saver = saver_for(memory)
    recorder = SessionRecorder()
    evs = list(stream(sessions=4, loops=1))
    recorder.record_all(evs[: len(evs) // 2])
    early = saver.drain(recorder)  # sessions finished so far
    recorder.record_all(evs[len(evs) // 2 :])
    rest = saver.drain(recorder, flush=True)
    assert (
        sorted(s.session_id for s in early + rest)
        == sorted(memory.sessions)
        == [f"s{n:07d}" for n in range(4)]
    )
    assert recorder.stats()["completed_sessions"] == 0


def test_an_interrupted_drain_leaves_its_sessions_for_the_next() -> None:
    def interrupt_once(session: ps.Session) -> None:
        if memory.attempts == 2:
            raise KeyboardInterrupt

    memory = MemoryStore(interrupt_once)
    saver = saver_for(memory)
    recorder = SessionRecorder()
    recorder.record_all(stream(sessions=3, loops=1))
    with pytest.raises(KeyboardInterrupt):
        saver.drain(recorder, flush=True)
    assert len(memory.sessions) == 1
    saver.drain(recorder)  # nothing new: saves what the interrupted drain held
    assert len(memory.sessions) == 3


def test_past_its_deadline_a_saver_stops_trying_a_down_store_but_not_a_healthy_one(clock: FakeTime) -> None:
    memory = MemoryStore()
    saver = saver_for(memory, retry_for=1)
    saver.stop_trying_after(0)
    first, second, third = sessions(3)
    assert saver.save(first).saved  # the store is up: tried
    memory.trouble = failing(10**6, ps.StoreError("down"))
    assert saver.save(second).unsaved  # given up at once: the deadline has passed
    attempts = memory.attempts
    outcome = saver.save(third)
    assert outcome.unsaved and isinstance(outcome.error, ps.StoreError)
    assert memory.attempts == attempts  # not tried: the store is down
    assert saver.unsaved == [second, third]


def test_a_deadline_for_one_block_of_calls_leaves_the_later_ones_trying(clock: FakeTime) -> None:
    """`AutoPersistingRecorder.close`'s deadline outlived it: its kept sessions were never tried again."""
    memory = MemoryStore(failing(10**6, ps.StoreError("down")))
    saver = saver_for(memory, retry_for=1)
    first, second = sessions(2)
    with saver.trying_for(0):
        assert saver.save(first).unsaved
        assert saver.save(second).unsaved
    assert memory.attempts == 1  # the second not tried: past the deadline, the store down
    memory.trouble = None
    assert saver.retry_unsaved() == 0
    assert sorted(memory.sessions) == sorted([first.session_id, second.session_id])


def test_overlapping_deadlines_in_two_threads_each_keep_their_own() -> None:
    """trying_for set one deadline for the whole saver and cleared it on exit: a retry
    bounded to 0.6 s in one thread ran unbounded (8 attempts of 0.2 s each, and more) once
    a retry bounded to 0.05 s in another thread had ended."""

    def slow_down(session: ps.Session) -> None:
        time.sleep(0.2)
        raise ps.StoreError("down")

    saver = saver_for(MemoryStore(slow_down), retry_for=0)
    down, *kept = sessions(9)
    assert saver.save(down).unsaved  # given up: the store is down
    saver.keep_unsaved(kept, ps.StoreError("down"))
    took: dict[str, float] = {}

    def retry(name: str, seconds: float) -> None:
        started = time.monotonic()
        with saver.trying_for(seconds):
            saver.retry_unsaved()
        took[name] = time.monotonic() - started

    first = threading.Thread(target=retry, args=("first", 0.6))
    first.start()
    time.sleep(0.1)
    retry("second", 0.05)
    first.join()
    assert took["second"] < 0.5  # its attempt under way, then nothing more
    assert took["first"] < 1.2  # its own 0.6 s and the attempt under way, not 9 attempts
    assert len(saver.unsaved) == 9


def test_a_deadline_in_one_thread_leaves_another_threads_retries_alone() -> None:
    """A retry_failed(within=0) in one thread cut short the retries of a save in another
    (the writer's): given up after one attempt, though its store was back at the third."""
    first_failure, bounded = threading.Event(), threading.Event()
    trouble = failing(2, ps.StoreError("busy"))

    def busy_twice(session: ps.Session) -> None:
        if not first_failure.is_set():
            first_failure.set()
            bounded.wait(5)
        trouble(session)

    saver = saver_for(MemoryStore(busy_twice), retry_for=5)
    outcome: list[SaveOutcome] = []
    writer = threading.Thread(target=lambda: outcome.append(saver.save(sessions(1)[0])))
    writer.start()
    assert first_failure.wait(5)
    with saver.trying_for(0):
        bounded.set()
        writer.join()
    assert outcome[0].saved


def test_a_store_down_is_said_once_and_the_sessions_kept_meanwhile_counted_when_it_saves_again(
    clock: FakeTime, caplog: pytest.LogCaptureFixture
) -> None:
    """A store down logged an error line per session given up (one more at every retry)."""
    memory = MemoryStore(failing(10**6, ps.StoreError("down")))
    saver = saver_for(memory, retry_for=1)
    kept = sessions(10)
    with caplog.at_level(logging.DEBUG, logger="phi_session.saver"):
        for session in kept:
            assert saver.save(session).unsaved
        assert saver.retry_unsaved() == 10  # still down
        memory.trouble = None
        assert saver.retry_unsaved() == 0
    assert sorted(memory.sessions) == sorted(session.session_id for session in kept)
    loud = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert [record.levelno for record in loud] == [logging.WARNING] * 4 + [logging.ERROR, logging.WARNING]
    assert loud[-2].getMessage() == (
        f"saving session {kept[0].session_id} into {memory!r} failed, keeping it unsaved: down; "
        "the store is taken to be down: the sessions after it get one attempt each, kept unsaved "
        "(said at debug level) until a save succeeds"
    )
    assert loud[-1].getMessage() == f"{memory!r} saves again: 10 sessions were kept unsaved while it was down"
    quiet = [record for record in caplog.records if record.levelno == logging.DEBUG]
    assert len(quiet) == 9 + 10  # the others given up, then all ten tried again


def test_past_its_deadline_a_saver_says_once_that_it_stops_trying_a_down_store(
    clock: FakeTime, caplog: pytest.LogCaptureFixture
) -> None:
    memory = MemoryStore(failing(10**6, ps.StoreError("down")))
    saver = saver_for(memory, retry_for=1)
    saver.stop_trying_after(0)
    kept = sessions(10)
    with caplog.at_level(logging.WARNING, logger="phi_session.saver"):
        for session in kept:
            assert saver.save(session).unsaved
    assert memory.attempts == 1 and saver.unsaved == kept
    assert [record.getMessage() for record in caplog.records] == [
        f"saving session {kept[0].session_id} into {memory!r} failed, keeping it unsaved: down; "
        "the store is taken to be down: the sessions after it get one attempt each, kept unsaved "
        "(said at debug level) until a save succeeds",
        f"not saving session {kept[1].session_id} nor any after it while {memory!r} is down: the "
        "time to save is up, keeping them unsaved: down",
    ]


def test_a_session_given_up_gets_one_attempt_when_tried_again_while_others_save(clock: FakeTime) -> None:
    """Once another session had saved, a session the store kept failing was retried for
    `retry_for` at every retry: its owner (the ingest worker) stalled for that long each time."""
    bad, good, later = sessions(3)

    def refuse(session: ps.Session) -> None:
        if session.session_id == bad.session_id:
            raise ps.StoreError("disk full")

    memory = MemoryStore(refuse)
    saver = saver_for(memory, retry_for=10)
    assert saver.save(bad).unsaved  # retried for `retry_for` once
    assert saver.save(good).saved  # the store works
    attempts, started = memory.attempts, clock.now
    assert saver.save(*saver.take_unsaved(), once=True).unsaved  # the worker's retry at a checkpoint
    assert saver.save(later).saved
    assert saver.save(*saver.take_unsaved(), once=True).unsaved
    assert (memory.attempts, clock.now) == (attempts + 3, started)  # one attempt each, no pause


def test_a_session_given_up_while_the_store_was_down_is_retried_in_full_once_it_is_back(
    clock: FakeTime,
) -> None:
    """After an outage longer than `retry_for`, `retry_unsaved` (`AutoPersistingRecorder.close`'s
    last chance) gave the session given up one attempt: one lock held by another writer
    then, the store otherwise up, and it stayed unsaved (lost at exit without a journal)."""
    given_up, later = sessions(2)
    memory = MemoryStore(failing(10**6, ps.StoreError("connection refused")))
    saver = saver_for(memory, retry_for=0.5)
    assert saver.save(given_up).unsaved
    memory.trouble = None  # the store is back
    assert saver.save(later).saved
    memory.trouble = failing(1, ps.SessionLocked("session being written by another client"))
    assert saver.retry_unsaved() == 0
    assert set(memory.sessions) == {given_up.session_id, later.session_id}


def test_a_session_the_store_refuses_goes_to_the_orphans_untried_again(clock: FakeTime) -> None:
    kept: list[list[ps.AgentEvent]] = []
    memory = MemoryStore(failing(1, ps.SessionRefused("check violated")))
    saver = saver_for(memory, orphans=kept.append)
    (session,) = sessions(1)
    outcome = saver.save(session)
    assert outcome.orphaned and isinstance(outcome.error, ps.SessionRefused)
    assert (memory.attempts, len(kept), saver.unsaved) == (1, 1, [])


def test_a_deadline_set_during_a_retry_ends_it(clock: FakeTime) -> None:
    saver_ref: list[SessionSaver] = []

    def down(session: ps.Session) -> None:
        if memory.attempts == 3:
            saver_ref[0].stop_trying_after(0)  # a SIGTERM while the retry pauses
        raise ps.StoreError("down")

    memory = MemoryStore(down)
    saver = saver_for(memory, retry_for=10)
    saver_ref.append(saver)
    (session,) = sessions(1)
    assert saver.save(session).unsaved
    assert memory.attempts == 3


def test_an_interrupted_retry_puts_back_what_it_did_not_try(clock: FakeTime) -> None:
    memory = MemoryStore(failing(10**6, ps.StoreError("down")))
    saver = saver_for(memory, retry_for=0)
    for session in sessions(3):
        saver.save(session)

    def interrupt(session: ps.Session) -> None:
        raise KeyboardInterrupt

    memory.trouble = interrupt
    with pytest.raises(KeyboardInterrupt):
        saver.retry_unsaved()
    assert len(saver.unsaved) == 3


def test_sessions_a_retry_is_going_through_are_still_unsaved_until_saved() -> None:
    # The persisting recorder releases journal segments below every `unsaved` session
    # from its writer thread: one a retry took out must not look saved meanwhile.
    memory = MemoryStore(failing(10**6, ps.StoreError("down")))
    saver = saver_for(memory, retry_for=0)
    held = sessions(3)
    for session in held:
        saver.save(session)
    saving, release = threading.Event(), threading.Event()

    def slow(session: ps.Session) -> None:
        saving.set()
        release.wait(10)
        raise ps.StoreError("still down")

    memory.trouble = slow
    retry = threading.Thread(target=saver.retry_unsaved)
    retry.start()
    try:
        assert saving.wait(10)
        assert [s.session_id for s in saver.unsaved] == [s.session_id for s in held]
        assert saver.stats().unsaved == 3
    finally:
        release.set()
        retry.join(10)
    assert [s.session_id for s in saver.unsaved] == [s.session_id for s in held]


def test_the_async_twins_follow_the_same_policy() -> None:
    memory = MemoryStore(failing(2, ps.SessionLocked("busy")))
    saver = saver_for(memory, retry_for=0.3)  # pauses 0.05 + 0.1, then the next would pass it
    recorder = SessionRecorder()
    recorder.record_all(stream(sessions=2, loops=1))

    async def main() -> None:
        saved = await saver.adrain(recorder, flush=True)
        assert len(saved) == 2
        memory.trouble = failing(10**6, ps.StoreError("down"))
        [late] = sessions(1)
        assert (await saver.asave(late)).unsaved
        memory.trouble = None
        assert await saver.aretry_unsaved() == 0

    asyncio.run(main())
    assert saver.stats() == SaveStats(saved=3, retried=4, orphaned=0, unsaved=0)
    assert len(memory.sessions) == 2


def test_counts_are_exact_under_concurrent_saves() -> None:
    memory = MemoryStore()
    saver = saver_for(memory)
    batch = sessions(40)
    threads = [
        threading.Thread(target=lambda part=part: [saver.save(s) for s in batch[part::4]])
        for part in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert saver.stats().saved == 40 and len(memory.sessions) == 40


def test_a_session_of_the_wrong_type_is_a_type_error() -> None:
    saver = saver_for(MemoryStore())
    with pytest.raises(TypeError, match="expected a Session, got NoneType"):
        saver.save(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got dict"):
        asyncio.run(saver.asave({}))  # type: ignore[arg-type]
    assert saver.stats() == SaveStats()


def test_retry_for_must_be_a_duration() -> None:
    with pytest.raises(ps.InvalidArgument, match="retry_for"):  # a PhiSessionError and a ValueError
        saver_for(MemoryStore(), retry_for=-1)
    with pytest.raises(ps.InvalidArgument, match="retry_for"):
        saver_for(MemoryStore(), retry_for=float("nan"))


def test_draining_something_else_than_a_recorder_is_a_type_error() -> None:
    """It raised AttributeError ('int' object has no attribute 'checkpoint')."""
    saver = saver_for(MemoryStore())
    with pytest.raises(TypeError, match=r"^recorder must be SessionRecorder, not int$"):
        saver.drain(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^recorder must be SessionRecorder, not int$"):
        asyncio.run(saver.adrain(5))  # type: ignore[arg-type]


# -- the command line saves through a SessionSaver ----------------------------------------------


def _stream_with_a_bad_session_id(path: Path) -> list[bytes]:
    """Two one-loop sessions; the second's id is one no store accepts. Returns its lines."""
    lines = [encode_event(e).replace(b"s0000001", b"../bad") for e in stream(sessions=2, loops=1, deltas=0)]
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return [line for line in lines if b"../bad" in line]


def test_record_puts_a_session_no_store_accepts_into_the_orphans_file(tmp_path: Path) -> None:
    bad = _stream_with_a_bad_session_id(tmp_path / "s.jsonl")
    result = CliRunner().invoke(
        main,
        [
            "record",
            str(tmp_path / "s.jsonl"),
            "--dir",
            str(tmp_path / "out"),
            "--orphans",
            str(tmp_path / "orphans.jsonl"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.stderr
    assert "warning: session '../bad' cannot be stored" in result.stderr
    assert (tmp_path / "orphans.jsonl").read_bytes().splitlines() == bad
    assert JsonDirStore(tmp_path / "out").list_ids() == ["s0000000"]


def test_record_without_an_orphans_file_fails_for_a_session_it_cannot_store(tmp_path: Path) -> None:
    _stream_with_a_bad_session_id(tmp_path / "s.jsonl")
    result = CliRunner().invoke(
        main, ["record", str(tmp_path / "s.jsonl"), "--dir", str(tmp_path / "out"), "--json"]
    )
    assert result.exit_code == 1
    assert "error: session '../bad' cannot be stored" in result.stderr
    assert json.loads(result.stdout)["totals"]["unsaved_sessions"] == 1
    assert JsonDirStore(tmp_path / "out").list_ids() == ["s0000000"]


def test_import_retries_a_busy_store_and_reports_what_it_could_not_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: FakeTime
) -> None:
    good, other = sessions(2)
    for session in (good, other):
        (tmp_path / f"{session.session_id}.json").write_bytes(ps.encode(session))
    original = JsonDirStore.save
    busy = {good.session_id: 2, other.session_id: 10**6}

    def sometimes_busy(self: JsonDirStore, session: ps.Session) -> None:
        if busy[session.session_id] > 0:
            busy[session.session_id] -= 1
            raise ps.SessionLocked("another writer holds it")
        original(self, session)

    monkeypatch.setattr(JsonDirStore, "save", sometimes_busy)
    result = CliRunner().invoke(main, ["import", str(tmp_path), "--store", f"{tmp_path / 'out'}/", "--json"])
    assert result.exit_code == 1, result.stderr
    report = json.loads(result.stdout)
    assert [row["session_id"] for row in report["imported"]] == [good.session_id]
    [error] = report["errors"]
    assert f"session {other.session_id} not saved" in error["error"] and "another writer" in error["error"]


@pytest.mark.parametrize("store", ["dir", "sqlite"])
def test_import_over_an_unusable_stored_session_fails_at_once(
    tmp_path: Path, clock: FakeTime, store: str
) -> None:
    [session] = sessions(1)
    source = tmp_path / "session.json"
    source.write_bytes(ps.encode(session))
    url = f"{tmp_path / 'out'}/" if store == "dir" else str(tmp_path / "out.db")
    assert CliRunner().invoke(main, ["import", str(source), "--store", url]).exit_code == 0
    if store == "dir":
        JsonDirStore(tmp_path / "out").path_for(session.session_id).write_bytes(b"garbage")
    else:
        with contextlib.closing(sqlite3.connect(tmp_path / "out.db")) as db, db:
            db.execute("UPDATE loops SET record = x'7b7b'")
    result = CliRunner().invoke(main, ["import", str(source), "--store", url])
    assert result.exit_code == 1
    assert clock.pauses == [] and "retrying" not in result.stderr
    assert "is corrupt" in result.stderr or "corrupt session file" in result.stderr
    [line] = [line for line in result.stderr.splitlines() if "error:" in line]  # said once
    assert session.session_id in line and str(source) in line


def test_recovery_retries_a_busy_store_instead_of_failing(tmp_path: Path, clock: FakeTime) -> None:
    evs = list(stream(sessions=3, loops=1))
    with Journal(tmp_path / "j", durability="os") as journal:
        JournaledRecorder(journal).record_all(evs)
    store = JsonDirStore(tmp_path / "store")
    busy = {"s0000001": 3}
    original = store.save

    def busy_then_fine(session: ps.Session) -> None:
        if busy.get(session.session_id, 0) > 0:
            busy[session.session_id] -= 1
            raise ps.SessionLocked("another writer holds it")
        original(session)

    store.save = busy_then_fine  # type: ignore[method-assign]
    report = recover(tmp_path / "j", store)
    assert report.failed_sessions == [] and report.sessions_saved == 3
    assert clock.pauses == [0.05, 0.1, 0.2]
    assert sorted(store.list_ids()) == ["s0000000", "s0000001", "s0000002"]
    assert list((tmp_path / "j").glob("*.wal")) == []


def test_a_saver_refuses_what_it_cannot_save_into_at_once(tmp_path: Path) -> None:
    # Every session drained into a path (or anything else without save) was lost.
    with pytest.raises(TypeError, match="store must be a SessionStore \\(or another SaveTarget\\), not str"):
        SessionSaver(str(tmp_path / "sessions.db"))  # type: ignore[arg-type]
    store = MemoryStore()
    with pytest.raises(TypeError, match="orphans must be callable or None, not int"):
        SessionSaver(store, orphans=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="retry_for must be a number of seconds, not str"):
        SessionSaver(store, retry_for="10")  # type: ignore[arg-type]
    with pytest.raises(ps.InvalidArgument, match="retry_for must be a number of seconds >= 0, got -1"):
        SessionSaver(store, retry_for=-1)
    with pytest.raises(TypeError, match="recorder must be SessionRecorder, not int"):
        SessionSaver(store).drain(5)  # type: ignore[arg-type]


def test_what_could_not_be_saved_is_said_in_one_line() -> None:
    error = ps.StoreError("connection failed\nHINT: is the server running?")
    assert saver_module.not_saved(["s1"], error) == (
        "1 session could not be saved (s1): connection failed; HINT: is the server running?"
    )
    pieces = ["s1", "s2", "s1", *(f"t{n}" for n in range(5))]  # s1 kept in two pieces
    assert saver_module.not_saved(pieces, None, "db") == (
        "7 sessions could not be saved into 'db' (s1, s2, t0, t1, t2, ...)"
    )


_WHEN = ps.Timestamp.from_ns(1_750_000_000 * 10**9)


def _start(session: str, loop_id: str, parent: str | None = None) -> ps.AgentStart:
    return ps.AgentStart(
        agent_id="a", session_id=session, loop_id=loop_id, parent_loop_id=parent, timestamp=_WHEN
    )


def _end(loop_id: str) -> ps.AgentEnd:
    return ps.AgentEnd(loop_id=loop_id, messages=(), usage=ps.Usage(input=1, output=1), timestamp=_WHEN)


def test_a_spawner_saved_after_a_sub_agent_looked_for_it_is_found_by_the_next(tmp_path: Path) -> None:
    """Not stored yet at the first sub-agent's lookup (it is recorded elsewhere: a worker of
    another partition), the spawner was taken to hold no tool call for good: a sub-agent
    starting once it was stored got a spawn ref without its tool call all the same."""
    spawner: list[ps.AgentEvent] = [_start("p", "p.c.1")]
    spawner += [
        ps.ToolExecutionEnd(
            loop_id="p.c.1",
            tool_call_id=call,
            tool_name="sub",
            result=ps.ToolResult(content=(), child_loop_id=child),
            is_error=False,
        )
        for child, call in (("k.sub.1", "t1"), ("m.sub.1", "t2"))
    ]
    spawner.append(_end("p.c.1"))
    store = JsonDirStore(tmp_path)
    recorder = SessionRecorder()
    spawners = SavedSpawners(store)

    def apply(event: ps.AgentEvent) -> None:
        if spawners.needs_spawner(event, recorder):
            spawners.hand_to(recorder, event)
        recorder.on_event(event)

    apply(_start("k", "k.sub.1", parent="p.c.1"))
    apply(_end("k.sub.1"))
    elsewhere = SessionRecorder()
    elsewhere.record_all(spawner)
    elsewhere.flush()
    for session in elsewhere.drain_completed():
        store.save(session)
    apply(_start("m", "m.sub.1", parent="p.c.1"))
    apply(_end("m.sub.1"))
    recorder.flush()
    spawned = {
        session.session_id: (session.parent_spawn_ref.tool_call_id, session.parent_spawn_ref.tool_name)
        for session in recorder.drain_completed()
        if session.parent_spawn_ref is not None
    }
    assert spawned == {"k": ("", ""), "m": ("t2", "sub")}


@pytest.mark.spec
@pytest.mark.parametrize("every_event", [False, True])
def test_one_recorder_holding_sub_agents_and_spawners_reads_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, every_event: bool
) -> None:
    """Linking sub-agents to spawners from the store is for recorders holding one end each:
    one holding both (drained at every event, or once at the end) reads the store never,
    and saves phi-core's very files."""
    from .conftest import EXAMPLES

    store = JsonDirStore(tmp_path)
    reads: list[str] = []
    monkeypatch.setattr(store, "load_outline", lambda session_id: reads.append(session_id))
    saver = SessionSaver(store)
    for events in sorted(EXAMPLES.glob("events-*.jsonl")):
        recorder = SessionRecorder()
        for line in events.read_bytes().splitlines():
            recorder.on_json(line)
            if every_event:
                saver.drain(recorder)
        saver.drain(recorder, flush=True)
    assert reads == []
    for expected in sorted(EXAMPLES.glob("session-*.json")):
        session_id = ps.decode_session(expected.read_bytes()).session_id
        assert ps.encode_session(store.load(session_id)) == expected.read_bytes(), expected.name


def _drained(saver: SessionSaver, events: list[ps.AgentEvent], *, asynchronously: bool) -> list[str]:
    """`events` recorded by a recorder of their own, drained through `saver`: the ids saved."""
    recorder = SessionRecorder()
    recorder.record_all(events)
    if asynchronously:
        return [s.session_id for s in asyncio.run(saver.adrain(recorder, flush=True))]
    return [s.session_id for s in saver.drain(recorder, flush=True)]


_PROVISIONAL = ps.SpawnRef(parent_session_id="p", parent_loop_id="p.c.1", tool_call_id="", tool_name="")
_LINKED = ps.SpawnRef(
    parent_session_id="p", parent_loop_id="p.c.1", tool_call_id="toolu_1", tool_name="researcher"
)


@pytest.mark.parametrize("asynchronously", [False, True])
def test_a_spawner_whose_stored_record_does_not_decode_leaves_the_link_and_the_drain_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, asynchronously: bool
) -> None:
    """The spawner's stored loop record did not decode as the sub-agent's side read it to
    link: `DecodeError` escaped the drain into the host after k was saved, and the link
    stayed at the head of the saver's links, so every later adrain raised it again."""
    spawner, sub_agent, _ = spawned_apart()
    store = UndecodableRecords(tmp_path)
    assert _drained(SessionSaver(store), spawner, asynchronously=False) == ["p"]
    saver = SessionSaver(store)
    with caplog.at_level(logging.WARNING, logger="phi_session.saver"):
        assert _drained(saver, sub_agent, asynchronously=asynchronously) == ["k"]
    [warning] = [r.getMessage() for r in caplog.records if "spawn ref" in r.getMessage()]
    assert "session 'p' could not be read" in warning and "'k' keeps its spawn ref" in warning
    assert store.load("k").parent_spawn_ref == _PROVISIONAL
    # A later drain of another session: no link left to read.
    assert _drained(saver, [_start("z", "z.c.1"), _end("z.c.1")], asynchronously=asynchronously) == ["z"]
    assert store.reads == ["k", "p"]  # (the spawner's own drain read k, not stored then)


@pytest.mark.parametrize("asynchronously", [False, True])
def test_a_link_that_raises_is_not_tried_again_by_every_later_drain_one_interrupted_is(
    tmp_path: Path, asynchronously: bool
) -> None:
    """A link whose completion raised (here the host's on_saved, given k's amendment) stayed
    at the head of the saver's links: every later drain tried it again and raised again.
    One interrupted (Ctrl-C) is left for the next drain."""
    spawner, sub_agent, _ = spawned_apart()
    store = JsonDirStore(tmp_path)
    _drained(SessionSaver(store), spawner, asynchronously=False)
    read = store.load_outline
    reads: list[str] = []

    def interrupted_once(session_id: str) -> Any:
        reads.append(session_id)
        if len(reads) == 1:
            raise KeyboardInterrupt
        return read(session_id)

    store.load_outline = interrupted_once  # type: ignore[method-assign]
    saved: list[str] = []

    def on_saved(session: ps.Session) -> None:
        saved.append(session.session_id)
        if session.parent_spawn_ref == _LINKED:
            raise RuntimeError("on_saved failed")

    saver = SessionSaver(store, on_saved=on_saved)
    with pytest.raises(KeyboardInterrupt):
        _drained(saver, sub_agent, asynchronously=asynchronously)
    with pytest.raises(RuntimeError, match="on_saved failed"):
        _drained(saver, [_start("y", "y.c.1"), _end("y.c.1")], asynchronously=asynchronously)
    assert reads == ["p", "p"] and saved == ["k", "y", "k"]
    assert _drained(saver, [_start("z", "z.c.1"), _end("z.c.1")], asynchronously=asynchronously) == ["z"]
    assert reads == ["p", "p"]
    assert store.load("k").parent_spawn_ref == _LINKED


class HungRead(BaseException):
    """What no `except Exception` catches, as gevent's `Timeout` ending a hung read."""


@pytest.mark.parametrize("asynchronously", [False, True])
@pytest.mark.parametrize("raised", [HungRead, KeyboardInterrupt])
def test_a_link_raising_a_base_exception_every_time_is_dropped_one_interrupted_after_a_few_tries(
    tmp_path: Path, asynchronously: bool, raised: type[BaseException]
) -> None:
    """A link whose read raised the same `BaseException` every time (a gevent `Timeout` on a
    hung store) was put back at the head of the saver's links: every later drain read it
    again and raised again (3 of 3). Only an interrupt (Ctrl-C, a cancelled task) puts it
    back, and a few times at most."""
    spawner, sub_agent, _ = spawned_apart()
    store = JsonDirStore(tmp_path)
    _drained(SessionSaver(store), spawner, asynchronously=False)
    reads: list[str] = []

    def hung(session_id: str) -> Any:
        reads.append(session_id)
        raise raised

    store.load_outline = hung  # type: ignore[method-assign]
    saver = SessionSaver(store)
    tries = 1 if raised is HungRead else saver_module.LINK_INTERRUPTS
    with pytest.raises(raised):
        _drained(saver, sub_agent, asynchronously=asynchronously)
    for _ in range(tries - 1):
        with pytest.raises(raised):
            _drained(saver, [], asynchronously=asynchronously)
    assert _drained(saver, [_start("z", "z.c.1"), _end("z.c.1")], asynchronously=asynchronously) == ["z"]
    assert reads == ["p"] * tries
    assert store.load("k").parent_spawn_ref == _PROVISIONAL


def _processed_in_place(store: SessionStore) -> ps.Session:
    """A session whose tool arguments a processor changed in place, returning the same
    event: holding a `Path`, as the `Tracer` does not copy what it is handed back."""

    def process(event: ps.AgentEvent) -> ps.AgentEvent:
        if type(event) is ps.ToolExecutionStart:
            event.args["p"] = Path("/secret")
            event.args[1] = "y"
        return event

    recorder = SessionRecorder()
    tracer = ps.Tracer(ps.AgentSession("agent"), sinks=[recorder], processors=[process], redact=False)
    with tracer.loop(ps.LoopConfigSnapshot(model="m", provider="p")) as loop, loop.turn() as scope:
        with scope.tool(id="c", name="read", args={"a": 1}) as tool:
            tool.result("ok")
    recorder.flush()
    (session,) = recorder.drain_completed()
    return session


@pytest.mark.parametrize("saving", ["save", "asave", "save_many"])
def test_a_session_holding_a_value_json_cannot_hold_is_saved_with_it_copied_as_a_tracer_copies(
    tmp_path: Path, saving: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A processor putting a `Path` into an event's arguments in place: the session was
    lost at save ("cannot be saved ... keeping it unsaved", then dropped); now the saver
    saves it with its free-form values copied as a `Tracer` copies them, and says so once."""
    store = JsonDirStore(tmp_path)
    session = _processed_in_place(store)
    saver = SessionSaver(store)
    if saving == "save":
        outcome = saver.save(session)
    elif saving == "asave":
        outcome = asyncio.run(saver.asave(session))
    else:
        (outcome,) = saver.save_many([session])
    assert outcome.saved and saver.unsaved == []
    events = [stored.event for stored in store.load(session.session_id).loops[0].events]
    (start,) = [event for event in events if type(event) is ps.ToolExecutionStart]
    assert start.args == {"a": 1, "p": "/secret", "1": "y"}  # type: ignore[union-attr]
    assert [r.message for r in caplog.records if "copied as JSON" in r.message] != []
