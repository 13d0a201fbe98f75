"""The local OTLP/HTTP endpoint: real exporters, hostile input, backpressure, SIGKILL after ack."""

from __future__ import annotations

import errno
import gzip
import http.client
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import msgspec
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from msgspec.structs import replace

pytest.importorskip("opentelemetry.sdk.trace", reason="needs the otel extra: pip install 'phi-session[otel]'")
pytest.importorskip("opentelemetry.proto", reason="needs the otlp extra: pip install 'phi-session[otlp]'")
pytest.importorskip(
    "opentelemetry.exporter.otlp.proto.http", reason="needs the otlp extra: pip install 'phi-session[otlp]'"
)

from google.protobuf.json_format import MessageToDict
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags, set_span_in_context

from phi_session import SessionRecorder, Timestamp, encode_event, encode_session
from phi_session.demo import run_demo
from phi_session.errors import InvalidArgument, OtlpDecodeError, OtlpRefused
from phi_session.events import (
    AgentEnd,
    CompactionStarted,
    MessageEnd,
    ParallelLoopEnd,
    ParallelLoopStart,
    PrunApplied,
    TurnEnd,
)
from phi_session.messages import Usage
from phi_session.model import Session
from phi_session.otel import OtelExportSink, SpanIngestor, export_session
from phi_session.otel import attributes as attr
from phi_session.otel import endpoint as endpoint_module
from phi_session.otel import spans as spans_module
from phi_session.otel.endpoint import OtlpEndpoint, OtlpHandler, OtlpServer, make_otlp_server
from phi_session.otel.export import session_spans
from phi_session.otel.spans import spans_from_otlp_json, spans_from_otlp_proto
from phi_session.stores.json_dir import JsonDirStore

from .otel_support import services_calling_a_sub_agent, tool_loop_events, tool_loop_session

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def demo_sessions(tmp_path_factory: pytest.TempPathFactory) -> list[Session]:
    return run_demo(JsonDirStore(tmp_path_factory.mktemp("demo")))


class Receiver:
    def __init__(self, root: Path, **options: object) -> None:
        self.store = JsonDirStore(root / "store")
        self.endpoint = OtlpEndpoint(
            self.store, root / "state", tick=0.05, **{k: v for k, v in options.items() if k != "max_body"}
        )  # type: ignore[arg-type]
        extra = {"max_body": options["max_body"]} if "max_body" in options else {}
        self.server: OtlpServer = make_otlp_server(self.endpoint, port=0, quiet=True, **extra)  # type: ignore[arg-type]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def post(
        self,
        body: bytes,
        content_type: str = "application/x-protobuf",
        headers: dict[str, str] | None = None,
        path: str = "/v1/traces",
    ) -> http.client.HTTPResponse:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        connection.request("POST", path, body=body, headers={"Content-Type": content_type, **(headers or {})})
        response = connection.getresponse()
        response.read_body = response.read()  # type: ignore[attr-defined]
        connection.close()
        return response

    def close(self) -> list[Session]:
        self.server.shutdown()
        self.server.server_close()
        self.endpoint.close()
        return sorted((self.store.load(sid) for sid in self.store.list_ids()), key=lambda s: s.created_at)


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    made = Receiver(tmp_path)
    yield made
    made.server.shutdown()
    made.server.server_close()


def _protobuf(spans: list) -> bytes:
    return encode_spans(spans).SerializeToString()


def _otlp_json(spans: list) -> dict:
    return _otlp_json_of(encode_spans(spans))


def _otlp_json_of(request: object) -> dict:
    """The OTLP/HTTP JSON of an ExportTraceServiceRequest."""
    document = MessageToDict(request)  # type: ignore[arg-type]
    for resource in document["resourceSpans"]:  # OTLP/HTTP JSON spells ids in hex, not base64
        for scope in resource["scopeSpans"]:
            for span in scope["spans"]:
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        span[key] = __import__("base64").b64decode(span[key]).hex()
                for link in span.get("links", []):
                    for key in ("traceId", "spanId"):
                        link[key] = __import__("base64").b64decode(link[key]).hex()
    return document


def _same(got: list[Session], want: list[Session]) -> None:
    # Keyed by id: sessions created within one clock tick have no order to compare by.
    assert {s.session_id: encode_session(s) for s in got} == {s.session_id: encode_session(s) for s in want}
    assert len(got) == len(want)


def test_the_sdk_otlp_exporter_round_trips_every_demo_session(
    demo_sessions: list[Session], tmp_path: Path
) -> None:
    made = Receiver(tmp_path)
    exporter = OTLPSpanExporter(endpoint=f"http://127.0.0.1:{made.port}/v1/traces")
    for session in demo_sessions:
        export_session(session, exporter, capture_content=True)
    exporter.shutdown()
    _same(made.close(), demo_sessions)


def test_json_payloads_and_gzip(demo_sessions: list[Session], tmp_path: Path) -> None:
    made = Receiver(tmp_path)
    for session in demo_sessions:
        body = gzip.compress(json.dumps(_otlp_json(session_spans(session, capture_content=True))).encode())
        response = made.post(body, "application/json", {"Content-Encoding": "gzip"})
        assert response.status == 200 and json.loads(response.read_body) == {}  # type: ignore[attr-defined]
    _same(made.close(), demo_sessions)


def test_invalid_span_ids_are_a_partial_success(demo_sessions: list[Session], receiver: Receiver) -> None:
    document = _otlp_json(session_spans(demo_sessions[0]))
    spans = document["resourceSpans"][0]["scopeSpans"][0]["spans"]
    spans[0]["traceId"] = "00" * 16
    spans[1]["spanId"] = "xyz"
    response = receiver.post(json.dumps(document).encode(), "application/json")
    assert response.status == 200
    assert json.loads(response.read_body)["partialSuccess"]["rejectedSpans"] == "2"  # type: ignore[attr-defined]
    proto = _protobuf(session_spans(demo_sessions[0]))
    response = receiver.post(proto)
    assert response.status == 200
    parsed = ExportTraceServiceResponse.FromString(response.read_body)  # type: ignore[attr-defined]
    assert parsed.partial_success.rejected_spans == 0


def _one_span_json(fields: dict) -> bytes:
    span = {"traceId": "ab" * 16, "spanId": "cd" * 8, "name": "chat m", **fields}
    return json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [span]}]}]}).encode()


@pytest.mark.parametrize(
    "ids",
    [
        {"traceId": "-" + "a" * 31},
        {"traceId": "0x" + "a" * 30},
        {"traceId": " " + "a" * 30 + " "},
        {"spanId": "+" + "c" * 15},
        {"spanId": "c_" + "c" * 14},
        {"parentSpanId": "-" + "1" * 15},
    ],
)
def test_ids_that_are_not_hex_digits_are_rejected(receiver: Receiver, ids: dict[str, str]) -> None:
    response = receiver.post(_one_span_json(ids), "application/json")
    assert response.status == 200
    assert json.loads(response.read_body)["partialSuccess"]["rejectedSpans"] == "1"  # type: ignore[attr-defined]


def test_base64_and_double_values_as_the_json_mapping_spells_them(receiver: Receiver) -> None:
    values = [{"bytesValue": "-_8"}, {"bytesValue": "+/8="}, {"doubleValue": "NaN"}, {"doubleValue": "1.5"}]
    attributes = [{"key": f"k{index}", "value": value} for index, value in enumerate(values)]
    response = receiver.post(_one_span_json({"attributes": attributes}), "application/json")
    assert response.status == 200 and json.loads(response.read_body) == {}  # type: ignore[attr-defined]


def test_negative_int_values_are_int64_not_a_bad_payload(receiver: Receiver) -> None:
    # intValue is an int64: a negative one (an exit code, an offset) is as valid as any.
    values = [{"intValue": "-1"}, {"intValue": -(2**63)}, {"intValue": str(2**63 - 1)}]
    attributes = [{"key": f"k{index}", "value": value} for index, value in enumerate(values)]
    response = receiver.post(_one_span_json({"attributes": attributes}), "application/json")
    assert response.status == 200 and json.loads(response.read_body) == {}  # type: ignore[attr-defined]
    (span,), _ = spans_from_otlp_json(_one_span_json({"attributes": attributes}))
    assert list(span.attributes.values()) == [-1, -(2**63), 2**63 - 1]
    too_big = [{"key": "k", "value": {"intValue": str(2**63)}}]
    assert receiver.post(_one_span_json({"attributes": too_big}), "application/json").status == 400


def test_null_members_are_their_defaults_as_the_json_mapping_says(receiver: Receiver) -> None:
    # The protobuf JSON mapping: null is accepted for every field and means its default
    # (encoding/json in Go, for one, writes an empty slice as null).
    span = {
        "traceId": "ab" * 16,
        "spanId": "cd" * 8,
        "parentSpanId": None,
        "name": "chat m",
        "kind": None,
        "flags": None,
        "startTimeUnixNano": "5",
        "endTimeUnixNano": None,
        "attributes": [
            {"key": "gen_ai.operation.name", "value": {"stringValue": "chat"}},
            {"key": "k", "value": None},
            {"key": "a", "value": {"arrayValue": {"values": None}}},
            {"key": "s", "value": {"stringValue": None}},
        ],
        "events": [{"name": "e", "timeUnixNano": None, "attributes": None}],
        "status": None,
    }
    document = {
        "resourceSpans": [
            {"resource": {"attributes": None}, "scopeSpans": [{"spans": [span]}, {"spans": None}]},
            {"resource": None, "scopeSpans": None},
        ]
    }
    body = json.dumps(document).encode()
    (got,), skipped = spans_from_otlp_json(body)
    assert skipped == 0 and (got.parent_id, got.kind, got.start, got.end, got.events[0].time) == (
        None,
        "UNSPECIFIED",
        5,
        5,
        0,
    )
    assert got.attributes == {"gen_ai.operation.name": "chat", "k": None, "a": (), "s": None}
    assert spans_from_otlp_json(b'{"resourceSpans": null}') == ([], 0)
    response = receiver.post(body, "application/json")
    assert response.status == 200 and json.loads(response.read_body) == {}  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"\xff\xff\xff\xff", "application/x-protobuf"),
        (b"{not json", "application/json"),
        (b'{"resourceSpans": 3}', "application/json"),
        (
            b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "'
            + b"ab" * 16
            + b'", "spanId": "'
            + b"cd" * 8
            + b'", "attributes": [{"key": "k", "value": {"x": 1}}]}]}]}]}',
            "application/json",
        ),
        (
            b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "'
            + b"ab" * 16
            + b'", "spanId": "'
            + b"cd" * 8
            + b'", "startTimeUnixNano": "-5"}]}]}]}',
            "application/json",
        ),
        (b"[" * 100_000 + b"]" * 100_000, "application/json"),
        (_one_span_json({"attributes": [{"key": "k", "value": {"bytesValue": "abc!"}}]}), "application/json"),
        (
            _one_span_json({"attributes": [{"key": "k", "value": {"doubleValue": "high"}}]}),
            "application/json",
        ),
    ],
)
def test_bad_payloads_are_400(receiver: Receiver, body: bytes, content_type: str) -> None:
    response = receiver.post(body, content_type)
    assert response.status == 400
    if content_type == "application/json":
        assert json.loads(response.read_body)["code"] == 3  # type: ignore[attr-defined]


def test_a_loopback_address_not_spelled_127_0_0_1_still_refuses_foreign_host_headers(tmp_path: Path) -> None:
    endpoint = OtlpEndpoint(JsonDirStore(tmp_path / "store"), tmp_path / "state", tick=0.05)
    server = make_otlp_server(endpoint, host="127.1", port=0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:

        def post(host: str) -> int:
            connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
            headers = {"Host": host, "Content-Type": "application/json"}
            connection.request("POST", "/v1/traces", b"{}", headers)
            status = connection.getresponse().status
            connection.close()
            return status

        assert post("evil.example:4318") == 403
        assert post(f"127.1:{server.server_address[1]}") == post("localhost") == 200
    finally:
        server.shutdown()
        server.server_close()
        endpoint.close()


def test_a_loopback_url_in_the_request_line_reaches_the_traces_path(receiver: Receiver) -> None:
    """An absolute-form target naming this loopback server passed the Host check, then
    got 404: the path was compared with the whole URL."""
    url = f"http://127.0.0.1:{receiver.port}/v1/traces"
    for target in (url, url + "?x=1"):
        response = receiver.post(b'{"resourceSpans":[]}', "application/json", path=target)
        assert response.status == 200, response.read_body  # type: ignore[attr-defined]
    elsewhere = receiver.post(b"{}", "application/json", path=f"http://127.0.0.1:{receiver.port}/v1/metrics")
    assert elsewhere.status == 404


def test_refusals(receiver: Receiver) -> None:
    assert receiver.post(b"{}", "text/plain").status == 415
    assert receiver.post(b"{}", "application/json", path="/v1/metrics").status == 404
    assert receiver.post(b"{}", "application/json", {"Host": "evil.example:4318"}).status == 403
    # A full URL in the request line names the host the server must go by (RFC 9112 3.2.2).
    foreign = receiver.post(b"{}", "application/json", {"Host": "127.0.0.1"}, "http://evil.example/v1/traces")
    assert foreign.status == 403
    assert receiver.post(b"{}", "application/json", {"Content-Encoding": "br"}).status == 415
    assert receiver.post(b"\x1f\x8b garbage", "application/json", {"Content-Encoding": "gzip"}).status == 400
    connection = http.client.HTTPConnection("127.0.0.1", receiver.port, timeout=30)
    connection.request("GET", "/v1/traces")
    response = connection.getresponse()
    assert response.status == 405 and response.getheader("Allow") == "POST"
    connection.close()


def test_huge_bodies_and_gzip_bombs_are_413(tmp_path: Path) -> None:
    made = Receiver(tmp_path, max_body=1 << 20)
    try:
        connection = http.client.HTTPConnection("127.0.0.1", made.port, timeout=30)
        connection.putrequest("POST", "/v1/traces")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(2 << 20))
        connection.endheaders()  # refused on the header alone: the body is never read
        assert connection.getresponse().status == 413
        connection.close()
        bomb = gzip.compress(b"\0" * (64 << 20), compresslevel=9)
        assert len(bomb) < (1 << 20)
        response = made.post(bomb, "application/json", {"Content-Encoding": "gzip"})
        assert response.status == 413
    finally:
        made.close()


def test_backpressure_is_429_with_retry_after(demo_sessions: list[Session], tmp_path: Path) -> None:
    made = Receiver(tmp_path, max_buffered_spans=3)
    try:
        children = [span for span in session_spans(demo_sessions[0]) if span.parent is not None]
        assert made.post(_protobuf(children[:3])).status == 200  # waiting for their roots
        response = made.post(_protobuf(children[3:5]))
        assert response.status == 429 and response.getheader("Retry-After") == "1"
    finally:
        made.close()


def test_backpressure_lets_in_the_roots_that_free_the_spans_waiting(tmp_path: Path) -> None:
    """A 429 refused the root that would have freed the spans waiting for it: the client
    retried after its trace timed out, and one run was saved as two loops."""

    def span(trace: int, span_id: int, parent: int | None, operation: str, at: int, took: int = 1) -> dict:
        attributes = [
            {"key": "gen_ai.operation.name", "value": {"stringValue": operation}},
            {"key": "gen_ai.conversation.id", "value": {"stringValue": f"conv{trace}"}},
        ]
        fields = {
            "traceId": f"{trace:032x}",
            "spanId": f"{span_id:016x}",
            "name": f"{operation} m",
            "startTimeUnixNano": str(T0 + at * 10**9),
            "endTimeUnixNano": str(T0 + (at + took) * 10**9),
            "attributes": attributes,
        }
        return fields | ({"parentSpanId": f"{parent:016x}"} if parent is not None else {})

    def post(*spans: dict) -> int:
        document = {"resourceSpans": [{"scopeSpans": [{"spans": list(spans)}]}]}
        return made.post(json.dumps(document).encode(), "application/json").status

    T0 = 1_750_000_000 * 10**9
    made = Receiver(tmp_path, max_buffered_spans=4)
    try:
        # Two agents' model calls, their roots (invoke_agent) still running: the room is full.
        assert post(span(1, 11, 1, "chat", 0), span(1, 12, 1, "chat", 2)) == 200
        assert post(span(2, 21, 2, "chat", 0), span(2, 22, 2, "chat", 2)) == 200
        assert post(span(3, 31, 3, "chat", 0)) == 429  # no room for more to wait
        assert post(span(2, 23, 2, "chat", 4)) == 429
        # The root that frees trace 1, with one more span to wait, and a trace whole (never waits).
        root = span(1, 1, None, "invoke_agent", -1, took=6)
        assert post(root, span(3, 31, 3, "chat", 0), span(4, 4, None, "invoke_agent", 0)) == 200
        assert made.endpoint.ingestor.buffered_spans == 3
    finally:
        made.close()
    [loop] = made.store.load("conv1").loops
    assert (loop.status, len(loop.turns)) == ("Completed", 2)


def _serve(store: Path, state: Path) -> tuple[subprocess.Popen[str], int]:
    code = "from phi_session.cli import main; main()"
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            code,
            "serve",
            "--otlp",
            "--port",
            "0",
            "--otlp-port",
            "0",
            "--json",
            "--store",
            f"{store}/",
            "--otlp-state",
            str(state),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(SRC)},
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line, process.stderr.read() if process.stderr else ""
    port = int(json.loads(line)["otlp_url"].rsplit(":", 1)[1].split("/")[0])
    return process, port


def _post_protobuf(port: int, spans: list) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request(
        "POST", "/v1/traces", body=_protobuf(spans), headers={"Content-Type": "application/x-protobuf"}
    )
    status = connection.getresponse().status
    connection.close()
    return status


def test_nothing_acknowledged_is_lost_to_sigkill(demo_sessions: list[Session], tmp_path: Path) -> None:
    store, state = tmp_path / "store", tmp_path / "state"
    # In the order an SDK ends them, three per request: traces wait for their roots across requests.
    spans = sorted(
        (span for session in demo_sessions for span in session_spans(session, capture_content=True)),
        key=lambda span: span.end_time,
    )
    batches = [spans[index : index + 3] for index in range(0, len(spans), 3)]
    process, port = _serve(store, state)
    try:
        for batch in batches[:-1]:
            assert _post_protobuf(port, batch) == 200
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.communicate(timeout=30)
    assert list((state / "spool").glob("*.spans"))  # the last trace waits for its root: only spooled
    process, port = _serve(store, state)  # recovers the journal, replays the spool
    try:
        assert _post_protobuf(port, batches[-1]) == 200
        process.send_signal(signal.SIGTERM)  # graceful: records and saves everything
        _, errors = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, errors
    saved = JsonDirStore(store)
    _same(sorted((saved.load(sid) for sid in saved.list_ids()), key=lambda s: s.created_at), demo_sessions)
    assert not list((state / "spool").glob("*.spans"))


def test_serve_saves_our_own_export_with_its_deltas_and_no_request_copies(tmp_path: Path) -> None:
    """`serve --otlp` recorded with the default recorder options: the streaming deltas our
    export carries were dropped after the 200. Turn requests stay in their events only:
    a session recorded without copies (the default) comes back byte-identical."""
    from phi_session import decode_session

    from .conftest import GOLDEN

    def golden(case: str) -> Session:
        [path] = (GOLDEN / "recorder" / case / "sessions").glob("*.json")
        return decode_session(path.read_bytes())

    captured, streamed = golden("195-1sess-1loops-capture"), golden("177-1sess-1loops-stream")
    assert any(turn.request_payload for loop in captured.loops for turn in loop.turns)
    assert any(type(stored.event).__name__ == "MessageUpdate" for stored in streamed.loops[0].events)
    assert any(type(stored.event).__name__ == "TurnRequest" for stored in streamed.loops[0].events)
    process, port = _serve(tmp_path / "store", tmp_path / "state")
    try:
        for want in (captured, streamed):
            assert _post_protobuf(port, session_spans(want, capture_content=True)) == 200
        process.send_signal(signal.SIGTERM)
        _, errors = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, errors
    saved = JsonDirStore(tmp_path / "store")
    assert encode_session(saved.load(streamed.session_id)) == encode_session(streamed)
    [loop] = saved.load(captured.session_id).loops
    assert [turn.request_payload for turn in loop.turns] == [None] * len(loop.turns)
    assert [encode_event(stored.event) for stored in loop.events] == [
        encode_event(stored.event) for stored in captured.loops[0].events
    ]


def test_a_retried_payload_is_recorded_once(demo_sessions: list[Session], tmp_path: Path) -> None:
    # An exporter that timed out on a payload we took sends it again: before its trace's
    # root came (the spans wait twice) and after (the trace was recorded).
    made = Receiver(tmp_path)
    for session in demo_sessions:
        spans = session_spans(session, capture_content=True)
        children = [span for span in spans if span.parent is not None]
        for body in (_protobuf(children), _protobuf(children), _protobuf(spans), _protobuf(spans)):
            assert made.post(body).status == 200
    _same(made.close(), demo_sessions)
    assert made.endpoint.ingestor.counters["duplicate_spans"] > 0


def test_a_sub_agent_posted_after_its_caller_was_saved_keeps_the_tool_call_that_spawned_it(
    demo_sessions: list[Session], tmp_path: Path
) -> None:
    # A checkpoint between the caller's payload and its sub-agent's (the saver's periodic
    # one, when the exporter paused): the sub-agent was saved without its tool call.
    made = Receiver(tmp_path)
    for session in demo_sessions:
        assert made.post(_protobuf(session_spans(session, capture_content=True))).status == 200
        made.endpoint.saver.checkpoint()
    _same(made.close(), demo_sessions)


def _post_chunked(port: int, chunks: list[bytes], headers: dict[str, str]) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("POST", "/v1/traces", body=iter(chunks), headers=headers, encode_chunked=True)
    response = connection.getresponse()
    answer = (response.status, response.read())
    connection.close()
    return answer


def test_chunked_bodies_as_nodes_exporters_send_them(demo_sessions: list[Session], tmp_path: Path) -> None:
    # Node's OTLP exporters stream the (gzipped) payload: no Content-Length, chunked.
    made = Receiver(tmp_path, max_body=1 << 20)
    try:
        for session in demo_sessions:
            body = gzip.compress(_protobuf(session_spans(session, capture_content=True)))
            chunks = [body[index : index + 1000] for index in range(0, len(body), 1000)]
            headers = {"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"}
            assert _post_chunked(made.port, chunks, headers)[0] == 200
        for start, status in ((b"%x\r\n" % (2 << 20), 413), (b"zz\r\n{}\r\n0\r\n\r\n", 400)):
            connection = http.client.HTTPConnection("127.0.0.1", made.port, timeout=30)
            connection.putrequest("POST", "/v1/traces")
            connection.putheader("Content-Type", "application/json")
            connection.putheader("Transfer-Encoding", "chunked")
            connection.endheaders(start)  # refused on the chunk size: no more is read
            assert connection.getresponse().status == status
            connection.close()
    finally:
        sessions = made.close()
    _same(sessions, demo_sessions)


def _raw(port: int, data: bytes) -> bytes:
    """Send `data` as is on a new connection; everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
        client.sendall(data)
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    return answer


_SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize(
    ("framing", "body", "status"),
    [
        (b"Content-Length: 2\r\nContent-Length: %d\r\n", b"{}", b"400"),
        (b"Content-Length: 2, %d\r\n", b"{}", b"400"),
        (b"Content-Length: +%d\r\n", b"{}", b"400"),
        (b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n", b"2\r\n{}\r\n0\r\n\r\n", b"200"),
        (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n", b"", b"501"),
    ],
)
def test_a_body_framed_two_ways_never_smuggles_a_request(
    receiver: Receiver, framing: bytes, body: bytes, status: bytes
) -> None:
    """Content-Length values that differ, or with a chunked body, were taken as one framing
    on a kept-alive connection: the rest of the body was answered as another request
    (a desync behind a proxy that framed it the other way). RFC 9112 6.3."""
    head = b"POST /v1/traces HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    framed = framing % (len(body) + len(_SMUGGLED)) if b"%d" in framing else framing
    answer = _raw(receiver.port, head + framed + b"\r\n" + body + _SMUGGLED)
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
    assert answer.count(b"HTTP/1.1 ") == 1 and b"\r\nConnection: close\r\n" in answer


@pytest.mark.parametrize(
    "hostile",
    [
        {"key": "gen_ai.operation.name", "value": {"kvlistValue": {"values": []}}},
        {
            "key": "phi.parallel.loop_ids",
            "value": {"arrayValue": {"values": [{"stringValue": "L"}, {"kvlistValue": {}}]}},
        },
    ],
)
def test_an_attribute_of_an_unexpected_type_is_ignored(receiver: Receiver, hostile: dict) -> None:
    # Any AnyValue may come under any key: a kvlist is no operation name, nor a loop id.
    agent = {"attributes": [{"key": "phi.loop.id", "value": {"stringValue": "L"}}, hostile]}
    response = receiver.post(_one_span_json({"name": "invoke_agent a", **agent}), "application/json")
    assert response.status == 200 and json.loads(response.read_body) == {}  # type: ignore[attr-defined]


def test_every_member_of_a_gzip_body_is_read(demo_sessions: list[Session], tmp_path: Path) -> None:
    # Concatenated gzip members are one gzip stream; concatenated protobuf messages, one message.
    made = Receiver(tmp_path)
    members = b"".join(
        gzip.compress(_protobuf(session_spans(s, capture_content=True))) for s in demo_sessions
    )
    assert made.post(members, headers={"Content-Encoding": "gzip"}).status == 200
    assert made.post(gzip.compress(b"{}") + b"trailing", headers={"Content-Encoding": "gzip"}).status == 400
    _same(made.close(), demo_sessions)


def test_a_failed_save_pauses_the_endpoint_not_stops_it(
    demo_sessions: list[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(endpoint_module, "_STORE_PAUSE", 1, raising=False)
    made = Receiver(tmp_path)
    save, failures = made.store.save, [ValueError("a custom store's bug")]

    def save_once_failing(session: Session) -> None:
        if failures:
            raise failures.pop()
        save(session)

    made.store.save = save_once_failing  # type: ignore[method-assign]
    everything = [span for session in demo_sessions for span in session_spans(session, capture_content=True)]
    assert made.post(_protobuf(everything)).status == 200
    deadline = time.monotonic() + 30
    while not made.endpoint.saver.stats()["sessions_failed"] and time.monotonic() < deadline:
        time.sleep(0.05)
    later = _one_span_json({"name": "invoke_agent a"})  # a trace of its own: one more session
    response = made.post(later, "application/json")
    assert response.status == 503
    time.sleep(int(response.getheader("Retry-After")) + 0.1)
    assert made.post(later, "application/json").status == 200  # the store works again: no more refusals
    sessions = made.close()  # the failed one is saved at close
    assert "ab" * 16 in {session.session_id for session in sessions}
    _same([session for session in sessions if session.session_id != "ab" * 16], demo_sessions)


def test_a_stalled_client_is_let_go(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    assert OtlpHandler.timeout is not None and OtlpHandler.timeout <= 60  # http.server's default: forever
    monkeypatch.setattr(OtlpHandler, "timeout", 0.5)
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=30) as client:
        client.sendall(
            b"POST /v1/traces HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{"  # then nothing: the handler's thread must not wait forever
        )
        answer = client.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408 ")


def test_a_span_under_a_remote_parent_is_recorded_at_once(receiver: Receiver) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    caller = SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    context = set_span_in_context(NonRecordingSpan(caller))
    for _ in range(2):
        with provider.get_tracer("test").start_as_current_span("chat m", context=context):
            pass
    by_proto, by_json = exporter.get_finished_spans()
    assert receiver.post(_protobuf([by_proto])).status == 200
    assert receiver.post(json.dumps(_otlp_json([by_json])).encode(), "application/json").status == 200
    assert receiver.endpoint.ingestor.buffered_spans == 0  # no wait for the caller's span: it never comes


@pytest.mark.parametrize("agent_span", [True, False], ids=["agent", "bare"])
def test_a_conversation_served_to_a_frontend_is_one_session(tmp_path: Path, agent_span: bool) -> None:
    # The usual deployment: a frontend calls the agent's API with a traceparent (each request
    # a trace, its server span under a remote parent), the conversation named on the model
    # calls only (as OpenAI-SDK-style instrumentation does). Each request was a session of its
    # own, its served root's (`<trace id>-<span id>`), one Initial loop in each.
    made = Receiver(tmp_path)
    exporter = OTLPSpanExporter(endpoint=f"http://127.0.0.1:{made.port}/v1/traces")
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter, max_export_batch_size=2))
    tracer = provider.get_tracer("api")
    chat = {attr.OPERATION_NAME: attr.OP_CHAT, attr.REQUEST_MODEL: "m", attr.CONVERSATION_ID: "conv-7"}
    agent = {attr.OPERATION_NAME: attr.OP_INVOKE_AGENT, attr.AGENT_NAME: "bot"}
    for request in range(4):
        frontend = SpanContext(0xC0 + request, 0xF0 + request, is_remote=True, trace_flags=TraceFlags(1))
        served = set_span_in_context(NonRecordingSpan(frontend))
        with (
            tracer.start_as_current_span("POST /chat", context=served, kind=SpanKind.SERVER),
            tracer.start_as_current_span("invoke_agent bot", attributes=agent)
            if agent_span
            else nullcontext(),
        ):
            for call in range(2):
                with tracer.start_as_current_span("chat m", attributes=chat):
                    pass
                tool = {attr.OPERATION_NAME: attr.OP_EXECUTE_TOOL, attr.TOOL_CALL_ID: f"c{request}{call}"}
                with tracer.start_as_current_span("execute_tool f", attributes=tool):
                    pass
    provider.shutdown()  # each payload was taken before its export returned
    [session] = made.close()
    assert (session.session_id, len(session.loops)) == ("conv-7", 4)
    assert [(loop.kind.kind, loop.parent_loop_id, loop.turn_count()) for loop in session.loops] == [
        ("Initial", None, 2),
        *(("Default", previous.loop_id, 2) for previous in session.loops[:3]),
    ]


def test_a_payload_over_the_span_limit_is_413_not_retried_forever(
    demo_sessions: list[Session], tmp_path: Path
) -> None:
    """More spans in one payload than may wait at all: 429 had the exporter retry it forever."""
    made = Receiver(tmp_path, max_buffered_spans=3)
    try:
        spans = session_spans(demo_sessions[0], capture_content=True)
        assert len(spans) > 3
        response = made.post(json.dumps(_otlp_json(spans)).encode(), "application/json")
        assert response.status == 413 and response.getheader("Retry-After") is None
        message = json.loads(response.read_body)["message"]  # type: ignore[attr-defined]
        assert f"{len(spans)} spans" in message and "at most 3" in message
        assert not list((tmp_path / "state" / "spool").glob("*.spans"))  # nothing of it taken
        assert made.post(_protobuf(spans[:3])).status == 200  # a payload that fits still does
    finally:
        made.close()


def test_a_payload_over_the_span_limit_is_refused_before_its_spans_are_built(
    demo_sessions: list[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each span read costs ~100 times its bytes: an over-count payload was read whole, then refused."""
    built = []
    monkeypatch.setattr(spans_module, "SpanData", lambda **fields: built.append(fields))
    made = Receiver(tmp_path, max_buffered_spans=3)
    try:
        spans = session_spans(demo_sessions[0], capture_content=True)
        for body, media in (
            (_protobuf(spans), "application/x-protobuf"),
            (json.dumps(_otlp_json(spans)).encode(), "application/json"),
        ):
            response = made.post(body, media)
            message = response.read_body.decode(errors="replace")  # type: ignore[attr-defined]
            assert response.status == 413 and f"{len(spans)} spans" in message
        assert not built
    finally:
        made.close()


def test_a_payload_waiting_for_the_store_leaves_the_others_decoded(
    demo_sessions: list[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decoding slot was held until the payload's spans were added, which waits for the
    store: every other payload got 503 meanwhile, and exporters dropped batches."""
    monkeypatch.setattr(endpoint_module, "_DECODE_WAIT", 0.01)
    endpoint = OtlpEndpoint(JsonDirStore(tmp_path / "store"), tmp_path / "state", max_decoding=1)
    add, adding, go_on = endpoint.ingestor.add, threading.Event(), threading.Event()

    def held_up(spans: list) -> None:
        if not adding.is_set():  # the first payload's add, behind a store that is slow now
            adding.set()
            go_on.wait(10)
        add(spans)

    monkeypatch.setattr(endpoint.ingestor, "add", held_up)
    bodies = [_protobuf(session_spans(session)) for session in demo_sessions[:2]]
    first = threading.Thread(target=endpoint.accept, args=(bodies[0], "application/x-protobuf"))
    first.start()
    try:
        assert adding.wait(10)
        timer = threading.Timer(0.2, go_on.set)  # the second payload waits for its turn to add
        timer.start()
        assert endpoint.accept(bodies[1], "application/x-protobuf").accepted > 0
    finally:
        go_on.set()
        first.join(10)
        endpoint.close()


def test_payloads_decoded_at_once_are_bounded_the_rest_503_with_retry_after(
    demo_sessions: list[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ten 2 MB gzip payloads decoded at once took 2 GB: now `max_decoding` at once, others 503."""
    with pytest.raises(TypeError, match="max_decoding"):
        OtlpEndpoint(JsonDirStore(tmp_path / "s"), tmp_path / "bad", max_decoding="2")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="max_decoding must be at least 1"):
        OtlpEndpoint(JsonDirStore(tmp_path / "s"), tmp_path / "bad", max_decoding=0)
    monkeypatch.setattr(endpoint_module, "_DECODE_WAIT", 0.01)
    made = Receiver(tmp_path, max_decoding=1)
    body = _protobuf(session_spans(demo_sessions[0], capture_content=True))
    try:
        assert made.endpoint._decoding.acquire(blocking=False)  # a payload being decoded
        response = made.post(body)
        assert response.status == 503 and response.getheader("Retry-After") == "1"
        made.endpoint._decoding.release()
        assert made.post(body).status == 200
    finally:
        _same(made.close(), demo_sessions[:1])


def test_protobuf_under_either_media_type(demo_sessions: list[Session], tmp_path: Path) -> None:
    """``application/protobuf`` is protobuf too (OTLP/HTTP answers in the request's type)."""
    made = Receiver(tmp_path)
    spans = session_spans(demo_sessions[0], capture_content=True)
    response = made.post(_protobuf(spans), "application/protobuf")
    assert response.status == 200 and response.getheader("Content-Type") == "application/protobuf"
    ExportTraceServiceResponse().ParseFromString(response.read_body)  # type: ignore[attr-defined]
    refused = made.post(b"{}", "text/plain")
    assert refused.status == 415
    message = json.loads(refused.read_body)["message"]  # type: ignore[attr-defined]
    assert all(
        kind in message for kind in ("application/x-protobuf", "application/protobuf", "application/json")
    )
    _same(made.close(), demo_sessions[:1])


def test_a_file_system_that_cannot_sync_directories_still_spools(
    demo_sessions: list[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsync = os.fsync

    def no_directory_sync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))  # as some network file systems do
        fsync(fd)

    monkeypatch.setattr(os, "fsync", no_directory_sync)
    made = Receiver(tmp_path)
    assert made.post(_protobuf(session_spans(demo_sessions[0], capture_content=True))).status == 200
    _same(made.close(), demo_sessions[:1])


def test_temporary_spool_files_a_crash_left_are_removed_at_start(tmp_path: Path) -> None:
    spool = tmp_path / "state" / "spool"
    spool.mkdir(parents=True)
    (spool / "7.tmp").write_bytes(b"J{")  # a write cut short: never acknowledged
    others = [spool / "notes.tmp", spool / "7.tmp.bak", spool / "x7.tmp"]  # not the spool's own names
    for path in others:
        path.write_bytes(b"keep")
    made = Receiver(tmp_path)
    try:
        assert sorted(spool.iterdir()) == sorted(others)
    finally:
        made.close()


def test_a_release_between_spooling_and_adding_keeps_the_acknowledged_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ticker (or another request) released spool files while a payload was spooled but its
    spans not yet waiting: its file went though its trace waited for its root, lost to a crash."""
    endpoint = OtlpEndpoint(JsonDirStore(tmp_path / "store"), tmp_path / "state", tick=3600)
    add = endpoint.ingestor.add

    def add_after_a_release(spans: list) -> None:
        endpoint.spool.release(endpoint.ingestor, endpoint.saver.journal)  # what the ticker may do
        add(spans)

    monkeypatch.setattr(endpoint.ingestor, "add", add_after_a_release)
    chat = {
        "traceId": "ab" * 16,
        "spanId": "cd" * 8,
        "parentSpanId": "ef" * 8,  # the agent's span, still running
        "name": "chat m",
        "startTimeUnixNano": "1750000000000000000",
        "endTimeUnixNano": "1750000001000000000",
        "attributes": [{"key": "gen_ai.operation.name", "value": {"stringValue": "chat"}}],
    }
    body = json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [chat]}]}]}).encode()
    try:
        assert endpoint.accept(body, "application/json").accepted == 1
        assert endpoint.ingestor.waiting([int("ab" * 16, 16)])
        assert len(list((tmp_path / "state" / "spool").glob("*.spans"))) == 1
    finally:
        endpoint.close()


def test_span_event_text_from_undecodable_bytes_is_escaped() -> None:
    import phi_session as ps
    from phi_session.codec import escape_surrogates

    recorder = ps.SessionRecorder()
    with ps.Tracer(ps.AgentSession("a"), sinks=[recorder]).loop(
        ps.LoopConfigSnapshot(model="m", provider="p")
    ) as loop:
        loop.user("go")
        loop.revert("tangent", summary="went into caf\udce9/", target=0)
    recorder.flush()
    [session] = recorder.drain_completed()
    spans = session_spans(session, capture_content=True)
    _protobuf(spans)  # the OTLP encoder takes every text
    summaries = [e.attributes.get("phi.summary") for span in spans for e in span.events]
    assert escape_surrogates("went into caf\udce9/") in summaries


def test_text_from_undecodable_bytes_exports_and_comes_back_escaped() -> None:
    # A tool listing files names one os.listdir decoded with lone surrogates, which UTF-8
    # refuses: the export raised UnicodeEncodeError (with content), or the OTLP encoder did.
    from phi_session import SessionRecorder
    from phi_session.codec import escape_surrogates
    from phi_session.events import ToolExecutionEnd
    from phi_session.otel import SpanIngestor
    from phi_session.otel.spans import spans_from_otlp_proto

    name = "report-\udcff.txt"
    session = tool_loop_session(
        [("c1", f"ls {name}", {"path": name}, name)], agent_id=f"agent {name}", error=f"no {name}"
    )
    for capture in (False, True):
        spans, skipped = spans_from_otlp_proto(_protobuf(session_spans(session, capture_content=capture)))
        assert skipped == 0
        back = SessionRecorder()
        ingestor = SpanIngestor(back)
        ingestor.add(spans)
        back.flush()
        [loop] = back.drain_completed()[0].loops
        assert loop.agent_id == escape_surrogates(f"agent {name}")
        assert loop.error == escape_surrogates(f"no {name}")
        [call] = [e.event for e in loop.events if isinstance(e.event, ToolExecutionEnd)]
        assert call.tool_name == escape_surrogates(f"ls {name}")
        if capture:
            assert call.result.content[0].text == escape_surrogates(name)  # type: ignore[union-attr]


def _invalid_utf8(body: bytes, text: str) -> bytes:
    """`body` with the UTF-8 of `text` made invalid (same length: lengths stay right)."""
    encoded = text.encode()
    assert encoded in body
    return body.replace(encoded, b"\xff" * len(encoded))


def test_invalid_utf8_is_replaced_only_where_it_is_and_said(tmp_path: Path) -> None:
    # One bad string refused the whole payload (400): every other span was lost.
    sent = tool_loop_session([("c1", "lookup", {"q": 1}, "ok"), ("c2", "lookup", {"q": 2}, "caf\u00e9")])
    body = _invalid_utf8(_protobuf(session_spans(sent, capture_content=True)), "caf\u00e9")
    made = Receiver(tmp_path)
    response = made.post(body)
    assert response.status == 200
    partial = ExportTraceServiceResponse.FromString(response.read_body).partial_success  # type: ignore[attr-defined]
    assert partial.rejected_spans == 0 and "invalid UTF-8" in partial.error_message
    want = tool_loop_session([("c1", "lookup", {"q": 1}, "ok"), ("c2", "lookup", {"q": 2}, "\ufffd" * 5)])
    _same(made.close(), [want])


@settings(max_examples=60, deadline=None)
@given(name=st.binary(min_size=1, max_size=12), value=st.binary(min_size=1, max_size=12))
def test_any_bytes_in_a_string_read_as_python_decodes_them(name: bytes, value: bytes) -> None:
    from phi_session.otel.spans import read_otlp

    span = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(span))
    placeholders = ("N" * len(name), "V" * len(value))
    with provider.get_tracer("t").start_as_current_span(placeholders[0], attributes={"k": placeholders[1]}):
        pass
    body = _protobuf(list(span.get_finished_spans()))
    for placeholder, raw in zip(placeholders, (name, value), strict=True):
        assume(body.count(placeholder.encode()) == 1)
        body = body.replace(placeholder.encode(), raw)
    read = read_otlp(body, "application/x-protobuf")
    [got] = read.spans
    assert (got.name, got.attributes["k"]) == (
        name.decode("utf-8", "replace"),
        value.decode("utf-8", "replace"),
    )
    valid = [raw for raw in (name, value) if raw.decode("utf-8", "replace").encode() == raw]
    assert read.repaired == 2 - len(valid)


def test_a_payload_that_is_not_protobuf_is_still_refused(receiver: Receiver) -> None:
    assert receiver.post(b"\x0a\x05\xff").status == 400  # a length past the end


def test_invalid_utf8_in_a_repeated_string_is_replaced_too() -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from phi_session.otel.spans import read_otlp

    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.entity_refs.add().id_keys.extend(["host\u00e9", "ok", "host\u00e9"])
    span = resource_spans.scope_spans.add().spans.add()
    span.trace_id, span.span_id, span.name = b"\x01" * 16, b"\x02" * 8, "chat m"
    read = read_otlp(_invalid_utf8(request.SerializeToString(), "host\u00e9"), "application/x-protobuf")
    assert ([s.name for s in read.spans], read.repaired) == (["chat m"], 2)


def _endpoint_saved(root: Path, *payloads: list) -> list[Session]:
    """The store's sessions once each payload was accepted and what completed saved."""
    store = JsonDirStore(root / "store")
    endpoint = OtlpEndpoint(store, root / "state", tick=60)
    for spans in payloads:
        endpoint.accept(_protobuf(spans), "application/x-protobuf")
        endpoint.saver.checkpoint()
        assert endpoint.saver.wait_saved(10)
    endpoint.close()
    return [store.load(session_id) for session_id in store.list_ids()]


@pytest.mark.parametrize("first", ["sub-agent", "caller"])
def test_a_sub_agent_saved_before_the_other_service_exported_is_linked_in_the_store(
    tmp_path: Path, first: str
) -> None:
    calling, serving, _ = services_calling_a_sub_agent()
    apart = _endpoint_saved(
        tmp_path / "apart", *((serving, calling) if first == "sub-agent" else (calling, serving))
    )
    # The sessions saved again (merged in the store) are what one payload of both gives.
    _same(apart, _endpoint_saved(tmp_path / "together", [*serving, *calling]))
    [child] = [loop for session in apart for loop in session.loops if loop.agent_id == "helper"]
    assert child.parent_loop_id is not None


def test_a_sub_agent_whose_caller_never_exports_is_saved_complete_at_once(tmp_path: Path) -> None:
    _, serving, tool_span = services_calling_a_sub_agent()
    store = JsonDirStore(tmp_path / "store")
    endpoint = OtlpEndpoint(store, tmp_path / "state", tick=60)
    endpoint.accept(_protobuf(serving), "application/x-protobuf")
    assert endpoint.ingestor.buffered_spans == 0  # no wait for a caller that may never come
    endpoint.saver.checkpoint()
    assert endpoint.saver.wait_saved(10)
    [session_id] = store.list_ids()
    saved = store.load(session_id)
    endpoint.close()
    assert encode_session(store.load(session_id)) == encode_session(saved)
    [loop] = saved.loops
    assert (loop.status, loop.parent_loop_id, saved.parent_spawn_ref) == ("Completed", None, None)
    assert loop.metadata is not None and loop.metadata["otel"]["parent_span_id"] == f"{tool_span:016x}"


@pytest.mark.parametrize("export", ["now", "older"])
def test_a_loop_span_sent_after_a_restart_is_saved_with_its_stand_in_as_one_loop(
    tmp_path: Path, export: str
) -> None:
    # The batch processor sent the loop span apart and the endpoint restarted in between: the
    # chat span stood in for the loop (its id, an agent guessed from the service) and SQLite
    # kept it beside the loop as another agent's record.
    from phi_session.stores.sqlite import SqliteStore

    session = tool_loop_session([("c1", "search", {"q": "x"}, "hit")], agent_id="a")
    spans = session_spans(session)
    rest = [span for span in spans if span.parent is not None]
    # An older export put the agent id on the loop span only.
    first = _protobuf(rest) if export == "now" else _without_agent_id(rest)
    store = SqliteStore(tmp_path / "s.db")
    for payload in (first, _protobuf([span for span in spans if span.parent is None])):
        endpoint = OtlpEndpoint(store, tmp_path / "state")
        endpoint.accept(payload, "application/x-protobuf")
        endpoint.close()
    [loop] = store.load(session.session_id).loops
    assert (loop.loop_id, loop.agent_id, loop.status) == ("L", "a", "Completed")


def _without_agent_id(spans: list[ReadableSpan]) -> bytes:
    """`spans` as a protobuf payload, without the ``gen_ai.agent.id`` of every span."""
    request = encode_spans(spans)
    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                kept = [kv for kv in span.attributes if kv.key != "gen_ai.agent.id"]
                del span.attributes[:]
                span.attributes.extend(kept)
    return request.SerializeToString()


def test_gzip_members_are_read_in_pieces_and_their_number_bounded() -> None:
    # Incompressible members larger than a piece, one after another: each read whole, in order.
    first, second = os.urandom(200_000), os.urandom(70_000)
    body = gzip.compress(first) + gzip.compress(b"") + gzip.compress(second)
    assert OtlpHandler._gunzip(body, 1 << 20) == first + second
    for broken, status in [
        (gzip.compress(first)[:-9], 400),  # cut short in its last piece
        (gzip.compress(first) + b"\x1f\x8b junk", 400),
        (gzip.compress(first), 413),  # over the limit given
    ]:
        with pytest.raises(OtlpRefused) as refused:
            OtlpHandler._gunzip(broken, 100_000 if status == 413 else 1 << 20)
        assert refused.value.status == status
    # Each member costs a fresh inflater: a body of tiny members is refused at a bound, not
    # worked through (16 MiB of them kept a core busy for minutes).
    empty = gzip.compress(b"")
    assert OtlpHandler._gunzip(empty * endpoint_module._MAX_GZIP_MEMBERS, 10) == b""
    with pytest.raises(OtlpRefused, match="members"):
        OtlpHandler._gunzip(empty * (endpoint_module._MAX_GZIP_MEMBERS + 1), 10)


def test_an_escaped_lone_surrogate_is_repaired_not_the_payload_refused(receiver: Receiver) -> None:
    # JavaScript's JSON.stringify of a text cut inside an emoji; msgspec refuses the escape.
    attributes = [{"key": "gen_ai.prompt", "value": {"stringValue": "cut \ud83d"}}]
    body = _one_span_json({"name": "chat \udc00", "attributes": attributes})
    assert b"\\ud83d" in body
    response = receiver.post(body, "application/json")
    assert response.status == 200
    partial = json.loads(response.read_body)["partialSuccess"]  # type: ignore[attr-defined]
    assert partial["rejectedSpans"] == "0" and "lone surrogates" in partial["errorMessage"]
    read = spans_from_otlp_json(body)
    assert [(span.name, span.attributes) for span in read[0]] == [
        ("chat \ufffd", {"gen_ai.prompt": "cut \ufffd"})
    ]
    for still_bad in (
        body.replace(b"}]}]}", b"}]}"),
        body.replace(b'{"traceId"', b'{"nan": NaN, "traceId"', 1),
    ):
        with pytest.raises(OtlpDecodeError, match="not JSON"):
            spans_from_otlp_json(still_bad)


def test_json_numbers_and_ids_read_as_protobuf_reads_them() -> None:
    # A double of 400 digits is a bad value (400), never an internal error (500, retried).
    huge = [{"key": "k", "value": {"doubleValue": int("1" + "0" * 400)}}]
    with pytest.raises(OtlpDecodeError, match="doubleValue"):
        spans_from_otlp_json(_one_span_json({"attributes": huge}))
    # An all-zero parent span id is a root, as protobuf's default is.
    (span,), skipped = spans_from_otlp_json(_one_span_json({"parentSpanId": "0" * 16}))
    assert (span.parent_id, span.remote_parent_id, skipped) == (None, None, 0)


def test_times_otlp_cannot_hold_are_clamped_not_the_session_lost(tmp_path: Path) -> None:
    # A tool result stamped in microseconds (a valid u64 of ms), a loop started before 1970
    # and ended after 2554: their spans' times (ns) were outside OTLP's fixed64, the encoder
    # refused the whole batch, and OtelExportSink kept the sessions failed, close raising
    # ExportError at every try.
    in_micros = [
        replace(event, tool_results=(replace(event.tool_results[0], timestamp=1_780_000_000_000_000),))
        if type(event) is TurnEnd
        else event
        for event in tool_loop_events("s.a.1", [("c", "t", {}, "r")])
    ]
    out_of_range = tool_loop_events("t.a.1", [("c", "t", {}, "r")], session_id="t")
    out_of_range[0] = replace(out_of_range[0], timestamp=Timestamp.parse("1900-01-01T00:00:00Z"))
    out_of_range[-1] = replace(out_of_range[-1], timestamp=Timestamp.parse("+12000-01-01T00:00:00Z"))
    recorder = SessionRecorder()
    recorder.record_all([*in_micros, *out_of_range])
    recorder.flush()
    sessions = sorted(recorder.drain_completed(), key=lambda session: session.created_at)
    spans = session_spans(sessions[1])
    _protobuf(spans)
    # The result's time clamped to OTLP's last instant, not to its loop's end: a message clock
    # running ahead of the events' is no error, and its times order the calls without content.
    [tool] = [span for span in spans if span.name == "execute_tool t"]
    assert tool.end_time == 2**64 - 1
    made = Receiver(tmp_path)
    sink = OtelExportSink(
        OTLPSpanExporter(endpoint=f"http://127.0.0.1:{made.port}/v1/traces"), capture_content=True
    )
    for event in [*in_micros, *out_of_range]:
        sink(event)
    sink.close()
    _same(made.close(), sessions)


def test_counts_past_otlps_int64_come_back_exact() -> None:
    # phi-core's counts are u64, and the conventions' input tokens add the cached ones: past
    # 2**63 - 1 (OTLP's int64) the encoder dropped the attribute, logging only, and ingest
    # billed 0 input tokens; a span event holding such a count was unreadable, not recorded,
    # and a parallel group's selected config index came back 0.
    big = Usage(input=2**63, output=5, cache_read=2**62, total_tokens=2**63 + 2**62 + 5)
    branch = []
    for event in tool_loop_events("s.p.1", [("c", "t", {}, "r")]):
        if type(event) in (MessageEnd, TurnEnd):
            event = replace(event, message=replace(event.message, usage=big))
        if type(event) in (TurnEnd, AgentEnd):
            event = replace(event, usage=big)
        branch.append(event)
    at = branch[0].timestamp
    branch[1:1] = [
        CompactionStarted(loop_id="s.p.1", estimated_tokens=2**64 - 1, message_count=2, timestamp=at),
        PrunApplied(
            loop_id="s.p.1",
            tokens_removed=2**63,
            messages_removed=1,
            pruned_timestamps=(2**63, 5),
            timestamp=at,
        ),
    ]
    group = ("s.p.1", "s.p.2")
    recorder = SessionRecorder()
    recorder.record_all(
        [
            ParallelLoopStart(session_id="s", loop_ids=group, timestamp=at),
            *branch,
            *tool_loop_events("s.p.2", [("c", "t", {}, "r")]),
            ParallelLoopEnd(
                session_id="s",
                selected_loop_id="s.p.1",
                selected_config_index=2**63,
                evaluation_usage=big,
                timestamp=branch[-1].timestamp,
            ),
        ]
    )
    recorder.flush()
    [session] = recorder.drain_completed()
    record = session.loops[0]
    for capture in (False, True):
        spans, skipped = spans_from_otlp_proto(_protobuf(session_spans(session, capture_content=capture)))
        assert skipped == 0
        [loop] = [
            s for s in spans if s.name == "invoke_agent a" and s.attributes[attr.PHI_LOOP_ID] == "s.p.1"
        ]
        assert loop.attributes[attr.USAGE_INPUT_TOKENS] == 2**63 - 1  # what the conventions' int64 holds
        back = SessionRecorder()
        ingestor = SpanIngestor(back)
        ingestor.add(spans)
        ingestor.flush()
        back.flush()
        [got] = back.drain_completed()
        assert ingestor.counters["unreadable_span_events"] == 0
        if capture:
            assert encode_session(got) == encode_session(session)
            continue
        [loop_back, _] = got.loops
        assert loop_back.usage == record.usage and loop_back.turns[0].usage == record.turns[0].usage
        assert loop_back.parallel_group == record.parallel_group
        counted = (CompactionStarted, PrunApplied)
        assert [e.event for e in loop_back.events if type(e.event) in counted] == [
            e.event for e in record.events if type(e.event) in counted
        ]


def test_counts_past_u64_from_any_producer_are_absent_not_the_payload_lost(receiver: Receiver) -> None:
    # Text of a count past u64 (any producer may send text where a count goes) was read as the
    # number since counts of ours past int64 are their text: the recorder refused the event
    # built with it, the payload was 503 at every retry, and the events before it stayed in the
    # recorder (a loop saved Aborted, without its turns). As before, they are counts not given.
    past_u64 = str(2**64)
    events = tool_loop_events("L", [("c1", "t", {}, "r1"), ("c2", "t", {}, "r2")])
    events.insert(
        5,
        PrunApplied(
            loop_id="L",
            tokens_removed=5,
            messages_removed=1,
            pruned_timestamps=(),
            timestamp=Timestamp.from_ns(45 * 10**8),
        ),
    )
    recorder = SessionRecorder()
    recorder.record_all(events)
    recorder.flush()
    [session] = recorder.drain_completed()
    request = encode_spans(session_spans(session, capture_content=False))
    [first, second] = sorted(
        (
            span
            for rs in request.resource_spans
            for ss in rs.scope_spans
            for span in ss.spans
            if span.name.startswith("chat")
        ),
        key=lambda span: span.start_time_unix_nano,
    )
    for key_value in first.attributes:
        if key_value.key == attr.USAGE_OUTPUT_TOKENS:
            key_value.value.Clear()
            key_value.value.string_value = past_u64
    stored = second.attributes.add()  # the exact usage our export adds past int64
    stored.key = attr.PHI_USAGE
    stored.value.string_value = (
        f'{{"input":{past_u64},"output":0,"cache_read":0,"cache_write":0,"total_tokens":0}}'
    )
    [prun] = first.events
    for key_value in prun.attributes:
        if key_value.key == "phi.tokens_removed":
            key_value.value.Clear()
            key_value.value.string_value = past_u64
    assert receiver.post(request.SerializeToString()).status == 200
    [got] = receiver.close()
    [loop] = got.loops
    assert (loop.status, loop.ended_at, len(loop.turns)) == ("Completed", session.loops[0].ended_at, 2)
    assert [(turn.usage.input, turn.usage.output) for turn in loop.turns] == [(0, 0), (0, 0)]
    assert not any(type(stored.event) is PrunApplied for stored in loop.events)  # unreadable


def test_an_attribute_nested_too_deep_is_kept_as_its_text_not_the_payload_refused(tmp_path: Path) -> None:
    # One such span (valid OTLP, which protobuf reads) made the whole payload 400, final for
    # an exporter: the other nine spans of the batch were lost.
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    request = ExportTraceServiceRequest()
    spans = request.resource_spans.add().scope_spans.add()
    for trace in range(1, 11):
        span = spans.spans.add(trace_id=trace.to_bytes(16, "big"), span_id=b"\0" * 7 + b"\1", name="chat m")
        span.attributes.add(key=attr.OPERATION_NAME).value.string_value = attr.OP_CHAT
        span.attributes.add(key=attr.CONVERSATION_ID).value.string_value = f"conv{trace}"
        if trace == 10:
            value = span.attributes.add(key="app.nested").value
            for _ in range(40):
                value = value.array_value.values.add()
            value.string_value = "leaf"
    body = request.SerializeToString()
    document = _otlp_json_of(request)
    for read in (spans_from_otlp_proto(body)[0], spans_from_otlp_json(json.dumps(document).encode())[0]):
        kept = read[-1].attributes["app.nested"]
        for _ in range(33):  # the levels read as values
            (kept,) = kept
        assert msgspec.json.decode(kept) == _any_value_nested(7, "leaf")  # the rest as its OTLP JSON
    made = Receiver(tmp_path)
    for sent, content_type in (
        (body, "application/x-protobuf"),
        (json.dumps(document).encode(), "application/json"),
    ):
        response = made.post(sent, content_type)
        assert response.status == 200
    partial = json.loads(response.read_body)["partialSuccess"]  # type: ignore[attr-defined]
    assert partial["rejectedSpans"] == "0" and "nested deeper than 32 levels" in partial["errorMessage"]
    assert sorted(session.session_id for session in made.close()) == sorted(f"conv{t}" for t in range(1, 11))


def _any_value_nested(levels: int, leaf: str) -> dict:
    value: dict = {"stringValue": leaf}
    for _ in range(levels):
        value = {"arrayValue": {"values": [value]}}
    return value


def test_spans_waiting_past_the_bytes_allowed_are_429_and_a_payload_that_never_fits_413(
    tmp_path: Path,
) -> None:
    # 30 payloads of one 12 MiB model call each, waiting for their roots, were all taken (RSS
    # 47 -> 419 MB): only their count was bounded, at 200 000 spans.
    mib = 2**20

    def chat(trace: int, size: int) -> dict:
        attributes = {attr.OPERATION_NAME: attr.OP_CHAT, attr.INPUT_MESSAGES: "x" * size}
        return {
            "traceId": f"{trace:032x}",
            "spanId": f"{0x10:016x}",
            "parentSpanId": f"{1:016x}",
            "name": "chat m",
            "attributes": [{"key": k, "value": {"stringValue": v}} for k, v in attributes.items()],
        }

    def post(*spans: dict) -> http.client.HTTPResponse:
        document = {"resourceSpans": [{"scopeSpans": [{"spans": list(spans)}]}]}
        return made.post(json.dumps(document).encode(), "application/json")

    made = Receiver(tmp_path, max_buffered_bytes=3 * mib)
    try:
        assert post(chat(1, mib)).status == post(chat(2, mib)).status == 200
        refused = post(chat(3, mib))
        assert refused.status == 429 and refused.getheader("Retry-After") == "1"
        assert "bytes" in json.loads(refused.read_body)["message"]  # type: ignore[attr-defined]
        root = {"traceId": f"{1:032x}", "spanId": f"{1:016x}", "name": "invoke_agent a"}
        assert post(root, chat(3, mib)).status == 200  # the root frees its trace's spans
        never = post(chat(4, 4 * mib))
        assert never.status == 413 and never.getheader("Retry-After") is None
        assert made.endpoint.ingestor.buffered_spans == 2
    finally:
        made.close()


def _conversation_trace(trace: int, conversation: str) -> bytes:
    """One trace of `conversation`: an agent span (span id 0x100 + trace) over a model call."""
    at = T0_CONVERSATION + trace * 10**10
    agent = {attr.OPERATION_NAME: attr.OP_INVOKE_AGENT, attr.CONVERSATION_ID: conversation}
    spans = [
        {
            "traceId": f"{trace:032x}",
            "spanId": f"{0x100 + trace:016x}",
            "name": "invoke_agent bot",
            "startTimeUnixNano": str(at),
            "endTimeUnixNano": str(at + 5 * 10**9),
            "attributes": [{"key": k, "value": {"stringValue": v}} for k, v in agent.items()],
        },
        {
            "traceId": f"{trace:032x}",
            "spanId": f"{0x200 + trace:016x}",
            "parentSpanId": f"{0x100 + trace:016x}",
            "name": "chat m",
            "startTimeUnixNano": str(at + 10**9),
            "endTimeUnixNano": str(at + 2 * 10**9),
            "attributes": [{"key": attr.OPERATION_NAME, "value": {"stringValue": attr.OP_CHAT}}],
        },
    ]
    return json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": spans}]}]}).encode()


T0_CONVERSATION = 1_700_000_000 * 10**9


@pytest.mark.parametrize("again", [(3, 1), (1, 3)], ids=["resent-after", "resent-before"])
@pytest.mark.parametrize("kind", ["sqlite", "json"])
def test_a_conversation_goes_on_after_a_restart(tmp_path: Path, kind: str, again: tuple[int, int]) -> None:
    # The latest loop of a conversation was known from memory only: after a restart its next
    # loop was Initial, without a parent. The store says which it is; a loop sent again after
    # the restart (an exporter's retry, the spool's replay) keeps its place, before or after.
    from phi_session.stores.sqlite import SqliteStore

    store = SqliteStore(tmp_path / "s.db") if kind == "sqlite" else JsonDirStore(tmp_path / "store")
    for payloads in ((1, 2), again):
        endpoint = OtlpEndpoint(store, tmp_path / "state")
        for trace in payloads:
            endpoint.accept(_conversation_trace(trace, "conv-R"), "application/json")
        endpoint.close()
    loops = store.load("conv-R").loops
    assert [loop.loop_id for loop in loops] == [f"conv-R.otel.{0x100 + t:016x}" for t in (1, 2, 3)]
    assert [(loop.kind.kind, loop.parent_loop_id) for loop in loops] == [
        ("Initial", None),
        ("Default", loops[0].loop_id),
        ("Default", loops[1].loop_id),
    ]


def test_a_store_that_cannot_say_the_latest_loop_leaves_the_loop_initial_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from phi_session.errors import StoreError

    store = JsonDirStore(tmp_path / "store")
    endpoint = OtlpEndpoint(store, tmp_path / "state")
    endpoint.accept(_conversation_trace(1, "conv-R"), "application/json")
    endpoint.close()

    def failing(session_id: str, start: int) -> list[tuple[str, int]]:
        raise StoreError("disk on fire")

    monkeypatch.setattr(store, "loop_starts", failing)
    endpoint = OtlpEndpoint(store, tmp_path / "state")
    endpoint.accept(_conversation_trace(2, "conv-R"), "application/json")
    endpoint.close()
    assert [loop.parent_loop_id for loop in store.load("conv-R").loops] == [None, None]
    assert any("conv-R" in r.getMessage() and "disk on fire" in r.getMessage() for r in caplog.records)


def test_spans_recorded_at_once_are_not_refused_as_waiting(tmp_path: Path) -> None:
    # A trace whose root is under a remote parent (recorded at once, no caller waiting) with
    # a 2 MiB model call was 413 with at most 1 MiB waiting, nothing buffered, while the same
    # trace with a local root was 200; so was a late span under a recorded root.
    mib = 2**20

    def span(trace: int, span_id: int, parent: int | None, name: str, **extra: object) -> dict:
        attributes = {attr.OPERATION_NAME: name.split()[0], attr.INPUT_MESSAGES: "x" * 2 * mib}
        if name.startswith("invoke_agent"):
            del attributes[attr.INPUT_MESSAGES]
        return {
            "traceId": f"{trace:032x}",
            "spanId": f"{span_id:016x}",
            **({"parentSpanId": f"{parent:016x}"} if parent is not None else {}),
            "name": name,
            "startTimeUnixNano": str(T0_CONVERSATION + span_id),
            "endTimeUnixNano": str(T0_CONVERSATION + 1000),
            "attributes": [{"key": k, "value": {"stringValue": v}} for k, v in attributes.items()],
            **extra,
        }

    def post(*spans: dict) -> int:
        document = {"resourceSpans": [{"scopeSpans": [{"spans": list(spans)}]}]}
        return made.post(json.dumps(document).encode(), "application/json").status

    made = Receiver(tmp_path, max_buffered_bytes=mib)
    try:
        served = span(1, 0x10, 0xCA11E2, "invoke_agent helper", flags=0x300)
        assert post(served, span(1, 0x11, 0x10, "chat m")) == 200
        assert post(span(2, 0x20, None, "invoke_agent helper")) == 200
        assert post(span(2, 0x21, 0x20, "chat m")) == 200  # under the root recorded: joins it
        assert post(span(3, 0x31, 0x30, "chat m")) == 413  # waits for its root: never fits
        assert made.endpoint.ingestor.buffered_spans == 0
    finally:
        sessions = made.close()
    assert sorted(loop.turn_count() for session in sessions for loop in session.loops) == [1, 1]


@pytest.mark.parametrize(
    "leaf",
    [
        {"foo": 1, "bar": 2},
        {"bytesValue": "!!notbase64"},
        {"intValue": "99999999999999999999999"},
        {"doubleValue": "many"},
        {"kvlistValue": {"values": [{"value": {"stringValue": "no key"}}]}},
        {"arrayValue": {"values": {"stringValue": "not an array"}}},
        [1, 2],
    ],
    ids=["two members", "bytes", "int range", "double", "pair without key", "values not array", "not object"],
)
def test_an_invalid_attribute_value_is_refused_at_any_depth(leaf: object) -> None:
    # Below 32 levels the value was kept as its text unchecked: an AnyValue a shallower
    # attribute was refused for (400) was taken there.
    for levels in (2, 40):
        value = leaf
        for _ in range(levels):
            value = {"arrayValue": {"values": [value]}}
        body = _one_span_json({"attributes": [{"key": "app.value", "value": value}]})
        with pytest.raises(OtlpDecodeError):
            spans_from_otlp_json(body)
    deep_but_valid = {"kvlistValue": {"values": [{"key": "k", "value": _any_value_nested(40, "leaf")}]}}
    [span] = spans_from_otlp_json(
        _one_span_json({"attributes": [{"key": "app.value", "value": deep_but_valid}]})
    )[0]
    assert span.attributes["app.value"]["k"]
