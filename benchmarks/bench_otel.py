"""OpenTelemetry GenAI export and OTLP ingest (issue 13, item 6).

Part 1 exports W1's sessions (100 sessions, 500 loops, 5,500 spans) to a null
exporter with `export_session`, next to the OTel SDK creating the same spans (same
names, kinds, parents, times, attributes, events, links, status) itself through a
`Tracer` with a `SimpleSpanProcessor` into the same null exporter. Target: export
at most 1.2x the SDK's time.

Part 2 sends W1's sessions, exported with content, as OTLP protobuf payloads of
512 spans (the SDK batch size) to the OTLP/HTTP endpoint on 127.0.0.1 and times
until every session is saved in a JSON-file store (journal and spool on), next to
``phi-session record`` of W1's JSON lines into another such store. Reported in
spans/s and events/s. Target: the endpoint at most 3x record's time.

Usage: python benchmarks/bench_otel.py [--runs N]
"""

from __future__ import annotations

import argparse
import gc
import http.client
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import NonRecordingSpan, set_span_in_context

from phi_session.model import Session
from phi_session.otel import export_session
from phi_session.otel.endpoint import OtlpEndpoint, make_otlp_server
from phi_session.otel.export import session_spans
from phi_session.recorder import SessionRecorder
from phi_session.stores.json_dir import JsonDirStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workload  # lives next to this script

SRC = Path(__file__).resolve().parents[1] / "src"


class NullExporter(SpanExporter):
    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


def best(runs: int, work: Callable[[], object]) -> float:
    times = []
    for _ in range(runs):
        gc.collect()
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def sdk_recreate(spans: list[ReadableSpan], exporter: SpanExporter) -> None:
    """Create `spans` again through the SDK's own API, as an instrumented agent would."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("bench")
    for span in spans:
        context = set_span_in_context(NonRecordingSpan(span.parent)) if span.parent is not None else None
        made = tracer.start_span(
            span.name,
            context=context,
            kind=span.kind,
            attributes=span.attributes,
            links=span.links,
            start_time=span.start_time,
        )
        for event in span.events:
            made.add_event(event.name, event.attributes, event.timestamp)
        made.set_status(span.status)
        made.end(span.end_time)


def record_sessions(lines: list[bytes]) -> list[Session]:
    recorder = SessionRecorder()
    for line in lines:
        recorder.on_json(line)
    recorder.flush()
    return recorder.drain_completed()


def through_endpoint(payloads: list[bytes], root: Path) -> float:
    endpoint = OtlpEndpoint(JsonDirStore(root / "store"), root / "state")
    server = make_otlp_server(endpoint, port=0, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=120)
    for payload in payloads:
        connection.request(
            "POST", "/v1/traces", body=payload, headers={"Content-Type": "application/x-protobuf"}
        )
        response = connection.getresponse()
        response.read()
        assert response.status == 200, response.status
    connection.close()
    server.shutdown()
    server.server_close()
    endpoint.close()  # every session saved
    return time.perf_counter() - started


def through_record(stream: Path, root: Path) -> float:
    started = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from phi_session.cli import main; main()",
            "record",
            str(stream),
            "--dir",
            str(root / "store"),
            "--json",
        ],
        check=True,
        capture_output=True,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    lines = workload.lines(workload.W1)
    sessions = record_sessions(lines)
    spans = [span for session in sessions for span in session_spans(session)]
    print(f"W1: {len(sessions)} sessions, {len(lines):,} events, {len(spans):,} spans")

    exporter = NullExporter()
    ours = best(args.runs, lambda: [export_session(s, exporter) for s in sessions])
    sdk = best(args.runs, lambda: sdk_recreate(spans, NullExporter()))
    ratio = ours / sdk
    print(
        f"export:  {ours * 1e3:8.1f} ms ({len(spans) / ours:,.0f} spans/s); SDK creating the same spans "
        f"{sdk * 1e3:8.1f} ms; ratio {ratio:.2f}x (target <= 1.2x): {'PASS' if ratio <= 1.2 else 'MISS'}"
    )

    content = [span for session in sessions for span in session_spans(session, capture_content=True)]
    payloads = [encode_spans(content[i : i + 512]).SerializeToString() for i in range(0, len(content), 512)]
    with tempfile.TemporaryDirectory() as folder:
        stream = Path(folder) / "w1.jsonl"
        stream.write_bytes(b"\n".join(lines) + b"\n")
        endpoint_times, record_times = [], []
        for run in range(max(1, args.runs // 2)):
            endpoint_times.append(through_endpoint(payloads, Path(folder) / f"endpoint{run}"))
            record_times.append(through_record(stream, Path(folder) / f"record{run}"))
    endpoint, record = min(endpoint_times), min(record_times)
    ratio = endpoint / record
    print(
        f"ingest:  endpoint {endpoint:6.2f} s ({len(content) / endpoint:,.0f} spans/s, "
        f"{len(lines) / endpoint:,.0f} events/s, {sum(map(len, payloads)) / 1e6:.1f} MB protobuf); "
        f"phi-session record {record:6.2f} s ({len(lines) / record:,.0f} events/s); ratio {ratio:.2f}x "
        f"(target <= 3x): {'PASS' if ratio <= 3 else 'MISS'}"
    )


if __name__ == "__main__":
    main()
