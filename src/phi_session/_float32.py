"""32-bit float temperatures, spelled as phi-core (serde_json + ryu) writes them."""

from __future__ import annotations

import math
import struct
from fractions import Fraction
from typing import NamedTuple

from .errors import InvalidArgument

_F32 = struct.Struct("<f")


def round_f32(value: float) -> float:
    """Round to the nearest 32-bit float; overflow gives infinity, as Rust's ``as f32``."""
    try:
        return float(_F32.unpack(_F32.pack(value))[0])
    except OverflowError:
        return math.copysign(math.inf, value)


class Float32(float):
    """A float known to be a 32-bit value; written in its shortest 32-bit spelling."""

    __slots__ = ()

    def __new__(cls, value: float = 0.0) -> Float32:
        try:
            number = float(value)
        except ValueError:  # text float() cannot read, such as "x"
            raise InvalidArgument(f"expected a number, got {value!r}") from None
        return super().__new__(cls, round_f32(number))

    def to_json(self) -> bytes:
        """phi-core's spelling: shortest round trip, positional for 1e-6 <= |x| < 1e13."""
        value = float(self)
        if not math.isfinite(value):
            return b"null"
        if value == 0.0:
            return b"-0.0" if math.copysign(1.0, value) < 0 else b"0.0"
        digits, exponent = _shortest_digits(abs(value))
        sign = "-" if value < 0 else ""
        if -6 <= exponent <= 12:  # ryu decides on the decimal exponent, not the value
            point = exponent + 1  # digits before the decimal point
            if point <= 0:
                text = "0." + "0" * (-point) + digits
            elif point >= len(digits):
                text = digits + "0" * (point - len(digits)) + ".0"
            else:
                text = digits[:point] + "." + digits[point:]
        else:
            text = digits[0] + ("." + digits[1:] if len(digits) > 1 else "") + f"e{exponent}"
        return (sign + text).encode()


def _shortest_digits(value: float) -> tuple[str, int]:
    """Ryu's digits of a positive f32 and the decimal exponent of the first: the shortest decimal
    that reads back as ``value``, the nearest such (ties to even).
    """
    mantissa, binary_exponent = math.frexp(value)
    above = math.ldexp(1.0, max(binary_exponent - 24, -149))  # the gap to the next f32 up
    # At a power of two the gap below is half the gap above: the nearest decimal of a length may
    # then fall short below while the next one up still reads back.
    below = above / 2 if mantissa == 0.5 and binary_exponent - 24 > -149 else above
    bounds = _Bounds(value - below / 2, value + above / 2, (value / above) % 2 == 0)
    for precision in range(1, 10):
        significand, _, exponent_text = f"{value:.{precision - 1}e}".partition("e")
        nearest, last = int(significand.replace(".", "")), int(exponent_text) - precision + 1
        for candidate in (nearest, nearest + 1) if below < above else (nearest,):
            if bounds.hold(candidate, last):
                text = str(candidate)
                return text.rstrip("0"), last + len(text) - 1
    raise AssertionError("nine digits always tell an f32 apart")


class _Bounds(NamedTuple):
    """The decimals an f32 reads back from: between the midpoints to its neighbours (exact doubles)."""

    low: float
    high: float
    closed: bool  # an even f32 also takes the midpoints (round half to even)

    def hold(self, digits: int, exponent: int) -> bool:
        """Whether ``digits * 10**exponent`` reads back as this f32."""
        read = float(f"{digits}e{exponent}")  # correctly rounded, so on the right side or on a bound
        if self.low < read < self.high:
            return True
        if read != self.low and read != self.high:
            return False
        # the double met a bound: only the exact decimal tells which side it is on
        exact, bound = Fraction(digits) * Fraction(10) ** exponent, Fraction(read)
        if exact == bound:
            return self.closed
        return (exact > bound) == (read == self.low)
