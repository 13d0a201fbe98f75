from __future__ import annotations

import math
import struct
from decimal import ROUND_FLOOR, Decimal, localcontext

import pytest
from hypothesis import given
from hypothesis import strategies as st

from phi_session._float32 import Float32, round_f32
from phi_session.errors import InvalidArgument


@pytest.mark.parametrize(
    ("value", "spelling"),
    [
        (0.7, b"0.7"),
        (1, b"1.0"),
        (0, b"0.0"),
        (0.30000000000000004, b"0.3"),
        (0.123456789, b"0.12345679"),
        (1e-7, b"1e-7"),
        (9900000000000, b"9900000000000.0"),
        (1e13, b"1e13"),
        (1.5e14, b"1.5e14"),
        (3.4028234663852886e38, b"3.4028235e38"),
        (1e39, b"null"),
        (1e-46, b"0.0"),
        (-0.0, b"-0.0"),
        (100, b"100.0"),
        (0.000001, b"0.000001"),
        (9.9e-7, b"9.9e-7"),
        (2.0**-12, b"0.00024414062"),  # a tie between two 8-digit spellings: ryu takes the even one
        (2.0**-96, b"1.2621775e-29"),  # powers of two: the closer 8 digits below do not read back
        (2.0**87, b"1.5474251e26"),
        (2.0**90, b"1.2379401e27"),
        (33554448, b"33554450.0"),  # 7 digits on the midpoint above: an even f32 takes it
        (33554452, b"33554452.0"),  # ... an odd one does not
    ],
)
def test_spelled_as_phi_core_writes_f32(value: float, spelling: bytes) -> None:
    assert Float32(value).to_json() == spelling


@given(st.floats(width=32, allow_nan=False, allow_infinity=False))
def test_shortest_spelling_reads_back_to_the_same_f32(value: float) -> None:
    text = Float32(value).to_json()
    assert round_f32(float(text)) == value or (value == 0 and float(text) == 0)
    # no shorter decimal would do: dropping a significant digit changes the value
    digits = text.decode().split("e")[0].replace("-", "").replace(".", "").strip("0")
    assert len(digits) <= 9


def shortest_round_trip(value: float) -> Decimal:
    """Brute force: of the decimals with fewest digits that struct reads back as the f32 ``value``,
    the nearest (ties to even)."""
    with localcontext() as context:
        context.prec = 200  # an f32 in decimal has up to 105 significant digits
        exact = Decimal(abs(value))
        for precision in range(1, 10):
            step = Decimal(1).scaleb(exact.adjusted() - precision + 1)
            floor = (exact / step).to_integral_value(ROUND_FLOOR)
            back = [n for n in (floor, floor + 1) if round_f32(float(n * step)) == abs(value)]
            if back:
                nearest = min(back, key=lambda n: (abs(n * step - exact), n % 2))
                return (nearest * step).copy_sign(Decimal(value))
    raise AssertionError(value)


def test_every_power_of_two_is_spelled_shortest_as_ryu() -> None:
    """Below a power of two the gap halves: the nearest decimal below missed while the one above read back."""
    for exponent in range(-149, 128):
        value = 2.0**exponent
        assert Decimal(Float32(value).to_json().decode()) == shortest_round_trip(value), exponent


@given(st.floats(width=32, allow_nan=False, allow_infinity=False).filter(bool))
def test_spelling_is_the_nearest_of_the_shortest(value: float) -> None:
    assert Decimal(Float32(value).to_json().decode()) == shortest_round_trip(value)


def test_overflow_becomes_infinity_like_rust_as_f32() -> None:
    assert math.isinf(round_f32(1e39))
    flt_max = struct.unpack("<f", struct.pack("<f", 3.4028234663852886e38))[0]
    assert round_f32(3.40282356e38) == flt_max  # just below the midpoint: rounds down
    assert math.isinf(round_f32(3.4028235677973366e38))  # the midpoint rounds to even: overflow


def test_text_that_is_no_number_is_an_invalid_argument() -> None:
    """float()'s bare ValueError came through."""
    assert Float32("0.5") == 0.5
    with pytest.raises(InvalidArgument, match="expected a number, got 'x'"):
        Float32("x")  # type: ignore[arg-type]
