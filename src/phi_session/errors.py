"""The exception hierarchy: everything phi-session raises derives from `PhiSessionError`."""

from __future__ import annotations


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


class SessionLocked(PhiSessionError):
    """Another writer held the session's lock for longer than the bounded wait."""


class StoreError(PhiSessionError):
    """A storage backend failed (I/O error, full disk, broken connection)."""


class InvalidStoreUrl(StoreError, ValueError):
    """A store URL of no accepted form (a usage error, not a failing store)."""


class InstrumentationError(PhiSessionError, RuntimeError):
    """The instrumentation API was used out of order (a scope used before it started or
    after it ended, two turns of one loop open at once...)."""


class JournalLocked(SessionLocked):
    """Another live `Journal` (in this or another process) holds the journal directory."""


class BrokerError(PhiSessionError):
    """The message broker (NATS JetStream) cannot be used: unreachable, a stream laid out
    otherwise than phi-session expects, or the ``nats`` extra is not installed."""
