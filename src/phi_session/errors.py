"""The exception hierarchy: everything phi-session raises derives from `PhiSessionError`."""

from __future__ import annotations

import builtins
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from http import HTTPStatus

    from .journal.recovery import RecoveryReport
    from .replay.divergence import Divergence


class PhiSessionError(Exception):
    """Base class of every error raised by phi-session."""


class DecodeError(PhiSessionError, ValueError):
    """Input is not valid phi-core JSON. The message names the offending field path."""


class SessionNotFound(PhiSessionError, KeyError):
    """No stored session has the requested id."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "session not found"


class LoopNotFound(PhiSessionError, KeyError):
    """A session holds no loop with the requested id."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "loop not found"


class InvalidSessionId(PhiSessionError, ValueError):
    """A session id that cannot safely name a stored object (``../x``, ``/``, NUL, empty)."""


class StoreError(PhiSessionError):
    """A storage backend failed (I/O error, full disk, broken connection)."""


class SessionLocked(StoreError):
    """Another writer held the session's lock for longer than the bounded wait (a
    `StoreError`: what was asked of the store was not done)."""


class StoredSessionUnusable(StoreError):
    """What a store holds under a session's id cannot be merged with: it does not decode,
    or (a file system that ignores case) it is another session. Saving that id fails the
    same way until the stored copy is moved aside or deleted, so it is not retried."""


class SessionRefused(StoreError):
    """The store refused the session's data itself: a PostgreSQL integrity constraint, check
    or trigger (SQLSTATE class 23). Saving it again fails the same way, so it is not retried:
    its events go to the orphans sink, as those of a session id no store accepts."""


class StoreClosed(StoreError):
    """The store was closed (`close`) and takes nothing more. Not retried: no wait reopens
    it (a `PostgresStore` left its ``with`` block before the recorder saving into it)."""


class EventNotDurable(StoreError):
    """The event was recorded (the recorder holds it and saves it as any other) but the
    journal failed before making it durable (an fsync on a full disk): a crash now loses
    it. The journal refuses every later event (a plain `StoreError`: not recorded)."""


class RecoveryError(StoreError):
    """Some recovered sessions could not be saved; the journal was kept. See `report`."""

    def __init__(self, message: str, report: RecoveryReport) -> None:
        super().__init__(message)
        self.report = report


class InvalidStoreUrl(StoreError, ValueError):
    """A store URL of no accepted form (a usage error, not a failing store)."""


class InvalidQuery(PhiSessionError, ValueError):
    """A malformed store query, prune criterion or usage grouping (a usage error).

    `parameter` names the offending argument (None when the arguments only fail
    together); `reason` says what is wrong with it.
    """

    def __init__(self, reason: str, parameter: str | None = None) -> None:
        super().__init__(f"{parameter}: {reason}" if parameter is not None else reason)
        self.reason = reason
        self.parameter = parameter


class UnwritableValue(PhiSessionError, TypeError):
    """A session, built or changed by hand, holds a free-form value (tool arguments,
    details, metadata) JSON cannot hold: a `pathlib.Path`, an object, a dict key that is no
    text. The message names its place. A `SessionSaver` saves such a session with its
    free-form values copied as a `Tracer` copies them."""


class InvalidArgument(PhiSessionError, ValueError):
    """An argument of the right type with a value phi-session cannot use."""


class InvalidPrices(PhiSessionError, ValueError):
    """A user price table that cannot be read (names the file or entry and what is wrong)."""


class InstrumentationError(PhiSessionError, RuntimeError):
    """The instrumentation API was used out of order (a scope used before it started or
    after it ended, two turns of one loop open at once...)."""


class JournalLocked(SessionLocked):
    """Another live `Journal` (in this or another process) holds the journal directory,
    or another recorder already writes through the `Journal` given."""


class UsedAfterFork(PhiSessionError):
    """An object a process opened that cannot go on in a process forked from it (a
    `Journal`, a recorder journaling into one, a `JetStreamSink`, a `PostgresStore`) was
    used in the forked child; the child must make its own after the fork. The parent's
    goes on unharmed. Never retried: waiting cannot make it usable."""


class NotAJournal(PhiSessionError, ValueError):
    """A directory given as a journal holds files named like segments, none of which is
    a journal segment, segments of another version of the journal format (a newer
    phi-session's) or of another kind of journal (a broker spill journal), or a
    ``checkpoint.json`` (or ``checkpoint.json.tmp``, or a ``journal.lock`` that is not
    empty) that a journal did not write, or one of these that is no regular file (a
    directory, a FIFO); nothing in it was touched."""


class MissingExtra(PhiSessionError, ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


class MissingStoreExtra(MissingExtra, StoreError):
    """A store backend's optional dependency is not installed (psycopg for `PostgresStore`):
    a `MissingExtra` as every other, and a `StoreError` as the store's other failures to open."""


class OtlpDecodeError(DecodeError):
    """An OTLP payload that cannot be read (not protobuf/JSON of ExportTraceServiceRequest)."""


class OtlpRefused(PhiSessionError):
    """The OTLP endpoint refuses a payload: `status` is its HTTP answer, sent with `headers`."""

    def __init__(self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class Backpressure(OtlpRefused):
    """The OTLP endpoint cannot take a payload now; retry after `retry_after` seconds."""

    def __init__(self, status: HTTPStatus, message: str, retry_after: int) -> None:
        super().__init__(status, message, {"Retry-After": str(retry_after)})
        self.retry_after = retry_after


class ExportError(PhiSessionError):
    """An exporter refused or failed to take the spans of a session."""


class BrokerError(PhiSessionError):
    """The message broker (NATS JetStream) cannot be used: unreachable, or a stream laid
    out otherwise than phi-session expects."""


class TurnNotFound(PhiSessionError, KeyError):
    """A loop holds no turn with the requested index."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "turn not found"


class ReplayDiverged(PhiSessionError):
    """A replayed run asked its recording for something it does not hold (another request,
    another tool call, a turn too many). `divergence` says where and what
    (`phi_session.replay.Divergence`)."""

    def __init__(self, divergence: Divergence) -> None:
        super().__init__(f"replay diverged at {divergence.describe()}")
        self.divergence = divergence


class RecordedToolError(PhiSessionError, RuntimeError):
    """A replayed tool's recorded failure, raised in the tool's place where it ended the
    original run, so the replay fails where the original did; the message is the
    recorded error text (e.g. ``"boom failed: RuntimeError: kaboom"``). One raised for a
    builtin exception class the tool raised is also of that class (a ``TimeoutError``,
    say: `phi_session.replay.cursor.recorded_tool_error`)."""

    @staticmethod
    def also_of(builtin: type[Exception]) -> type[RecordedToolError]:
        """The `RecordedToolError` class that is also `builtin`, one per class, made on
        first use; its text is the recorded one (a ``KeyError``'s is not quoted)."""
        made = _RECORDED_AS.get(builtin)
        if made is not None:
            return made
        if issubclass(RecordedToolError, builtin):
            made = RecordedToolError
        else:
            namespace = {
                "__str__": BaseException.__str__,
                "__reduce__": _reduce_recorded,
                "__module__": __name__,
            }
            made = type(f"Recorded{builtin.__name__}", (RecordedToolError, builtin), namespace)
        return _RECORDED_AS.setdefault(builtin, made)  # one class, whichever thread made it first


_RECORDED_AS: dict[type[Exception], type[RecordedToolError]] = {}


def _reduce_recorded(error: RecordedToolError) -> tuple[object, ...]:
    """A made class is no attribute of this module: it pickles (a process pool's, a deep
    copy) as the builtin's name, made again when loaded (`_remade_recorded`)."""
    builtin = type(error).__bases__[1]  # (RecordedToolError, builtin), as `also_of` makes it
    return _remade_recorded, (builtin.__name__, *error.args), error.__dict__ or None


def _remade_recorded(name: str, *args: object) -> RecordedToolError:
    """A pickled `RecordedToolError` that is also the builtin `name` (`_reduce_recorded`)."""
    builtin = getattr(builtins, name)
    if not (isinstance(builtin, type) and issubclass(builtin, Exception)):
        raise TypeError(f"{name!r} is no builtin exception class")
    return RecordedToolError.also_of(builtin)(*args)


class RecordedModelError(PhiSessionError, RuntimeError):
    """A replayed model call's recorded failure (the call raised, which ended the original
    run: its reply stopped with ``error`` or ``aborted``; for LangChain, any failure), raised
    in the model's place so the replay fails where the original did; the message is the
    recorded error text (e.g. ``"RuntimeError: rate limited"``), which the replay records."""
