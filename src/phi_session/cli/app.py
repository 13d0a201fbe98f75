"""The command group, its shared options, store access and one-line error handling."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO, TypeVar

import click
import msgspec
from rich.console import Console

from .. import __version__
from ..cost import Pricer
from ..errors import InvalidPrices, InvalidSessionId, InvalidStoreUrl, PhiSessionError
from ..model import Session
from ..stores.base import SessionStore, validate_session_id
from ..stores.urls import ENV_VAR, open_store, store_path
from .render import safe

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "PROG",
    "CliError",
    "OutputFile",
    "PhiSessionGroup",
    "echo_json",
    "load_cli_session",
    "main",
    "open_cli_store",
    "open_new_cli_store",
    "path_error",
    "refuse_store_file",
    "reported_by_the_command",
    "saver_errors_reported_by_the_command",
    "session_id_argument",
    "stderr",
    "stdout",
    "store_options",
    "store_url_error",
    "warn",
]

EXIT_OK = 0
EXIT_FAILURE = 1
"""Something named was not found, or could not be read or stored."""
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
"""Ctrl-C (128 + SIGINT), as shells report it."""

PROG = "phi-session"
F = TypeVar("F", bound=Callable[..., Any])


class CliError(Exception):
    """A failure the user must see as one line on stderr, with an exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# -- output -----------------------------------------------------------------------------------


_MIN_COLUMNS = 20
"""A narrower $COLUMNS (0 from some CI runners) is taken for unset: nothing would fit."""


def _width(stream: TextIO, piped: int | None) -> int | None:
    """The width of a console on `stream`: a usable $COLUMNS, else the terminal's (None:
    rich asks it), else, not on a terminal, `piped` (None: rich's default)."""
    columns = os.environ.get("COLUMNS")
    if columns is not None and columns.isdigit() and int(columns) >= _MIN_COLUMNS:
        return int(columns)
    tty = stream.isatty()
    if columns is None:
        return None if tty else piped
    # Given no width, rich would read the unusable $COLUMNS itself.
    if tty:
        with contextlib.suppress(OSError, ValueError):
            return os.get_terminal_size(stream.fileno()).columns or 80
    return piped or 80


def stdout() -> Console:
    # Piped output is colourless and, unless $COLUMNS says otherwise, wide: ids are never cut.
    # On a terminal rich decides on colour, heeding $NO_COLOR.
    # No emoji codes either: ``:100:`` in a page cursor (a token total) or ``:fire:`` in an
    # id is data, printed as it is.
    width = _width(sys.stdout, 200)
    return Console(
        highlight=False,
        emoji=False,
        soft_wrap=False,
        width=width,
        no_color=None if sys.stdout.isatty() else True,
    )


def stderr() -> Console:
    return Console(stderr=True, highlight=False, emoji=False, width=_width(sys.stderr, None))


def _lenient_output() -> None:
    """Standard output and error never fail on a character their encoding lacks (a latin-1
    locale has no ``…`` or ``●``): it is written as a backslash escape instead."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and stream.errors == "strict":
            stream.reconfigure(errors="backslashreplace")


def path_error(path: str | os.PathLike[str], error: OSError) -> CliError:
    """A file the user named that cannot be read or written, worded as every command
    words it: the path, then the system's reason (exit status 1: not found, or failed)."""
    return CliError(f"{os.fspath(path)}: {error.strerror or error}", EXIT_FAILURE)


class OutputFile(click.Path):
    """The FILE of an option a command writes to. With `dash`, ``-`` is standard output
    (``export -o - | record -``), as it is stdin to ``record -``; without, stdout carries
    the command's own report, and ``-`` is a usage error rather than a file named so
    (``./-`` names one). An empty name (``-o "$OUT"`` with OUT unset) is a usage error
    too, not a file no one can open, nor a file not written."""

    def __init__(self, *, dash: bool) -> None:
        super().__init__(dir_okay=False, allow_dash=dash)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        option = "/".join(param.opts) if param is not None else "FILE"
        if value == "":
            raise CliError(f"{option}: empty file name", EXIT_USAGE)
        if value == "-" and not self.allow_dash:
            raise CliError(
                f"{option} -: stdout is this command's report; name a file (./- for one named so)", EXIT_USAGE
            )
        return super().convert(value, param, ctx)


def echo_json(value: Any) -> None:
    click.echo(msgspec.json.format(msgspec.json.encode(value), indent=2).decode())


def warn(message: str) -> None:
    click.echo(f"{PROG}: {safe(message, one_line=True)}", err=True)


# -- store access -------------------------------------------------------------------------------


@contextlib.contextmanager
def open_cli_store(
    url: str | None, directory: str | None = None, *, must_exist: bool = False, read_only: bool = False
) -> Iterator[SessionStore]:
    """The store named by ``--store`` (None: the default store), closed afterwards.

    `directory` (the ``--dir`` option) names a JSON-file store directly; it is
    created on the first save if it does not exist yet. With `must_exist` a file
    or directory store that does not exist is an error naming where it was looked
    for, not a new empty store: a mistyped ``--store`` must not look like a store
    without sessions, and an empty file (``touch x.db``) is left empty, not made a
    store. `read_only` (every command that only reads; implies `must_exist`) opens
    it with `open_store`'s ``read_only``: nothing in it is created, migrated or changed.
    """
    must_exist = must_exist or read_only
    from ..stores.json_dir import JsonDirStore

    if directory is not None and url is not None:
        raise CliError("--dir and --store both name a store: give one", EXIT_USAGE)
    if directory == "":  # as from --dir "$UNSET": it would make the working directory a store
        raise CliError("--dir: empty directory path; give the directory of a JSON-file store", EXIT_USAGE)
    try:
        if must_exist:
            path = store_path(url) if directory is None else None
            if path is not None and not path.exists():
                named = _default_store_hint() if url is None else ""
                raise CliError(f"no store at {path}{named}: nothing was recorded there")
            if path is not None and path.is_file() and path.stat().st_size == 0:
                # Opening it would make it an SQLite store.
                raise CliError(f"{path} is an empty file, not a store: nothing was recorded there")
            if directory is None and not read_only:
                # Opened to write, a blank SQLite file or a missing database schema would be
                # made a store: read-only, its absence is the readers' error, and nothing is made.
                open_store(url, read_only=True).close()
        store = JsonDirStore(directory) if directory is not None else open_store(url, read_only=read_only)
    except InvalidStoreUrl as error:
        raise store_url_error(error, url) from None
    try:
        yield store
    finally:
        store.close()


def store_url_error(error: InvalidStoreUrl, url: str | None) -> CliError:
    """The usage error of a store URL refused: given by ``--store``, or (`url` None) by
    $PHI_SESSION_STORE, named unless the error names it already."""
    return source_error(error, "--store", ENV_VAR, from_env=url is None, exit_code=EXIT_USAGE)


def source_error(error: Exception, option: str, env_var: str, *, from_env: bool, exit_code: int) -> CliError:
    """The error of a value given by `option`, or (`from_env`) by $`env_var`: which one
    gave it, named first (the variable unless the error names it already)."""
    if not from_env:
        return CliError(f"{option}: {error}", exit_code)
    return CliError(str(error) if env_var in str(error) else f"${env_var}: {error}", exit_code)


def _default_store_hint() -> str:
    """Where the default store came from, for an error saying it does not exist."""
    if ENV_VAR in os.environ:
        return f" (named by ${ENV_VAR}: give --store, or change it)"
    return f" (the default store: give --store, or set ${ENV_VAR})"


_SQLITE_SIDECARS = ("-wal", "-shm", "-journal")
_JSON_STORE_FILE = re.compile(r".*\.json(\..*)?", re.DOTALL)  # a session, its lock, its temporary file


def _local_store(url: str | None, directory: str | None) -> Path | None:
    """The SQLite file or JSON directory of the store named by ``--store`` or ``--dir``
    (None: a database server, or a URL `open_cli_store` reports)."""
    try:
        return Path(directory) if directory is not None else store_path(url)
    except InvalidStoreUrl:
        return None


def refuse_store_file(option: str, path: str | Path, url: str | None, directory: str | None = None) -> None:
    """A usage error if writing `path` (the file of `option`) would write over a file of
    the store named by `url` (None: the default store) or `directory`: its SQLite file or
    one of its sidecars, or a session file (or its lock) in its directory."""
    store = _local_store(url, directory)
    if store is None:
        return
    target, store = Path(path).resolve(), store.resolve()
    sqlite_files = {store, *(Path(f"{store}{end}") for end in _SQLITE_SIDECARS)}
    if (
        target in sqlite_files
        or (target.parent == store and _JSON_STORE_FILE.fullmatch(target.name))
        or _same_file_as_any(target, store, sqlite_files)
    ):
        raise CliError(f"{option} {path}: a file of the store ({store}); write elsewhere", EXIT_USAGE)


def _same_file_as_any(target: Path, store: Path, sqlite_files: set[Path]) -> bool:
    """Whether `target` is, under another name (a hard link, a bind mount), the SQLite
    file or a sidecar, or a session file of the JSON store directory `store`."""
    try:
        if store.is_dir() and _JSON_STORE_FILE.fullmatch(target.name):
            if os.path.samestat(target.parent.stat(), store.stat()):
                return True
        identity = target.stat()
    except OSError:  # not there (yet): nothing of the store's
        return False
    if store.is_dir():
        if identity.st_nlink < 2:  # its one name is not in the store
            return False
        candidates = [entry for entry in store.iterdir() if _JSON_STORE_FILE.fullmatch(entry.name)]
    else:
        candidates = list(sqlite_files)
    for candidate in candidates:
        with contextlib.suppress(OSError):
            if os.path.samestat(identity, candidate.stat()):
                return True
    return False


@contextlib.contextmanager
def open_new_cli_store(
    url: str | None, directory: str | None = None
) -> Iterator[tuple[SessionStore, Callable[[], None]]]:
    """`open_cli_store` for a writing command that may end having saved nothing (``record``
    of an empty input), with `discard`: called before the store closes, it has the store
    removed again on closing if this command made it, since a store made for nothing
    would look like a store without sessions. Removed are the store's own new files, then
    the directories made for it while they are empty, or the database schema its opening
    created while no session is in it: never anything that was there before."""
    undo_files = _undo_new_local_store(url, directory)
    discarded = False

    def discard() -> None:
        nonlocal discarded
        discarded = True

    with open_cli_store(url, directory) as store:
        yield store, discard
        if discarded and _local_store(url, directory) is None:
            from ..stores.postgres import PostgresStore

            if isinstance(store, PostgresStore):
                try:
                    store.discard_new_schema()
                except PhiSessionError as error:
                    warn(f"warning: the new store is left: {error}")
    if discarded:
        undo_files()


def new_directories(path: Path) -> list[Path]:
    """`path` (absolute) and the directories holding it that do not exist yet, innermost first:
    what making it will create."""
    made = []
    while not path.exists():
        made.append(path)
        path = path.parent
    return made


def _undo_new_local_store(url: str | None, directory: str | None) -> Callable[[], None]:
    """Called before the store is opened: what removes its SQLite file (and sidecars) or
    JSON directory, if they do not exist yet, and the directories made for them."""
    path = _local_store(url, directory)
    if path is None or path.exists():
        return lambda: None
    path = path.absolute()
    sidecars = [s for s in (Path(f"{path}{end}") for end in _SQLITE_SIDECARS) if not s.exists()]
    made = new_directories(path.parent)

    def undo() -> None:
        with contextlib.suppress(OSError):
            if path.is_dir():
                path.rmdir()  # a JSON store's directory: only if nothing went in
            else:
                path.unlink(missing_ok=True)
            for sidecar in sidecars:
                sidecar.unlink(missing_ok=True)
            for parent in made:
                parent.rmdir()

    return undo


def session_id_argument(value: str) -> str:
    try:
        return validate_session_id(value)
    except InvalidSessionId as error:
        raise CliError(str(error), EXIT_USAGE) from None


def load_cli_session(store: SessionStore, session_id: str) -> Session:
    """`session_id` from `store`; a malformed id is a usage error."""
    return store.load(session_id_argument(session_id))


# -- the command group and its error handling --------------------------------------------------


class _StderrLogHandler(logging.Handler):
    """Library warnings and errors (e.g. orphan events, a session not saved) as one
    ``phi-session: warning:`` or ``phi-session: error:`` line each."""

    def emit(self, record: logging.LogRecord) -> None:
        warn(f"{'error' if record.levelno >= logging.ERROR else 'warning'}: {self.format(record)}")


@contextlib.contextmanager
def reported_by_the_command(logger_name: str, level: int = logging.NOTSET) -> Iterator[None]:
    """Records of `logger_name` from `level` up are not shown: the command says what they say."""

    def below(record: logging.LogRecord) -> bool:
        return record.levelno < level

    library_logger = logging.getLogger(logger_name)
    library_logger.addFilter(below)
    try:
        yield
    finally:
        library_logger.removeFilter(below)


def saver_errors_reported_by_the_command() -> contextlib.AbstractContextManager[None]:
    """For a command that reports each session its saver could not save (``import``):
    the saver's own error line would say it a second time (its retry warnings still show)."""
    return reported_by_the_command("phi_session.saver", logging.ERROR)


class PhiSessionCommand(click.Command):
    """A ``phi-session`` command: its usage errors point to its own ``--help``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as error:
            # click's parser raises some (an option's missing value) without a context: the
            # error line would point to the program's help instead of the command's.
            if error.ctx is None:
                error.ctx = ctx
            raise


class PhiSessionGroup(click.Group):
    """The ``phi-session`` group; its `main` turns every failure into one stderr line."""

    command_class = PhiSessionCommand

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        del prog_name  # always "phi-session": error lines name the command by it
        code = self._run(args, PROG, complete_var, **extra)
        if standalone_mode:
            sys.exit(code)
        return code

    def _run(self, args: Sequence[str] | None, prog_name: str, complete_var: str | None, **extra: Any) -> int:
        _lenient_output()
        handler = _StderrLogHandler(logging.WARNING)
        library_logger = logging.getLogger("phi_session")
        library_logger.addHandler(handler)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            return result if isinstance(result, int) else EXIT_OK
        except click.exceptions.NoArgsIsHelpError as error:
            error.show()
            return EXIT_USAGE
        except click.ClickException as error:
            where = error.ctx.command_path if isinstance(error, click.UsageError) and error.ctx else prog_name
            hint = f" (see '{where} --help')" if isinstance(error, click.UsageError) else ""
            message = f"{prog_name}: error: {' '.join(error.format_message().split())}{hint}"
            click.echo(safe(message, one_line=True), err=True)
            return error.exit_code
        except CliError as error:
            warn(f"error: {error}")
            return error.exit_code
        except InvalidSessionId as error:
            warn(f"error: {error}")
            return EXIT_USAGE
        except PhiSessionError as error:
            warn(f"error: {error}")
            return EXIT_FAILURE
        except (click.Abort, KeyboardInterrupt):
            warn("interrupted")
            return EXIT_INTERRUPTED
        except BrokenPipeError:
            # The reader went away (e.g. `| head`): no message, exit 1 as rich does for
            # its own output. stdout goes to /dev/null so the final flush stays quiet.
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_FAILURE
        except OSError as error:
            # What failed first, then why, as every other error line says it.
            warn(f"error: {path_error(error.filename, error) if error.filename else error}")
            return EXIT_FAILURE
        except Exception as error:
            if os.environ.get("PHI_SESSION_DEBUG"):
                raise
            warn(f"internal error: {type(error).__name__}: {error} (PHI_SESSION_DEBUG=1 shows the traceback)")
            return EXIT_FAILURE
        finally:
            library_logger.removeHandler(handler)


@click.group(PROG, cls=PhiSessionGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name=PROG)
def main() -> None:
    """Record, inspect and serve phi-core agent sessions.

    Stores are named by URL: sqlite:///path/to.db, postgresql://..., a path
    ending in .db, .sqlite or .sqlite3 (an SQLite file), or a directory path
    (one phi-core JSON file per session). The default is $PHI_SESSION_STORE,
    else ./.phi-session/sessions.db; commands that write print where they wrote.

    Exit codes: 0 ok, 1 not found or failed, 2 usage error.
    """


_PRICES_ENV_VAR = "PHI_SESSION_PRICES"


def prices_option(fn: F) -> F:
    """``--prices FILE``: the user's own prices, for the commands that show cost."""
    return click.option(
        "--prices",
        "prices_file",
        metavar="FILE",
        default=None,
        envvar=_PRICES_ENV_VAR,
        help="Your own prices, USD per million tokens (TOML or JSON; default $PHI_SESSION_PRICES); "
        "they win over the genai-prices table of the 'prices' extra.",
    )(fn)


def cli_pricer(prices_file: str | None) -> Pricer:
    """The pricer of `--prices` (genai-prices alone without a file); its errors name the
    option or $PHI_SESSION_PRICES, whichever gave the file."""
    if prices_file == "":  # (``--prices "$FILE"`` with FILE unset): not the working directory
        raise CliError("--prices: empty file name", EXIT_USAGE)
    if prices_file is None:
        return Pricer()
    try:
        return Pricer.from_file(prices_file)
    except InvalidPrices as error:
        context = click.get_current_context(silent=True)
        source = None if context is None else context.get_parameter_source("prices_file")
        from_env = source is click.core.ParameterSource.ENVIRONMENT
        raise source_error(
            error, "--prices", _PRICES_ENV_VAR, from_env=from_env, exit_code=EXIT_FAILURE
        ) from None


def store_options(fn: F) -> F:
    """``--store URL`` and ``--json``, shared by every command."""
    fn = click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON on stdout.")(fn)
    return click.option(
        "--store",
        "store_url",
        metavar="URL",
        default=None,
        help="Session store URL, SQLite file or directory (default: $PHI_SESSION_STORE, "
        "else ./.phi-session/sessions.db).",
    )(fn)
