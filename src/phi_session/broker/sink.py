"""`JetStreamSink`: the agent side. Events go to a bounded buffer; a thread publishes them.

The order of events is kept from the agent's calls to the stream: every event waits
in one queue whose entries are batches of events in memory or *spill episodes*
(events written to a local journal while the buffer was full), and the publishing
thread takes the queue strictly in order, retrying the entry at its head until
JetStream acknowledges all of it. Each event carries a stable id,
``{producer id}-{sequence}``, as ``Nats-Msg-Id``: JetStream stores a retried publish
once (within the stream's duplicate window) and the workers drop any later copy. An
event over the server's max_payload goes in pieces (`publications`), one after another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import msgspec

from .._checks import check_type, deadline_of, seconds_left
from .._daemon import DaemonThread
from .._exit import ExitHook
from .._fork import in_forked_child
from ..codec import encode_event, escape_surrogates
from ..errors import BrokerError, InvalidArgument, NotAJournal, PhiSessionError, StoreError, UsedAfterFork
from ..events import AgentEnd, AgentEvent, AgentStart
from ..ids import session_id_from_loop_id
from ..journal import Journal, read_records
from ..journal.format import SPILL, SegmentDamage
from .settings import (
    EVENT_ID_HEADER,
    Publication,
    Routes,
    StreamSettings,
    close_quietly,
    connect,
    ensure_stream,
    nats_servers,
    partition_of,
    publications,
    require_nats,
    track_session,
)

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.js.client import JetStreamContext

__all__ = ["JetStreamSink", "SinkStats"]

logger = logging.getLogger("phi_session.broker")
# Notices of events waiting for NATS (spilled, NATS unreachable, left on disk at close): a
# program that reports that backlog itself (``record --to``) silences this logger.
backlog_logger = logging.getLogger("phi_session.broker.backlog")

# (event id, session id, partition key, event JSON)
_Message = tuple[str, str, str, bytes]
_Envelope = tuple[str, str, str, msgspec.Raw]
_IDLE_WAIT = 1.0
_EXIT_FLUSH = 10.0  # seconds the exit hook waits for NATS (not once it is found unreachable)
_CANCEL_AGAIN = 0.5  # seconds `close` waits for the publishing thread between cancellations
_REFUSED_RETRY = 30.0  # seconds between attempts while the server refuses the stream (its settings)
_REJECTED = "rejected"  # the directory in `spill_dir` of events NATS cannot take
# Spill journals (`JetStreamSink._episode_dir`): whatever else `spill_dir` holds is not ours.
# (start time, producer id, first sequence number); versions up to 0.1 wrote no start time.
_EPISODE_NAME = re.compile(r"(?:([0-9]{20})-)?([0-9a-f]{16})-([0-9]{12,})")


class _SpillJournal(Journal):
    """A journal of [event id, session id, key, event] records: headed so that a recorder's
    journal (`recover`) refuses it, and taking an earlier version's, headed as a recorder's."""

    _kind = SPILL

    def append_message(self, message: _Message) -> None:
        msg_id, session, key, payload = message
        self.append_json(msgspec.json.encode((msg_id, session, key, msgspec.Raw(payload))))


class _Episode:
    """Events spilled to a local journal, in order; sent as one entry of the queue."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        # Written through: survives a kill. The sink closes it, from its exit hook too:
        # an event the sink takes at exit, before that hook runs, still goes in.
        self.journal = _SpillJournal(directory, durability="os", close_at_exit=False)
        self.sealed = False  # no more appends: the sender owns it
        self.inherited = False  # an earlier process's (`JetStreamSink.leftover_episodes`)
        self.count = 0
        self.acknowledged = 0  # events JetStream took, by the attempts so far (`chunks`)
        self.published = 0  # of those, not set aside as too large
        # What the last reading (`chunks`) found.
        self.damage, self.readable, self.last_seq = SegmentDamage(), 0, -1

    def append(self, message: _Message) -> None:
        self.journal.append_message(message)
        self.count += 1

    def chunks(self, size: int) -> Iterator[list[_Message]]:
        """The messages not yet `acknowledged`, in order, `size` at a time: what is held in
        memory stays bounded however long the outage was. Damage is counted (`remove`)."""
        decode = msgspec.json.Decoder(_Envelope).decode
        self.damage, self.readable, self.last_seq = SegmentDamage(), 0, -1
        chunk: list[_Message] = []
        for record in read_records(self.directory, self.damage):
            self.last_seq = record.seq
            try:
                msg_id, session, key, payload = decode(record.payload)
            except msgspec.DecodeError:
                logger.warning(
                    "spill journal %s: record %d is not an event, skipped", self.directory, record.seq
                )
                continue
            self.readable += 1
            if self.readable <= self.acknowledged:  # sent by an earlier attempt
                continue
            chunk.append((msg_id, session, key, bytes(payload)))
            if len(chunk) == size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def close(self) -> None:
        """Close the journal. One that failed (a full disk) has logged why and refused the
        append that failed; what it took before is written through, and stays readable."""
        with contextlib.suppress(StoreError):
            self.journal.close()

    def remove(self, rejected_dir: Path) -> None:
        """Delete the episode, every event in it sent; a damaged one is kept in `rejected_dir`."""
        self.close()
        # Records are numbered from 0, one per event: those missing before the last one read
        # are lost, and so is what an unreadable end held (known only of this process's own).
        lost = max(self.count, self.last_seq + 1) - self.readable
        if not lost and not self.damage.bytes_skipped:
            shutil.rmtree(self.directory, ignore_errors=True)
            return
        logger.error(
            "LOST %s events: spill journal %s is damaged (%d bytes unreadable); its %d readable"
            " events were sent, the journal is kept in %s",
            lost or "an unknown number of",
            self.directory,
            self.damage.bytes_skipped,
            self.readable,
            _set_aside(self.directory, rejected_dir),
        )


def _set_aside(directory: Path, rejected_dir: Path) -> Path:
    """Move a damaged spill journal into `rejected_dir`; where it is kept."""
    kept = rejected_dir / directory.name
    try:
        rejected_dir.mkdir(parents=True, exist_ok=True)
        directory.rename(kept)
    except OSError as error:
        logger.error("cannot move the damaged spill journal %s to %s: %s", directory, kept, error)
        return directory  # the next sink sends it again: a copy is dropped as a duplicate
    return kept


_Entry = Union[list[_Message], _Episode]


@dataclass(frozen=True)
class SinkStats:
    """What a `JetStreamSink` did so far."""

    published: int
    """Events JetStream acknowledged (a retried event counts once), those of the spill
    journals of dead processes it sent included."""
    spilled: int
    """Events written to the local spill journal (buffer full or broker unreachable)."""
    pending: int
    """Events not yet acknowledged: in memory or spilled, by this sink or by the dead
    processes whose spill journals it sends (after `close`, those it left on disk)."""
    rejected: int = 0
    """Events the broker cannot take even in pieces (its max_payload leaves no room beside a
    piece's headers): never sent, each kept as a file in ``spill_dir/rejected``."""
    lost: int = 0
    """Events neither sent nor kept: NATS had not taken them at `close` and no spill journal
    could hold them, or NATS cannot take them and ``spill_dir/rejected`` could not hold them
    (a full disk). `close` raises `BrokerError` saying so."""


class JetStreamSink:
    """Publishes events to NATS JetStream for `IngestWorker`\\s to record. A `Sink`.

    * `url`: ``nats://host[:port]`` (several, comma-separated).
    * `stream`, `subject_prefix`, `partitions`: the stream (`StreamSettings`; unset
      ones come from ``PHI_SESSION_NATS_*`` or the defaults). The stream is created if
      missing; an existing one decides the partition count.
    * `buffer`, `buffer_bytes`: events, and bytes of their JSON (64 MiB by default),
      held in memory before new ones go to the spill journal in `spill_dir` (default
      ``.phi-session/spill`` in the working directory), whichever is reached first. Spilled
      events are sent once the broker takes events again, in order, and removed then;
      spill directories dead processes left are sent by the next sink started on the
      same `spill_dir`, the oldest process's first, before its own events (its `flush`
      waits for them too, its `stats` count them). An event larger than the broker's
      max_payload (1 MB by default) is published in pieces under it, which the workers
      join again; one the broker cannot take even so (a max_payload too small for a
      piece's headers) is logged as an error and kept, as a file, in
      ``spill_dir/rejected``, and the events after it are sent. So is a spill journal found
      damaged, once what can be read of it was sent (an error says what was lost).

    Calling the sink never waits for the network: it encodes the event and queues it
    (or appends it to the spill journal). `flush(timeout)` waits until JetStream
    acknowledged everything queued before it; `close(timeout)` flushes, then spills
    what is still unacknowledged, so nothing is lost by closing; a program that ends
    with the sink open closes it at exit (an ``atexit`` hook). `spill_dir` is created
    when the sink is made: one that cannot be written is refused then (`BrokerError`).
    Events the disk could not take later are counted (`SinkStats.lost`), and `close`
    raises `BrokerError` for them. `unreachable` says why NATS could not be reached,
    while it cannot. Thread-safe. A process forked from the one that made the sink cannot
    use it (`UsedAfterFork`): it makes its own after the fork.
    """

    def __init__(
        self,
        url: str,
        *,
        stream: str | None = None,
        subject_prefix: str | None = None,
        partitions: int | None = None,
        spill_dir: str | Path | None = None,
        buffer: int = 10_000,
        buffer_bytes: int = 64 << 20,
        batch: int = 512,
        publish_timeout: float = 5.0,
        wants_deltas: bool = True,
    ) -> None:
        require_nats()
        if not isinstance(url, str):
            raise TypeError(f"url must be a string, got {type(url).__name__}")
        nats_servers(url)  # the publishing thread would retry a malformed URL forever
        for name, value in (("buffer", buffer), ("buffer_bytes", buffer_bytes), ("batch", batch)):
            check_type(name, value, int)
            if value < 1:
                raise InvalidArgument(f"{name} must be a positive integer, got {value!r}")
        if not publish_timeout > 0:
            raise InvalidArgument(f"publish_timeout must be positive, got {publish_timeout!r}")
        self.url = url
        self.settings = StreamSettings.from_env(
            stream=stream, subject_prefix=subject_prefix, partitions=partitions
        )
        self.spill_dir = Path(spill_dir) if spill_dir is not None else Path.cwd() / ".phi-session" / "spill"
        _make_spill_dir(self.spill_dir)
        self.producer_id = uuid.uuid4().hex[:16]
        self._started_ns = time.time_ns()  # names its spill journals: the next sink sends the oldest first
        self._id_prefix = f"{self.producer_id}-"
        self.wants_deltas = wants_deltas
        self.buffer = buffer
        self.buffer_bytes = buffer_bytes
        self.batch = batch
        self.publish_timeout = publish_timeout
        self._lock = threading.Lock()  # guards everything below it
        self._queue: deque[_Entry] = deque()
        self._in_memory = 0
        self._in_memory_bytes = 0  # of their payloads: large events fill the buffer sooner
        self._spill: _Episode | None = None  # the episode new events are appended to
        self._sending: _Entry | None = None  # the entry the sender is publishing
        self._seq = 0
        self._spill_from = buffer  # events in memory beyond which new ones are spilled
        self._spill_bytes_from = buffer_bytes  # the same, in bytes
        self._published = self._spilled = self._left = self._rejected = 0
        self._lost: dict[str, int] = {}  # why events were lost -> how many
        self._closed = False
        self._close_lock = threading.Lock()  # one `close` at a time; taken before `_lock`
        self._close_done = False  # an interrupted `close` (Ctrl-C) is not: it is done again
        self._unreachable: str | None = None
        self._roots = Routes()  # sub-agent session -> the session it goes with
        self._loop_sessions = Routes()  # loop -> session, where the loop id says otherwise
        self._idle = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[Any] | None = None
        self._started = threading.Event()
        # Those of dead processes go first: counted as pending, waited for by `flush`.
        self._queue.extend(self.leftover_episodes())
        self._thread = DaemonThread(self._run, f"phi-session JetStreamSink {url}")
        self._started.wait()
        # The publishing thread is a daemon: what it holds would vanish with the process.
        self._exit_hook = ExitHook(self, self._close_at_exit, self._unsent_at_exit)
        self._made_by = os.getpid()
        self._in_child = False  # a forked child's copy (`_give_up_in_child`)
        in_forked_child(self, JetStreamSink._give_up_in_child)

    def _give_up_in_child(self) -> None:
        """In a forked child: the connection, the publishing thread and the events queued
        are the parent's, which sends them; the child's events would wait in a queue no
        thread sends, so they are refused (`UsedAfterFork`)."""
        # A parent thread may have held them; it does not exist here.
        self._lock, self._close_lock = threading.Lock(), threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._in_child = not self._closed
        self._closed = self._close_done = True  # `close` has nothing of this process's to send
        self._queue.clear()
        self._sending = self._spill = None

    def __repr__(self) -> str:
        return f"JetStreamSink({self.url!r}, stream={self.settings.stream!r})"

    # -- the agent's side ----------------------------------------------------------------------------

    def __call__(self, event: AgentEvent) -> None:
        payload = encode_event(event)
        with self._lock:
            if self._closed:
                if self._in_child:
                    raise UsedAfterFork(
                        f"{self!r} was made by process {self._made_by}; a forked process must make "
                        "its own JetStreamSink after the fork"
                    )
                raise BrokerError(f"{self!r} is closed")
            session, key = self._route(event)
            self._seq += 1
            message = (f"{self._id_prefix}{self._seq}", session, key, payload)
            full = self._in_memory >= self._spill_from or self._in_memory_bytes >= self._spill_bytes_from
            if self._spill is None and full:
                self._start_spill()
            if self._spill is not None:
                try:
                    self._spill.append(message)
                    self._spilled += 1
                    return
                except (OSError, PhiSessionError):
                    # Cannot spill: keep it in memory, over the bound, rather than drop it.
                    logger.exception(
                        "cannot write the spill journal %s; keeping events in memory", self._spill.directory
                    )
                    self._seal_spill()
            tail = self._queue[-1] if self._queue else None
            if isinstance(tail, list) and len(tail) < self.batch:
                tail.append(message)
            else:
                self._queue.append([message])
            self._in_memory += 1
            self._in_memory_bytes += len(payload)
            wake = self._in_memory == 1
        if wake:
            self._wake()

    def _route(self, event: AgentEvent) -> tuple[str, str]:
        """The event's session, and the session it is partitioned by: a sub-agent's session
        goes with its parent's (one worker records both, so their links are exact). Both as
        the payload spells them: lone surrogates escaped (unescaped, no header or journal
        could hold them, and the event would be retried for ever, holding up all after it)."""
        session = track_session(event, self._loop_sessions)
        root = self._roots.get(session)
        if isinstance(event, AgentStart):
            parent = event.parent_loop_id
            if parent is not None:
                parent_session = self._loop_sessions.get(parent) or session_id_from_loop_id(parent)
                if parent_session != session:
                    root = self._roots.get(parent_session, parent_session)
            if root is not None:
                self._roots.opened(session, root, event.loop_id)
        elif type(event) is AgentEnd:  # (of no route yet, perhaps: its AgentStart may come later)
            self._roots.ended(session, event.loop_id)
        return escape_surrogates(session), escape_surrogates(session if root is None else root)

    def _start_spill(self) -> None:
        directory = self._episode_dir(self._seq)
        try:
            self._spill = _Episode(directory)
        except (OSError, PhiSessionError):
            # Over the bound rather than dropped; tried again after another buffer's worth.
            self._spill_from = self._in_memory + self.buffer
            self._spill_bytes_from = self._in_memory_bytes + self.buffer_bytes
            logger.exception("cannot open a spill journal in %s; keeping events in memory", self.spill_dir)
            return
        self._spill_from, self._spill_bytes_from = self.buffer, self.buffer_bytes
        self._queue.append(self._spill)
        backlog_logger.warning(
            "NATS at %s is not taking events as fast as they come (%d waiting): spilling to %s;"
            " nothing is dropped, they are sent when it does",
            self.url,
            self._in_memory,
            directory,
        )

    def _episode_dir(self, first: int) -> Path:
        """The spill journal of the events from sequence number `first` on."""
        return self.spill_dir / f"{self._started_ns:020d}-{self.producer_id}-{first:012d}"

    def _seal_spill(self) -> None:
        if self._spill is not None:
            self._spill.sealed = True
            self._spill = None

    def _wake(self) -> None:
        loop, wakeup = self._loop, self._wakeup
        if loop is not None and wakeup is not None:
            with contextlib.suppress(RuntimeError):  # the loop just closed
                loop.call_soon_threadsafe(wakeup.set)

    # -- lifecycle --------------------------------------------------------------------------

    def stats(self) -> SinkStats:
        with self._lock:
            return SinkStats(
                published=self._published,
                spilled=self._spilled,
                pending=self._pending(),
                rejected=self._rejected,
                lost=sum(self._lost.values()),
            )

    @property
    def rejected_dir(self) -> Path:
        """Where events too large to publish are kept, one file each (`SinkStats.rejected`)."""
        return self.spill_dir / _REJECTED

    def _pending(self) -> int:
        entries = [*self._queue, *([self._sending] if self._sending is not None else [])]
        return self._left + sum(
            entry.count if isinstance(entry, _Episode) else len(entry) for entry in entries
        )

    @property
    def unreachable(self) -> str | None:
        """Why NATS could not be reached (or its stream could not be set up) at the last
        attempt; None before the first attempt and once one succeeded."""
        with self._lock:
            return self._unreachable

    def set_unreachable(self, reason: str | None) -> None:
        """Called by the publishing thread after each attempt to connect (None: it succeeded)."""
        with self._idle:
            self._unreachable = reason
            self._idle.notify_all()

    def flush(self, timeout: float | None = 30.0, *, fail_fast: bool = False) -> bool:
        """Wait until JetStream acknowledged every event given so far; False if `timeout`
        seconds passed first (the rest stays queued or spilled, and is sent later). With
        `fail_fast`, False as soon as NATS is `unreachable` too, rather than waiting for it."""
        deadline = deadline_of("timeout", timeout)
        with self._idle:
            while self._queue or self._sending is not None:
                remaining = seconds_left(deadline)
                if remaining == 0 or not self._thread.is_alive():
                    return False
                if fail_fast and self._unreachable is not None:
                    return False
                self._idle.wait(remaining if remaining is not None else _IDLE_WAIT)
            return True

    def close(self, timeout: float | None = 10.0) -> None:
        """Flush for up to `timeout` seconds, then spill what is left and stop. No event
        may follow. Events still spilled are sent by the next sink on the same `spill_dir`.
        Raises `BrokerError` once all that is done if events were lost (`SinkStats.lost`).
        An interrupted close (Ctrl-C) takes no more events but is not done: the next call
        (at the latest, the exit hook's) goes on from where it stopped."""
        with self._close_lock:
            if self._close_done:
                return
            with self._lock:
                self._closed = True
            sent = self.flush(timeout)
            self._stop.set()
            self._wake()
            if sent:
                self._thread.join()
            else:
                # Stop a retry in progress (a connection attempt can take minutes). The NATS
                # client can lose a cancellation (Python 3.11's wait_for drops one that lands as
                # its inner call finishes), so it is asked again until the thread has ended.
                while self._thread.is_alive():
                    self._cancel_publisher()
                    self._thread.join(_CANCEL_AGAIN)
                self._spill_rest()
            with self._lock:
                lost, left = dict(self._lost), self._left
            self._close_done = True
            self._exit_hook.cancel()
        if lost:
            kept = f"; {left} kept in {self.spill_dir} for the next sink" if left else ""
            reasons = "; ".join(f"{count} {reason}" for reason, count in lost.items())
            raise BrokerError(f"LOST {sum(lost.values())} events: {reasons}{kept}")

    def _close_at_exit(self) -> None:
        """`close`, not waiting for a NATS found unreachable (as ``record --to``): the events
        are spilled for the next sink all the same, and the program's exit waits for nothing."""
        self.flush(_EXIT_FLUSH, fail_fast=True)
        self.close(0)

    def _count_lost(self, count: int, reason: str) -> None:
        with self._lock:
            self._lost[reason] = self._lost.get(reason, 0) + count

    def _cancel_publisher(self) -> None:
        loop, task = self._loop, self._task
        if loop is not None and task is not None:
            with contextlib.suppress(RuntimeError):  # the loop just ended
                loop.call_soon_threadsafe(task.cancel)

    def _spill_rest(self) -> None:
        """Keep on disk what NATS has not taken (the publishing thread has ended). Each entry
        leaves the queue once kept, so that a `close` interrupted meanwhile goes on with the next."""
        with self._lock:
            self._seal_spill()
            if self._sending is not None:
                self._queue.appendleft(self._sending)
                self._sending = None
            self._in_memory = self._in_memory_bytes = 0
        while True:
            with self._lock:
                if not self._queue:
                    break
                entry = self._queue[0]
            kept = self._keep_on_disk(entry)
            with self._lock:
                self._queue.popleft()
                self._left += kept
        with self._lock:
            left = self._left
        if left:
            backlog_logger.warning(
                "%d events not yet acknowledged by NATS at %s are kept in %s; the next "
                "JetStreamSink on that directory sends them",
                left,
                self.url,
                self.spill_dir,
            )

    def _keep_on_disk(self, entry: _Entry) -> int:
        """Close an episode, or write events held in memory to a spill journal; how many are kept."""
        if isinstance(entry, _Episode):
            entry.close()
            return entry.count
        if not entry:
            return 0
        directory = self._episode_dir(int(entry[0][0].rsplit("-", 1)[1]))
        # What a `close` interrupted while writing it wrote: the entry is written again, whole.
        shutil.rmtree(directory, ignore_errors=True)
        written = 0  # each written through: kept even if a later one fails
        try:
            journal = _SpillJournal(directory, durability="os")
            with journal:
                for message in entry:
                    journal.append_message(message)
                    written += 1
        except (OSError, PhiSessionError) as error:
            if not written:  # nothing for the next sink to send
                shutil.rmtree(directory, ignore_errors=True)
            self._count_lost(
                len(entry) - written,
                f"not taken by NATS at {self.url} and not written to a spill journal in"
                f" {self.spill_dir} ({_reason(error)})",
            )
        return written

    def _unsent_at_exit(self) -> str:
        """What a close interrupted at interpreter exit leaves unsent (`ExitHook`)."""
        with self._lock:
            entries = [*self._queue, *([self._sending] if self._sending is not None else [])]
            in_memory = sum(len(entry) for entry in entries if not isinstance(entry, _Episode))
            spilled = self._pending() - in_memory
        return (
            f"{in_memory} events not acknowledged by NATS at {self.url} are lost; "
            f"{spilled} spilled to {self.spill_dir} are kept for the next sink"
        )

    def __enter__(self) -> JetStreamSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the publishing thread -----------------------------------------------------------------------

    def _run(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):  # `close` gave up on the broker
            asyncio.run(_Publisher(self).run())

    def bind_loop(
        self, loop: asyncio.AbstractEventLoop, wakeup: asyncio.Event, task: asyncio.Task[Any] | None
    ) -> None:
        """Called by the publishing thread once its event loop runs."""
        self._loop, self._wakeup, self._task = loop, wakeup, task
        self._started.set()

    def next_entry(self) -> _Entry | None:
        """The entry at the head of the queue (kept there until `entry_sent`), or None."""
        with self._lock:
            if self._sending is not None:
                return self._sending
            if not self._queue:
                return None
            entry = self._queue.popleft()
            if isinstance(entry, _Episode):
                if entry is self._spill:
                    self._seal_spill()  # later events queue in memory, behind it
            else:
                self._in_memory -= len(entry)
                self._in_memory_bytes -= sum(len(message[3]) for message in entry)
            self._sending = entry
            return entry

    def entry_sent(self, entry: _Entry, published: int) -> None:
        if isinstance(entry, _Episode):
            entry.remove(self.rejected_dir)
            whose = "an earlier process spilled in" if entry.inherited else "spilled events from"
            logger.warning("sent %d events %s %s to NATS", published, whose, entry.directory)
        with self._idle:
            self._sending = None
            self._published += published
            self._idle.notify_all()

    def set_aside(self, message: _Message, limit: int) -> None:
        """Keep an event NATS will never take (its max_payload, `limit`, too small even for a
        piece of it) as a file of its own."""
        msg_id, session, _, payload = message
        path = self.rejected_dir / f"{msg_id}.json"
        if path.exists():  # set aside by an earlier attempt at its entry
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(payload)
        except OSError as error:
            logger.exception(
                "LOST event %s of session %r: NATS cannot take it, and %s cannot be written",
                msg_id,
                session,
                path,
            )
            self._count_lost(
                1,
                f"over the max_payload of NATS at {self.url} even in pieces and not written to"
                f" {self.rejected_dir} ({_reason(error)})",
            )
            return
        logger.error(
            "event %s of session %r: NATS at %s takes messages of %d bytes at most, too few even"
            " for a piece of it: not sent, kept in %s",
            msg_id,
            session,
            self.url,
            limit,
            path,
        )
        with self._lock:
            self._rejected += 1

    def leftover_episodes(self) -> list[_Episode]:
        """Spill episodes an earlier process left (oldest first); those in use are skipped,
        and so are the later ones of their producer: whoever holds the first sends them, in order."""
        try:
            named = [(_EPISODE_NAME.fullmatch(path.name), path) for path in self.spill_dir.iterdir()]
        except (FileNotFoundError, NotADirectoryError):  # none yet (or removed meanwhile)
            return []
        listed = [
            (match[2], int(match[3]), match[1], path) for match, path in named if match and path.is_dir()
        ]
        # Producers in the order they started (a session one process began and the next
        # continued is sent in that order), each one's episodes in order. For an episode an
        # older version named without its start time, its oldest file's time stands in (the
        # lock file, made when the episode began).
        started: dict[str, int] = {}
        for producer, _, stamp, path in listed:
            time_ns = int(stamp) if stamp else _oldest_file(path)
            started[producer] = min(time_ns, started.get(producer, time_ns))
        listed.sort(key=lambda item: (started[item[0]], item[0], item[1]))
        found = []
        # This sink's own (its first may be created meanwhile), and producers with an
        # episode another sink holds.
        skipped = {self.producer_id}
        for producer, _, _, directory in listed:
            if producer in skipped:
                continue
            try:
                episode = _Episode(directory)
            except NotAJournal as error:  # ours by its name, damaged past reading
                logger.error(
                    "LOST an unknown number of events: spill journal %s is unreadable (%s); it is kept in %s",
                    directory,
                    error,
                    _set_aside(directory, self.rejected_dir),
                )
                continue
            except PhiSessionError:  # locked: a live sink owns it
                skipped.add(producer)
                continue
            episode.sealed = episode.inherited = True
            episode.count = sum(1 for _ in read_records(directory))
            found.append(episode)
        return found

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()


class _Publisher:
    """The publishing thread's state: the connection, and the entry being sent."""

    def __init__(self, sink: JetStreamSink) -> None:
        self.sink = sink
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self.settings = sink.settings
        self.down_since: float | None = None
        self.refused = False  # the server refused the stream (`ensure_stream`'s `BrokerError`)
        # Ids of the messages (events, or pieces of them) `send` is at, acknowledged so far.
        self.acknowledged: set[str] = set()

    async def run(self) -> None:
        wakeup = asyncio.Event()
        self.sink.bind_loop(asyncio.get_running_loop(), wakeup, asyncio.current_task())
        pause = 0.05
        try:
            while True:
                entry = self.sink.next_entry()
                if entry is None:
                    if self.sink.stopping:
                        return
                    wakeup.clear()
                    if self.sink.next_entry() is None:
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(wakeup.wait(), _IDLE_WAIT)
                    continue
                published = await self.send_entry(entry)
                if published is not None:
                    self.sink.entry_sent(entry, published)
                    pause = 0.05
                elif self.sink.stopping:
                    return
                else:
                    pause = await self.wait(pause)
        finally:
            if self.nc is not None:
                await close_quietly(self.nc)

    async def wait(self, pause: float) -> float:
        """Wait `pause` seconds before a retry; the next pause. A stream the server refuses
        (`refused`: a configuration error) is asked for again only every `_REFUSED_RETRY` s."""
        await asyncio.sleep(_REFUSED_RETRY if self.refused else pause)
        return min(pause * 2, 2.0)

    async def send_entry(self, entry: _Entry) -> int | None:
        """`send` an entry; an episode a chunk at a time, each acknowledged before the next
        is read, and a retry resumes after the last one acknowledged."""
        if not isinstance(entry, _Episode):
            return await self.send(entry)
        for chunk in entry.chunks(self.sink.batch):
            published = await self.send(chunk)
            if published is None:
                return None
            entry.acknowledged += len(chunk)
            entry.published += published
        return entry.published

    async def send(self, messages: list[_Message]) -> int | None:
        """Publish `messages` in order; once JetStream acknowledged every one, how many it
        took (the others it cannot take even in pieces: set aside); None if that failed.

        A partition's messages go one at a time, each acknowledged before the next: sent
        together, one JetStream refused (the stream full, NATS reconnecting) could be followed
        by later ones it took, its retry stored after them, and its session recorded out of
        order. Partitions go side by side. A retry sends only what was not acknowledged."""
        set_aside = 0
        try:
            js = await self.ready()
            count = self.settings.partitions
            assert self.nc is not None
            limit = self.nc.max_payload
            partitions: dict[int, list[Publication]] = {}
            for message in messages:
                msg_id, session, key, payload = message
                outgoing = publications(msg_id, session, payload, limit)
                if outgoing is None:  # refused every time: retried, it would hold up all after it
                    self.sink.set_aside(message, limit)
                    set_aside += 1
                    continue
                queued = partitions.setdefault(partition_of(key, count), [])
                queued += [item for item in outgoing if item[1][EVENT_ID_HEADER] not in self.acknowledged]
            sent = await asyncio.gather(
                *(self.send_in_order(js, number, queued) for number, queued in partitions.items()),
                return_exceptions=True,
            )
            failed = next((outcome for outcome in sent if isinstance(outcome, BaseException)), None)
            if failed is not None:
                raise failed
        except Exception as error:
            self.js = None  # check the stream again before the retry (it may be gone)
            if self.down_since is None:
                self.down_since = time.monotonic()
                (backlog_logger if self.sink.unreachable else logger).warning(
                    "publishing to NATS at %s failed (%s); retrying, events wait in the buffer"
                    " and then the spill journal",
                    self.sink.url,
                    getattr(error, "description", None) or str(error) or type(error).__name__,
                )
            return None
        if self.down_since is not None:
            logger.warning(
                "NATS at %s takes events again after %.1f s",
                self.sink.url,
                time.monotonic() - self.down_since,
            )
            self.down_since = None
        self.acknowledged.clear()
        return len(messages) - set_aside

    async def send_in_order(self, js: JetStreamContext, partition: int, messages: list[Publication]) -> None:
        """Publish `messages` to `partition`, each once the one before it is acknowledged;
        raise at the first that is not (the rest are not sent)."""
        subject = self.settings.subject(partition)
        for payload, headers in messages:
            # Refused, the answer raises here at once (publish_async left its future unresolved).
            await js.publish(subject, payload, timeout=self.sink.publish_timeout, headers=headers)
            self.acknowledged.add(headers[EVENT_ID_HEADER])

    async def ready(self) -> JetStreamContext:
        if self.js is not None:
            return self.js
        connected = False
        try:
            if self.nc is None or self.nc.is_closed:
                self.nc = await connect(self.sink.url, name=f"phi-session producer {self.sink.producer_id}")
            connected = True
            js = self.nc.jetstream(timeout=self.sink.publish_timeout)
            self.settings = await ensure_stream(js, self.sink.settings)
        except Exception as error:
            reason = str(error) or type(error).__name__
            self.refused = connected and isinstance(error, BrokerError)
            self.sink.set_unreachable(
                reason if isinstance(error, BrokerError) else f"NATS at {self.sink.url}: {reason}"
            )
            raise
        self.refused = False
        self.sink.set_unreachable(None)
        self.js = js
        return js


def _make_spill_dir(path: Path) -> None:
    """Create `path` (if missing; sinks may create it at once) and check a file can be
    written in it; `BrokerError` if not. Found only once the broker is down, it would
    lose every event the sink had to keep."""
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                raise BrokerError(f"spill_dir {path}: {existing} is not a directory")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as error:
        raise BrokerError(f"spill_dir {path}: cannot write there: {_reason(error)}") from None


def _reason(error: BaseException) -> str:
    """Why a write failed, in a few words: the OS's reason, found behind a journal's errors
    (which wrap it, or, closing, follow the one that did)."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(cause or error)


def _oldest_file(directory: Path) -> int:
    """When the oldest file in `directory` was last written (ns since the epoch); 0 if unknown."""
    try:
        return min((path.stat().st_mtime_ns for path in directory.iterdir()), default=0)
    except OSError:
        return 0
