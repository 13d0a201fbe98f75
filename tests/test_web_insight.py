"""The viewer's cost and search APIs (live server on an ephemeral port)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from phi_session.cost import Pricer, prices_available
from phi_session.messages import Usage
from phi_session.stores.conformance import TIERED_CALL, at, calls_loop, make_session, talking_loop
from phi_session.stores.json_dir import JsonDirStore
from phi_session.web.server import ViewerServer

from .test_web_api import get_json
from .web_support import EXAMPLE_IDS, PARENT_ID, example_lines, record_into, running_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ViewerServer]:
    directory: Path = tmp_path_factory.mktemp("insight-store")
    with JsonDirStore(directory) as store:
        record_into(store, example_lines())
        store.save(make_session("talk", "talker", loops=[talking_loop("talk", 1, "brew the coffee")]))
        with running_server(store) as running:
            yield running


def test_session_cost_per_loop_and_turn(server: ViewerServer) -> None:
    body = get_json(server, f"/api/sessions/{PARENT_ID}/cost")
    assert body["session_id"] == PARENT_ID
    assert body["loops"] and all("turns" in loop for loop in body["loops"])
    cost = body["cost"]
    assert set(cost) == {"usd", "sources", "unpriced"}
    if body["table"] is None:  # without the prices extra: unknown, with a hint, never 0
        assert cost["usd"] is None and "phi-session[prices]" in body["hint"]
    else:
        assert cost["usd"] > 0 and cost["sources"] == [body["table"]] and body["hint"] is None
    assert get_json(server, "/api/sessions/nope/cost", status=404)["error"]


def test_cost_totals(server: ViewerServer) -> None:
    by_session = get_json(server, "/api/cost?by=session")
    assert sorted(row["key"] for row in by_session["totals"]) == sorted([*EXAMPLE_IDS, "talk"])
    by_model = get_json(server, "/api/cost?by=model")
    assert [row["key"] for row in by_model["totals"]] == [
        "anthropic/claude-haiku-4-5",
        "anthropic/claude-sonnet-4-5",
        "openai/gpt-4o",
    ]
    # Per agent, model or day: the store's totals, priced (usage and cost in one row).
    assert [row["usage"] for row in by_model["totals"]] == [
        row["usage"] for row in get_json(server, "/api/stats?by=model")
    ]
    assert all(set(row["cost"]) == {"usd", "sources", "unpriced"} for row in by_model["totals"])
    assert get_json(server, "/api/cost")["totals"]  # by agent
    # Any case, as the other choices: by=Session as by=DAY.
    assert get_json(server, "/api/cost?by=Session") == by_session
    assert get_json(server, "/api/cost?by=DAY") == get_json(server, "/api/cost?by=day")
    error = get_json(server, "/api/cost?by=week", status=400)["error"]
    assert error == "by: expected one of agent, model, day, session; got 'week'"
    assert get_json(server, "/api/cost?group=agent", status=400)["error"]


def test_cost_by_session_skips_an_unreadable_session(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # As the listing and the other totals do: one corrupt file must not fail the whole table.
    with JsonDirStore(tmp_path) as store:
        store.save(make_session("talk", "talker", loops=[talking_loop("talk", 1, "hi")]))
        (tmp_path / "broken.json").write_text("garbage", encoding="utf-8")
        with running_server(store) as server:
            body = get_json(server, "/api/cost?by=session")
    assert [row["key"] for row in body["totals"]] == ["talk"]
    assert "skipping unreadable session 'broken'" in caplog.text


def test_user_prices_reach_the_api(tmp_path: Path) -> None:
    with JsonDirStore(tmp_path) as store:
        loop = talking_loop("priced", 1, "hi")
        loop.usage = Usage(input=1_000_000, output=0, total_tokens=1_000_000)
        store.save(make_session("priced", loops=[loop]))
        pricer = Pricer({"openai/gpt-4o": {"input": 2, "output": 8}}, use_table=False)
        with running_server(store, pricer=pricer) as server:
            body = get_json(server, "/api/sessions/priced/cost")
    assert body["cost"] == {"usd": 2.0, "sources": ["user"], "unpriced": []}
    assert body["table"] is None and "phi-session[prices]" in body["hint"]


@pytest.mark.skipif(not prices_available(), reason="needs the prices extra (genai-prices)")
def test_the_api_prices_each_model_call(tmp_path: Path) -> None:
    # Two calls of 150k input tokens, each below gemini-2.5-pro's 200k tier (their sum is above).
    pricer = Pricer()
    one = pricer.price(TIERED_CALL, "google", "gemini-2.5-pro", at(1)).usd
    assert one is not None
    with JsonDirStore(tmp_path) as store:
        store.save(make_session("tiered", loops=[calls_loop("tiered", 1, [TIERED_CALL, TIERED_CALL])]))
        with running_server(store, pricer=pricer) as server:
            body = get_json(server, "/api/sessions/tiered/cost")
            [total] = get_json(server, "/api/cost?by=model")["totals"]
    assert body["cost"]["usd"] == pytest.approx(2 * one)
    assert [turn["cost"]["usd"] for turn in body["loops"][0]["turns"]] == [pytest.approx(one)] * 2
    assert total["cost"]["usd"] == pytest.approx(2 * one)


def test_search(server: ViewerServer) -> None:
    hits = get_json(server, "/api/search?q=Coffee")
    assert [(hit["session_id"], hit["kind"]) for hit in hits] == [
        ("talk", "text"),
        ("talk", "thinking"),
        ("talk", "text"),
        ("talk", "tool_call"),
        ("talk", "tool_result"),
    ]
    assert hits[0]["snippet"] == "Please brew the coffee" and hits[0]["highlights"] == [[16, 22]]
    assert len(get_json(server, "/api/search?q=coffee&limit=2")) == 2
    assert get_json(server, "/api/search?q=coffee&agent=someone-else") == []
    assert get_json(server, "/api/search?q=") == []
    assert "limit" in get_json(server, "/api/search?q=coffee&limit=-1", status=400)["error"]
    assert get_json(server, "/api/search?q=coffee&colour=red", status=400)["error"]
