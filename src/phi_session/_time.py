"""Nanosecond-precise UTC instants, read and written the way phi-core (chrono) does.

Python's ``datetime`` stops at microseconds, but phi-core writes nanoseconds, and a
session file must come back byte for byte. A `Timestamp` therefore keeps the
canonical RFC 3339 text (``YYYY-MM-DDTHH:MM:SS[.fff|.ffffff|.fffffffff]Z``) and
derives nanoseconds from it on demand.
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from typing import Any

from .errors import InvalidArgument

_NS_PER_S = 1_000_000_000
NS_PER_MS = 1_000_000  # epoch milliseconds: message timestamps
_MAX_YEAR = 262_143  # chrono's range: what phi-core can read back
_SECONDS_PER_DAY = 86_400

# The canonical spelling phi-core writes: 0, 3, 6 or 9 fraction digits and "Z".
_CANONICAL = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.(?:\d{9}|\d{6}|\d{3}))?Z", re.ASCII)
# Everything phi-core accepts that a strict reader should: RFC 3339 with a "T" or a
# space, any number of fraction digits (beyond nine are truncated) and an offset.
# Signed years outside 0000-9999 are what we write for such instants, so we read them.
_LENIENT = re.compile(
    r"([+-]\d{4,}|\d{4})-(\d\d)-(\d\d)[T ](\d\d):(\d\d):(\d\d)(?:\.(\d+))?"
    r"(?:([Zz])|([Uu][Tt][Cc])|([+-])(\d\d):?(\d\d))",
    re.ASCII,  # "\d" must not match other scripts' digits
)

# Validated "YYYY-MM-DDTHH:MM:SS" prefixes -> epoch seconds. Events of one stream
# mostly share a handful of seconds, so this turns validation into a dict lookup.
_seconds_cache: dict[str, int] = {}
_SECONDS_CACHE_LIMIT = 4096


def _is_leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


_DAYS_IN_MONTH = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _days_from_civil(y: int, m: int, d: int) -> int:
    # Proleptic Gregorian calendar, valid for year 0 too (datetime is not).
    # Python's // floors, so no adjustment for negative years is needed.
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def _civil_from_days(z: int) -> tuple[int, int, int]:
    z += 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + (3 if mp < 10 else -9)
    return y + (m <= 2), m, d


MAX_MILLIS = _days_from_civil(_MAX_YEAR + 1, 1, 1) * _SECONDS_PER_DAY * 1000 - 1
"""The last epoch millisecond a `Timestamp` holds (a message's timestamp is one)."""


def _epoch_seconds(y: int, mo: int, d: int, h: int, mi: int, s: int) -> int:
    if not 1 <= mo <= 12:
        raise InvalidArgument("month out of range")
    days_in_month = 29 if mo == 2 and _is_leap(y) else _DAYS_IN_MONTH[mo - 1]
    if not 1 <= d <= days_in_month:
        raise InvalidArgument("day out of range")
    if h > 23 or mi > 59 or s > 59:
        raise InvalidArgument("time of day out of range")
    return _days_from_civil(y, mo, d) * _SECONDS_PER_DAY + h * 3600 + mi * 60 + s


def _format(ns: int) -> str:
    secs, frac = divmod(ns, _NS_PER_S)
    days, rem = divmod(secs, _SECONDS_PER_DAY)
    y, mo, d = _civil_from_days(days)
    if abs(y) > _MAX_YEAR:  # an instant phi-core could not read back
        raise InvalidArgument(f"year out of range: {y} ({ns} ns after the Unix epoch)")
    h, rem = divmod(rem, 3600)
    mi, s = divmod(rem, 60)
    year = f"{y:04d}" if 0 <= y <= 9999 else f"{y:+05d}"
    text = f"{year}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{s:02d}"
    if frac:
        if frac % 1_000_000 == 0:
            text += f".{frac // 1_000_000:03d}"
        elif frac % 1_000 == 0:
            text += f".{frac // 1_000:06d}"
        else:
            text += f".{frac:09d}"
    return text + "Z"


def _canonical_seconds(prefix: str) -> int:
    seconds = _seconds_cache.get(prefix)
    if seconds is None:
        seconds = _epoch_seconds(
            int(prefix[0:4]),
            int(prefix[5:7]),
            int(prefix[8:10]),
            int(prefix[11:13]),
            int(prefix[14:16]),
            int(prefix[17:19]),
        )
        if len(_seconds_cache) >= _SECONDS_CACHE_LIMIT:
            _seconds_cache.clear()
        _seconds_cache[prefix] = seconds
    return seconds


class Timestamp:
    """A UTC instant with nanosecond precision, written as phi-core writes it.

    Build one with `Timestamp.now()`, `Timestamp.parse(text)`,
    `Timestamp.from_datetime(dt)` or `Timestamp.from_ns(ns)`. Instances are
    immutable, hashable and ordered.
    """

    __slots__ = ("_text",)
    _text: str

    def __init__(self, text: str) -> None:
        """Wrap already-canonical text; use `parse` for anything else."""
        object.__setattr__(self, "_text", text)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Timestamp is immutable")

    @classmethod
    def parse(cls, text: str) -> Timestamp:
        """Read an RFC 3339 date-time; any offset is converted to UTC.

        Raises `InvalidArgument` (a ``ValueError``) with the reason when the text is not a
        valid date-time, ``TypeError`` when it is not a string.
        """
        if not isinstance(text, str):
            raise TypeError(f"expected an RFC 3339 date-time string, got {type(text).__name__}")
        # Fast path: a second already validated, and a canonical fraction after it.
        if text[:19] in _seconds_cache and _canonical_tail(text[19:]):
            stamp = object.__new__(cls)
            object.__setattr__(stamp, "_text", text)
            return stamp
        if _CANONICAL.fullmatch(text) is not None and _canonical_fraction(text):
            _canonical_seconds(text[:19])
            return cls(text)
        match = _LENIENT.fullmatch(text)
        if match is None:
            raise InvalidArgument(f"invalid RFC 3339 date-time: {text!r}")
        y, mo, d, h, mi, s, frac, _z, _utc, sign, oh, om = match.groups()
        if abs(int(y)) > _MAX_YEAR:
            raise InvalidArgument(f"year out of range: {text!r}")
        seconds = _epoch_seconds(int(y), int(mo), int(d), int(h), int(mi), int(s))
        if sign is not None:
            off_h, off_m = int(oh), int(om)
            if off_h > 23 or off_m > 59:
                raise InvalidArgument(f"offset out of range: {text!r}")
            offset = off_h * 3600 + off_m * 60
            seconds -= offset if sign == "+" else -offset
        nanos = int((frac or "0")[:9].ljust(9, "0"))
        return cls(_format(seconds * _NS_PER_S + nanos))

    @classmethod
    def from_ns(cls, ns: int) -> Timestamp:
        """The instant `ns` nanoseconds after the Unix epoch; `InvalidArgument` past
        chrono's years (-262143 to 262143), which phi-core cannot read back."""
        return cls(_format(ns))

    @classmethod
    def from_datetime(cls, value: datetime) -> Timestamp:
        """Convert an aware ``datetime`` (a naive one is taken as UTC)."""
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        delta = value - datetime(1970, 1, 1, tzinfo=timezone.utc)
        micros = (delta.days * _SECONDS_PER_DAY + delta.seconds) * 1_000_000 + delta.microseconds
        return cls(_format(micros * 1000))

    @classmethod
    def now(cls) -> Timestamp:
        """The current time from the system clock, at nanosecond resolution."""
        return cls(_format(time.time_ns()))

    @property
    def ns(self) -> int:
        """Nanoseconds since the Unix epoch."""
        text = self._text
        if text[0] in "+-":  # years outside 0000-9999 are rare: take the slow path
            year_end = text.index("-", 1)
            seconds = _epoch_seconds(
                int(text[:year_end]),
                int(text[year_end + 1 : year_end + 3]),
                int(text[year_end + 4 : year_end + 6]),
                int(text[year_end + 7 : year_end + 9]),
                int(text[year_end + 10 : year_end + 12]),
                int(text[year_end + 13 : year_end + 15]),
            )
            frac = text[year_end + 15 : -1]
        else:
            seconds = _canonical_seconds(text[:19])
            frac = text[19:-1]
        return seconds * _NS_PER_S + (int(frac[1:].ljust(9, "0")) if frac else 0)

    def to_datetime(self) -> datetime:
        """An aware UTC ``datetime`` (truncated to microseconds)."""
        seconds, nanos = divmod(self.ns, _NS_PER_S)
        return datetime.fromtimestamp(seconds, tz=timezone.utc).replace(microsecond=nanos // 1000)

    def __str__(self) -> str:
        return self._text

    def __repr__(self) -> str:
        return f"Timestamp({self._text!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Timestamp):
            return self._text == other._text
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._text)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Timestamp):
            return NotImplemented
        return self.ns < other.ns

    def __le__(self, other: object) -> bool:
        if not isinstance(other, Timestamp):
            return NotImplemented
        return self.ns <= other.ns

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, Timestamp):
            return NotImplemented
        return self.ns > other.ns

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, Timestamp):
            return NotImplemented
        return self.ns >= other.ns

    def __sub__(self, other: Timestamp) -> float:
        """Seconds between two instants."""
        return (self.ns - other.ns) / _NS_PER_S

    def __reduce__(self) -> tuple[type[Timestamp], tuple[str]]:
        return (Timestamp, (self._text,))


def _canonical_tail(tail: str) -> bool:
    """Is this what follows the seconds in phi-core's spelling: "Z" or ".fff[fff[fff]]Z"?"""
    size = len(tail)
    if size == 1:
        return tail == "Z"
    if (size == 5 or size == 8 or size == 11) and tail[0] == "." and tail[-1] == "Z":
        digits = tail[1:-1]
        return digits.isdigit() and digits.isascii() and digits[-3:] != "000"
    return False


def _canonical_fraction(text: str) -> bool:
    # ".120" is canonical, ".120000" and ".000" are not: the shortest exact group wins.
    if len(text) == 20:
        return True
    digits = text[20:-1]
    if len(digits) == 3:
        return digits != "000"
    if len(digits) == 6:
        return not digits.endswith("000")
    return not digits.endswith("000")
