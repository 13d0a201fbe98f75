"""SessionQuery, PruneCriteria and parse_group_by: every check, made once, where the value is built."""

from __future__ import annotations

import dataclasses

import pytest

from phi_session import InvalidQuery, PruneCriteria, SessionQuery, Timestamp
from phi_session.stores.query import MAX_COUNT, PageCursor, parse_group_by, parse_time_bound

NOW = Timestamp.parse("2025-06-03T12:00:00Z")


def test_from_strings_reads_every_parameter() -> None:
    query = SessionQuery.from_strings(
        {
            "agent": "a",
            "since": "2025-06-01",
            "until": "2d",
            "status": "aborted",
            "model": "gpt-4o",
            "min_tokens": "007",
            "parent": "p",
            "limit": "20",
            "order": "Tokens",
        },
        now=NOW,
    )
    assert query == SessionQuery(
        agent_id="a",
        since=Timestamp.parse("2025-06-01T00:00:00Z"),
        until=Timestamp.parse("2025-06-01T12:00:00Z"),
        status="Aborted",
        model="gpt-4o",
        min_tokens=7,
        parent_session_id="p",
        limit=20,
        order="tokens",
    )


def test_blank_and_absent_parameters_are_no_filter() -> None:
    assert SessionQuery.from_strings({"agent": "", "since": "  ", "limit": None}) == SessionQuery()


def test_status_and_order_are_case_insensitive_and_kept_canonical() -> None:
    assert SessionQuery(status="completed").status == "Completed"
    assert SessionQuery(status="RUNNING").status == "Running"
    assert SessionQuery(order="OLDEST").order == "oldest"  # type: ignore[arg-type]
    assert parse_group_by("Model") == "model"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"limit": "9" * 5000}, f"limit: must be at most {MAX_COUNT}, got {'9' * 20}... (5000 characters)"),
        ({"min_tokens": "9" * 5000}, f"min_tokens: must be at most {MAX_COUNT}, got 999999999999"),
        ({"limit": "9223372036854775808"}, f"limit: must be at most {MAX_COUNT}, got 9223372036854775808"),
        ({"limit": "-1"}, "limit: must not be negative, got -1"),
        ({"limit": "1_000"}, "limit: expected a whole number, got '1_000'"),
        ({"limit": "\u0665"}, "limit: expected a whole number"),
        ({"since": "9999999999999w"}, "since: 9999999999999w reaches back before year 1"),
        ({"since": "9" * 5000 + "d"}, f"since: {'9' * 20}... (5001 characters) reaches back before year 1"),
        ({"since": "tomorrow"}, "since: 'tomorrow' is not a time"),
        (
            {"status": "Done"},
            "status: expected one of Pending, Running, Completed, Rejected, Aborted; got 'Do",
        ),
        ({"order": "random"}, "order: expected one of newest, oldest, tokens; got 'random'"),
        ({"after": "newest:12"}, "after: not a page cursor: 'newest:12'"),
        ({"after": "random:1:s"}, "after: expected one of newest, oldest, tokens"),
        ({"after": "newest:x:s"}, "after: not a page cursor"),
        ({"after": "newest:" + "9" * 5000 + ":s"}, "after: not a page cursor"),
        ({"after": "tokens:5:s"}, "after: the cursor was made for order 'tokens', not 'newest'"),
        ({"colour": "blue"}, "colour: unknown filter; known filters: agent, since"),
        # Undecodable bytes of a command-line argument: text no store holds or can be asked for.
        ({"agent": "x\udcff"}, "agent: 'x\\udcff' is not Unicode text (it holds a lone surrogate)"),
        ({"parent": "\udcff"}, "parent: '\\udcff' is not Unicode text"),
        ({"after": "newest:1:s\udcff"}, "after: 'newest:1:s\\udcff' is not Unicode text"),
        ({"after": "newest:1:s\x00"}, "after: not a page cursor: 'newest:1:s\\x00'"),
        (
            {"since": "2025-06-03", "until": "2025-06-01"},
            "until: 2025-06-01T00:00:00Z is not later than since",
        ),
    ],
)
def test_malformed_text_is_one_line_usage_error(params: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidQuery) as caught:
        SessionQuery.from_strings(params, now=NOW)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 200
    assert isinstance(caught.value, ValueError)  # a usage error is still a ValueError


def test_ages_stay_within_year_one() -> None:
    assert str(parse_time_bound("52w", now=NOW)) == "2024-06-04T12:00:00Z"
    days_since_year_one = (NOW.ns - Timestamp.parse("0001-01-01T00:00:00Z").ns) // 86_400_000_000_000
    assert str(parse_time_bound(f"{days_since_year_one}d", now=NOW)) == "0001-01-01T12:00:00Z"
    with pytest.raises(InvalidQuery, match="before year 1"):
        parse_time_bound(f"{days_since_year_one + 1}d", now=NOW)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: SessionQuery(limit=-1), "limit: must not be negative, got -1"),
        (lambda: SessionQuery(limit=MAX_COUNT + 1), f"limit: must be at most {MAX_COUNT}"),
        (lambda: SessionQuery(min_tokens=-5), "min_tokens: must not be negative, got -5"),
        (lambda: SessionQuery(since=NOW, until=NOW), "until: 2025-06-03T12:00:00Z is not later than since"),
        (lambda: SessionQuery(status="Finished"), "status: expected one of"),
        (lambda: PruneCriteria(), "prune needs older_than, keep_last or both"),
        (lambda: PruneCriteria(keep_last=-1), "keep_last: must not be negative, got -1"),
        (lambda: parse_group_by("week"), "group_by: expected one of agent, model, day; got 'week'"),
        (lambda: SessionQuery(model="m\udc80"), "model: 'm\\udc80' is not Unicode text"),
        (lambda: SessionQuery(parent_session_id="\ud800"), "parent_session_id: '\\ud800' is not Unicode"),
        (lambda: PruneCriteria(keep_last=1, agent_id="\udcff"), "agent_id: '\\udcff' is not Unicode text"),
        (lambda: PageCursor("newest", 1, "s\udcff"), "after: 's\\udcff' is not Unicode text"),
        (lambda: PageCursor("tokens", 1, "s\x00"), "after: not a page cursor: 'tokens:1:s\\x00'"),
    ],
)
def test_values_are_checked_when_built(build: object, message: str) -> None:
    with pytest.raises(InvalidQuery) as caught:
        build()  # type: ignore[operator]
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize(
    "build",
    [
        lambda: SessionQuery(limit="5"),  # type: ignore[arg-type]
        lambda: SessionQuery(limit=True),  # a bool is no count
        lambda: SessionQuery(min_tokens=1.5),  # type: ignore[arg-type]
        lambda: SessionQuery(since="2025-06-01"),  # type: ignore[arg-type]
        lambda: SessionQuery(agent_id=5),  # type: ignore[arg-type]
        lambda: SessionQuery(status=1),  # type: ignore[arg-type]
        lambda: PruneCriteria(older_than=0),  # type: ignore[arg-type]
        lambda: PruneCriteria(keep_last=2.0),  # type: ignore[arg-type]
        lambda: parse_group_by(None),
    ],
)
def test_wrong_types_raise_type_error(build: object) -> None:
    with pytest.raises(TypeError):
        build()  # type: ignore[operator]


def test_queries_are_frozen_values() -> None:
    query = SessionQuery(agent_id="a")
    with pytest.raises(dataclasses.FrozenInstanceError):
        query.agent_id = "b"  # type: ignore[misc]
    assert query == SessionQuery(agent_id="a") and hash(query) == hash(SessionQuery(agent_id="a"))


def test_page_cursor_text_round_trips_and_ids_may_hold_colons() -> None:
    cursor = PageCursor("tokens", 2**70, "a:b:c")
    assert PageCursor.parse(str(cursor)) == cursor
    assert SessionQuery.from_strings({"order": "tokens", "after": str(cursor)}).after == cursor


def test_next_page_only_while_pages_are_full() -> None:
    query = SessionQuery(limit=2)
    assert SessionQuery().next_page([]) is None
    assert query.next_page([]) is None


def test_page_cursor_of_the_wrong_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="after must be PageCursor or None"):
        SessionQuery(after="newest:1:s")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cursor value must be int"):
        PageCursor("newest", "1", "s")  # type: ignore[arg-type]
