"""``phi-session`` cost (list, show, stats, --prices) and ``search``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from phi_session.cli import EXIT_USAGE, main
from phi_session.cost import prices_available
from phi_session.events import LoopConfigSnapshot
from phi_session.messages import Usage
from phi_session.stores.conformance import calls_loop, make_session, talking_loop
from phi_session.stores.json_dir import JsonDirStore
from phi_session.stores.urls import ENV_VAR

from .test_cli import assert_one_line_error


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(arg) for arg in args])


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delenv("PHI_SESSION_PRICES", raising=False)
    directory = tmp_path / "store"
    with JsonDirStore(directory) as sessions:
        known = talking_loop("known", 1, "brew the coffee")
        known.usage = Usage(input=1_000_000, output=0, total_tokens=1_000_000)
        secret = talking_loop("secret", 1, "water the plants")
        secret.config = LoopConfigSnapshot(provider="acme", model="secret-model", config_id="cfg")
        secret.usage = Usage(input=10, output=0, total_tokens=10)
        sessions.save(make_session("known", "alpha", loops=[known]))
        sessions.save(make_session("secret", "beta", loops=[secret]))
    return directory


@pytest.fixture
def prices(tmp_path: Path) -> Path:
    path = tmp_path / "prices.json"
    path.write_text('{"openai/gpt-4o": {"input": 2, "output": 8}}')
    return path


def test_list_and_stats_json_carry_cost(store: Path, prices: Path) -> None:
    rows = json.loads(run("list", "--store", store, "--prices", prices, "--json").stdout)
    cost = {row["session_id"]: row["cost"] for row in rows}
    assert cost["known"] == {"usd": 2.0, "sources": ["user"], "unpriced": []}
    assert cost["secret"] == {"usd": None, "sources": [], "unpriced": ["acme/secret-model"]}
    totals = json.loads(run("stats", "--by", "model", "--store", store, "--prices", prices, "--json").stdout)
    assert [(row["key"], row["cost"]["usd"]) for row in totals] == [
        ("acme/secret-model", None),
        ("openai/gpt-4o", 2.0),
    ]


def test_stats_by_model_groups_calls_by_the_model_that_served_them(tmp_path: Path, prices: Path) -> None:
    """A configured alias answered by its dated snapshot, then a fallback model: rows of the
    serving models, whose costs add up to the total."""
    call = Usage(input=500_000, output=0, total_tokens=500_000)
    served = ["openai/gpt-4o-2024-08-06", "openai/gpt-4o-2024-08-06", "acme/fallback"]
    loop = calls_loop("alias", 1, [call, call, call], model="openai/gpt-4o", served_by=served)
    with JsonDirStore(tmp_path / "store") as sessions:
        sessions.save(make_session("alias", loops=[loop]))
    by_model, by_agent = (
        json.loads(
            run("stats", "--by", by, "--store", tmp_path / "store", "--prices", prices, "--json").stdout
        )
        for by in ("model", "agent")
    )
    assert [(row["key"], row["usage"]["input"], row["cost"]["usd"]) for row in by_model] == [
        ("acme/fallback", 500_000, None),
        ("openai/gpt-4o-2024-08-06", 1_000_000, 2.0),  # priced as the alias the user priced
    ]
    assert by_agent[0]["cost"] == {"usd": None, "sources": ["user"], "unpriced": ["acme/fallback"]}


def test_stats_by_model_totals_no_loops_a_loop_on_two_models_counts_in_both(tmp_path: Path) -> None:
    # Its footer summed the rows' loops: 2 loops for one loop whose calls two models served.
    call = Usage(input=10, output=1, total_tokens=11)
    loop = calls_loop(
        "two", 1, [call, call], model="openai/gpt-4o", served_by=["openai/gpt-4o", "openai/gpt-4o-mini"]
    )
    with JsonDirStore(tmp_path / "store") as sessions:
        sessions.save(make_session("two", loops=[loop]))
    by_model = run("stats", "--by", "model", "--store", tmp_path / "store").stdout.splitlines()
    header = by_model[0].split()
    loops = header.index("LOOPS")
    assert [line.split()[loops] for line in by_model[1:3]] == ["1", "1"]
    assert by_model[-1].split()[:2] == ["total", "20"]  # no sessions, no loops: INPUT first


def test_stats_table_shows_cost_and_an_unknown_total(
    store: Path, prices: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PHI_SESSION_PRICES", str(prices))
    result = run("stats", "--by", "agent", "--store", store)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "COST" in lines[0]
    assert lines[1].split()[0] == "alpha" and lines[1].endswith("$2.0000")
    assert lines[2].endswith("unknown") and lines[-1].endswith("unknown")  # never a made-up total


def test_stats_help_says_how_cost_is_priced() -> None:
    """It said "every loop at its model's price when it started": each model call is
    priced at its own instant and tier (`Pricer.row_costs`)."""
    shown = " ".join(run("stats", "--help").stdout.split())
    assert "each model call at its model's price (and tier) when the call was made" in shown


def test_show_names_the_price_source(store: Path, prices: Path) -> None:
    result = run("show", "known", "--store", store, "--prices", prices)
    assert "$2.0000 (user)" in result.stdout
    result = run("show", "secret", "--store", store, "--prices", prices)
    assert "unknown (no price for acme/secret-model)" in result.stdout


@pytest.mark.skipif(not prices_available(), reason="needs the prices extra (genai-prices)")
def test_genai_prices_is_the_default_table(store: Path) -> None:
    result = run("show", "known", "--store", store)
    assert "(genai-prices " in result.stdout


def test_bad_price_file(store: Path, tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text('{"m": {"input": "cheap", "output": 1}}')
    result = run("stats", "--store", store, "--prices", tmp_path / "bad.json")
    assert_one_line_error(result, 1, "price of 'm'")


def test_search(store: Path) -> None:
    result = run("search", "Coffee", "--store", store)
    assert result.exit_code == 0, result.stderr
    assert "Please brew the coffee" in result.stdout and "tool_result" in result.stdout
    hits = json.loads(run("search", "coffee", "--limit", "2", "--store", store, "--json").stdout)
    assert [(hit["session_id"], hit["kind"]) for hit in hits] == [("known", "text"), ("known", "thinking")]
    assert json.loads(run("search", "plants", "--agent", "alpha", "--store", store, "--json").stdout) == []
    assert "no matches" in run("search", "nothing-here", "--store", store).stderr
    assert_one_line_error(run("search", "x", "--limit", "-1", "--store", store), EXIT_USAGE, "--limit")
    assert_one_line_error(run("search", "x", "--status", "done", "--store", store), EXIT_USAGE, "--status")


def test_tokens_reported_only_as_a_total_are_not_called_a_missing_price(tmp_path: Path, prices: Path) -> None:
    directory = tmp_path / "totals"
    with JsonDirStore(directory) as sessions:
        loop = talking_loop("total-only", 1, "count the beans")
        loop.usage = Usage(input=0, output=0, total_tokens=777)
        sessions.save(make_session("total-only", "alpha", loops=[loop]))
    shown = run("show", "total-only", "--store", directory, "--prices", prices)
    assert "unknown (tokens not split by kind for openai/gpt-4o)" in shown.stdout
    assert "no price for" not in shown.stdout
    [row] = json.loads(run("list", "--store", directory, "--prices", prices, "--json").stdout)
    assert row["cost"] == {
        "usd": None,
        "sources": [],
        "unpriced": ["openai/gpt-4o"],
        "unsplit": ["openai/gpt-4o"],
    }
