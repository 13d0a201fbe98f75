"""`in_forked_child`: what an object must give up first thing in a forked child.

A child made by ``fork()`` is a copy of its parent with one thread: the objects it
inherits hold the parent's descriptors and the state of locks other parent threads
may have held, and the threads they rely on do not exist in it. An object registers a
function that, in the child, gives up what is its parent's: its copies of lock
descriptors (a ``flock`` belongs to the open file description the parent shares:
closing the child's copy leaves the parent's lock held, and the child no longer keeps
it held after the parent lets go), and a state it must not go on from.

An object too small and too numerous for a hook of its own notes `fork_generation` when
made instead, and sees at its next use whether it is a forked copy.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

# Weakly referenced: registering keeps nothing alive, and a dead object's entry goes.
# (Not `WeakMethod`, whose callback fails at interpreter exit once the entry is gone.)
_hooks: dict[int, tuple[weakref.ref[Any], Callable[[Any], object]]] = {}
_tokens = itertools.count()
_T = TypeVar("_T")
_generation = 0


def in_forked_child(owner: _T, give_up: Callable[[_T], object]) -> None:
    """Call ``give_up(owner)`` in every child forked while `owner` lives, before the
    child runs anything else."""
    token = next(_tokens)
    hooks = _hooks  # the callback may run at exit, once the module's globals are gone
    _hooks[token] = (weakref.ref(owner, lambda _: hooks.pop(token, None)), give_up)


def fork_generation() -> int:
    """How many forks made this process from the one that imported this module: 0 there,
    one more in each child. An object made in another generation is a forked copy."""
    return _generation


def forked_copy_lock() -> threading.Lock:
    """The lock under which a forked copy renews its own locks at its first use in the child
    (a parent's thread the child lacks may have held them at the fork); new in each child."""
    return _forked_copy_lock


_forked_copy_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _generation, _forked_copy_lock
    _generation += 1
    _forked_copy_lock = threading.Lock()
    for ref, give_up in list(_hooks.values()):
        owner = ref()
        if owner is None:
            continue
        try:
            give_up(owner)
        except Exception:  # the others must still run: one object's failure is its own
            logger.exception("%r: giving up what the parent process holds failed", owner)


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)
