"""Pick and open a store from one string: a URL, a directory, or the environment.

Accepted forms (`open_store`):

* ``sqlite:///abs/path.db`` or ``sqlite:relative/path.db`` -> `SqliteStore`; optional
  query parameters ``timeout`` (seconds, 0 to 2147483.647, as `SqliteStore` takes) and
  ``synchronous`` (``NORMAL`` or ``FULL``), e.g. ``sqlite:///var/lib/agents.db?synchronous=FULL``;
* ``postgresql://…`` or ``postgres://…`` (a libpq URL; ``?schema=name`` picks the schema) -> `PostgresStore`;
* a plain path ending in ``.db``, ``.sqlite`` or ``.sqlite3`` (and not an existing
  directory) -> `SqliteStore`;
* ``file:///abs/dir``, or a plain path that is an existing directory or ends with
  ``/`` -> `JsonDirStore` (phi-core's directory layout);
* nothing -> the ``PHI_SESSION_STORE`` environment variable if it is set, else
  ``sqlite:///<cwd>/.phi-session/sessions.db``.

Backends other than SQLite are imported only when asked for, so that
``import phi_session`` never needs psycopg.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from ..errors import InvalidArgument, InvalidStoreUrl
from .base import SessionStore
from .sqlite import SqliteStore, check_timeout

__all__ = [
    "ENV_VAR",
    "SQLITE_SUFFIXES",
    "default_store",
    "default_store_url",
    "open_store",
    "postgres_dsn_and_schema",
    "store_path",
]

ENV_VAR = "PHI_SESSION_STORE"

ACCEPTED_FORMS = (
    "sqlite:///absolute/path.db, sqlite:relative/path.db (options: ?timeout=SECONDS&synchronous=FULL), "
    "postgresql://user@host/db (or postgres://), file:///absolute/dir, "
    "a path ending in .db, .sqlite or .sqlite3 (an SQLite file), "
    "or a directory path (existing, or ending with '/')"
)
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
"""A plain path with one of these suffixes names an SQLite file."""

# A URL scheme of two characters or more: "C:" is a Windows drive, not a scheme.
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):")
_SQLITE_OPTIONS = {"timeout", "synchronous"}


def default_store_url() -> str:
    """``$PHI_SESSION_STORE`` if set, else the SQLite file ``.phi-session/sessions.db`` in the cwd."""
    configured = os.environ.get(ENV_VAR)
    if configured is not None:
        return configured
    return f"sqlite:///{(Path.cwd() / '.phi-session' / 'sessions.db').as_posix().lstrip('/')}"


def default_store() -> SessionStore:
    """The store `open_store` opens when given nothing (see `default_store_url`)."""
    return open_store(None)


def open_store(url: str | os.PathLike[str] | None = None, *, read_only: bool = False) -> SessionStore:
    """Open the store `url` names (forms in the module docstring); `None`: the default.

    With `read_only`, open an existing store only to read it: nothing is created,
    migrated or changed, and writes raise `StoreError` (as does a missing store; see
    the backends' ``read_only``).

    Raises `InvalidStoreUrl` (a `StoreError` and a ``ValueError``) for a URL of no
    accepted form, naming the accepted forms (and ``PHI_SESSION_STORE`` when the bad
    value came from there), and whatever the backend raises on opening
    (`StoreError` for an unreachable database, a newer schema, …; `MissingStoreExtra`,
    a `StoreError` too, for a missing optional dependency).
    """
    kind, target, options = _resolve(url)
    if read_only:
        options["read_only"] = True
    if kind == "postgresql":
        from .postgres import PostgresStore  # psycopg is optional

        return _postgres(target, PostgresStore, options)
    if kind == "sqlite":
        return SqliteStore(target, **options)
    from .json_dir import JsonDirStore

    return JsonDirStore(target, read_only=read_only)


def store_path(url: str | os.PathLike[str] | None = None) -> Path | None:
    """The local SQLite file or JSON directory `url` names (None: a database server).

    Opens nothing: a caller that must not create a store checks that this path
    exists first. Raises `InvalidStoreUrl` as `open_store` does.
    """
    kind, target, _ = _resolve(url)
    return None if kind == "postgresql" else target


def _resolve(url: str | os.PathLike[str] | None) -> tuple[str, Any, dict[str, Any]]:
    """``(kind, target, options)`` for `url`: ``sqlite`` (a path), ``directory`` or ``postgresql``."""
    if url is None:
        value = default_store_url()
        try:
            return _locate(value)
        except _BadUrl as error:
            raise InvalidStoreUrl(
                f"environment variable {ENV_VAR}={_without_password(value)!r} is not a store: {error}"
            ) from None
    try:
        if isinstance(url, str):
            return _locate(url)
        return _plain_path(Path(url), str(url))
    except _BadUrl as error:
        raise InvalidStoreUrl(str(error)) from None


def _without_password(url: str) -> str:
    """`url` to show in an error: a database URL's password is not for a terminal or a log."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))


class _BadUrl(Exception):
    """The string names no store; turned into `StoreError` by `open_store`."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"{problem}; accepted: {ACCEPTED_FORMS}")


def _postgres(url: str, store: Any, options: dict[str, Any]) -> SessionStore:
    dsn, schema = postgres_dsn_and_schema(url)
    if schema is not None:
        options["schema"] = schema
    return store(dsn, **options)  # type: ignore[no-any-return]


def postgres_dsn_and_schema(url: str) -> tuple[str, str | None]:
    """A ``postgresql://`` store URL as libpq's DSN and the ``?schema=`` it names (None: the default).

    Only the ``schema`` parameters (which libpq would reject) are cut out; the rest of
    the URL reaches libpq as written, for libpq to decode: re-encoding it would change
    it (``%20`` written as ``+``, which libpq reads as a plus; ``postgresql:///db``
    written as ``postgresql:/db``, which libpq refuses). The schema is decoded as libpq
    decodes the other values: percent escapes only.
    """
    base, mark, query = url.partition("?")
    if not mark:
        return url, None
    kept: list[str] = []
    schema = None
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        if unquote(name) == "schema":
            schema = unquote(value)  # the last one wins, as libpq's repeated parameters do
        else:
            kept.append(pair)
    return f"{base}?{'&'.join(kept)}" if kept else base, schema


def _locate(url: str) -> tuple[str, Any, dict[str, Any]]:
    if not url.strip():
        raise _BadUrl("empty store URL")
    match = _SCHEME.match(url)
    if match is None:
        return _plain_path(Path(url).expanduser(), url)
    scheme = match.group(1).lower()
    if scheme == "sqlite":
        path, options = _sqlite(url[match.end() :])
        return "sqlite", path, options
    if scheme in ("postgresql", "postgres"):
        from .postgres import schema_problem

        _, schema = postgres_dsn_and_schema(url)
        if schema is not None and (problem := schema_problem(schema)) is not None:
            raise _BadUrl(f"?schema=: {problem}")
        return "postgresql", url, {}
    if scheme == "file":
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise _BadUrl(f"file URL {url!r} names a host ({parts.netloc!r}); only local directories work")
        location = _local_path(unquote(parts.path))
        if location in ("", "/"):  # (``file://$DIR`` with $DIR unset): not the cwd, nor the root
            raise _BadUrl("file URL without a directory path")
        return "directory", Path(location), {}
    # Only the scheme is shown: the rest of an unknown URL may hold a password.
    raise _BadUrl(f"unknown store URL scheme {scheme!r}")


def _plain_path(path: Path, given: str) -> tuple[str, Path, dict[str, Any]]:
    if path.is_dir() or given.endswith(("/", os.sep)):
        return "directory", path, {}
    if path.suffix.lower() in SQLITE_SUFFIXES:
        return "sqlite", path, {}
    raise _BadUrl(
        f"{given!r} is not a directory (end it with '/' to create one, or write sqlite:{given} "
        "for an SQLite file)"
    )


def _sqlite(rest: str) -> tuple[Path, dict[str, Any]]:
    """``sqlite:`` + ``///abs/path`` or ``relative/path``, then ``?options``."""
    location, _, query = rest.partition("?")
    if location.startswith("//"):
        host, slash, path = location[2:].partition("/")
        if host:
            raise _BadUrl(f"sqlite URL names a host ({host!r}); write sqlite:///absolute/path.db")
        location = slash + path
    location = _local_path(unquote(location))
    if location in ("", "/"):
        raise _BadUrl("sqlite URL without a file path")
    options: dict[str, Any] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError:
        raise _BadUrl(f"malformed sqlite URL options {query!r}") from None
    for name, value in pairs:
        if name not in _SQLITE_OPTIONS:
            raise _BadUrl(f"unknown sqlite URL option {name!r} (known: {', '.join(sorted(_SQLITE_OPTIONS))})")
        if name == "timeout":
            try:
                options["timeout"] = float(value)
                check_timeout(options["timeout"])
            except InvalidArgument as error:
                raise _BadUrl(f"sqlite URL option timeout={value!r}: {error}") from None
            except ValueError:
                raise _BadUrl(f"sqlite URL option timeout={value!r} is not a number of seconds") from None
        else:
            if value.upper() not in ("NORMAL", "FULL"):
                raise _BadUrl(f"sqlite URL option synchronous={value!r} must be NORMAL or FULL")
            options["synchronous"] = value.upper()
    return Path(location).expanduser(), options


def _local_path(path: str) -> str:
    # "/C:/dir" in a URL is the Windows path "C:/dir".
    if sys.platform == "win32" and re.match(r"/[A-Za-z]:", path):
        return path[1:]
    return path
