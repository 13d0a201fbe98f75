"""JsonDirStore: the shared conformance suite plus what is specific to files."""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings

from phi_session.codec import decode_session, encode_session
from phi_session.errors import (
    InvalidArgument,
    SessionLocked,
    SessionNotFound,
    StoredSessionUnusable,
    StoreError,
)
from phi_session.model import Session
from phi_session.stores import json_dir
from phi_session.stores.base import SessionStore, merge_sessions, summarize
from phi_session.stores.conformance import (
    EXAMPLE_SESSIONS,
    StoreConformance,
    make_loop,
    make_session,
    talking_loop,
)
from phi_session.stores.json_dir import (
    JsonDirStore,
    delete_session,
    list_session_ids,
    load_session,
    load_sessions_for_agent,
    save_session,
)
from phi_session.stores.query import PruneCriteria, SessionQuery

from .conftest import GOLDEN, idle_forked_child, needs_fork
from .store_support import check_saves_in_parts, check_saves_read_only_touched_loops, conversation_parts


class TestJsonDirConformance(StoreConformance):
    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[JsonDirStore]:
        store = JsonDirStore(tmp_path / "sessions")
        yield store
        store.close()

    def open_read_only(self, store: SessionStore) -> SessionStore:
        assert isinstance(store, JsonDirStore)
        return JsonDirStore(store.directory, read_only=True)


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return tmp_path / "sessions"


@pytest.fixture
def store(directory: Path) -> JsonDirStore:
    return JsonDirStore(directory)


def _names(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


@contextmanager
def _holding_lock(directory: Path, session_id: str) -> Iterator[None]:
    """Hold the session's writer lock the way phi-core does (flock on the sidecar)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f"{session_id}.json.lock", "a") as sidecar:
        fcntl.flock(sidecar.fileno(), fcntl.LOCK_EX)
        yield


# -- layout and bytes -----------------------------------------------------------------


@pytest.mark.spec
@pytest.mark.parametrize("path", EXAMPLE_SESSIONS, ids=lambda path: path.name)
def test_files_are_byte_identical_to_phi_core(store: JsonDirStore, directory: Path, path: Path) -> None:
    data = path.read_bytes()
    session = decode_session(data)
    store.save(session)
    assert (directory / f"{session.session_id}.json").read_bytes() == data
    store.save(session)  # merging with an identical stored copy writes the same bytes
    assert (directory / f"{session.session_id}.json").read_bytes() == data


@pytest.mark.spec
def test_reads_files_phi_core_wrote(directory: Path, store: JsonDirStore) -> None:
    directory.mkdir()
    for path in EXAMPLE_SESSIONS:
        (directory / f"{decode_session(path.read_bytes()).session_id}.json").write_bytes(path.read_bytes())
    assert len(store.list_ids()) == len(EXAMPLE_SESSIONS)
    for path in EXAMPLE_SESSIONS:
        session = decode_session(path.read_bytes())
        assert encode_session(store.load(session.session_id)) == path.read_bytes()


def test_layout_after_save_and_delete(store: JsonDirStore, directory: Path) -> None:
    assert store.list_ids() == []  # reads never create the directory
    with pytest.raises(SessionNotFound):
        store.load("s")
    with pytest.raises(SessionNotFound):
        store.delete("s")
    assert not directory.exists()

    session = make_session("s")
    store.save(session)
    assert _names(directory) == ["s.json", "s.json.lock"]  # no temporary file is left
    assert (directory / "s.json").read_bytes() == encode_session(session)
    assert not (directory / "s.json").read_bytes().endswith(b"\n")
    store.delete("s")
    assert _names(directory) == ["s.json.lock"]  # phi-core never removes sidecars either


def test_nested_directory_is_created(tmp_path: Path) -> None:
    store = JsonDirStore(tmp_path / "a" / "b" / "c")
    store.save(make_session("s"))
    assert (tmp_path / "a" / "b" / "c" / "s.json").is_file()


@pytest.mark.parametrize("read_only", [True, False])
def test_a_directory_removed_after_it_existed_is_a_store_error_not_an_empty_store(
    tmp_path: Path, read_only: bool
) -> None:
    # Listed as an empty store (the viewer showed "0 sessions", 200); a read-only store
    # refuses a missing directory when it opens, and SQLite says "no SQLite store at ...".
    directory = tmp_path / "sessions"
    JsonDirStore(directory).save(make_session("s"))
    store = JsonDirStore(directory, read_only=read_only)
    assert store.list_ids() == ["s"]
    shutil.rmtree(directory)
    gone = f"^no store directory at {re.escape(str(directory))}$"
    for read in (
        store.list_ids,
        store.query,
        store.usage_totals,
        lambda: store.list_for_agent("agent"),
        lambda: store.search("hello"),
        lambda: store.load("s"),
        lambda: store.load_outline("s"),
        lambda: store.load_loops("s", 0, 1),
    ):
        with pytest.raises(StoreError, match=gone):
            read()
    if not read_only:
        with pytest.raises(StoreError, match=gone):
            store.delete("s")
        store.save(make_session("t"))  # a writer makes it again
        assert store.list_ids() == ["t"]


def test_a_directory_not_made_yet_holds_no_session(tmp_path: Path) -> None:
    store = JsonDirStore(tmp_path / "sessions")  # made on the first save
    assert store.list_ids() == [] and store.query() == []
    with pytest.raises(SessionNotFound):
        store.load("s")


@pytest.mark.parametrize("read", [JsonDirStore.load, JsonDirStore.load_outline])
def test_a_directory_made_after_opening_then_read_from_is_then_missed(tmp_path: Path, read: Any) -> None:
    # A store that had read a session from it still called its removal an empty store.
    directory = tmp_path / "sessions"
    reader = JsonDirStore(directory)  # before another store makes it
    JsonDirStore(directory).save(make_session("s"))
    read(reader, "s")
    shutil.rmtree(directory)
    gone = f"^no store directory at {re.escape(str(directory))}$"
    with pytest.raises(StoreError, match=gone):
        read(reader, "s")
    with pytest.raises(StoreError, match=gone):
        reader.list_ids()


def test_list_ids_only_lists_session_files(store: JsonDirStore, directory: Path) -> None:
    store.save(make_session("real"))
    for name in ("real.json.tmp.1.2", "notes.txt", "UPPER.JSON", ".hidden.json", ".json", "x.json.bak"):
        (directory / name).write_bytes(b"{}")
    (directory / "folder.json").mkdir()
    (directory / "dangling.json").symlink_to(directory / "missing")
    assert store.list_ids() == ["real"]


def test_list_ids_ties_are_ordered_by_id(store: JsonDirStore, directory: Path) -> None:
    for session_id in ("b", "a", "c"):
        store.save(make_session(session_id))
        os.utime(directory / f"{session_id}.json", ns=(1_000_000_000, 1_000_000_000))
    assert store.list_ids() == ["a", "b", "c"]


def test_lock_timeout_must_be_a_duration(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="lock_timeout"):  # was a bare ValueError
        JsonDirStore(tmp_path, lock_timeout=-1)
    with pytest.raises(InvalidArgument, match="lock_timeout"):
        JsonDirStore(tmp_path, lock_timeout=float("nan"))


# -- locking ---------------------------------------------------------------------------


def test_lock_contention_raises_session_locked(directory: Path) -> None:
    store = JsonDirStore(directory, lock_timeout=0.2)
    store.save(make_session("s"))
    before = (directory / "s.json").read_bytes()
    with _holding_lock(directory, "s"):
        started = time.monotonic()
        with pytest.raises(SessionLocked, match="'s'"):
            store.save(make_session("s", loops=[make_loop("s", 2)]))
        waited = time.monotonic() - started
        with pytest.raises(SessionLocked):
            store.delete("s")
    assert 0.2 <= waited < 2
    assert (directory / "s.json").read_bytes() == before
    store.save(make_session("s", loops=[make_loop("s", 2)]))  # free again
    assert [r.loop_id for r in store.load("s").loops] == ["s.cfg.1", "s.cfg.2"]


def test_save_waits_for_a_lock_released_in_time(directory: Path) -> None:
    store = JsonDirStore(directory, lock_timeout=5)
    release = threading.Event()

    def hold() -> None:
        with _holding_lock(directory, "s"):
            locked.set()
            release.wait(5)

    locked = threading.Event()
    holder = threading.Thread(target=hold)
    holder.start()
    locked.wait(5)
    threading.Timer(0.15, release.set).start()
    started = time.monotonic()
    store.save(make_session("s"))
    holder.join()
    assert time.monotonic() - started >= 0.1
    assert store.list_ids() == ["s"]


@needs_fork
def test_a_child_forked_during_a_save_keeps_no_session_locked(
    directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child kept its copy of the sidecar's locked descriptor, and the thread that would
    have closed it does not exist there: the session stayed locked while the child lived."""
    store = JsonDirStore(directory, lock_timeout=0.2)
    writing, go_on = threading.Event(), threading.Event()
    write = store._write_atomically

    def slow_write(*args: Any) -> Any:
        writing.set()
        go_on.wait(5)
        return write(*args)

    monkeypatch.setattr(store, "_write_atomically", slow_write)
    saver = threading.Thread(target=store.save, args=(make_session("s"),))
    saver.start()
    writing.wait(5)
    with idle_forked_child():
        go_on.set()
        saver.join()
        store.save(make_session("s", loops=[make_loop("s", 2)]))  # SessionLocked while the child lived
    assert [r.loop_id for r in store.load("s").loops] == ["s.cfg.1", "s.cfg.2"]


def test_readers_take_no_lock(store: JsonDirStore, directory: Path) -> None:
    store.save(make_session("s", "x"))
    with _holding_lock(directory, "s"):
        assert store.load("s").session_id == "s"
        assert store.list_ids() == ["s"]
        assert [s.session_id for s in store.list_for_agent("x")] == ["s"]
        assert [row.session_id for row in store.query()] == ["s"]


# -- failures ---------------------------------------------------------------------------


def _no_space(*args: Any, **kwargs: Any) -> Any:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("step", ["write", "fsync", "replace"])
def test_failed_write_keeps_the_stored_file(
    store: JsonDirStore, directory: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    store.save(make_session("s"))
    before = (directory / "s.json").read_bytes()
    monkeypatch.setattr(os, step, _no_space)
    with pytest.raises(StoreError, match="No space left on device") as caught:
        store.save(make_session("s", loops=[make_loop("s", 2)]))
    monkeypatch.undo()
    assert str(directory / "s.json") in str(caught.value)
    assert (directory / "s.json").read_bytes() == before
    assert _names(directory) == ["s.json", "s.json.lock"]  # the temporary file is gone


def test_interrupted_write_removes_the_temporary_file(
    store: JsonDirStore, directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.save(make_session("s"))
    monkeypatch.undo()
    assert _names(directory) == ["s.json.lock"]


def test_unwritable_directory_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StoreError, match="cannot create"):
        JsonDirStore(tmp_path / "file").save(make_session("s"))
    with pytest.raises(StoreError):
        JsonDirStore(tmp_path / "file").list_ids()


def test_corrupt_file_is_reported_or_skipped(
    store: JsonDirStore, directory: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store.save(make_session("good", "x"))
    (directory / "bad.json").write_bytes(b'{"session_id": "bad", "agent_id": "x"')
    with pytest.raises(StoreError, match=r"bad\.json"):
        store.load("bad")
    assert sorted(store.list_ids()) == ["bad", "good"]
    with caplog.at_level(logging.WARNING, logger="phi_session.stores.json_dir"):
        assert [s.session_id for s in store.list_for_agent("x")] == ["good"]
    assert "bad" in caplog.text
    assert [row.session_id for row in store.query()] == ["good"]
    assert [total.sessions for total in store.usage_totals()] == [1]
    assert store.prune(PruneCriteria(keep_last=0)) == 1  # the unreadable file is never pruned
    assert store.list_ids() == ["bad"]
    # Nor overwritten by a save, which fails so until the file is moved aside: not worth a retry.
    with pytest.raises(StoredSessionUnusable, match=r"bad\.json"):
        store.save(make_session("bad", "x"))
    assert (directory / "bad.json").read_bytes() == b'{"session_id": "bad", "agent_id": "x"'


def test_unreadable_entry_is_a_store_error(store: JsonDirStore, directory: Path) -> None:
    directory.mkdir()
    (directory / "folder.json").mkdir()
    with pytest.raises(StoreError, match=r"folder\.json"):
        store.load("folder")


def test_a_file_that_is_not_that_session_is_never_deleted(store: JsonDirStore, directory: Path) -> None:
    # `phi-session rm package --store .` in a project directory deleted its package.json.
    directory.mkdir()
    (directory / "package.json").write_text('{"name": "my-app", "version": "1.0.0"}')
    store.save(make_session("s"))
    os.link(directory / "s.json", directory / "t.json")  # t.json holds session "s"
    for session_id, problem in (("package", r"package\.json: Object missing"), ("t", "holds session 's'")):
        with pytest.raises(StoredSessionUnusable, match=f"^not deleting session '{session_id}': .*{problem}"):
            store.delete(session_id)
        with pytest.raises(StoredSessionUnusable):
            delete_session(session_id, directory)
    # Nor a sidecar left beside them (a refused operation removes the one it made).
    assert _names(directory) == ["package.json", "s.json", "s.json.lock", "t.json"]
    assert store.prune(PruneCriteria(keep_last=0)) == 1  # s; t.json holds another session
    assert _names(directory) == ["package.json", "s.json.lock", "t.json"]


def test_a_damaged_file_of_the_session_is_deleted(store: JsonDirStore, directory: Path) -> None:
    # A session file truncated by a full disk could not be removed at all (delete refused
    # it as not that session, prune cannot judge it); what starts as its file is its own.
    store.save(make_session("s"))
    store.save(make_session("t"))
    for session_id in ("s", "t"):
        path = directory / f"{session_id}.json"
        path.write_bytes(path.read_bytes()[:40])
    os.replace(directory / "t.json", directory / "u.json")  # u.json starts as session "t"
    with pytest.raises(StoredSessionUnusable, match="corrupt session file"):
        store.load("s")
    store.delete("s")
    with pytest.raises(StoredSessionUnusable, match=r"^not deleting session 'u': corrupt session file"):
        store.delete("u")
    assert _names(directory) == ["s.json.lock", "t.json.lock", "u.json"]


def test_a_refused_operation_removes_only_the_sidecar_it_made(store: JsonDirStore, directory: Path) -> None:
    directory.mkdir()
    (directory / "package.json").write_text("{}")
    with pytest.raises(StoredSessionUnusable, match="not saving session 'package'"):
        store.save(make_session("package"))
    assert _names(directory) == ["package.json"]
    (directory / "package.json.lock").touch()  # another writer's: it may hold it open
    with pytest.raises(StoredSessionUnusable):
        store.save(make_session("package"))
    with pytest.raises(StoredSessionUnusable):
        store.delete("package")
    assert _names(directory) == ["package.json", "package.json.lock"]


def test_a_writer_waiting_on_a_removed_sidecar_locks_the_one_in_place(
    directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The lock of a sidecar a refused operation removed guards nothing: a writer that
    # opened it meanwhile must lock the sidecar in place (it creates one) instead.
    directory.mkdir()
    (directory / "p.json").write_text("{}")
    refusing, writer_store = JsonDirStore(directory), JsonDirStore(directory)
    waiting = threading.Event()
    flock = writer_store._flock

    def flock_noted(*args: Any) -> None:
        waiting.set()
        flock(*args)

    def refuse_once_the_writer_waits(session_id: str) -> None:  # under the refusing lock
        writer.start()
        assert waiting.wait(5)
        (directory / "p.json").write_bytes(encode_session(make_session("p")))  # a session by now
        raise StoredSessionUnusable("refused")

    monkeypatch.setattr(writer_store, "_flock", flock_noted)
    monkeypatch.setattr(refusing, "_check_is_session", refuse_once_the_writer_waits)
    writer = threading.Thread(target=writer_store.save, args=(make_session("p", loops=[make_loop("p", 2)]),))
    with pytest.raises(StoredSessionUnusable, match="refused"):
        refusing.delete("p")
    writer.join(10)
    assert _names(directory) == ["p.json", "p.json.lock"]
    assert [loop.loop_id for loop in writer_store.load("p").loops] == ["p.cfg.1", "p.cfg.2"]


# -- the summary cache ------------------------------------------------------------------


def test_queries_parse_only_new_or_changed_files(
    store: JsonDirStore, directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed: list[int] = []

    def counting(data: bytes | str, *, strict: bool = True) -> Any:
        parsed.append(1)
        return decode_session(data, strict=strict)

    monkeypatch.setattr(json_dir, "decode_session", counting)
    for session_id in ("a", "b", "c"):
        save_session(make_session(session_id), directory)  # another store: not in this cache
    assert len(store.query()) == 3
    assert len(parsed) == 3
    assert len(store.query(SessionQuery(order="tokens"))) == 3
    store.usage_totals("model")
    store.list_for_agent("nobody")
    assert len(parsed) == 3
    save_session(make_session("b", loops=[make_loop("b", 2, tokens=7)]), directory)
    store.save(make_session("d"))  # its own saves are remembered without a parse
    before = len(parsed)
    rows = {row.session_id: row for row in store.query()}
    assert len(parsed) == before + 1
    assert rows["b"].loop_count == 2 and rows["b"].total_tokens == 7
    (directory / "c.json").unlink()
    assert sorted(rows) == ["a", "b", "c", "d"]
    assert sorted(row.session_id for row in store.query()) == ["a", "b", "d"]


# -- phi-core's function names ------------------------------------------------------------


def test_phi_core_named_functions(tmp_path: Path) -> None:
    directory = tmp_path / "plain"
    assert list_session_ids(directory) == []
    path = save_session(make_session("one", "x"), directory)
    assert path == directory / "one.json"
    assert path.read_bytes() == encode_session(make_session("one", "x"))
    save_session(make_session("two", "y"), str(directory))
    assert list_session_ids(directory) == ["two", "one"]
    assert load_session("one", directory) == make_session("one", "x")
    assert [s.session_id for s in load_sessions_for_agent("y", directory)] == ["two"]
    delete_session("two", directory)
    assert list_session_ids(directory) == ["one"]
    with pytest.raises(SessionNotFound):
        load_session("two", directory)
    with pytest.raises(SessionNotFound):
        delete_session("two", directory)


def test_phi_core_named_save_merges_instead_of_truncating(tmp_path: Path) -> None:
    save_session(make_session("s", loops=[make_loop("s", 1)]), tmp_path)
    save_session(make_session("s", loops=[make_loop("s", 2)]), tmp_path)
    assert [r.loop_id for r in load_session("s", tmp_path).loops] == ["s.cfg.1", "s.cfg.2"]


def test_summary_cache_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import phi_session.stores.json_dir as json_dir

    monkeypatch.setattr(json_dir, "SUMMARY_CACHE_LIMIT", 3)
    store = JsonDirStore(tmp_path)
    for i in range(6):
        store.save(make_session(f"s{i}"))
    assert len(store._cache) == 3
    assert len(store.query()) == 6  # evicted summaries are read again from their files


def test_an_id_whose_file_holds_another_session_is_not_saved_over_it(
    store: JsonDirStore, directory: Path
) -> None:
    """On a case-insensitive file system ``S.json`` is ``s.json``: saving session "S"
    merged it into session "s" and wrote the result over it. A hard link names one file
    twice as such a file system does; names on a case-sensitive one are unchanged."""
    store.save(make_session("s", "x"))
    kept = (directory / "s.json").read_bytes()
    os.link(directory / "s.json", directory / "S.json")
    with pytest.raises(
        StoredSessionUnusable, match=r"session 'S'.*S\.json holds session 's'.*nothing was written"
    ):
        store.save(make_session("S", "y"))
    assert (directory / "s.json").read_bytes() == (directory / "S.json").read_bytes() == kept
    (directory / "S.json").unlink()
    store.save(make_session("S", "y"))  # where case counts, each id has its own file, named as before
    assert (directory / "S.json").read_bytes() == encode_session(make_session("S", "y"))
    assert (directory / "s.json").read_bytes() == kept


# -- partial loads: the file's loops kept apart ------------------------------------------


def _counting_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    decoded: list[int] = []

    def counting(data: bytes | str, *, strict: bool = True) -> Any:
        decoded.append(1)
        return decode_session(data, strict=strict)

    monkeypatch.setattr(json_dir, "decode_session", counting)
    return decoded


def test_pages_of_an_unchanged_file_do_not_decode_it_again(
    store: JsonDirStore, directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The viewer asks for the outline, then page after page of loops: the file is decoded once."""
    session = make_session("big", loops=[make_loop("big", index) for index in range(1, 6)])
    save_session(session, directory)  # another store: not in this one's cache
    decoded = _counting_decodes(monkeypatch)
    outline = store.load_outline("big")
    for start in range(5):
        assert store.load_loops("big", start, start + 2) == session.loops[start : start + 2]
    assert store.load_outline("big") == outline
    assert len(decoded) == 1
    assert store.load_loops("big", 0, 5) == store.load_loops("big", 0, 5)
    first, again = store.load_loops("big", 0, 1)[0], store.load_loops("big", 0, 1)[0]
    assert first is not again  # each call's records are its own: a caller may change them


def test_pages_see_a_file_another_writer_changed(
    store: JsonDirStore, directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_session(make_session("s", loops=[make_loop("s", 1)]), directory)
    assert [loop.loop_id for loop in store.load_outline("s").loops] == ["s.cfg.1"]
    assert len(store.load_loops("s", 0, 5)) == 1
    save_session(make_session("s", loops=[make_loop("s", 2)]), directory)  # another writer
    assert [loop.loop_id for loop in store.load_outline("s").loops] == ["s.cfg.1", "s.cfg.2"]
    assert [record.loop_id for record in store.load_loops("s", 0, 5)] == ["s.cfg.1", "s.cfg.2"]
    # Rewritten in place (phi-core's own functions truncate and write): same inode, new time.
    path = directory / "s.json"
    other = encode_session(make_session("s", loops=[make_loop("s", 3, tokens=9)]))
    info = path.stat()
    with open(path, "r+b") as file:
        file.truncate(0)
        file.write(other)
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 1))
    assert [record.loop_id for record in store.load_loops("s", 0, 5)] == ["s.cfg.3"]
    assert store.load_outline("s").loops[0].billed_usage.total_tokens == 9
    path.unlink()
    with pytest.raises(SessionNotFound):
        store.load_loops("s", 0, 1)
    with pytest.raises(SessionNotFound):
        store.load_outline("s")


def test_files_kept_for_pages_are_bounded(
    store: JsonDirStore, directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for session_id in ("a", "b", "c"):
        save_session(make_session(session_id), directory)
    largest = max(path.stat().st_size for path in directory.glob("*.json"))
    monkeypatch.setattr(json_dir, "PAGED_BYTES_LIMIT", 2 * largest)  # two files at most
    decoded = _counting_decodes(monkeypatch)
    for session_id in ("a", "b", "a", "c"):  # "b" is then the least recently read
        store.load_outline(session_id)
    assert len(decoded) == 3
    store.load_loops("a", 0, 1)
    store.load_loops("c", 0, 1)
    assert len(decoded) == 3
    store.load_loops("b", 0, 1)
    assert len(decoded) == 4


def test_the_outline_of_a_file_this_store_saved_is_read_without_decoding_it(
    store: JsonDirStore, directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An adapter reads its session's outline at every run start (`loop_starts`): after this
    store's own save the file was decoded whole again, 128 ms a run in a session of 400."""
    store.save(make_session("s", loops=[make_loop("s", 1, status="Running", tokens=1)]))
    store.save(make_session("s", loops=[make_loop("s", 2, tokens=2)]))
    store.load_outline("s")
    decoded = _counting_decodes(monkeypatch)
    store.save(make_session("s", loops=[make_loop("s", 1, tokens=3)]))  # loop 1 ends
    store.save(make_session("s", loops=[make_loop("s", 3, tokens=4, parent_index=2)]))  # linked to loop 2
    outline, loops = store.load_outline("s"), store.load_loops("s", 0, 3)
    assert decoded == []
    monkeypatch.undo()
    fresh = JsonDirStore(directory)
    assert (outline, loops) == (fresh.load_outline("s"), fresh.load_loops("s", 0, 3))
    assert [(loop.status, loop.billed_usage.total_tokens) for loop in outline.loops] == [
        ("Completed", 3),
        ("Completed", 2),
        ("Completed", 4),
    ]
    assert outline.loops[1].record.children_loop_ids == ("s.cfg.3",)
    save_session(make_session("s", loops=[make_loop("s", 4)]), directory)  # another writer
    store.save(make_session("s", loops=[make_loop("s", 5)]))
    assert store.load_outline("s") == fresh.load_outline("s")


# -- saving a session in parts ------------------------------------------------------------


def _session_files() -> list[Path]:
    golden = sorted((GOLDEN / "recorder").glob("*/sessions/*.json"))
    return [*EXAMPLE_SESSIONS, *golden[::7]]  # every example, and a spread of the golden cases


@pytest.mark.spec
@pytest.mark.parametrize("path", _session_files(), ids=lambda path: f"{path.parent.parent.name}/{path.name}")
def test_a_session_saved_loop_by_loop_is_the_file_merging_the_parts_gives(
    store: JsonDirStore, directory: Path, path: Path
) -> None:
    """Each save after the first copies the loops it cannot change from the file this
    store wrote: the file stays byte for byte `encode_session` of the merged session."""
    session = decode_session(path.read_bytes())
    parts = [msgspec.structs.replace(session, loops=[record]) for record in session.loops] or [session]
    parts.append(session)  # and the whole session again, over its parts
    expected = None
    for part in parts:
        store.save(part)
        store.load_outline(session.session_id)  # kept current by the next saves, not read again
        expected = part if expected is None else merge_sessions(expected, part)
        assert (directory / f"{session.session_id}.json").read_bytes() == encode_session(expected)
    [row] = store.query()
    assert row == summarize(expected)
    assert store.load_outline(session.session_id) == JsonDirStore(directory).load_outline(session.session_id)


def test_saving_a_loop_into_a_long_session_reads_only_the_loops_it_touches(
    store: JsonDirStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole_reads: list[bytes] = []
    real_decode_session = json_dir.decode_session

    def counting(data: bytes, *, strict: bool = True) -> Session:
        whole_reads.append(data)
        return real_decode_session(data, strict=strict)

    monkeypatch.setattr(json_dir, "decode_session", counting)
    check_saves_read_only_touched_loops(store, json_dir, monkeypatch)  # undoes the patch at its end
    assert whole_reads == []  # no save read the file whole: each copied what it did not touch


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=conversation_parts)
def test_saves_in_parts_write_the_file_merging_them_gives(
    directory: Path, parts: list[list[tuple[int, bool]]]
) -> None:
    store = JsonDirStore(directory)
    session_id = check_saves_in_parts(store, parts)
    expected = store.load(session_id)
    assert store.path_for(session_id).read_bytes() == encode_session(expected)
    JsonDirStore(directory).save(expected)  # a store that did not write it reads it whole
    assert store.path_for(session_id).read_bytes() == encode_session(expected)


def test_an_interrupt_as_the_temporary_file_is_opened_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C handled as `os.open` returned, before its descriptor was kept: the
    temporary file stayed in the store's directory."""
    store = JsonDirStore(tmp_path / "sessions")
    real_open = os.open

    def interrupted(path: Any, flags: int, *args: Any) -> int:
        fd = real_open(path, flags, *args)
        if ".tmp." in str(path):
            os.close(fd)
            raise KeyboardInterrupt
        return fd

    monkeypatch.setattr(json_dir.os, "open", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.save(make_session("s"))
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "sessions").iterdir() if ".tmp." in p.name] == []


def test_a_lock_file_in_a_directory_removed_meanwhile_is_an_error_not_a_spin(tmp_path: Path) -> None:
    # The open that creates it failed with FileNotFoundError, taken for a sidecar removed
    # between two opens: the save retried for ever.
    outcome: list[BaseException | None] = []

    def open_it() -> None:
        try:
            JsonDirStore._open_sidecar(tmp_path / "gone" / "s.json.lock")
        except BaseException as error:  # the outcome is what is checked
            outcome.append(error)
        else:
            outcome.append(None)

    worker = threading.Thread(target=open_it, daemon=True)
    worker.start()
    worker.join(5)
    assert len(outcome) == 1 and isinstance(outcome[0], StoreError)
    assert "s.json.lock" in str(outcome[0])


def test_a_file_named_other_than_its_session_is_not_that_session(
    store: JsonDirStore, directory: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A session file is named ``{session_id}.json`` (wire-format §11). A copy of ``s.json``
    named ``backup.json`` was listed, counted and searched as a second session "s" (2 sessions,
    2 loops for 1 and 1, each hit twice), and ``load("backup")`` returned session "s"."""
    store.save(make_session("s", "x", loops=[talking_loop("s", 1, "coffee", agent_id="x")]))
    shutil.copyfile(directory / "s.json", directory / "backup.json")
    kept = _names(directory), (directory / "backup.json").read_bytes()
    for reader in (store, JsonDirStore(directory)):  # summaries cached by the save, and read afresh
        with caplog.at_level(logging.WARNING, logger="phi_session.stores.json_dir"):
            caplog.clear()
            for _ in range(2):
                assert [row.session_id for row in reader.query()] == ["s"]
                assert [(total.sessions, total.loops) for total in reader.usage_totals()] == [(1, 1)]
                assert [hit.session_id for hit in reader.search("please coffee")] == ["s"]
                assert [session.session_id for session in reader.list_for_agent("x")] == ["s"]
            warned = [r.getMessage() for r in caplog.records if "backup" in r.getMessage()]
            assert len(warned) == 1  # once per version of the file, not at every listing
            assert "backup.json holds session 's'" in warned[0]
        for load in (reader.load, reader.load_outline, functools.partial(reader.load_loops, start=0, stop=1)):
            with pytest.raises(
                StoredSessionUnusable, match=r"'backup': its file .*backup\.json holds session 's'"
            ):
                load("backup")
        assert reader.prune(PruneCriteria(keep_last=1)) == 0  # s kept; backup.json is none of its own
    assert (_names(directory), (directory / "backup.json").read_bytes()) == kept  # never altered
