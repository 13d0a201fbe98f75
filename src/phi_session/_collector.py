"""Keeping finished records out of the cyclic collector's walk.

A recorder holds every event of every session it has not handed over. Each full
collection visits every reference a *tracked* container holds, so a loop's event tuple
costs one visit per event (a cache miss each, at 1,000 sessions) as long as one of its
events is tracked. Immutable values that cannot be part of a cycle are therefore taken
out with ``PyObject_GC_UnTrack`` (public C API, meant for exactly such objects); the
tuples holding them then drop out on the collector's next pass. Outside CPython, or
without ``ctypes``, nothing is untracked and nothing else changes.
"""

from __future__ import annotations

import functools
import gc
import sys
from collections import deque
from collections.abc import Callable, Iterable
from itertools import compress, repeat
from operator import is_

import msgspec


@functools.cache
def _untrack() -> Callable[[object], None] | None:
    """CPython's ``PyObject_GC_UnTrack``, looked up on first use (None where it is missing)."""
    if sys.implementation.name != "cpython":
        return None
    try:
        import ctypes
    except ImportError:
        return None
    untrack = ctypes.pythonapi.PyObject_GC_UnTrack
    untrack.argtypes = (ctypes.py_object,)
    untrack.restype = None
    return untrack


_drain: Callable[[Iterable[object]], None] = deque[object](maxlen=0).extend
"""Runs an iterator to its end, keeping nothing."""


def release_leaf(value: object) -> None:
    """Stop tracking `value`, which the caller knows can never be part of a cycle: it is
    immutable and holds only strings, numbers, None or other such leaves."""
    untrack = _untrack()
    if untrack is not None and gc.is_tracked(value):
        untrack(value)


def release_leaves(values: Iterable[object], kind: type) -> None:
    """`release_leaf` for each of `values` whose type is exactly `kind` (a subclass could
    hold more, and stays tracked); other values are skipped."""
    untrack = _untrack()
    if untrack is None:
        return
    # In C, with no Python step per value: a loop ends a few hundred times a second.
    values = values if isinstance(values, (list, tuple)) else tuple(values)
    _drain(map(untrack, compress(values, map(is_, map(type, values), repeat(kind)))))


def release_records(records: Iterable[msgspec.Struct]) -> None:
    """Stop tracking each record that holds nothing tracked and no dict.

    msgspec tracks a record built around a value that could be tracked (a `Timestamp`
    released since, say) and never looks again. A record holding only untracked values
    reaches nothing that could lead back to it. Assigning a field a value that could be
    tracked tracks the record again (msgspec does), so a record changed later is walked
    again; a dict can change in place, so a record holding one stays tracked.
    """
    untrack = _untrack()
    if untrack is None:
        return
    for record in records:
        if gc.is_tracked(record):
            fields = msgspec.structs.astuple(record)
            if _holds_only_leaves(fields):
                untrack(record)


def release_tuple(values: tuple[object, ...]) -> None:
    """Stop tracking a tuple that holds nothing tracked and no dict (anything but an
    exact tuple is left alone: a list or a subclass can change).

    The collector drops such a tuple itself only when no item is of a type that could be
    tracked: a tuple of records of a gc=True type stays tracked, each item visited by
    every full collection, even once none of them is tracked.
    """
    if type(values) is tuple and _holds_only_leaves(values):
        release_leaf(values)


def _holds_only_leaves(values: tuple[object, ...]) -> bool:
    """Nothing in `values` is tracked, and nothing is a dict, which could change in place
    to refer back to what holds it (the types are gathered in C)."""
    if any(map(gc.is_tracked, values)):
        return False
    return not any(issubclass(kind, dict) for kind in set(map(type, values)))
