"""The viewer's paged API (web/pages.py): session pages by keyset, and a session served in pages."""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest

from phi_session.codec import decode_loop, decode_session, encode_event, encode_loop, encode_session
from phi_session.errors import StoreError
from phi_session.events import TurnStart
from phi_session.identity import AgentSession
from phi_session.instrument import Tracer
from phi_session.messages import TextContent, ToolCall
from phi_session.model import LoopConfigSnapshot, Session
from phi_session.recorder import SessionRecorder
from phi_session.stores.base import summarize, to_builtins
from phi_session.stores.conformance import EXAMPLES_DIR
from phi_session.stores.json_dir import JsonDirStore
from phi_session.stores.outline import PROMPT_CHARS, first_prompt
from phi_session.stores.sqlite import SqliteStore
from phi_session.views import SUB_AGENT_LOOPS, timeline
from phi_session.web import pages
from phi_session.web.pages import CLIP_BYTES, PAGE_BYTES, VIEW_CHARS
from phi_session.web.server import ViewerServer

from .test_web_api import get_json, ids, request
from .web_support import (
    BASIC_ID,
    BASIC_LOOPS,
    CHILD_ID,
    EXAMPLE_IDS,
    PARENT_ID,
    PARENT_LOOP,
    example_lines,
    record_into,
    running_server,
    session_of_texts,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from bench_viewer import huge_session  # lives in benchmarks/, not in the package

HUGE_LOOPS = 300


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pages-store")
    with JsonDirStore(directory) as store:
        record_into(store, example_lines())
        store.save(huge_session(HUGE_LOOPS))
    return directory


@pytest.fixture(scope="module")
def server(store_dir: Path) -> Iterator[ViewerServer]:
    with JsonDirStore(store_dir) as store, running_server(store) as running:
        yield running


def test_session_pages_walk_every_session_once(server: ViewerServer) -> None:
    everything = ids(get_json(server, "/api/sessions"))
    seen: list[str] = []
    path = "/api/session-page?limit=2"
    while True:
        page = get_json(server, path)
        assert len(page["sessions"]) <= 2
        seen += ids(page["sessions"])
        if page["next"] is None:
            break
        path = f"/api/session-page?limit=2&after={page['next']}"
    assert seen == everything and len(seen) == len(EXAMPLE_IDS) + 1
    # A last page that is exactly full offers no empty page after it.
    full = get_json(server, f"/api/session-page?limit={len(seen)}")
    assert len(full["sessions"]) == len(seen) and full["next"] is None


def test_session_page_default_size_and_filters(server: ViewerServer) -> None:
    page = get_json(server, "/api/session-page?order=tokens&agent=nobody")
    assert page == {"sessions": [], "next": None}
    assert "after" in get_json(server, "/api/session-page?after=bogus", 400)["error"]
    assert "order" in get_json(server, "/api/session-page?after=tokens:1:x", 400)["error"]


def test_a_blank_session_page_size_is_the_default_and_zero_is_refused(tmp_path: Path) -> None:
    # A blank limit listed every session in one page; 0 gave an empty page, where the other
    # paged views answer 400.
    with SqliteStore(tmp_path / "s.db") as store, running_server(store) as running:
        for number in range(51):
            store.save(huge_session(1, f"s{number}"))
        for query in ("", "?limit=", "?limit=%20"):
            page = get_json(running, f"/api/session-page{query}")
            assert len(page["sessions"]) == 50 and page["next"] is not None, query
        assert (
            "limit must be a whole number from 1"
            in get_json(running, "/api/session-page?limit=0", 400)["error"]
        )


def test_overview_has_no_loops_but_the_totals(server: ViewerServer, store_dir: Path) -> None:
    overview = get_json(server, f"/api/sessions/{PARENT_ID}/overview")
    stored = decode_session((store_dir / f"{PARENT_ID}.json").read_bytes())
    assert overview["session"]["loops"] == [] and overview["session"]["session_id"] == PARENT_ID
    assert overview["summary"]["loop_count"] == len(stored.loops)
    assert overview["event_count"] == sum(len(loop.events) for loop in stored.loops)
    assert overview["first_prompt"] == first_prompt(stored) and overview["first_prompt"]
    listed = next(row for row in get_json(server, "/api/sessions") if row["session_id"] == PARENT_ID)
    assert listed["first_prompt"] == overview["first_prompt"]  # a summary column: no overview needed
    assert set(overview["cost"]) == {"usd", "sources", "unpriced"}  # usd null when unknown, never 0


def test_loops_in_tree_order_then_one_loop_with_turns(server: ViewerServer, store_dir: Path) -> None:
    page = get_json(server, f"/api/sessions/{PARENT_ID}/loops")
    rows = page["loops"]
    assert page["total"] == len(rows) >= 1
    first = rows[0]
    assert first["loop"]["loop_id"] == PARENT_LOOP and first["depth"] == 0
    assert first["loop"]["turns"] == [] and first["loop"]["events"] == [] and first["turn_count"] == 2
    loop = get_json(server, f"/api/sessions/{PARENT_ID}/loops/{first['index']}")
    stored = decode_session((store_dir / f"{PARENT_ID}.json").read_bytes()).loops[first["index"]]
    assert len(loop["turns"]) == len(stored.turns) and loop["events"] == []
    assert decode_loop(json.dumps(loop)).turns == stored.turns


def test_huge_session_pages(server: ViewerServer) -> None:
    base = "/api/sessions/huge-session"
    page = get_json(server, f"{base}/loops?limit=100&offset=250")
    assert page["total"] == HUGE_LOOPS and len(page["loops"]) == 50
    # A chain of continuations: each one level deeper, in order.
    assert [row["index"] for row in page["loops"]] == list(range(250, 300))
    assert [row["depth"] for row in page["loops"]] == list(range(250, 300))
    log = get_json(server, f"{base}/event-log?limit=50&offset=100")
    assert len(log["events"]) == 50 and log["total"] == sum(log["types"].values())
    ends = get_json(server, f"{base}/event-log?type=TurnEnd&limit=5000")
    assert ends["total"] == log["types"]["TurnEnd"] == HUGE_LOOPS * 4
    assert {row["event"]["type"] for row in ends["events"]} == {"TurnEnd"}
    one = get_json(server, f"{base}/event-log?loop=7")
    assert {row["loop_index"] for row in one["events"]} == {7} and one["total"] == len(one["events"])
    bars = get_json(server, f"{base}/timeline?limit=10")
    assert bars["bars"][0]["kind"] == "session" and bars["loops"] == HUGE_LOOPS and bars["next"] == 10
    assert bars["bars"][0]["offset_ms"] == 0 and bars["bars"][0]["duration_ms"] == bars["span_ms"]
    # Ten loops of 4 turns, each a model call and its tool calls.
    assert [bar["loop_index"] for bar in bars["bars"] if bar["kind"] == "loop"] == list(range(10))
    last = get_json(server, f"{base}/timeline?limit=10&offset={HUGE_LOOPS - 5}")
    assert last["next"] is None and last["bars"][0]["kind"] == "loop"
    assert all(bar["cost"] is not None for bar in last["bars"] if bar["kind"] in ("loop", "turn"))


def test_timeline_places_the_sub_agent_under_its_tool_call(server: ViewerServer) -> None:
    bars = get_json(server, f"/api/sessions/{PARENT_ID}/timeline")["bars"]
    child = next(
        i for i, bar in enumerate(bars) if bar["kind"] == "session" and bar["session_id"] == CHILD_ID
    )
    assert bars[child - 1]["kind"] == "tool" and bars[child - 1]["loop_id"] == PARENT_LOOP
    assert all(bar["offset_ms"] >= 0 and bar["duration_ms"] >= 0 for bar in bars)


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("/loops?limit=5001", "limit must be a whole number below 5001"),
        ("/loops?offset=-1", "offset must be a whole number"),
        ("/loops?colour=1", "unknown query parameter 'colour'"),
        ("/loops/99", "loop index must be a whole number below"),
        ("/loops/x", "loop index must be a whole number"),
        ("/event-log?loop=99", "loop must be a whole number below"),
        ("/overview?x=1", "unknown query parameter 'x'"),
        ("/overview?cost=no", "cost must be 0 (not priced) or 1, got 'no'"),  # was priced
        ("/overview?cost=false", "cost must be 0 (not priced) or 1, got 'false'"),
        ("/timeline?limit=501", "limit must be a whole number below 501"),
        ("/cost?limit=501", "limit must be a whole number below 501"),
        ("/cost?type=x", "unknown query parameter 'type'"),
    ],
)
def test_bad_page_requests_are_400(server: ViewerServer, path: str, fragment: str) -> None:
    assert fragment in get_json(server, f"/api/sessions/{PARENT_ID}{path}", 400)["error"]


def test_unknown_session_and_view(server: ViewerServer) -> None:
    assert "no-such" in get_json(server, "/api/sessions/no-such/overview", 404)["error"]
    get_json(server, f"/api/sessions/{PARENT_ID}/loops/0/more", 404)
    get_json(server, "/api/sessions/../overview", 400)


def test_cache_sees_a_new_save_after_it_expires(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "s.db") as store, running_server(store) as running:
        record_into(store, example_lines())
        get_json(running, f"/api/sessions/{PARENT_ID}/overview")
        store.delete(PARENT_ID)
        get_json(running, f"/api/sessions/{PARENT_ID}/overview")  # still cached
        running.sessions.ttl = 0  # expired at once
        get_json(running, f"/api/sessions/{PARENT_ID}/overview", 404)


@pytest.mark.parametrize("view", ["loops/4", "event-log?offset=100", "timeline", "cost"])
def test_a_session_saved_anew_within_the_cache_is_read_again_not_an_internal_error(
    tmp_path: Path, view: str
) -> None:
    # Deleted and recorded again shorter while its outline is cached: the pages must not
    # mix the two (unpacking loops that are gone was a 500).
    with SqliteStore(tmp_path / "s.db") as store, running_server(store) as running:
        store.save(huge_session(5, "again"))
        assert get_json(running, "/api/sessions/again/loops")["total"] == 5
        store.delete("again")
        store.save(huge_session(2, "again"))
        if view == "loops/4":
            assert "below 2" in get_json(running, f"/api/sessions/again/{view}", 400)["error"]
        else:
            get_json(running, f"/api/sessions/again/{view}")
        assert get_json(running, "/api/sessions/again/loops")["total"] == 2


@pytest.mark.parametrize("anew", [False, True], ids=["merged", "deleted-first"])
@pytest.mark.parametrize("view", ["event-log", "loops/0", "timeline", "cost"])
def test_a_session_saved_again_with_the_same_loop_ids_is_read_again_as_stored_now(
    tmp_path: Path, anew: bool, view: str
) -> None:
    # A running agent's snapshot (its first loop's first 5 events), then the same loop saved
    # again whole with a second one: the cached outline's counts (5 events in 1 loop) paged
    # 8 of the 25 events stored, the same loop ids hiding the change for up to a minute.
    first = [line for line in example_lines() if f'{BASIC_LOOPS[0]}"' in line][:5]
    basic = [line for line in example_lines() if BASIC_ID in line]  # its loop ids hold it too
    base = f"/api/sessions/{BASIC_ID}"
    with SqliteStore(tmp_path / "s.db") as store, running_server(store) as running:
        record_into(store, first)
        assert get_json(running, f"{base}/event-log")["total"] == 5
        if anew:
            store.delete(BASIC_ID)
        record_into(store, basic)
        stored = _events_of(store.load(BASIC_ID))
        assert len(stored) == 25
        get_json(running, f"{base}/{view}")  # reads a loop: finds the outline stale
        assert _paged_events(running, f"{base}/event-log?type=", 4) == stored
        assert get_json(running, f"{base}/overview?cost=0")["event_count"] == 25
        assert [row["event_count"] for row in get_json(running, f"{base}/loops")["loops"]] == [18, 7]


def test_a_loop_saved_again_while_its_outline_loads_is_served_not_a_conflict(tmp_path: Path) -> None:
    """A running agent saving faster than the outline loads: the outline read afresh after
    a stale one was stale again by the time its loop was read, and the page answered 409."""
    loop = [line for line in example_lines() if f'{BASIC_LOOPS[0]}"' in line]
    base = f"/api/sessions/{BASIC_ID}"
    with SqliteStore(tmp_path / "s.db") as store, running_server(store) as running:
        record_into(store, loop[:5])
        assert get_json(running, f"{base}/event-log")["total"] == 5
        record_into(store, loop[:8])  # the cached outline is stale
        load_outline = store.load_outline

        def saved_meanwhile(session_id: str) -> Any:
            outline = load_outline(session_id)
            store.load_outline = load_outline  # type: ignore[method-assign]
            record_into(store, loop[:11])  # the agent saves again before the page reads the loop
            return outline

        store.load_outline = saved_meanwhile  # type: ignore[method-assign]
        total = get_json(running, f"{base}/event-log")["total"]
        assert total == len(_events_of(store.load(BASIC_ID))) == 9  # the 11th save, merged
        assert get_json(running, f"{base}/overview?cost=0")["event_count"] == total


def test_parallel_requests_after_a_change_load_the_outline_once(tmp_path: Path) -> None:
    """8 parallel requests after one save each found the cached outline stale and each
    loaded the whole outline again (8 loads); a request could also drop the fresh entry
    another had just loaded."""
    first = [line for line in example_lines() if f'{BASIC_LOOPS[0]}"' in line][:5]
    basic = [line for line in example_lines() if BASIC_ID in line]
    base = f"/api/sessions/{BASIC_ID}"
    with SqliteStore(tmp_path / "s.db") as store, running_server(store) as running:
        record_into(store, first)
        assert get_json(running, f"{base}/event-log")["total"] == 5
        record_into(store, basic)
        loads: list[str] = []
        load_outline = store.load_outline

        def counted(session_id: str) -> Any:
            loads.append(session_id)
            time.sleep(0.05)  # long enough for the others to find the entry stale meanwhile
            return load_outline(session_id)

        store.load_outline = counted  # type: ignore[method-assign]
        answers: list[int] = []
        threads = [
            threading.Thread(target=lambda: answers.append(get_json(running, f"{base}/event-log")["total"]))
            for _ in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert answers == [25] * 8
        assert len(loads) == 1


def test_requests_waiting_for_an_outline_load_that_fails_share_its_error(tmp_path: Path) -> None:
    """Requests waiting for a failing outline load each loaded again after it, one after
    another (6 requests of a load failing after 0.3 s: the last answered after 1.8 s)."""
    with SqliteStore(tmp_path / "s.db") as store:
        store.save(huge_session(1, "s-1"))
        cache = pages.SessionCache(store)
        loads: list[str] = []

        def failing(session_id: str) -> Any:
            loads.append(session_id)
            time.sleep(0.3)
            raise StoreError("the store timed out")

        store.load_outline = failing  # type: ignore[method-assign]
        took: list[float] = []

        def request() -> None:
            start = time.monotonic()
            with pytest.raises(StoreError, match="timed out"):
                cache.get("s-1")
            took.append(time.monotonic() - start)

        threads = [threading.Thread(target=request) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(took) == 6 and max(took) < 1.0
        assert len(loads) <= 2  # one load, another only for a request arriving after it ended


@pytest.mark.parametrize("found_gone", ["", "/events", "/timeline", "/loops/0", "/event-log", "/cost"])
def test_a_session_found_deleted_is_not_served_from_the_cache_any_more(
    tmp_path: Path, found_gone: str
) -> None:
    # Its 404s left its cached outline: for up to a minute the overview and the loop list
    # answered 200 with the deleted session, whose every loop failed to open.
    with SqliteStore(tmp_path / "s.db") as store, running_server(store) as running:
        store.save(huge_session(3, "gone"))
        get_json(running, "/api/sessions/gone/overview?cost=0")
        store.delete("gone")
        assert get_json(running, f"/api/sessions/gone{found_gone}", 404) == {"error": "no session 'gone'"}
        for view in ("overview?cost=0", "loops"):
            assert get_json(running, f"/api/sessions/gone/{view}", 404) == {"error": "no session 'gone'"}


@pytest.mark.parametrize("view", ["loops", "event-log", "timeline", "cost"])
def test_a_page_of_no_items_is_refused(server: ViewerServer, view: str) -> None:
    # Its next page would be itself: a client following `next` would never end.
    assert (
        "limit must be a whole number from 1"
        in get_json(server, f"/api/sessions/{PARENT_ID}/{view}?limit=0", 400)["error"]
    )


def test_first_prompt_is_cut() -> None:
    session = huge_session(1)
    prompt = first_prompt(session)
    assert prompt is not None and len(prompt) <= PROMPT_CHARS


def _events_of(session: Session, event_type: str | None = None) -> list[tuple[str | None, int | None, str]]:
    return [
        (None if item.loop is None else item.loop.loop_id, item.sequence, type(item.event).__name__)
        for item in session.iter_events()
        if event_type is None or type(item.event).__name__ == event_type
    ]


def _paged_events(server: ViewerServer, path: str, size: int) -> list[tuple[str | None, int | None, str]]:
    rows: list[tuple[str | None, int | None, str]] = []
    while True:
        page = get_json(server, f"{path}&limit={size}&offset={len(rows)}")
        rows += [(row["loop_id"], row["sequence"], row["event"]["type"]) for row in page["events"]]
        if len(rows) >= page["total"]:
            assert len(rows) == page["total"]
            return rows


def test_a_page_of_the_timeline_draws_a_few_loops_of_a_long_sub_agent_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A sub-agent session that went on for thousands of loops was loaded whole and drawn
    # whole on the page of the loop that spawned it (limit=1: 9,007 bars, 3.9 MB).
    recorder = SessionRecorder()
    config = LoopConfigSnapshot(model="m", provider="p")
    parent = Tracer(AgentSession(session_id="parent"), sinks=[recorder], config=config)
    with parent.loop() as loop, loop.turn() as turn:
        with turn.assistant() as reply:
            reply.finish(tool_calls=[ToolCall(id="c1", name="worker", arguments={})])
        with turn.tool(turn.tool_calls[0]) as tool:
            with tool.sub_agent() as child:
                child.user("start")
            tool.result("done")
    parent.close()
    recorder.flush()
    sessions = {session.session_id: session for session in recorder.drain_completed()}
    [child_id] = set(sessions) - {"parent"}
    more = Tracer(sinks=[recorder], config=config).for_session(sessions[child_id])
    for number in range(2 * SUB_AGENT_LOOPS):  # the sub-agent session goes on
        with more.loop() as loop, loop.turn() as turn, turn.assistant() as reply:
            reply.finish(f"ok {number}")
    more.close()
    recorder.flush()
    with SqliteStore(tmp_path / "s.db") as store:
        for session in [*sessions.values(), *recorder.drain_completed()]:
            store.save(session)

        def no_whole_session(self: SqliteStore, session_id: str) -> Session:
            raise AssertionError(f"the whole session {session_id} was loaded")

        monkeypatch.setattr(SqliteStore, "load", no_whole_session)
        with running_server(store) as server:
            bars = get_json(server, "/api/sessions/parent/timeline?limit=1")["bars"]
    drawn = [bar for bar in bars if bar["session_id"] == child_id]
    assert drawn[0]["kind"] == "session"
    assert drawn[0]["detail"] == f"{SUB_AGENT_LOOPS} of {2 * SUB_AGENT_LOOPS + 1} loops drawn"
    loops = [bar["loop_index"] for bar in drawn if bar["kind"] == "loop"]
    assert loops == list(range(SUB_AGENT_LOOPS))


def _spawning(turn: Any, depth: int) -> None:
    """A reply calling ``worker``, whose tool call spawns a sub-agent doing the same, `depth`
    sessions deep."""
    with turn.assistant() as reply:
        reply.finish(tool_calls=[ToolCall(id="c1", name="worker", arguments={})] if depth else None)
    if depth:
        with turn.tool(turn.tool_calls[0]) as tool:
            with tool.sub_agent() as child, child.turn() as child_turn:
                _spawning(child_turn, depth - 1)
            tool.result("done")


def test_a_page_of_the_timeline_draws_the_sub_agents_of_its_own_loops_not_theirs(tmp_path: Path) -> None:
    # Sub-agents of sub-agents were drawn without end: a chain of 2,000 sessions, each the
    # sub-agent of the one before, drew all of them on one page (14,000 bars, 5.2 MB, 3.8 s).
    recorder = SessionRecorder()
    parent = Tracer(
        AgentSession(session_id="parent"),
        sinks=[recorder],
        config=LoopConfigSnapshot(model="m", provider="p"),
    )
    with parent.loop() as loop:
        loop.user("go")
        with loop.turn() as turn:
            _spawning(turn, 4)
    parent.close()
    recorder.flush()
    with SqliteStore(tmp_path / "s.db") as store:
        sessions = recorder.drain_completed()
        for session in sessions:
            store.save(session)
        [child] = [
            s for s in sessions if s.parent_spawn_ref and s.parent_spawn_ref.parent_session_id == "parent"
        ]
        with running_server(store) as server:
            bars = get_json(server, "/api/sessions/parent/timeline?limit=1")["bars"]
    assert {bar["session_id"] for bar in bars} == {"parent", child.session_id}
    [child_bar] = [bar for bar in bars if bar["kind"] == "session" and bar["session_id"] == child.session_id]
    assert child_bar["detail"] == "1 sub-agent session of its own not drawn (open it)"
    assert any(bar["kind"] == "tool" and bar["session_id"] == child.session_id for bar in bars)


def _paged_bars(server: ViewerServer, path: str, size: int) -> list[tuple[str, int, str, str, str | None]]:
    rows: list[tuple[str, int, str, str, str | None]] = []
    offset: int | None = 0
    while offset is not None:
        page = get_json(server, f"{path}limit={size}&offset={offset}")
        assert page["offset"] == offset and all(
            -1e-6 <= bar["offset_ms"] <= page["span_ms"] for bar in page["bars"]
        )
        rows += [(bar["kind"], bar["depth"], bar["label"], bar["start"], bar["end"]) for bar in page["bars"]]
        offset = page["next"]
    return rows


@pytest.mark.spec  # phi-core's example stream
def test_a_session_opens_from_its_outline_and_pages_events_loop_by_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    huge = huge_session(40)
    recorder = SessionRecorder(keep_session_events=True)
    for line in (EXAMPLES_DIR / "events-parallel.jsonl").read_bytes().splitlines():
        recorder.on_json(line)
    recorder.flush()
    [parallel] = recorder.drain_completed()
    assert parallel.session_events  # ParallelLoopStart/End
    with SqliteStore(tmp_path / "s.db") as store:
        store.save(huge)
        store.save(parallel)  # session-scoped events after the loops' own

        def no_whole_session(self: SqliteStore, session_id: str) -> Session:
            raise AssertionError("the whole session was loaded")

        monkeypatch.setattr(SqliteStore, "load", no_whole_session)
        with running_server(store) as server:
            for session in (huge, parallel):
                base = f"/api/sessions/{session.session_id}"
                overview = get_json(server, f"{base}/overview")
                assert overview["summary"] == json.loads(json.dumps(to_builtins(summarize(session))))
                assert overview["first_prompt"] == first_prompt(session)
                unpriced = get_json(server, f"{base}/overview?cost=0")  # what the session page asks
                assert unpriced["cost"] is None and unpriced["summary"] == overview["summary"]
                assert get_json(server, f"{base}/loops?limit=5")["total"] == len(session.loops)
                for size in (7, 44, 1000):
                    assert _paged_events(server, f"{base}/event-log?type=", size) == _events_of(session)
                assert _paged_events(server, f"{base}/event-log?type=TurnEnd", 3) == _events_of(
                    session, "TurnEnd"
                )
                for size in (1, 7, 500):  # the timeline, a page of loops at a time
                    assert _paged_bars(server, f"{base}/timeline?", size) == [
                        (bar.kind, bar.depth, bar.label, str(bar.start), bar.end and str(bar.end))
                        for bar in timeline(session)
                    ]
                cost = get_json(server, f"{base}/cost?offset=2&limit=3")
                assert cost["total"] == len(session.loops)
                assert [loop["loop_id"] for loop in cost["loops"]] == [r.loop_id for r in session.loops[2:5]]
            one = get_json(server, "/api/sessions/huge-session/event-log?loop=3&offset=40&limit=10")
            assert [row["sequence"] for row in one["events"]] == [40, 41, 42, 43] and one["total"] == 44
            assert (
                get_json(server, "/api/sessions/huge-session/loops/39")["loop_id"] == "huge-session.loop.39"
            )


def test_the_timeline_of_a_loop_that_never_ended_spans_to_its_last_recorded_event(tmp_path: Path) -> None:
    # An aborted loop (its stream cut off, no AgentEnd) drew an axis of 0 ms.
    from .test_recorder import record, start, ts, turn

    cut_off = TurnStart(loop_id="p.c.1", turn_index=1, triggered_by="Continuation", timestamp=ts(3000))
    _, [session] = record([start("p.c.1", "p"), *turn("p.c.1", 0, at=1000), cut_off])
    with SqliteStore(tmp_path / "s.db") as store:
        store.save(session)
        with running_server(store) as server:
            body = get_json(server, "/api/sessions/p/timeline")
    assert body["span_ms"] == 3000
    loop = next(bar for bar in body["bars"] if bar["kind"] == "loop")
    assert loop["status"] == "Aborted" and loop["end"] == str(ts(3000)) and loop["duration_ms"] == 3000


# -- long texts: cut in the views, given whole on demand; pages bounded in bytes -----------------

LONG_RESULT = "<b>r</b>\n" * 10_000 + "\u00e9" * 50_000  # 190,000 bytes of UTF-8
LONG_ARGUMENT = "w" * (CLIP_BYTES + 1)


def _at(tree: Any, pointer: str) -> Any:
    for token in pointer.split("/")[1:]:
        key = token.replace("~1", "/").replace("~0", "~")
        tree = tree[int(key)] if isinstance(tree, list) else tree[key]
    return tree


@pytest.fixture(scope="module")
def long_texts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ViewerServer, Session]]:
    session = session_of_texts("long", [LONG_RESULT, "short"], LONG_ARGUMENT)
    session.loops[0].error = "e" * (CLIP_BYTES + 5)  # in the loop list too
    with SqliteStore(tmp_path_factory.mktemp("long") / "s.db") as store, running_server(store) as running:
        store.save(session)
        yield running, session


def test_a_loop_view_cuts_each_long_text_and_the_field_view_gives_it_whole(
    long_texts: tuple[ViewerServer, Session],
) -> None:
    """A loop of twelve 5 MB tool results was one 91 MB answer."""
    server, session = long_texts
    loop = get_json(server, "/api/sessions/long/loops/0")
    stored = json.loads(encode_loop(msgspec.structs.replace(session.loops[0], events=[])))
    cuts = {cut["path"]: cut for cut in loop.pop("clipped")}
    assert len(loop.pop("turn_usages")) == len(stored["turns"])  # beside the stored loop's keys
    result = "/turns/0/tool_results/0/content/0/text"
    argument = "/turns/0/output_message/content/0/arguments/a~1b~0c"
    assert {result, argument, "/error", "/messages/1/content/0/arguments/a~1b~0c"} <= set(cuts)
    assert all(len(_at(stored, path).encode()) > CLIP_BYTES for path in cuts)
    assert cuts[result]["bytes"] == len(LONG_RESULT.encode()) == 190_000
    shown = _at(loop, result)
    assert shown.startswith(LONG_RESULT[:1000]) and shown.endswith("\u2026 [clipped: 190,000 bytes]")
    assert len(shown.encode()) <= CLIP_BYTES + 100
    # Everything else is the stored loop's, short texts whole.
    assert _at(loop, "/turns/0/tool_results/1/content/0/text") == "short"
    for path in cuts:
        assert _at(loop, path) != _at(stored, path)
        _set(loop, path, _at(stored, path))
    assert loop == stored
    for path, cut in cuts.items():
        assert get_json(server, f"/api/sessions/long/field?{cut['field']}") == _at(stored, path)
    assert len(request(server, "/api/sessions/long/loops/0")[2]) < 8 * CLIP_BYTES


def _set(tree: Any, pointer: str, value: Any) -> None:
    *parents, last = pointer.split("/")[1:]
    holder = _at(tree, "".join(f"/{token}" for token in parents))
    key = last.replace("~1", "/").replace("~0", "~")
    holder[int(key) if isinstance(holder, list) else key] = value


def test_the_event_log_and_loop_list_cut_long_texts_and_the_stores_and_exports_never(
    long_texts: tuple[ViewerServer, Session],
) -> None:
    server, session = long_texts
    log = get_json(server, "/api/sessions/long/event-log")
    events = {item.sequence: json.loads(encode_event(item.event)) for item in session.loops[0].events}
    assert len(log["events"]) == len(events) and log["next"] is None
    assert sum(len(row["clipped"]) for row in log["events"]) >= 5  # calls, results, turn and agent ends
    for row in log["events"]:
        for cut in row["clipped"]:
            whole = get_json(server, f"/api/sessions/long/field?{cut['field']}")
            assert whole == _at(events[row["sequence"]], cut["path"]) and len(whole.encode()) == cut["bytes"]
            _set(row["event"], cut["path"], whole)
        assert row["event"] == events[row["sequence"]]
    [row] = get_json(server, "/api/sessions/long/loops")["loops"]
    [cut] = row["clipped"]
    assert cut["path"] == "/error" and row["loop"]["error"].endswith(f"[clipped: {CLIP_BYTES + 5:,} bytes]")
    assert get_json(server, f"/api/sessions/long/field?{cut['field']}") == session.loops[0].error
    # The whole session's JSON (export) is as stored.
    assert request(server, "/api/sessions/long")[2] == encode_session(session, pretty=False)


NO_CUT = "0" * 32
SHORT_TEXT = hashlib.sha256(b"short").hexdigest()[:32]


@pytest.mark.parametrize(
    ("query", "status", "fragment"),
    [
        ("loop=1&digest=" + NO_CUT, 400, "loop must be a whole number below 1"),
        ("loop=x&digest=" + NO_CUT, 400, "loop must be a whole number"),
        # Digits str.isdigit takes and int() refuses: '²', and past int()'s 4,300 digits.
        ("loop=%C2%B2&digest=" + NO_CUT, 400, "loop must be a whole number"),
        ("loop=" + "1" * 5000 + "&digest=" + NO_CUT, 400, "loop must be a whole number"),
        ("event=0&digest=" + NO_CUT, 400, "event: this session has no session-scoped events"),
        ("digest=" + NO_CUT, 400, "name a loop"),
        ("sequence=1&digest=" + NO_CUT, 400, "unknown query parameter 'sequence'"),
        ("loop=0&path=/error", 400, "unknown query parameter 'path'"),
        ("loop=0", 400, "digest must be 32 lowercase hexadecimal digits"),
        ("loop=0&digest=" + "A" * 32, 400, "digest must be"),
        ("loop=0&digest=" + NO_CUT + "0", 400, "digest must be"),
        ("loop=0&digest=" + NO_CUT + "&x=1", 400, "unknown query parameter 'x'"),
        ("loop=0&event=999&digest=" + NO_CUT, 404, "none at 999"),
        ("loop=0&digest=" + NO_CUT, 404, "no text cut here has the digest"),
        ("loop=0&event=0&digest=" + NO_CUT, 404, "no text cut here has the digest"),
        ("loop=0&digest=" + SHORT_TEXT, 404, "no text cut here"),  # a text too short to be cut
    ],
)
def test_bad_field_requests_are_one_line_errors(
    long_texts: tuple[ViewerServer, Session], query: str, status: int, fragment: str
) -> None:
    body = get_json(long_texts[0], f"/api/sessions/long/field?{query}", status)
    assert list(body) == ["error"] and fragment in body["error"] and "\n" not in body["error"]


def test_an_event_log_page_ends_once_it_holds_its_bytes_and_pages_on_from_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page of 200 events of a session of twelve 5 MB tool results was 303 MB (three
    asked at once: the server's RSS 2.2 GB)."""
    session = session_of_texts("sized", [f"{n}" * 30_000 for n in range(10)])
    sizes_of = {item.sequence: len(encode_event(item.event)) for item in session.loops[0].events}
    monkeypatch.setattr(pages, "PAGE_BYTES", 100_000)
    with SqliteStore(tmp_path / "s.db") as store, running_server(store) as server:
        store.save(session)
        for event_type in ("", "MessageEnd"):
            expected = _events_of(session, event_type or None)
            seen: list[tuple[str | None, int | None, str]] = []
            offset: int | None = 0
            while offset is not None:
                page = get_json(server, f"/api/sessions/sized/event-log?type={event_type}&offset={offset}")
                assert page["total"] == len(expected) and 1 <= len(page["events"]) < 200
                # Full at the event that reached the budget, and not before.
                sizes = [sizes_of[row["sequence"]] for row in page["events"]]
                assert sum(sizes[:-1]) < 100_000 and (sum(sizes) >= 100_000 or page["next"] is None)
                seen += [(row["loop_id"], row["sequence"], row["event"]["type"]) for row in page["events"]]
                assert page["next"] == (len(seen) if len(seen) < len(expected) else None)
                offset = page["next"]
            assert seen == expected  # none skipped, none twice
        monkeypatch.setattr(pages, "PAGE_BYTES", 1)  # an event bigger than a page still comes, alone
        page = get_json(server, "/api/sessions/sized/event-log?offset=3")
        assert len(page["events"]) == 1 and page["next"] == 4
    assert PAGE_BYTES == 4 * 1024 * 1024


def _renumbered(session: Session, sequences: list[int]) -> Session:
    """`session` (one loop) with its events numbered `sequences`, through its JSON as a store reads it."""
    [loop] = session.loops
    events = [
        msgspec.structs.replace(item, sequence=n) for item, n in zip(loop.events, sequences, strict=True)
    ]
    return decode_session(
        encode_session(msgspec.structs.replace(session, loops=[msgspec.structs.replace(loop, events=events)]))
    )


@pytest.mark.parametrize(
    "numbering",
    [
        "shared",  # the two ToolExecutionEnd events share a sequence number
        "zero",  # every event's is 0
        "u64",  # sequences up to 2**64 - 1, past int64
    ],
)
def test_each_cut_of_the_event_log_gives_its_own_events_text_whatever_the_sequences(
    tmp_path: Path, numbering: str
) -> None:
    """A cut named its event by sequence: two events sharing one each gave the first's text,
    all of sequence 0 gave 404 and a sequence past 2**63 - 2 was refused (400)."""
    session = session_of_texts("seq", ["A" * 100_000, "B" * 100_000])
    count = len(session.loops[0].events)
    ends = [
        n for n, item in enumerate(session.loops[0].events) if type(item.event).__name__ == "ToolExecutionEnd"
    ]
    sequences = {
        "shared": [ends[0] if n == ends[1] else n for n in range(count)],
        "zero": [0] * count,
        "u64": [2**64 - count + n for n in range(count)],
    }[numbering]
    session = _renumbered(session, sequences)
    logged = [
        json.loads(encode_event(item.event))
        for item in sorted(session.loops[0].events, key=lambda item: item.sequence)
    ]
    with SqliteStore(tmp_path / "s.db") as store, running_server(store) as server:
        store.save(session)
        for event_type in ("", "ToolExecutionEnd"):
            log = get_json(server, f"/api/sessions/seq/event-log?type={event_type}")
            expected = [event for event in logged if event_type in ("", event["type"])]
            assert [row["event"]["type"] for row in log["events"]] == [event["type"] for event in expected]
            texts = set()
            for row, event in zip(log["events"], expected, strict=True):
                for cut in row["clipped"]:
                    whole = get_json(server, f"/api/sessions/seq/field?{cut['field']}")
                    assert whole == _at(event, cut["path"])
                    texts.add(whole[0])
            assert texts == {"A", "B"}


def test_a_cut_is_named_in_a_short_query_whatever_the_keys_above_it(tmp_path: Path) -> None:
    """A cut was named by its JSON pointer, percent-encoded into its query: under a key of
    11,000 'é' the query was 66 KB and the server refused it (414)."""
    session = session_of_texts("keys", ["r" * 100_000], "v" * 100_000, "\u00e9" * 11_000)
    loop = json.loads(encode_loop(msgspec.structs.replace(session.loops[0], events=[])))
    events = [json.loads(encode_event(item.event)) for item in session.loops[0].events]
    with SqliteStore(tmp_path / "s.db") as store, running_server(store) as server:
        store.save(session)
        shown = get_json(server, "/api/sessions/keys/loops/0")
        rows = get_json(server, "/api/sessions/keys/event-log")["events"]
        cut_in = [(loop, cut) for cut in shown["clipped"]]
        cut_in += [(events[n], cut) for n, row in enumerate(rows) for cut in row["clipped"]]
        assert sum("\u00e9" * 11_000 in cut["path"] for _, cut in cut_in) >= 3  # loop, call and end
        for tree, cut in cut_in:
            assert len(cut["field"]) < 100
            assert get_json(server, f"/api/sessions/keys/field?{cut['field']}") == _at(tree, cut["path"])


def test_a_cut_still_gives_its_text_once_its_loop_is_saved_again_with_more(tmp_path: Path) -> None:
    """The viewer reads a store agents may be writing: a loop saved again with a message
    more (ahead of its turns) must not make a shown cut give another text."""
    session = session_of_texts("grows", ["r" * 100_000, "s" * 100_000], "v" * 100_000)
    [loop] = session.loops
    with SqliteStore(tmp_path / "s.db") as store, running_server(store) as server:
        store.save(session)
        cuts = get_json(server, "/api/sessions/grows/loops/0")["clipped"]
        stored = json.loads(encode_loop(msgspec.structs.replace(loop, events=[])))
        more = msgspec.structs.replace(loop.messages[0], content=(TextContent(text="n" * 100_000),))
        store.save(
            msgspec.structs.replace(
                session, loops=[msgspec.structs.replace(loop, messages=(*loop.messages, more))]
            )
        )
        for cut in cuts:
            assert get_json(server, f"/api/sessions/grows/field?{cut['field']}") == _at(stored, cut["path"])


@contextmanager
def _first_loop_served(tmp_path: Path, session: Session) -> Iterator[tuple[ViewerServer, Any, bytes]]:
    """`session` saved alone and served: the server, its first loop's JSON as stored (without
    its events) and the loop view's answer for it."""
    stored = json.loads(encode_loop(msgspec.structs.replace(session.loops[0], events=[])))
    with SqliteStore(tmp_path / "s.db") as store, running_server(store) as server:
        store.save(session)
        yield server, stored, request(server, f"/api/sessions/{session.session_id}/loops/0")[2]


def test_long_keys_are_cut_too_and_given_whole_on_demand(tmp_path: Path) -> None:
    """Keys were never cut: a tool call of one argument under a key of 5,000,000 characters
    made its loop 10 MB, nothing listed as cut."""
    long_key = "K" * 5_000_000
    twins = ["k" * 70_000 + "a", "k" * 70_000 + "b"]  # cut alike: both must stay
    members = {long_key: "v" * 100_000, **dict.fromkeys(twins, "t"), "short": "s"}
    session = session_of_texts("keys", ["ok"])
    data = encode_session(session, pretty=False).replace(b'{"a/b~c":""}', msgspec.json.encode(members))
    session = decode_session(data)
    with _first_loop_served(tmp_path, session) as (server, loop, body):
        assert len(body) < 20 * CLIP_BYTES
        shown = json.loads(body)
        arguments = "/turns/0/output_message/content/0/arguments"
        shown_members = _at(shown, arguments)
        assert len(shown_members) == 4 and shown_members["short"] == "s"
        [big] = [key for key in shown_members if key.startswith("KKK")]
        assert big.endswith(f"\u2026 [clipped: {len(long_key):,} bytes]")
        assert shown_members[big].endswith("\u2026 [clipped: 100,000 bytes]")
        cuts = {(cut["path"], cut["key"]): cut for cut in shown.pop("clipped")}
        pointer = f"{arguments}/{big}"
        assert cuts[pointer, True]["bytes"] == len(long_key) and cuts[pointer, False]["bytes"] == 100_000
        wholes = {get_json(server, f"/api/sessions/keys/field?{cut['field']}") for cut in cuts.values()}
        assert {long_key, *twins, "v" * 100_000} <= wholes
        # Where a key was cut, the text under it is the stored loop's.
        assert _at(loop, "/turns/0/tool_results/0/content/0/text") == _at(
            shown, "/turns/0/tool_results/0/content/0/text"
        )
        body = request(server, "/api/sessions/keys/event-log")[2]
        assert len(body) < 60 * CLIP_BYTES
        for row in json.loads(body)["events"]:
            for cut in row["clipped"]:
                assert get_json(server, f"/api/sessions/keys/field?{cut['field']}") in {
                    long_key,
                    *twins,
                    "v" * 100_000,
                }


def test_past_a_budget_a_loop_view_cuts_shorter_texts_too(tmp_path: Path) -> None:
    """Only texts over 64 KiB were cut: a loop of 150 tool results of 65,000 bytes was 29 MB."""
    results = [f"{n:03}" + "y" * 64_997 for n in range(150)]
    session = session_of_texts("many", results)
    with _first_loop_served(tmp_path, session) as (server, stored, body):
        assert len(body) < 2 * VIEW_CHARS
        shown = json.loads(body)
        cuts = shown.pop("clipped")
        # The first whole, in document order (the loop's messages, then its turns); once the
        # budget is spent, cut to their first 1,024 characters.
        assert _at(shown, "/messages/2/content/0/text") == results[0]
        last = _at(shown, "/turns/0/tool_results/149/content/0/text")
        assert last == results[-1][:1024] + "\u2026 [clipped: 65,000 bytes]"
        assert all(len(cut["field"]) < 100 for cut in cuts) and len(cuts) > 150
        for cut in cuts[:: len(cuts) // 7]:
            assert get_json(server, f"/api/sessions/many/field?{cut['field']}") == _at(stored, cut["path"])
        for event in get_json(server, "/api/sessions/many/event-log?type=TurnEnd")["events"]:
            assert len(msgspec.json.encode(event)) < 2 * VIEW_CHARS  # a row's budget alike


def test_a_loop_view_gives_each_turns_usage_counting_the_replies_without_a_total(tmp_path: Path) -> None:
    # A turn of an untotalled claude-opus-4-1 reply and a gpt-4o-mini fallback reporting 1,100:
    # the viewer showed 1,100 (the summed usage's total); the loop view now gives 153,100.
    from phi_session.messages import Usage

    from .store_support import replies_session

    untotalled = Usage(input=100_000, output=2_000, cache_read=50_000)
    fallback = Usage(input=1_000, output=100, cache_read=400, total_tokens=1_100)
    session = replies_session(
        (("anthropic", "claude-opus-4-1", untotalled), ("openai", "gpt-4o-mini", fallback))
    )
    with SqliteStore(tmp_path / "s.db") as store, running_server(store) as server:
        store.save(session)
        loop = get_json(server, f"/api/sessions/{session.session_id}/loops/0")
    assert loop["turns"][0]["usage"]["total_tokens"] == 1_100  # as recorded
    assert [usage["total_tokens"] for usage in loop["turn_usages"]] == [153_100]
