"""`IngestWorker`: the store side. Takes events from JetStream, records them, saves sessions.

Each partition has a durable pull consumer (``{durable}-{n}``, filtered to the
partition's subject) and, while a worker holds it, a recorder of its own. A
partition's loop:

1. fetch a batch; write it to ``broker_events`` (`staging`), dropping event ids
   already there; *then* acknowledge the messages;
2. apply staged events to the recorder in stream order, up to the consumer's
   acknowledgement floor: every message below the floor is acknowledged, so it is
   staged, so nothing earlier can still arrive (a redelivery out of order waits
   here until the gap before it is filled). The pieces of an event published in pieces
   (over the server's max_payload) are staged and acknowledged each as it comes; once the
   last is applied, the event they make is staged in their place and applied; pieces of an
   event staged otherwise (sent again whole, or cut otherwise) are dropped as duplicates;
3. every `checkpoint_interval` seconds, save the completed sessions through
   `SessionSaver`, and mark their events saved once the recorder owes them no
   amendment (until then a new owner replays them, as a journal keeps its pinned
   records). A session none of whose events came for `idle_timeout` seconds (its
   agent died mid-loop) is first ended as `flush` ends it: its open loops aborted.

Workers share the partitions: each takes its fair share (partitions / live
workers, rounded up) and gives back any above it; a dead worker's partitions are
free the moment its PostgreSQL connection ends. Taking a partition replays its
pending staged events first, so sessions a worker left half-recorded are completed.
`stop()` (SIGTERM in ``phi-session ingest``) finishes the batches in hand,
acknowledges them, saves what is complete, and releases the partitions; sessions
still open stay staged for whichever worker takes the partition next.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._checks import check_type
from ..codec import decode_event
from ..errors import BrokerError, DecodeError, InvalidArgument, StoreError
from ..events import AgentEvent
from ..recorder import SessionRecorder, SessionRecorderConfig
from ..saver import SavedSpawners, SessionSaver
from .settings import (
    EVENT_ID_HEADER,
    MAX_SECONDS,
    SESSION_HEADER,
    Routes,
    StreamSettings,
    check_name,
    close_quietly,
    connect,
    ensure_stream,
    event_session_id,
    nats_servers,
    read_piece,
    require_nats,
    stream_info,
    stream_layout,
    track_session,
)
from .staging import REJECTED, SAVED, StagedEvent, Staging

if TYPE_CHECKING:
    import psycopg
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.js.client import JetStreamContext

    from ..stores.postgres import PostgresStore

__all__ = ["IngestWorker", "PartitionStatus", "WorkerStats", "ingest_status"]

logger = logging.getLogger("phi_session.broker")

_FETCH_WAIT = 0.5  # seconds a fetch waits on an idle partition (also how soon `stop` is seen)
_NO_WAIT_ANSWER = 5.0  # seconds the server has to answer a pull that waits for nothing
_PING_ANSWER = 10  # seconds the server has to answer a ping, once a partition failed on NATS
_MAX_EVENT_ID = 200  # characters; the primary key of `broker_events` has a size limit
_MESSAGE_ROOM = 64 << 10  # bytes a delivery adds to a message (subject, reply, headers' framing)


@dataclass
class WorkerStats:
    """What an `IngestWorker` did so far (all partitions it held)."""

    received: int = 0
    """Messages taken from the stream (duplicates included)."""
    duplicates: int = 0
    """Messages whose event id was already staged, pieces of an event staged otherwise (whole,
    or from another cut: sent again under another max_payload), and events joined from pieces
    that were: dropped."""
    recorded: int = 0
    """Events applied to a recorder (replayed ones included)."""
    held_back: int = 0
    """Events that waited for an earlier one still to be delivered (redelivered out of order)."""
    spawner_waits: int = 0
    """Times a sub-agent's start, and the events of its partition after it, waited a
    checkpoint for its spawner's session to be read again (the store failed the read)."""
    rejected: int = 0
    """Events no recorder accepts (not phi-core JSON, or of no open loop) or of a session id
    no store accepts, and pieces of an event whose other pieces stopped coming for
    `idle_timeout`: kept staged as ``rejected``, with their payload."""
    sessions_saved: int = 0
    partitions_taken: int = 0
    partitions_released: int = 0
    owned: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class PartitionStatus:
    """One partition as `ingest_status` sees it."""

    partition: int
    in_stream: int
    """Messages no worker has acknowledged yet (the lag, in events)."""
    unacknowledged: int
    """Of those, delivered to a worker that has not acknowledged them yet."""
    staged: int
    """Events acknowledged and staged, waiting for their session to complete."""
    rejected: int
    owner: int | None
    """The PostgreSQL backend pid of the worker holding it, or None."""


class IngestWorker:
    """Records the events of a JetStream stream into a `PostgresStore`.

    * `url`: the NATS server(s); `dsn`, `schema`: the PostgreSQL database and schema
      of the store (the worker's ``broker_events`` table lives there too).
    * `stream`, `subject_prefix`, `partitions`: as for `JetStreamSink`
      (``PHI_SESSION_NATS_*``, defaults; an existing stream decides the count).
    * `durable`: the consumer name prefix; workers with the same one share the work.
    * `batch`: messages per fetch; `ack_wait`: seconds before JetStream redelivers a
      message a worker took but did not acknowledge (a killed worker's batch: what
      arrived after it waits that long, so it bounds the catch-up after a kill; a
      needless redelivery costs only a duplicate dropped);
      `fetch_bytes`: bytes the worker's pulls ask NATS for at once, all partitions together
      (each pull its share, but room for one message of the server's max_payload): a server
      cuts off a client it has more than its max_pending (64 MiB by default) to send to, and
      the messages in flight then wait `ack_wait` to be delivered again;
      `checkpoint_interval`: seconds between saves; `rebalance_interval`: seconds
      between looks at the other workers.
    * `idle_timeout`: seconds a session's open loops wait for its next event; then
      they are aborted (as at the end of a stream) and the session is saved. Counted
      from when this worker took the partition, and not while it catches up with a
      backlog: a restart or a lag never ends a live session.
    * `recorder_config`: how each partition's recorder records.

    `await run()` works until `stop()` is called (from any thread) and returns after
    a clean shutdown; `stats` tells what it did.
    """

    def __init__(
        self,
        url: str,
        dsn: str,
        *,
        schema: str = "phi_session",
        stream: str | None = None,
        subject_prefix: str | None = None,
        partitions: int | None = None,
        durable: str = "phi-ingest",
        batch: int = 256,
        fetch_bytes: int = 32 << 20,
        ack_wait: float = 5.0,
        checkpoint_interval: float = 1.0,
        rebalance_interval: float = 1.0,
        idle_timeout: float = 3600.0,
        recorder_config: SessionRecorderConfig | None = None,
    ) -> None:
        require_nats()
        for name, value in (("url", url), ("dsn", dsn), ("schema", schema), ("durable", durable)):
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a string, got {type(value).__name__}")
        nats_servers(url)
        from ..stores.postgres import dsn_parameters

        dsn_parameters(dsn)  # now: psycopg's error on connecting may quote it, password included
        self.settings = StreamSettings.from_env(
            stream=stream, subject_prefix=subject_prefix, partitions=partitions
        )
        check_name("durable", durable)
        check_type("batch", batch, int)
        if batch < 1:
            raise InvalidArgument(f"batch must be a positive integer, got {batch!r}")
        check_type("fetch_bytes", fetch_bytes, int)
        if fetch_bytes < 1 << 20:
            raise InvalidArgument(f"fetch_bytes must be at least 1 MiB (1048576), got {fetch_bytes!r}")
        for name, number in (
            ("ack_wait", ack_wait),
            ("checkpoint_interval", checkpoint_interval),
            ("rebalance_interval", rebalance_interval),
            ("idle_timeout", idle_timeout),
        ):
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                raise TypeError(f"{name} must be a number of seconds, not {type(number).__name__}")
            if not 0 < number <= MAX_SECONDS:
                raise InvalidArgument(
                    f"{name} must be a positive number of seconds up to {MAX_SECONDS:g}, got {number!r}"
                )
        self.url, self.dsn, self.schema, self.durable = url, dsn, schema, durable
        self.batch, self.fetch_bytes, self.ack_wait = batch, fetch_bytes, float(ack_wait)
        self.checkpoint_interval, self.rebalance_interval = checkpoint_interval, rebalance_interval
        self.idle_timeout = float(idle_timeout)
        self.recorder_config = recorder_config or SessionRecorderConfig()
        self.stats = WorkerStats()
        self.member_id = random.getrandbits(31)
        self._stop_requested = False
        self._broker_down = False  # a partition failed on NATS; warned once until one works again
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    def __repr__(self) -> str:
        return f"IngestWorker({self.url!r}, stream={self.settings.stream!r}, durable={self.durable!r})"

    def stop(self) -> None:
        """Ask `run` to finish: thread-safe, and safe from a signal handler."""
        self._stop_requested = True
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stopping.set)

    async def run(self) -> None:
        """Ingest until `stop()`. Raises `BrokerError` / `StoreError` if NATS or
        PostgreSQL cannot be reached at start or fail for good while running."""
        self._loop = asyncio.get_running_loop()
        stopping = self._stopping = asyncio.Event()
        if self._stop_requested:
            return
        async with _Resources(self) as resources:
            import psycopg  # `_Resources` found it

            try:
                await self._work(resources, stopping)
            except psycopg.Error as error:
                raise StoreError(f"PostgreSQL failed while ingesting: {error}") from error

    async def _work(self, resources: _Resources, stopping: asyncio.Event) -> None:
        self.settings = await ensure_stream(resources.js, self.settings)
        staging = resources.staging
        await staging.create()
        await staging.prune(self.settings.max_age)
        if not await staging.join(self.member_id):
            raise BrokerError(f"worker id {self.member_id} is taken; start the worker again")
        running: dict[int, _PartitionRun] = {}
        try:
            while not stopping.is_set():
                await self._rebalance(resources, running)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stopping.wait(), self.rebalance_interval)
        finally:
            await asyncio.gather(*(run.finish() for run in running.values()), return_exceptions=True)
            # A lost connection took its locks along: releasing them would only hide why it failed.
            if not resources.conn.closed:
                for number in list(running):
                    await self._release(resources, running, number)

    async def _rebalance(self, resources: _Resources, running: dict[int, _PartitionRun]) -> None:
        import nats.errors

        for number, run in list(running.items()):
            if not run.task.done():
                continue
            error = run.task.exception()
            if not isinstance(error, (nats.errors.Error, asyncio.TimeoutError)):
                run.task.result()  # PostgreSQL or a bug: that is the worker failing
                continue
            await self._check_connection(resources)
            # NATS is down or restarting: start the partition again (its staged events are
            # replayed) once the client has reconnected.
            if not self._broker_down:
                logger.warning(
                    "NATS at %s failed (%s); partitions restart when it is back",
                    self.url,
                    str(error) or type(error).__name__,
                )
            self._broker_down = True
            await self._release(resources, running, number)
        staging = resources.staging
        count = self.settings.partitions
        share = math.ceil(count / max(await staging.members(), 1))
        for number in sorted(running)[share:]:
            await running[number].finish()
            await self._release(resources, running, number)
        start = self.member_id % count
        for number in [(start + i) % count for i in range(count)]:
            if len(running) >= share:
                break
            if number not in running and await staging.take(number):
                running[number] = _PartitionRun(self, resources, number)
                self.stats.partitions_taken += 1
        self.stats.owned = sorted(running)

    async def _check_connection(self, resources: _Resources) -> None:
        """`BrokerError` if the connection, open to the client, does not answer a ping: its
        reading has stopped (or the server hangs), and the client would not see it for
        minutes, every partition idle meanwhile. Stopped, the worker can be started again."""
        import nats.errors

        if not resources.nc.is_connected:  # reconnecting: the client knows
            return
        try:
            await resources.nc.rtt(_PING_ANSWER)
        except nats.errors.TimeoutError:
            raise BrokerError(
                f"NATS at {self.url} does not answer on an open connection (no answer to a ping"
                f" within {_PING_ANSWER} s): the worker stops, to be started again"
            ) from None

    def note_broker_up(self) -> None:
        if self._broker_down:
            self._broker_down = False
            logger.warning("NATS at %s works again", self.url)

    async def _release(self, resources: _Resources, running: dict[int, _PartitionRun], number: int) -> None:
        del running[number]
        await resources.staging.release(number)
        self.stats.partitions_released += 1
        self.stats.owned = sorted(running)


class _Resources:
    """The worker's connections: NATS, its own PostgreSQL connection (locks, staging),
    and the store; closed in reverse order."""

    def __init__(self, worker: IngestWorker, *, with_store: bool = True) -> None:
        self.worker = worker
        self.with_store = with_store  # opening the store creates its schema: not for `ingest_status`
        self.stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> _Resources:
        from ..stores.postgres import PostgresStore, require_psycopg

        require_psycopg("the ingest worker")
        import psycopg

        worker = self.worker
        try:
            self.nc: Client = await connect(worker.url, name=f"phi-session ingest {worker.member_id}")
            self.stack.push_async_callback(close_quietly, self.nc)
            self.js: JetStreamContext = self.nc.jetstream()
            try:
                self.conn: psycopg.AsyncConnection[Any] = await psycopg.AsyncConnection.connect(
                    worker.dsn, autocommit=True
                )
            except psycopg.Error as error:
                raise StoreError(f"cannot connect to PostgreSQL: {error}") from error
            self.stack.push_async_callback(self.conn.close)
            if self.with_store:
                self.store: PostgresStore = await asyncio.to_thread(
                    PostgresStore, worker.dsn, schema=worker.schema
                )
                self.stack.callback(self.store.close)
        except BaseException:
            await self.stack.aclose()
            raise
        self.staging = Staging(
            self.conn, schema=worker.schema, stream=worker.settings.stream, durable=worker.durable
        )
        try:
            self.store_name = await self.staging.store_name()
        except BaseException:
            await self.stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stack.aclose()


class _Pull:
    """Batches of a durable pull consumer's messages, in the order they come.

    Not nats-py's ``fetch``, which takes any message whose header block begins with a
    status line (``NATS/1.0 404``) for the server's own and drops it: a producer may
    publish such headers, and that message, never acknowledged, held its partition up
    for good. What the stream delivers carries its acknowledgement subject: whatever its
    headers say, such a message is data.
    """

    def __init__(self, js: JetStreamContext, nc: Client, stream: str, durable: str) -> None:
        self._js, self._nc, self._stream, self._durable = js, nc, stream, durable
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._inbox = nc.new_inbox()
        self._arrived: asyncio.Queue[Msg] = asyncio.Queue()
        self._subscription: Any = None
        self.answered = True  # whether anything answered the last `fetch`'s requests

    async def start(self) -> None:
        async def arrived(message: Msg) -> None:
            self._arrived.put_nowait(message)

        self._subscription = await self._nc.subscribe(self._inbox, cb=arrived)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._subscription.unsubscribe()

    async def consumer_info(self) -> Any:
        return await self._js.consumer_info(self._stream, self._durable)

    async def fetch(self, batch: int, wait: float, max_bytes: int) -> list[Msg]:
        """Up to `batch` messages (of up to `max_bytes` a request): those the stream has now,
        else the first to come within `wait` seconds (and any that came with it); none on an
        idle partition."""
        self.answered = False
        taken = self._take_arrived(batch)  # delivered to an earlier request after it returned
        if len(taken) < batch:
            await self._request({"batch": batch - len(taken), "max_bytes": max_bytes, "no_wait": True})
            taken += await self._collect(batch - len(taken), _NO_WAIT_ANSWER, linger=False)
        if not taken:
            await self._request({"batch": batch, "max_bytes": max_bytes, "expires": int(wait * 1e9)})
            taken = await self._collect(batch, wait + _NO_WAIT_ANSWER, linger=True)
        return taken

    async def _request(self, request: dict[str, Any]) -> None:
        await self._nc.publish(self._next, json.dumps(request).encode(), reply=self._inbox)

    def _take_arrived(self, most: int) -> list[Msg]:
        taken: list[Msg] = []
        while len(taken) < most and not self._arrived.empty():
            message = self._arrived.get_nowait()
            self.answered = True
            if _is_data(message):
                taken.append(message)
        return taken

    async def _collect(self, most: int, within: float, *, linger: bool) -> list[Msg]:
        """Messages answering the last request: until `most`, the request's end (404 no
        messages, 408 expired, 409) or `within` seconds; lingering, from the first message
        on only those already here (the rest come to the next fetch)."""
        taken: list[Msg] = []
        deadline = time.monotonic() + within
        while len(taken) < most:
            if linger and taken:
                return taken + self._take_arrived(most - len(taken))
            try:
                message = await asyncio.wait_for(self._arrived.get(), max(deadline - time.monotonic(), 0))
            except asyncio.TimeoutError:
                break
            self.answered = True
            if _is_data(message):
                taken.append(message)
            elif (message.headers or {}).get("Status") in ("404", "408", "409"):
                break  # (100: a heartbeat)
        return taken


def _is_data(message: Msg) -> bool:
    """Whether the stream delivered `message` (else it is the server's status)."""
    return bool(message.reply) and message.reply.startswith("$JS.ACK.")


def _storable_id(event_id: str) -> bool:
    """Whether `event_id` can key a staged row (not empty, not too long for the primary key)."""
    return bool(event_id) and len(event_id) <= _MAX_EVENT_ID and "\x00" not in event_id


@dataclass
class _Pieces:
    """The pieces of one event staged so far, by (total, number): sent again under another
    server's max_payload, it is cut into another number of pieces."""

    staged: dict[tuple[int, int], StagedEvent] = field(default_factory=dict)
    latest: float = 0.0  # when the last one came (`time.monotonic()`)


class _PartitionRun:
    """One partition held by this worker: its consumer, its recorder, its saver."""

    def __init__(self, worker: IngestWorker, resources: _Resources, number: int) -> None:
        self.worker = worker
        self.resources = resources
        self.number = number
        self.recorder = SessionRecorder(worker.recorder_config)
        # A session id no store accepts: its events stay staged, as rejected, with their payload.
        self.saver = SessionSaver(resources.store, orphans=self.orphaned)
        # A spawner the store fails to read is read again as long as a failed save is tried.
        self.spawners = SavedSpawners(resources.store, caller_retries_for=self.saver.retry_for)
        self.unstorable: list[str] = []  # sessions handed to `orphaned`, not yet marked
        self.waiting: dict[int, StagedEvent] = {}  # staged, not yet applied, by stream sequence
        self.applied: dict[str, list[str]] = {}  # session id -> events applied, session not yet saved
        # Session id -> events of it saved while it may still be amended (its group's end, the
        # tool call that spawned it is owed): staged, so a new owner replays them and can amend.
        self.owed: dict[str, list[str]] = {}
        self.last_event: dict[str, float] = {}  # session id applied or owed -> when its latest came
        self.behind_at = time.monotonic()  # when the partition was last taken or had a backlog
        self.loop_sessions = Routes()  # loop -> session, where the loop id says otherwise
        self.held: set[int] = set()  # waiting events already counted as held back
        self.apply_after = 0.0  # when waiting events may be applied again (`time.monotonic()`)
        self.pieces: dict[str, _Pieces] = {}  # event id -> its pieces applied, until all are
        self.stream_created: str | None = None  # the stream the consumer reads (its creation time)
        self.stopping = asyncio.Event()
        self.task = asyncio.create_task(self.run(), name=f"partition {number}")

    async def finish(self) -> None:
        self.saver.stop_trying_after(0)  # a stop waits out no retries: unsaved sessions stay staged
        self.stopping.set()
        await asyncio.gather(self.task, return_exceptions=True)

    async def run(self) -> None:
        worker, number = self.worker, self.number
        name = f"{worker.durable}-{number}"
        await self.ensure_consumer(name)
        subscription = _Pull(self.resources.js, self.resources.nc, worker.settings.stream, name)
        await subscription.start()
        try:
            for event in await self.resources.staging.pending(number):
                self.waiting[event.stream_seq] = event
            if self.waiting:
                logger.info("partition %d: replaying %d staged events", number, len(self.waiting))
                await self.apply_ready(subscription)
            last_save = time.monotonic()
            while not self.stopping.is_set():
                messages = await subscription.fetch(worker.batch, _FETCH_WAIT, self.pull_bytes())
                if not subscription.answered:  # not even "no messages": is the consumer there?
                    await self.find_consumer(subscription)
                if messages:
                    await self.take(messages)
                    self.worker.note_broker_up()
                if self.waiting:
                    await self.apply_ready(subscription)
                if len(messages) == worker.batch or self.waiting:
                    self.behind_at = time.monotonic()  # a session's next event may still be on its way
                if time.monotonic() - last_save >= worker.checkpoint_interval:
                    await self.save()
                    last_save = time.monotonic()
            await self.save()
        finally:
            await subscription.close()

    def pull_bytes(self) -> int:
        """The bytes a pull request may ask for: the partition's share of `fetch_bytes` (it
        may have two requests open: one still filling, one it waits on), but never too few
        for the largest message the server takes (one larger ends every pull it is asked for)."""
        worker = self.worker
        share = worker.fetch_bytes // (2 * max(len(worker.stats.owned), 1))
        return max(share, self.resources.nc.max_payload + _MESSAGE_ROOM)

    async def find_consumer(self, subscription: _Pull) -> None:
        """Create the stream and the consumer again if they are gone (NATS restarted without
        its storage, or they were deleted): a pull on a missing consumer has no answer, and
        the partition would wait for ever, idle to all appearances. A lookup that has no
        answer either fails the partition, as NATS being down does."""
        from nats.js.errors import NotFoundError

        try:
            await subscription.consumer_info()
            return
        except NotFoundError:
            pass
        name = f"{self.worker.durable}-{self.number}"
        logger.warning(
            "partition %d: consumer %s of stream %s is gone (NATS lost its storage, or it was"
            " deleted); setting it up again",
            self.number,
            name,
            self.worker.settings.stream,
        )
        settings = self.worker.settings
        layout = await ensure_stream(self.resources.js, settings)
        if layout.partitions != settings.partitions:  # made again, by a producer set up otherwise
            raise BrokerError(
                f"stream {settings.stream} was created again with {layout.partitions} partitions,"
                f" not {settings.partitions}: start the workers again"
            )
        await self.ensure_consumer(name)

    async def ensure_consumer(self, name: str) -> None:
        from nats.js import api
        from nats.js.errors import BadRequestError, NotFoundError

        settings = self.worker.settings
        with contextlib.suppress(NotFoundError):
            # Checked first: creating it again would write this worker's store over the other's.
            self.check_store(await self.resources.js.consumer_info(settings.stream, name))
        config = api.ConsumerConfig(
            durable_name=name,
            description=self.store_label,
            filter_subject=settings.subject(self.number),
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_wait=self.worker.ack_wait,
            max_deliver=-1,
            max_ack_pending=self.worker.batch * 4,
        )
        try:
            await self.resources.js.add_consumer(settings.stream, config)
        except BadRequestError as error:
            try:  # it exists with settings it cannot take (an older worker's): use it
                await self.resources.js.consumer_info(settings.stream, name)
            except NotFoundError:  # refused: retrying would fail the same way, for ever
                raise BrokerError(
                    f"cannot create consumer {name} on stream {settings.stream}: {error.description or error}"
                ) from None
        await self.follow_stream()

    async def follow_stream(self) -> None:
        """Note which stream the consumer reads. One created again numbers its messages from 1
        again: the events staged from the earlier one move below them first, so they are still
        applied first, in their order, and none waits for an acknowledgement floor to reach it."""
        info = await stream_info(self.resources.js, self.worker.settings.stream)
        if info is None or info.created is None:  # gone again: the next pull sets it up again
            return
        created = info.created.isoformat()
        if created == self.stream_created:
            return
        shift = await self.resources.staging.rekey(self.number, created)
        if shift:
            self.waiting = {
                sequence - shift: event._replace(stream_seq=sequence - shift)
                for sequence, event in self.waiting.items()
            }
            self.held = {sequence - shift for sequence in self.held}
        self.stream_created = created

    @property
    def store_label(self) -> str:
        """The consumer's description: the store its messages are recorded into."""
        return f"phi-session ingest into {self.resources.store_name}"

    def check_store(self, info: Any) -> None:
        """`BrokerError` if the consumer `info` describes records into another store: sharing
        it, each worker would record part of every session (partition locks are per store).
        One no store is recorded on (an older worker's) is this one's."""
        theirs = info.config.description
        if theirs and theirs != self.store_label:
            store = theirs.removeprefix("phi-session ingest into ")
            raise BrokerError(
                f"consumer {info.name} of stream {self.worker.settings.stream} records into another"
                f" store ({store}), not {self.resources.store_name}: a store needs a stream of its"
                " own (--stream and --subject-prefix)"
            )

    async def take(self, messages: list[Msg]) -> None:
        """Stage a batch, then acknowledge it; the new events wait to be applied."""
        staged = []
        unnamed = []
        for message in messages:
            headers = message.headers or {}
            sequence = message.metadata.sequence.stream
            event_id = headers.get(EVENT_ID_HEADER, "")
            if not _storable_id(event_id):
                # Published by something other than JetStreamSink, or an id PostgreSQL cannot
                # hold (it would fail the batch at every redelivery): its stream position names it.
                event_id = ""
                unnamed.append(sequence)
            session = headers.get(SESSION_HEADER, "").replace("\x00", "")
            piece = read_piece(headers)
            if piece is not None and not _storable_id(piece.event_id):
                piece = None  # taken whole: no event, so kept as rejected
            staged.append(StagedEvent(sequence, event_id, session, message.data, piece))
        if unnamed:
            named = await self.resources.staging.position_ids(self.stream_created, unnamed)
            staged = [event._replace(event_id=event.event_id or named[event.stream_seq]) for event in staged]
        new = await self.resources.staging.insert(self.number, self.stream_created, staged)
        for message in messages:
            await message.ack()
        await self.resources.nc.flush()
        stats = self.worker.stats
        stats.received += len(staged)
        for event in staged:
            if event.event_id in new:
                new.discard(event.event_id)  # a second copy in the same batch is a duplicate too
                self.waiting[event.stream_seq] = event
            else:
                stats.duplicates += 1

    async def apply_ready(self, subscription: _Pull) -> None:
        """Apply the waiting events up to the acknowledgement floor, in stream order (once
        `apply_after` has passed: the store failed a read one of them needs)."""
        if time.monotonic() < self.apply_after:
            return
        info = await subscription.consumer_info()
        self.check_store(info)  # a worker of another store may have taken the consumer since
        floor = info.ack_floor.stream_seq if info.ack_floor is not None else 0
        rejected = []
        now = time.monotonic()
        for sequence in sorted(seq for seq in self.waiting if seq <= floor):
            event = await self.whole(self.waiting.pop(sequence))
            if event is None:
                continue
            try:
                decoded = decode_event(event.payload, strict=False)
                if self.spawners.needs_spawner(decoded, self.recorder):
                    # Its spawner was saved (by the partition's last owner, say): its tool call is stored.
                    await asyncio.to_thread(self.spawners.hand_to, self.recorder, decoded)
                # Its session as the recorder sees it, from the event: other publishers send
                # no Phi-Session header, and NATS trims header values.
                session = track_session(decoded, self.loop_sessions)
                self.recorder.on_json(event.payload)
            except DecodeError as error:
                logger.warning("event %s is not phi-core JSON, kept as rejected: %s", event.event_id, error)
                rejected.append(event.event_id)
                continue
            except StoreError:
                # Applied now, its sub-agent would be saved without its tool call for good: it
                # and the events after it wait, tried again at the next checkpoint (as a save is),
                # until `spawners` gives that spawner up (it warned).
                self.worker.stats.spawner_waits += 1
                self.waiting[sequence] = event
                self.apply_after = time.monotonic() + self.worker.checkpoint_interval
                break
            if self.recorder.drain_orphans():  # of no open loop (the recorder warned): in no session
                rejected.append(event.event_id)
                continue
            self.applied.setdefault(session, []).append(event.event_id)
            self.last_event[session] = now
            self.worker.stats.recorded += 1
        self.held.intersection_update(self.waiting)
        later = {sequence for sequence in self.waiting if sequence > floor} - self.held
        self.worker.stats.held_back += len(later)
        self.held.update(later)
        self.worker.stats.rejected += len(rejected)
        await self.resources.staging.mark(rejected, REJECTED)

    async def whole(self, event: StagedEvent) -> StagedEvent | None:
        """`event`; for the last piece of one, the event its pieces make, staged in their
        place; None for a piece of one not complete yet, or of one staged already.

        A piece of an event staged otherwise (sent again whole, or cut otherwise under another
        server's max_payload), before the event or after it, is a duplicate: marked saved here,
        before its event's session is, so a worker killed in between leaves both pending and
        the next owner drops it again."""
        piece = event.piece
        if piece is None:
            strays = self.pieces.pop(event.event_id, None)
            if strays is not None:
                await self.drop_duplicates([staged.event_id for staged in strays.staged.values()])
            return event
        # Pieces held: their event was not staged when the first came, and drops them once applied.
        if piece.event_id not in self.pieces and await self.resources.staging.has(piece.event_id):
            await self.drop_duplicates([event.event_id])
            return None
        pieces = self.pieces.setdefault(piece.event_id, _Pieces())
        pieces.staged[piece.total, piece.number] = event
        pieces.latest = time.monotonic()
        if sum(total == piece.total for total, _ in pieces.staged) < piece.total:
            return None
        del self.pieces[piece.event_id]
        payload = b"".join(pieces.staged[piece.total, number].payload for number in range(piece.total))
        joined = StagedEvent(event.stream_seq, piece.event_id, event.session_id, payload)
        replaced = [staged.event_id for staged in pieces.staged.values()]
        if await self.resources.staging.insert(self.number, self.stream_created, [joined], replaced):
            return joined
        self.worker.stats.duplicates += 1
        return None

    async def drop_duplicates(self, event_ids: list[str]) -> None:
        self.worker.stats.duplicates += len(event_ids)
        await self.resources.staging.mark(event_ids, SAVED)

    def orphaned(self, events: list[AgentEvent]) -> None:
        if events:
            self.unstorable.append(event_session_id(events[0], self.loop_sessions))

    async def save(self) -> None:
        """Save what is complete; mark the events of saved sessions (and of unstorable ones)."""
        given_up = self.end_idle_sessions()
        saver = self.saver
        # One attempt each: one PostgreSQL keeps failing (a full disk) must not stall the partition.
        retried = [
            session for session in saver.take_unsaved() if (await saver.asave(session, once=True)).saved
        ]
        saved = retried + await saver.adrain(self.recorder)
        held = {session.session_id for session in saver.unsaved}
        done: list[str] = []
        recorder = self.recorder
        for session in saved:
            session_id = session.session_id
            if session_id in held:
                continue
            events = [*self.owed.pop(session_id, ()), *self.applied.pop(session_id, ())]
            if recorder.may_amend(session_id):
                self.owed[session_id] = events
            else:
                done.extend(events)
        # Owed nothing any more, with no amendment (its group given up, its spawner ended):
        # unless later events of it wait to be saved, which a new owner replays from these.
        for session_id in [
            session_id
            for session_id in self.owed
            if session_id not in self.applied
            and session_id not in held
            and not recorder.may_amend(session_id)
        ]:
            done.extend(self.owed.pop(session_id))
        self.worker.stats.sessions_saved += len(saved)
        await self.resources.staging.mark(done, SAVED)
        rejected = given_up + [
            event_id for session_id in self.unstorable for event_id in self.applied.pop(session_id, ())
        ]
        self.unstorable.clear()
        self.worker.stats.rejected += len(rejected)
        await self.resources.staging.mark(rejected, REJECTED)
        for session_id in self.last_event.keys() - self.applied.keys() - self.owed.keys():
            del self.last_event[session_id]

    def end_idle_sessions(self) -> list[str]:
        """End, as `flush` would, the sessions no event came for in `idle_timeout`: a killed
        agent's loops never end, and its session would never be saved. Events whose pieces
        stopped coming as long are given up: the ids of their pieces, to keep as rejected."""
        now = time.monotonic()
        cutoff = now - self.worker.idle_timeout
        if self.behind_at >= cutoff:
            return []
        idle = [session_id for session_id, latest in self.last_event.items() if latest < cutoff]
        aborted_loops = self.recorder.abort_sessions(idle)
        # Aborted: their loops never end.
        self.loop_sessions.release([session_id for session_id, aborted in aborted_loops.items() if aborted])
        for session_id, aborted in aborted_loops.items():
            if aborted:
                logger.warning(
                    "session %s: no event for %g s, its open loops are aborted",
                    session_id,
                    self.worker.idle_timeout,
                )
            self.last_event[session_id] = now  # looked at again only after another timeout
        given_up = []
        for event_id, pieces in list(self.pieces.items()):
            if pieces.latest < cutoff:
                logger.warning(
                    "event %s: %d of its pieces came, then none for %g s; they are kept as rejected",
                    event_id,
                    len(pieces.staged),
                    self.worker.idle_timeout,
                )
                given_up += [staged.event_id for staged in self.pieces.pop(event_id).staged.values()]
        return given_up


async def ingest_status(
    url: str,
    dsn: str,
    *,
    schema: str = "phi_session",
    stream: str | None = None,
    subject_prefix: str | None = None,
    durable: str = "phi-ingest",
) -> list[PartitionStatus]:
    """Each partition's lag (messages in the stream), staged events and owner.

    Read-only: creates no stream, consumer, schema or table."""
    worker = IngestWorker(
        url, dsn, schema=schema, stream=stream, subject_prefix=subject_prefix, durable=durable
    )
    async with _Resources(worker, with_store=False) as resources:
        from nats.js.errors import NotFoundError

        settings = worker.settings
        info = await stream_info(
            resources.js, settings.stream, subjects_filter=f"{settings.subject_prefix}.>"
        )
        if info is None:
            raise BrokerError(f"no stream {settings.stream} on {url}: nothing was published yet")
        settings = stream_layout(info, settings)
        in_stream = info.state.subjects or {}
        counts = await resources.staging.counts()
        owners = await resources.staging.owners()
        rows = []
        for number in range(settings.partitions):
            try:
                consumer = await resources.js.consumer_info(settings.stream, f"{durable}-{number}")
                unacknowledged = consumer.num_ack_pending or 0
            except NotFoundError:
                unacknowledged = 0
            staged = counts.get(number, {})
            rows.append(
                PartitionStatus(
                    partition=number,
                    in_stream=in_stream.get(settings.subject(number), 0),
                    unacknowledged=unacknowledged,
                    staged=staged.get(0, 0),
                    rejected=staged.get(REJECTED, 0),
                    owner=owners.get(number),
                )
            )
        return rows
