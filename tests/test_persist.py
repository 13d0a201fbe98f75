"""AutoPersistingRecorder: saves as it goes, bounded memory, backpressure, failures, journal."""

from __future__ import annotations

import errno
import gc
import itertools
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn

import pytest
from msgspec.structs import replace

from phi_session import (
    AgentEnd,
    AgentEvent,
    AgentStart,
    MessageEnd,
    MessageUpdate,
    ParallelLoopEnd,
    ParallelLoopStart,
    ProgressMessage,
    SpawnRef,
    TextContent,
    Timestamp,
    ToolExecutionEnd,
    ToolResult,
    Usage,
)
from phi_session import persist as persist_module
from phi_session.codec import encode_event, encode_session
from phi_session.errors import (
    EventNotDurable,
    InvalidArgument,
    JournalLocked,
    PhiSessionError,
    StoreClosed,
    StoredSessionUnusable,
    StoreError,
    UsedAfterFork,
)
from phi_session.journal import (
    CHECKPOINT_FILE,
    ORPHANS_FILE,
    Journal,
    JournaledRecorder,
    read_records,
    recover,
)
from phi_session.model import Session
from phi_session.persist import AutoPersistingRecorder, held_bytes
from phi_session.recorder import SessionRecorder, SessionRecorderConfig, SpawnGap
from phi_session.saver import SessionSaver
from phi_session.stores.base import SessionStore
from phi_session.stores.conformance import spawned_apart
from phi_session.stores.json_dir import JsonDirStore
from phi_session.stores.outline import SessionOutline
from phi_session.stores.sqlite import SqliteStore

from .conftest import in_forked_child, needs_fork
from .journal_kill_worker import stream
from .store_support import UndecodableRecords
from .test_recorder import assistant


def single_loop_sessions(count: int) -> list[AgentEvent]:
    """Sessions of one loop: a session is only complete once its loop ended."""
    return list(stream(sessions=count, loops=1, turns=2))


def recorded(evs: list[AgentEvent]) -> dict[str, bytes]:
    recorder = SessionRecorder()
    recorder.record_all(evs)
    recorder.flush()
    return {s.session_id: encode_session(s) for s in recorder.drain_completed()}


def stored(store: SessionStore) -> dict[str, bytes]:
    return {sid: encode_session(store.load(sid)) for sid in store.list_ids()}


@pytest.mark.parametrize("journaled", [False, True])
@pytest.mark.parametrize("feed", ["on_event", "on_json"])
def test_every_session_is_saved_as_the_recorder_built_it(tmp_path: Path, journaled: bool, feed: str) -> None:
    evs = single_loop_sessions(30)
    store = SqliteStore(tmp_path / "s.db")
    with AutoPersistingRecorder(
        store, journal=tmp_path / "j" if journaled else None, checkpoint_every=20
    ) as persisting:
        for event in evs:
            if feed == "on_event":
                persisting.on_event(event)
            else:
                persisting.on_json(encode_event(event))
        assert persisting.wait_saved(timeout=10)
        held = persisting.recorder.stats()
        assert held["open_sessions"] + held["completed_sessions"] <= 3  # the rest left memory
        assert persisting.stats()["sessions_saved"] >= 25
    assert stored(store) == recorded(evs)
    if journaled:
        assert list((tmp_path / "j").glob("*.wal")) == []  # all saved: nothing left to replay


def test_sessions_saved_in_pieces_keep_every_loop_and_event(tmp_path: Path) -> None:
    evs = list(stream(sessions=10, loops=3))  # sessions complete (and are saved) between loops
    store = JsonDirStore(tmp_path / "store")
    with AutoPersistingRecorder(store, checkpoint_every=5) as persisting:
        persisting.record_all(evs)
    for session_id in recorded(evs):
        want = [
            encode_event(e)
            for e in evs
            if not isinstance(e, MessageUpdate) and getattr(e, "loop_id", "").startswith(session_id + ".")
        ]
        got = [encode_event(e.event) for r in store.load(session_id).loops for e in r.events]
        assert got == want


def test_memory_stays_flat(tmp_path: Path) -> None:
    """40,000 events here (the 1,000,000-event run is in benchmarks/bench_journal.py)."""
    count = 40_000
    store = SqliteStore(tmp_path / "s.db")
    tracemalloc.start()
    try:
        persisting = AutoPersistingRecorder(store, checkpoint_every=1000)
        heap = {}
        for index, event in enumerate(itertools.islice(stream(loops=1, turns=1, deltas=0), count), 1):
            persisting.on_event(event)
            if index in (count // 10, count):
                persisting.checkpoint()
                assert persisting.wait_saved(timeout=60)
                gc.collect()
                heap[index] = tracemalloc.get_traced_memory()[0]
        persisting.close()
    finally:
        tracemalloc.stop()
    sessions = store.list_ids()
    assert len(sessions) > 5000
    # Ten times the events, the same heap: what is saved is not kept (256 kB of slack for caches).
    assert heap[count] - heap[count // 10] < 256 * 1024


class SlowStore(JsonDirStore):
    def save(self, session: Session) -> None:
        time.sleep(0.002)
        super().save(session)


def test_a_slow_store_blocks_the_producer_and_loses_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    evs = single_loop_sessions(40)
    store = SlowStore(tmp_path / "store")
    with caplog.at_level(logging.WARNING, "phi_session.persist"):
        with AutoPersistingRecorder(store, checkpoint_every=5, max_pending_bytes=1) as persisting:
            persisting.record_all(evs)
            assert persisting.stats()["backpressure_waits"] > 0
    assert "blocking the producer" in caplog.text
    assert stored(store) == recorded(evs)


def test_a_timeout_longer_than_a_thread_can_wait_is_no_limit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """wait_saved(1e10) raised OverflowError from its wait (past threading.TIMEOUT_MAX, as
    sys.float_info.max), wait_saved(10**400) one from float() in its check, and
    checkpoint_interval=1e10 (or inf) killed the writer thread at its first idle wait."""
    evs = single_loop_sessions(3)
    for interval in (1e10, math.inf):
        store = JsonDirStore(tmp_path / str(interval))
        with caplog.at_level(logging.ERROR, "phi_session.persist"):
            with AutoPersistingRecorder(store, checkpoint_interval=interval, warn_after=1e10) as persisting:
                persisting.record_all(evs)
                for timeout in (1e10, sys.float_info.max, 10**400, threading.TIMEOUT_MAX * 2):
                    persisting.checkpoint(timeout=timeout)
                    assert persisting.wait_saved(timeout) is True
                time.sleep(0.1)  # the writer's idle wait
        assert "died" not in caplog.text
        assert stored(store) == recorded(evs)
    assert persisting.wait_saved(-(10**400)) is True  # a time long past: no wait, not an OverflowError
    with pytest.raises(InvalidArgument, match="timeout"):  # a clean refusal
        persisting.wait_saved(math.nan)
    with pytest.raises(InvalidArgument, match="group_end_timeout must be a finite number"):
        SessionRecorderConfig(group_end_timeout=10**400)


@pytest.mark.parametrize("huge", [10**400, math.inf], ids=["int", "inf"])
def test_a_retry_for_longer_than_a_float_holds_is_no_limit(tmp_path: Path, huge: float) -> None:
    """retry_for=10**400 passed its check (as infinity) but was kept as the int: close's
    deadline (retry_for + CLOSE_GRACE) and a failed save's (now + retry_for) raised
    OverflowError, the writer died on the first failure and the session was lost."""
    evs = single_loop_sessions(2)
    store = FlakyStore(tmp_path / "s", failures=2)
    persisting = AutoPersistingRecorder(store, retry_for=huge, warn_after=huge, checkpoint_interval=huge)
    persisting.record_all(evs)
    persisting.close()
    assert stored(store) == recorded(evs)
    saver = SessionSaver(FlakyStore(tmp_path / "t", failures=2), retry_for=huge)
    assert saver.save(store.load(next(iter(stored(store))))).saved


class FlakyStore(JsonDirStore):
    """Fails its first `failures` saves, and every save of the ids in `refused`."""

    def __init__(self, directory: Path, failures: int = 0, refused: frozenset[str] = frozenset()) -> None:
        super().__init__(directory)
        self.failures, self.refused = failures, refused

    def save(self, session: Session) -> None:
        if self.failures > 0 or session.session_id in self.refused:
            self.failures -= 1
            raise StoreError("database is having a bad day")
        super().save(session)


class DownStore(SqliteStore):
    """A store that is down: every save fails, one at a time or in one transaction."""

    def save(self, session: Session) -> None:
        raise StoreError("db down")

    def save_many(self, sessions: Sequence[Session]) -> None:
        raise StoreError("db down")


def test_a_store_that_stays_down_is_said_down_once_not_per_session(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # 50 sessions on a store down all along logged 102 lines: an error per session given
    # up at its checkpoint, another at close's last retry.
    evs = single_loop_sessions(50)
    persisting = AutoPersistingRecorder(DownStore(tmp_path / "s.db"), checkpoint_every=1, retry_for=0.05)
    with caplog.at_level(logging.WARNING, logger="phi_session"):
        persisting.record_all(evs)
        with pytest.raises(StoreError, match=r"^50 sessions could not be saved"):
            persisting.close()
    loud = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(loud) <= 4, loud  # a retry or two of the first session, the store taken to be down
    assert sorted(session.session_id for session in persisting.failed_sessions()) == sorted(recorded(evs))


def test_sessions_kept_by_a_close_past_its_deadline_are_tried_again_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() set a deadline for saving that outlived it: once past, the store down at close,
    retry_failed() ("after close too") kept every session without trying it, ever."""
    monkeypatch.setattr(persist_module, "CLOSE_GRACE", 0.0)  # the deadline passes at once
    evs = single_loop_sessions(3)
    store = FlakyStore(tmp_path / "store", failures=10**6)
    persisting = AutoPersistingRecorder(store, retry_for=0, checkpoint_interval=None)
    persisting.record_all(evs)
    with pytest.raises(StoreError, match="3 sessions could not be saved"):
        persisting.close()
    store.failures = 0  # the store is back
    assert persisting.retry_failed() == 0
    assert stored(store) == recorded(evs)


def test_transient_save_failures_are_retried(tmp_path: Path) -> None:
    evs = single_loop_sessions(5)
    store = FlakyStore(tmp_path / "store", failures=3)
    with AutoPersistingRecorder(store) as persisting:
        persisting.record_all(evs)
    assert persisting.stats()["save_retries"] == 3
    assert stored(store) == recorded(evs)


def test_a_session_the_store_keeps_refusing_is_kept_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    evs = single_loop_sessions(4)
    store = FlakyStore(tmp_path / "store", refused=frozenset({"s0000002"}))
    persisting = AutoPersistingRecorder(store, journal=tmp_path / "j", retry_for=0.1)
    persisting.record_all(evs)
    with pytest.raises(StoreError, match="1 session could not be saved"):
        persisting.close()
    assert [s.session_id for s in persisting.failed_sessions()] == ["s0000002"]
    assert "keeping it unsaved" in caplog.text
    assert list((tmp_path / "j").glob("*.wal"))  # the journal still has it
    healthy = JsonDirStore(tmp_path / "store")
    with AutoPersistingRecorder(healthy, journal=tmp_path / "j") as restarted:
        assert restarted.recovery_report is not None
    assert stored(healthy) == recorded(evs)


def test_sessions_kept_in_memory_are_reported_when_the_journal_failed_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FlakyStore(tmp_path / "store", refused=frozenset({"s0000002"}))
    persisting = AutoPersistingRecorder(store, journal=tmp_path / "j", retry_for=0.1)
    persisting.record_all(single_loop_sessions(4))
    persisting.checkpoint()
    persisting.wait_saved()

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    persisting.on_event(ProgressMessage(loop_id="nobody.p.m.1", tool_call_id="c", tool_name="t", text="x"))
    with pytest.raises(StoreError) as raised:
        persisting.close()
    monkeypatch.undo()
    message = str(raised.value)
    assert message.startswith("1 session could not be saved") and "failed_sessions()" in message
    assert "the journal failed too" in message and "No space left" in message
    assert "\n" not in message
    assert [s.session_id for s in persisting.failed_sessions()] == ["s0000002"]


def checkpoints_fail(monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
    """Syncing the journal's new checkpoint fails (EIO): every release fails."""
    fsync = os.fsync

    def failing(fd: int) -> None:
        held, tmp = os.fstat(fd), directory / f"{CHECKPOINT_FILE}.tmp"
        if tmp.exists() and (tmp.stat().st_ino, tmp.stat().st_dev) == (held.st_ino, held.st_dev):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", failing)


def test_a_journal_that_cannot_be_released_is_warned_about_once_per_episode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A failed release was logged at DEBUG only: the journal grew without a word."""
    evs = single_loop_sessions(9)
    thirds = [evs[: len(evs) // 3], evs[len(evs) // 3 : 2 * len(evs) // 3], evs[2 * len(evs) // 3 :]]
    store = JsonDirStore(tmp_path / "store")

    def record(persisting: AutoPersistingRecorder, events: list[AgentEvent]) -> None:
        for event in events:
            persisting.on_event(event)
            persisting.checkpoint()
            assert persisting.wait_saved(timeout=10)  # and released (or not)

    with caplog.at_level(logging.WARNING, "phi_session.persist"):
        with AutoPersistingRecorder(store, journal=tmp_path / "j", checkpoint_interval=None) as persisting:
            checkpoints_fail(monkeypatch, tmp_path / "j")
            record(persisting, thirds[0])
            monkeypatch.undo()
            record(persisting, thirds[1])
            assert (tmp_path / "j" / CHECKPOINT_FILE).exists()  # released again
            checkpoints_fail(monkeypatch, tmp_path / "j")
            record(persisting, thirds[2])
            monkeypatch.undo()
    warnings = [r.getMessage() for r in caplog.records if "release" in r.getMessage()]
    assert len(warnings) == 2, warnings
    assert all("keeps growing" in warning and "Input/output error" in warning for warning in warnings)
    assert stored(store) == recorded(evs)


class DamagedCopies(JsonDirStore):
    """Holds an unusable stored copy of the sessions in `damaged`."""

    def __init__(self, directory: Path, damaged: frozenset[str]) -> None:
        super().__init__(directory)
        self.damaged = damaged

    def save(self, session: Session) -> None:
        if session.session_id in self.damaged:
            raise StoredSessionUnusable(f"stored session {session.session_id!r} does not decode")
        super().save(session)


def session_of(event: AgentEvent) -> str:
    return getattr(event, "session_id", None) or getattr(event, "loop_id", "").split(".")[0]


def test_a_session_the_store_refuses_on_start_is_kept_and_recording_starts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One session the store could not take made every start on the journal raise
    RecoveryError ("1 sessions could not be saved (s0000001); the journal was kept"),
    without the store's reason, on every restart."""
    evs = single_loop_sessions(6)
    before = [e for e in evs if session_of(e) < "s0000004"]
    after = [e for e in evs if session_of(e) >= "s0000004"]
    with Journal(tmp_path / "j", durability="os", segment_bytes=2048) as journal:  # a crashed run
        JournaledRecorder(journal).record_all(before)
    refused = [r.payload for r in read_records(tmp_path / "j") if b'"s0000001' in r.payload]
    store = DamagedCopies(tmp_path / "store", frozenset({"s0000001"}))
    with caplog.at_level(logging.WARNING, "phi_session.persist"):
        persisting = AutoPersistingRecorder(store, journal=tmp_path / "j", retry_for=0.1)
    report = persisting.recovery_report
    assert report is not None and report.failed_sessions == ["s0000001"]
    assert [s.session_id for s in persisting.failed_sessions()] == ["s0000001"]
    warned = [r.getMessage() for r in caplog.records if "could not be saved" in r.getMessage()]
    assert len(warned) == 1 and "1 session could not be saved" in warned[0]
    assert "does not decode" in warned[0] and "failed_sessions()" in warned[0]
    # Only the refused session's records are kept, in this run's journal: a crash now loses nothing.
    assert [r.payload for r in read_records(tmp_path / "j")] == refused
    shutil.copytree(tmp_path / "j", tmp_path / "crashed")
    persisting.record_all(after)
    with pytest.raises(StoreError, match=r"1 session could not be saved .*does not decode"):
        persisting.close()
    healthy = JsonDirStore(tmp_path / "store")
    assert recover(tmp_path / "crashed", healthy).failed_sessions == []
    with AutoPersistingRecorder(healthy, journal=tmp_path / "j") as restarted:
        assert restarted.recovery_report is not None and restarted.failed_sessions() == []
    assert stored(healthy) == recorded(evs)


def test_a_journal_left_by_a_crash_is_recovered_on_start(tmp_path: Path) -> None:
    evs = single_loop_sessions(6)
    with Journal(tmp_path / "j", durability="os") as journal:  # a run that never saved anything
        JournaledRecorder(journal).record_all(evs)
    store = SqliteStore(tmp_path / "s.db")
    with AutoPersistingRecorder(store, journal=tmp_path / "j") as persisting:
        report = persisting.recovery_report
    assert report is not None and report.sessions_saved == 6
    assert stored(store) == recorded(evs)


def test_journal_segments_are_released_while_running(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j", durability="os", segment_bytes=4096)
    store = SqliteStore(tmp_path / "s.db")
    with AutoPersistingRecorder(store, journal=journal, checkpoint_every=20) as persisting:
        persisting.record_all(single_loop_sessions(60))
        persisting.checkpoint()
        assert persisting.wait_saved(timeout=10)
        deadline = time.monotonic() + 10
        while len(journal.segments()) > 1 and time.monotonic() < deadline:
            time.sleep(0.01)  # the writer releases once it has caught up
        # Everything is saved: only the active segment is left.
        assert len(journal.segments()) == 1 and persisting.stats()["segments_removed"] > 10
    assert journal.closed and list((tmp_path / "j").glob("*.wal")) == []


def test_a_journal_feeds_one_recorder(tmp_path: Path) -> None:
    """Two recorders given one `Journal` were both accepted: the first one's release
    removed segments holding the second one's unsaved events."""
    store = SqliteStore(tmp_path / "s.db")
    with Journal(tmp_path / "j", durability="os") as journal:
        with AutoPersistingRecorder(store, journal=journal) as persisting:
            with pytest.raises(JournalLocked, match="in use by another recorder"):
                AutoPersistingRecorder(store, journal=journal)
            with pytest.raises(JournalLocked, match="in use by another recorder"):
                JournaledRecorder(journal)
            persisting.record_all(single_loop_sessions(1))  # still open: the refusal closed nothing
    assert list(store.list_ids()) == ["s0000000"]


def test_a_recorders_journal_hooks_are_not_replaced_by_anothers(tmp_path: Path) -> None:
    """Setting one's own settled hook on an `AutoPersistingRecorder`'s recorder replaced
    its persister's: sub-agents' journal records were then kept for ever; a second
    `JournaledRecorder` of a recorder took its events from the first one's journal."""
    with Journal(tmp_path / "j", durability="os") as journal:
        with AutoPersistingRecorder(SqliteStore(tmp_path / "s.db"), journal=journal) as persisting:
            with pytest.raises(InvalidArgument, match="already has a settled hook"):
                persisting.recorder.set_settled_hook(lambda session_id: None)
            with Journal(tmp_path / "other", durability="os") as other:
                with pytest.raises(InvalidArgument, match="already has a write-ahead hook"):
                    JournaledRecorder(other, persisting.recorder)
                JournaledRecorder(other).record_all(single_loop_sessions(1))  # left unclaimed
            persisting.record_all(single_loop_sessions(1))
            persisting.flush()
            persisting.recorder.set_settled_hook(None)  # cleared on purpose: then another may be set
            persisting.recorder.set_settled_hook(print)
    assert stored(persisting.store) == recorded(single_loop_sessions(1))


def test_a_recorder_is_journaled_again_once_its_journal_is_closed(tmp_path: Path) -> None:
    """A closed journal's (or `AutoPersistingRecorder`'s) hooks stayed on its recorder:
    a new `JournaledRecorder` of it was refused ("already has a write-ahead hook") and
    its own `on_event` raised "journal ... is closed"."""
    events = single_loop_sessions(3)
    first, second, third = ([e for e in events if e.loop_id.startswith(f"s000000{i}")] for i in range(3))
    recorder = SessionRecorder()
    journaled = JournaledRecorder(Journal(tmp_path / "j1", durability="os"), recorder)
    journaled.record_all(first)
    journaled.journal.close()
    with pytest.raises(StoreError, match="is closed"):  # not recorded unjournaled
        journaled.record_all(second)
    recorder.record_all(second)  # its own, unjournaled
    with JournaledRecorder(Journal(tmp_path / "j2", durability="os"), recorder) as again:
        with Journal(tmp_path / "j3", durability="os") as other:
            with pytest.raises(InvalidArgument, match="already has a write-ahead hook"):  # a live one
                JournaledRecorder(other, recorder)
        again.record_all(third)
    assert again.journal.closed
    recorder.flush()
    assert [s.session_id for s in recorder.drain_completed()] == ["s0000000", "s0000001", "s0000002"]
    persisting = AutoPersistingRecorder(SqliteStore(tmp_path / "s.db"), journal=tmp_path / "j4")
    persisting.close()
    JournaledRecorder(Journal(tmp_path / "j5", durability="os"), persisting.recorder).close()
    persisting.recorder.set_settled_hook(print)


def test_an_event_given_while_the_journal_closes_is_refused_not_recorded_unjournaled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write-ahead hook was released before the `JournaledRecorder` refused events:
    one given in between was recorded, never journaled, and `on_event` returned normally."""
    events = single_loop_sessions(2)
    first, second = ([e for e in events if e.loop_id.startswith(f"s000000{i}")] for i in range(2))
    recorder = SessionRecorder()
    journaled = JournaledRecorder(Journal(tmp_path / "j", durability="os"), recorder)
    journaled.record_all(first)
    release_hooks = recorder.release_hooks
    refused: list[StoreError] = []

    def release_then_feed(*hooks: Callable[..., object]) -> None:
        release_hooks(*hooks)
        try:
            journaled.on_event(second[0])
        except StoreError as error:
            refused.append(error)

    monkeypatch.setattr(recorder, "release_hooks", release_then_feed)
    journaled.close()
    assert [str(error) for error in refused] == [f"journal {tmp_path / 'j'} is closed"]
    recorder.flush()
    assert [s.session_id for s in recorder.drain_completed()] == [first[0].session_id]


def test_an_event_on_its_way_in_as_the_journal_closes_is_refused(tmp_path: Path) -> None:
    """A feeder past `on_event`'s check when close began, its event not yet in the
    recorder, recorded it unjournaled once the hook was released."""
    events = single_loop_sessions(2)
    first, second = ([e for e in events if e.loop_id.startswith(f"s000000{i}")] for i in range(2))
    recorder = SessionRecorder()
    on_event, released = recorder.on_event, threading.Event()

    def slow_on_event(event: AgentEvent) -> None:
        if event is second[0]:
            released.wait(0.5)  # until the hook is released, or no longer if close waits for us
        on_event(event)

    recorder.on_event = slow_on_event  # type: ignore[method-assign]
    release_hooks = recorder.release_hooks

    def release(*hooks: Callable[..., object]) -> None:
        release_hooks(*hooks)
        released.set()

    recorder.release_hooks = release  # type: ignore[method-assign]
    journaled = JournaledRecorder(Journal(tmp_path / "j", durability="os"), recorder)
    journaled.record_all(first)
    outcome: list[object] = []

    def feed() -> None:
        try:
            outcome.append(journaled.on_event(second[0]))
        except StoreError as error:
            outcome.append(error)

    feeder = threading.Thread(target=feed)
    feeder.start()
    journaled.close()
    feeder.join()
    assert [type(o) for o in outcome] == [StoreError]
    recorder.flush()
    assert [s.session_id for s in recorder.drain_completed()] == [first[0].session_id]


def test_an_idle_recorder_still_saves_finished_sessions(tmp_path: Path) -> None:
    store = JsonDirStore(tmp_path / "store")
    with AutoPersistingRecorder(store, checkpoint_every=10**9, checkpoint_interval=0.02) as persisting:
        persisting.record_all(single_loop_sessions(1))
        deadline = time.monotonic() + 10
        while not store.list_ids() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.list_ids() == ["s0000000"]


def test_orphans_go_to_the_journal_or_are_counted_and_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stray = ProgressMessage(loop_id="nobody.p.m.1", tool_call_id="c", tool_name="t", text="lost?")
    with AutoPersistingRecorder(JsonDirStore(tmp_path / "a"), journal=tmp_path / "j") as persisting:
        persisting.on_event(stray)
    assert persisting.stats()["orphans_written"] == 1 and persisting.stats()["orphans_dropped"] == 0
    assert (tmp_path / "j" / ORPHANS_FILE).read_bytes() == encode_event(stray) + b"\n"
    with AutoPersistingRecorder(JsonDirStore(tmp_path / "b")) as persisting:
        persisting.on_event(stray)
        assert [o.event for o in persisting.recorder.orphans()] == [stray]  # until the hand-over
        with caplog.at_level(logging.WARNING, logger="phi_session.persist"):
            persisting.checkpoint()
    assert persisting.recorder.orphans() == [] and persisting.stats()["orphans_dropped"] == 1
    assert [record.getMessage() for record in caplog.records if record.name == "phi_session.persist"] == [
        "1 event of no known loop dropped, no orphans sink (AutoPersistingRecorder(orphans=...)); 1 so far"
    ]
    kept: list[AgentEvent] = []
    with AutoPersistingRecorder(JsonDirStore(tmp_path / "c"), orphans=kept.extend) as persisting:
        persisting.on_event(stray)
        persisting.checkpoint()
        assert kept == [stray]  # handed over at the checkpoint, none dropped
    assert persisting.stats()["orphans_written"] == 1 and persisting.stats()["orphans_dropped"] == 0

    def failing(events: list[AgentEvent]) -> None:
        raise OSError("disk full")

    caplog.clear()
    with AutoPersistingRecorder(JsonDirStore(tmp_path / "d"), orphans=failing) as persisting:
        persisting.on_event(stray)
        with caplog.at_level(logging.WARNING, logger="phi_session.persist"):
            persisting.checkpoint()
    assert persisting.stats()["orphans_dropped"] == 1
    assert "the orphans sink failed: OSError: disk full" in caplog.text
    # A Ctrl-C in the sink, closing: nothing lost, the next close hands them over.
    calls: list[list[AgentEvent]] = []

    def interrupted_once(events: list[AgentEvent]) -> None:
        calls.append(events)
        if len(calls) == 1:
            raise KeyboardInterrupt

    persisting = AutoPersistingRecorder(JsonDirStore(tmp_path / "f"), orphans=interrupted_once)
    persisting.on_event(stray)
    with pytest.raises(KeyboardInterrupt):
        persisting.close()
    persisting.close()
    assert calls == [[stray], [stray]]
    assert persisting.stats()["orphans_written"] == 1 and persisting.stats()["orphans_dropped"] == 0
    # A Ctrl-C handled just after the sink returned, having taken them: not handed again.
    taken: list[list[AgentEvent]] = []

    class _InterruptedOnce(dict[str, int]):
        def __setitem__(self, key: str, value: int) -> None:
            super().__setitem__(key, value)
            if key == "orphans_written" and value == 1 and len(taken) == 1:
                raise KeyboardInterrupt

    persisting = AutoPersistingRecorder(JsonDirStore(tmp_path / "g"), orphans=taken.append)
    persisting._counters = _InterruptedOnce(persisting._counters)
    persisting.on_event(stray)
    with pytest.raises(KeyboardInterrupt):
        persisting.close()
    persisting.close()
    assert taken == [[stray]]
    with pytest.raises(InvalidArgument, match="without a journal"):
        AutoPersistingRecorder(JsonDirStore(tmp_path / "e"), journal=tmp_path / "j2", orphans=kept.extend)
    with pytest.raises(TypeError):
        AutoPersistingRecorder(JsonDirStore(tmp_path / "e"), orphans="orphans.jsonl")  # type: ignore[arg-type]


def test_without_a_journal_orphans_are_not_held_for_ever(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each session's tool that ended after its loop did (a run cancelled): without a
    journal, as adapters record into their embedded store, the recorder kept every such
    event for ever (30,000 sessions: 30,000 orphans, 337 bytes a session). Now each
    hand-over drains them, with one warning counting those it drops."""

    ts = Timestamp.now()

    def session(i: int) -> list[AgentEvent]:
        loop = f"s{i}.c.1"
        return [
            AgentStart(agent_id="x", session_id=f"s{i}", loop_id=loop, timestamp=ts),
            AgentEnd(loop_id=loop, messages=(), usage=Usage(input=1, output=1), timestamp=ts),
            ToolExecutionEnd(
                loop_id=loop,
                tool_call_id="late",
                tool_name="t",
                result=ToolResult(content=()),
                is_error=False,
            ),
        ]

    with caplog.at_level(logging.WARNING, logger="phi_session.persist"):
        with AutoPersistingRecorder(
            SqliteStore(tmp_path / "s.db"), checkpoint_every=10**9, checkpoint_interval=None
        ) as persisting:
            for batch in range(3):
                for i in range(batch * 50, (batch + 1) * 50):
                    persisting.record_all(session(i))
                persisting.checkpoint()
                assert persisting.recorder.stats()["orphans"] == 0
                assert persisting.stats()["orphans_dropped"] == (batch + 1) * 50
    dropped = [record.getMessage() for record in caplog.records if record.name == "phi_session.persist"]
    assert len(dropped) == 3 and dropped[-1].startswith(
        "50 events of no known loop dropped"
    )  # one a hand-over


def test_orphans_written_at_a_checkpoint_are_not_written_again_after_a_crash(tmp_path: Path) -> None:
    strays = [
        ProgressMessage(loop_id=f"nobody.p.m.{n}", tool_call_id="c", tool_name="t", text="lost?")
        for n in range(3)
    ]
    with AutoPersistingRecorder(
        JsonDirStore(tmp_path / "store"), journal=tmp_path / "j", checkpoint_interval=None
    ) as persisting:
        persisting.record_all(single_loop_sessions(1))
        persisting.checkpoint()
        persisting.wait_saved()
        persisting.record_all(strays)  # no session to save at the next checkpoint
        persisting.checkpoint()
        persisting.wait_saved()
        assert persisting.journal is not None
        persisting.journal.sync()
        shutil.copytree(tmp_path / "j", tmp_path / "crashed")  # the journal as a SIGKILL leaves it
    recover(tmp_path / "crashed", JsonDirStore(tmp_path / "store"))
    orphans = (tmp_path / "crashed" / ORPHANS_FILE).read_bytes().splitlines()
    assert orphans == [encode_event(event) for event in strays]  # once each


def strays_of(name: str, count: int) -> list[AgentEvent]:
    """Events of loops nobody started, each its own: they become orphans."""
    return [
        ProgressMessage(loop_id=f"{name}.p.m.{n}", tool_call_id="c", tool_name="t", text="lost?")
        for n in range(count)
    ]


def crash_between_orphans_and_checkpoint(
    tmp_path: Path, settled: list[AgentEvent], unsettled: list[AgentEvent]
) -> Path:
    """The journal as a SIGKILL leaves it after the orphans of `unsettled` were written,
    before the checkpoint recorded them as settled (those of `settled` are)."""
    with AutoPersistingRecorder(
        JsonDirStore(tmp_path / "store"), journal=tmp_path / "j", checkpoint_interval=None
    ) as persisting:
        persisting.record_all([*single_loop_sessions(1), *settled])
        persisting.checkpoint()
        persisting.wait_saved()
        checkpoint = (tmp_path / "j" / CHECKPOINT_FILE).read_bytes()
        persisting.record_all(unsettled)
        persisting.checkpoint()
        persisting.wait_saved()
        assert persisting.journal is not None
        persisting.journal.sync()
        shutil.copytree(tmp_path / "j", tmp_path / "crashed")
    (tmp_path / "crashed" / CHECKPOINT_FILE).write_bytes(checkpoint)
    return tmp_path / "crashed"


def test_orphans_written_after_the_last_checkpoint_are_written_once_by_recovery(tmp_path: Path) -> None:
    strays = strays_of("nobody", 4)
    crashed = crash_between_orphans_and_checkpoint(tmp_path, strays[:2], strays[2:])
    for _ in range(2):  # recovering twice changes nothing
        recover(crashed, JsonDirStore(tmp_path / "store"))
        orphans = (crashed / ORPHANS_FILE).read_bytes().splitlines()
        assert orphans == [encode_event(event) for event in strays]  # once each


def test_a_recorder_started_on_such_a_journal_writes_every_orphan_once(tmp_path: Path) -> None:
    strays, later = strays_of("nobody", 4), strays_of("later", 2)
    crashed = crash_between_orphans_and_checkpoint(tmp_path, strays[:2], strays[2:])
    with AutoPersistingRecorder(JsonDirStore(tmp_path / "store"), journal=crashed) as persisting:
        persisting.record_all(later)  # this run's own orphans, after the recovered ones
        persisting.checkpoint()
        persisting.wait_saved()
        assert persisting.journal is not None
        recover(persisting.journal, JsonDirStore(tmp_path / "store"))  # nothing left to recover
    orphans = (crashed / ORPHANS_FILE).read_bytes().splitlines()
    assert orphans == [encode_event(event) for event in [*strays, *later]]


def test_concurrent_producers(tmp_path: Path) -> None:
    evs = single_loop_sessions(24)
    by_session: dict[str, list[AgentEvent]] = {}
    for event in evs:
        by_session.setdefault(event.loop_id.split(".")[0], []).append(event)  # type: ignore[union-attr]
    store = SqliteStore(tmp_path / "s.db")
    with AutoPersistingRecorder(store, journal=tmp_path / "j", checkpoint_every=7) as persisting:

        def produce(part: int) -> None:
            for session_id in sorted(by_session)[part::4]:
                persisting.record_all(by_session[session_id])

        threads = [threading.Thread(target=produce, args=(part,)) for part in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert stored(store) == recorded(evs)


@pytest.mark.parametrize("journaled", [False, True])
def test_close_waits_for_an_event_being_recorded(
    tmp_path: Path, journaled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event inside the recorder as `close` begins is recorded and saved before close returns."""
    evs = single_loop_sessions(2)
    inside, go_on = threading.Event(), threading.Event()
    on_checked_event = SessionRecorder.on_checked_event  # what both of its on_events call

    def slow_on_checked_event(recorder: SessionRecorder, event: AgentEvent) -> None:
        if event is evs[-1]:
            inside.set()
            go_on.wait(5)
        on_checked_event(recorder, event)

    monkeypatch.setattr(SessionRecorder, "on_checked_event", slow_on_checked_event)
    store = SqliteStore(tmp_path / "s.db")
    persisting = AutoPersistingRecorder(store, journal=tmp_path / "j" if journaled else None)
    persisting.record_all(evs[:-1])
    feeder = threading.Thread(target=persisting.on_event, args=(evs[-1],))
    feeder.start()
    assert inside.wait(5)
    closer = threading.Thread(target=persisting.close)
    closer.start()
    closer.join(0.3)
    assert closer.is_alive()  # waiting for the producer
    go_on.set()
    feeder.join()
    closer.join(5)
    assert not closer.is_alive()
    assert stored(store) == recorded(evs)


def test_closed_and_invalid_use(tmp_path: Path) -> None:
    persisting = AutoPersistingRecorder(JsonDirStore(tmp_path))
    persisting.close()
    persisting.close()  # idempotent
    with pytest.raises(PhiSessionError, match="closed"):
        persisting.on_event(single_loop_sessions(1)[0])
    # An event holding what phi-core cannot (text 5) was refused for that, not for the close.
    bad = MessageEnd(loop_id="l", message=replace(assistant("x"), content=(TextContent(text=5),)))  # type: ignore[arg-type]
    with pytest.raises(PhiSessionError, match="closed"):
        persisting.on_event(bad)
    assert persisting.checkpoint() == 0
    with pytest.raises(InvalidArgument, match="at least 1"):  # a PhiSessionError and a ValueError
        AutoPersistingRecorder(JsonDirStore(tmp_path), checkpoint_every=0)
    with pytest.raises(InvalidArgument, match="checkpoint_interval"):
        AutoPersistingRecorder(JsonDirStore(tmp_path), checkpoint_interval=0)


class ClosedStore(JsonDirStore):
    """A store closed before the recorder saving into it."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.attempts = 0

    def save(self, session: Session) -> None:
        self.attempts += 1
        raise StoreClosed("the ClosedStore is closed")


def test_a_closed_store_is_not_retried_and_close_says_so(tmp_path: Path) -> None:
    """A closed store's error was retried for retry_for seconds (at interpreter exit, a hang)."""
    store = ClosedStore(tmp_path / "store")
    persisting = AutoPersistingRecorder(store, journal=tmp_path / "j", retry_for=30)
    persisting.record_all(single_loop_sessions(3))
    with pytest.raises(
        StoreError,
        match=r"^3 sessions could not be saved into .* \(s0000000, s0000001, s0000002\): the ClosedStore "
        r"is closed; they are in failed_sessions\(\) and in the journal ",
    ):
        persisting.close()
    assert persisting.stats()["save_retries"] == 0 and store.attempts <= 6  # once each, and close's last try
    assert len(persisting.failed_sessions()) == 3


_CLOSED_AT_EXIT = """
import logging, sys
sys.path.insert(0, sys.argv[1])
from journal_kill_worker import stream
from phi_session.errors import StoreClosed
from phi_session.persist import AutoPersistingRecorder
from phi_session.stores.json_dir import JsonDirStore

class Closed(JsonDirStore):
    def save(self, session):
        raise StoreClosed("the PostgresStore is closed")

logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
journal = None if sys.argv[3] == "-" else sys.argv[3]
recorder = AutoPersistingRecorder(Closed(sys.argv[2]), journal=journal, retry_for=30)
recorder.record_all(stream(sessions=2, loops=1))
"""


@pytest.mark.parametrize("journaled", [False, True])
def test_a_store_closed_before_the_recorder_is_reported_at_exit_in_one_line(
    tmp_path: Path, journaled: bool
) -> None:
    journal = str(tmp_path / "j") if journaled else "-"
    done = subprocess.run(
        [sys.executable, "-c", _CLOSED_AT_EXIT, str(Path(__file__).parent), str(tmp_path / "store"), journal],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    [line] = [line for line in done.stderr.splitlines() if "phi_session.persist" in line]
    assert "2 sessions could not be saved" in line and "the PostgresStore is closed" in line
    if journaled:
        assert f"their events are kept in the journal {journal}" in line
    else:
        assert line.endswith("they are lost")


class InterruptedStore(JsonDirStore):
    def save(self, session: Session) -> None:
        raise KeyboardInterrupt


def test_a_failed_recovery_on_start_leaves_the_journal_unlocked(tmp_path: Path) -> None:
    with Journal(tmp_path / "j", durability="os") as journal:
        JournaledRecorder(journal).record_all(single_loop_sessions(2))
    with pytest.raises(KeyboardInterrupt):
        AutoPersistingRecorder(InterruptedStore(tmp_path / "store"), journal=tmp_path / "j")
    Journal(tmp_path / "j").close()  # not left locked


def test_a_late_parallel_event_is_kept_as_an_orphan_without_holding_the_journal(tmp_path: Path) -> None:
    both = list(stream(sessions=2, loops=1, turns=2, interleave=1))
    first = [e for e in both if getattr(e, "loop_id", "").startswith("s0000000.")]
    second = both[len(first) :]
    late = ParallelLoopEnd(
        session_id="s0000000",
        selected_loop_id="s0000000.p.m.1",
        selected_config_index=0,
        evaluation_usage=Usage(input=0, output=0),
        timestamp=Timestamp.now(),
    )
    store = JsonDirStore(tmp_path / "store")
    with AutoPersistingRecorder(store, journal=tmp_path / "j", checkpoint_every=10**9) as persisting:
        persisting.record_all(first)
        persisting.checkpoint()  # s0000000 is saved and leaves memory
        assert persisting.wait_saved(timeout=10)
        persisting.on_event(late)  # its session is gone: an orphan, and no pin
        assert "s0000000" not in persisting._pins
        persisting.record_all(second)
        persisting.checkpoint()
        assert persisting.wait_saved(timeout=10)
    orphans = (tmp_path / "j" / "orphans.jsonl").read_text()
    assert orphans.count("ParallelLoopEnd") == 1
    assert len(store.list_ids()) == 2


def test_the_writer_holds_at_most_the_byte_budget_plus_one_session(tmp_path: Path) -> None:
    """Issue 9.10: the bound is bytes, not a count of sessions."""
    evs = list(stream(sessions=60, loops=1, turns=3))
    budget = 40_000  # a few sessions of this stream (15-40 events each)
    queued: list[float] = []

    class SlowObservedStore(JsonDirStore):
        def save(self, session: Session) -> None:
            queued.append(persisting.stats()["bytes_queued"])
            time.sleep(0.003)
            super().save(session)

    store = SlowObservedStore(tmp_path / "store")
    with AutoPersistingRecorder(
        store, checkpoint_every=40, checkpoint_interval=None, max_pending_bytes=budget
    ) as persisting:
        for event in evs:
            persisting.on_event(event)
            queued.append(persisting.stats()["bytes_queued"])
        assert persisting.stats()["backpressure_waits"] > 0
    largest = max(held_bytes(store.load(sid)) for sid in store.list_ids())
    assert max(queued) > budget // 2  # the budget was used...
    assert max(queued) <= budget + largest  # ...and never exceeded by more than one session
    assert stored(store) == recorded(evs)


def test_a_huge_message_counts_for_what_it_weighs() -> None:
    """The budget estimate counts the text of messages: three 4 MB replies are not
    "a few events"."""
    from phi_session import AgentSession, LoopConfigSnapshot, Tracer, Usage

    recorder = SessionRecorder()
    tracer = Tracer(AgentSession(), sinks=[recorder], config=LoopConfigSnapshot(model="m", provider="p"))
    huge = "x" * 4_000_000
    with tracer.loop() as loop:
        loop.user("read it")
        for _ in range(3):
            with loop.turn() as turn, turn.assistant() as reply:
                reply.text_delta(huge)
                reply.finish(usage=Usage(input=1, output=1))
    tracer.close()
    recorder.flush()
    (session,) = recorder.drain_completed()
    events = sum(len(record.events) for record in session.loops)
    assert 3 * len(huge) <= held_bytes(session) <= 3 * len(huge) + 1_000 * (events + 1)


def test_tool_arguments_and_details_count_for_what_they_weigh() -> None:
    """A 2 MB tool-call argument and a 1 MB result's details count against the budget
    (the Tracer keeps its own copy of the arguments in the call and in its
    ToolExecutionStart: two in memory)."""
    from phi_session import AgentSession, LoopConfigSnapshot, ToolCall, Tracer

    recorder = SessionRecorder()
    tracer = Tracer(
        AgentSession(), sinks=[recorder], config=LoopConfigSnapshot(model="m", provider="p"), redact=False
    )
    content = "y" * 2_000_000
    details = {"lines": ["z" * 1_000] * 1_000}
    with tracer.loop() as loop:
        loop.user("write it")
        with loop.turn() as turn:
            with turn.assistant() as reply:
                reply.finish(tool_calls=[ToolCall(id="c", name="write", arguments={"content": content})])
            with turn.tool(turn.tool_calls[0]) as tool:
                tool.result("ok", details=details)
    tracer.close()
    recorder.flush()
    (session,) = recorder.drain_completed()
    events = sum(len(record.events) for record in session.loops)
    weight = 2 * len(content) + 1_000 * 1_000
    assert weight <= held_bytes(session) <= weight + 1_000 * (events + 1)


def test_a_journaled_event_does_not_bring_its_session_up_to_date(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pinning the journal for an AgentStart looked the session up, linking its
    # records' children each time (each later child gathered all its siblings again).
    evs = list(stream(sessions=3, loops=4, turns=1))
    with AutoPersistingRecorder(
        JsonDirStore(tmp_path / "store"), journal=tmp_path / "journal", checkpoint_interval=None
    ) as persisting:
        looks = []
        monkeypatch.setattr(persisting.recorder, "get_session", looks.append)
        persisting.record_all(evs)
        assert looks == []
        monkeypatch.undo()
    assert stored(persisting.store) == recorded(evs)


def test_the_writer_saves_waiting_sessions_in_batches(tmp_path: Path) -> None:
    batches: list[int] = []

    class CountingStore(SqliteStore):
        def save_many(self, sessions: Sequence[Session]) -> None:
            batches.append(len(sessions))
            super().save_many(sessions)

    evs = single_loop_sessions(20)
    store = CountingStore(tmp_path / "s.db")
    with AutoPersistingRecorder(store, checkpoint_every=10**9, checkpoint_interval=None) as persisting:
        persisting.record_all(evs)
        persisting.checkpoint()  # hands the 20 sessions over at once
        assert persisting.wait_saved(timeout=30)
        assert persisting.stats()["writer_cpu_seconds"] > 0
    assert batches == [16, 4]
    assert stored(store) == recorded(evs)


def test_the_budget_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="max_pending_bytes"):
        AutoPersistingRecorder(JsonDirStore(tmp_path), max_pending_bytes=0)


def test_callbacks_run_outside_the_locks(tmp_path: Path) -> None:
    """Issue 10.8: an after_task that waits on another thread using the recorder does not deadlock."""
    evs = single_loop_sessions(3)
    seen: list[str] = []

    def after_task(session: Session) -> None:
        # Another thread reads the recorder's stats while this callback runs.
        reader = threading.Thread(target=persisting.stats)
        reader.start()
        reader.join(timeout=10)
        assert not reader.is_alive(), "stats() blocked on a lock held around the callback"
        seen.append(session.session_id)

    config = SessionRecorderConfig(after_task=after_task)
    store = JsonDirStore(tmp_path / "store")
    with AutoPersistingRecorder(
        store, config=config, checkpoint_every=1, checkpoint_interval=None, journal=tmp_path / "j"
    ) as persisting:
        persisting.record_all(evs)
    assert seen == [e.loop_id.split(".")[0] for e in evs if isinstance(e, AgentEnd)]  # in order
    assert stored(store) == recorded(evs)


def test_counters_are_exact_with_concurrent_saves(tmp_path: Path) -> None:
    """Issue 10.8: every counter changes under its lock (the writer's too)."""
    evs = single_loop_sessions(40)
    store = FlakyStore(tmp_path / "store", failures=5)
    with AutoPersistingRecorder(store, checkpoint_every=3, journal=tmp_path / "j") as persisting:
        persisting.record_all(evs)
    stats = persisting.stats()
    assert stats["events"] == len(evs) and stats["sessions_failed"] == 0
    assert stats["sessions_saved"] >= 40 and stats["save_retries"] == 5


_EXIT_CHILD = """
import itertools, sys
sys.path.insert(0, sys.argv[4])
from journal_kill_worker import stream
from phi_session import persist as persist_module
from phi_session.persist import AutoPersistingRecorder, held_bytes
from phi_session.stores.sqlite import SqliteStore

recorder = AutoPersistingRecorder(SqliteStore(sys.argv[1]), checkpoint_every=3,
                                  journal=sys.argv[3] if sys.argv[3] != "-" else None)
for event in itertools.islice(stream(sessions=30), int(sys.argv[5])):
    recorder.on_event(event)
if sys.argv[2] == "raise":
    raise RuntimeError("the agent crashed")
"""


@pytest.mark.parametrize("journaled", [False, True])
@pytest.mark.parametrize("ending", ["return", "raise"])
def test_a_program_that_ends_with_the_recorder_open_saves_everything(
    tmp_path: Path, ending: str, journaled: bool
) -> None:
    """Issue 9.2: the exit hook stops the writer (saving what is pending) before the
    store's connections are closed; no SIGSEGV, no lost event, many times over."""
    runs = 8
    events = 400  # sessions in flight: open loops, and the writer saving at exit

    def run(index: int) -> tuple[int, str, Path]:
        db = tmp_path / f"{index}.db"
        journal = str(tmp_path / f"j{index}") if journaled else "-"
        child = subprocess.run(
            [
                sys.executable,
                "-c",
                _EXIT_CHILD,
                str(db),
                ending,
                journal,
                str(Path(__file__).parent),
                str(events + index),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        return child.returncode, child.stderr, db

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run, range(runs)))
    expected_code = 1 if ending == "raise" else 0
    for index, (code, stderr, db) in enumerate(results):
        assert code == expected_code, f"run {index}: exit status {code}\n{stderr}"
        assert ending != "raise" or "the agent crashed" in stderr
        evs = list(itertools.islice(stream(sessions=30), events + index))
        with SqliteStore(db) as store:
            assert stored(store) == recorded(evs), f"run {index}: events lost"


_PREFORK = """
import os, sys
sys.path.insert(0, sys.argv[2])
from journal_kill_worker import stream
from phi_session.persist import AutoPersistingRecorder
from phi_session.stores.sqlite import SqliteStore

recorder = AutoPersistingRecorder(SqliteStore(sys.argv[1]))
sessions = {}
for event in stream(sessions=3, loops=1, interleave=1):
    sessions.setdefault(event.loop_id.split(".")[0], []).append(event)
first, *others = sessions.values()
recorder.record_all(first[:1])  # open in the parent when it forks: the parent's to save
workers = []
for events in others:
    worker = os.fork()
    if worker == 0:
        recorder.record_all(events)
        sys.exit(0)  # without close: the exit hook saves
    workers.append(worker)
for worker in workers:
    assert os.waitstatus_to_exitcode(os.waitpid(worker, 0)[1]) == 0
recorder.record_all(first[1:])
recorder.close()
"""


@needs_fork
def test_forked_workers_record_into_the_store_with_a_recorder_of_their_own(tmp_path: Path) -> None:
    """A recorder made before a fork (a pre-fork server's workers) took the workers' events
    into a copy whose writer thread and exit hook were the parent's: nothing was saved."""
    db = tmp_path / "s.db"
    done = subprocess.run(
        [sys.executable, "-c", _PREFORK, str(db), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    with SqliteStore(db) as store:
        assert stored(store) == recorded(list(stream(sessions=3, loops=1, interleave=1)))


@needs_fork
def test_a_journaling_recorder_is_refused_in_a_forked_child_and_its_parent_goes_on(tmp_path: Path) -> None:
    """The child appended to the parent's journal segment: records numbered twice, and the
    parent's acknowledged records cut as a torn tail by the recovery after its crash."""
    evs = single_loop_sessions(2)
    half = len(evs) // 2
    store = SqliteStore(tmp_path / "s.db")
    journal = Journal(tmp_path / "j", durability="always")
    # Nothing saved, so every record stays in the journal until closing.
    with AutoPersistingRecorder(store, journal=journal, checkpoint_interval=None) as persisting:
        persisting.record_all(evs[:1])

        def child() -> None:
            with pytest.raises(UsedAfterFork, match="a forked process must make its own recorder"):
                persisting.on_event(evs[half])
            persisting.close()  # nothing of the child's: the parent's journal is left alone

        assert in_forked_child(child) == 0
        persisting.record_all(evs[1:])
        assert [record.seq for record in read_records(tmp_path / "j")] == list(range(journal.last_seq + 1))
    assert stored(store) == recorded(evs)


def test_a_drained_session_owed_its_parallel_winner_keeps_its_journal_records(tmp_path: Path) -> None:
    """Issue 9.1 with a journal: a session drained before its ParallelLoopEnd may come back
    as an amendment, so the journal keeps its records (recovery could redo it) until then."""
    ts = Timestamp.now()
    branches = ("g.a.m.1", "g.b.m.1")
    group = [ParallelLoopStart(session_id="g", loop_ids=branches, timestamp=ts)]
    for loop_id in branches:
        group += [
            AgentStart(agent_id="x", session_id="g", loop_id=loop_id, timestamp=ts),
            AgentEnd(loop_id=loop_id, messages=(), usage=Usage(input=1, output=1), timestamp=ts),
        ]
    winner = ParallelLoopEnd(
        session_id="g",
        selected_loop_id=branches[1],
        selected_config_index=1,
        evaluation_usage=Usage(input=0, output=0),
        timestamp=ts,
    )
    others = single_loop_sessions(40)
    journal = Journal(tmp_path / "j", durability="os", segment_bytes=4096)
    store = SqliteStore(tmp_path / "s.db")

    def settle() -> None:
        persisting.checkpoint()
        assert persisting.wait_saved(timeout=10)  # saved, and the journal told

    with AutoPersistingRecorder(
        store, journal=journal, checkpoint_every=10**9, checkpoint_interval=None
    ) as persisting:
        persisting.record_all(group)
        settle()  # g is complete (phi-core's contract) and saved, its group still open
        assert store.list_ids() == ["g"]
        persisting.record_all(others)
        settle()
        first = journal.segments()[0]
        assert b'"session_id":"g"' in first.read_bytes()  # still kept: g may be amended
        persisting.on_event(winner)
        settle()
        assert not first.exists()  # the amendment is saved: nothing holds it any more
    assert stored(store) == recorded(group + others + [winner])


def test_a_group_whose_session_never_started_a_loop_lets_the_journal_go_after_the_timeout(
    tmp_path: Path,
) -> None:
    """An agent killed between announcing a parallel group and starting its branches: its
    session, waiting for a first loop, pinned the journal from the announcement on for
    ever (20,000 sessions later: 299 segments of 64 KiB, against 3 without it). Now the
    checkpoint after ``group_end_timeout`` of stream time gives the group up: its Aborted
    branches are saved and the segment holding the announcement is removed."""
    start = Timestamp.now()
    group = ParallelLoopStart(session_id="dead", loop_ids=("dead.a.1", "dead.b.2"), timestamp=start)

    def session(i: int) -> list[AgentEvent]:  # 10 s of stream time apart
        at = Timestamp.from_ns(start.ns + i * 10**10)
        return [
            AgentStart(agent_id="x", session_id=f"s{i}", loop_id=f"s{i}.c.1", timestamp=at),
            AgentEnd(loop_id=f"s{i}.c.1", messages=(), usage=Usage(input=1, output=1), timestamp=at),
        ]

    journal = Journal(tmp_path / "j", durability="os", segment_bytes=4096)
    store = SqliteStore(tmp_path / "s.db")
    with AutoPersistingRecorder(
        store,
        journal=journal,
        config=SessionRecorderConfig(group_end_timeout=60),
        checkpoint_every=10**9,
        checkpoint_interval=None,
    ) as persisting:
        persisting.on_event(group)
        for i in range(1, 7):  # 60 s: not yet
            persisting.record_all(session(i))
        persisting.checkpoint()
        assert persisting.wait_saved(timeout=10)
        first = journal.segments()[0]
        assert b'"session_id":"dead"' in first.read_bytes()
        for i in range(7, 80):  # enough to fill more segments than the first
            persisting.record_all(session(i))
        persisting.checkpoint()
        assert persisting.wait_saved(timeout=10)
        assert not first.exists() and len(journal.segments()) == 1
        assert persisting._pins == {} and persisting.recorder.stats()["open_loops"] == 0
        dead = store.load("dead")
        assert [(loop.loop_id, loop.status) for loop in dead.loops] == [
            ("dead.a.1", "Aborted"),
            ("dead.b.2", "Aborted"),
        ]


def test_a_hub_s_sub_agents_checkpointed_per_loop_are_not_asked_about_per_sibling(tmp_path: Path) -> None:
    """Sub-agents each checkpointed as their loop ended, drained while the hub's tool calls
    that spawned them ran (owed them: their journal records pinned): every checkpoint asked
    the recorder about every sibling drained before, O(siblings) an event. Now only a
    session the recorder says may no longer be owed is asked about; the hub's loop ending
    without the tool calls still lets their records go."""
    ts = Timestamp.now()
    children = [f"k{i}" for i in range(30)]
    events: list[AgentEvent] = [AgentStart(agent_id="x", session_id="hub", loop_id="hub.c.1", timestamp=ts)]
    for child in children:
        events += [
            AgentStart(
                agent_id="y",
                session_id=child,
                loop_id=f"{child}.sub.1",
                parent_loop_id="hub.c.1",
                timestamp=ts,
            ),
            AgentEnd(loop_id=f"{child}.sub.1", messages=(), usage=Usage(input=1, output=1), timestamp=ts),
        ]
    hub_end = AgentEnd(loop_id="hub.c.1", messages=(), usage=Usage(input=1, output=1), timestamp=ts)
    journal = Journal(tmp_path / "j", durability="os", segment_bytes=4096)
    store = SqliteStore(tmp_path / "s.db")
    with AutoPersistingRecorder(
        store, journal=journal, checkpoint_every=10**9, checkpoint_interval=None
    ) as persisting:
        asked: list[str] = []
        may_amend = persisting.recorder.may_amend
        persisting.recorder.may_amend = lambda session_id: asked.append(session_id) or may_amend(session_id)  # type: ignore[method-assign]
        for event in events:
            persisting.on_event(event)
            if type(event) is AgentEnd:
                persisting.checkpoint(loop_id=event.loop_id)
        assert sorted(asked) == sorted(children)  # each once, as it was drained
        assert persisting.wait_saved(timeout=10)
        first = journal.segments()[0]
        assert b'"session_id":"k0"' in first.read_bytes()  # still kept: k0 is owed its tool call
        persisting.on_event(hub_end)
        persisting.checkpoint(loop_id="hub.c.1")
        assert persisting.wait_saved(timeout=10)
        assert not first.exists()  # the hub's loop ended: nothing is owed any more
    assert stored(store) == recorded([*events, hub_end])


class CountingOutlines(JsonDirStore):
    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.outlines_read = 0

    def load_outline(self, session_id: str) -> SessionOutline:
        self.outlines_read += 1
        return super().load_outline(session_id)


_SPAWNED = {"k1.sub.1": "t1", "k2.sub.1": "t2"}  # sub-agent loop -> the tool call of p.c.1 that spawned it


def crash_after_spawner_saved(tmp_path: Path) -> JsonDirStore:
    """A crash after the spawner p was saved (its journal records released) and before the
    sub-agents it spawned, which started late, were: the journal and store it leaves are
    ``crashed`` and ``crashed-store``. Returns the store of the run that went on."""
    ts = Timestamp.now()
    spawner: list[AgentEvent] = [AgentStart(agent_id="x", session_id="p", loop_id="p.c.1", timestamp=ts)]
    spawner += [
        ToolExecutionEnd(
            loop_id="p.c.1",
            tool_call_id=call,
            tool_name="sub",
            result=ToolResult(content=(), child_loop_id=child),
            is_error=False,
        )
        for child, call in _SPAWNED.items()
    ]
    spawner.append(AgentEnd(loop_id="p.c.1", messages=(), usage=Usage(input=1, output=1), timestamp=ts))
    sub_agents = [
        AgentStart(agent_id="y", session_id=child[:2], loop_id=child, parent_loop_id="p.c.1", timestamp=ts)
        for child in _SPAWNED
    ]
    journal = Journal(tmp_path / "j", durability="os", segment_bytes=4096)
    store = JsonDirStore(tmp_path / "store")
    with AutoPersistingRecorder(
        store, journal=journal, checkpoint_every=10**9, checkpoint_interval=None
    ) as persisting:
        persisting.record_all(spawner + single_loop_sessions(40))
        persisting.checkpoint()
        assert persisting.wait_saved(timeout=10)
        assert b'"session_id":"p"' not in b"".join(path.read_bytes() for path in journal.segments())
        persisting.record_all(sub_agents)
        # The process dies here: what is on disk is what a crash leaves.
        shutil.copytree(tmp_path / "j", tmp_path / "crashed")
        shutil.copytree(tmp_path / "store", tmp_path / "crashed-store")
    return store


def test_sub_agents_recovered_after_their_spawner_was_saved_keep_their_tool_calls(tmp_path: Path) -> None:
    """Recovery finds the tool calls in the store, reading the spawner's session once."""
    live = crash_after_spawner_saved(tmp_path)
    recovered = CountingOutlines(tmp_path / "crashed-store")
    recover(tmp_path / "crashed", recovered)
    for child, call in _SPAWNED.items():
        spawn = recovered.load(child[:2]).parent_spawn_ref
        assert spawn == SpawnRef(
            parent_session_id="p", parent_loop_id="p.c.1", tool_call_id=call, tool_name="sub"
        )
        assert live.load(child[:2]).parent_spawn_ref == spawn  # as the live run saved it
    assert recovered.outlines_read == 1


def test_a_spawner_that_cannot_be_read_leaves_provisional_spawn_refs_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Unreadable(JsonDirStore):
        def load_outline(self, session_id: str) -> SessionOutline:
            raise StoreError("disk I/O error")

    crash_after_spawner_saved(tmp_path)
    recovered = Unreadable(tmp_path / "crashed-store")
    with caplog.at_level(logging.WARNING, logger="phi_session"):
        recover(tmp_path / "crashed", recovered)
    for child in _SPAWNED:  # saved all the same, without the tool call
        assert recovered.load(child[:2]).parent_spawn_ref == SpawnRef(
            parent_session_id="p", parent_loop_id="p.c.1", tool_call_id="", tool_name=""
        )
    [warning] = [r.getMessage() for r in caplog.records if "spawn refs" in r.getMessage()]
    assert "'p'" in warning and "disk I/O error" in warning


class DeadServer(JsonDirStore):
    """A store whose server is gone: every save waits `attempt` seconds, then fails."""

    def __init__(self, directory: Path, attempt: float) -> None:
        super().__init__(directory)
        self.attempt = attempt

    def save(self, session: Session) -> None:
        time.sleep(self.attempt)
        raise StoreError("connection timed out")

    def save_many(self, sessions: Sequence[Session]) -> None:
        self.save(sessions[0])


@pytest.mark.parametrize("journaled", [False, True])
def test_closing_on_a_dead_store_waits_retry_for_once_whatever_is_pending(
    tmp_path: Path, journaled: bool
) -> None:
    evs = single_loop_sessions(40)  # three of the writer's batches
    store = DeadServer(tmp_path / "store", attempt=0.2)
    persisting = AutoPersistingRecorder(
        store, journal=tmp_path / "j" if journaled else None, retry_for=0.5, checkpoint_interval=None
    )
    persisting.record_all(evs)
    started = time.monotonic()
    with pytest.raises(StoreError, match="40 sessions could not be saved"):
        persisting.close()
    assert time.monotonic() - started < 0.5 + 1 + 3 * 0.2  # retry_for, the grace, an attempt or so
    # Every session is kept, none dropped: in memory, and in the journal when there is one.
    assert sorted(s.session_id for s in persisting.failed_sessions()) == sorted(recorded(evs))
    if journaled:
        restarted = AutoPersistingRecorder(JsonDirStore(tmp_path / "healthy"), journal=tmp_path / "j")
        restarted.close()
        assert stored(JsonDirStore(tmp_path / "healthy")) == recorded(evs)


@pytest.fixture
def ctrl_c() -> Iterator[Callable[[], None]]:
    """Presses Ctrl-C from any thread: a KeyboardInterrupt in the main thread, wherever it waits."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGUSR1, interrupt)
    main = threading.main_thread().ident
    assert main is not None
    yield lambda: signal.pthread_kill(main, signal.SIGUSR1)
    signal.signal(signal.SIGUSR1, previous)


class SlowFirstCall(JsonDirStore):
    """Saves slowly; `at_first_save` is called at the first save (from the writer thread)."""

    def __init__(self, directory: Path, at_first_save: Callable[[], None]) -> None:
        super().__init__(directory)
        self.at_first_save: Callable[[], None] | None = at_first_save

    def save(self, session: Session) -> None:
        if self.at_first_save is not None:
            self.at_first_save, call = None, self.at_first_save
            call()
        time.sleep(0.02)
        super().save(session)


@pytest.mark.parametrize("journaled", [False, True])
def test_a_close_interrupted_while_the_writer_saves_is_finished_by_the_next(
    tmp_path: Path, ctrl_c: Callable[[], None], journaled: bool
) -> None:
    """Ctrl-C while `close` waited for the writer, then `close` again: the second returned at
    once (the first had marked the recorder closed), and what the writer had not saved yet
    died with the process."""
    evs = single_loop_sessions(20)
    store = SlowFirstCall(tmp_path / "store", ctrl_c)
    persisting = AutoPersistingRecorder(
        store,
        journal=tmp_path / "j" if journaled else None,
        checkpoint_every=10**6,
        checkpoint_interval=None,
    )
    persisting.record_all(evs)
    with pytest.raises(KeyboardInterrupt):
        persisting.close()
    with pytest.raises(PhiSessionError, match="closed"):  # no event is taken meanwhile
        persisting.on_event(evs[0])
    persisting.close()
    assert stored(store) == recorded(evs)
    assert not list((tmp_path / "j").glob("*.wal"))  # released and closed
    persisting.close()  # done: nothing more to do


class RefusingTheWriter(JsonDirStore):
    """Refuses every save but those of the main thread (`close`'s last retry), the first of
    which is interrupted by Ctrl-C."""

    interrupted = False

    def save(self, session: Session) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise StoreError("database is having a bad day")
        if not self.interrupted:
            self.interrupted = True
            raise KeyboardInterrupt
        super().save(session)


def test_a_close_interrupted_while_retrying_failed_sessions_retries_them_next_time(tmp_path: Path) -> None:
    evs = single_loop_sessions(5)
    store = RefusingTheWriter(tmp_path / "store")
    persisting = AutoPersistingRecorder(store, retry_for=0, checkpoint_every=10**6, checkpoint_interval=None)
    persisting.record_all(evs)
    with pytest.raises(KeyboardInterrupt):
        persisting.close()
    assert len(persisting.failed_sessions()) == 5  # none dropped by the interrupt
    persisting.close()
    assert persisting.failed_sessions() == []
    assert stored(store) == recorded(evs)


def interrupt_sizing_at(monkeypatch: pytest.MonkeyPatch, call: int, *, lined_up: bool = False) -> None:
    """Ctrl-C lands while a hand-over sizes the sessions it drained: at the `call`-th one;
    or (`lined_up`) once that one is lined up for the writer, before it is let in."""
    calls = itertools.count(1)
    admit = AutoPersistingRecorder._admit

    def sizing(session: Session) -> int:
        if next(calls) == call:
            raise KeyboardInterrupt
        return held_bytes(session)

    def admitting(self: AutoPersistingRecorder) -> None:
        if threading.current_thread() is threading.main_thread() and next(calls) == call:
            raise KeyboardInterrupt
        admit(self)

    if lined_up:
        monkeypatch.setattr(AutoPersistingRecorder, "_admit", admitting)
    else:
        monkeypatch.setattr("phi_session.persist.held_bytes", sizing)


class CountingSaves(JsonDirStore):
    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.saves: Counter[str] = Counter()

    def save(self, session: Session) -> None:
        self.saves[session.session_id] += 1
        super().save(session)


@pytest.mark.parametrize("lined_up", [False, True])
@pytest.mark.parametrize("journaled", [False, True])
def test_a_close_interrupted_while_it_hands_sessions_over_saves_them_next_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, journaled: bool, lined_up: bool
) -> None:
    """Ctrl-C while `close` sized the sessions it drained: the next `close` returned OK with
    none of the 20 saved (drained, not yet lined up for the writer, they were dropped).
    Once one was lined up, before it left the drained ones: it was saved twice."""
    evs = single_loop_sessions(20)
    store = CountingSaves(tmp_path / "store")
    persisting = AutoPersistingRecorder(
        store, journal=tmp_path / "j" if journaled else None, checkpoint_every=10**6, checkpoint_interval=None
    )
    persisting.record_all(evs)
    interrupt_sizing_at(monkeypatch, 8, lined_up=lined_up)
    with pytest.raises(KeyboardInterrupt):
        persisting.close()
    persisting.close()
    assert stored(store) == recorded(evs)
    assert set(store.saves.values()) == {1}
    assert not list((tmp_path / "j").glob("*.wal"))  # every session saved: the journal went


def test_a_checkpoint_interrupted_while_it_hands_sessions_over_keeps_them_and_their_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Ctrl-C in `on_event`'s checkpoint, as it sized the third session drained: the 18 after
    it were never saved, the exit hook's `close` notwithstanding. They wait for the next
    hand-over now, their journal records kept meanwhile (a crash then recovers them)."""
    evs = single_loop_sessions(20)
    store = JsonDirStore(tmp_path / "store")
    persisting = AutoPersistingRecorder(
        store, journal=tmp_path / "j", checkpoint_every=len(evs), checkpoint_interval=None
    )
    interrupt_sizing_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        persisting.record_all(evs)
    persisting.wait_saved()  # the two handed over are saved, and the journal released
    assert len(store.list_ids()) == 2
    assert "outside any session" not in caplog.text  # held for the next hand-over, not stuck
    assert persisting.journal is not None
    persisting.journal.sync()
    shutil.copytree(tmp_path / "j", tmp_path / "crashed")  # the process dies now
    recover(tmp_path / "crashed", store)
    assert stored(store) == recorded(evs)
    persisting.close()  # or the process goes on: the next hand-over saves them
    assert stored(JsonDirStore(tmp_path / "store")) == recorded(evs)


def test_a_close_called_while_another_closes_returns_once_everything_is_saved(tmp_path: Path) -> None:
    evs = single_loop_sessions(20)
    saving = threading.Event()
    store = SlowFirstCall(tmp_path / "store", saving.set)
    persisting = AutoPersistingRecorder(store, checkpoint_every=10**6, checkpoint_interval=None)
    persisting.record_all(evs)
    first = threading.Thread(target=persisting.close)
    first.start()
    assert saving.wait(10)  # the first close is under way
    persisting.close()
    assert stored(store) == recorded(evs)
    first.join()


def test_recovery_keeps_a_parallel_group_saved_while_another_session_held_the_journal(
    tmp_path: Path,
) -> None:
    """P's group ended and was saved while Q, begun after P's ParallelLoopStart, was still
    open: recovery replayed from Q's first record, P's ParallelLoopEnd without its start,
    made a group of the selected branch alone and saved it over the stored group."""

    def at(s: int) -> Timestamp:
        return Timestamp.from_ns(1_750_000_000 * 10**9 + s * 10**9)

    def start(session: str, loop: str, s: int) -> AgentStart:
        return AgentStart(agent_id="ag", session_id=session, loop_id=loop, timestamp=at(s))

    def end(loop: str, s: int) -> AgentEnd:
        return AgentEnd(
            loop_id=loop, messages=(), usage=Usage(input=s, output=0, total_tokens=s), timestamp=at(s)
        )

    evs: list[AgentEvent] = [
        ParallelLoopStart(session_id="P", loop_ids=("P.a.1", "P.b.2"), timestamp=at(0)),
        start("P", "P.a.1", 1),
        start("Q", "Q.c.1", 2),
        start("P", "P.b.2", 3),
        end("P.a.1", 4),
        end("P.b.2", 5),
        ParallelLoopEnd(
            session_id="P",
            selected_loop_id="P.b.2",
            selected_config_index=1,
            evaluation_usage=Usage(input=0, output=0),
            timestamp=at(6),
        ),
    ]
    store = JsonDirStore(tmp_path / "store")
    with AutoPersistingRecorder(
        store, journal=Journal(tmp_path / "j", durability="os"), checkpoint_every=1, checkpoint_interval=None
    ) as persisting:
        persisting.record_all(evs)
        assert persisting.wait_saved(timeout=10)
        # The process dies here: what is on disk is what a crash leaves.
        shutil.copytree(tmp_path / "j", tmp_path / "crashed")
        shutil.copytree(tmp_path / "store", tmp_path / "crashed-store")
    saved = encode_session(store.load("P"))
    recovered = JsonDirStore(tmp_path / "crashed-store")
    recover(tmp_path / "crashed", recovered)
    assert encode_session(recovered.load("P")) == saved
    assert [loop.parallel_group.all_loop_ids for loop in recovered.load("P").loops] == [  # type: ignore[union-attr]
        ("P.a.1", "P.b.2"),
        ("P.a.1", "P.b.2"),
    ]


def test_an_auto_persisting_recorders_arguments_are_checked_before_it_starts(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="store must be a SessionStore \\(or another SaveTarget\\), not int"):
        AutoPersistingRecorder(5)  # type: ignore[arg-type]
    store = JsonDirStore(tmp_path / "store")
    with pytest.raises(TypeError, match="journal must be a Journal, a path or None, not int"):
        AutoPersistingRecorder(store, journal=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="config must be SessionRecorderConfig or None, not int"):
        AutoPersistingRecorder(store, config=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="checkpoint_every must be int, not str"):
        AutoPersistingRecorder(store, checkpoint_every="10")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="checkpoint_interval must be a number of seconds > 0"):
        AutoPersistingRecorder(store, checkpoint_interval=-1)


@pytest.mark.parametrize("odd_value", ["arguments", "message text"])
def test_a_session_holding_what_json_cannot_write_is_kept_unsaved_and_the_others_saved(
    tmp_path: Path, odd_value: str
) -> None:
    """Sizing a drained session raised for a value JSON cannot write (a Path in tool
    arguments) or a message text that is no str (hand-built events, which no `Tracer`
    check saw): the hand-over failed after the drain, and every session drained with it
    was lost, while `stats()` said nothing was unsaved. `on_event` now checks such events
    (`test_on_event_refuses_a_record_phi_core_cannot_hold`): they come in unchecked here,
    as a producer that claims to have checked them (`on_checked_event`) gives them. The
    Path is now copied as a `Tracer` copies it, and that session saved too
    (`test_a_session_holding_a_value_json_cannot_hold_is_saved_with_it_copied_as_a_tracer_copies`)."""
    from msgspec.structs import replace

    from phi_session import AgentEnd, TextContent, ToolExecutionStart, UserMessage

    events = list(stream(sessions=2, loops=1))
    odd = events[0].session_id  # type: ignore[union-attr]

    def oddity(event: AgentEvent) -> AgentEvent:
        if odd_value == "arguments" and isinstance(event, ToolExecutionStart):
            return replace(event, args={"path": Path("x")})
        if odd_value == "message text" and isinstance(event, AgentEnd):
            bad = UserMessage(content=(TextContent(text=123),), timestamp=1)  # type: ignore[arg-type]
            return replace(event, messages=(bad, *event.messages))
        return event

    events = [oddity(e) if getattr(e, "loop_id", "").startswith(odd) else e for e in events]
    store = JsonDirStore(tmp_path / "store")
    persisting = AutoPersistingRecorder(store, checkpoint_every=1, checkpoint_interval=None, retry_for=0)
    for event in events:
        persisting.on_checked_event(event)
    if odd_value == "arguments":
        persisting.close()
        assert len(store.list_ids()) == 2
        (start,) = [e.event for e in store.load(odd).loops[0].events if type(e.event) is ToolExecutionStart]
        assert start.args == {"path": "x"}  # type: ignore[attr-defined]
        return
    with pytest.raises(StoreError, match="could not be saved"):
        persisting.close()
    assert [s.session_id for s in persisting.failed_sessions()] == [odd]
    assert persisting.stats()["sessions_failed"] == 1
    assert len(store.list_ids()) == 1 and odd not in store.list_ids()


def test_a_budget_given_as_a_whole_float_is_taken(tmp_path: Path) -> None:
    """``max_pending_bytes=64e6`` worked before the argument checks, which refused it."""
    with AutoPersistingRecorder(JsonDirStore(tmp_path / "store"), max_pending_bytes=64e6) as persisting:  # type: ignore[arg-type]
        assert persisting.max_pending_bytes == 64_000_000
    with pytest.raises(InvalidArgument, match="whole number of bytes"):
        AutoPersistingRecorder(JsonDirStore(tmp_path / "store"), max_pending_bytes=1.5)  # type: ignore[arg-type]


def returns(call: Callable[[], object]) -> bool:
    """Whether `call` returns (or raises) within a minute, run in a thread of its own: a
    test of something that used to hang fails, rather than hanging the suite."""
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout=60)
    return not thread.is_alive()


def test_a_spawner_whose_stored_record_does_not_decode_leaves_the_writer_saving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The sub-agent k's link read its spawner p's stored outline, whose loop record did not
    decode: `DecodeError` killed the writer thread after k was saved, flush() hung for ever,
    close() raised it at every call and the journal was never released."""
    spawner, sub_agent, _ = spawned_apart()
    store = UndecodableRecords(tmp_path / "store")
    with AutoPersistingRecorder(store, checkpoint_interval=None) as elsewhere:
        elsewhere.record_all(spawner)
    persisting = AutoPersistingRecorder(store, journal=tmp_path / "j", checkpoint_interval=None)
    persisting.record_all(sub_agent)
    with caplog.at_level(logging.WARNING, logger="phi_session"):
        assert returns(persisting.flush)
        evs = single_loop_sessions(2)
        persisting.record_all(evs)
        persisting.close()
    assert store.reads == ["k", "p"]
    assert store.load("k").parent_spawn_ref == SpawnRef(
        parent_session_id="p", parent_loop_id="p.c.1", tool_call_id="", tool_name=""
    )
    assert {sid: data for sid, data in stored(store).items() if sid in recorded(evs)} == recorded(evs)
    [warning] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "session 'p' could not be read" in warning
    assert list((tmp_path / "j").glob("*.wal")) == []


class Fatal(BaseException):
    """What no `except Exception` catches, as gevent's `Timeout`."""


class FatalOnce(JsonDirStore):
    """Its first save raises `Fatal`."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.failed = False

    def save(self, session: Session) -> None:
        if not self.failed:
            self.failed = True
            raise Fatal
        super().save(session)


def test_a_writer_that_dies_wakes_flush_and_close_saves_what_it_left(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The writer thread's death woke no one: flush() (and wait_saved() without a timeout)
    waited for it for ever. flush() then returned as if the sessions were saved."""
    evs = single_loop_sessions(3)
    store = FatalOnce(tmp_path / "store")
    persisting = AutoPersistingRecorder(store, journal=tmp_path / "j", checkpoint_interval=None)
    persisting.record_all(evs)
    raised: list[BaseException] = []

    def flush() -> None:
        try:
            persisting.flush()
        except PhiSessionError as error:
            raised.append(error)

    with caplog.at_level(logging.ERROR, logger="phi_session.persist"):
        assert returns(flush)
    [error] = raised
    assert "the writer thread died (logged), 3 sessions not saved" in str(error)
    [died] = [r for r in caplog.records if "writer thread died" in r.getMessage()]
    assert died.exc_info is not None and died.exc_info[0] is Fatal
    assert persisting.wait_saved() is False
    assert stored(store) == {}
    persisting.close()
    assert stored(store) == recorded(evs)
    assert list((tmp_path / "j").glob("*.wal")) == []


@pytest.mark.parametrize("call", [1, 2])
def test_a_hand_over_interrupted_as_it_takes_the_links_to_complete_keeps_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: int
) -> None:
    """Ctrl-C as a hand-over took the sub-agent links the spawner p left incomplete (its
    sub-agents k and m saved by another recorder first), at the first or second: the
    recorder had handed them all over, and every one not yet filed under p was lost, k and m
    keeping spawn refs without their tool calls for good."""
    ts = Timestamp.now()
    spawner: list[AgentEvent] = [AgentStart(agent_id="x", session_id="p", loop_id="p.c.1", timestamp=ts)]
    spawner += [
        ToolExecutionEnd(
            loop_id="p.c.1",
            tool_call_id=f"t_{child}",
            tool_name="sub",
            result=ToolResult(content=(), child_loop_id=f"{child}.sub.1"),
            is_error=False,
        )
        for child in "km"
    ]
    spawner.append(AgentEnd(loop_id="p.c.1", messages=(), usage=Usage(input=1, output=1), timestamp=ts))
    store = JsonDirStore(tmp_path / "store")
    with AutoPersistingRecorder(store, checkpoint_interval=None) as elsewhere:
        for child in "km":
            elsewhere.record_all(
                [
                    AgentStart(
                        agent_id="y",
                        session_id=child,
                        loop_id=f"{child}.sub.1",
                        parent_loop_id="p.c.1",
                        timestamp=ts,
                    ),
                    AgentEnd(
                        loop_id=f"{child}.sub.1", messages=(), usage=Usage(input=1, output=1), timestamp=ts
                    ),
                ]
            )
    calls = itertools.count(1)
    noted_by = SpawnGap.noted_by

    def interrupted(gap: SpawnGap) -> str:
        if next(calls) == call:
            raise KeyboardInterrupt
        return noted_by.__get__(gap)

    persisting = AutoPersistingRecorder(store, journal=tmp_path / "j", checkpoint_interval=None)
    persisting.record_all(spawner)
    monkeypatch.setattr(SpawnGap, "noted_by", property(interrupted))
    with pytest.raises(KeyboardInterrupt):
        persisting.flush()
    persisting.close()
    for child in "km":
        assert store.load(child).parent_spawn_ref == SpawnRef(
            parent_session_id="p", parent_loop_id="p.c.1", tool_call_id=f"t_{child}", tool_name="sub"
        )
    assert not list((tmp_path / "j").glob("*.wal"))


def test_a_link_raising_a_base_exception_every_time_leaves_close_finishing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The sub-agent k's link read its spawner p's outline from a hung store, ended by a
    `BaseException` every time (gevent's `Timeout`): close() raised it at every call (3 of 3)
    and never finished, saving k again each time; the journal was never released."""
    spawner, sub_agent, _ = spawned_apart()
    store = JsonDirStore(tmp_path / "store")
    with AutoPersistingRecorder(store, checkpoint_interval=None) as elsewhere:
        elsewhere.record_all(spawner)
    saves: list[str] = []
    save = store.save

    def counted(session: Session) -> None:
        saves.append(session.session_id)
        save(session)

    def hung(session_id: str) -> NoReturn:
        raise Fatal

    store.save = counted  # type: ignore[method-assign]
    store.load_outline = hung  # type: ignore[method-assign]
    persisting = AutoPersistingRecorder(store, journal=tmp_path / "j", checkpoint_interval=None)
    persisting.record_all(sub_agent)
    with caplog.at_level(logging.ERROR, logger="phi_session.persist"):
        persisting.close()
    assert saves == ["k"]
    assert store.load("k").parent_spawn_ref == SpawnRef(
        parent_session_id="p", parent_loop_id="p.c.1", tool_call_id="", tool_name=""
    )
    assert any(r.exc_info and r.exc_info[0] is Fatal for r in caplog.records)
    assert list((tmp_path / "j").glob("*.wal")) == []


def test_a_writer_dying_mid_batch_leaves_only_what_it_did_not_get_through(tmp_path: Path) -> None:
    """Sessions a and b handed over in one batch, the save of b raising a `BaseException`
    once: close() saved a again (saves a, b, a, b), as the writer let go of a batch's
    sessions only once all were tried; an exporter sent a twice."""
    evs = single_loop_sessions(2)
    store = FatalOnce(tmp_path / "store")
    saves: list[str] = []
    save = store.save

    def counted(session: Session) -> None:
        saves.append(session.session_id)
        if len(saves) == 2:
            raise Fatal
        save(session)

    store.save = counted  # type: ignore[method-assign]
    store.failed = True
    persisting = AutoPersistingRecorder(store, checkpoint_interval=None)
    persisting.record_all(evs)
    persisting.checkpoint()
    assert persisting.wait_saved() is False  # the writer died
    persisting.close()
    first, second = sorted(recorded(evs))
    assert saves == [first, second, second]
    assert stored(store) == recorded(evs)


def test_a_writer_that_died_starts_again_at_the_next_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Once the writer thread died (a store raising a `BaseException` once), nothing was
    saved until close() and the backpressure no longer held: 5000 checkpoints of a session
    each with max_pending_bytes=10000 left 4994 sessions waiting in memory."""
    evs = single_loop_sessions(200)
    store = FatalOnce(tmp_path / "store")
    persisting = AutoPersistingRecorder(
        store, checkpoint_every=20, checkpoint_interval=None, max_pending_bytes=10_000
    )
    most = 0
    with caplog.at_level(logging.ERROR, logger="phi_session.persist"):
        for event in evs:
            persisting.on_event(event)
            most = max(most, int(persisting.stats()["sessions_waiting"]))
        persisting.flush()
    assert stored(store) == recorded(evs)  # before close
    assert most <= 20
    assert len([r for r in caplog.records if "writer thread died" in r.getMessage()]) == 1
    persisting.close()


def test_a_flush_whose_restarted_writer_dies_again_raises(tmp_path: Path) -> None:
    """flush() returned normally though the writer thread had died, its sessions unsaved
    (failed_sessions() empty, 3 sessions queued)."""
    evs = single_loop_sessions(3)
    store = FatalOnce(tmp_path / "store")
    persisting = AutoPersistingRecorder(store, checkpoint_interval=None)
    persisting.record_all(evs)
    persisting.checkpoint()
    assert persisting.wait_saved() is False  # died
    store.failed = False  # and dies again once started again
    with pytest.raises(PhiSessionError, match="writer thread died"):
        persisting.flush()
    persisting.flush()  # started again, it saves them
    assert stored(store) == recorded(evs)
    persisting.close()


@pytest.mark.parametrize("interval", [1.0, None])
def test_a_writer_dying_as_it_releases_the_journal_leaves_flush_returning(
    tmp_path: Path, interval: float | None
) -> None:
    """A writer that died telling the journal what it saved left its release flag raised:
    the restarted writer never lowered it (checkpoint_interval=None) or lowered it without
    waking anyone, and flush() waited for ever."""
    evs = single_loop_sessions(3)
    store = JsonDirStore(tmp_path / "store")
    persisting = AutoPersistingRecorder(
        store, journal=tmp_path / "journal", checkpoint_every=10**9, checkpoint_interval=interval
    )
    journal = persisting.journal
    assert journal is not None
    release = journal.release
    calls = []

    def release_dying_once(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise Fatal
        return release(*args, **kwargs)

    journal.release = release_dying_once  # type: ignore[method-assign]
    persisting.record_all(evs)
    persisting.checkpoint()
    persisting.wait_saved()  # saved; the writer died releasing
    assert len(calls) == 1
    done = threading.Event()
    flusher = threading.Thread(target=lambda: (persisting.flush(), done.set()), daemon=True)
    flusher.start()
    flusher.join(30)
    assert done.is_set()
    assert stored(store) == recorded(evs)
    persisting.close()


@pytest.mark.parametrize("failing", [("write", "writev"), ("fsync",)])
def test_an_event_a_full_disk_refused_under_always_is_not_recorded_unless_the_error_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: tuple[str, ...]
) -> None:
    """Under "always" an event whose journal write failed raised `StoreError` yet was
    recorded and saved, as under no other policy. Now a failed write refuses it (not
    recorded, not saved); an fsync failing once it was applied raises `EventNotDurable`."""
    evs = list(stream(sessions=1, loops=1, turns=2, deltas=0))
    persisting = AutoPersistingRecorder(
        JsonDirStore(tmp_path / "store"), journal=Journal(tmp_path / "j", durability="always")
    )
    persisting.record_all(evs[:3])

    def full_disk(fd: int, *args: object) -> NoReturn:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    for name in failing:
        monkeypatch.setattr(os, name, full_disk)
    expected = EventNotDurable if failing == ("fsync",) else StoreError
    with pytest.raises(expected, match="No space left") as raised:
        persisting.on_event(evs[3])
    monkeypatch.undo()
    recorded = failing == ("fsync",)
    assert isinstance(raised.value, EventNotDurable) == recorded
    assert persisting.stats()["events"] == 3 + recorded
    with pytest.raises(StoreError):
        persisting.close()  # the journal failed; what the recorder holds is saved all the same
