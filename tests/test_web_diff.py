"""The viewer's ``/api/diff``: two loops or two sessions compared, errors as JSON."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlencode

import msgspec
import pytest

from phi_session.diff import LoopDiff, SessionDiff, diff_loops, diff_sessions
from phi_session.model import LoopRecord, Session
from phi_session.stores.json_dir import JsonDirStore
from phi_session.stores.sqlite import SqliteStore
from phi_session.web.server import ViewerServer

from .diff_support import BASE, Run, Step, Stored, record_runs, record_turnless, store_colon_ids, store_fork
from .test_web_api import get_json, request
from .web_support import running_server

FORK = [*BASE[:2], Step("Saturday: Orsay.\nSunday: Louvre."), Step("<img src=x onerror=alert(1)>")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Stored:
    return store_fork(tmp_path_factory.mktemp("diff-store"), FORK)


@pytest.fixture(scope="module")
def server(runs: Stored) -> Iterator[ViewerServer]:
    with JsonDirStore(runs.directory) as store, running_server(store) as running:
        yield running


def diff_path(**query: str) -> str:
    return "/api/diff?" + urlencode(query, quote_via=quote)


def test_a_fork_against_its_parent(server: ViewerServer, runs: Stored) -> None:
    session, parent, fork = runs.forked, runs.parent, runs.fork
    sid = session.session_id
    body = get_json(server, diff_path(a=f"{sid}:{parent}", b=f"{sid}:{fork}"))
    assert body["diff"] == "loops"
    assert [turn["status"] for turn in body["turns"]] == ["equal", "equal", "changed", "added"]
    assert body["first_divergence"]["turn"] == 2
    expected = diff_loops(session, parent, session, fork)
    assert msgspec.convert(body, LoopDiff | SessionDiff) == expected
    by_position = get_json(server, diff_path(a=f"{sid}:#1", b=f"{sid}:#2"))
    assert by_position == body
    apart = get_json(server, diff_path(a=sid, loop_a=parent, b=sid, loop_b="#2"))
    assert apart == body


def test_two_sessions(server: ViewerServer, runs: Stored) -> None:
    forked, other = runs.forked, runs.other
    body = get_json(server, diff_path(a=forked.session_id, b=other.session_id))
    assert body["diff"] == "sessions" and body["first_divergence"]["field"] == "loop"
    assert msgspec.convert(body, LoopDiff | SessionDiff) == diff_sessions(forked, other)


def test_two_loops_are_read_alone_not_their_sessions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Comparing two loops loaded both sessions whole and kept them cached (a session of
    # 5,000 loops: 7 s and ~1 GB for one comparison, where its overview takes 0.3 s).
    session, (parent, fork, rerun) = record_runs([Run(BASE), Run(FORK, fork_of=0), Run(BASE, fork_of=0)])
    other, [other_loop] = record_runs([Run(BASE)])
    sid = session.session_id
    read: list[tuple[str, int, int]] = []
    load_loops = SqliteStore.load_loops

    def reading_loops(self: SqliteStore, session_id: str, start: int, stop: int) -> list[LoopRecord]:
        read.append((session_id, start, stop))
        return load_loops(self, session_id, start, stop)

    def no_whole_session(self: SqliteStore, session_id: str) -> Session:
        raise AssertionError(f"the whole session {session_id} was loaded")

    with SqliteStore(tmp_path / "s.db") as store:
        store.save(session)
        store.save(other)
        monkeypatch.setattr(SqliteStore, "load_loops", reading_loops)
        monkeypatch.setattr(SqliteStore, "load", no_whole_session)
        with running_server(store) as running:
            body = get_json(running, diff_path(a=f"{sid}:{parent}", b=f"{sid}:#2"))
            across = get_json(running, diff_path(a=f"{sid}:#3", b=f"{other.session_id}:{other_loop}"))
            assert "no loop '#4'" in get_json(running, diff_path(a=f"{sid}:#4", b=f"{sid}:#1"), 404)["error"]
    assert msgspec.convert(body, LoopDiff | SessionDiff) == diff_loops(session, parent, session, fork)
    assert msgspec.convert(across, LoopDiff | SessionDiff) == diff_loops(session, rerun, other, other_loop)
    assert read == [(sid, 0, 1), (sid, 1, 2), (sid, 2, 3), (other.session_id, 0, 1)]


def test_a_loop_diff_reads_a_session_saved_anew_within_the_cache(tmp_path: Path) -> None:
    longer, _ = record_runs([Run(BASE), Run(FORK, fork_of=0), Run(BASE, fork_of=0)], "again")
    shorter, _ = record_runs([Run(FORK)], "again")
    with SqliteStore(tmp_path / "s.db") as store, running_server(store) as running:
        store.save(longer)
        get_json(running, diff_path(a="again:#1", b="again:#3"))  # its outline is cached
        store.delete("again")
        store.save(shorter)
        assert "no loop '#3'" in get_json(running, diff_path(a="again:#1", b="again:#3"), 404)["error"]
        body = get_json(running, diff_path(a="again:#1", b="again:#1"))
    assert msgspec.convert(body, LoopDiff | SessionDiff) == diff_loops(shorter, "#1", shorter, "#1")


@pytest.mark.parametrize("store_type", [SqliteStore, JsonDirStore])
def test_a_loop_diff_finds_a_loop_added_within_the_cache(
    tmp_path: Path, store_type: type[SqliteStore] | type[JsonDirStore]
) -> None:
    # A loop saved after the viewer cached the outline was a 404 until the entry expired.
    grown, (first, _, added) = record_runs([Run(BASE), Run(FORK, fork_of=0), Run(BASE, fork_of=0)], "grow")
    started = msgspec.structs.replace(grown, loops=grown.loops[:2])
    with store_type(tmp_path / "store") as store, running_server(store) as running:
        store.save(started)
        get_json(running, "/api/sessions/grow/overview")  # its outline is cached
        store.save(grown)
        for loop in (added, "#3"):
            body = get_json(running, diff_path(a=f"grow:{first}", b=f"grow:{loop}"))
            assert msgspec.convert(body, LoopDiff | SessionDiff) == diff_loops(grown, first, grown, added)
        assert "no loop '#4'" in get_json(running, diff_path(a="grow:#1", b="grow:#4"), 404)["error"]


def test_loops_without_turns_that_ended_otherwise(tmp_path: Path) -> None:
    # Two inputs rejected for other reasons were "identical".
    session, ids = record_turnless(tmp_path)
    sid = session.session_id
    with JsonDirStore(tmp_path) as store, running_server(store) as running:
        body = get_json(running, diff_path(a=f"{sid}:{ids['injection']}", b=f"{sid}:{ids['rate limited']}"))
    assert body["first_divergence"]["field"] == "loop" and body["first_divergence"]["turn"] is None
    assert [(c["path"], c["a"], c["b"]) for c in body["changes"]] == [
        ("loop.rejection", "prompt injection", "rate limited")
    ]
    expected = diff_loops(session, ids["injection"], session, ids["rate limited"])
    assert msgspec.convert(body, LoopDiff | SessionDiff) == expected


def test_two_sessions_whose_ids_hold_a_colon(tmp_path: Path) -> None:
    # "team:alpha" was read as loop "alpha" of session "team" (a 404 for its loop).
    sessions = store_colon_ids(tmp_path)
    with JsonDirStore(tmp_path) as store, running_server(store) as running:
        body = get_json(running, diff_path(a="team:alpha", b="team:beta"))
        expected = diff_sessions(sessions["team:alpha"], sessions["team:beta"])
        assert body["diff"] == "sessions" and msgspec.convert(body, LoopDiff | SessionDiff) == expected
        loops = get_json(running, diff_path(a="team:#1", b="team:beta", loop_b="#1"))  # still loops
        assert loops["diff"] == "loops" and loops["a"]["session_id"] == "team"


@pytest.mark.parametrize(
    ("query", "status", "fragment"),
    [
        ({"a": "{s}:#1"}, 400, "missing query parameter 'b'"),
        ({"a": "{s}:#1", "b": "{s}"}, 400, "on both sides"),
        ({"a": "{s}:#1", "b": "{s}:#7"}, 404, "no loop '#7'"),
        ({"a": "{s}:#1", "b": "nobody:#1"}, 404, "nobody"),
        ({"a": "..:#1", "b": "{s}:#1"}, 400, "unsafe session id"),
        ({"a": "{s}", "b": "{s}", "loop_a": ""}, 400, "loop_a: empty loop"),
        ({"a": "{s}:#1", "b": "{s}:#1", "c": "1"}, 400, "unknown query parameter 'c'"),
    ],
)
def test_errors(
    server: ViewerServer, runs: Stored, query: dict[str, str], status: int, fragment: str
) -> None:
    sid = runs.forked.session_id
    body = get_json(server, diff_path(**{key: value.format(s=sid) for key, value in query.items()}), status)
    assert fragment in body["error"]


def test_the_diff_page_is_the_one_page(server: ViewerServer) -> None:
    code, headers, body = request(server, "/")
    assert code == 200 and b'href="#/diff"' in body
    assert "script-src 'self'" in headers["Content-Security-Policy"]
