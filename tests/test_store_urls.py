"""open_store / default_store: every accepted form, the environment variable, the errors."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from phi_session.errors import InvalidStoreUrl, MissingExtra, StoreError
from phi_session.stores import postgres as postgres_module
from phi_session.stores.base import SessionStore
from phi_session.stores.conformance import make_session
from phi_session.stores.json_dir import JsonDirStore
from phi_session.stores.sqlite import SqliteStore
from phi_session.stores.urls import (
    ENV_VAR,
    default_store,
    default_store_url,
    open_store,
    postgres_dsn_and_schema,
    store_path,
)

POSTGRES_DSN = os.environ.get("PHI_SESSION_TEST_POSTGRES_DSN", "")


@pytest.fixture(autouse=True)
def no_configured_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)
    yield


def open_sqlite(url: str) -> SqliteStore:
    store = open_store(url)
    assert isinstance(store, SqliteStore)
    store.close()
    return store


# -- SQLite ------------------------------------------------------------------------------------


def test_sqlite_absolute_path(tmp_path: Path) -> None:
    store = open_sqlite(f"sqlite:///{(tmp_path / 'abs.db').as_posix().lstrip('/')}")
    assert store.path == tmp_path / "abs.db"
    assert (tmp_path / "abs.db").is_file()


def test_sqlite_relative_path(tmp_path: Path) -> None:
    store = open_sqlite("sqlite:data/rel.db")
    assert store.path == tmp_path / "data" / "rel.db"


def test_sqlite_percent_escapes(tmp_path: Path) -> None:
    store = open_sqlite(f"sqlite://{tmp_path.as_posix()}/with%20space.db")
    assert store.path == tmp_path / "with space.db"


def test_sqlite_options(tmp_path: Path) -> None:
    store = open_sqlite("sqlite:opts.db?timeout=2.5&synchronous=full")
    assert (store.timeout, store.synchronous) == (2.5, "FULL")
    store = open_sqlite("sqlite:opts.db")
    assert (store.timeout, store.synchronous) == (5.0, "NORMAL")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite:", "without a file path"),
        ("sqlite://", "without a file path"),
        ("sqlite:///", "without a file path"),
        ("sqlite://server/x.db", "names a host"),
        ("sqlite:x.db?timeout=soon", "not a number"),
        ("sqlite:x.db?timeout=-1", r"timeout='-1': timeout must be a number of seconds >= 0 and <= 2147483"),
        ("sqlite:x.db?timeout=inf", r"timeout='inf': timeout must be .* <= 2147483.647, got inf"),
        ("sqlite:x.db?timeout=1e300", r"<= 2147483.647, got 1e\+300"),
        ("sqlite:x.db?timeout=nan", r"<= 2147483.647, got nan"),
        ("sqlite:x.db?synchronous=OFF", "NORMAL or FULL"),
        ("sqlite:x.db?journal=memory", "unknown sqlite URL option 'journal'"),
        ("sqlite:x.db?timeout", "malformed"),
    ],
)
def test_bad_sqlite_urls(url: str, message: str) -> None:
    with pytest.raises(StoreError, match=message) as caught:
        open_store(url)
    assert "accepted:" in str(caught.value)


# -- JSON directories ------------------------------------------------------------------------


def test_existing_directory(tmp_path: Path) -> None:
    (tmp_path / "sessions").mkdir()
    store = open_store("sessions")
    assert isinstance(store, JsonDirStore)
    assert store.directory == Path("sessions")
    store = open_store(tmp_path / "sessions")
    assert isinstance(store, JsonDirStore)


def test_new_directory_needs_a_trailing_slash(tmp_path: Path) -> None:
    store = open_store("new/")
    assert isinstance(store, JsonDirStore)
    store.save(make_session("x"))
    assert (tmp_path / "new" / "x.json").is_file()


@pytest.mark.parametrize("name", ["work/x.db", "x.sqlite", "X.SQLITE3"])
def test_a_path_with_an_sqlite_suffix_is_an_sqlite_file(tmp_path: Path, name: str) -> None:
    Path("work").mkdir()
    assert open_sqlite(name).path == tmp_path / name
    assert store_path(name) == Path(name)
    assert store_path(f"sqlite:{name}") == Path(name)
    assert store_path("dir/") == Path("dir") and store_path("postgresql://h/db") is None


def test_path_that_is_no_directory() -> None:
    with pytest.raises(StoreError, match=r"sqlite:missing\.txt"):
        open_store("missing.txt")
    Path("file.txt").write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        open_store("file.txt")


def test_drive_letter_is_not_a_scheme() -> None:
    with pytest.raises(StoreError, match="not a directory"):
        open_store("C:/no/such/dir")


def test_file_url(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path.as_posix()}/json%20dir")
    assert isinstance(store, JsonDirStore)
    assert store.directory == tmp_path / "json dir"
    store = open_store(f"file://localhost{tmp_path.as_posix()}")
    assert isinstance(store, JsonDirStore)
    with pytest.raises(StoreError, match="names a host"):
        open_store("file://server/share")


@pytest.mark.parametrize("url", ["file:", "file://", "file:///", "file://localhost", "FILE://"])
def test_a_file_url_without_a_directory_path_is_refused(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--store file://$DIR` with $DIR unset: not the working directory, nor the root."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidStoreUrl, match="file URL without a directory path; accepted: "):
        store_path(url)


# -- PostgreSQL ----------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_postgres_without_psycopg(monkeypatch: pytest.MonkeyPatch, scheme: str) -> None:
    monkeypatch.setattr(postgres_module, "_MISSING_PSYCOPG", ImportError("No module named 'psycopg'"))
    with pytest.raises(MissingExtra, match=r"pip install 'phi-session\[postgres\]'") as caught:
        open_store(f"{scheme}://user@localhost/db")
    assert isinstance(caught.value, StoreError)  # as the store's other failures to open


def test_without_psycopg_the_error_is_missing_extra() -> None:
    """It was a StoreError only: `except MissingExtra` (an ImportError), which every other
    missing extra raises, did not catch it."""
    code = (
        "import sys; sys.modules['psycopg'] = None\n"
        "from phi_session import PostgresStore, open_store\n"
        "from phi_session.errors import MissingExtra, StoreError\n"
        "for url in ('postgresql://u@127.0.0.1/db', 'postgres://u@127.0.0.1/db?schema=s'):\n"
        "    for make in (PostgresStore, open_store):\n"
        "        try:\n            make(url)\n"
        "        except MissingExtra as error:\n"
        "            print(isinstance(error, StoreError), error)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert len(lines) == 4, out
    for line in lines:
        assert line.startswith("True PostgresStore needs psycopg 3 (")
        assert line.endswith("): pip install 'phi-session[postgres]'")


@pytest.mark.parametrize(
    ("dsn", "name"),
    [
        ("postgresql://agent:s3cret@localhost/db?sslmod=disable", "sslmod"),
        ("host=localhost password=s3cret passwrd=s3cret", "passwrd"),
    ],
)
def test_an_unknown_postgres_parameter_is_named(dsn: str, name: str) -> None:
    """It was "invalid PostgreSQL connection string" (exit 1 in the CLI): which part, unsaid.
    libpq's message for an unknown parameter quotes only its name; the others stay unshown."""
    pytest.importorskip("psycopg")
    with pytest.raises(InvalidStoreUrl, match=rf"^unknown PostgreSQL connection parameter '{name}'$"):
        open_store(dsn) if dsn.startswith("postgresql") else postgres_module.PostgresStore(dsn)
    with pytest.raises(StoreError, match="not shown: it may hold a password") as caught:
        open_store("postgresql://agent:s3 cret@localhost/db")
    assert "s3" not in str(caught.value)


@pytest.mark.skipif(
    not POSTGRES_DSN.startswith(("postgresql://", "postgres://")),
    reason="PHI_SESSION_TEST_POSTGRES_DSN is not set to a postgresql:// URL",
)
def test_postgres_url() -> None:
    # A schema of its own: the default one may hold another checkout's schema version.
    schema = f"phi_test_urls_{uuid.uuid4().hex[:12]}"
    separator = "&" if "?" in POSTGRES_DSN else "?"
    # libpq decodes the other parameters itself: "%20" is a space to it, "+" a plus.
    store = open_store(
        f"{POSTGRES_DSN}{separator}application_name=my%20agent+fleet&schema={schema}"
        "&options=-c%20statement_timeout%3D12345"
    )
    try:
        assert isinstance(store, postgres_module.PostgresStore)
        assert store.schema == schema
        with store._pool.connection() as conn:
            assert conn.execute("SHOW application_name").fetchone() == ("my agent+fleet",)
            assert conn.execute("SHOW statement_timeout").fetchone() == ("12345ms",)
    finally:
        store.close()
        import psycopg

        with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
            conn.execute(
                psycopg.sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(psycopg.sql.Identifier(schema))
            )


# -- errors and the default -----------------------------------------------------------------------


def test_unknown_scheme_lists_the_accepted_forms_and_hides_the_rest() -> None:
    with pytest.raises(StoreError) as caught:
        open_store("mysql://admin:s3cret@db.example/agents")
    message = str(caught.value)
    assert "'mysql'" in message
    assert "s3cret" not in message
    for form in ("sqlite:///", "postgresql://", "file:///", "directory"):
        assert form in message


def test_empty_url() -> None:
    with pytest.raises(StoreError, match="empty"):
        open_store("  ")


def test_default_is_sqlite_in_the_working_directory(tmp_path: Path) -> None:
    expected = tmp_path / ".phi-session" / "sessions.db"
    assert default_store_url() == f"sqlite:///{expected.as_posix().lstrip('/')}"
    for store in (default_store(), open_store()):
        assert isinstance(store, SqliteStore)
        assert store.path == expected
        store.close()
    assert expected.is_file()


def test_environment_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ENV_VAR, "sqlite:configured.db")
    store = default_store()
    assert isinstance(store, SqliteStore)
    assert store.path == tmp_path / "configured.db"
    store.close()
    monkeypatch.setenv(ENV_VAR, "sessions/")
    assert isinstance(open_store(None), JsonDirStore)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "empty"),
        ("redis://cache/0", "unknown store URL scheme 'redis'"),
        ("sqlite:x.db?synchronous=OFF", "NORMAL or FULL"),
        ("postgresql://bob:s3cret@db/x?schema=", r"\?schema=: schema must be a PostgreSQL identifier"),
        ("redis://bob:s3cret@cache/0", "unknown store URL scheme 'redis'"),
    ],
)
def test_bad_environment_variable(monkeypatch: pytest.MonkeyPatch, value: str, message: str) -> None:
    monkeypatch.setenv(ENV_VAR, value)
    with pytest.raises(InvalidStoreUrl, match=message) as caught:
        default_store()
    assert f"environment variable {ENV_VAR}=" in str(caught.value)
    assert "s3cret" not in str(caught.value)  # a password is not for a terminal or a log


@pytest.mark.parametrize("schema", ["", "x" * 64, "a%00b"])
def test_a_schema_no_postgresql_takes_is_a_bad_url(schema: str) -> None:
    # It was a ValueError from the store's constructor: the CLI's "internal error".
    with pytest.raises(InvalidStoreUrl, match=r"\?schema=: schema must be a PostgreSQL identifier"):
        open_store(f"postgresql://db/x?schema={schema}")


def test_every_store_is_a_session_store(tmp_path: Path) -> None:
    for url in ("sqlite:s.db", "dir/", f"file://{tmp_path.as_posix()}"):
        store = open_store(url)
        assert isinstance(store, SessionStore)
        store.close()


def test_postgres_url_schema_parameter_is_passed_as_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    import phi_session.stores.postgres as postgres_module

    seen: dict[str, object] = {}

    class FakeStore:
        def __init__(self, dsn: str, **options: object) -> None:
            seen["dsn"], seen["options"] = dsn, options

    monkeypatch.setattr(postgres_module, "PostgresStore", FakeStore)
    open_store("postgresql://u@h:5432/db?schema=tenant_a&connect_timeout=3")
    assert seen == {"dsn": "postgresql://u@h:5432/db?connect_timeout=3", "options": {"schema": "tenant_a"}}


@pytest.mark.parametrize(
    ("url", "dsn", "schema"),
    [
        (
            "postgresql://u@h/db?options=-c%20statement_timeout%3D5s&schema=a%2Bb&application_name=x+y",
            "postgresql://u@h/db?options=-c%20statement_timeout%3D5s&application_name=x+y",
            "a+b",
        ),
        ("postgresql:///db?schema=s&host=/run/postgresql", "postgresql:///db?host=/run/postgresql", "s"),
        ("postgresql:///db", "postgresql:///db", None),
        ("postgres://u:p%20w@h/db?schema=one&schema=two", "postgres://u:p%20w@h/db", "two"),
    ],
)
def test_postgres_url_reaches_libpq_as_written_but_the_schema(url: str, dsn: str, schema: str | None) -> None:
    # Re-encoding the parameters changed them: "%20" became "+" (a plus to libpq) and
    # "postgresql:///db" became "postgresql:/db" (refused by libpq).
    assert postgres_dsn_and_schema(url) == (dsn, schema)
