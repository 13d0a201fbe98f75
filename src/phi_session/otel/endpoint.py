"""A local OTLP/HTTP trace receiver: ``POST /v1/traces`` -> sessions in a store.

Protobuf and JSON payloads, gzip or not, sized or chunked. What it acknowledges survives
a crash: the decoded spans are written to a spool file and fsynced before the 200 answer,
and a spool file is removed only once every trace it holds is recorded and those events
are fsynced in the journal (`Journal`), whose own recovery saves what the recorder held.
A restart replays what the spool still holds (a trace recorded twice is merged by the
store).

Answers follow the OTLP/HTTP specification: 200 with a partial success naming the spans
rejected (invalid ids), 400 for an unreadable payload (or Content-Length values that
differ; a chunked body that has one too is read, and its connection closed), 413 for a
body over the limit (compressed or not: a gzip bomb stops at the limit) or more spans
(or bytes of spans) than may ever wait, 415 for another content type, 429 (too many
spans, or bytes of spans, waiting for their roots, counted after the payload's roots free
theirs) and 503 (the store is behind, or too many payloads are being read at once) with
``Retry-After``, 403 for a ``Host`` (or a URL as the request target) naming
neither loopback nor the host listened on while bound to loopback (as the viewer).
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
import zlib
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import msgspec

from .._checks import check_type
from ..errors import Backpressure, InvalidArgument, OtlpDecodeError, OtlpRefused, PhiSessionError
from ..journal import Journal
from ..journal.format import fsync_directory
from ..persist import DEFAULT_MAX_PENDING_BYTES, AutoPersistingRecorder
from ..recorder import SessionRecorderConfig
from ..stores.base import SessionStore
from ..web.server import CHUNKED, HostGuard, HttpError, body_length, target_path
from .ingest import DEFAULT_MAX_BUFFERED_BYTES, IngestResult, SpanIngestor, span_bytes
from .spans import MEDIA_JSON, MEDIA_PROTOBUF, MEDIA_PROTOBUFS, SpanData, read_otlp

__all__ = ["Backpressure", "OtlpEndpoint", "OtlpServer", "make_otlp_server"]

logger = logging.getLogger("phi_session.otel.endpoint")

DEFAULT_PORT = 4318
TRACES_PATH = "/v1/traces"
_SPOOL_KINDS = {b"J": MEDIA_JSON, b"P": MEDIA_PROTOBUF}  # a spool file: this byte, then the payload
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
_MAX_CHUNK_LINE = 4096  # a chunk-size line or a trailer field
_GZIP_PIECE = 64 * 1024  # gzip input inflated at a time
_MAX_GZIP_MEMBERS = 1024  # a client's gzip writes one; a body of thousands is an attack
_STORE_PAUSE = 5  # seconds payloads are refused after the store failed a session (Retry-After)
_DECODE_WAIT = 1.0  # seconds a payload waits for its turn to be decoded before a 503


class _Spool:
    """Accepted spans on disk until they are recorded and journaled (one fsynced file per payload)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._files: dict[Path, frozenset[int]] = {}  # file -> trace ids it holds
        # A write a crash cut short, never acknowledged. The caller holds the journal's lock,
        # so no other endpoint is writing here.
        for path in self._numbered(".tmp"):
            path.unlink(missing_ok=True)
        numbers = [int(p.stem) for p in self._numbered(".spans")]
        self._next = itertools.count(max(numbers, default=-1) + 1)

    def _numbered(self, suffix: str) -> list[Path]:
        """The spool's own files ending in `suffix` (``<number><suffix>``), in no order."""
        return [p for p in self.directory.glob(f"*{suffix}") if p.stem.isdigit()]

    def leftovers(self) -> list[list[SpanData]]:
        """What an earlier run accepted and may not have recorded, oldest first."""
        out = []
        for path in sorted(self._numbered(".spans"), key=lambda p: int(p.stem)):
            try:
                data = path.read_bytes()
                spans = read_otlp(data[1:], _SPOOL_KINDS[data[:1]]).spans
            except (OSError, KeyError, OtlpDecodeError) as error:  # only a torn write, never acknowledged
                logger.warning("spool file %s unreadable (%s): skipped", path, error)
                continue
            self.track(path, spans)
            out.append(spans)
        return out

    def write(self, body: bytes, media: str) -> Path:
        """Spool one payload, fsynced; `track` it once its spans wait (`release` skips it till then)."""
        path = self.directory / f"{next(self._next)}.spans"
        temporary = path.with_suffix(".tmp")
        with open(temporary, "wb") as handle:
            handle.write(b"J" if media == MEDIA_JSON else b"P")
            handle.write(body)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        fsync_directory(self.directory)
        return path

    def track(self, path: Path, spans: list[SpanData]) -> None:
        with self._lock:
            self._files[path] = frozenset(span.trace_id for span in spans)

    def release(self, ingestor: SpanIngestor, journal: Journal | None) -> int:
        """Remove the files whose traces are all recorded, once the journal holds them."""
        with self._lock:
            done = [path for path, traces in self._files.items() if not ingestor.waiting(traces)]
            if not done:
                return 0
            if journal is not None:
                journal.sync()
            for path in done:
                path.unlink(missing_ok=True)
                del self._files[path]
            return len(done)


# Our own export's spans carry every event its recorder kept, deltas only if it kept them
# (other producers' spans hold none), so keeping deltas adds nothing that was not sent.
# Turn requests are not copied into their turns: which turns had them copied is not
# sent, and copying all would grow a default (capture off) session with the square of
# its length; each request stays whole in its TurnRequest event.
_KEEP_SENT = SessionRecorderConfig(include_streaming_events=True)


class OtlpEndpoint:
    """Turns OTLP payloads into sessions saved in `store`, durably (see the module doc).

    `state_dir` holds the journal and the spool. `config` is the recorder's; by default
    it keeps streaming deltas, which only phi-session's own export (with content)
    carries. At most `max_decoding` payloads are read at once (each takes about 100 times
    its bytes in memory); another waits a second, then is answered 503. Spans waiting for
    their traces' roots are bounded by `max_buffered_spans` and `max_buffered_bytes`
    (`SpanIngestor`): a payload that would pass either is answered 429, one that never fits
    413. Call `close` to record what waits and save everything.
    """

    def __init__(
        self,
        store: SessionStore,
        state_dir: str | os.PathLike[str],
        *,
        config: SessionRecorderConfig | None = None,
        trace_timeout: float = 60.0,
        max_buffered_spans: int = 200_000,
        max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        max_decoding: int = 2,
        tick: float = 1.0,
    ) -> None:
        check_type("max_decoding", max_decoding, int)
        if max_decoding < 1:
            raise InvalidArgument(f"max_decoding must be at least 1, got {max_decoding}")
        state = Path(state_dir)
        self.saver = AutoPersistingRecorder(
            store,
            journal=state / "journal",
            config=_KEEP_SENT if config is None else config,
            max_pending_bytes=max_pending_bytes,
        )
        self.ingestor = SpanIngestor(
            self.saver,
            trace_timeout=trace_timeout,
            max_buffered_spans=max_buffered_spans,
            max_buffered_bytes=max_buffered_bytes,
            store=store,
        )
        self.spool = _Spool(state / "spool")
        self._accept_lock = threading.Lock()
        # A payload being read holds about 100 times its bytes until it is spooled and added:
        # unbounded, ten 16 MiB ones at once took gigabytes.
        self._decoding = threading.BoundedSemaphore(max_decoding)
        self._failed, self._failed_at = 0, float("-inf")  # sessions the store failed, when that grew
        for spans in self.spool.leftovers():
            self.ingestor.add(spans)
        self._stop = threading.Event()
        self._ticker = threading.Thread(
            target=self._tick, args=(tick,), name="phi-session otlp ticker", daemon=True
        )
        self._ticker.start()

    def _tick(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.ingestor.expire()
                self.spool.release(self.ingestor, self.saver.journal)
            except Exception:  # keep ticking: the next request reports a failing store
                logger.exception("OTLP endpoint housekeeping failed")

    def accept(self, body: bytes, content_type: str) -> IngestResult:
        """Decode, spool (fsynced), then record one payload. Raises `OtlpDecodeError`, `OtlpRefused`
        (`Backpressure` when it may fit later)."""
        media = content_type.split(";", 1)[0].strip().lower()
        if not self._decoding.acquire(timeout=_DECODE_WAIT):
            raise Backpressure(HTTPStatus.SERVICE_UNAVAILABLE, "too many payloads at once; retry later", 1)
        try:
            read = read_otlp(body, media, max_spans=self.ingestor.max_buffered_spans)
            spans = read.spans
            self._check_room(spans)
        finally:
            # Not held through the spooling and the add, which wait for each other and for the
            # store: every other payload would be answered 503 meanwhile, and exporters that
            # retry a few times drop their batches.
            self._decoding.release()
        with self._accept_lock:  # spool order is arrival order
            if spans:
                path = self.spool.write(body, media)
                self.ingestor.add(spans)
                # Tracked only now: a release before the add saw its traces not waiting yet and
                # removed the file. Untracked (the add failed), it stays until a restart replays it.
                self.spool.track(path, spans)
        self.spool.release(self.ingestor, self.saver.journal)
        return IngestResult(accepted=len(spans), rejected=read.skipped, message=read.message)

    def _check_room(self, spans: list[SpanData]) -> None:
        ingestor = self.ingestor
        # What the payload leaves waiting, less what it frees: the traces it completes (a root,
        # a root under a remote parent no caller waits for, a span under one recorded) are
        # recorded at once, what of them waited too; so a root of a waiting trace is let in
        # (refused, the trace's spans were recorded apart once timed out).
        rooted = ingestor.recorded_at_once(spans)
        waiting = [span for span in spans if span.trace_id not in rooted]
        size = sum(map(span_bytes, waiting))
        if size > ingestor.max_buffered_bytes:  # never fits: a 429 would have the client retry it forever
            raise OtlpRefused(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the spans of this payload waiting for their roots hold {size} bytes; at most "
                f"{ingestor.max_buffered_bytes} may wait here: send smaller batches",
            )
        # (more spans than may wait at all, read_otlp refused)
        freed_spans, freed_bytes = ingestor.waiting_spans(rooted)
        if waiting and (
            ingestor.buffered_spans - freed_spans + len(waiting) > ingestor.max_buffered_spans
            or ingestor.buffered_bytes - freed_bytes + size > ingestor.max_buffered_bytes
        ):
            raise Backpressure(
                HTTPStatus.TOO_MANY_REQUESTS,
                f"{ingestor.buffered_spans} spans of {ingestor.buffered_bytes} bytes are waiting "
                "for their traces' roots",
                1,
            )
        stats = self.saver.stats()
        failed, now = int(stats["sessions_failed"]), time.monotonic()
        if failed > self._failed:
            self._failed_at = now
        self._failed = failed
        # Failed sessions stay failed (kept, retried at close): only a new failure is the store
        # failing now; after the pause, a payload tries it again.
        if stats["bytes_queued"] >= self.saver.max_pending_bytes or now - self._failed_at < _STORE_PAUSE:
            raise Backpressure(
                HTTPStatus.SERVICE_UNAVAILABLE,
                "the store is behind or failing; sessions are kept, retry later",
                _STORE_PAUSE,
            )

    def close(self) -> None:
        """Record every waiting trace, save every session, then empty the spool."""
        self._stop.set()
        self._ticker.join()
        self.ingestor.flush()
        self.saver.close()
        self.spool.release(self.ingestor, None)  # all saved: nothing is left to journal


def _status_protobuf(code: int, message: str) -> bytes:
    """A google.rpc.Status message (code = 1, message = 2), encoded by hand."""
    text = message.encode()
    return b"\x08" + _varint(code) + b"\x12" + _varint(len(text)) + text


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


class OtlpServer(ThreadingHTTPServer):
    """The HTTP side of an `OtlpEndpoint`."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 64

    def __init__(
        self, endpoint: OtlpEndpoint, host: str, port: int, *, max_body: int = 16 << 20, quiet: bool = False
    ) -> None:
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.endpoint = endpoint
        self.max_body = max_body
        self.quiet = quiet
        super().__init__((host.strip("[]"), port), OtlpHandler)
        self.host_guard = HostGuard(host, self.server_address[0])

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        name = host.decode() if isinstance(host, bytes) else str(host)
        return f"http://[{name}]:{port}{TRACES_PATH}" if ":" in name else f"http://{name}:{port}{TRACES_PATH}"


def make_otlp_server(
    endpoint: OtlpEndpoint, host: str = "127.0.0.1", port: int = DEFAULT_PORT, **options: Any
) -> OtlpServer:
    """A bound (not yet serving) OTLP receiver; call ``serve_forever()`` on it. Raises ``OSError``."""
    return OtlpServer(endpoint, host, port, **options)


class OtlpHandler(BaseHTTPRequestHandler):
    server: OtlpServer
    server_version = "phi-session-otlp"
    protocol_version = "HTTP/1.1"
    # Seconds a client may stay silent (exporters give up after 10): a stalled one frees its thread.
    timeout = 30.0

    def do_POST(self) -> None:
        media = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        reply = media if media in MEDIA_PROTOBUFS else MEDIA_JSON  # OTLP/HTTP answers in the request's type
        try:
            body, content_type = self._read()
            result = self.server.endpoint.accept(body, content_type)
        except OtlpRefused as refused:  # Backpressure too, its Retry-After in the headers
            self._error(refused.status, str(refused), reply, refused.headers)
            return
        except OtlpDecodeError as error:
            self._error(HTTPStatus.BAD_REQUEST, str(error), reply)
            return
        except (PhiSessionError, OSError) as error:  # the store, the journal or the spool failed: retryable
            logger.error("OTLP payload not recorded: %s", error)
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, f"not recorded: {error}", reply, {"Retry-After": "5"})
            return
        except Exception:
            logger.exception("OTLP payload not recorded")
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error", reply)
            return
        self._ok(result, reply)

    def do_GET(self) -> None:
        self._refuse_method()

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_GET

    def _refuse_method(self) -> None:
        self._error(HTTPStatus.METHOD_NOT_ALLOWED, "only POST /v1/traces", MEDIA_JSON, {"Allow": "POST"})

    def _read(self) -> tuple[bytes, str]:
        if not self.server.host_guard.allows(self.headers.get_all("Host") or [], self.path):
            raise OtlpRefused(
                HTTPStatus.FORBIDDEN,
                "this endpoint answers only to one loopback Host header (and a path or loopback URL)",
            )
        if target_path(self.path) != TRACES_PATH:
            raise OtlpRefused(HTTPStatus.NOT_FOUND, f"no such path; traces go to {TRACES_PATH}")
        content_type = self.headers.get("Content-Type", "")
        if content_type.split(";", 1)[0].strip().lower() not in (*MEDIA_PROTOBUFS, MEDIA_JSON):
            raise OtlpRefused(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                f"Content-Type must be {', '.join(MEDIA_PROTOBUFS)} or {MEDIA_JSON}",
            )
        limit = self.server.max_body
        try:
            length = body_length(self)
        except HttpError as error:
            raise OtlpRefused(error.status, str(error)) from None
        if length is None:
            raise OtlpRefused(HTTPStatus.LENGTH_REQUIRED, "a Content-Length is required")
        try:
            body = self._read_chunked(limit) if length == CHUNKED else self._read_sized(length, limit)
        except TimeoutError:
            raise OtlpRefused(HTTPStatus.REQUEST_TIMEOUT, "the body stopped coming") from None
        encoding = self.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding == "gzip":
            body = self._gunzip(body, limit)
        elif encoding not in ("", "identity"):
            raise OtlpRefused(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"unsupported Content-Encoding {encoding!r}")
        return body, content_type

    def _read_sized(self, length: int, limit: int) -> bytes:
        if length > limit:
            raise OtlpRefused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {limit} bytes")
        body = self.rfile.read(length)
        if len(body) != length:
            raise OtlpRefused(HTTPStatus.BAD_REQUEST, "body shorter than its Content-Length")
        return body

    def _read_chunked(self, limit: int) -> bytes:
        """A chunked body (what Node's OTLP exporters send), refused past `limit` bytes."""
        body = bytearray()
        while True:
            size_text = self._chunk_line().split(b";", 1)[0].strip()  # a chunk extension is ignored
            if not size_text or not _HEX_DIGITS.issuperset(size_text):
                raise OtlpRefused(HTTPStatus.BAD_REQUEST, "bad chunk size in a chunked body")
            size = int(size_text, 16)
            if not size:
                break
            if len(body) + size > limit:
                raise OtlpRefused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {limit} bytes")
            chunk = self.rfile.read(size)
            if len(chunk) != size or self._chunk_line().strip():
                raise OtlpRefused(HTTPStatus.BAD_REQUEST, "truncated chunked body")
            body += chunk
        while self._chunk_line().strip():  # trailer fields, unused
            pass
        return bytes(body)

    def _chunk_line(self) -> bytes:
        line = self.rfile.readline(_MAX_CHUNK_LINE + 1)
        if not line.endswith(b"\n") or len(line) > _MAX_CHUNK_LINE:
            raise OtlpRefused(HTTPStatus.BAD_REQUEST, "truncated chunked body")
        return line

    @staticmethod
    def _gunzip(data: bytes, limit: int) -> bytes:
        out = bytearray()
        body = memoryview(data)
        at = 0
        for _ in range(_MAX_GZIP_MEMBERS):  # member after member, as gzip reads them
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            while not inflater.eof and at < len(body):
                # In pieces: what a member leaves unread is copied, so that copy stays small.
                piece = body[at : at + _GZIP_PIECE]
                try:  # never more than the limit: a bomb stops here
                    out += inflater.decompress(piece, limit + 1 - len(out))
                except zlib.error as error:
                    raise OtlpRefused(HTTPStatus.BAD_REQUEST, f"bad gzip body: {error}") from None
                if len(out) > limit:
                    raise OtlpRefused(
                        HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body inflates to over {limit} bytes"
                    )
                at += len(piece) - len(inflater.unused_data)
            if not inflater.eof:
                raise OtlpRefused(HTTPStatus.BAD_REQUEST, "truncated gzip body")
            if at == len(body):
                return bytes(out)
        raise OtlpRefused(HTTPStatus.BAD_REQUEST, f"gzip body of over {_MAX_GZIP_MEMBERS} members")

    def _ok(self, result: IngestResult, reply: str) -> None:
        if reply == MEDIA_JSON:
            partial = (
                {"partialSuccess": {"rejectedSpans": str(result.rejected), "errorMessage": result.message}}
                if result.message
                else {}
            )
            self._send(HTTPStatus.OK, msgspec.json.encode(partial), MEDIA_JSON)
            return
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

        response = ExportTraceServiceResponse()
        if result.message:  # also a warning for what was accepted altered (rejected_spans 0)
            response.partial_success.rejected_spans = result.rejected
            response.partial_success.error_message = result.message
        self._send(HTTPStatus.OK, response.SerializeToString(), reply)

    def _error(
        self, status: HTTPStatus, message: str, reply: str, headers: dict[str, str] | None = None
    ) -> None:
        # google.rpc codes: INVALID_ARGUMENT, UNAVAILABLE (retryable), FAILED_PRECONDITION
        retryable = status >= 500 or status is HTTPStatus.TOO_MANY_REQUESTS
        code = 3 if status == HTTPStatus.BAD_REQUEST else 14 if retryable else 9
        if reply == MEDIA_JSON:
            body = msgspec.json.encode({"code": code, "message": message})
        else:
            body = _status_protobuf(code, message)
        self.close_connection = True  # the body may not have been read
        self._send(status, body, reply, headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (400 bad request line, 414, 431...) in OTLP's JSON error shape."""
        del explain
        try:
            status = HTTPStatus(code)
        except ValueError:
            status = HTTPStatus.INTERNAL_SERVER_ERROR
        self._error(status, message or status.phrase, MEDIA_JSON)

    def _send(
        self, status: HTTPStatus, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        if self.close_connection:  # said, so that the client sends no other request on it
            headers = {**(headers or {}), "Connection": "close"}
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.quiet:
            logger.info(
                "%s %s",
                self.address_string(),
                (format % args).translate({c: f"\\x{c:02x}" for c in range(0x20)} | {0x7F: "\\x7f"}),
            )
