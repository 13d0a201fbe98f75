"""What producers and workers agree on: the stream, its partitions, its limits; and the NATS client.

One JetStream stream holds the events; its subjects are ``{subject_prefix}.0`` …
``{subject_prefix}.{N-1}``, one per partition. Whichever side starts first creates
it (`ensure_stream`); the other side reads the partition count from the stream, so
producers and workers never disagree on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlsplit

from .._checks import check_type
from ..errors import BrokerError, InvalidArgument, MissingExtra
from ..events import AgentEnd, AgentEvent, AgentStart, ParallelLoopEnd, ParallelLoopStart
from ..ids import session_id_from_loop_id

if TYPE_CHECKING:
    from collections.abc import Collection

    from nats.aio.client import Client
    from nats.js.api import StreamInfo
    from nats.js.client import JetStreamContext

__all__ = [
    "ENV_PREFIX",
    "Piece",
    "Routes",
    "StreamSettings",
    "check_name",
    "close_quietly",
    "connect",
    "ensure_stream",
    "event_session_id",
    "nats_servers",
    "partition_of",
    "publications",
    "read_piece",
    "stream_info",
    "stream_layout",
    "track_session",
]

logger = logging.getLogger("phi_session.broker")

ENV_PREFIX = "PHI_SESSION_NATS_"
"""Environment variables ``PHI_SESSION_NATS_<FIELD>`` (e.g. ``..._PARTITIONS``) set defaults."""

EVENT_ID_HEADER = "Nats-Msg-Id"
"""The event id (``{producer id}-{sequence}``): JetStream stores a retried publish once."""
SESSION_HEADER = "Phi-Session"
"""The session id the event belongs to (the worker marks it done when that session is saved)."""
PIECE_OF_HEADER = "Phi-Piece-Of"
"""On a piece of an event over the server's max_payload: the event's id. The piece's own
``Nats-Msg-Id`` is ``{event id}/{index}/{count}``."""
PIECE_HEADER = "Phi-Piece"
"""On a piece: ``{index}/{count}`` (from 0). The pieces go in order to the event's subject;
its JSON is theirs joined."""

Publication = tuple[bytes, dict[str, str]]
"""A message as published: payload and headers."""

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# What a setting from the environment may say: plain ASCII decimal notation ([0-9], not \d,
# which matches other scripts' digits; fullmatch, as $ lets a final newline through).
_ENV_INTEGER = re.compile(r"[0-9]+")
_ENV_NUMBER = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")
_MAX_PARTITIONS = 1024
# JetStream holds sizes and durations (in nanoseconds) as signed 64-bit integers.
_MAX_BYTES = (1 << 63) - 1
MAX_SECONDS = 9e9
_MAX_ROUTES = 100_000  # routes kept once their loops ended (`Routes`)
_MAX_OPEN_ROUTES = 500_000  # routes of loops running (`Routes`): past it, killed agents' are forgotten
_MAX_ENDED_EARLY = 10_000  # loops remembered as ended before they started (`Routes`)
_ERROR_LOG_INTERVAL = 60.0  # seconds between warnings of a connection's errors once connected
_MAX_PIECES = (1 << 31) - 1  # staged as a 32-bit integer


@dataclass(frozen=True)
class StreamSettings:
    """The stream's name and layout, and the limits it is created with.

    Validated on construction (`InvalidArgument`, or `TypeError` for a value of the
    wrong type, naming the field). `from_env` fills what
    is not given from ``PHI_SESSION_NATS_*`` variables.
    """

    stream: str = "PHI_EVENTS"
    subject_prefix: str = "phi.events"
    partitions: int = 8
    """Used when this side creates the stream; otherwise the stream's own count wins."""
    max_age: float = 7 * 24 * 3600.0
    """Seconds a message not yet ingested is kept."""
    max_bytes: int = 1 << 30
    """Backlog the stream holds; when full, publishes are refused (producers spill locally)."""
    duplicate_window: float = 120.0
    """Seconds within which JetStream drops a message whose event id it already stored; at
    most `max_age` (`from_env` makes the default no longer than a shorter `max_age`)."""

    def __post_init__(self) -> None:
        check_name("stream", self.stream)
        check_type("subject_prefix", self.subject_prefix, str)
        if not all(_TOKEN.fullmatch(token) for token in self.subject_prefix.split(".")):
            raise InvalidArgument(
                "subject_prefix: expected dot-separated tokens of letters, digits, '_' "
                f"or '-', got {self.subject_prefix!r}"
            )
        _check_number("partitions", self.partitions, 1, _MAX_PARTITIONS, integer=True)
        _check_number("max_age", self.max_age, 1, MAX_SECONDS)
        _check_number("max_bytes", self.max_bytes, 1 << 20, _MAX_BYTES, integer=True)
        _check_number("duplicate_window", self.duplicate_window, 1, self.max_age)

    @classmethod
    def from_env(cls, **given: Any) -> StreamSettings:
        """Settings from `given` (None means unset), else ``PHI_SESSION_NATS_*``, else defaults."""
        unknown = given.keys() - {item.name for item in fields(cls)}
        if unknown:
            raise TypeError(f"unknown stream setting(s): {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        from_env: set[str] = set()
        for item in fields(cls):
            value = given.pop(item.name, None)
            if value is None:
                raw = os.environ.get(ENV_PREFIX + item.name.upper())
                if raw is not None:
                    value = _parse_env(item.name, raw, item.type)
                    from_env.add(item.name)
            if value is not None:
                values[item.name] = value
        max_age = values.get("max_age")
        if "duplicate_window" not in values and isinstance(max_age, (int, float)) and max_age > 0:
            # JetStream holds a window no longer than max_age: the default one shrinks to fit.
            values["duplicate_window"] = min(cls.duplicate_window, max_age)
        try:
            return cls(**values)
        except ValueError as error:
            # Validation names the field; a value from the environment is named by its variable.
            field, _, reason = str(error).partition(": ")
            if field not in from_env:
                raise
            raise InvalidArgument(f"{ENV_PREFIX}{field.upper()}: {reason}") from None

    def subject(self, partition: int) -> str:
        return f"{self.subject_prefix}.{partition}"

    def subjects(self) -> list[str]:
        return [self.subject(partition) for partition in range(self.partitions)]


def check_name(field: str, value: object) -> None:
    """A stream or consumer name: 1-64 letters, digits, ``_`` or ``-``; else `InvalidArgument`
    (`TypeError` for a non-string) naming `field`."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        check_type(field, value, str)
        raise InvalidArgument(f"{field}: expected 1-64 letters, digits, '_' or '-', got {value!r}")


def _check_number(name: str, value: object, low: float, high: float, *, integer: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"{name}: expected {kind} from {low:g} to {high:g}, got {value!r}")
    if not low <= value <= high:
        raise InvalidArgument(f"{name}: expected {kind} from {low:g} to {high:g}, got {value!r}")


def _parse_env(name: str, raw: str, kind: object) -> Any:
    if kind in ("str", str):
        return raw
    integer = kind in ("int", int)
    expected = "an integer" if integer else "a number"
    # int() and float() also read '4_0', ' 40', 'inf' and other scripts' digits: a typo taken for a number
    if not (_ENV_INTEGER if integer else _ENV_NUMBER).fullmatch(raw):
        raise InvalidArgument(f"{ENV_PREFIX}{name.upper()}: expected {expected}, got {raw!r}")
    try:
        return int(raw) if integer else float(raw)
    except ValueError:  # past int()'s digit limit (4,300 by default): far out of any range
        raise InvalidArgument(
            f"{ENV_PREFIX}{name.upper()}: expected {expected}, got one of {len(raw)} characters"
        ) from None


def event_session_id(event: AgentEvent, loop_sessions: Routes | None = None) -> str:
    """The session `event` belongs to: its own field, else its loop's (`loop_sessions` first)."""
    if isinstance(event, (AgentStart, ParallelLoopStart, ParallelLoopEnd)):
        return event.session_id
    loop_id: str = getattr(event, "loop_id", "")
    known = loop_sessions.get(loop_id) if loop_sessions is not None else None
    return session_id_from_loop_id(loop_id) if known is None else known


def track_session(event: AgentEvent, loop_sessions: Routes) -> str:
    """`event_session_id`, as a recorder sees it: an `AgentStart` whose loop id names
    another session is remembered in `loop_sessions`, for its loop's later events."""
    session = event_session_id(event, loop_sessions)
    if isinstance(event, AgentStart) and session_id_from_loop_id(event.loop_id) != session:
        loop_sessions.opened(event.loop_id, session, event.loop_id)
    elif type(event) is AgentEnd:
        loop_sessions.ended(event.loop_id, event.loop_id)
    return session


class Routes:
    """A routing table (a loop's session, a sub-agent session's partition key) that keeps
    what is in use: a key with a loop started and not ended is not forgotten while others
    come and go (its later events would go astray). Past `_MAX_ROUTES` routes, the key
    whose loops ended longest ago is forgotten first: a late sub-agent of a loop that just
    ended still finds its parent's. Loops that never end (their agent killed) are bounded
    too: `release`d with their aborted sessions, and past `_MAX_OPEN_ROUTES` the one running
    longest is forgotten; a loop whose AgentEnd came first holds nothing. O(1) per event;
    `release` costs the loops of the values released."""

    def __init__(self) -> None:
        self._values: dict[str, str] = {}
        self.get = self._values.get  # looked up for every event: the dict's own method
        self._loops: OrderedDict[str, str] = OrderedDict()  # loop running -> its key, the oldest first
        self._running: dict[str, int] = {}  # key -> how many of its loops run
        # Value -> its loops running: what `release` ends, without a scan of all. A lone loop
        # (most often: a loop id naming no session is its own key) is held without a dict.
        self._loops_to: dict[str, str | dict[str, None]] = {}
        # The keys of no loop running, the one ended longest ago first.
        self._ended: OrderedDict[str, None] = OrderedDict()
        # Loops whose end came before their start: that start must not hold the route.
        self._ended_early: OrderedDict[str, None] = OrderedDict()
        self._warned = False

    def opened(self, key: str, value: str, loop_id: str) -> None:
        """``key`` routes to `value`, in use while its loop `loop_id` runs."""
        routed = self._values.get(key)
        if routed is not None and routed != value and key in self._running:
            self._move_loops(key, routed, value)
        self._values[key] = value
        if loop_id in self._ended_early:
            del self._ended_early[loop_id]
            if key not in self._running:
                self._retire(key)
            return
        previous = self._loops.get(loop_id)
        if previous == key:
            return
        if previous is not None:  # started again in another session: the old key is not its any more
            self._end(loop_id)
        self._loops[loop_id] = key
        self._index(value, loop_id)
        running = self._running.get(key, 0)
        self._running[key] = running + 1
        if not running:
            self._ended.pop(key, None)
        if len(self._loops) > _MAX_OPEN_ROUTES:
            if not self._warned:
                self._warned = True
                logger.warning(
                    "over %d loops of sessions their ids do not name run (never ended: their agents"
                    " killed?); the longest running are forgotten, later events of one go to the"
                    " session its id names",
                    _MAX_OPEN_ROUTES,
                )
            self._end(next(iter(self._loops)))  # the longest running: its agent was killed, most likely
        self._forget_ended()

    def ended(self, key: str, loop_id: str) -> None:
        """Loop `loop_id` of ``key`` ended: once none of its loops runs, the route may be forgotten."""
        if self._loops.get(loop_id) != key:  # not started yet (or forgotten): its start may come
            self._ended_early[loop_id] = None
            if len(self._ended_early) > _MAX_ENDED_EARLY:
                self._ended_early.popitem(last=False)
            return
        self._end(loop_id)

    def release(self, values: Collection[str]) -> None:
        """The loops routed to one of `values` will not end (their sessions were aborted):
        their routes are forgotten as ended ones are."""
        for value in values:
            for loop_id in self._loops_of(value):
                self._end(loop_id)

    def _loops_of(self, value: str) -> list[str]:
        loops = self._loops_to.get(value)
        return [] if loops is None else [loops] if isinstance(loops, str) else list(loops)

    def _index(self, value: str, loop_id: str) -> None:
        loops = self._loops_to.get(value)
        if loops is None:
            self._loops_to[value] = loop_id
        elif isinstance(loops, str):
            self._loops_to[value] = {loops: None, loop_id: None}
        else:
            loops[loop_id] = None

    def _unindex(self, value: str, loop_id: str) -> None:
        loops = self._loops_to[value]
        if isinstance(loops, str):
            del self._loops_to[value]
        else:
            del loops[loop_id]
            if not loops:
                del self._loops_to[value]

    def _move_loops(self, key: str, routed: str, value: str) -> None:
        """``key``, its loops running, now routes to `value`, not `routed`: they are released with it."""
        for loop_id in self._loops_of(routed):
            if self._loops[loop_id] == key:
                self._unindex(routed, loop_id)
                self._index(value, loop_id)

    def _end(self, loop_id: str) -> None:
        """Loop `loop_id` no longer runs: once none of its key's does, that route is retired."""
        key = self._loops.pop(loop_id)
        self._unindex(self._values[key], loop_id)
        running = self._running.pop(key) - 1
        if running:
            self._running[key] = running
        else:
            self._retire(key)

    def _retire(self, key: str) -> None:
        """``key``'s loops ended just now: its route is the last ended one to be forgotten."""
        self._ended[key] = None
        self._ended.move_to_end(key)
        self._forget_ended()

    def _forget_ended(self) -> None:
        while len(self._values) > _MAX_ROUTES and self._ended:
            del self._values[self._ended.popitem(last=False)[0]]


class Piece(NamedTuple):
    """A message that is a piece of an event (`publications`): its `number` of `total`."""

    event_id: str
    number: int
    total: int


def publications(event_id: str, session: str, payload: bytes, limit: int) -> list[Publication] | None:
    """What an event is published as: one message, or, over `limit` bytes with its headers
    (the server's max_payload), pieces under it (`PIECE_HEADER`); None if even a piece's
    headers leave no room for its payload."""
    whole = {EVENT_ID_HEADER: event_id, SESSION_HEADER: session}
    size = len(payload)
    if _headers_size(whole) + size <= limit:
        return [(payload, whole)]
    # No index or count is wider than the payload's length.
    room = limit - _headers_size(_piece_headers(event_id, session, size, size))
    if room < 1:
        return None
    count = -(-size // room)
    # Cut by the count alone: a piece's id names it, and a retry cut into as many pieces
    # (under another server's max_payload) must repeat each piece exactly.
    bounds = [size * index // count for index in range(count + 1)]
    return [
        (payload[bounds[index] : bounds[index + 1]], _piece_headers(event_id, session, index, count))
        for index in range(count)
    ]


def _piece_headers(event_id: str, session: str, index: int, count: int) -> dict[str, str]:
    return {
        EVENT_ID_HEADER: f"{event_id}/{index}/{count}",
        SESSION_HEADER: session,
        PIECE_OF_HEADER: event_id,
        PIECE_HEADER: f"{index}/{count}",
    }


def _headers_size(headers: dict[str, str]) -> int:
    """The bytes `headers` take on the wire: they count against the max_payload."""
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return len(f"NATS/1.0\r\n{lines}\r\n".encode("utf-8", "surrogatepass"))


def read_piece(headers: dict[str, str]) -> Piece | None:
    """The piece a message's `headers` say it is; None for a whole event (or headers that
    say nothing that makes sense: the message is then taken whole)."""
    event_id = headers.get(PIECE_OF_HEADER, "")
    index, _, count = headers.get(PIECE_HEADER, "").partition("/")
    if not (event_id and index.isdecimal() and count.isdecimal()):
        return None
    piece = Piece(event_id, int(index), int(count))
    return piece if piece.number < piece.total <= _MAX_PIECES else None


def partition_of(key: str, partitions: int) -> int:
    """The partition of a session key: stable across processes and machines (CRC-32)."""
    if not (isinstance(key, str) and isinstance(partitions, int) and partitions > 0):
        check_type("key", key, str)
        check_type("partitions", partitions, int)
        raise InvalidArgument(f"partitions must be at least 1, got {partitions}")
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % partitions


def require_nats() -> None:
    """Raise `MissingExtra` naming the extra when nats-py is not installed."""
    try:
        import nats  # noqa: F401
    except ImportError as error:
        raise MissingExtra(
            f"the NATS broker needs nats-py ({error}): pip install 'phi-session[nats]'"
        ) from None


def nats_servers(url: str) -> list[str]:
    """The servers of `url` (``nats://host[:port]``, several separated by commas); else `InvalidArgument`."""
    servers = [part.strip() for part in url.split(",")]
    for server in servers:
        try:
            parts = urlsplit(server) if re.match(r"(nats|tls)://[^/\s]+/?$", server) else None
        except ValueError:  # a malformed IPv6 address
            parts = None
        if parts is None:
            raise InvalidArgument(f"not a NATS server URL: {server!r} (expected nats://HOST[:PORT])")
        try:
            port = parts.port
        except ValueError:  # not a number, or over 65535
            port = 0
        if port == 0:  # nats-py would try it, fail, and the events would wait for it
            raise InvalidArgument(f"not a NATS server URL: {server!r} (its port must be a number 1-65535)")
    return servers


async def connect(url: str, *, name: str, reconnect: bool = True, timeout: float = 2.0) -> Client:
    """A NATS connection to `url` (`nats_servers`); `BrokerError` once every server
    failed to connect (each within `timeout` seconds), saying why the last one did."""
    require_nats()
    servers = nats_servers(url)
    attempts = _FirstAttempts(url, len(servers))
    client = _lenient_client_class()()
    options: dict[str, Any] = {  # (nats-py annotates its seconds as int)
        "connect_timeout": timeout,
        "reconnect_time_wait": 0.5,
    }
    connecting = asyncio.ensure_future(
        client.connect(
            servers=servers,
            name=name,
            allow_reconnect=reconnect,
            max_reconnect_attempts=-1 if reconnect else 0,
            error_cb=attempts.failed,
            **options,
        )
    )
    given_up = asyncio.ensure_future(attempts.every_server_failed.wait())
    try:
        # With endless reconnects, nats-py would retry a first connection forever.
        await asyncio.wait(
            (connecting, given_up), timeout=timeout * (len(servers) + 1), return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        given_up.cancel()
        if not connecting.done():
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connecting
    try:
        connecting.result()
    except (asyncio.CancelledError, Exception) as error:
        why = attempts.last or error  # cancelled: no attempt ended in time
        if isinstance(why, (TimeoutError, asyncio.TimeoutError, asyncio.CancelledError)):
            reason = f"no answer within {timeout:g} s"
        else:
            reason = str(why) or type(why).__name__
        raise BrokerError(f"cannot reach NATS at {url}: {reason}") from error
    attempts.connected = True
    return client


@functools.cache
def _lenient_client_class() -> type[Client]:
    """nats-py's client, reading any header block. nats-py decodes a header status line as
    UTF-8 in its reading task: a message whose one is not (anyone may publish it) ended that
    task for good, and the connection, open to all appearances, heard nothing more."""
    from nats.aio.client import Client

    class LenientClient(Client):
        async def _process_headers(self, headers: bytes) -> dict[str, str] | None:
            try:
                return await super()._process_headers(headers)
            except Exception:  # the same header block, with what it cannot read replaced by '?'
                readable = headers.decode("utf-8", "replace").encode("ascii", "replace")
                with contextlib.suppress(Exception):
                    return await super()._process_headers(readable)
                return None  # a message without headers: still data, named by its stream position

    return LenientClient


async def close_quietly(nc: Client) -> None:
    """Close a NATS connection, also one the broker dropped: closing flushes, which then
    fails (``ConnectionResetError``), and what it held unflushed was never acknowledged,
    so it is published or delivered again anyway."""
    with contextlib.suppress(Exception):
        await nc.close()


class _FirstAttempts:
    """nats-py reports each failed connection attempt (`failed`, its error callback); with
    reconnects allowed it tries its servers again and again: one round says enough. Once
    connected, its errors (the server cutting a slow consumer off, a dropped connection) are
    warned of, one line a minute at most: the client reconnects by itself, but what was in
    flight waits to be delivered again."""

    def __init__(self, url: str, servers: int) -> None:
        self.url = url
        self.left = servers
        self.last: Exception | None = None
        self.every_server_failed = asyncio.Event()
        self.connected = False
        self.unsaid = 0  # errors since the last warning
        self.quiet_until = 0.0  # no warning before this `time.monotonic()`

    async def failed(self, error: Exception) -> None:
        if self.connected:
            self.unsaid += 1
            if time.monotonic() >= self.quiet_until:
                more = (
                    f" ({self.unsaid - 1} more errors since the last such warning)" if self.unsaid > 1 else ""
                )
                logger.warning(
                    "NATS connection to %s failed, reconnecting: %s%s",
                    self.url,
                    str(error) or type(error).__name__,
                    more,
                )
                self.unsaid, self.quiet_until = 0, time.monotonic() + _ERROR_LOG_INTERVAL
            return
        self.last = error
        self.left -= 1
        if self.left <= 0:
            self.every_server_failed.set()


async def ensure_stream(js: JetStreamContext, settings: StreamSettings) -> StreamSettings:
    """Create the stream if missing; return the settings with the stream's partition count.

    A stream that exists with subjects other than ``{prefix}.0..N-1``, or one the server
    refuses to create (its subjects overlap another stream's), raises `BrokerError`.
    """
    from nats.js import api
    from nats.js.errors import BadRequestError

    info = await stream_info(js, settings.stream)
    if info is None:
        config = api.StreamConfig(
            name=settings.stream,
            subjects=settings.subjects(),
            description="phi-session agent events, partitioned by session",
            # Work queue: a message leaves the stream once a worker acknowledged it.
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
            # Full: refuse new messages (producers keep them) rather than drop old ones.
            discard=api.DiscardPolicy.NEW,
            max_age=settings.max_age,
            max_bytes=settings.max_bytes,
            duplicate_window=settings.duplicate_window,
        )
        try:
            info = await js.add_stream(config)
        except BadRequestError as error:
            info = await stream_info(js, settings.stream)  # the other side created it first
            if info is None:  # refused (its subjects overlap another stream's): a configuration error
                raise BrokerError(
                    f"cannot create stream {settings.stream} on subjects {settings.subject_prefix}.*: "
                    f"{error.description or error}"
                ) from None
    return stream_layout(info, settings)


async def stream_info(js: JetStreamContext, stream: str, **options: Any) -> StreamInfo | None:
    """`js.stream_info(stream, **options)`, None if there is no such stream; `BrokerError`
    if the server does not run JetStream."""
    from nats.js.errors import NotFoundError, ServiceUnavailableError

    try:
        return await js.stream_info(stream, **options)
    except NotFoundError:
        return None
    except ServiceUnavailableError:  # what a server started without -js answers
        raise BrokerError("the NATS server does not run JetStream (start nats-server with -js)") from None


def stream_layout(info: StreamInfo, settings: StreamSettings) -> StreamSettings:
    """`settings` with the partition count of the stream `info` describes; `BrokerError`
    if its subjects are not ``{prefix}.0..N-1``."""
    subjects = list(info.config.subjects or ())
    count = len(subjects)
    if count == 0 or subjects != [f"{settings.subject_prefix}.{n}" for n in range(count)]:
        raise BrokerError(
            f"stream {settings.stream} has subjects {subjects}, not "
            f"{settings.subject_prefix}.0 .. {settings.subject_prefix}.N-1: "
            "another stream name or subject prefix is needed"
        )
    return replace(settings, partitions=count)
