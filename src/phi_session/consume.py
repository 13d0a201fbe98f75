"""Async consumption: a recorder task that drains an event source into a `SessionStore`.

`consume(source, store)` reads events (typed events, or phi-core JSON lines as
``bytes``/``str``) from an ``asyncio.Queue`` (fed by `phi_session.sinks.QueueSink`s;
``None``, put as the last of them closes, ends the stream; once taken, a new sink may
start the queue's next stream) or any async iterable, records them, and every
`checkpoint_interval` seconds saves the sessions that have no open loop. When the
stream ends, or the task is cancelled, it flushes the recorder (open loops are
recorded as ``Aborted``) and saves everything, so a clean shutdown loses nothing:
on cancellation it first takes every event in the queue, and goes on taking those put
while loops are still open, for a short grace (agent tasks cancelled with it, as
``asyncio.run`` ends, emit their ends from their cleanup then).

A periodic checkpoint hands a session over once it has no open loop; if the agent
runs another loop in that session later, it is recorded as a new part of the same
session id, and the store merges the parts (loops are matched by ``loop_id``).
Set `checkpoint_interval` above the agent's think time to keep sessions whole in
memory, or to None to save only at shutdown.

An item it cannot record (a line that is not phi-core JSON or of an unknown event
type, an object that is no event, an event built holding what phi-core cannot read)
is logged, counted and skipped; pass `rejected` to keep it: it is called with the
item exactly as taken from the source.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, Union, runtime_checkable

from .errors import DecodeError, InvalidArgument
from .events import EVENT_TYPES, AgentEvent
from .model import Session
from .recorder import OrphanEvent, SessionRecorder
from .saver import SessionSaver
from .sinks import end_marker_taken
from .stores.base import SessionStore

__all__ = ["ConsumeStats", "RejectedSink", "Source", "consume"]

logger = logging.getLogger("phi_session.consume")

# After a cancellation, how long (seconds, in all) the consumer goes on taking the events
# of loops still open: agent tasks cancelled with it write their tools' results and ends
# from cleanup that may await a few times first (a stream closed, I/O).
_ENDS_GRACE = 0.5
# Meanwhile it yields one loop turn between takes while events come and for this many
# empty takes in a row (cleanup awaiting turns), then polls every _ENDS_POLL seconds.
_TURNS_BEFORE_POLLING = 8
_ENDS_POLL = 0.005

_Item_co = TypeVar("_Item_co", covariant=True)


@runtime_checkable
class _GetQueue(Protocol[_Item_co]):
    """What `consume` uses of an ``asyncio.Queue``. A protocol rather than the class, so
    that a queue of fewer item types (`QueueSink`'s ``asyncio.Queue[AgentEvent | None]``)
    type-checks: ``asyncio.Queue`` is invariant."""

    async def get(self) -> _Item_co: ...

    def get_nowait(self) -> _Item_co: ...


Item = Union[AgentEvent, bytes, str, None]
Source = Union[_GetQueue[Item], AsyncIterable[Item]]
"""A queue (None ends the stream) or an async iterable of events or JSON lines."""

RejectedSink = Callable[[object], object]
"""Takes an item `consume` could not record, as taken from the source, and keeps it (or raises)."""


@dataclass
class ConsumeStats:
    """What a `consume` run did."""

    events: int = 0
    """Items taken from the queue (events and JSON lines), `decode_errors` included."""
    decode_errors: int = 0
    """Items that were not valid phi-core events: undecodable JSON lines, queue items that
    are neither events nor lines, and events the recorder refused (`SessionRecorder.on_event`);
    each logged, skipped and handed to `rejected`."""
    rejected_kept: int = 0
    """Of those, the items the `rejected` sink took (one it raised for is logged as lost)."""
    saved: int = 0
    """Successful session saves (a session saved at two checkpoints counts twice)."""
    checkpoints: int = 0
    unsaved: list[Session] = field(default_factory=list)
    """Sessions the store still refused at shutdown (see `SessionSaver`); nothing else holds them."""
    orphans: list[OrphanEvent] = field(default_factory=list)
    """Events that belonged to no known loop, taken from the recorder at shutdown."""


class _Consumer:
    def __init__(self, saver: SessionSaver, recorder: SessionRecorder, rejected: RejectedSink | None) -> None:
        self.saver = saver
        self.recorder = recorder
        self.rejected = rejected
        self.stats = ConsumeStats()

    def feed(self, item: AgentEvent | bytes | str) -> None:
        self.stats.events += 1
        if isinstance(item, (bytes, str)):
            try:
                self.recorder.on_json(item)
            except DecodeError as error:
                logger.warning("skipped an event line that is not valid phi-core JSON: %s", error)
                self.reject(item)
            return
        if type(item) not in EVENT_TYPES:
            # Not an event, not a line: count and skip it like an undecodable line
            # rather than letting one stray item end the consumer. The exact type, as
            # the recorder takes no subclass of an event type.
            logger.warning(
                "skipped a queue item that is neither an event nor an event line: %s", type(item).__name__
            )
            self.reject(item)
            return
        try:
            self.recorder.on_event(item)
        except (TypeError, InvalidArgument) as error:  # built holding what phi-core cannot read
            logger.warning("skipped an event that phi-core could not read back: %s", error)
            self.reject(item)

    def reject(self, item: object) -> None:
        self.stats.decode_errors += 1
        if self.rejected is None:
            return
        try:
            self.rejected(item)
        except Exception:  # the sink's failure must not end the consumer
            logger.exception("LOST a skipped item: the rejected sink raised")
            return
        self.stats.rejected_kept += 1

    async def tick(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.stats.checkpoints += 1
            await self.saver.adrain(self.recorder)

    async def read(self, source: Source) -> None:
        if isinstance(source, _GetQueue):
            while True:
                item = await source.get()
                if item is None:
                    end_marker_taken(source)
                    return
                self.feed(item)
        else:
            async for item in source:
                if item is None:
                    return
                self.feed(item)

    def take_queued(self, queue: _GetQueue[Item]) -> int | None:
        """Record whatever the producers queued (the stream not ended: on cancellation);
        how many items it took, or None once it took the end marker (nothing follows)."""
        taken = 0
        while True:
            try:
                item = queue.get_nowait()
            except asyncio.QueueEmpty:
                return taken
            if item is None:
                end_marker_taken(queue)
                return None
            self.feed(item)
            taken += 1

    async def take_ends(self, queue: _GetQueue[Item]) -> None:
        """Take what is queued, and go on taking while the recorder has open loops, for
        at most `_ENDS_GRACE` seconds: the tasks cancelled with the consumer end their
        tools and loops from their cleanup, which may await a few times (or for I/O)
        before it writes them. Stops at the end marker, never reading past it."""
        clock = asyncio.get_running_loop()
        deadline = clock.time() + _ENDS_GRACE
        empty = 0
        while True:
            taken = self.take_queued(queue)
            if taken is None or not self.recorder.stats()["open_loops"] or clock.time() >= deadline:
                return
            empty = 0 if taken else empty + 1
            await asyncio.sleep(0 if empty <= _TURNS_BEFORE_POLLING else _ENDS_POLL)

    async def shutdown(self, cancelled_reading: Source | None) -> None:
        """Flush the recorder and save everything, first taking the ends of open loops
        queued in `cancelled_reading`, the source if cancelled while reading it (a queue):
        taken only now, once the consumer has settled, and a while longer if loops are
        still open, what the tasks cancelled with it emitted meanwhile (their cleanup
        ending tools and loops) is recorded too."""
        if isinstance(cancelled_reading, _GetQueue):
            await self.take_ends(cancelled_reading)
        await self.saver.adrain(self.recorder, flush=True)
        if self.saver.stats().unsaved:  # one more round, then hand them back rather than drop them
            await self.saver.aretry_unsaved()
        self.stats.saved = self.saver.stats().saved
        self.stats.unsaved = self.saver.take_unsaved()
        self.stats.orphans = self.recorder.drain_orphans()
        if self.stats.unsaved:
            logger.error(
                "%d session(s) could not be saved; see ConsumeStats.unsaved", len(self.stats.unsaved)
            )


async def consume(
    source: Source,
    store: SessionStore,
    *,
    recorder: SessionRecorder | None = None,
    checkpoint_interval: float | None = 5.0,
    retry_for: float = 10.0,
    rejected: RejectedSink | None = None,
) -> ConsumeStats:
    """Record `source` into `store` until the stream ends or the task is cancelled.

    `recorder` defaults to a fresh `SessionRecorder` (pass one to choose its
    options). Sessions are saved by a `SessionSaver`: a failed save is retried for
    `retry_for` seconds, then once more at shutdown, and what still fails is handed
    back in `ConsumeStats.unsaved`. On cancellation the final flush and save still
    run (shielded from a second cancellation), then ``CancelledError`` propagates; a
    queue is first read of what it holds and, while the recorder has loops open, of what
    comes next, for a grace of at most 0.5 s in all (the agent tasks cancelled with the
    consumer write their tools' results and loops' ends from their cleanup): it stops
    as soon as no loop is open or at the end-of-stream marker, and a loop still open
    then is saved as it is, ``Aborted``. Decoding errors of
    JSON lines are logged and counted, never raised; `rejected` (default: none, such
    items are not kept) is called with each item that could not be recorded, exactly as
    taken from the source; if it raises, that is logged and the run goes on. Returns the
    run's `ConsumeStats`.
    """
    if checkpoint_interval is not None and not checkpoint_interval > 0:
        raise InvalidArgument("checkpoint_interval must be positive (or None)")
    consumer = _Consumer(
        SessionSaver(store, retry_for=retry_for),
        recorder if recorder is not None else SessionRecorder(),
        rejected,
    )
    ticker = (
        asyncio.create_task(consumer.tick(checkpoint_interval)) if checkpoint_interval is not None else None
    )
    cancelled_reading: Source | None = None
    try:
        await consumer.read(source)
    except asyncio.CancelledError:
        cancelled_reading = source
        raise
    finally:
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(_settle(ticker))
        # The final save must complete even if we are cancelled again meanwhile.
        await asyncio.shield(consumer.shutdown(cancelled_reading))
    return consumer.stats


async def _settle(task: asyncio.Task[None]) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        await task
