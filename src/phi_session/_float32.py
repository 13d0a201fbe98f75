"""32-bit float temperatures, spelled as phi-core (serde_json + ryu) writes them."""

from __future__ import annotations

import math
import struct

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
        for precision in range(1, 10):
            candidate = f"{value:.{precision - 1}e}"  # `precision` significant digits
            if round_f32(float(candidate)) == value:
                break
        mantissa, exponent_text = candidate.split("e")
        exponent = int(exponent_text)
        negative = mantissa.startswith("-")
        digits = mantissa.lstrip("-").replace(".", "").rstrip("0") or "0"
        sign = "-" if negative else ""
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
