"""Billing never undercounts: a loop cut off before its AgentEnd counts every reported token.

phi-core leaves such a loop (aborted by ``flush``) with zero ``usage`` and drops its
unfinished turn; its event log still holds the assistant messages' usage, and every
roll-up counts it (`LoopRecord.billed_usage`) while the record keeps phi-core's bytes.
The stores' roll-ups are checked on every backend by the conformance suite
(``test_cut_streams_bill_every_reported_token``); here: the recorder's sessions, the
summaries, cost, the CLI and the viewer.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from phi_session.cli import main
from phi_session.codec import encode_session
from phi_session.cost import Pricer
from phi_session.messages import ZERO_USAGE, Usage
from phi_session.model import Session
from phi_session.stores.base import summarize
from phi_session.stores.conformance import EXAMPLES_DIR, calls_loop, make_loop, record_lines, reported_usage
from phi_session.stores.json_dir import JsonDirStore
from phi_session.stores.urls import ENV_VAR

from .conftest import GOLDEN
from .test_web_api import get_json
from .web_support import running_server

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import workload  # lives in benchmarks/, not in the package

# One flat price for every model, so a cost is a linear function of the tokens.
PRICES = {"claude-sonnet-4-5": {"input": 3, "output": 15}}


def billed(sessions: list[Session]) -> Usage:
    total = ZERO_USAGE
    for session in sessions:
        total = total + session.billed_usage()
    return total


def assert_calls_add_up(sessions: list[Session]) -> None:
    """Each loop's model calls, which cost prices one by one, add up to its billed usage."""
    for session in sessions:
        for loop in session.loops:
            calls = sum((call.usage for call in loop.model_calls()), ZERO_USAGE)
            assert calls == loop.billed_usage(), loop.loop_id


def workload_cuts() -> Iterator[tuple[int, list[bytes], Usage]]:
    """One benchmark session (5 loops, 20 turns, tool calls) cut after every event but
    its streaming deltas (dropped unstored: a cut after one equals the cut before it),
    with the usage its assistant messages reported."""
    lines = workload.lines(1)
    reported = ZERO_USAGE
    for cut in range(len(lines) + 1):
        if cut:
            reported = reported + reported_usage(lines[cut - 1 : cut])
        if cut == 0 or b'"type":"MessageUpdate"' not in lines[cut - 1]:
            yield cut, lines[:cut], reported


def test_a_workload_cut_at_every_event_bills_every_reported_token() -> None:
    pricer = Pricer(PRICES, use_table=False)
    short = 0
    for cut, lines, reported in workload_cuts():
        sessions = record_lines(lines)
        assert billed(sessions) == reported, cut
        assert_calls_add_up(sessions)
        assert sum((summarize(s).usage for s in sessions), ZERO_USAGE) == reported, cut
        when = sessions[0].created_at if sessions else None
        expected_usd = (
            0.0 if when is None else pricer.price(reported, "anthropic", "claude-sonnet-4-5", when).usd
        )
        assert sum(pricer.session(s).usd or 0.0 for s in sessions) == pytest.approx(expected_usd), cut
        # The records stay phi-core's: a loop without AgentEnd keeps zero usage.
        phi_core = sum((r.usage for s in sessions for r in s.loops), ZERO_USAGE)
        short += phi_core != reported
    assert short > 100  # many cuts fall inside a turn, where phi-core's usage falls short


GOLDEN_CASES = (
    sorted(p.name for p in (GOLDEN / "recorder").iterdir()) if (GOLDEN / "recorder").is_dir() else []
)


@pytest.mark.spec
@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_golden_streams_bill_every_reported_token(case: str) -> None:
    # 200 realistic streams (parallel groups, sub-agents, compaction, 78 loops left open).
    lines = [line for line in (GOLDEN / "recorder" / case / "events.jsonl").read_bytes().split(b"\n") if line]
    sessions = record_lines(lines)
    assert billed(sessions) == reported_usage(lines)
    assert_calls_add_up(sessions)


def cut_session() -> tuple[Session, Usage]:
    """events-basic cut inside its first turn, after the assistant message ended."""
    lines = (EXAMPLES_DIR / "events-basic.jsonl").read_bytes().split(b"\n")[:9]
    [session] = record_lines(lines)
    return session, reported_usage(lines)


@pytest.mark.spec  # phi-core's example stream
def test_the_unfinished_turn_is_billed_but_not_written() -> None:
    session, reported = cut_session()
    [loop] = session.loops
    assert loop.status == "Aborted" and loop.turns == () and loop.usage == ZERO_USAGE
    assert reported.output > 0
    assert loop.unfinished_usage() == loop.billed_usage() == reported
    assert b"unfinished" not in encode_session(session)  # phi-core's bytes, nothing added


def test_a_loop_that_reports_its_usage_is_billed_that() -> None:
    # Closed by AgentEnd, or built with its usage (a snapshot, another writer): usage wins.
    for status in ("Completed", "Rejected", "Aborted", "Running"):
        loop = make_loop("s", 1, status=status, tokens=40)  # type: ignore[arg-type]
        assert loop.billed_usage() == loop.usage and loop.unfinished_usage() == ZERO_USAGE
    pending = make_loop("s", 2, status="Pending", tokens=0)
    assert pending.billed_usage() == ZERO_USAGE


@pytest.mark.spec  # phi-core's example stream
def test_show_and_stats_count_the_unfinished_turn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    session, reported = cut_session()
    with JsonDirStore(tmp_path) as store:
        store.save(session)
    runner = CliRunner()
    shown = runner.invoke(main, ["show", session.session_id, "--store", str(tmp_path)])
    assert shown.exit_code == 0, shown.stderr
    assert "of which in the unfinished turn" in shown.stdout
    totals = json.loads(runner.invoke(main, ["stats", "--store", str(tmp_path), "--json"]).stdout)
    assert [row["usage"]["output"] for row in totals] == [reported.output]


@pytest.mark.spec  # phi-core's example stream
def test_the_viewer_shows_what_a_cut_loop_billed(tmp_path: Path) -> None:
    session, reported = cut_session()
    with JsonDirStore(tmp_path) as store:
        store.save(session)
        with running_server(store) as server:
            [row] = get_json(server, f"/api/sessions/{session.session_id}/loops")["loops"]
            [summary] = get_json(server, "/api/sessions")
    assert row["billed_usage"]["output"] == row["unfinished_usage"]["output"] == reported.output
    assert row["loop"]["usage"]["output"] == 0  # the record as phi-core wrote it
    assert summary["usage"]["output"] == reported.output


def test_total_usage_keeps_phi_cores_meaning_and_billed_usage_counts_the_cut_off_turn() -> None:
    # phi-core documents Session::total_usage as the sum of the loops' `usage`: a loop
    # cut off before AgentEnd counts zero there; billed_usage counts what it reported.
    undercounted = 0
    for _, lines, reported in workload_cuts():
        for session in record_lines(lines):
            phi_core = ZERO_USAGE
            for loop in session.loops:
                phi_core = phi_core + loop.usage
            assert session.total_usage() == phi_core
        sessions = record_lines(lines)
        assert billed(sessions) == reported
        undercounted += sum(s.total_usage() != s.billed_usage() for s in sessions)
    assert undercounted > 0  # the cuts do hit unfinished turns


class _CountedEvents(tuple):  # type: ignore[type-arg]
    """A loop's events that count the times they are read."""

    reads = 0

    def __iter__(self) -> Iterator[object]:
        type(self).reads += 1
        return super().__iter__()


@pytest.mark.parametrize(
    ("first", "second", "scans"),
    [
        (Usage(input=100, output=20, total_tokens=120), Usage(input=50, output=5, total_tokens=55), False),
        (Usage(input=100, output=20), Usage(input=50, output=5, total_tokens=55), True),
    ],
    ids=["every call totalled", "a call without a total"],
)
def test_billed_usage_reads_the_events_only_when_a_call_may_lack_a_total(
    first: Usage, second: Usage, scans: bool
) -> None:
    # A loop of long turns, each call reporting its total: billed_usage is its reported usage
    # without walking its events (2,000 turns: 40 times slower when it did).
    loop = calls_loop("L1", 1, [first, second], model="anthropic/claude-sonnet-4-5")
    loop.events = _CountedEvents(loop.events)  # set after init, which makes a tuple of them
    _CountedEvents.reads = 0
    assert loop.billed_usage() == Usage(input=150, output=25, total_tokens=120 + 55)
    assert (_CountedEvents.reads > 0) == scans
