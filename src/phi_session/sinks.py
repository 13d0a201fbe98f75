"""Sinks: where emitted events go, behind one interface (`Sink`).

* `RecorderSink`: a recorder in the same process, `SessionRecorder` or
  `AutoPersistingRecorder` (a bare recorder works too).
* `QueueSink`: an ``asyncio.Queue`` drained by a recorder task (`phi_session.consume`),
  safe to call from any thread.
* `JsonlSink`: a JSON Lines file in phi-core's event-stream format, one event per
  line, flushed per line (``phi-session record`` reads it back).
* any callable, e.g. ``events.append`` (adapted by `as_sink`).

`FanOut` sends every event to several sinks with failure isolation: a sink that
raises does not break the agent nor starve the other sinks; its first error is
logged, and every error is counted (`FanOut.errors`).

A sink may declare ``wants_deltas = False`` (the recorder does, unless it keeps
streaming events): when no sink wants streaming deltas, the instrumentation API does
not even build them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import logging
import os
import stat
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import IO, Any, Protocol, TypeVar, Union, cast, runtime_checkable

from ._checks import check_callable, check_type
from ._failures import FailureTally
from ._jsonl import ends_mid_line
from .codec import encode_event
from .errors import InstrumentationError, InvalidArgument
from .events import AgentEvent
from .recorder import checked_entry

__all__ = ["CallableSink", "FanOut", "JsonlSink", "QueueSink", "RecorderSink", "Sink", "SinkLike", "as_sink"]

logger = logging.getLogger("phi_session.sinks")


@runtime_checkable
class Sink(Protocol):
    """Where events go: the interface `FanOut` (and so `Tracer`) drives.

    The contract:

    * ``sink(event)`` receives one event. It is called in whatever thread or task
      the agent emits from, possibly concurrently: a sink is thread-safe. Each
      thread's events reach every sink in the order it emitted them; events that
      threads emit at the same moment (tools run in threads) may reach two sinks
      in different orders, as each thread delivers its own event in its own call
      (no lock held while a sink runs, so a slow sink never holds another thread).
    * It does not block the agent: work that may stall (the network, a full buffer)
      belongs behind a queue (`QueueSink`) or in another thread.
    * It never raises into the agent: if it raises anyway, `FanOut` isolates it
      (the other sinks still get the event), logs its first failure and counts all.
    * ``wants_deltas``: whether it keeps streaming deltas (``MessageUpdate``); when
      no sink does, they are never built.
    * The lifecycle: ``flush()`` makes what it received durable or visible
      (`Tracer.flush`); ``close()`` flushes and releases what it holds, and no
      event follows it (`Tracer.close`): one sent anyway raises if the sink can no
      longer take it (`QueueSink`), so that `FanOut` counts it. Neither raises into the
      agent either: a failure is logged.

    Any callable is accepted where a sink is expected: `as_sink` adapts it.
    """

    def __call__(self, event: AgentEvent, /) -> None: ...

    @property
    def wants_deltas(self) -> bool: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class EventRecorder(Protocol):
    """A recorder: what takes events by ``on_event`` (`SessionRecorder`,
    `AutoPersistingRecorder`), owned by whoever made it."""

    def on_event(self, event: AgentEvent, /) -> Any: ...


SinkLike = Union[Sink, EventRecorder, Callable[[AgentEvent], Any]]
"""What `Tracer` accepts as a sink: a sink, a recorder, or any callable."""


def recorder_receiver(target: object) -> Callable[[AgentEvent], Any] | None:
    """`target`'s ``on_event`` if it is a recorder (not callable itself, with an
    ``on_event``), else None."""
    if callable(target):
        return None
    receiver = getattr(target, "on_event", None)
    return receiver if callable(receiver) else None


class CallableSink:
    """Any callable as a `Sink`: ``wants_deltas``, ``flush()`` and ``close()`` are the
    callable's own where it has them (read once, here), else True and no-ops."""

    __slots__ = ("_close", "_flush", "target", "wants_deltas")

    def __init__(self, target: Callable[[AgentEvent], Any]) -> None:
        check_callable("target", target)
        self.target = target
        self.wants_deltas = bool(getattr(target, "wants_deltas", True))
        self._flush: Callable[[], Any] | None = getattr(target, "flush", None)
        self._close: Callable[[], Any] | None = getattr(target, "close", None)

    def __call__(self, event: AgentEvent) -> None:
        self.target(event)

    def flush(self) -> None:
        if self._flush is not None:
            self._flush()

    def close(self) -> None:
        if self._close is not None:
            self._close()

    def __repr__(self) -> str:
        return repr(self.target)


class RecorderSink:
    """Feeds a recorder (`SessionRecorder`, `AutoPersistingRecorder`, any `EventRecorder`)
    in the same process (thread-safe, as the recorder is)."""

    __slots__ = ("recorder",)

    def __init__(self, recorder: EventRecorder) -> None:
        if not callable(getattr(recorder, "on_event", None)):
            raise TypeError(f"recorder must be a recorder (with on_event), not {type(recorder).__name__}")
        self.recorder = recorder

    @property
    def wants_deltas(self) -> bool:
        config = getattr(self.recorder, "config", None)
        return bool(getattr(config, "include_streaming_events", True))

    def __call__(self, event: AgentEvent) -> None:
        self.recorder.on_event(event)

    def flush(self) -> None:
        """Nothing to do: the recorder takes each event in before the call returns (its own
        `SessionRecorder.flush` ends what is still open, the recorder owner's decision)."""

    def close(self) -> None:
        """Nothing to release: the recorder is its owner's."""

    def __repr__(self) -> str:
        return f"RecorderSink({self.recorder!r})"


_Item_contra = TypeVar("_Item_contra", contravariant=True)


@runtime_checkable
class _PutQueue(Protocol[_Item_contra]):
    """What `QueueSink` uses of an ``asyncio.Queue``. A protocol rather than the class, so
    that a queue of more item types (``asyncio.Queue[AgentEvent | bytes | str | None]``,
    shared with other producers for `consume`) type-checks: ``asyncio.Queue`` is invariant."""

    @property
    def maxsize(self) -> int: ...

    def put_nowait(self, item: _Item_contra) -> None: ...


class QueueSink:
    """Puts events on an ``asyncio.Queue`` for a recorder task (`phi_session.consume`).

    Safe to call from any thread, events reaching the queue in the order of the calls:
    from the queue's event-loop thread an event is put directly, from any other thread
    through ``call_soon_threadsafe`` (and from the loop's thread too while events handed
    over so are waiting, so that none is put ahead of them: a sync step joining its
    tools' threads). The loop is `loop`, else the running loop at construction:
    built outside a running loop without `loop=`, the sink is refused (`RuntimeError`)
    rather than guessing, since the first caller's loop may be the agent's, not the
    consumer's. `close()` puts the end-of-stream marker (None), which ends `consume`:
    of several sinks sharing one queue (tracers feeding one consumer), only the last
    to close, the others still open having a stream to send. One garbage-collected
    unclosed no longer counts: if it was the last open one and another has closed, the
    marker is put then. From the moment the marker is on its way until `consume` takes
    it from the queue, a new sink on it is refused (`InvalidArgument`), as its events
    would follow the marker, unread by the consumer it ends; once taken, a new sink
    starts the queue's next stream, for the next consumer. Tracers made and closed one
    after another (one per request) feed one consumer while a sink the application
    holds open keeps the stream going; closing it ends the stream. The queue must be
    unbounded (``asyncio.Queue()``; a bounded one is refused): the agent never waits for
    the consumer, and no event is dropped.
    """

    def __init__(
        self,
        queue: _PutQueue[AgentEvent | None],
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        wants_deltas: bool = True,
    ) -> None:
        if not isinstance(queue, _PutQueue):
            raise TypeError(f"queue must be an asyncio.Queue, not {type(queue).__name__}")
        check_type("loop", loop, asyncio.AbstractEventLoop, optional=True)
        if queue.maxsize > 0:
            raise InvalidArgument(
                "QueueSink needs an unbounded asyncio.Queue (maxsize=0): a full queue would drop events"
            )
        self.queue = queue
        self.wants_deltas = wants_deltas
        self._thread: int | None = None  # the loop's thread, if known: direct puts from it
        # Events handed to the loop's callbacks and not yet put (under `_lock`): while there
        # are any, the loop's thread hands its events over too, behind them.
        self._waiting = 0
        self._closed = False  # closed: no event may follow (the marker, if it put it)
        self._lock = threading.Lock()
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is None:
            if running is None:
                raise RuntimeError(
                    "QueueSink built outside a running event loop needs loop=: the "
                    "event loop of the consumer that reads the queue"
                )
            loop = running
        if loop is running:
            self._thread = threading.get_ident()
        self._loop: asyncio.AbstractEventLoop = loop
        # Counted open last, once nothing can refuse the sink: a refused one never closes.
        with _sharing_lock:
            try:
                self._sharing = _sharing.setdefault(queue, _Sharing())
            except TypeError:  # a queue that cannot be weakly referenced: this sink's alone
                self._sharing = _Sharing()
            if self._sharing.ended:
                raise InvalidArgument(
                    "QueueSink: the stream of this queue ended when its last QueueSink closed, and "
                    "its consumer reads nothing behind that end marker; make the sink once consume "
                    "has taken the marker, give a new consumer a new queue, or hold one QueueSink of "
                    "the queue open while tracers come and go"
                )
            self._sharing.open += 1
        # Collected unclosed, the sink leaves its queue's open ones (holding neither it nor
        # its events: each handed-over event holds it alive until put).
        self._open = weakref.finalize(self, _collected_unclosed, self._sharing, loop, queue)
        self._open.atexit = False

    def __call__(self, event: AgentEvent | None) -> None:
        # `_waiting` only drops in the loop's thread (`_put`): read there, it cannot be stale.
        if not self._waiting and threading.get_ident() == self._thread:
            if self._closed:
                raise _closed_queue()
            self.queue.put_nowait(event)
            return
        # Any other thread (or an explicit loop whose thread is unknown): always this
        # path, so the events of one thread keep their order.
        self._hand_over(event)

    def _hand_over(self, event: AgentEvent | None, *, closing: bool = False) -> None:
        """Put `event` from the loop's thread, behind every event handed over before."""
        with self._lock:
            if self._closed and not closing:
                raise _closed_queue()
            self._closed = self._closed or closing
            self._waiting += 1
        try:
            self._loop.call_soon_threadsafe(self._put, event)
        except BaseException:  # a closed loop: nothing is waiting for it
            with self._lock:
                self._waiting -= 1
            raise

    def _put(self, event: AgentEvent | None) -> None:
        with self._lock:
            self._waiting -= 1
        self.queue.put_nowait(event)

    def flush(self) -> None:
        """Nothing to do: each event is on its way to the queue when the call returns."""

    def close(self) -> None:
        """Signal the end of the stream to the consumer (after every event already sent),
        unless another sink on the queue is still open: then the last of them does. Until
        `consume` takes the marker, no new sink may join the queue.

        The marker always goes through the loop's callback queue, behind the events
        other threads have handed over but the loop has not queued yet. Raises
        `RuntimeError` if the loop is closed (the marker could not be delivered). An
        event sent after it raises `InstrumentationError` (counted by `FanOut.errors`,
        the first logged): behind the marker, no consumer would read it.
        """
        with _sharing_lock:
            last = self._open.detach() is not None and self._sharing.leave()
        if last:
            self._hand_over(None, closing=True)
        else:
            with self._lock:
                self._closed = True


class _Sharing:
    """The `QueueSink`s of one queue: how many are open (neither closed nor collected),
    whether one closed while others were, owing the end-of-stream marker to the
    last of them to leave, and whether the marker was handed over and not yet taken by
    `consume` (on its way or unread: no sink may join). Read and changed under `_sharing_lock`."""

    def __init__(self) -> None:
        self.open = 0
        self.owed = False
        self.ended = False

    def leave(self) -> bool:
        """One sink closes: whether it is the last open one, to put the marker."""
        self.open -= 1
        self.owed = self.open > 0
        self.ended = not self.owed
        return self.ended

    def collected(self, queue: _PutQueue[AgentEvent | None]) -> None:
        """One sink was collected unclosed (run in its loop's thread): the last to leave
        puts the marker if one is owed, behind the events handed over before."""
        with _sharing_lock:
            self.open -= 1
            put = not self.open and self.owed
            self.owed = self.owed and not put
            self.ended = self.ended or put
        if put:
            asyncio.get_running_loop().call_soon(queue.put_nowait, None)


def _collected_unclosed(
    sharing: _Sharing, loop: asyncio.AbstractEventLoop, queue: _PutQueue[AgentEvent | None]
) -> None:
    # Run by the garbage collector, maybe in a thread inside `_sharing_lock`: the count
    # is left to the loop's thread, which takes the lock as any caller does.
    try:
        loop.call_soon_threadsafe(sharing.collected, queue)
    except RuntimeError:  # a closed loop: no consumer is left to end
        pass


# Each queue's `_Sharing` (the queue weakly held).
_sharing: weakref.WeakKeyDictionary[Any, _Sharing] = weakref.WeakKeyDictionary()
_sharing_lock = threading.Lock()


def end_marker_taken(queue: object) -> None:
    """`consume` took the end-of-stream marker from `queue`: the stream it ended is over,
    and a new `QueueSink` on the queue starts the next one (for the next consumer)."""
    with _sharing_lock:
        try:
            sharing = _sharing.get(queue)
        except TypeError:  # a queue that cannot be weakly referenced: its sinks share nothing
            return
        if sharing is not None:
            sharing.ended = False


def _closed_queue() -> InstrumentationError:
    return InstrumentationError("QueueSink is closed: an event behind its end-of-stream marker is never read")


class JsonlSink:
    """Appends each event to a JSON Lines file in phi-core's event-stream format.

    One compact event per line, ``\\n``-terminated, flushed per line (and fsynced
    with ``fsync=True``, which a file object without a descriptor, such as a
    ``BytesIO``, cannot be: refused with `InvalidArgument`). Given a path, the file
    is opened for appending and closed by `close()`; given a binary file object, it
    is written but left open.
    Thread-safe: lines are never interleaved. A call that raises (a full disk) wrote
    nothing of its event to a file given by path: what the failed write had written of
    the line is cut off again (a regular file no other process appends to), so a failed
    event never shows up later, nor twice if retried. A file object given keeps its own
    buffer, which may still write such a line with the next one. A last line torn by a
    crash (or left by a failed write) is ended before the next is appended, so no
    event is glued to it and lost with it.
    """

    wants_deltas = True

    def __init__(self, target: str | os.PathLike[str] | IO[bytes], *, fsync: bool = False) -> None:
        # Whether the file ends inside a line (torn by a crash, or by a write that failed
        # here): the next line starts with a newline, or it would be glued to the torn one.
        self._torn = False
        if isinstance(target, (str, os.PathLike)):
            # Owned (closed by close()) and unbuffered: a line is written by `_append`, all
            # of it or none, never kept in a buffer that writes it with a later line.
            self.file: IO[bytes] = open(target, "ab", buffering=0)
            self._owned = True
            self._regular = stat.S_ISREG(os.fstat(self.file.fileno()).st_mode)
            self._torn = _ends_mid_line(target, self.file)
        else:
            self.file = _binary_writer(target)
            self._owned = False
            if fsync and not _has_descriptor(self.file):
                raise InvalidArgument("fsync=True needs a file with a descriptor (fileno())")
        self.fsync = fsync
        self._lock = threading.Lock()

    def __call__(self, event: AgentEvent) -> None:
        line = encode_event(event) + b"\n"
        with self._lock:
            if self._torn:
                line = b"\n" + line  # a blank line if the torn one was completed after all
            if self._owned:
                self._append(line)
            else:
                self._torn = True  # until the whole line is written
                self.file.write(line)
                self.file.flush()
            self._torn = False
            if self.fsync:
                os.fsync(self.file.fileno())

    def _append(self, line: bytes) -> None:
        """Write `line` to the owned file, or raise having written none of it (what a failed
        write had written is cut off again; where it cannot be, the line is left torn)."""
        fd, view, done = self.file.fileno(), memoryview(line), 0
        try:
            while done < len(view):
                written = os.write(fd, view[done:])
                if not written:
                    raise OSError(errno.EIO, "write made no progress")
                done += written
        except OSError:
            if done:
                self._take_back(fd, done)
            raise

    def _take_back(self, fd: int, size: int) -> None:
        """Cut off the last `size` bytes, which a failed `_append` wrote (under the lock)."""
        if self._regular:
            with contextlib.suppress(OSError):  # the error raised is the write's
                os.ftruncate(fd, os.fstat(fd).st_size - size)
                return
        self._torn = True  # a pipe, or the cut failed: the next line starts on its own

    def flush(self) -> None:
        """Nothing to do: every line is flushed (and fsynced with ``fsync=True``) as it is written."""

    def close(self) -> None:
        with self._lock:
            if self._owned and not self.file.closed:
                self.file.close()

    def __enter__(self) -> JsonlSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _binary_writer(target: object) -> IO[bytes]:
    """`target`, a file object `JsonlSink` can write its lines of bytes to: checked here,
    as a sink that fails on every event records nothing (a text-mode file refuses bytes)."""
    if isinstance(target, io.TextIOBase) or not (
        callable(getattr(target, "write", None)) and callable(getattr(target, "flush", None))
    ):
        raise TypeError(f"target must be a path or a binary file, not {type(target).__name__}")
    writable = getattr(target, "writable", None)
    if getattr(target, "closed", False) is True or (callable(writable) and not writable()):
        raise InvalidArgument("target: the file is not open for writing")
    return cast("IO[bytes]", target)


def _has_descriptor(file: IO[bytes]) -> bool:
    """Whether `file` has a descriptor to fsync (an in-memory file has none: its
    ``fileno()`` raises)."""
    fileno = getattr(file, "fileno", None)
    try:
        return callable(fileno) and type(fileno()) is int
    except (OSError, ValueError):  # `io.UnsupportedOperation` is both
        return False


def _ends_mid_line(path: str | os.PathLike[str], appending: IO[bytes]) -> bool:
    """Whether the regular file at `path`, opened as `appending`, ends inside a line."""
    if not stat.S_ISREG(os.fstat(appending.fileno()).st_mode) or not appending.tell():
        return False  # empty, or a pipe or terminal: nothing to read back
    try:
        with open(path, "rb") as existing:
            return ends_mid_line(existing.fileno())
    except OSError:  # may be appended to, not read (write-only): its last line is taken as whole
        return False


def as_sink(target: SinkLike) -> Sink:
    """Adapt what `Tracer` accepts into a `Sink`: a recorder gets a `RecorderSink`, a
    callable lacking part of the interface a `CallableSink`."""
    if recorder_receiver(target) is not None:
        return RecorderSink(cast(EventRecorder, target))
    if not callable(target):
        raise TypeError(f"not a sink: {target!r} (expected a callable or a recorder with on_event)")
    if isinstance(target, Sink):
        return target
    return CallableSink(target)


def _receiver(sink: Sink) -> Callable[[AgentEvent], Any]:
    """What to call to deliver to `sink`: a wrapped callable directly, one call level less
    per event; a recorder's entry for the events a `Tracer` checked (`checked_entry`: a
    `FanOut` delivers a tracer's), for a recorder or its ``on_event`` given, or a sink
    whose ``__call__`` checks so (an `OtelExportSink`)."""
    if isinstance(sink, RecorderSink):
        return checked_entry(sink.recorder) or sink.recorder.on_event
    if isinstance(sink, CallableSink):
        target = sink.target
        owner = getattr(target, "__self__", None)
        if owner is not None and getattr(target, "__func__", None) is getattr(type(owner), "on_event", None):
            return checked_entry(owner) or target
        return target
    return checked_entry(sink, "__call__") or sink


class FanOut:
    """Delivers each event to every sink, isolating failures.

    A sink that raises is skipped for that event only: the others still receive
    it, and the caller never sees the error. The first error of each sink is logged
    with its traceback; all are counted in `errors`. Thread-safe if the sinks are.
    """

    def __init__(self, sinks: Iterable[SinkLike]) -> None:
        self.sinks: tuple[Sink, ...] = tuple(as_sink(s) for s in sinks)
        self._failures = FailureTally(logger, "sink", "it will miss the events it fails on", traceback=True)
        self._targets = tuple((sink, _receiver(sink)) for sink in self.sinks)
        self.lone: tuple[Sink, Callable[[AgentEvent], Any]] | None = (
            self._targets[0] if len(self._targets) == 1 else None
        )
        """The only sink and what to call to deliver to it, if there is exactly one (a
        `Tracer` then delivers inline, reporting a failure with `failed`)."""
        self.deliver: Callable[[AgentEvent], None]
        """Delivering to every sink, without the ``__call__`` indirection."""
        if self.lone is not None:
            self._receive_one = self.lone[1]
            self.deliver = self._deliver_one
        else:
            self.deliver = self._deliver_all

    @property
    def wants_deltas(self) -> bool:
        """Whether any sink keeps streaming deltas."""
        return any(sink.wants_deltas for sink in self.sinks)

    def __call__(self, event: AgentEvent) -> None:
        """Deliver `event` to every sink. Never raises."""
        self.deliver(event)

    def _deliver_all(self, event: AgentEvent) -> None:
        for sink, receive in self._targets:
            try:
                receive(event)
            except Exception as error:
                self.failed(sink, error)

    def _deliver_one(self, event: AgentEvent) -> None:
        try:
            self._receive_one(event)
        except Exception as error:
            self.failed(self.sinks[0], error)

    def failed(self, sink: Sink, error: Exception) -> None:
        """Count (and log, the first time) a delivery to `sink` that raised `error`."""
        self._failures.record(sink, error)

    @property
    def errors(self) -> dict[str, int]:
        """Failed deliveries per sink (by repr, `FailureTally.counts`), for sinks that
        failed at least once."""
        return self._failures.counts

    @property
    def error_count(self) -> int:
        return self._failures.total

    def flush(self) -> None:
        """Flush every sink; a failing flush is logged, not raised."""
        self._each("flushing", lambda sink: sink.flush())

    def close(self) -> None:
        """Close every sink; a failing close is logged, not raised."""
        self._each("closing", lambda sink: sink.close())

    def _each(self, doing: str, step: Callable[[Sink], None]) -> None:
        for sink in self.sinks:
            try:
                step(sink)
            except Exception:
                logger.exception("%s sink %r failed", doing, sink)
