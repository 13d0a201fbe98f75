from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from phi_session import FakeClock, InvalidArgument, Timestamp

MAX_NS = 253402300799_999_999_999  # 9999-12-31T23:59:59.999999999Z
MIN_NS = -62167219200_000_000_000  # 0000-01-01T00:00:00Z


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("2025-06-01T09:00:00Z", "2025-06-01T09:00:00Z"),
        ("2025-06-01T09:00:00.120Z", "2025-06-01T09:00:00.120Z"),
        ("2025-06-01T09:00:00.120000Z", "2025-06-01T09:00:00.120Z"),
        ("2025-06-01T09:00:00.000100Z", "2025-06-01T09:00:00.000100Z"),
        ("2025-06-01T09:00:01.411000250Z", "2025-06-01T09:00:01.411000250Z"),
        ("2025-06-01T09:00:00.0Z", "2025-06-01T09:00:00Z"),
        ("2025-06-01T09:00:00.1234567891234Z", "2025-06-01T09:00:00.123456789Z"),
        ("2025-01-01T01:30:00+01:30", "2025-01-01T00:00:00Z"),
        ("2025-01-01T00:30:00-05:00", "2025-01-01T05:30:00Z"),
        ("2025-01-01T00:00:00+0130", "2024-12-31T22:30:00Z"),
        ("2025-06-01 09:00:00utc", "2025-06-01T09:00:00Z"),
        ("0000-01-01T00:00:00Z", "0000-01-01T00:00:00Z"),
        ("2024-02-29T00:00:00Z", "2024-02-29T00:00:00Z"),
    ],
)
def test_parse_normalizes_to_phi_core_spelling(text: str, canonical: str) -> None:
    assert str(Timestamp.parse(text)) == canonical


@pytest.mark.parametrize(
    "text",
    [
        "2025-06-01T09:00:00",
        "2025-06-01",
        "2025-02-30T09:00:00Z",
        "2025-13-01T00:00:00Z",
        "2025-06-01T24:00:00Z",
        "2025-06-01T09:60:00Z",
        "2025-06-01T09:00:00+24:00",
        "",
        "2023-02-29T00:00:00Z",
        "2025-06-01T09:00:00GMT",
        "2025-06-01T09:00Z",
    ],
)
def test_parse_rejects_what_phi_core_rejects(text: str) -> None:
    with pytest.raises(InvalidArgument):  # a PhiSessionError and a ValueError
        Timestamp.parse(text)


def test_a_time_that_is_not_text_is_a_type_error() -> None:
    """It was a bare ValueError, as for text that is no date-time."""
    with pytest.raises(TypeError, match="expected an RFC 3339 date-time string, got int"):
        Timestamp.parse(5)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="invalid RFC 3339 date-time: 'garbage'"):
        FakeClock("garbage")


@given(st.integers(min_value=MIN_NS, max_value=MAX_NS))
def test_nanoseconds_survive_text_round_trip(ns: int) -> None:
    stamp = Timestamp.from_ns(ns)
    assert stamp.ns == ns
    assert Timestamp.parse(str(stamp)) == stamp
    fraction = str(stamp)[19:-1]
    assert len(fraction) in (0, 4, 7, 10)  # "", ".fff", ".ffffff", ".fffffffff"


@given(
    st.datetimes(
        min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31), timezones=st.just(timezone.utc)
    )
)
def test_datetime_conversion_keeps_microseconds(value: datetime) -> None:
    assert Timestamp.from_datetime(value).to_datetime() == value


def test_ordering_and_difference() -> None:
    a = Timestamp.parse("2025-06-01T09:00:00.5Z")
    b = Timestamp.parse("2025-06-01T09:00:01Z")
    assert a < b and b > a and a <= a and max(a, b) is b
    assert b - a == pytest.approx(0.5)
    assert Timestamp.from_datetime(datetime(2025, 6, 1, 9, tzinfo=timezone(timedelta(hours=2)))) == (
        Timestamp.parse("2025-06-01T07:00:00Z")
    )


def test_now_is_utc_with_nanoseconds_and_immutable() -> None:
    stamp = Timestamp.now()
    assert str(stamp).endswith("Z")
    with pytest.raises(AttributeError):
        stamp._text = "x"  # type: ignore[misc]


def test_only_ascii_digits_are_digits() -> None:
    for text in ("2025-06-01T09:00:00.12345\u0663Z", "\u0662025-06-01T09:00:00Z"):
        with pytest.raises(ValueError):
            Timestamp.parse(text)


def test_an_instant_past_chronos_years_is_refused_when_built() -> None:
    """`from_ns` wrote it with a year phi-core cannot read: a session holding it no longer loaded."""
    with pytest.raises(InvalidArgument, match="year out of range: 31688738508781"):
        Timestamp.from_ns(10**30)
    assert Timestamp.parse(str(Timestamp.from_ns(-(10**18) * 8000))).ns == -(10**18) * 8000
