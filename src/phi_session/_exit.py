"""`ExitHook`: closing at interpreter exit what a program left open."""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Callable

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
    """

    def __init__(
        self, owner: object, close: Callable[[], object], unfinished: Callable[[], str] | None = None
    ) -> None:
        self._owner = owner
        self._close = close
        self._unfinished = unfinished
        self._pid = os.getpid()
        atexit.register(self._run)

    def cancel(self) -> None:
        atexit.unregister(self._run)

    def _run(self) -> None:
        if os.getpid() != self._pid:
            return
        try:
            self._close()
        except KeyboardInterrupt:
            left = f": {self._unfinished()}" if self._unfinished is not None else ""
            logger.error("%r: closing at interpreter exit was interrupted%s", self._owner, left)
        except Exception:
            logger.exception("%r: closing at interpreter exit failed", self._owner)
