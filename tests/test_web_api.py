"""The viewer's read-only JSON API, against a live server on an ephemeral port."""

from __future__ import annotations

import http.client
import json
import re
import select
import shutil
import socket
import struct
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from phi_session.cli.render import BIDI_CONTROLS
from phi_session.codec import decode_event, decode_session, encode_session
from phi_session.identity import AgentSession
from phi_session.instrument import Tracer
from phi_session.model import LoopConfigSnapshot
from phi_session.recorder import SessionRecorder
from phi_session.stores.json_dir import JsonDirStore
from phi_session.stores.sqlite import SqliteStore
from phi_session.web.server import ViewerHandler, ViewerServer, is_loopback

from .web_support import (
    BASIC_ID,
    CHILD_ID,
    EXAMPLE_IDS,
    MINIMAL_ID,
    PARALLEL_ID,
    PARENT_ID,
    example_lines,
    record_into,
    running_server,
)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("viewer-store")
    with JsonDirStore(directory) as store:
        record_into(store, example_lines())
    return directory


@pytest.fixture(scope="module")
def server(store_dir: Path) -> Iterator[ViewerServer]:
    with JsonDirStore(store_dir) as store, running_server(store) as running:
        yield running


def request(
    server: ViewerServer, path: str, *, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body; the path is sent exactly as given (no normalisation)."""
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(str(host), port, timeout=20)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def get_json(server: ViewerServer, path: str, status: int = 200) -> Any:
    code, headers, body = request(server, path)
    assert code == status, (path, code, body)
    assert headers["Content-Type"] == "application/json; charset=utf-8"
    return json.loads(body)


def ids(rows: list[dict[str, Any]]) -> list[str]:
    return [row["session_id"] for row in rows]


def test_page_and_static_files(server: ViewerServer) -> None:
    code, headers, body = request(server, "/")
    assert code == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert b'<script src="static/app.js" defer></script>' in body
    csp = headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert headers["X-Content-Type-Options"] == "nosniff"
    for path, kind in (("/static/app.js", "text/javascript"), ("/static/style.css", "text/css")):
        code, headers, body = request(server, path)
        assert code == 200 and headers["Content-Type"].startswith(kind) and body
    # Only the three shipped files are served; nothing else of the package or disk.
    for path in ("/static/server.py", "/static/../server.py", "/static/%2e%2e/server.py", "/etc/passwd"):
        code, _, body = request(server, path)
        assert code == 404 and "error" in json.loads(body)


def test_an_unknown_session_is_404_naming_it_but_not_where_the_store_is(
    server: ViewerServer, store_dir: Path
) -> None:
    for path in (
        "/api/sessions/nope",
        "/api/sessions/nope/events",
        "/api/sessions/nope/overview",
        "/api/sessions/nope/timeline",
        f"/api/diff?a=nope&b={BASIC_ID}",
        f"/api/diff?a={BASIC_ID}&b=nope:x",
    ):
        code, _, body = request(server, path)
        assert code == 404 and "nope" in body.decode(), path
        assert str(store_dir) not in body.decode() and "viewer-store" not in body.decode(), body


def test_the_page_never_uses_innerhtml() -> None:
    script = (Path(__file__).resolve().parents[1] / "src/phi_session/web/static/app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script, sink


def test_the_page_escapes_the_bidi_controls_the_cli_escapes() -> None:
    script = (Path(__file__).resolve().parents[1] / "src/phi_session/web/static/app.js").read_text()
    [ranges] = re.findall(r"const BIDI_CONTROLS = /\[((?:\\u[0-9a-f]{4}-\\u[0-9a-f]{4})+)\]/g;", script)
    pairs = re.findall(r"\\u([0-9a-f]{4})-\\u([0-9a-f]{4})", ranges)
    assert [c for low, high in pairs for c in range(int(low, 16), int(high, 16) + 1)] == list(BIDI_CONTROLS)


def test_sessions_lists_summaries(server: ViewerServer) -> None:
    rows = get_json(server, "/api/sessions")
    assert sorted(ids(rows)) == sorted(EXAMPLE_IDS)
    child = next(row for row in rows if row["session_id"] == CHILD_ID)
    assert child["parent_session_id"] == PARENT_ID
    assert child["loops_by_status"] == {"Completed": 1}
    assert child["total_tokens"] == child["usage"]["total_tokens"] == 69
    assert child["models"] == ["anthropic/claude-haiku-4-5"]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("agent=b3d9f1a7-8c2e-4f6b-9a4d-1e7c5b3a9f28", [CHILD_ID]),
        ("model=openai/gpt-4o", [PARALLEL_ID]),
        ("status=Completed&limit=2", [MINIMAL_ID, PARALLEL_ID]),
        ("status=Aborted", []),
        ("min_tokens=1000", [PARENT_ID, BASIC_ID]),
        ("since=2025-06-03", [MINIMAL_ID, PARALLEL_ID]),
        ("until=2025-06-02", [BASIC_ID]),
        ("since=2025-06-02T00:00:00%2B02:00&until=2025-06-03", [CHILD_ID, PARENT_ID]),
        ("parent=" + PARENT_ID, [CHILD_ID]),
        ("order=oldest&limit=1", [BASIC_ID]),
        (
            "agent=&model=&since=",
            [MINIMAL_ID, PARALLEL_ID, CHILD_ID, PARENT_ID, BASIC_ID],
        ),  # empty: no filter
    ],
)
def test_sessions_filters(server: ViewerServer, query: str, expected: list[str]) -> None:
    assert ids(get_json(server, "/api/sessions?" + query)) == expected


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("limit=x", "limit"),
        ("limit=-1", "limit"),
        ("limit=99999999999999999999999", "limit"),
        ("limit=9223372036854775808", "limit"),
        ("min_tokens=99999999999999999999999", "min_tokens"),
        ("limit=1_000", "limit"),
        ("limit=%EF%BC%91", "limit"),  # a full-width digit one
        ("min_tokens=1.5", "min_tokens"),
        ("status=Done", "status"),
        ("since=tomorrow", "since"),
        ("order=random", "order"),
        ("colour=blue", "colour"),
        ("limit=1&limit=2", "limit"),
        ("since=2025-06-03&until=2025-06-01", "until"),
        ("limit", "query"),
    ],
)
def test_sessions_bad_query_is_400(server: ViewerServer, query: str, fragment: str) -> None:
    body = get_json(server, "/api/sessions?" + query, status=400)
    assert fragment in body["error"]


def test_session_is_its_phi_core_json(server: ViewerServer, store_dir: Path) -> None:
    code, _, body = request(server, f"/api/sessions/{PARENT_ID}")
    assert code == 200
    stored = (store_dir / f"{PARENT_ID}.json").read_bytes()
    assert encode_session(decode_session(body)) == stored
    assert json.loads(body)["loops"][0]["child_loop_refs"][0]["child_session_id"] == CHILD_ID


def test_events_in_order(server: ViewerServer, store_dir: Path) -> None:
    rows = get_json(server, f"/api/sessions/{BASIC_ID}/events")
    session = decode_session((store_dir / f"{BASIC_ID}.json").read_bytes())
    expected = [(loop.loop_id, item.sequence) for loop in session.loops for item in loop.events]
    assert [(row["loop_id"], row["sequence"]) for row in rows] == expected
    assert rows[0]["event"]["type"] == "AgentStart" and rows[-1]["event"]["type"] == "AgentEnd"
    # Each event is phi-core's own JSON for it.
    decode_event(json.dumps(rows[1]["event"]))


def test_unknown_and_invalid_ids(server: ViewerServer) -> None:
    assert "no-such-session" in get_json(server, "/api/sessions/no-such-session", status=404)["error"]
    get_json(server, "/api/sessions/no-such-session/events", status=404)
    for path in (
        "/api/sessions/..",
        "/api/sessions/%2e%2e",
        "/api/sessions/..%2F..%2Fetc%2Fpasswd",
        "/api/sessions/.hidden",
        "/api/sessions/a%00b",
        "/api/sessions/../../etc/passwd",
        "/api/sessions/a%5Cb",
    ):
        assert "session id" in get_json(server, path, status=400)["error"], path
    assert get_json(server, "/api/sessions/%ff", status=400)["error"]
    get_json(server, f"/api/sessions/{BASIC_ID}/nothing", status=404)
    get_json(server, f"/api/sessions/{BASIC_ID}?x=1", status=400)


def test_stats(server: ViewerServer) -> None:
    by_agent = get_json(server, "/api/stats")
    assert len(by_agent) == 5 and sum(row["sessions"] for row in by_agent) == 5
    by_model = get_json(server, "/api/stats?by=model")
    assert [row["key"] for row in by_model] == [
        "anthropic/claude-haiku-4-5",
        "anthropic/claude-sonnet-4-5",
        "openai/gpt-4o",
    ]
    assert sum(row["usage"]["total_tokens"] for row in by_model) == 2970
    # Named as in the URL, not as the library's parameter (group_by).
    assert get_json(server, "/api/stats?by=week", status=400)["error"].startswith("by: expected one of")
    assert get_json(server, "/api/stats?group=agent", status=400)["error"]


def test_read_only_methods(server: ViewerServer) -> None:
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        code, headers, body = request(server, f"/api/sessions/{BASIC_ID}", method=method)
        assert code == 405 and headers["Allow"] == "GET, HEAD" and "read-only" in json.loads(body)["error"]
    code, headers, body = request(server, "/api/sessions", method="HEAD")
    assert code == 200 and body == b"" and int(headers["Content-Length"]) > 0


def test_foreign_host_header_is_refused(server: ViewerServer) -> None:
    # DNS rebinding: a page of evil.example resolving to 127.0.0.1 must not read sessions.
    code, _, body = request(server, "/api/sessions", headers={"Host": "evil.example"})
    assert code == 403 and "Host" in json.loads(body)["error"]
    port = server.server_address[1]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
        assert request(server, "/api/sessions", headers={"Host": host})[0] == 200, host


@pytest.mark.parametrize("host", ["127.1", "0x7f.1", "127.000.000.001"])
def test_a_loopback_address_not_spelled_127_0_0_1_still_refuses_foreign_host_headers(
    store_dir: Path, host: str
) -> None:
    # The guard goes by the address bound, not by the text of --host (a name such as
    # $(hostname) may resolve to 127.0.1.1); that text is answered to, as loopback names.
    with JsonDirStore(store_dir) as store, running_server(store, host=host) as server:
        assert server.server_address[0] == "127.0.0.1"
        code, _, body = request(server, "/api/sessions", headers={"Host": "evil.example:8765"})
        assert code == 403 and "Host" in json.loads(body)["error"]
        port = server.server_address[1]
        for name in (host, f"{host}:{port}", f"localhost:{port}", f"127.0.0.1:{port}"):
            assert request(server, "/api/sessions", headers={"Host": name})[0] == 200, name


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1:80@attacker.com",
        "localhost:evil",
        "localhost:80:80",
        "user@localhost",
        "localhost evil",
        "127.0.0.1.attacker.com",
        "[::1]x",
        "",
    ],
)
def test_a_malformed_or_foreign_host_header_is_refused(server: ViewerServer, host: str) -> None:
    code, headers, body = request(server, "/api/sessions", headers={"Host": host})
    assert code == 403 and "Host" in json.loads(body)["error"], host
    assert headers["Content-Security-Policy"].startswith("default-src 'none'")


def raw_request(server: ViewerServer, data: bytes) -> bytes:
    """Send `data` as is on a new connection; everything the server answers."""
    host, port = server.server_address[:2]
    with socket.create_connection((str(host), port), timeout=20) as connection:
        connection.sendall(data)
        chunks = []
        while chunk := connection.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize(
    "target",
    [
        b"http://attacker.example/api/sessions?limit=1",
        b"http://127.0.0.1@attacker.example/api/sessions",
        b"http://attacker.example:80/",
        b"http:/api/sessions",
        b"api/sessions",
    ],
)
def test_a_request_target_naming_a_foreign_host_is_refused(server: ViewerServer, target: bytes) -> None:
    # A full URL in the request line (absolute form, as to a proxy) names the host the
    # server must go by (RFC 9112 3.2.2): its path was served whatever host it named.
    answer = raw_request(
        server, b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 403"), (target, answer[:100])
    port = server.server_address[1]
    for host in (b"127.0.0.1", b"localhost:%d" % port):
        ours = (
            b"GET http://"
            + host
            + b"/api/sessions?limit=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        assert raw_request(server, ours).startswith(b"HTTP/1.1 200"), host


def test_a_request_without_a_host_header_is_refused(server: ViewerServer) -> None:
    answer = raw_request(server, b"GET /api/sessions HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 403"), answer[:100]
    two = b"GET /api/sessions HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
    assert raw_request(server, two).startswith(b"HTTP/1.1 403")


def test_a_request_body_never_smuggles_another_request(server: ViewerServer) -> None:
    """The viewer reads no body: on a kept-alive connection, a GET's body was answered as
    the next request (a desync behind a proxy that sent it as a body)."""
    smuggled = b"GET /api/stats HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    for framing in (b"Content-Length: %d\r\n" % len(smuggled), b"Transfer-Encoding: chunked\r\n"):
        answer = raw_request(
            server, b"GET /api/sessions HTTP/1.1\r\nHost: localhost\r\n" + framing + b"\r\n" + smuggled
        )
        assert answer.startswith(b"HTTP/1.1 200") and answer.count(b"HTTP/1.1 ") == 1, answer[:200]
    conflicting = b"Content-Length: 1\r\nContent-Length: 2\r\n\r\n"
    answer = raw_request(server, b"GET /api/sessions HTTP/1.1\r\nHost: localhost\r\n" + conflicting)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]


@pytest.mark.parametrize(
    "field",
    [
        b"Content-Length : 44\r\n",  # whitespace before the colon (RFC 9112 5.1)
        b"Transfer-Encoding : chunked\r\n",
        b"Content-Length\t: 44\r\n",
        b"Cont(ent-Length: 44\r\n",  # no token
        b"no colon at all\r\nContent-Length: 44\r\n",
        b" X-Folded: 1\r\n",  # a continuation line first
        b"From x\r\n",  # a mailbox's envelope line to the email parser
        b"X-A: 1\r\n folded: 2\r\n",  # obs-fold (RFC 9112 5.2)
    ],
)
def test_a_malformed_header_field_is_400_and_the_connection_closed(
    server: ViewerServer, field: bytes
) -> None:
    # "Content-Length : 44" was no header to the framing, whose body then was answered
    # as a second request: two answers to one request, the second to /smuggled.
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    answer = raw_request(
        server, b"GET /api/stats HTTP/1.1\r\nHost: localhost\r\n" + field + b"\r\n" + smuggled
    )
    assert answer.startswith(b"HTTP/1.1 400") and answer.count(b"HTTP/1.1 ") == 1, answer[:300]
    assert b"\r\nConnection: close\r\n" in answer


SECURITY_HEADERS = (
    "Content-Security-Policy",
    "X-Content-Type-Options",
    "X-Frame-Options",
    "Referrer-Policy",
    "Cross-Origin-Resource-Policy",
    "Cache-Control",
)


@pytest.mark.parametrize(
    "data",
    [
        b"FROB /api/sessions HTTP/1.1\r\nHost: localhost\r\n\r\n",  # 501: no such method
        b"GET /api/sessions HTTP/9.9\r\nHost: localhost\r\n\r\n",  # 505: version
        b"GET\r\n\r\n",  # 400: bad request line
        b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n",  # 414: request line too long
    ],
)
def test_the_http_servers_own_error_pages_carry_the_security_headers(
    server: ViewerServer, data: bytes
) -> None:
    answer = raw_request(server, data)
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert status >= 400, head
    for name in SECURITY_HEADERS:
        assert f"\r\n{name}: ".encode() in head, (name, head)
    assert json.loads(body)["error"]


@pytest.mark.parametrize(
    "query",
    [
        "limit=" + "9" * 5000,
        "min_tokens=" + "9" * 5000,
        "since=" + "9" * 40 + "d",
        "since=99999999999w",
        "limit=99999999999999999999",
    ],
)
def test_huge_filter_values_are_400_not_500(server: ViewerServer, query: str) -> None:
    body = get_json(server, "/api/sessions?" + query, status=400)
    assert query.split("=")[0] in body["error"] and len(body["error"]) < 300


def test_status_names_are_case_insensitive(server: ViewerServer) -> None:
    lower = get_json(server, "/api/sessions?status=completed")
    assert lower == get_json(server, "/api/sessions?status=Completed") and len(lower) == 5


def test_store_failure_is_500_json(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text('{"session_id": 1}')
    with JsonDirStore(tmp_path) as store, running_server(store) as server:
        body = get_json(server, "/api/sessions/broken", status=500)
        assert "session_id" in body["error"]


def test_a_json_store_directory_removed_while_serving_is_500_not_an_empty_store(tmp_path: Path) -> None:
    # The page showed "0 sessions" (200 with none); an SQLite store gone says so in a 500.
    directory = tmp_path / "sessions"
    with JsonDirStore(directory) as writer:
        record_into(writer, example_lines())
    with JsonDirStore(directory, read_only=True) as store, running_server(store) as server:
        assert len(get_json(server, "/api/session-page")["sessions"]) == len(EXAMPLE_IDS)
        shutil.rmtree(directory)
        for path in (
            "/api/session-page",
            "/api/stats",
            "/api/search?q=hello",
            f"/api/sessions/{PARENT_ID}/overview",
        ):
            assert get_json(server, path, 500) == {"error": f"no store directory at {directory}"}


def test_concurrent_requests(server: ViewerServer) -> None:
    base = server.url
    paths = [f"api/sessions/{session_id}" for session_id in EXAMPLE_IDS] * 4 + ["api/sessions"] * 4

    def fetch(path: str) -> int:
        with urllib.request.urlopen(base + path, timeout=10) as response:
            response.read()
            return int(response.status)

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert set(pool.map(fetch, paths)) == {200}


def test_serves_an_sqlite_store(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "sessions.db") as store:
        record_into(store, example_lines())
        with running_server(store) as server:
            assert sorted(ids(get_json(server, "/api/sessions"))) == sorted(EXAMPLE_IDS)
            with ThreadPoolExecutor(max_workers=4) as pool:
                bodies = list(pool.map(lambda _: request(server, f"/api/sessions/{PARENT_ID}")[2], range(8)))
            assert len(set(bodies)) == 1 and json.loads(bodies[0])["session_id"] == PARENT_ID


def test_urllib_client_sees_json_errors(server: ViewerServer) -> None:
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(server.url + "api/sessions/nope", timeout=10)
    assert caught.value.code == 404
    assert json.loads(caught.value.read())["error"]


def test_is_loopback() -> None:
    for host in ("127.0.0.1", "127.1.2.3", "localhost", "::1", "[::1]", "LOCALHOST"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "192.168.1.4", "example.com", "::", "localhost.example.com"):
        assert not is_loopback(host), host


def test_an_ipv4_mapped_loopback_address_is_loopback(store_dir: Path) -> None:
    # Python before 3.13 says ::ffff:127.0.0.1 is not loopback: bound there, the viewer
    # answered any Host header (DNS rebinding) and serve warned anyone could read it.
    for host in ("::ffff:127.0.0.1", "[::FFFF:127.1.2.3]", "::ffff:7f00:1"):
        assert is_loopback(host), host
    assert not is_loopback("::ffff:192.168.1.4")
    _skip_unless_bindable("::ffff:127.0.0.1")
    with JsonDirStore(store_dir) as store, running_server(store, host="::ffff:127.0.0.1") as server:
        assert server.host_guard.loopback_only
        assert request(server, "/api/sessions", headers={"Host": "attacker.example"})[0] == 403
        assert request(server, "/api/sessions", headers={"Host": "[::ffff:127.0.0.1]"})[0] == 200


def _skip_unless_bindable(address: str) -> None:
    """Skip the test when this machine cannot listen on the IPv6 `address`."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind((address, 0))
    except OSError:
        pytest.skip(f"{address} cannot be bound here")


def test_ipv6_loopback(store_dir: Path) -> None:
    _skip_unless_bindable("::1")
    with JsonDirStore(store_dir) as store, running_server(store, host="::1") as server:
        assert server.url.startswith("http://[::1]:")
        with urllib.request.urlopen(server.url + "api/sessions", timeout=10) as response:
            assert len(json.load(response)) == 5


def test_a_client_gone_mid_response_prints_no_traceback(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = SessionRecorder()
    tracer = Tracer(
        AgentSession(session_id="long"), sinks=[recorder], config=LoopConfigSnapshot(model="m", provider="p")
    )
    with tracer.loop() as loop:
        loop.user("word " * 2_000_000)  # a 10 MB answer: more than the socket buffers hold
        with loop.turn() as turn, turn.assistant() as reply:
            reply.finish("ok")
    tracer.close()
    recorder.flush()
    with JsonDirStore(tmp_path) as store, running_server(store) as server:
        for session in recorder.drain_completed():
            store.save(session)
        handled = threading.Event()
        shutdown_request = server.shutdown_request

        def done(request: Any) -> None:  # the request's thread ends: handled, error or not
            shutdown_request(request)
            handled.set()

        monkeypatch.setattr(server, "shutdown_request", done)
        host, port = server.server_address[:2]
        with socket.create_connection((str(host), port), timeout=20) as connection:
            connection.sendall(b"GET /api/sessions/long HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert connection.recv(1000).startswith(b"HTTP/1.1 200")
            # Gone at once, with a reset: the server's next write fails.
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        assert handled.wait(20)
    assert capfd.readouterr().err == ""


def test_a_client_silent_mid_request_is_let_go(
    store_dir: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    # Without a timeout every half-sent request held a thread for ever (any number of them).
    assert ViewerHandler.timeout is not None and ViewerHandler.timeout <= 60
    monkeypatch.setattr(ViewerHandler, "timeout", 0.5)
    with JsonDirStore(store_dir) as store, running_server(store) as server:
        host, port = server.server_address[:2]
        with socket.create_connection((str(host), port), timeout=20) as connection:
            connection.sendall(b"GET /api/sessions HTTP/1.1\r\nHost: localhost\r\n")  # no end
            assert connection.recv(1000) == b""  # closed by the server, unanswered
    assert "Traceback" not in capfd.readouterr().err


def test_a_get_with_a_body_closes_the_connection_after_answering(server: ViewerServer) -> None:
    # The body is never read: were the connection kept, its bytes would be read as the
    # next request (a request smuggled past whatever stands in front of the viewer).
    inner = b"GET /api/stats HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    for framing in (b"Content-Length: %d\r\n" % len(inner), b"Transfer-Encoding: chunked\r\n"):
        outer = b"GET /api/session-page?limit=1 HTTP/1.1\r\nHost: localhost\r\n" + framing + b"\r\n" + inner
        answer = raw_request(server, outer)
        assert answer.count(b"HTTP/1.1 ") == 1, answer[:200]
        assert answer.startswith(b"HTTP/1.1 200") and b"\r\nConnection: close\r\n" in answer
    answer = raw_request(
        server, b"HEAD /api/stats HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3\r\n\r\nabc"
    )
    assert answer.count(b"HTTP/1.1 ") == 1 and b"\r\nConnection: close\r\n" in answer


def test_a_client_trickling_its_request_head_is_let_go(
    store_dir: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    # The timeout bounds each read only: a byte every 40 s held a thread for ever (answered
    # 200 at 160 s). The whole head now has a deadline.
    assert ViewerHandler.head_timeout <= ViewerHandler.timeout <= 60
    monkeypatch.setattr(ViewerHandler, "head_timeout", 1.0)
    with JsonDirStore(store_dir) as store, running_server(store) as server:
        host, port = server.server_address[:2]
        with socket.create_connection((str(host), port), timeout=20) as connection:
            connection.sendall(b"GET /api/sessions HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
            for _ in range(300):  # a byte every 0.1 s, some 30 s at most
                if select.select([connection], [], [], 0.1)[0]:
                    break
                try:
                    connection.sendall(b"a")
                except OSError:  # closed by the server
                    break
            try:
                answer = connection.recv(1000)
            except ConnectionResetError:
                answer = b""
            assert answer == b""  # closed by the server, unanswered
    assert "Traceback" not in capfd.readouterr().err


def test_connections_beyond_the_cap_are_503_at_once(store_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each connection held a thread, without bound: 1,500 half-sent requests, 1,501 threads.
    assert ViewerServer.max_connections <= 256
    monkeypatch.setattr(ViewerServer, "max_connections", 2)
    with JsonDirStore(store_dir) as store, running_server(store) as server:
        address = server.server_address[:2]
        half_sent = b"GET /api/stats HTTP/1.1\r\nHost: localhost\r\n"
        with (
            socket.create_connection(address, timeout=20) as one,
            socket.create_connection(address, timeout=20) as two,
        ):
            one.sendall(half_sent)
            two.sendall(half_sent)
            answer = raw_request(server, b"")  # sends nothing: answered without being read
            assert answer.startswith(b"HTTP/1.1 503") and b"\r\nConnection: close\r\n" in answer, answer[:200]
            assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
            for name in SECURITY_HEADERS:
                assert f"\r\n{name}: ".encode() in answer, name
        # Their threads end as they go: the slots are free again.
        statuses = []
        for _ in range(200):
            try:
                status = request(server, "/api/stats")[0]
            except ConnectionError:  # refused before the request was sent in full
                status = 0
            statuses.append(status)
            if status == 200:
                break
        assert statuses[-1] == 200, statuses
