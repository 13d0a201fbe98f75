"""`JournaledRecorder`: a `SessionRecorder` fed through a `Journal` (write-ahead)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

from .._checks import check_type
from ..errors import EventNotDurable, StoreError
from ..events import AgentEvent
from ..recorder import SessionRecorder, SessionRecorderConfig, checked_entry, checking_entry
from .writer import Journal

_Item = TypeVar("_Item", AgentEvent, bytes | str)


class JournaledRecorder:
    """Feeds a `SessionRecorder` through a `Journal`: each event is journaled first.

    ``on_event``/``on_json`` return a sequence number ``s``: once the journal has
    acknowledged ``s`` this event and every earlier one survive a crash
    (`Journal.wait_acknowledged`; under ``"always"`` and ``"os"`` that is already the
    case on return). The recorder itself journals each event it keeps, under its
    lock and before applying it (`SessionRecorder.set_write_ahead`), so the journal's
    order is the recorder's whoever feeds it. Streaming deltas the recorder drops are
    not journaled (replaying would drop them again), nor lines that are not events
    (they raise `DecodeError` and record nothing).

    A `StoreError` from ``on_event``/``on_json`` means the event was not recorded (the
    journal refused it before the recorder applied it: a full disk, a closed journal),
    under every policy; except `EventNotDurable`, raised when a journal write made after
    the event was applied failed (under ``"always"``, the fsync, which threads share
    outside the recorder's lock): the event is recorded, in memory, not durable.

    A journal feeds one recorder: a second `JournaledRecorder` (or `AutoPersistingRecorder`)
    given the same `Journal` is refused (`JournalLocked`); and a recorder is fed by one
    journal: a second `JournaledRecorder` given the same recorder is refused (`InvalidArgument`)
    until the first one's journal is closed (`close`), which frees the recorder for another.
    From then on this one refuses events (`StoreError`), one given while it closes included:
    none is recorded unjournaled.
    """

    def __init__(
        self,
        journal: Journal,
        recorder: SessionRecorder | None = None,
        *,
        config: SessionRecorderConfig | None = None,
    ) -> None:
        if recorder is not None and config is not None:
            raise TypeError("pass either a recorder or a config, not both")
        check_type("journal", journal, Journal)
        check_type("recorder", recorder, SessionRecorder, optional=True)
        self.journal = journal
        self.recorder = recorder if recorder is not None else SessionRecorder(config)
        self._last_seq = journal.last_seq
        # Called for every kept event of a stream: bind what it uses once.
        self._append, self._commit = journal.append_json, journal.commit
        self._apply_event, self._apply_json = self.recorder.on_event, self.recorder.on_json
        self._apply_checked = checked_entry(self.recorder) or self._apply_event
        self._deferred_callbacks = self.recorder.deferred_callbacks()  # reusable, per thread
        # Held while an event goes in and while the journal's hook is released: an event
        # either meets the hook (which a closed journal refuses) or is refused here.
        self._gate = threading.RLock()
        self.recorder.set_write_ahead(self._write_ahead)  # refused if another journal's is set
        try:
            journal.claim(self._journal_closed)
        except BaseException:
            self.recorder.set_write_ahead(None)
            raise

    def __enter__(self) -> JournaledRecorder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the journal (`Journal.close`); the recorder may then be journaled again. Idempotent."""
        self.journal.close()

    def _journal_closed(self) -> None:
        # The recorder is free for another journal; `_record` refuses what comes here now.
        with self._gate:
            self.recorder.release_hooks(self._write_ahead)

    def _record(self, apply: Callable[[_Item], None], item: _Item) -> None:
        # The recorder's callbacks run once the gate is released (one may feed us from another thread).
        with self._deferred_callbacks, self._gate:
            if self.journal.closed:  # its hook may be gone: the event would go unjournaled
                raise StoreError(f"journal {self.journal.directory} is closed")
            apply(item)

    def _write_ahead(self, payload: bytes | str) -> None:
        # The commit (an fsync under "always") waits until the recorder's lock is released.
        self._last_seq = self._append(payload, commit=False)

    def _committed(self, commit: bool) -> int:
        # Under concurrency this may be a later event's number: acknowledging it
        # acknowledges ours too, since sequence numbers follow the recorder's order.
        seq = self._last_seq
        if commit:
            self.commit(seq)
        return seq

    def commit(self, seq: int) -> None:
        """Make record `seq`, and every earlier one, durable per the policy (`Journal.commit`);
        `EventNotDurable` if that fails, as their events are recorded already."""
        try:
            self._commit(seq)
        except StoreError as error:
            raise EventNotDurable(
                f"event recorded in memory (saved as any other) but not durable in the journal: {error}"
            ) from error

    @checking_entry
    def on_event(self, event: AgentEvent, *, commit: bool = True) -> int:
        """Journal `event` (unless the recorder drops it), then record it."""
        self._record(self._apply_event, event)
        return self._committed(commit)

    def on_checked_event(self, event: AgentEvent, *, commit: bool = True) -> int:
        """`on_event` for a `Tracer`'s event (`SessionRecorder.on_checked_event`)."""
        self._record(self._apply_checked, event)
        return self._committed(commit)

    def on_json(self, data: bytes | str, *, commit: bool = True) -> int:
        """Journal one phi-core JSON line (unless the recorder drops it), then record it."""
        self._record(self._apply_json, data)
        return self._committed(commit)

    def record_all(self, events: Iterable[AgentEvent]) -> int:
        """Journal and record every event; returns the last sequence number."""
        for event in events:
            self.on_event(event, commit=False)
        seq = self._last_seq
        self.commit(seq)
        return seq
