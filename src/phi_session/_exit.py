"""`ExitHook`: closing at interpreter exit what a program left open."""

from __future__ import annotations

import atexit
import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from ._fork import fork_generation

if TYPE_CHECKING:
    from multiprocessing.util import Finalize

logger = logging.getLogger(__name__)


class ExitHook:
    """Calls `close` at interpreter exit, unless `cancel` was called first.

    Registered on creation; atexit runs hooks last in, first out, so an object closes
    before whatever it was given when opened (a store, a journal). An object that owns
    another closes it itself: the owned one gets no hook, or it would close first.
    A forked child inherits the hook but not the threads and descriptors `close` would
    act on: only the process that made the hook runs it. A failure is logged (at exit
    there is no caller left to raise it to), and so is a Ctrl-C that stops `close`: one
    line, with what `unfinished` says is left undone (the process ends without it).

    A child `multiprocessing` forked (a `Process`, a `Pool`'s worker) leaves through
    ``os._exit`` once its target returns: no atexit hook runs there, only
    multiprocessing's exit finalizers, so in a child the hook is one of those too
    (whichever runs first closes, and cancels the other).
    """

    def __init__(
        self, owner: object, close: Callable[[], object], unfinished: Callable[[], str] | None = None
    ) -> None:
        self._owner = owner
        self._close = close
        self._unfinished = unfinished
        self._pid = os.getpid()
        atexit.register(self._run)
        self._finalizer = _process_exit_finalizer(self._run)

    def cancel(self) -> None:
        atexit.unregister(self._run)
        if self._finalizer is not None:
            self._finalizer.cancel()

    def _run(self) -> None:
        if os.getpid() != self._pid:
            return
        self.cancel()  # run once, from atexit or from the multiprocessing finalizer
        try:
            self._close()
        except KeyboardInterrupt:
            left = f": {self._unfinished()}" if self._unfinished is not None else ""
            logger.error("%r: closing at interpreter exit was interrupted%s", self._owner, left)
        except Exception:
            logger.exception("%r: closing at interpreter exit failed", self._owner)


def _process_exit_finalizer(run: Callable[[], None]) -> Finalize | None:
    """`run` as a multiprocessing exit finalizer, in a child process; else None (the
    main process runs its atexit hooks). At one priority, finalizers run last made, first
    run, as atexit hooks do."""
    if "multiprocessing.util" not in sys.modules:  # no process starter used: no finalizers run
        return None
    import multiprocessing
    from multiprocessing import util

    if fork_generation() == 0 and multiprocessing.parent_process() is None:
        return None
    return util.Finalize(None, run, exitpriority=0)
