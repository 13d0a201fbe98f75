"""`strict_adds_nothing`: when decoding JSON that msgspec wrote may skip the strict parse."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phi_session import DecodeError
from phi_session._strict import MAX_DEPTH, Scan, strict_adds_nothing

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet='0123456789-"\\[]{}: ab', max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=20,
)


def _nested(levels: int, innermost: Any, *, as_dict: bool) -> Any:
    value = innermost
    for _ in range(levels - 1):
        value = {'k"[': value, "n": [1]} if as_dict else [1, value, "]"]
    return value


def _strict_parse_differs(data: bytes) -> bool:
    try:
        return Scan(data).numbers_differ
    except DecodeError:  # nesting past the limit
        return True


@settings(max_examples=300, deadline=None)
@given(json_values, st.integers(min_value=1, max_value=MAX_DEPTH + 3), st.booleans())
def test_what_it_lets_through_the_strict_parse_never_reads_otherwise(
    value: Any, levels: int, as_dict: bool
) -> None:
    data = msgspec.json.encode(_nested(levels, value, as_dict=as_dict))
    if strict_adds_nothing(data):
        assert not _strict_parse_differs(data)


@pytest.mark.parametrize("as_dict", [False, True])
@pytest.mark.parametrize("innermost", [[], {}, [1], {"a": 1}])
def test_nesting_one_level_past_the_limit_is_pointed_out(innermost: Any, as_dict: bool) -> None:
    # `innermost` is a container: it stands at the level given.
    at_limit = msgspec.json.encode(_nested(MAX_DEPTH, innermost, as_dict=as_dict))
    past = msgspec.json.encode(_nested(MAX_DEPTH + 1, innermost, as_dict=as_dict))
    assert strict_adds_nothing(at_limit) and not _strict_parse_differs(at_limit)
    assert not strict_adds_nothing(past) and _strict_parse_differs(past)


@pytest.mark.parametrize(
    ("number", "clear"),
    [(10**17, True), (-(10**17), True), (2**63, False), (-(2**63) - 1, False), (2**64, False)],
)
def test_an_integer_that_may_not_fit_64_bits_is_pointed_out(number: int, clear: bool) -> None:
    data = msgspec.json.encode({"args": {"n": number}})
    assert strict_adds_nothing(data) is clear
    assert strict_adds_nothing(msgspec.json.encode(str(number) + "0" * 10)) is False  # digits in a string too


def test_json_whose_formatting_could_grow_past_the_budget_is_left_to_the_strict_parse() -> None:
    # 100 levels deep, then a long array (holding more than MAX_DEPTH containers in all):
    # formatted one space a level, each of its elements would carry 100 spaces.
    wide = msgspec.json.encode(_nested(100, [[]] * 40 + list(range(200_000)), as_dict=False))
    assert not strict_adds_nothing(wide) and not _strict_parse_differs(wide)
