"""The viewer's HTTP server: one static page and a read-only JSON API over a store.

Standard library only (`http.server.ThreadingHTTPServer`). Routes, all ``GET``
(``HEAD`` too), everything else 405:

* ``/`` the page; ``/static/app.js``, ``/static/style.css`` its script and styles;
* ``/api/sessions?agent=&since=&until=&status=&model=&min_tokens=&parent=&order=&limit=``
  the matching session summaries (the filters of ``phi-session list``);
* ``/api/sessions/{id}`` the session's phi-core JSON, exactly as stored;
* ``/api/sessions/{id}/events`` its stored events: ``[{"loop_id", "sequence",
  "event"}]``, per loop by sequence, then session-scoped events (``loop_id`` null);
* ``/api/sessions/{id}/cost?offset=&limit=`` the session's cost and that of a page of
  its loops (in session order, default 200, at most 500) and their turns:
  ``{"table", "hint", "session_id", "cost", "total", "offset", "loops": [{"loop_id",
  "cost", "turns": [{"turn_index", "cost"}]}]}`` (`cost.SessionCost`, paged);
* ``/api/stats?by=agent|model|day`` usage totals;
* ``/api/cost?by=agent|model|day|session`` cost totals: ``{"table", "hint", "totals"}``;
  by agent, model or day, the rows of ``/api/stats`` with their ``cost`` (the store's
  priced ``usage_totals``, every loop priced); by session ``[{"key", "cost"}]``, which
  reads every stored session;
* ``/api/diff?a=REF&b=REF`` two runs compared (`phi_session.diff`): a REF is
  ``SESSION:LOOP`` (LOOP a loop id or ``#N``; the text splits at its first colon,
  so a session id holding one names its loop apart with ``loop_a``/``loop_b``) for a
  `LoopDiff`, or ``SESSION`` on both sides for a `SessionDiff` (a text that is, whole,
  a stored session's id names that session, colon or not: `load_ref`); the JSON of
  ``phi-session diff --json``;
* ``/api/search?q=TEXT&limit=N&`` plus the filters of ``/api/sessions`` (but ``limit``,
  which caps the hits, default 50): ``[{"session_id", "agent_id", "loop_id",
  "turn_index", "message_index", "kind", "snippet", "highlights": [[start, end]]}]``
  (`stores.search.SearchHit`; ``highlights`` are character offsets in ``snippet``).

A ``cost`` is ``{"usd": float | null, "sources": [str], "unpriced": [str]}``: ``usd``
null means unknown (a model without a known price, listed in ``unpriced``; never
shown as 0; one whose calls reported only total tokens is also in ``"unsplit": [str]``,
present only then); ``sources`` name the price tables used (``"genai-prices 0.2.3"`` or
``"user"``). ``table`` is the price table in use (null without the ``prices``
extra) and ``hint`` what to install when it is missing (null otherwise).

Paged views, so that the list and a huge session open fast (``web/pages.py``; the
session's outline, `SessionStore.load_outline`, is loaded once and kept a minute, or
until a request finds the session deleted, or a loop it reads no longer as outlined:
saved again since, with more events, another status or end):

* ``/api/session-page?<the filters above>&after=CURSOR`` ``{"sessions": [...],
  "next": CURSOR or null}``: keyset pages (`PageCursor`) of ``limit`` rows (default 50);
* ``/api/sessions/{id}/overview?cost=`` the session without loops, its summary, cost
  (null with ``cost=0``: pricing takes about a millisecond a loop; ``1``, the default,
  prices it, any other value is a 400), first prompt and event count;
* ``/api/sessions/{id}/loops?offset=&limit=`` loops in tree order (with ``depth``),
  without messages, turns and events; ``/api/sessions/{id}/loops/{index}`` one loop
  with its turns (the loop at that index as stored now: its ``loop_id`` says which, another
  than the listed one's if the session was saved anew since);
* ``/api/sessions/{id}/event-log?offset=&limit=&type=&loop=`` a page of the events,
  filtered by type name and/or loop index, with each type's count and ``next``, the next
  page's offset (null after the last): a page ends early once it holds
  `pages.PAGE_BYTES` (4 MiB) of events;
* ``/api/sessions/{id}/field?loop=N&digest=D`` (in loop N), ``?loop=N&event=I&digest=D``
  (in its I-th event in the event log: by sequence, those sharing one as stored),
  ``?event=K&digest=D`` (in the K-th session-scoped event) the whole text of digest D
  that the loop, loop list and event-log views cut: each of those cuts a text over
  `pages.CLIP_BYTES` (64 KiB), a key too (past `pages.VIEW_CHARS` of text, one over
  4 KiB), and lists it as ``{"path", "key", "bytes",
  "field"}`` (its JSON pointer, a key's that of its member, whether it is a key, its size
  and this view's query) under the loop's ``clipped`` key, or its row's (`pages.clip`);
  400 for a bad index or digest, 404 for no such text there;
* ``/api/sessions/{id}/timeline?offset=&limit=`` the waterfall's bars of a page of loops
  in tree order (``offset``/``limit`` count loops: default 20, at most 500; the first
  page starts with the session's bar), the session's loop and turn bars with their
  ``cost``: ``{"loops", "offset", "next", "start", "end", "span_ms", "bars"}``
  (``next``: the next page's offset, null after the last); a sub-agent session the
  page's loops spawned is drawn as its bar and its first loops (`views.SUB_AGENT_LOOPS`,
  the bar's ``detail`` counting the rest), not the sub-agent sessions those loops spawned
  in turn (counted in that ``detail`` too: the sub-agent's own timeline draws them).

Every paged view reads only the loops its page covers (and the first loops of the
sub-agent sessions the timeline's page draws; the last recorded event of a loop that
never ended, aborted or running, ends the time axis: the timeline reads such loops
whose outline was stored without it, `views.outline_span`, once per cached session);
``/api/sessions/{id}`` and
``/api/sessions/{id}/events`` (the whole stored session, for export) and a diff of
two sessions load whole sessions; a diff of two loops reads those two loops alone.

Errors are JSON ``{"error": message}``: 400 for a bad query or session id, 404 for
an unknown path, session or loop, 500 when the store fails. The server never writes.

Safety: it binds 127.0.0.1 by default; while bound to a loopback address (however
``--host`` spelled it) it answers only requests with exactly one well-formed ``Host``
header naming a loopback host or ``--host`` (no userinfo, a numeric port), and a path
or a URL naming such a host as the request target, so a web page on another origin
cannot read sessions through DNS rebinding (`HostGuard`).
Every response, error pages of ``http.server`` itself included, carries the same
security headers. A request whose header section is not plain ``name: value``
fields is refused with 400 (`malformed_head`), its framing being unsure. Session
ids are validated (`validate_session_id`) before they reach the store, so no path
can escape it. A request's line and headers must arrive within a minute
(`ViewerHandler.head_timeout`), and past `ViewerServer.max_connections` open
connections another is answered 503 at once: a client holds no thread for long, nor
any number of them. Every response carries a
Content-Security-Policy that allows no inline script, no framing and no third-party
origin: the page renders all data as text (see ``static/app.js``), and the policy is
the second line of defence.
"""

from __future__ import annotations

import io
import ipaddress
import logging
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import msgspec

from ..codec import encode_event, encode_session
from ..cost import Pricer, cost_totals
from ..diff import LoopDiff, SessionDiff, diff_placed_loops, diff_sessions, load_ref
from ..errors import (
    InvalidArgument,
    InvalidQuery,
    InvalidSessionId,
    LoopNotFound,
    PhiSessionError,
    SessionNotFound,
    StoreError,
)
from ..model import Session
from ..stores.base import SessionStore, to_builtins, validate_session_id
from ..stores.query import MAX_COUNT, SessionQuery, parse_cost_by, parse_group_by
from ..stores.search import DEFAULT_LIMIT
from .pages import CachedSession, FieldNotFound, Page, SessionCache, StaleOutline

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = ["HostGuard", "ViewerServer", "is_loopback", "make_server"]

logger = logging.getLogger(__name__)

_STATIC_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
}
_JSON = "application/json; charset=utf-8"
_PAGED = ("overview", "loops", "event-log", "timeline", "cost", "field")
_MAX_PAGE = 5000  # rows per page of a session's loops or events (from the outline, or a few loops)
_MAX_LOOP_PAGE = 500  # loops per page of the timeline and the cost: each loop is read whole
_DIGEST = re.compile(r"[0-9a-f]{32}")  # a cut text's, in a field query (`pages.clip`)
_LOOPBACK_NAMES = {"localhost", "localhost.", "ip6-localhost"}
_Read = TypeVar("_Read")
_By = TypeVar("_By")


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, IPv6 with or without brackets, IPv4-mapped
    too) is loopback."""
    name = host.strip().strip("[]").lower()
    if name in _LOOPBACK_NAMES:
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    # ::ffff:127.0.0.1 is IPv4's loopback, which Python says only from 3.13 on.
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return (mapped or address).is_loopback


# RFC 9110 Host: ``name[:port]`` or ``[IPv6][:port]``; anything else (userinfo,
# a non-numeric port, spaces) is refused rather than guessed at.
_HOST = re.compile(r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9._-]+))(?::(?P<port>[0-9]{1,5}))?")


def _host_name(header: str) -> str | None:
    """The host part of a ``Host`` header (``[::1]:8000`` -> ``::1``); None if it is malformed."""
    match = _HOST.fullmatch(header.strip())
    if match is None:
        return None
    return match.group("ipv6") or match.group("name")


class HostGuard:
    """Which ``Host`` headers a server answers, by the address it bound (not by the text
    asked for: ``127.1`` or a name of this machine may be loopback too).

    Bound to loopback, it answers only requests with exactly one well-formed ``Host``
    header naming a loopback host or the host it was asked to listen on, so that a web
    page on another origin cannot reach it through DNS rebinding, and whose request
    target is a path or a URL naming such a host too; bound elsewhere, any.
    """

    def __init__(self, host: str, bound: str | bytes | bytearray) -> None:
        address = bound if isinstance(bound, str) else bound.decode()
        self.loopback_only = is_loopback(address)
        self._names = {host.strip().strip("[]").lower()}

    def allows(self, values: list[str], target: str) -> bool:
        """Whether a request whose ``Host`` headers are `values` and whose request target
        is `target` is answered."""
        if not self.loopback_only:
            return True
        if len(values) != 1:
            return False
        hosts = [values[0]]
        if not target.startswith("/"):
            # A URL (absolute form, as sent to a proxy) names the host a server goes by
            # (RFC 9112 3.2.2); anything else here names none, and is refused.
            try:
                hosts.append(urlsplit(target).netloc)
            except ValueError:  # a malformed [IPv6] part
                return False
        return all(self._names_us(host) for host in hosts)

    def _names_us(self, host: str) -> bool:
        name = _host_name(host)
        return name is not None and (is_loopback(name) or name.lower() in self._names)


def target_path(target: str) -> str:
    """The path a request target names, in origin form (``/v1/traces?x``) or absolute form
    (``http://127.0.0.1:4318/v1/traces``, as sent to a proxy, RFC 9112 3.2.2), still
    quoted: the caller splits it first. A target `HostGuard.allows` let through parses."""
    return urlsplit(target).path


CHUNKED = -1  # `body_length` of a chunked body


def body_length(handler: BaseHTTPRequestHandler) -> int | None:
    """The length of the request's body by its framing headers (RFC 9112 6.3): None
    without any, `CHUNKED` for a chunked one. Raises `HttpError`: 400 for Content-Length
    values that differ or are no number, 501 for another transfer coding. A request with
    both headers is chunked. Either way, its connection is closed after the answer: where
    the request ends is unsure (a proxy may have framed it the other way, and the rest
    would be read as another request)."""
    codings = handler.headers.get_all("Transfer-Encoding") or []
    fields = handler.headers.get_all("Content-Length") or []
    lengths = {length.strip() for field in fields for length in field.split(",")}
    if codings and lengths:
        handler.close_connection = True
    if codings:
        coding = ", ".join(codings)
        if coding.strip().lower() == "chunked":
            return CHUNKED
        error = HttpError(HTTPStatus.NOT_IMPLEMENTED, f"unsupported Transfer-Encoding {coding!r}")
    elif not lengths:
        return None
    elif len(lengths) > 1:
        error = HttpError(HTTPStatus.BAD_REQUEST, "Content-Length headers that differ")
    else:
        [length] = lengths
        if length.isascii() and length.isdigit():
            return int(length)
        error = HttpError(HTTPStatus.BAD_REQUEST, f"bad Content-Length {length!r}")
    handler.close_connection = True
    raise error


# RFC 9110 5.1: a field name is a token.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def malformed_head(handler: BaseHTTPRequestHandler) -> str | None:
    """Why the request's header section is no list of ``name: value`` fields, or None.

    ``http.server`` takes a line it cannot read as a field (``Content-Length : 44``,
    whitespace before the colon) for the start of the body, and the fields after it
    for body too: the framing would go unseen and the rest of the request be read as
    another one. RFC 9112 (5.1, 5.2) has a server refuse such a request, and an
    obsolete line folding, with 400 (the ``email`` parser it uses would take a first
    ``From x`` line for a mailbox's envelope line, silently).
    """
    headers = handler.headers
    if headers.defects or headers.get_payload() or headers.get_unixfrom():  # a first "From x" line
        line = str(headers.get_unixfrom() or headers.get_payload()).partition("\n")[0].strip()
        return f"a header line that is no field: {line[:40]!r}" if line else "a header line that is no field"
    for name, value in headers.items():
        if not _TOKEN.fullmatch(name):
            return f"a header field name that is no token: {name[:40]!r}"
        if "\r" in value or "\n" in value:
            return f"a folded header field: {name[:40]!r}"
    return None


class HttpError(Exception):
    """An error response: status and the message of its ``{"error": …}`` body."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class ViewerServer(ThreadingHTTPServer):
    """A threading HTTP server that serves one store read-only, a thread a connection
    up to `max_connections` of them; one more is answered 503 and closed at once."""

    daemon_threads = True  # a hanging client never keeps the process alive
    block_on_close = False
    request_queue_size = 64  # browsers open several connections at once; 5 drops SYNs
    max_connections = 128  # a browser opens about 6: the rest would only hold threads

    def __init__(
        self, store: SessionStore, host: str, port: int, *, quiet: bool = False, pricer: Pricer | None = None
    ) -> None:
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.store = store
        self.pricer = pricer if pricer is not None else Pricer()
        self.quiet = quiet
        self.static = {name: (files(__package__) / "static" / name).read_bytes() for name in _STATIC_TYPES}
        self.sessions = SessionCache(store)
        self._slots = threading.BoundedSemaphore(self.max_connections)
        super().__init__((host.strip("[]"), port), ViewerHandler)
        self.host_guard = HostGuard(host, self.server_address[0])

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            try:
                _Refusal(request, client_address, self)
            except OSError:  # the client gone, or not reading: nothing more to tell it
                pass
            finally:
                self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # its thread releases the slot
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that went away mid-request (a page left, a download cancelled) is no
        # error of ours: no traceback. Anything else is reported as socketserver does.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        """The page's address (the bound port, even when 0 was asked for)."""
        host, port = self.server_address[:2]
        name = host.decode() if isinstance(host, bytes) else str(host)
        return f"http://[{name}]:{port}/" if ":" in name else f"http://{name}:{port}/"


def make_server(
    store: SessionStore,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    quiet: bool = False,
    pricer: Pricer | None = None,
) -> ViewerServer:
    """A bound (not yet serving) viewer; call ``serve_forever()`` on it. Raises ``OSError``.

    `pricer` prices the cost APIs (default: ``genai-prices`` when installed, no user prices).
    """
    return ViewerServer(store, host, port, quiet=quiet, pricer=pricer)


def _json_bytes(value: Any) -> bytes:
    return msgspec.json.encode(value)


def _events_json(session: Session) -> bytes:
    return _json_bytes(
        [
            {
                "loop_id": None if loop is None else loop.loop_id,
                "sequence": sequence,
                "event": msgspec.Raw(encode_event(event)),
            }
            for loop, sequence, event in session.iter_events()
        ]
    )


def _readable_sessions(store: SessionStore) -> Iterator[Session]:
    """Every stored session but those deleted since the listing and those that cannot be
    read (with a logged warning), as the store's own listings and totals skip them."""
    for session_id in store.list_ids():
        try:
            yield store.load(session_id)
        except SessionNotFound:
            continue
        except StoreError as error:
            logger.warning("skipping unreadable session %r: %s", session_id, error)


class _HeadClock(io.RawIOBase):
    """A connection's reads, each waiting at most until the `deadline` of the request head
    being read: the socket's timeout bounds one read only, and a client sending a byte a
    minute would hold its thread for ever. Past the deadline a read raises `TimeoutError`."""

    def __init__(self, connection: socket.socket, raw: io.BufferedIOBase, timeout: float) -> None:
        super().__init__()
        self._connection, self._raw, self._timeout = connection, raw, timeout
        self.deadline = float("inf")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request head took too long")
        self._connection.settimeout(min(left, self._timeout))
        try:
            return self._raw.readinto(buffer)
        finally:  # writes keep the socket's own timeout
            self._connection.settimeout(self._timeout)

    def close(self) -> None:
        self._raw.close()
        super().close()


class ViewerHandler(BaseHTTPRequestHandler):
    """Routes one request; see the module docstring for the API."""

    server: ViewerServer
    server_version = "phi-session-viewer"
    protocol_version = "HTTP/1.1"
    # Seconds a client may stay silent, mid-request or between requests on a kept
    # connection, or stop reading an answer: then its thread is let go.
    timeout = 60.0
    # Seconds a request's line and headers may take to arrive in full, from the end of the
    # answer before (or the connection's start): else a client trickling them, a byte
    # within each timeout, would hold its thread for ever.
    head_timeout = 60.0
    rbufsize = 0  # the socket's raw reads, which setup() times (`_HeadClock`) and buffers
    # Not 0.9: a request too malformed to name its version still gets a status line
    # and the security headers (http.server sends HTTP/0.9 answers bare).
    default_request_version = "HTTP/1.0"

    def setup(self) -> None:
        super().setup()
        self._head_clock = _HeadClock(self.connection, self.rfile, self.timeout)
        self.rfile = io.BufferedReader(self._head_clock)

    def handle_one_request(self) -> None:
        # The body is never read: the deadline past the head bounds no read.
        self._head_clock.deadline = time.monotonic() + self.head_timeout
        super().handle_one_request()

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        problem = malformed_head(self)
        if problem is not None:
            self.send_error(HTTPStatus.BAD_REQUEST, problem)  # which closes the connection
            return False
        return True

    def do_GET(self) -> None:
        self._respond(head=False)

    def do_HEAD(self) -> None:
        self._respond(head=True)

    def _not_allowed(self) -> None:
        self.close_connection = True  # the request body is never read: do not reuse the connection
        self._send(
            HTTPStatus.METHOD_NOT_ALLOWED,
            *self._error_body("the viewer is read-only: use GET"),
            extra={"Allow": "GET, HEAD"},
        )

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    # -- dispatch --------------------------------------------------------------------------

    def _respond(self, *, head: bool) -> None:
        try:
            status, body, content_type = self._route()
        except HttpError as error:
            status, (body, content_type) = error.status, self._error_body(str(error))
        except (SessionNotFound, LoopNotFound) as error:
            status, (body, content_type) = HTTPStatus.NOT_FOUND, self._error_body(str(error))
        except InvalidSessionId as error:
            status, (body, content_type) = HTTPStatus.BAD_REQUEST, self._error_body(str(error))
        except PhiSessionError as error:
            logger.warning("store error on %s: %s", self.path, error)
            status, (body, content_type) = HTTPStatus.INTERNAL_SERVER_ERROR, self._error_body(str(error))
        except Exception:
            logger.exception("viewer failed on %s", self.path)
            status = HTTPStatus.INTERNAL_SERVER_ERROR
            body, content_type = self._error_body("internal error")
        self._send(status, body, content_type, head=head)

    def _route(self) -> tuple[HTTPStatus, bytes, str]:
        self._check_host()
        if body_length(self):  # never read: the next request would be read from it
            self.close_connection = True
        url = urlsplit(self.path)  # `target_path`'s parse, the query too
        # Split before unquoting: an id holding an encoded "/" stays one segment
        # (and is then refused by validate_session_id).
        try:
            parts = [unquote(part, errors="strict") for part in url.path.split("/")[1:]]
        except UnicodeDecodeError:
            raise HttpError(HTTPStatus.BAD_REQUEST, "the path is not valid percent-encoded UTF-8") from None
        query = self._query(url.query)
        if parts in ([""], ["index.html"]):
            return self._static("index.html", query)
        if len(parts) == 2 and parts[0] == "static" and parts[1] in ("app.js", "style.css"):
            return self._static(parts[1], query)
        if parts == ["api", "session-page"]:
            return self._session_page(query)
        if parts[:2] == ["api", "sessions"] and len(parts) >= 4 and parts[3] in _PAGED:
            return self._paged_api(parts[2], parts[3:], query)
        if parts[:2] == ["api", "sessions"]:
            return self._sessions_api(parts[2:], query)
        if parts == ["api", "stats"]:
            self._only(query, {"by"})
            by = self._by(parse_group_by, query)
            totals = self.server.store.usage_totals(by)
            return HTTPStatus.OK, _json_bytes(to_builtins(totals)), _JSON
        if parts == ["api", "cost"]:
            return self._cost_api(query)
        if parts == ["api", "search"]:
            return self._search_api(query)
        if parts == ["api", "diff"]:
            return self._diff_api(query)
        raise HttpError(HTTPStatus.NOT_FOUND, f"no such page or API: {url.path}")

    @contextmanager
    def _named(self, session_id: str) -> Iterator[None]:
        """`SessionNotFound` raised in the block, its message naming `session_id` only (the
        store's also names where it looked, a directory's path or a database: no business
        of a page's; the CLI shows it), the session's cached outline dropped: a session
        found deleted is not served from it (its overview, its loop list) until it expires."""
        try:
            yield
        except SessionNotFound:
            self.server.sessions.forget(session_id)
            raise SessionNotFound(f"no session {session_id!r}") from None

    def _sessions_api(self, rest: list[str], query: dict[str, str]) -> tuple[HTTPStatus, bytes, str]:
        store = self.server.store
        if rest in ([], [""]):
            filters = self._parse(lambda: SessionQuery.from_strings(query))
            return HTTPStatus.OK, _json_bytes(to_builtins(store.query(filters))), _JSON
        self._only(query, set())
        session_id = validate_session_id(rest[0])
        if len(rest) == 1:
            with self._named(session_id):
                return HTTPStatus.OK, encode_session(store.load(session_id), pretty=False), _JSON
        if rest[1:] == ["events"]:
            with self._named(session_id):
                return HTTPStatus.OK, _events_json(store.load(session_id)), _JSON
        raise HttpError(HTTPStatus.NOT_FOUND, f"no such API: {target_path(self.path)}")

    def _session_page(self, query: dict[str, str]) -> tuple[HTTPStatus, bytes, str]:
        # As on the other paged views: a blank limit is the default, and a page of no rows
        # is refused (its next page would be itself).
        sized = {**query, "limit": query.get("limit", "").strip() or "50"}
        filters = self._parse(lambda: SessionQuery.from_strings(sized))
        limit = filters.limit
        if limit == 0:
            raise HttpError(
                HTTPStatus.BAD_REQUEST, f"limit must be a whole number from 1 to {MAX_COUNT}, got '0'"
            )
        # One row more than the page: a next page is offered only when it holds a row.
        rows = self.server.store.query(replace(filters, limit=min(limit + 1, MAX_COUNT)))
        following = filters.next_page(rows[:limit]) if len(rows) > limit else None
        after = None if following is None or following.after is None else str(following.after)
        return HTTPStatus.OK, _json_bytes({"sessions": to_builtins(rows[:limit]), "next": after}), _JSON

    def _paged_api(
        self, session_id: str, rest: list[str], query: dict[str, str]
    ) -> tuple[HTTPStatus, bytes, str]:
        session_id = validate_session_id(session_id)
        return self._from_cache(session_id, lambda entry: self._paged_view(entry, rest, query))

    def _from_cache(self, session_id: str, read: Callable[[CachedSession], _Read]) -> _Read:
        """`read` of the session's cached entry; if the stored session is no longer the one
        the entry describes, once more from the session as it is now; if its loops were saved
        again meanwhile (a running agent saving faster than its outline loads), once more
        with their outlines taken from what that read found."""
        sessions = self.server.sessions
        with self._named(session_id):
            entry = sessions.get(session_id)
            try:
                return read(entry)
            except StaleOutline:
                sessions.forget(session_id, entry)  # not one another request loaded since
            entry = sessions.get(session_id)  # read afresh: loops added since are in it
            try:
                return read(entry)
            except StaleOutline as stale:
                if stale.changed is None:
                    sessions.forget(session_id, entry)
                    raise HttpError(
                        HTTPStatus.CONFLICT, "the session changed while it was read: ask again"
                    ) from None
                entry = sessions.patch(entry, stale.changed)  # no third outline read to race
            try:
                return read(entry)
            except StaleOutline:
                sessions.forget(session_id, entry)
                raise HttpError(
                    HTTPStatus.CONFLICT, "the session changed while it was read: ask again"
                ) from None

    def _paged_view(
        self, entry: CachedSession, rest: list[str], query: dict[str, str]
    ) -> tuple[HTTPStatus, bytes, str]:
        view = rest[0]
        if view == "loops" and len(rest) == 2:
            self._only(query, set())
            index = self._index("loop index", rest[1], len(entry.outline.loops))
            return HTTPStatus.OK, entry.loop(index), _JSON
        if len(rest) != 1:
            raise HttpError(HTTPStatus.NOT_FOUND, f"no such API: {target_path(self.path)}")
        if view == "overview":
            self._only(query, {"cost"})
            # Pricing takes about a millisecond a loop: a huge session's page skips it (cost=0).
            cost_flag = query.get("cost") or "1"
            if cost_flag not in ("0", "1"):
                raise HttpError(
                    HTTPStatus.BAD_REQUEST, f"cost must be 0 (not priced) or 1, got {cost_flag[:40]!r}"
                )
            priced = cost_flag == "1"
            cost = self.server.pricer.outline(entry.outline) if priced else None
            return HTTPStatus.OK, entry.overview(cost), _JSON
        if view == "timeline":
            self._only(query, {"offset", "limit"})
            bars = entry.timeline(self._page(query, 20, _MAX_LOOP_PAGE), self.server.pricer)
            return HTTPStatus.OK, bars, _JSON
        if view == "cost":
            self._only(query, {"offset", "limit"})
            page = self._page(query, 200, _MAX_LOOP_PAGE)
            body = {**self._price_table(), **entry.cost(page, self.server.pricer)}
            return HTTPStatus.OK, _json_bytes(body), _JSON
        if view == "field":
            return HTTPStatus.OK, self._field(entry, query), _JSON
        page = self._page(query)
        if view == "loops":
            self._only(query, {"offset", "limit"})
            return HTTPStatus.OK, entry.loops(page), _JSON
        self._only(query, {"offset", "limit", "type", "loop"})
        loop = query.get("loop") or None
        loop_index = None if loop is None else self._index("loop", loop, len(entry.outline.loops))
        return HTTPStatus.OK, entry.event_log(page, query.get("type") or None, loop_index), _JSON

    def _field(self, entry: CachedSession, query: dict[str, str]) -> bytes:
        """The whole text a loop or event view cut: ``loop=N&digest=D`` in loop N, ``loop=N&
        event=I&digest=D`` in its I-th event in the event log, ``event=K&digest=D`` in the
        K-th session-scoped event (the ``field`` of each cut, `pages.clip`)."""
        self._only(query, {"loop", "event", "digest"})
        digest = query.get("digest", "")
        if not _DIGEST.fullmatch(digest):
            message = f"digest must be 32 lowercase hexadecimal digits (a cut's field), got {digest[:40]!r}"
            raise HttpError(HTTPStatus.BAD_REQUEST, message)
        if "loop" not in query and "event" not in query:
            message = "name a loop (loop=N, with event=I for its I-th event) or a session event (event=K)"
            raise HttpError(HTTPStatus.BAD_REQUEST, message)
        try:
            if "loop" not in query:
                if not entry.scoped_events:  # else "below 0", which says nothing
                    message = "event: this session has no session-scoped events (a loop's: loop=N&event=I)"
                    raise HttpError(HTTPStatus.BAD_REQUEST, message)
                return entry.scoped_text(
                    self._index("event", query["event"], len(entry.scoped_events)), digest
                )
            loop = self._index("loop", query["loop"], len(entry.outline.loops))
            # Bounded by the loop as read (it may have more events than the cached outline counts).
            event = self._index("event", query["event"], MAX_COUNT) if "event" in query else None
            return entry.loop_text(loop, event, digest)
        except FieldNotFound as error:
            raise HttpError(HTTPStatus.NOT_FOUND, str(error)) from None

    def _page(self, query: dict[str, str], default: int = 200, most: int = _MAX_PAGE) -> Page:
        offset, limit = query.get("offset") or "0", query.get("limit") or str(default)
        page = Page(self._index("offset", offset, MAX_COUNT), self._index("limit", limit, most + 1))
        if page.limit == 0:  # its next page would be itself: a client following them never ends
            raise HttpError(HTTPStatus.BAD_REQUEST, f"limit must be a whole number from 1 to {most}, got '0'")
        return page

    @staticmethod
    def _index(name: str, text: str, bound: int) -> int:
        # ASCII digits only: str.isdigit also takes '²' and other scripts' digits, which int()
        # refuses, as it does numbers past 4,300 digits.
        digits = text.lstrip("0") or "0"
        if not text.isascii() or not text.isdigit() or len(digits) > len(str(bound)) or int(digits) >= bound:
            message = f"{name} must be a whole number below {bound}, got {text[:40]!r}"
            raise HttpError(HTTPStatus.BAD_REQUEST, message)
        return int(digits)

    def _price_table(self) -> dict[str, str | None]:
        pricer = self.server.pricer
        return {"table": pricer.table_source, "hint": pricer.hint}

    def _cost_api(self, query: dict[str, str]) -> tuple[HTTPStatus, bytes, str]:
        self._only(query, {"by"})
        by = self._by(parse_cost_by, query)
        store, pricer = self.server.store, self.server.pricer
        totals: Any
        if by == "session":  # priced session by session
            totals = msgspec.to_builtins(cost_totals(_readable_sessions(store), by, pricer))
        else:  # the store's totals, priced: usage and cost per group
            totals = to_builtins(store.usage_totals(by, pricer=pricer))
        body = {**self._price_table(), "totals": totals}
        return HTTPStatus.OK, _json_bytes(body), _JSON

    def _search_api(self, query: dict[str, str]) -> tuple[HTTPStatus, bytes, str]:
        text = query.pop("q", "")
        limit_text = query.pop("limit", "")
        filters = self._parse(lambda: SessionQuery.from_strings(query))
        limit = DEFAULT_LIMIT
        if limit_text.strip():
            limit = self._parse(lambda: SessionQuery.from_strings({"limit": limit_text}).limit)
        hits = self.server.store.search(text, filters, limit)
        return HTTPStatus.OK, _json_bytes(msgspec.to_builtins(hits)), _JSON

    def _diff_api(self, query: dict[str, str]) -> tuple[HTTPStatus, bytes, str]:
        self._only(query, {"a", "b", "loop_a", "loop_b"})
        asked_at = time.monotonic()  # an outline cached before it may lack a loop saved since
        refs = []
        for name in ("a", "b"):
            if not query.get(name):
                raise HttpError(
                    HTTPStatus.BAD_REQUEST, f"missing query parameter {name!r} (SESSION or SESSION:LOOP)"
                )
            try:
                entry, loop = load_ref(query[name], query.get(f"loop_{name}"), self._cached)
            except InvalidArgument as error:
                raise HttpError(HTTPStatus.BAD_REQUEST, f"loop_{name}: {error}") from None
            refs.append((entry.session_id, loop))
        (session_a, loop_a), (session_b, loop_b) = refs
        result: LoopDiff | SessionDiff
        if loop_a is not None and loop_b is not None:  # the two loops alone are read
            result = diff_placed_loops(
                self._from_cache(session_a, lambda entry: entry.placed_loop(loop_a, asked_at)),
                self._from_cache(session_b, lambda entry: entry.placed_loop(loop_b, asked_at)),
            )
        elif loop_a is None and loop_b is None:
            result = diff_sessions(
                self._from_cache(session_a, lambda entry: entry.session),
                self._from_cache(session_b, lambda entry: entry.session),
            )
        else:
            raise HttpError(HTTPStatus.BAD_REQUEST, "name a loop on both sides (SESSION:LOOP) or on neither")
        return HTTPStatus.OK, _json_bytes(result), _JSON

    def _cached(self, session_id: str) -> CachedSession:
        session_id = validate_session_id(session_id)
        with self._named(session_id):
            return self.server.sessions.get(session_id)

    def _static(self, name: str, query: dict[str, str]) -> tuple[HTTPStatus, bytes, str]:
        del query  # cache-busting parameters are harmless
        return HTTPStatus.OK, self.server.static[name], _STATIC_TYPES[name]

    # -- request checks -------------------------------------------------------------------

    def _check_host(self) -> None:
        if not self.server.host_guard.allows(self.headers.get_all("Host") or [], self.path):
            raise HttpError(
                HTTPStatus.FORBIDDEN,
                "this viewer answers only to one loopback Host header (and a path or loopback URL)",
            )

    @staticmethod
    def _query(text: str) -> dict[str, str]:
        try:
            pairs = parse_qs(text, keep_blank_values=True, strict_parsing=bool(text), errors="strict")
        except (ValueError, UnicodeDecodeError) as error:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"malformed query string: {error}") from None
        repeated = sorted(name for name, values in pairs.items() if len(values) > 1)
        if repeated:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"query parameter {repeated[0]!r} given more than once")
        return {name: values[0] for name, values in pairs.items()}

    @staticmethod
    def _only(query: dict[str, str], allowed: set[str]) -> None:
        unknown = sorted(set(query) - allowed)
        if unknown:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"unknown query parameter {unknown[0]!r}")

    @staticmethod
    def _parse(parse: Any) -> Any:
        try:
            return parse()
        except InvalidQuery as error:
            raise HttpError(HTTPStatus.BAD_REQUEST, str(error)) from None

    @staticmethod
    def _by(parse: Callable[[str], _By], query: dict[str, str]) -> _By:
        """The ``by`` parameter (``agent`` if none), named so in its error (the library's is
        ``group_by``)."""
        try:
            return parse(query.get("by") or "agent")
        except InvalidQuery as error:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"by: {error.reason}") from None

    # -- responses --------------------------------------------------------------------------

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (501, 400, 414, 431…) as JSON with the security headers."""
        del explain  # the message says it; the HTML page it would go into is not sent
        try:
            status = HTTPStatus(code)
        except ValueError:
            status = HTTPStatus.INTERNAL_SERVER_ERROR
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True  # the request may not have been read in full
        body, content_type = self._error_body(message or status.phrase)
        self._send(status, body, content_type, head=self.command == "HEAD")

    @staticmethod
    def _error_body(message: str) -> tuple[bytes, str]:
        return _json_bytes({"error": message}), _JSON

    def _send(
        self,
        status: HTTPStatus,
        body: bytes,
        content_type: str,
        *,
        head: bool = False,
        extra: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        headers = {**_SECURITY_HEADERS, **(extra or {})}
        if self.close_connection:  # say so: the client must not send another request on it
            headers["Connection"] = "close"
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.quiet:
            return
        # The request line is client data: keep control characters off the terminal.
        text = (format % args).translate({c: f"\\x{c:02x}" for c in range(0x20)} | {0x7F: "\\x7f"})
        sys.stderr.write(f"{self.address_string()} - [{self.log_date_time_string()}] {text}\n")


class _Refusal(ViewerHandler):
    """The answer to a connection past the server's `max_connections`, from the accepting
    thread and without reading the request: 503, with what any answer carries."""

    timeout = 0.0  # never waits: an answer the socket's buffer does not take is not sent

    def handle(self) -> None:
        self.command, self.request_version, self.requestline = "GET", self.protocol_version, ""
        self.close_connection = True
        body, content_type = self._error_body("too many connections: ask again")
        self._send(HTTPStatus.SERVICE_UNAVAILABLE, body, content_type, extra={"Retry-After": "1"})
        try:  # what the client sent, so that closing does not reset the answer away
            self.connection.recv(65536)
        except OSError:
            pass
