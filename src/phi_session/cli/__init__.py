"""The ``phi-session`` command line: record, list, inspect, export and serve sessions.

Every command takes ``--store URL`` (default: the embedded store, see
`phi_session.stores.urls.default_store`) and ``--json`` for machine-readable output
on stdout. Exit codes: 0 success; 1 something named was not found, or could not be
read or stored; 2 usage error (bad option, malformed argument, invalid session id).
Errors go to stderr as one line each; no traceback is shown unless
``PHI_SESSION_DEBUG=1``. Commands that only read never create a store.

The package keeps commands thin over the library: `app` holds the group, its
options and error handling, `commands` the commands (``fork`` in `forking`), `render`
how results are drawn.
"""

from __future__ import annotations

from . import commands as commands  # registers the commands on `main`
from . import diff_command as diff_command  # registers `diff`
from . import forking as forking  # registers `fork`
from .app import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, main
from .render import MAX_TREE_DEPTH

__all__ = ["EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "MAX_TREE_DEPTH", "main"]
