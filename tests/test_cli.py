"""The ``phi-session`` command line, through its real entry point `phi_session.cli:main`.

Every command is run with click's CliRunner against the entry point (the same
object the console script calls); a few run as real subprocesses of the installed
``phi-session`` script. Checked: exit codes (0 ok, 1 not found/failed, 2 usage),
``--json`` output parsed, one-line errors on stderr, and what ends up in the store.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import itertools
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from rich.console import Console, Group
from rich.text import Text

import phi_session as ps
from phi_session._time import Timestamp
from phi_session.cli import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, MAX_TREE_DEPTH, main, render
from phi_session.codec import decode_event, decode_session, encode_event, encode_session
from phi_session.events import SessionFormation
from phi_session.messages import TextContent, ThinkingContent, Usage, UserMessage
from phi_session.model import LoopRecord, Session
from phi_session.recorder import SessionRecorder, SessionRecorderConfig
from phi_session.stores.json_dir import JsonDirStore
from phi_session.stores.urls import ENV_VAR
from phi_session.views import event_stream, loop_forest

from .conftest import EXAMPLES, full_disk_after, read_only
from .nats_support import PrivateServer
from .test_model import chain_of
from .web_support import (
    BASIC_ID,
    BASIC_LOOPS,
    CHILD_ID,
    CHILD_LOOP,
    EXAMPLE_IDS,
    EXAMPLE_STREAM,
    MINIMAL_ID,
    PARALLEL_ID,
    PARALLEL_WINNER,
    PARENT_ID,
    PARENT_LOOP,
    example_lines,
    xss_lines,
)

SCRIPT = Path(sys.executable).with_name("phi-session")


def run(*args: str | Path, input: str | bytes | None = None) -> Result:
    return CliRunner().invoke(main, [str(arg) for arg in args], input=input)


def assert_one_line_error(result: Result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("phi-session"), lines
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The default store is relative to the cwd (or $PHI_SESSION_STORE): keep both in tmp.
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    """A JSON-directory store holding the five example sessions, recorded by the CLI."""
    directory = tmp_path / "store"
    result = run("record", EXAMPLE_STREAM, "--dir", directory)
    assert result.exit_code == EXIT_OK, result.stderr
    return directory


def json_out(result: Result) -> object:
    assert result.exit_code == EXIT_OK, (result.stdout, result.stderr)
    return json.loads(result.stdout)


# -- record -----------------------------------------------------------------------------------


def test_record_prints_one_line_per_session_and_totals(tmp_path: Path) -> None:
    result = run("record", EXAMPLE_STREAM, "--dir", tmp_path / "out")
    assert result.exit_code == EXIT_OK, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 6
    for session_id in EXAMPLE_IDS:
        (line,) = [line for line in lines if line.startswith(session_id)]
        assert "loops:" in line and "turns:" in line and "tokens:" in line
    basic = next(line for line in lines if line.startswith(BASIC_ID))
    assert "2 Completed" in basic and "turns: 3" in basic and "tokens: 1,534" in basic
    assert lines[-1].startswith("total: 5 sessions, 7 loops, 9 turns, 2,970 tokens")
    assert sorted(p.stem for p in (tmp_path / "out").glob("*.json")) == sorted(EXAMPLE_IDS)


def test_record_counts_the_sessions_a_save_interrupted_by_ctrl_c_had_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C in the middle of a periodic save: the sessions that save had stored were
    returned by no later save, and the summary left them out (the store held them)."""
    from phi_session.cli import commands

    monkeypatch.setattr(commands, "_SPILL_EVERY", len(EXAMPLE_STREAM.read_bytes().splitlines()))
    save = JsonDirStore.save
    calls = itertools.count()

    def interrupted(self: JsonDirStore, session: Session) -> None:
        save(self, session)
        if next(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(JsonDirStore, "save", interrupted)
    result = run("record", EXAMPLE_STREAM, "--dir", tmp_path / "out", "--json")
    assert result.exit_code == EXIT_INTERRUPTED, result.stderr
    data = json.loads(result.stdout)
    assert sorted(row["session_id"] for row in data["sessions"]) == sorted(EXAMPLE_IDS)
    assert sorted(p.stem for p in (tmp_path / "out").glob("*.json")) == sorted(EXAMPLE_IDS)


@pytest.mark.spec
def test_record_writes_phi_core_session_files_byte_for_byte(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run("record", EXAMPLE_STREAM, "--dir", out).exit_code == EXIT_OK
    for expected in EXAMPLES.glob("session-*.json"):
        session_id = json.loads(expected.read_bytes())["session_id"]
        assert (out / f"{session_id}.json").read_bytes() == expected.read_bytes(), expected.name


def test_record_json_summary() -> None:
    data = json_out(run("record", EXAMPLE_STREAM, "--store", "sqlite:db.sqlite", "--json"))
    assert isinstance(data, dict)
    assert {row["session_id"] for row in data["sessions"]} == set(EXAMPLE_IDS)
    parallel = next(row for row in data["sessions"] if row["session_id"] == PARALLEL_ID)
    assert parallel == {
        "session_id": PARALLEL_ID,
        "agent_id": "d8e2b6f4-3a1c-4d7e-b9f5-6c0a2e8d4b17",
        "loops_by_status": {"Completed": 2},
        "turns": 2,
        "total_tokens": 76,
        "rejected": False,
    }
    totals = data["totals"]
    assert totals["sessions"] == 5 and totals["loops"] == 7 and totals["turns"] == 9
    assert totals["total_tokens"] == 2970 and totals["malformed_lines"] == 0
    assert totals["events"] == len(example_lines())
    assert data["errors"] == []


def test_record_reports_malformed_lines_with_their_number_and_keeps_the_rest(tmp_path: Path) -> None:
    lines = example_lines()
    lines.insert(2, '{"type":"TurnStart","loop_id":42}')  # becomes line 3
    lines.insert(5, "this is not json")  # becomes line 6
    lines.insert(7, "")  # blank lines are not errors
    stream = tmp_path / "bad.jsonl"
    stream.write_text("\n".join(lines) + "\n")
    result = run("record", stream, "--dir", tmp_path / "out", "--json")
    assert result.exit_code == EXIT_OK
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 2
    assert "line 3:" in errors[0] and "line 6:" in errors[1]
    assert "loop_id" in errors[0]  # the decode error names the field
    data = json.loads(result.stdout)
    assert [e["line"] for e in data["errors"]] == [3, 6]
    assert data["totals"]["malformed_lines"] == 2
    assert data["totals"]["sessions"] == 5
    # Everything else was recorded: the stored sessions are the clean run's.
    clean = tmp_path / "clean"
    run("record", EXAMPLE_STREAM, "--dir", clean)
    for session_id in EXAMPLE_IDS:
        name = f"{session_id}.json"
        assert (tmp_path / "out" / name).read_bytes() == (clean / name).read_bytes()


@pytest.mark.parametrize("command", ["record", "import"])
def test_a_utf8_byte_order_mark_is_not_an_error(store_dir: Path, tmp_path: Path, command: str) -> None:
    """A file saved with a BOM (Windows editors, PowerShell) lost its first line: the stream's
    first AgentStart, its loop's events then orphans and not stored; import failed the file."""
    source = EXAMPLE_STREAM if command == "record" else store_dir / f"{BASIC_ID}.json"
    with_bom = tmp_path / f"bom{source.suffix}"
    with_bom.write_bytes(codecs.BOM_UTF8 + source.read_bytes())
    result = run(command, with_bom, "--store", f"{tmp_path}/out/")
    assert result.exit_code == EXIT_OK, result.stderr
    assert result.stderr == ""
    for session_id in EXAMPLE_IDS if command == "record" else (BASIC_ID,):
        name = f"{session_id}.json"
        assert (tmp_path / "out" / name).read_bytes() == (store_dir / name).read_bytes()


def test_record_from_stdin(tmp_path: Path) -> None:
    result = run("record", "-", "--dir", tmp_path / "out", input=EXAMPLE_STREAM.read_bytes())
    assert result.exit_code == EXIT_OK, result.stderr
    assert len(list((tmp_path / "out").glob("*.json"))) == 5


def test_record_keeps_orphan_events_when_asked(tmp_path: Path) -> None:
    orphan = '{"type":"InputRejected","loop_id":"nobody.x.1","reason":"late"}'
    stream = tmp_path / "s.jsonl"
    stream.write_text(orphan + "\n")
    result = run("record", stream, "--dir", tmp_path / "out", "--orphans", tmp_path / "orphans.jsonl")
    assert result.exit_code == EXIT_OK
    assert "1 event belonged to no known loop" in result.stderr
    assert (tmp_path / "orphans.jsonl").read_text() == orphan + "\n"


def test_record_counts_the_events_of_a_session_it_keeps_as_orphans(tmp_path: Path) -> None:
    """A session no store accepts ('../evil') written to --orphans was in no count: totals
    orphan_events 0, its 9 events in the file, and an 'error:' line beside exit status 0."""
    minimal = (EXAMPLES / "events-minimal.jsonl").read_text()
    evil = minimal.replace("2d9f6b1c-8e4a-4c7d-a3b5-6f0e1d2c9b84", "../evil")
    orphan = '{"type":"InputRejected","loop_id":"nobody.x.1","reason":"late"}\n'
    stream = tmp_path / "s.jsonl"
    stream.write_text(evil + orphan + (EXAMPLES / "events-basic.jsonl").read_text())
    result = run("record", stream, "--dir", tmp_path / "out", "--orphans", tmp_path / "o.jsonl", "--json")
    assert result.exit_code == EXIT_OK, result.stderr
    written = (tmp_path / "o.jsonl").read_text().splitlines(keepends=True)
    assert (len(written), sum("../evil" in line for line in written), written[-1]) == (10, 9, orphan)
    assert json.loads(result.stdout)["totals"]["orphan_events"] == 10
    assert "error" not in result.stderr
    assert "warning: session '../evil' cannot be stored" in result.stderr
    assert f"1 session no store accepts (9 events): written to {tmp_path / 'o.jsonl'}" in result.stderr
    assert f"1 event belonged to no known loop: written to {tmp_path / 'o.jsonl'}" in result.stderr


def test_record_unwritable_orphans_file_fails_before_reading(tmp_path: Path) -> None:
    # The input (stdin here) must not be consumed and lost when the orphans file cannot be made.
    unwritable = tmp_path / "no-such-dir" / "orphans.jsonl"
    result = run(
        "record",
        "-",
        "--dir",
        tmp_path / "out",
        "--orphans",
        unwritable,
        input="".join(line + "\n" for line in example_lines()),
    )
    assert_one_line_error(result, EXIT_FAILURE, f"error: {unwritable}: No such file or directory")
    assert not (tmp_path / "out").exists()


def test_record_reports_orphans_written_only_after_the_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import phi_session.cli.commands as cli_module

    def full_disk(event: object) -> bytes:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli_module, "encode_event", full_disk)
    stream = tmp_path / "s.jsonl"
    stream.write_text('{"type":"InputRejected","loop_id":"nobody.x.1","reason":"late"}\n')
    result = run("record", stream, "--dir", tmp_path / "out", "--orphans", tmp_path / "o.jsonl", "--json")
    assert result.exit_code == EXIT_FAILURE
    assert "NOT written to" in result.stderr and "No space left" in result.stderr
    assert "written to" not in result.stderr.replace("NOT written to", "")
    assert json.loads(result.stdout)["totals"]["orphan_events"] == 1


# Lines record cannot record, as read: malformed JSON (a CRLF end), an unknown event type,
# invalid UTF-8, and a last line without its end.
REJECTED_LINES = [b"{not json\r\n", b'{"type":"NoSuchEvent","loop_id":"x"}\n', b"\xff\xfe bad\n", b"[1"]


def stream_with_rejected_lines(path: Path) -> Path:
    """The example stream, `REJECTED_LINES` among its lines."""
    lines = [line.encode() + b"\n" for line in example_lines()]
    for index, rejected in zip((0, 3, 7), REJECTED_LINES, strict=False):
        lines.insert(index, rejected)
    path.write_bytes(b"".join(lines) + REJECTED_LINES[-1])
    return path


def test_record_keeps_every_line_it_cannot_record_in_the_rejected_file(tmp_path: Path) -> None:
    """They were reported by number and skipped, kept nowhere: from stdin, lost."""
    stream = stream_with_rejected_lines(tmp_path / "in.jsonl")
    kept = tmp_path / "rejected.jsonl"
    result = run("record", "-", "--dir", tmp_path / "out", "--rejected", kept, input=stream.read_bytes())
    assert result.exit_code == EXIT_OK, result.stderr
    assert kept.read_bytes() == b"".join(REJECTED_LINES)
    assert f"4 malformed lines skipped, 4 lines kept in {kept}" in result.stdout
    assert sorted(JsonDirStore(tmp_path / "out").list_ids()) == sorted(EXAMPLE_IDS)
    as_json = run("record", stream, "--dir", tmp_path / "out", "--rejected", kept, "--json")
    assert json.loads(as_json.stdout)["totals"]["malformed_lines_kept"] == 4


def test_record_without_a_rejected_file_says_the_skipped_lines_are_not_kept(tmp_path: Path) -> None:
    stream = stream_with_rejected_lines(tmp_path / "in.jsonl")
    result = run("record", stream, "--dir", tmp_path / "out")
    assert result.exit_code == EXIT_OK
    assert "4 malformed lines skipped, not kept (--rejected FILE keeps them)" in result.stdout
    clean = run("record", EXAMPLE_STREAM, "--dir", tmp_path / "out", "--rejected", tmp_path / "r.jsonl")
    assert "; 0 malformed lines skipped\n" in clean.stdout and (tmp_path / "r.jsonl").read_bytes() == b""


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_record_fails_when_the_rejected_lines_cannot_be_written(tmp_path: Path) -> None:
    stream = stream_with_rejected_lines(tmp_path / "in.jsonl")
    result = run("record", stream, "--dir", tmp_path / "out", "--rejected", "/dev/full", "--json")
    assert result.exit_code == EXIT_FAILURE
    assert json.loads(result.stdout)["totals"]["malformed_lines_kept"] == 0
    text = run("record", stream, "--dir", tmp_path / "out", "--rejected", "/dev/full")
    assert "4 malformed lines skipped, NOT kept in /dev/full: No space left on device" in text.stdout


@pytest.mark.parametrize("target", ["input", "store", "orphans", "missing-dir"])
def test_record_rejected_file_is_never_the_input_the_store_nor_the_orphans_file(
    tmp_path: Path, target: str
) -> None:
    stream = tmp_path / "in.jsonl"
    shutil.copy(EXAMPLE_STREAM, stream)
    assert run("record", stream, "--store", "kept.db").exit_code == EXIT_OK
    path = {
        "input": stream,
        "store": tmp_path / "kept.db",
        "orphans": tmp_path / "o.jsonl",
        "missing-dir": tmp_path / "no-such-dir" / "r.jsonl",
    }[target]
    orphans = ["--orphans", tmp_path / "o.jsonl"] if target == "orphans" else []
    before = files_under(tmp_path)
    result = run("record", stream, "--store", "kept.db", *orphans, "--rejected", path)
    if target == "missing-dir":  # not a usage error: a path not found, as in every command
        assert_one_line_error(result, EXIT_FAILURE, f"error: {path}: No such file or directory")
    else:
        assert_one_line_error(result, EXIT_USAGE, "--rejected", str(path))
    assert files_under(tmp_path) == before


def test_record_ctrl_c_during_a_mid_stream_save_keeps_every_drained_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import phi_session.cli.commands as cli_module

    monkeypatch.setattr(cli_module, "_SPILL_EVERY", len(example_lines()))  # one spill, after the last line
    original = JsonDirStore.save
    saves = {"n": 0}

    def interrupted_second_save(self: JsonDirStore, session: Session) -> None:
        saves["n"] += 1
        if saves["n"] == 2:
            raise KeyboardInterrupt
        original(self, session)

    monkeypatch.setattr(JsonDirStore, "save", interrupted_second_save)
    stream = tmp_path / "s.jsonl"
    stream.write_text("".join(line + "\n" for line in example_lines()))
    result = run("record", stream, "--dir", tmp_path / "out", "--json")
    assert result.exit_code == EXIT_INTERRUPTED, (result.stderr, result.exception)
    assert sorted(p.stem for p in (tmp_path / "out").glob("*.json")) == sorted(EXAMPLE_IDS)


@pytest.mark.parametrize("where", ["recording", "between reading and recording"])
def test_record_ctrl_c_records_every_line_read_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """The signal handled as the sixth line is recorded, or after it was read but before its
    recording began: that line is still recorded whole, and the reading stops after it
    (it used to be lost, half applied or not, while said to be recorded)."""
    import signal

    from phi_session.cli import commands

    lines = [line for line in example_lines() if MINIMAL_ID in line]
    calls = itertools.count(1)
    if where == "recording":
        on_json = SessionRecorder.on_json

        def signalled(self: SessionRecorder, data: bytes | str) -> None:
            if next(calls) == 6:
                signal.raise_signal(signal.SIGINT)
            on_json(self, data)

        monkeypatch.setattr(SessionRecorder, "on_json", signalled)
    else:
        record_line = commands._record_line

        def signalled_first(*args: Any) -> bool:
            if next(calls) == 6:
                signal.raise_signal(signal.SIGINT)
            return record_line(*args)

        monkeypatch.setattr(commands, "_record_line", signalled_first)
    stream = tmp_path / "s.jsonl"
    stream.write_text("\n".join(lines) + "\n")
    result = run("record", stream, "--dir", tmp_path / "out", "--json")
    assert result.exit_code == EXIT_INTERRUPTED, (result.stderr, result.exception)
    assert "interrupted after line 6: what was read is recorded and saved" in result.stderr
    totals = json.loads(result.stdout)["totals"]
    assert (totals["events"], totals["interrupted_at_line"]) == (6, 6)
    saved = decode_session((tmp_path / "out" / f"{MINIMAL_ID}.json").read_bytes())
    assert [loop.status for loop in saved.loops] == ["Aborted"]  # flushed: the open loop is kept
    assert len(saved.loops[0].events) == 6


def test_record_ctrl_c_ends_a_read_waiting_for_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`producer | phi-session record -` with the producer silent: the read waits, and only
    an exception ends it. The lines read before are recorded and saved."""
    import signal

    lines = [line.encode() + b"\n" for line in example_lines() if MINIMAL_ID in line][:4]

    class Silent(io.BytesIO):  # stdin whose producer writes four lines, then waits
        def readline(self, size: int | None = -1) -> bytes:
            if lines:
                return lines.pop(0)
            signal.raise_signal(signal.SIGINT)  # as a read waiting in the kernel runs the handler
            raise AssertionError("Ctrl-C left the read waiting")

        def __next__(self) -> bytes:  # (BytesIO's own does not call readline)
            return self.readline()

    result = CliRunner().invoke(
        main, ["record", "-", "--dir", str(tmp_path / "out"), "--json"], input=Silent()
    )
    assert result.exit_code == EXIT_INTERRUPTED, (result.stderr, result.exception)
    assert "interrupted after line 4: what was read is recorded and saved" in result.stderr
    assert json.loads(result.stdout)["totals"]["events"] == 4
    assert len(decode_session((tmp_path / "out" / f"{MINIMAL_ID}.json").read_bytes()).loops[0].events) == 4


def test_record_ctrl_c_arriving_once_the_input_ended_still_saves_what_was_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tail -f x | phi-session record -`: Ctrl-C also ends the producer, so the read may see the
    end of the input before the signal is handled. It came after the read loop and nothing
    was saved."""
    import signal

    from phi_session.cli import commands

    close = commands._RejectedLines.close

    calls = itertools.count()

    def signalled(self: object) -> None:  # the first thing after the input ended
        if next(calls) == 0:
            signal.raise_signal(signal.SIGINT)
        close(self)  # type: ignore[arg-type]

    monkeypatch.setattr(commands._RejectedLines, "close", signalled)
    lines = len(example_lines())
    result = run("record", EXAMPLE_STREAM, "--dir", tmp_path / "out", "--json")
    assert result.exit_code == EXIT_INTERRUPTED, (result.stderr, result.exception)
    assert f"interrupted after line {lines}: what was read is recorded and saved" in result.stderr
    assert json.loads(result.stdout)["totals"]["interrupted_at_line"] == lines
    assert sorted(p.stem for p in (tmp_path / "out").glob("*.json")) == sorted(EXAMPLE_IDS)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _record_with_ctrl_c_at_saves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, interrupted: tuple[int, ...]
) -> Result:
    """`record` of the example stream into a directory, a SIGINT raised as the saves
    numbered `interrupted` (from 0) begin."""
    import signal

    save = JsonDirStore.save
    calls = itertools.count()

    def signalled(self: JsonDirStore, session: Session) -> None:
        if next(calls) in interrupted:
            signal.raise_signal(signal.SIGINT)
        save(self, session)

    monkeypatch.setattr(JsonDirStore, "save", signalled)
    return run("record", EXAMPLE_STREAM, "--dir", tmp_path / "out")


def test_record_ctrl_c_during_the_final_save_finishes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = _record_with_ctrl_c_at_saves(tmp_path, monkeypatch, (1,))
    assert result.exit_code == EXIT_INTERRUPTED, (result.stderr, result.exception)
    assert "what was read is recorded and saved" in result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("total: 5 sessions")
    assert sorted(p.stem for p in (tmp_path / "out").glob("*.json")) == sorted(EXAMPLE_IDS)


def test_record_second_ctrl_c_gives_up_the_save_and_says_what_was_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = _record_with_ctrl_c_at_saves(tmp_path, monkeypatch, (1, 2))  # Ctrl-C, and again
    assert_one_line_error(
        result,
        EXIT_INTERRUPTED,
        "interrupted again: the save was given up",
        "2 sessions saved",
        "3 sessions not saved",
    )
    assert len(list((tmp_path / "out").glob("*.json"))) == 2


def test_record_errors(tmp_path: Path) -> None:
    assert_one_line_error(run("record", tmp_path / "missing.jsonl"), EXIT_FAILURE, "missing.jsonl")
    assert_one_line_error(run("record", tmp_path), EXIT_USAGE, "directory")
    assert_one_line_error(
        run("record", EXAMPLE_STREAM, "--dir", tmp_path / "a", "--store", tmp_path), EXIT_USAGE, "--dir"
    )
    assert_one_line_error(run("record"), EXIT_USAGE, "FILE")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["record", str(EXAMPLE_STREAM), "--dir", ""], "--dir: empty directory path"),
        (["demo", "--dir", ""], "--dir: empty directory path"),
        (["import", ""], "PATH: empty path"),
    ],
)
def test_an_empty_directory_or_path_is_a_usage_error_not_the_working_directory(
    tmp_path: Path, args: list[str], fragment: str
) -> None:
    """``--dir "$OUT"`` with OUT unset made the working directory a JSON store (record
    wrote 5 session files and locks into it, demo 16); ``import ''`` read every *.json there."""
    (tmp_path / "stray.json").write_bytes((EXAMPLES / "session-basic.json").read_bytes())
    before = sorted(path.name for path in tmp_path.iterdir())
    assert_one_line_error(run(*args), EXIT_USAGE, fragment)
    assert sorted(path.name for path in tmp_path.iterdir()) == before


def test_default_store_and_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert run("record", EXAMPLE_STREAM).exit_code == EXIT_OK
    assert (tmp_path / ".phi-session" / "sessions.db").is_file()
    assert len(json_out(run("list", "--json"))) == 5  # type: ignore[arg-type]
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "elsewhere") + "/")
    assert_one_line_error(run("list", "--json"), EXIT_FAILURE, "no store at", "elsewhere")
    run("record", EXAMPLE_STREAM)
    assert len(list((tmp_path / "elsewhere").glob("*.json"))) == 5


@pytest.mark.parametrize(
    "command", [["list"], ["show", "s"], ["stats"], ["search", "x"], ["export", "s"], ["rm", "s"]]
)
def test_an_empty_file_is_not_a_store_and_stays_empty(tmp_path: Path, command: list[str]) -> None:
    """An empty .db file (``touch x.db``) became an SQLite store when a command read it."""
    empty = tmp_path / "x.db"
    empty.touch()
    result = run(*command, "--store", empty)
    assert_one_line_error(result, EXIT_FAILURE, f"{empty} is an empty file, not a store")
    assert empty.stat().st_size == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["x.db"]


@pytest.mark.parametrize("command", [["list"], ["rm", "s"]])
def test_a_sqlite_file_of_no_store_is_not_made_one(tmp_path: Path, command: list[str]) -> None:
    """`rm` opened a blank SQLite file to write, and made it an empty store."""
    blank = tmp_path / "blank.db"
    conn = sqlite3.connect(blank)
    conn.execute("VACUUM")  # a database with no table yet: not a store, whoever made it
    conn.close()
    before = blank.read_bytes()
    assert_one_line_error(
        run(*command, "--store", blank), EXIT_FAILURE, "no SQLite store at", "holds no phi-session"
    )
    assert blank.read_bytes() == before


def test_a_bad_store_url_from_the_environment_is_named_as_such(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHI_SESSION_STORE", "nosuch://x")
    result = run("list")
    assert_one_line_error(result, EXIT_USAGE, "environment variable PHI_SESSION_STORE='nosuch://x'")
    assert "--store" not in result.stderr  # no --store was given


def test_bad_store_url_is_one_line() -> None:
    result = run("list", "--store", "nosuch://x")
    assert result.exit_code in (EXIT_FAILURE, EXIT_USAGE)
    assert_one_line_error(result, result.exit_code, "nosuch")


# -- list ---------------------------------------------------------------------------------------


def test_list_table(store_dir: Path) -> None:
    result = run("list", "--store", store_dir)
    assert result.exit_code == EXIT_OK
    header, *rows = result.stdout.strip().splitlines()
    assert header.split()[:4] == ["ID", "AGENT", "CREATED", "LAST"]
    assert [row.split()[0] for row in rows] == [MINIMAL_ID, PARALLEL_ID, CHILD_ID, PARENT_ID, BASIC_ID]
    assert "openai/gpt-4o, anthropic/claude-sonnet-4-5" in rows[1]
    assert "1,534" in rows[4]
    assert header.split()[-2:] == ["MODEL", "PROMPT"]
    assert "How hot must" in rows[3]  # the first prompt, cut to fit


def test_list_table_fits_narrow_terminals(store_dir: Path) -> None:
    for columns, headers in (
        (80, ["ID", "LAST", "ACTIVE", "LOOPS", "TOKENS"]),
        (110, ["ID", "AGENT", "LAST", "ACTIVE", "DURATION", "LOOPS", "TURNS", "TOKENS"]),
    ):
        result = CliRunner().invoke(main, ["list", "--store", str(store_dir)], env={"COLUMNS": str(columns)})
        header, *rows = result.stdout.splitlines()
        assert header.split() == headers
        assert max(len(line) for line in result.stdout.splitlines()) <= columns
        assert rows[0].split()[0] == MINIMAL_ID and rows[-1].split()[-1] == "1,534"  # nothing cut


@pytest.mark.parametrize("columns", ["0", "5"])
def test_list_and_show_ignore_an_unusable_columns(store_dir: Path, columns: str) -> None:
    # Some CI runners set COLUMNS=0: as if unset, not a width nothing fits in.
    for args in (["list"], ["show", PARENT_ID]):
        result = CliRunner().invoke(main, [*args, "--store", str(store_dir)], env={"COLUMNS": columns})
        assert result.exit_code == EXIT_OK
        assert PARENT_ID in result.stdout, args


def test_narrow_terminals_never_cut_ids_keys_or_numbers(tmp_path: Path) -> None:
    # The demo's sessions: one with "8 Completed, 1 Rejected" loops, three models, long snippets.
    assert run("demo", "--store", tmp_path / "d.db").exit_code == EXIT_OK
    rows = json_out(run("list", "--store", tmp_path / "d.db", "--json"))
    models = json_out(run("stats", "--by", "model", "--store", tmp_path / "d.db", "--json"))
    hits = json_out(run("search", "CI", "--store", tmp_path / "d.db", "--json"))
    assert isinstance(rows, list) and isinstance(models, list) and isinstance(hits, list)

    def shown(columns: int, *args: str) -> str:
        result = CliRunner().invoke(
            main, [*args, "--store", str(tmp_path / "d.db")], env={"COLUMNS": str(columns)}
        )
        assert result.exit_code == EXIT_OK
        assert max(len(line) for line in result.stdout.splitlines()) <= columns, (columns, args)
        return result.stdout

    for columns in (80, 100, 120):
        words = shown(columns, "list").split()
        for row in rows:
            assert row["session_id"] in words and f"{row['total_tokens']:,}" in words, columns
        words = shown(columns, "stats", "--by", "model").split()
        for group in models:
            assert group["key"] in words and f"{group['usage']['total_tokens']:,}" in words, columns
        words = shown(columns, "search", "CI").split()  # (the snippets wrap beside folded loop ids)
        for hit in hits:
            assert hit["session_id"] in words and set(hit["snippet"].split()) <= set(words), columns


def test_terminals_narrower_than_a_row_of_ids_drop_columns_rather_than_cut_ids(tmp_path: Path) -> None:
    # Ids are what users copy into the next command: other columns wrap, then go; an id
    # folds only on a terminal narrower than itself.
    assert run("demo", "--store", tmp_path / "d.db").exit_code == EXIT_OK
    rows = json_out(run("list", "--store", tmp_path / "d.db", "--json"))
    agents = json_out(run("stats", "--by", "agent", "--store", tmp_path / "d.db", "--json"))
    hits = json_out(run("search", "CI", "--store", tmp_path / "d.db", "--json"))
    assert isinstance(rows, list) and isinstance(agents, list) and isinstance(hits, list)
    sessions = [row["session_id"] for row in rows]
    child = next(row for row in rows if row["parent_session_id"] is not None)
    stored = json_out(run("show", child["session_id"], "--json", "--store", tmp_path / "d.db"))
    assert isinstance(stored, dict)
    loop_ids = [loop["loop_id"] for loop in stored["loops"]]  # in the loop tree
    for columns in (70, 60, 50, 40, 30):
        outputs = {}
        for args in (
            ("list",),
            ("stats", "--by", "agent"),
            ("search", "CI"),
            ("show", child["session_id"]),
        ):
            result = CliRunner().invoke(
                main, [*args, "--store", str(tmp_path / "d.db")], env={"COLUMNS": str(columns)}
            )
            assert result.exit_code == EXIT_OK, result.output
            assert max(len(line) for line in result.stdout.splitlines()) <= columns, (columns, args)
            # Whole words where an id fits the terminal, else folded: every character kept.
            outputs[args[0]] = result.stdout.split() if columns >= 36 else "".join(result.stdout.split())
        assert all(session_id in outputs["list"] for session_id in sessions), columns
        assert all(group["key"] in outputs["stats"] for group in agents), columns
        assert all(hit["session_id"] in outputs["search"] for hit in hits), columns
        shown = "".join(outputs["show"]) if columns >= 36 else outputs["show"]
        for text in (child["session_id"], child["agent_id"], child["parent_session_id"], *loop_ids):
            assert text in shown, columns


def test_list_json_and_filters(store_dir: Path) -> None:
    def ids(*args: str) -> list[str]:
        data = json_out(run("list", "--store", str(store_dir), "--json", *args))
        assert isinstance(data, list)
        return [row["session_id"] for row in data]

    rows = json_out(run("list", "--store", str(store_dir), "--json"))
    assert isinstance(rows, list) and len(rows) == 5
    child = next(row for row in rows if row["session_id"] == CHILD_ID)
    assert child["parent_session_id"] == PARENT_ID
    assert child["total_tokens"] == 69 and child["turn_count"] == 1
    assert child["created_at"] == "2025-06-02T14:30:01.306Z"

    assert ids("--agent", "b3d9f1a7-8c2e-4f6b-9a4d-1e7c5b3a9f28") == [CHILD_ID]
    assert ids("--model", "openai/gpt-4o") == [PARALLEL_ID]
    assert ids("--model", "gpt-4o") == [PARALLEL_ID]
    assert ids("--status", "Aborted") == []
    assert len(ids("--status", "Completed")) == 5
    assert ids("--min-tokens", "1000") == [PARENT_ID, BASIC_ID]
    assert ids("--limit", "2") == [MINIMAL_ID, PARALLEL_ID]
    # The next page's cursor, on one line whatever the width (Rich wrapped it at 80 columns).
    paged = run("list", "--limit", "2", "--store", store_dir)
    [cursor] = [line for line in paged.stderr.splitlines() if line.startswith("more may follow: --after ")]
    assert ids("--after", cursor.rpartition(" ")[2])[:1] == [CHILD_ID]
    assert ids("--since", "2025-06-03") == [MINIMAL_ID, PARALLEL_ID]
    assert ids("--until", "2025-06-02") == [BASIC_ID]
    assert ids("--since", "2025-06-02T14:30:00.500Z", "--until", "2025-06-03") == [CHILD_ID]
    assert ids("--parent", PARENT_ID) == [CHILD_ID]
    assert ids("--order", "tokens")[:2] == [BASIC_ID, PARENT_ID]
    assert ids("--since", "36500d") == ids()  # an age: everything of the last century
    assert ids("--since", "1h") == []  # the examples are from 2025


def test_the_page_cursor_is_printed_as_it_is_never_as_an_emoji(tmp_path: Path) -> None:
    # Rich turned ":100:" (a token total) and ":fire:" (in an id) into emoji: the cursor
    # printed could not be passed back.
    from phi_session.stores.conformance import at, make_loop, make_session

    with ps.SqliteStore(tmp_path / "s.db") as store:
        for session_id, tokens in (("s1", 500), ("s2", 100), ("s3", 50)):
            store.save(make_session(session_id, loops=[make_loop(session_id, 1, tokens=tokens)]))
        store.save(make_session("x:fire:", loops=[make_loop("x:fire:", 1, tokens=7)], created_at=at(9)))

    def cursor(*args: str) -> str:
        result = run("list", "--store", tmp_path / "s.db", "--limit", *args)
        [line] = [line for line in result.stderr.splitlines() if line.startswith("more may follow: --after ")]
        return line.rpartition(" ")[2]

    assert cursor("2", "--order", "tokens") == "tokens:100:s2"
    assert cursor("1").endswith(":x:fire:")
    following = run(
        "list", "--store", tmp_path / "s.db", "--order", "tokens", "--after", "tokens:100:s2", "--json"
    )
    assert [row["session_id"] for row in json.loads(following.stdout)] == ["s3", "x:fire:"]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--since", "yesterday"), "--since"),
        (("--until", "2025-13-01"), "--until"),
        (("--status", "Done"), "--status"),
        (("--limit", "-1"), "--limit"),
        (("--limit", "99999999999999999999999"), "--limit"),
        (("--min-tokens", "9223372036854775808"), "--min-tokens"),
        (("--limit", "+5"), "--limit"),
        (("--limit", "\u0665"), "--limit"),  # an Arabic-Indic five
        (("--min-tokens", "many"), "--min-tokens"),
        (("--order", "random"), "--order"),
        (("--since", "2025-06-03", "--until", "2025-06-01"), "--until"),
        (("--no-such-option",), "no-such-option"),
    ],
)
def test_list_usage_errors(store_dir: Path, args: tuple[str, ...], fragment: str) -> None:
    assert_one_line_error(run("list", "--store", store_dir, *args), EXIT_USAGE, fragment)


def test_list_empty_store(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = run("list", "--store", tmp_path / "empty")
    assert result.exit_code == EXIT_OK and result.stdout == ""
    assert "no sessions" in result.stderr


def test_list_prices_around_a_corrupt_session(store_dir: Path, tmp_path: Path) -> None:
    # Its row is listed (the summary is intact), its cost unknown, with one warning;
    # pricing it failed the whole listing.
    db = tmp_path / "s.db"
    assert run("import", store_dir, "--store", db).exit_code == EXIT_OK
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE loops SET outline = X'7b7d', record = X'7b7d' WHERE session_id = ?", (BASIC_ID,))
    conn.close()
    result = run("list", "--store", db, "--json")
    rows = {row["session_id"]: row for row in json_out(result)}  # type: ignore[union-attr]
    assert set(rows) == set(EXAMPLE_IDS) and rows[BASIC_ID]["cost"]["usd"] is None
    assert f"'{BASIC_ID}'" in result.stderr and result.stderr.count("\n") == 1


# -- show / tree / context ---------------------------------------------------------------------


def test_show(store_dir: Path) -> None:
    result = run("show", PARENT_ID, "--store", store_dir)
    assert result.exit_code == EXIT_OK, result.stderr
    out = result.stdout
    assert "FirstLoop at 2025-06-02T14:30:00Z" in out
    assert PARENT_LOOP in out and "1 Completed" in out
    assert f"sub-agent session {CHILD_ID} (loop {CHILD_LOOP}) via researcher call toolu_02B" in out
    assert "turn 0 · User" in out and "calls researcher" in out
    assert "1,276 tokens" in out
    assert "AgentStart" not in out  # the event log only with --events

    child = run("show", CHILD_ID, "--store", store_dir).stdout
    assert f"session {PARENT_ID}, loop {PARENT_LOOP}, tool researcher (call toolu_02B)" in child

    parallel = run("show", PARALLEL_ID, "--store", store_dir).stdout
    winner_line = next(line for line in parallel.splitlines() if PARALLEL_WINNER in line and "#" in line)
    assert "parallel winner" in winner_line
    assert "not selected" in parallel and "temperature 0.2 " in parallel

    basic = run("show", BASIC_ID, "--store", store_dir).stdout
    # The continuation is drawn under the loop it continues.
    first = basic.index(BASIC_LOOPS[0])
    second = basic.index(BASIC_LOOPS[1])
    assert first < second and "Default" in basic[second - 40 : second]


def test_show_survives_a_parent_cycle(store_dir: Path) -> None:
    # phi-core's compaction pass can leave loops naming each other (or themselves) as parent.
    path = store_dir / f"{BASIC_ID}.json"
    data = json.loads(path.read_bytes())
    data["loops"][0]["parent_loop_id"] = BASIC_LOOPS[1]
    path.write_text(json.dumps(data))
    out = run("show", BASIC_ID, "--store", store_dir).stdout
    labels = [line for line in out.splitlines() if "● Completed" in line]
    assert len(labels) == 2
    assert sum(BASIC_LOOPS[0] in line for line in labels) == 1
    assert sum(BASIC_LOOPS[1] in line for line in labels) == 1


def test_show_renders_a_long_continuation_chain(tmp_path: Path) -> None:
    # Deeper than the recursion limit: the loop forest and tree are built iteratively,
    # and loops past MAX_TREE_DEPTH are drawn flat, naming the loop they continue.
    count, started = 1500, Timestamp.parse("2025-06-01T00:00:00Z")
    loops = [
        LoopRecord.start(
            loop_id=f"loop-{i}",
            session_id="chain",
            agent_id="agent",
            started_at=started,
            parent_loop_id=f"loop-{i - 1}" if i else None,
            status="Completed",
        )
        for i in range(count)
    ]
    for record, child in itertools.pairwise(loops):
        record.children_loop_ids = (child.loop_id,)
    JsonDirStore(tmp_path / "chain").save(
        Session(
            session_id="chain",
            agent_id="agent",
            created_at=started,
            last_active_at=started,
            formation=SessionFormation("FirstLoop", started),
            loops=loops,
        )
    )
    result = run("show", "chain", "--store", tmp_path / "chain")
    assert result.exit_code == EXIT_OK, (result.stderr, result.exception)
    labels = [line for line in result.stdout.splitlines() if "● Completed" in line]
    shown = [label[label.index("loop-") :].split()[0] for label in labels]
    assert shown == [f"loop-{i}" for i in range(count)]
    assert f"continues loop #{count - 1}" in result.stdout
    assert len({label.index("#") for label in labels}) == MAX_TREE_DEPTH  # nesting stops there
    # The waterfall's labels stop nesting there too: none is all indentation.
    waterfall = CliRunner().invoke(
        main, ["show", "chain", "--timeline", "--store", str(tmp_path / "chain")], env={"COLUMNS": "120"}
    )
    bars = [line for line in waterfall.stdout.splitlines() if "loop #" in line]
    assert [int(bar.split("loop #")[1].split()[0]) for bar in bars] == list(range(1, count + 1))
    assert max(bar.index("loop #") for bar in bars) == 2 * MAX_TREE_DEPTH


def test_durations_read_the_same_backwards() -> None:
    assert [render.duration(s) for s in (-5, -0.25, -125, -0.0, 0.0004)] == [
        "-5.0s",
        "-250ms",
        "-2m05s",
        "0ms",
        "0ms",
    ]


def test_show_looks_loops_up_in_one_index() -> None:
    """Each loop's details scanned the loops for its parent: a session of 20,000 chained
    loops took quadratic time to show."""
    s = chain_of(300)
    s.loops[0].parent_loop_id = "elsewhere.c.1"
    out = io.StringIO()
    Console(file=out, width=200).print(render.loop_tree(s, loop_forest(s)))
    assert s.loops.passes <= 3  # type: ignore[attr-defined]
    assert out.getvalue().count("(not in this session)") == 1
    assert "continues loop elsewhere.c.1 (not in this session)" in out.getvalue()


# Many lines of text as tools give them: blank ones, a trailing newline, tabs, lines wider
# than the terminal, markup and controls that must stay escaped.
MANY_LINES = "\n".join(f"{n}\t[bold]x[/] \x1b[31m" + "y" * (n % 97) for n in range(300)) + "\n\n\u202e end\n"


def _message_with(text: str) -> UserMessage:
    return UserMessage(
        content=(TextContent(text=text), ThinkingContent(thinking=text), TextContent(text="")), timestamp=0
    )


def _drawn(renderable: Any, color: bool) -> str:
    out = io.StringIO()
    console = Console(file=out, width=60, force_terminal=color, color_system="truecolor" if color else None)
    console.print(renderable)
    return out.getvalue()


@pytest.mark.parametrize("color", [False, True])
def test_context_draws_a_text_of_many_lines_as_one_text_drew_it(color: bool) -> None:
    """The lines are handed to rich one by one (see the next test): the output is what the
    whole text as one `Text` gave, escapes, wrapping and styles alike."""
    view = render.message_view(_message_with(MANY_LINES))
    before = Group(
        view.renderables[0],
        render.plain(MANY_LINES),
        render.plain(f"(thinking) {MANY_LINES}", "dim italic"),
        render.plain(""),
        Text(),
    )
    assert _drawn(view, color) == _drawn(before, color)
    assert "\x1b" not in _drawn(view, False) and "\\x1b[31m" in _drawn(view, False)


def test_context_hands_rich_the_lines_of_a_text_one_by_one() -> None:
    """rich re-partitions one `Text`'s text at each of its newlines (Segment.split_and_crop_lines):
    a tool result of n lines took time in n squared (80,000 lines: 21 s to print)."""
    lines = 5_000
    view = render.message_view(_message_with("line\n" * lines))
    texts = [renderable for renderable in view.renderables if isinstance(renderable, Text)]
    assert len(texts) == len(view.renderables)
    assert all("\n" not in text.plain for text in texts)
    assert len(texts) >= 2 * lines


def test_show_events(store_dir: Path) -> None:
    out = run("show", BASIC_ID, "--store", store_dir, "--events").stdout
    log = out[out.index("events (") :]
    rows = [line for line in log.splitlines() if line.startswith("#")]
    stored = decode_session((store_dir / f"{BASIC_ID}.json").read_bytes())
    assert len(rows) == sum(len(loop.events) for loop in stored.loops)
    assert rows[0].split()[:3] == ["#1", "0", "AgentStart"]
    assert rows[-1].split()[:3] == ["#2", str(len(stored.loops[1].events) - 1), "AgentEnd"]


def test_show_json_is_the_stored_session(store_dir: Path) -> None:
    result = run("show", BASIC_ID, "--store", store_dir, "--json")
    assert result.exit_code == EXIT_OK
    assert result.stdout.encode() == (store_dir / f"{BASIC_ID}.json").read_bytes() + b"\n"


def test_show_errors(store_dir: Path) -> None:
    assert_one_line_error(run("show", "nope", "--store", store_dir), EXIT_FAILURE, "nope")
    assert_one_line_error(run("show", "../etc", "--store", store_dir), EXIT_USAGE, "../etc")
    assert_one_line_error(run("show", "--store", store_dir), EXIT_USAGE, "ID")


def test_tree(store_dir: Path) -> None:
    result = run("tree", PARENT_ID, "--store", store_dir)
    assert result.exit_code == EXIT_OK
    first, second = result.stdout.strip().splitlines()
    assert first.startswith(PARENT_ID)
    assert f"researcher (toolu_02B) → {CHILD_ID}" in second

    graph = json_out(run("tree", PARENT_ID, "--store", str(store_dir), "--json"))
    assert isinstance(graph, dict)
    assert graph["session_id"] == PARENT_ID and graph["via"] is None and graph["found"]
    (child,) = graph["children"]
    assert child["session_id"] == CHILD_ID and child["found"] and child["children"] == []
    assert child["via"] == {
        "parent_loop_id": PARENT_LOOP,
        "tool_name": "researcher",
        "tool_call_id": "toolu_02B",
        "child_loop_id": CHILD_LOOP,
    }
    assert child["total_tokens"] == 69

    child_view = run("tree", CHILD_ID, "--store", store_dir).stdout
    assert f"spawned by session {PARENT_ID}" in child_view

    assert run("rm", CHILD_ID, "--store", store_dir).exit_code == EXIT_OK
    graph = json_out(run("tree", PARENT_ID, "--store", str(store_dir), "--json"))
    assert isinstance(graph, dict)
    assert graph["children"][0]["found"] is False
    assert "not in this store" in run("tree", PARENT_ID, "--store", store_dir).stdout
    assert_one_line_error(run("tree", CHILD_ID, "--store", store_dir), EXIT_FAILURE, CHILD_ID)


def test_an_unreadable_sub_agent_session_is_passed_over(store_dir: Path) -> None:
    # As listings skip it: the parent's tree and waterfall still show, with one warning.
    (store_dir / f"{CHILD_ID}.json").write_text("garbage", encoding="utf-8")
    tree = run("tree", PARENT_ID, "--store", store_dir, "--json")
    assert json_out(tree)["children"][0]["found"] is False  # type: ignore[index]
    assert f"skipping unreadable session '{CHILD_ID}'" in tree.stderr
    timeline = run("show", PARENT_ID, "--timeline", "--store", store_dir, "--json")
    assert {bar["session_id"] for bar in json_out(timeline)} == {PARENT_ID}  # type: ignore[union-attr]
    assert f"skipping unreadable session '{CHILD_ID}'" in timeline.stderr


def test_show_asked_for_two_views_says_so(store_dir: Path) -> None:
    result = run("show", PARENT_ID, "--timeline", "--events", "--store", store_dir)
    assert_one_line_error(result, EXIT_USAGE, "--timeline and --events both name a view: give one")


def test_context(store_dir: Path) -> None:
    messages = json_out(run("context", BASIC_ID, BASIC_LOOPS[1], "--store", str(store_dir), "--json"))
    assert isinstance(messages, list)
    stored = decode_session((store_dir / f"{BASIC_ID}.json").read_bytes())
    expected = len(stored.loops[0].messages) + len(stored.loops[1].messages)
    assert len(messages) == expected
    assert messages[0]["role"] == "user"
    assert {m["role"] for m in messages} >= {"user", "assistant", "toolResult"}

    text = run("context", BASIC_ID, BASIC_LOOPS[0], "--store", store_dir)
    assert text.exit_code == EXIT_OK
    assert "read_file" in text.stdout and "assistant" in text.stdout
    assert f"{len(stored.loops[0].messages)} messages" in text.stderr

    assert_one_line_error(
        run("context", BASIC_ID, "no.such.loop", "--store", store_dir), EXIT_FAILURE, "no.such.loop"
    )


def test_context_takes_a_loop_as_show_numbers_it_as_fork_and_diff_do(store_dir: Path) -> None:
    """``context ID '#2'`` failed with "no loop '#2'" though show prints '#2' and fork takes it."""
    by_id = run("context", BASIC_ID, BASIC_LOOPS[1], "--store", store_dir, "--json")
    by_number = run("context", BASIC_ID, "#2", "--store", store_dir, "--json")
    assert by_number.exit_code == EXIT_OK, by_number.stderr
    assert json_out(by_number) == json_out(by_id)
    text = run("context", BASIC_ID, "#2", "--store", store_dir)
    assert text.stdout == run("context", BASIC_ID, BASIC_LOOPS[1], "--store", store_dir).stdout
    assert_one_line_error(run("context", BASIC_ID, "#3", "--store", store_dir), EXIT_FAILURE, "no loop '#3'")


def test_untrusted_text_cannot_drive_the_terminal(tmp_path: Path) -> None:
    hostile = "\x1b[2J\x1b]0;owned\x07 [bold red]markup[/] \u009b31m \u202edesrever"
    lines = [
        line.replace('"Say hello."', json.dumps(hostile)).replace(
            '"model":"claude-haiku-4-5"', '"model":' + json.dumps("haiku\x1b[31m\u2066")
        )
        for line in example_lines()
        if MINIMAL_ID in line
    ]
    stream = tmp_path / "hostile.jsonl"
    stream.write_text("\n".join(lines) + "\n")
    assert run("record", stream, "--dir", tmp_path / "out").exit_code == EXIT_OK
    loop = f"{MINIMAL_ID}.anthropic.claude-haiku-4-5.1"
    outputs = {
        "context": run("context", MINIMAL_ID, loop, "--store", tmp_path / "out").stdout,
        "show": run("show", MINIMAL_ID, "--store", tmp_path / "out").stdout,  # its cost names the model
        "search": run("search", "markup", "--store", tmp_path / "out").stdout,
    }
    for command, out in outputs.items():
        assert not set(out) & {"\x1b", "\x07", "\u009b", "\u202e", "\u2066"}, command
    out = outputs["context"]
    assert (
        "\\x1b[2J" in out and "[bold red]markup[/]" in out and "\\x9b31m" in out and "\\u202edesrever" in out
    )
    assert "haiku\\x1b[31m\\u2066" in outputs["show"]


def test_next_page_cursor_cannot_drive_the_terminal(tmp_path: Path) -> None:
    # The cursor printed under a full page holds the last row's stored session id.
    hostile = MINIMAL_ID + "\x1b[31m\x1b]0;owned\x07\u009b2J\u202eevil"
    stream = tmp_path / "hostile.jsonl"
    stream.write_text("\n".join(example_lines()).replace(MINIMAL_ID, json.dumps(hostile)[1:-1]) + "\n")
    store = tmp_path / "s.db"
    assert run("record", stream, "--store", store).exit_code == EXIT_OK
    paged = run("list", "--limit", "1", "--store", store)
    [cursor] = [line for line in paged.stderr.splitlines() if line.startswith("more may follow: --after ")]
    assert not set(cursor) & {"\x1b", "\x07", "\u009b", "\u202e"}
    assert cursor.endswith(f"{MINIMAL_ID}\\x1b[31m\\x1b]0;owned\\x07\\x9b2J\\u202eevil")


def test_an_id_holding_a_newline_or_a_tab_is_shown_escaped_on_its_one_row(tmp_path: Path) -> None:
    # A raw newline made one session two rows (the second a forged-looking id); a tab
    # (or its one-line space) made 'tab\there' look like 'tab here'.
    forged, tabbed = "real-run\nforged-session-id", "tab\there"
    lines = [line for line in example_lines() if MINIMAL_ID in line]
    stream = tmp_path / "ids.jsonl"
    stream.write_text(
        "".join(
            line.replace(MINIMAL_ID, json.dumps(sid)[1:-1]) + "\n"
            for sid in (forged, tabbed)
            for line in lines
        )
    )
    store = tmp_path / "s.db"
    outputs = {
        "record": run("record", stream, "--store", store).stdout,
        "list": run("list", "--store", store).stdout,
        "search": run("search", "hello", "--store", store).stdout,
        "show": run("show", forged, "--store", store).stdout,
        "show tab": run("show", tabbed, "--store", store).stdout,
        "diff": run("diff", f"{forged}:#1", f"{tabbed}:#1", "--store", store).stdout,
        "diff sessions": run("diff", forged, tabbed, "--store", store).stdout,
        "fork": run("fork", forged, "#1", "--turn", "0", "--store", store).stderr,
    }
    exported = tmp_path / "exported.json"
    assert run("export", forged, "-o", exported, "--store", store).exit_code == EXIT_OK
    outputs["import"] = run("import", exported, "--store", tmp_path / "copy.db").stdout
    for command, out in outputs.items():
        assert "\t" not in out and "tab here" not in out, command
        assert not [line for line in out.splitlines() if line.lstrip(" │├└─").startswith("forged")], command
    for command in ("record", "list", "search", "show", "diff", "diff sessions", "fork", "import"):
        assert "real-run\\x0aforged-session-id" in outputs[command], command
    for command in ("record", "list", "search", "show tab", "diff", "diff sessions"):
        assert "tab\\x09here" in outputs[command], command
    assert "tab\\x09here.anthropic.claude-haiku-4-5.1" in outputs["show tab"]  # the loop tree's ids too


def test_an_id_holding_the_text_of_an_escape_is_not_shown_as_the_id_holding_that_character() -> None:
    # An id holding a backslash then x0a was shown as one holding a newline is: a\x0ab.
    newline, text = "s.a\nb.1", "s.a\\x0ab.1"
    assert render.ident(newline) == "s.a\\x0ab.1"
    assert render.ident(text) == "s.a\\\\x0ab.1"
    assert render.ident("C:\\agents\x1b") == "C:\\\\agents\\x1b"  # one escaping for all


# -- stats ---------------------------------------------------------------------------------------


def test_stats(store_dir: Path) -> None:
    by_model = json_out(run("stats", "--by", "model", "--store", str(store_dir), "--json"))
    assert isinstance(by_model, list)
    assert [row["key"] for row in by_model] == [
        "anthropic/claude-haiku-4-5",
        "anthropic/claude-sonnet-4-5",
        "openai/gpt-4o",
    ]
    assert sum(row["usage"]["total_tokens"] for row in by_model) == 2970
    by_day = json_out(run("stats", "--by", "day", "--store", str(store_dir), "--json"))
    assert isinstance(by_day, list)
    assert [(row["key"], row["sessions"]) for row in by_day] == [
        ("2025-06-01", 1),
        ("2025-06-02", 2),
        ("2025-06-03", 1),
        ("2025-06-04", 1),
    ]
    table = run("stats", "--store", store_dir)
    assert table.exit_code == EXIT_OK
    assert table.stdout.splitlines()[0].split()[:3] == ["AGENT", "SESSIONS", "LOOPS"]
    assert table.stdout.strip().splitlines()[-1].split()[:3] == ["total", "5", "7"]
    assert_one_line_error(
        run("stats", "--by", "week", "--store", store_dir), EXIT_USAGE, "--by: expected one of"
    )


# -- export / import / rm --------------------------------------------------------------------------


def test_export_json(store_dir: Path, tmp_path: Path) -> None:
    one = run("export", BASIC_ID, "--store", store_dir)
    assert one.exit_code == EXIT_OK
    assert one.stdout_bytes == (store_dir / f"{BASIC_ID}.json").read_bytes()
    both = json_out(run("export", BASIC_ID, MINIMAL_ID, "--store", str(store_dir)))
    assert isinstance(both, list) and [s["session_id"] for s in both] == [BASIC_ID, MINIMAL_ID]
    target = tmp_path / "basic.json"
    assert run("export", BASIC_ID, "--store", store_dir, "-o", target).exit_code == EXIT_OK
    stored = (store_dir / f"{BASIC_ID}.json").read_bytes()
    assert encode_session(decode_session(target.read_bytes())) == stored
    assert_one_line_error(run("export", BASIC_ID, "nope", "--store", store_dir), EXIT_FAILURE, "nope")
    assert_one_line_error(run("export", BASIC_ID, "--format", "xml", "--store", store_dir), EXIT_USAGE, "xml")


@pytest.mark.spec
def test_export_of_one_session_is_phi_cores_file_byte_for_byte(tmp_path: Path) -> None:
    """``export -o`` added a final newline phi-core's files do not have."""
    store = tmp_path / "store"
    assert run("record", EXAMPLES / "events-basic.jsonl", "--dir", store).exit_code == EXIT_OK
    target = tmp_path / "out.json"
    assert run("export", BASIC_ID, "--store", store, "-o", target).exit_code == EXIT_OK
    assert target.read_bytes() == (EXAMPLES / "session-basic.json").read_bytes()


def test_export_jsonl_gives_back_the_recorded_stream(store_dir: Path, tmp_path: Path) -> None:
    recorded = [line for line in example_lines() if BASIC_ID in line and '"MessageUpdate"' not in line]
    result = run("export", BASIC_ID, "--format", "jsonl", "--store", store_dir)
    assert result.exit_code == EXIT_OK
    assert result.stdout.splitlines() == recorded
    # A parent and its sub-agent exported together record back into the same sessions.
    stream = tmp_path / "family.jsonl"
    assert (
        run("export", PARENT_ID, CHILD_ID, "--format", "jsonl", "--store", store_dir, "-o", stream).exit_code
        == EXIT_OK
    )
    again = tmp_path / "again"
    assert run("record", stream, "--dir", again).exit_code == EXIT_OK
    for session_id in (PARENT_ID, CHILD_ID):
        name = f"{session_id}.json"
        assert (again / name).read_bytes() == (store_dir / name).read_bytes()
    assert (
        "warning" not in run("export", PARENT_ID, CHILD_ID, "--format", "jsonl", "--store", store_dir).stderr
    )
    # Alone, the sub-agent loses the tool call that spawned it (in its parent's events): said.
    alone = run("export", CHILD_ID, "--format", "jsonl", "--store", store_dir)
    assert alone.exit_code == EXIT_OK
    assert f"sub-agent session {CHILD_ID!r} is exported without its parent {PARENT_ID!r}" in alone.stderr


def test_export_jsonl_records_back_the_parallel_groups(store_dir: Path, tmp_path: Path) -> None:
    """The session files keep a parallel group on its loops, not its ParallelLoopStart/End:
    the exported stream had neither, so recording it back lost the group and its winner."""
    stream = tmp_path / "all.jsonl"
    assert run("export", *EXAMPLE_IDS, "--format", "jsonl", "--store", store_dir, "-o", stream).exit_code == 0
    assert sum('"ParallelLoop' in line for line in stream.read_text().splitlines()) == 2
    again = tmp_path / "again"
    result = run("record", stream, "--dir", again)
    assert result.exit_code == EXIT_OK and result.stderr == ""
    for session_id in EXAMPLE_IDS:
        name = f"{session_id}.json"
        assert (again / name).read_bytes() == (store_dir / name).read_bytes(), name


@pytest.mark.parametrize("cut", ["parent", "parent and branch"])
def test_export_jsonl_records_back_a_branch_that_never_started_of_a_group_that_never_ended(
    tmp_path: Path, cut: str
) -> None:
    """A group announced, one branch never started, the agent cut off before the group ended:
    the branch is recorded (Aborted, with no event of its own) but no loop records the group,
    so the exported stream named it nowhere and recording it back lost the branch."""

    def at(ms: int) -> Timestamp:
        return Timestamp.from_ns(1_750_000_000 * 10**9 + ms * 10**6)

    usage = ps.Usage(input=10, output=1, total_tokens=11)

    def start(loop_id: str, ms: int, parent: str | None = None) -> ps.AgentStart:
        return ps.AgentStart(
            agent_id="ag",
            session_id="S",
            loop_id=loop_id,
            parent_loop_id=parent,
            continuation_kind=ps.INITIAL,
            timestamp=at(ms),
        )

    events: list[ps.AgentEvent] = [
        start("S.main.1", 0),
        start("S.early.1", 1),  # opened before the group: aborted before its branches
        ps.ParallelLoopStart(session_id="S", loop_ids=("S.a.1", "S.b.2", "S.c.3"), timestamp=at(2)),
        start("S.late.1", 3),  # opened after the group: aborted after its branches
        start("S.a.1", 4, parent="S.main.1"),
        start("S.b.2", 5, parent="S.main.1"),
        ps.AgentEnd(loop_id="S.b.2", messages=(), usage=usage, timestamp=at(6)),
    ]
    if cut == "parent":
        events.append(ps.AgentEnd(loop_id="S.a.1", messages=(), usage=usage, timestamp=at(7)))
    stream = tmp_path / "cut.jsonl"
    stream.write_bytes(b"".join(encode_event(event) + b"\n" for event in events))
    stored = tmp_path / "stored"
    assert run("record", stream, "--dir", stored).exit_code == EXIT_OK
    recorded = decode_session((stored / "S.json").read_bytes())
    assert "S.c.3" in [loop.loop_id for loop in recorded.loops]
    exported = tmp_path / "exported.jsonl"
    assert run("export", "S", "--format", "jsonl", "--store", stored, "-o", exported).exit_code == EXIT_OK
    again = tmp_path / "again"
    result = run("record", exported, "--dir", again)
    assert result.exit_code == EXIT_OK and result.stderr == ""
    assert (again / "S.json").read_bytes() == (stored / "S.json").read_bytes()


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_export_names_a_session_given_twice_once(store_dir: Path, fmt: str) -> None:
    """Its events were written twice: recorded back, the session was not the stored one."""
    twice = run("export", BASIC_ID, MINIMAL_ID, BASIC_ID, "--format", fmt, "--store", store_dir)
    once = run("export", BASIC_ID, MINIMAL_ID, "--format", fmt, "--store", store_dir)
    assert twice.exit_code == once.exit_code == EXIT_OK
    assert twice.stdout_bytes == once.stdout_bytes


def test_export_jsonl_writes_a_kept_parallel_group_once(tmp_path: Path) -> None:
    recorder = SessionRecorder(SessionRecorderConfig(keep_session_events=True))
    for line in example_lines():
        recorder.on_json(line)
    recorder.flush()
    [session] = [s for s in recorder.drain_completed() if s.session_id == PARALLEL_ID]
    kept = [type(item.event).__name__ for item in session.iter_events() if item.loop is None]
    assert kept == ["ParallelLoopStart", "ParallelLoopEnd"]
    events = [type(event).__name__ for event in event_stream([session], parallel_groups=True)]
    assert events.count("ParallelLoopStart") == events.count("ParallelLoopEnd") == 1


def test_import_files_and_directories(store_dir: Path, tmp_path: Path) -> None:
    (store_dir / "broken.json").write_text("{not json")
    result = run("import", store_dir, tmp_path / "missing", "--store", "sqlite:imported.db", "--json")
    assert result.exit_code == EXIT_FAILURE  # something could not be imported...
    data = json.loads(result.stdout)
    assert sorted(row["session_id"] for row in data["imported"]) == sorted(EXAMPLE_IDS)  # ...the rest was
    assert {Path(e["path"]).name for e in data["errors"]} == {"broken.json", "missing"}
    assert len(result.stderr.strip().splitlines()) == 2
    listed = json_out(run("list", "--store", "sqlite:imported.db", "--json"))
    assert isinstance(listed, list) and len(listed) == 5
    # Imported sessions are the phi-core sessions, unchanged.
    exported = run("export", BASIC_ID, "--store", "sqlite:imported.db")
    assert exported.stdout_bytes == (store_dir / f"{BASIC_ID}.json").read_bytes()
    single = run("import", store_dir / f"{MINIMAL_ID}.json", "--store", f"{tmp_path}/copy/")
    assert single.exit_code == EXIT_OK and "1 session imported, 0 failed" in single.stdout
    assert (tmp_path / "copy" / f"{MINIMAL_ID}.json").is_file()


@pytest.mark.parametrize(
    ("store_name", "output_name"),
    [
        ("kept.db", "kept.db"),
        ("kept.db", "kept.db-wal"),
        ("kept/", f"kept/{MINIMAL_ID}.json"),
        ("kept/", "kept/new.json"),
        ("kept/", f"kept/{MINIMAL_ID}.json.lock"),
    ],
)
def test_export_never_writes_over_its_own_store(tmp_path: Path, store_name: str, output_name: str) -> None:
    """`export -o` onto the store it reads turned the SQLite store into a JSON file (exit 0);
    `fork --out` too."""
    store, output = f"{tmp_path}/{store_name}", tmp_path / output_name
    assert run("record", EXAMPLE_STREAM, "--store", store).exit_code == EXIT_OK
    before = files_under(tmp_path)
    for args in (("export", BASIC_ID, "-o"), ("fork", BASIC_ID, "#1", "--turn", "0", "--out")):
        result = run(*args, output, "--store", store)
        assert_one_line_error(result, EXIT_USAGE, f"{args[-1]} {output}: a file of the store")
        assert files_under(tmp_path) == before
    assert len(json_out(run("list", "--store", store, "--json"))) == 5  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("store_name", "linked"), [("kept.db", "kept.db"), ("kept/", f"kept/{MINIMAL_ID}.json")]
)
def test_export_never_writes_over_a_hard_link_of_its_store(
    tmp_path: Path, store_name: str, linked: str
) -> None:
    store, output = f"{tmp_path}/{store_name}", tmp_path / "elsewhere.out"
    assert run("record", EXAMPLE_STREAM, "--store", store).exit_code == EXIT_OK
    os.link(tmp_path / linked, output)
    before = output.read_bytes()
    for args in (("export", BASIC_ID, "-o"), ("fork", BASIC_ID, "#1", "--turn", "0", "--out")):
        result = run(*args, output, "--store", store)
        assert_one_line_error(result, EXIT_USAGE, f"{args[-1]} {output}: a file of the store")
        assert output.read_bytes() == before
    assert len(json_out(run("list", "--store", store, "--json"))) == 5  # type: ignore[arg-type]


def test_a_dash_output_is_stdout_for_export_and_fork(store_dir: Path, tmp_path: Path) -> None:
    """``export -o -`` (10,277 bytes) and ``fork --out -`` wrote a file named '-' and nothing
    to stdout, though ``record -`` reads stdin: ``export -o - | record -`` recorded nothing."""
    for fmt in ("json", "jsonl"):
        piped = run("export", PARENT_ID, "--format", fmt, "-o", "-", "--store", store_dir)
        assert piped.exit_code == EXIT_OK, piped.stderr
        assert (
            piped.stdout_bytes == run("export", PARENT_ID, "--format", fmt, "--store", store_dir).stdout_bytes
        )
    fork = ("fork", BASIC_ID, "#1", "--turn", "0", "--store", store_dir)
    piped = run(*fork, "--out", "-")
    assert piped.exit_code == EXIT_OK, piped.stderr
    assert json.loads(piped.stdout) == json.loads(run(*fork, "--json").stdout)
    assert not (tmp_path / "-").exists()


@pytest.mark.parametrize(
    "args", [["--rejected", "-"], ["--orphans", "-"], ["--rejected", "-", "--to", "nats://127.0.0.1:1"]]
)
def test_record_refuses_a_dash_output_as_its_stdout_is_the_summary(tmp_path: Path, args: list[str]) -> None:
    """``record --rejected -`` wrote a file named '-'; stdout, where '-' would write, carries the summary."""
    result = run("record", EXAMPLE_STREAM, *args)
    assert_one_line_error(result, EXIT_USAGE, f"{args[0]} -: ")
    assert sorted(path.name for path in tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["export", BASIC_ID, "-o", ""], "-o/--output"),
        (["fork", BASIC_ID, "#1", "--turn", "0", "--out", ""], "--out"),
        (["record", str(EXAMPLE_STREAM), "--rejected", ""], "--rejected"),
        (["record", str(EXAMPLE_STREAM), "--orphans", ""], "--orphans"),
    ],
)
def test_an_empty_output_file_name_is_a_usage_error(store_dir: Path, args: list[str], option: str) -> None:
    """``export -o ''`` (as from ``-o "$OUT"`` with OUT unset) failed blaming "stdout: No such
    file or directory"; ``record --rejected ''`` kept no rejected lines, saying nothing."""
    result = run(*args, "--store", store_dir)
    assert_one_line_error(result, EXIT_USAGE, f"{option}: empty file name")


def test_export_write_error_names_where(store_dir: Path) -> None:
    assert_one_line_error(
        run("export", BASIC_ID, "--store", store_dir, "-o", "/dev/full"),
        EXIT_FAILURE,
        "/dev/full: No space left on device",
    )
    with open("/dev/full", "wb") as full:
        result = subprocess.run(
            [script(), "export", BASIC_ID, "--store", str(store_dir)], stdout=full, stderr=subprocess.PIPE
        )
    assert result.returncode == EXIT_FAILURE
    assert result.stderr.decode() == "phi-session: error: stdout: No space left on device\n"


def test_import_keeps_the_good_sessions_of_an_array_with_a_bad_one(store_dir: Path, tmp_path: Path) -> None:
    good = [json.loads((store_dir / f"{sid}.json").read_bytes()) for sid in (BASIC_ID, MINIMAL_ID)]
    bad = {**good[1], "session_id": 42}
    (tmp_path / "mixed.json").write_text(json.dumps([good[0], bad, good[1]]))
    result = run("import", tmp_path / "mixed.json", "--store", f"{tmp_path}/copy/", "--json")
    assert result.exit_code == EXIT_FAILURE
    data = json.loads(result.stdout)
    assert [row["session_id"] for row in data["imported"]] == [BASIC_ID, MINIMAL_ID]
    [error] = data["errors"]
    assert error["path"] == str(tmp_path / "mixed.json")
    assert error["error"].startswith("session 2 of 3: ") and "session_id" in error["error"]
    assert len(result.stderr.strip().splitlines()) == 1
    for session_id in (BASIC_ID, MINIMAL_ID):
        name = f"{session_id}.json"
        assert (tmp_path / "copy" / name).read_bytes() == (store_dir / name).read_bytes()


@pytest.mark.parametrize("session_id", ["../../escape", "x" * 5000])
def test_import_of_an_unsafe_session_id_is_one_short_error(
    store_dir: Path, tmp_path: Path, session_id: str
) -> None:
    """The saver's own log line came first ('... no orphans sink: keeping it unsaved'), and
    each line held the whole id: 5,000 characters, three times."""
    hostile = tmp_path / "hostile.json"
    hostile.write_text(
        json.dumps({**json.loads((store_dir / f"{BASIC_ID}.json").read_bytes()), "session_id": session_id})
    )
    result = run("import", hostile, "--store", store_dir)
    assert_one_line_error(result, EXIT_FAILURE, f"{hostile}: unsafe session id")
    assert len(result.stderr) < 400


@pytest.mark.parametrize("store", ["new.db", "new-dir/", None])
def test_import_of_nothing_leaves_no_new_store(tmp_path: Path, store: str | None) -> None:
    (tmp_path / "broken.json").write_text("{not json")
    result = run("import", tmp_path / "broken.json", "missing.json", *(("--store", store) if store else ()))
    assert result.exit_code == EXIT_FAILURE
    assert "store:" not in result.stderr  # it names no store it did not write
    assert sorted(path.name for path in tmp_path.iterdir()) == ["broken.json"]


# Past what msgspec reads (its RecursionError), unclosed and closed, an array and an object.
TOO_DEEP = [b"[" * 100_000, b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000]


@pytest.mark.parametrize("deep", TOO_DEEP)
def test_import_skips_a_file_nested_too_deep_and_imports_the_rest(
    store_dir: Path, tmp_path: Path, deep: bytes
) -> None:
    """One such file made the whole import an internal error (RecursionError), importing
    nothing and leaving an empty store behind."""
    (store_dir / "00-deep.json").write_bytes(deep)
    result = run("import", store_dir, "--store", f"{tmp_path}/copy/", "--json")
    assert result.exit_code == EXIT_FAILURE
    data = json.loads(result.stdout)
    assert sorted(row["session_id"] for row in data["imported"]) == sorted(EXAMPLE_IDS)
    [error] = data["errors"]
    assert error["path"] == str(store_dir / "00-deep.json")
    assert "nesting too deep (phi-core allows 128 levels)" in error["error"]
    assert_one_line_error(result, EXIT_FAILURE, "00-deep.json", "nesting too deep")
    for session_id in EXAMPLE_IDS:
        name = f"{session_id}.json"
        assert (tmp_path / "copy" / name).read_bytes() == (store_dir / name).read_bytes()


@pytest.mark.parametrize("deep", TOO_DEEP)
def test_import_of_only_a_file_nested_too_deep_leaves_no_new_store(tmp_path: Path, deep: bytes) -> None:
    (tmp_path / "deep.json").write_bytes(deep)
    result = run("import", tmp_path / "deep.json", "--store", "new.db")
    assert_one_line_error(result, EXIT_FAILURE, "deep.json: ", "nesting too deep")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["deep.json"]


@pytest.mark.parametrize("deep", TOO_DEEP)
def test_record_skips_a_first_line_nested_too_deep_and_records_the_rest(tmp_path: Path, deep: bytes) -> None:
    """Told from a session file by reading it as JSON, such a first line made the whole record
    an internal error (RecursionError), recording nothing and leaving an empty store behind;
    later in the stream it was already one skipped line."""
    (tmp_path / "in.jsonl").write_bytes(deep + b"\n" + "\n".join(example_lines()).encode() + b"\n")
    result = run("record", "in.jsonl", "--store", f"{tmp_path}/out/", "--json")
    assert result.exit_code == EXIT_OK, result.stderr
    data = json.loads(result.stdout)
    assert (data["totals"]["events"], data["totals"]["malformed_lines"]) == (len(example_lines()), 1)
    [error] = data["errors"]
    assert error["line"] == 1 and error["error"] == "nesting too deep (phi-core allows 128 levels)"
    assert result.stderr.splitlines() == [
        "phi-session: in.jsonl: line 1: skipped: nesting too deep (phi-core allows 128 levels)"
    ]
    clean = tmp_path / "clean"
    run("record", EXAMPLE_STREAM, "--dir", clean)
    for session_id in EXAMPLE_IDS:
        name = f"{session_id}.json"
        assert (tmp_path / "out" / name).read_bytes() == (clean / name).read_bytes()


@pytest.mark.parametrize("deep", TOO_DEEP)
def test_record_of_only_a_line_nested_too_deep_leaves_no_new_store(tmp_path: Path, deep: bytes) -> None:
    (tmp_path / "in.jsonl").write_bytes(deep + b"\n")
    result = run("record", "in.jsonl", "--store", "new.db")
    assert result.exit_code == EXIT_FAILURE
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    assert "nothing recorded" in result.stderr.splitlines()[-1]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in.jsonl"]


@pytest.mark.parametrize("store", ["kept.db", "kept/"])
@pytest.mark.parametrize("orphans", ["input", "store"])
def test_record_orphans_file_is_never_the_input_nor_the_store(
    tmp_path: Path, store: str, orphans: str
) -> None:
    """--orphans is emptied when opened: naming the input emptied it (every event lost), naming
    the SQLite store replaced it with a new one (every stored session lost)."""
    stream = tmp_path / "in.jsonl"
    shutil.copy(EXAMPLE_STREAM, stream)
    assert run("record", stream, "--store", store).exit_code == EXIT_OK
    target = (
        stream
        if orphans == "input"
        else (tmp_path / (store if store == "kept.db" else f"kept/{BASIC_ID}.json"))
    )
    before = files_under(tmp_path)
    result = run("record", stream, "--store", store, "--orphans", target)
    assert_one_line_error(result, EXIT_USAGE, f"--orphans {target}: ")
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("source", ["missing.jsonl", "."])
def test_record_of_an_unreadable_source_creates_nothing(tmp_path: Path, source: str) -> None:
    """A missing input left a new empty store behind and truncated the --orphans file."""
    orphans = tmp_path / "orphans.jsonl"
    orphans.write_text("kept\n")
    result = run("record", source, "--store", "sub/new.db", "--orphans", orphans)
    assert result.exit_code in (EXIT_FAILURE, EXIT_USAGE)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["orphans.jsonl"]
    assert orphans.read_text() == "kept\n"


def test_rm(store_dir: Path) -> None:
    data = json_out(run("rm", BASIC_ID, MINIMAL_ID, "--store", str(store_dir), "--json"))
    assert data == {"removed": [BASIC_ID, MINIMAL_ID], "missing": []}
    assert not (store_dir / f"{BASIC_ID}.json").exists()
    again = run("rm", BASIC_ID, PARENT_ID, "--store", store_dir)
    assert again.exit_code == EXIT_FAILURE
    assert f"removed {PARENT_ID}" in again.stdout
    assert_one_line_error(again, EXIT_FAILURE, BASIC_ID)
    assert_one_line_error(run("rm", "a/b", "--store", store_dir), EXIT_USAGE, "a/b")
    # A bad id anywhere in the list is caught before anything is deleted.
    mixed = run("rm", PARALLEL_ID, "../x", CHILD_ID, "--store", store_dir, "--json")
    assert_one_line_error(mixed, EXIT_USAGE, "../x")
    assert (store_dir / f"{PARALLEL_ID}.json").exists() and (store_dir / f"{CHILD_ID}.json").exists()
    # An id given twice is deleted once: it was reported removed and missing, exit status 1.
    twice = run("rm", CHILD_ID, CHILD_ID, "--store", store_dir, "--json")
    assert twice.exit_code == EXIT_OK and json_out(twice) == {"removed": [CHILD_ID], "missing": []}


# -- the group itself --------------------------------------------------------------------------------


def test_usage_errors_are_one_line() -> None:
    assert_one_line_error(run("frobnicate"), EXIT_USAGE, "frobnicate")
    assert_one_line_error(run("list", "--limit"), EXIT_USAGE, "--limit")
    no_args = run()
    assert no_args.exit_code == EXIT_USAGE and "Commands:" in no_args.stderr


@pytest.mark.parametrize(
    ("args", "command"),
    [(("stats", "--by"), "stats"), (("list", "--agent"), "list"), (("list", "--bogus"), "list")],
)
def test_a_usage_error_of_a_command_points_to_its_help(args: tuple[str, ...], command: str) -> None:
    """An option's missing value too (click's parser raised it without the command's context,
    so the line sent to 'phi-session --help')."""
    result = run(*args)
    assert_one_line_error(result, EXIT_USAGE, args[-1], f"(see 'phi-session {command} --help')")
    assert result.stderr.startswith("phi-session: error: ")


@pytest.mark.parametrize(
    "command",
    ["list", "show", "tree", "stats", "record", "import", "export", "context", "rm", "demo", "serve"],
)
def test_every_command_has_help_with_store_and_json(command: str) -> None:
    result = run(command, "--help")
    assert result.exit_code == EXIT_OK
    assert "--store URL" in result.stdout and "--json" in result.stdout


def test_version() -> None:
    result = run("--version")
    assert result.exit_code == EXIT_OK and "phi-session" in result.stdout


# -- demo ------------------------------------------------------------------------------------------


def test_demo(tmp_path: Path) -> None:
    pytest.importorskip("phi_session.demo", reason="the demo scenario module is not there yet")
    result = run("demo", "--dir", tmp_path / "demo", "--json")
    data = json_out(result)
    assert isinstance(data, dict) and data["sessions"]
    ids = {row["session_id"] for row in data["sessions"]}
    assert ids == {p.stem for p in (tmp_path / "demo").glob("*.json")}
    shown = run("demo", "--store", "sqlite:demo.db")
    assert shown.exit_code == EXIT_OK and "demo sessions stored" in shown.stdout


# -- real subprocesses of the installed console script ---------------------------------------------

needs_script = pytest.mark.skipif(
    not SCRIPT.exists() and shutil.which("phi-session") is None,
    reason="the phi-session console script is not installed",
)


def script() -> str:
    return str(SCRIPT) if SCRIPT.exists() else "phi-session"


@needs_script
def test_export_of_one_session_to_a_terminal_ends_its_last_line(store_dir: Path) -> None:
    """Without the file's missing final newline, the shell's prompt would follow the ``}``."""
    shown = _on_a_terminal([script(), "export", BASIC_ID, "--store", str(store_dir)])
    assert shown.endswith(b"}\r\n")  # the terminal's newline


def _on_a_terminal(command: list[str], **env: str) -> bytes:
    """What `command` shows on a pseudo-terminal, once it ended well."""
    pty = pytest.importorskip("pty")
    terminal, its_end = pty.openpty()
    run = subprocess.Popen(command, stdout=its_end, env={**os.environ, **env})
    os.close(its_end)
    shown = b""
    with contextlib.suppress(OSError):  # EIO: the command ended, nothing more to read
        while chunk := os.read(terminal, 1 << 16):
            shown += chunk
    os.close(terminal)
    assert run.wait(60) == EXIT_OK
    return shown


@needs_script
def test_no_color_is_heeded_on_a_terminal(store_dir: Path) -> None:
    def on_a_terminal(**env: str) -> bytes:
        return _on_a_terminal([script(), "list", "--store", str(store_dir)], **env)

    assert b"\x1b[32m" in on_a_terminal(TERM="xterm")  # the statuses' colours
    assert b"\x1b[3" not in on_a_terminal(TERM="xterm", NO_COLOR="1")


@needs_script
def test_console_script_help_and_record(tmp_path: Path) -> None:
    helped = subprocess.run([script(), "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert helped.returncode == EXIT_OK
    assert "record" in helped.stdout and "serve" in helped.stdout
    recorded = subprocess.run(
        [script(), "record", str(EXAMPLE_STREAM), "--dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert recorded.returncode == EXIT_OK, recorded.stderr
    assert len(recorded.stdout.strip().splitlines()) == 6
    missing = subprocess.run(
        [script(), "show", "nope", "--store", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert missing.returncode == EXIT_FAILURE
    assert missing.stderr.count("\n") == 1 and "Traceback" not in missing.stderr


@needs_script
def test_output_in_an_encoding_without_the_cli_symbols(store_dir: Path) -> None:
    # A latin-1 locale has no ●, → or …: they are written escaped, never a failure.
    env = {**os.environ, "PYTHONIOENCODING": "latin-1", "COLUMNS": "100"}
    for args in (["list"], ["show", PARENT_ID], ["tree", PARENT_ID], ["show", PARENT_ID, "--timeline"]):
        result = subprocess.run(
            [script(), *args, "--store", str(store_dir)], capture_output=True, env=env, timeout=60
        )
        assert result.returncode == EXIT_OK, (args, result.stderr)
        assert result.stderr == b"" and result.stdout, args
        assert args == ["list"] or b"\\u" in result.stdout  # list has no symbol at this width


@pytest.fixture
def served(store_dir: Path) -> Iterator[str]:
    process = subprocess.Popen(
        [script(), "serve", "--store", str(store_dir), "--port", "0", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line, process.stderr.read() if process.stderr else ""
        yield json.loads(line)["url"]
    finally:
        process.terminate()
        process.communicate(timeout=10)  # reaps it and closes its pipes


@needs_script
def test_console_script_serve(served: str) -> None:
    assert served.startswith("http://127.0.0.1:")
    deadline = time.monotonic() + 30  # generous: a loaded CI machine can be slow to schedule it
    while True:
        try:
            with urllib.request.urlopen(served + "api/sessions", timeout=20) as response:
                rows = json.load(response)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    assert len(rows) == 5


def test_serve_reports_a_busy_port(store_dir: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert_one_line_error(
            run("serve", "--store", store_dir, "--port", str(port)), EXIT_FAILURE, f"127.0.0.1:{port}"
        )


@pytest.mark.parametrize(("host", "warned"), [("127.1", False), ("0.0.0.0", True)])
def test_serve_warns_by_the_address_bound(
    store_dir: Path, monkeypatch: pytest.MonkeyPatch, host: str, warned: bool
) -> None:
    # 127.1 (or a name of this machine) is loopback, though not spelled 127.0.0.1.
    import phi_session.web.server as web_server

    bind = web_server.make_server

    def make_server(store: Any, **options: Any) -> Any:
        server = bind(store, **options)
        server.serve_forever = lambda: None  # type: ignore[method-assign]
        return server

    monkeypatch.setattr(web_server, "make_server", make_server)
    result = run("serve", "--store", store_dir, "--host", host, "--port", "0")
    assert result.exit_code == EXIT_OK, result.stderr
    assert ("anyone who can reach it can read every session" in result.stderr) == warned


@pytest.mark.parametrize("from_env", [False, True])
def test_serve_prices_the_viewer_with_the_cli_prices(
    store_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, from_env: bool
) -> None:
    # The viewer's costs are the CLI's: --prices, or $PHI_SESSION_PRICES as list/show/stats.
    import phi_session.web.server as web_server

    prices = tmp_path / "prices.json"
    prices.write_text('{"acme/house-model": {"input": 1000, "output": 1000}}')
    pricers: list[Any] = []

    class Server:
        url = "http://127.0.0.1:1/"
        host_guard = web_server.HostGuard("127.0.0.1", "127.0.0.1")

        def serve_forever(self) -> None:
            pass

        def server_close(self) -> None:
            pass

    def make_server(store: object, **options: Any) -> Server:
        pricers.append(options.get("pricer"))
        return Server()

    monkeypatch.setattr(web_server, "make_server", make_server)
    args: list[str | Path] = ["serve", "--store", store_dir, "--port", "0"]
    if from_env:
        monkeypatch.setenv("PHI_SESSION_PRICES", str(prices))
    else:
        args += ["--prices", prices]
    assert run(*args).exit_code == EXIT_OK
    [pricer] = pricers
    cost = pricer.price(Usage(input=1_000, output=0), "acme", "house-model", Timestamp.from_ns(0))
    assert cost.usd == 1.0 and cost.sources == ("user",)


@pytest.mark.spec
@pytest.mark.parametrize("stream", ["basic", "parallel", "minimal", "subagent"])
def test_record_saving_as_it_goes_writes_the_same_files(
    stream: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import phi_session.cli.commands as cli_module
    from tests.conftest import EXAMPLES

    source = EXAMPLES / f"events-{stream}.jsonl"
    monkeypatch.setattr(cli_module, "_SPILL_EVERY", 3)  # save finished sessions every 3 lines
    result = CliRunner().invoke(cli_module.main, ["record", str(source), "--dir", str(tmp_path / "spilled")])
    assert result.exit_code == 0, result.output
    written = {p.name: p.read_bytes() for p in (tmp_path / "spilled").glob("*.json")}
    expected = {p.name: p.read_bytes() for p in EXAMPLES.glob(f"session-{stream}*.json")}
    assert sorted(written.values()) == sorted(expected.values())


def test_record_saving_as_it_goes_reads_no_whole_session_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Memory stays bounded: the summaries of a long stream come from outlines, one at a time.
    import phi_session.cli.commands as cli_module

    whole = run("record", EXAMPLE_STREAM, "--dir", tmp_path / "whole")
    monkeypatch.setattr(cli_module, "_SPILL_EVERY", 3)
    loaded: list[str] = []
    monkeypatch.setattr(JsonDirStore, "load", lambda self, sid: loaded.append(sid))
    spilled = run("record", EXAMPLE_STREAM, "--dir", tmp_path / "spilled")
    assert spilled.exit_code == EXIT_OK and loaded == []
    # The same summaries, in the order the sessions were saved.
    expected = whole.stdout.replace(str(tmp_path / "whole"), str(tmp_path / "spilled"))
    assert sorted(spilled.stdout.splitlines()) == sorted(expected.splitlines())


# -- what a new user hits ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("list",),
        ("show", BASIC_ID),
        ("tree", BASIC_ID),
        ("context", BASIC_ID, "x"),
        ("stats",),
        ("export", BASIC_ID),
        ("rm", BASIC_ID),
        ("serve", "--port", "0"),
    ],
)
@pytest.mark.parametrize("store", ["typo.db", "sqlite:typo.sqlite", "typo-dir/", None])
def test_read_only_commands_never_create_a_store(
    tmp_path: Path, args: tuple[str, ...], store: str | None
) -> None:
    result = run(*args, *(("--store", store) if store else ()))
    assert_one_line_error(result, EXIT_FAILURE, "no store at")
    if store is None:
        assert "default store" in result.stderr and ".phi-session" in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing created, not even a directory


def test_a_missing_store_named_by_the_environment_is_said_to_be(monkeypatch: pytest.MonkeyPatch) -> None:
    """It was called "the default store", with the advice to set the variable already set."""
    monkeypatch.setenv(ENV_VAR, "mystore.db")
    assert_one_line_error(
        run("list"),
        EXIT_FAILURE,
        "phi-session: error: no store at mystore.db (named by $PHI_SESSION_STORE: give --store, "
        "or change it): nothing was recorded there",
    )


READ_ONLY_COMMANDS = [
    ("list",),
    ("show", BASIC_ID),
    ("tree", BASIC_ID),
    ("context", BASIC_ID, BASIC_LOOPS[0]),
    ("stats",),
    ("search", "the"),
    ("export", BASIC_ID),
    ("fork", BASIC_ID, BASIC_LOOPS[0], "--turn", "0"),
    ("diff", f"{BASIC_ID}:#1", f"{BASIC_ID}:#2"),
]


def files_under(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize("args", READ_ONLY_COMMANDS)
@pytest.mark.parametrize("schema", ["current", "older"])
def test_read_only_commands_leave_an_sqlite_store_as_it_is(
    tmp_path: Path, args: tuple[str, ...], schema: str
) -> None:
    from .test_store_sqlite import back_to_v7

    db = tmp_path / "kept" / "sessions.db"
    assert run("record", EXAMPLE_STREAM, "--store", db).exit_code == EXIT_OK
    if schema == "older":
        back_to_v7(db)  # a store an earlier phi-session wrote: it must not be migrated
    before = files_under(tmp_path / "kept")
    assert list(before) == ["sessions.db"]
    result = run(*args, "--store", db)
    assert result.exit_code == EXIT_OK, result.stderr
    assert result.stdout.strip()
    assert files_under(tmp_path / "kept") == before  # not a byte changed, no -wal or -shm left


@pytest.mark.parametrize("args", READ_ONLY_COMMANDS)
def test_read_only_commands_leave_a_json_store_as_it_is(store_dir: Path, args: tuple[str, ...]) -> None:
    before = files_under(store_dir)
    result = run(*args, "--store", store_dir)
    assert result.exit_code == EXIT_OK, result.stderr
    assert files_under(store_dir) == before


@pytest.mark.parametrize("name", ["work/x.db", "x.sqlite", "x.sqlite3"])
def test_a_store_path_with_an_sqlite_suffix_is_an_sqlite_file(tmp_path: Path, name: str) -> None:
    (tmp_path / "work").mkdir()
    assert run("record", EXAMPLE_STREAM, "--store", name).exit_code == EXIT_OK
    assert (tmp_path / name).read_bytes().startswith(b"SQLite format 3\0")
    assert len(json_out(run("list", "--store", name, "--json"))) == 5  # type: ignore[arg-type]


@pytest.mark.parametrize("ids", [(BASIC_ID,), (BASIC_ID, PARENT_ID, CHILD_ID)])
def test_export_json_imports_back(store_dir: Path, tmp_path: Path, ids: tuple[str, ...]) -> None:
    assert run("export", *ids, "--store", store_dir, "-o", tmp_path / "out.json").exit_code == EXIT_OK
    result = run("import", tmp_path / "out.json", "--store", f"{tmp_path}/copy/")
    assert result.exit_code == EXIT_OK, result.stderr
    for session_id in ids:
        name = f"{session_id}.json"
        assert (tmp_path / "copy" / name).read_bytes() == (store_dir / name).read_bytes()


def test_export_jsonl_records_back_and_import_points_to_record(store_dir: Path, tmp_path: Path) -> None:
    assert (
        run(
            "export",
            BASIC_ID,
            PARENT_ID,
            "--format",
            "jsonl",
            "--store",
            store_dir,
            "-o",
            tmp_path / "out.jsonl",
        ).exit_code
        == EXIT_OK
    )
    assert_one_line_error(
        run("import", tmp_path / "out.jsonl", "--store", f"{tmp_path}/a/"),
        EXIT_FAILURE,
        "event stream",
        "phi-session record",
    )
    assert run("record", tmp_path / "out.jsonl", "--dir", tmp_path / "b").exit_code == EXIT_OK
    for session_id in (BASIC_ID, PARENT_ID):
        name = f"{session_id}.json"
        assert (tmp_path / "b" / name).read_bytes() == (store_dir / name).read_bytes()


@pytest.mark.parametrize("form", ["pretty", "array", "one line on stdin"])
def test_record_of_a_session_file_says_to_import_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    """`export --format json` output given to record: one line pointing to import (it was a
    line per malformed line, 20 of them, a count of the others and 'nothing recorded')."""
    monkeypatch.chdir(tmp_path)
    basic = (EXAMPLES / "session-basic.json").read_bytes()
    if form == "array":
        basic = b"[\n" + basic + b",\n" + (EXAMPLES / "session-minimal.json").read_bytes() + b"\n]\n"
    (tmp_path / "in.json").write_bytes(codecs.BOM_UTF8 + b"\n" + basic)
    before = sorted(tmp_path.rglob("*"))
    if form == "one line on stdin":
        one_line = json.dumps(json.loads(basic)).encode() + b"\n"
        result = run("record", "-", "--store", "new.db", input=one_line)
        name = "stdin"
    else:
        result = run("record", "in.json", "--store", "new.db")
        name = "in.json"
    assert_one_line_error(
        result,
        EXIT_FAILURE,
        f"error: {name}: a session file, not an event stream",
        "'phi-session import FILE'",
    )
    assert result.stdout == ""
    assert sorted(tmp_path.rglob("*")) == before  # no store made for it


def test_record_of_a_stream_whose_first_line_is_a_broken_object_records_the_rest(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text('{"type": \n' + "\n".join(example_lines()) + "\n")
    result = run("record", tmp_path / "in.jsonl", "--dir", tmp_path / "out", "--json")
    assert result.exit_code == EXIT_OK, result.stderr
    totals = json.loads(result.stdout)["totals"]
    assert (totals["events"], totals["malformed_lines"]) == (len(example_lines()), 1)


@pytest.mark.parametrize(
    "first", ['{"format": "phi-core-events", "version": 1}', '{"type": "FromANewerPhiCore"}']
)
def test_record_of_a_stream_after_a_whole_json_line_records_the_rest_reading_no_more_to_tell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: str
) -> None:
    """Telling such a stream from a session file read the whole file into memory (three
    times its size at the peak), as a session file's check."""
    from phi_session.cli import commands

    read: list[int] = []
    read_sessions = commands._read_sessions
    monkeypatch.setattr(
        commands, "_read_sessions", lambda data: read.append(len(data)) or read_sessions(data)
    )
    (tmp_path / "in.jsonl").write_text(first + "\n" + "\n".join(example_lines()) + "\n")
    result = run("record", tmp_path / "in.jsonl", "--dir", tmp_path / "out", "--json")
    assert result.exit_code == EXIT_OK, result.stderr
    totals = json.loads(result.stdout)["totals"]
    assert (totals["events"], totals["malformed_lines"]) == (len(example_lines()), 1)
    assert read == []


@pytest.mark.parametrize("content", [b"", b"\n\n", b"garbage\n" * 3, bytes(range(256)) * 4])
def test_record_of_nothing_valid_fails(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "in.jsonl").write_bytes(content)
    result = run("record", tmp_path / "in.jsonl", "--dir", tmp_path / "out")
    assert result.exit_code == EXIT_FAILURE
    assert "nothing recorded" in result.stderr.splitlines()[-1]


@pytest.mark.parametrize(
    ("existing", "target"), [("", "new/dirs/x.db"), ("new", "sqlite:new/x.sqlite"), ("", "new/dir/")]
)
def test_record_of_nothing_leaves_no_new_store_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: str, target: str
) -> None:
    """A store made for an empty input looked like a store without sessions (98 KB of it)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.jsonl").write_bytes(b"")
    if existing:
        (tmp_path / existing).mkdir()
    before = sorted(tmp_path.rglob("*"))
    result = run("record", "in.jsonl", "--store", target)
    assert_one_line_error(result, EXIT_FAILURE, "nothing recorded")
    assert sorted(tmp_path.rglob("*")) == before


def test_record_of_nothing_keeps_an_existing_store(tmp_path: Path) -> None:
    (tmp_path / "events.jsonl").write_text("\n".join(example_lines()) + "\n")
    (tmp_path / "in.jsonl").write_bytes(b"")
    database = tmp_path / "kept.db"
    assert run("record", tmp_path / "events.jsonl", "--store", database).exit_code == EXIT_OK
    listed = run("list", "--store", database).stdout
    assert run("record", tmp_path / "in.jsonl", "--store", database).exit_code == EXIT_FAILURE
    assert run("list", "--store", database).stdout == listed


def test_record_reports_the_first_20_malformed_lines_then_a_count(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text("garbage\n" * 1_234 + "\n".join(example_lines()) + "\n")
    result = run("record", tmp_path / "in.jsonl", "--dir", tmp_path / "out", "--json")
    assert result.exit_code == EXIT_OK
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 21 and "line 20:" in lines[19]
    assert "1,214 more malformed lines skipped, not shown" in lines[20]
    data = json.loads(result.stdout)
    assert len(data["errors"]) == 20 and data["totals"]["malformed_lines"] == 1_234


def test_click_errors_have_one_prefix(store_dir: Path) -> None:
    """A usage error said 'phi-session rm: error:', every other error 'phi-session: error:'."""
    for args in (("rm", "--store", store_dir), ("show", "--no-such-option"), ("no-such-command",)):
        result = run(*args)
        assert_one_line_error(result, EXIT_USAGE)
        assert result.stderr.startswith("phi-session: error:"), result.stderr
    assert result.stderr.count("phi-session") == 2  # the prefix and the --help hint
    assert "(see 'phi-session show --help')" in run("show", "--no-such-option").stderr


def test_not_found_is_worded_one_way(store_dir: Path) -> None:
    missing = "0b6c4e2a-0000-4d8e-9a52-3c1f8e7d6b40"
    for args in (("show", missing), ("rm", missing), ("export", missing), ("tree", missing)):
        assert_one_line_error(run(*args, "--store", store_dir), EXIT_FAILURE, f"no session '{missing}' in")
    assert_one_line_error(
        run("context", BASIC_ID, "nope", "--store", store_dir),
        EXIT_FAILURE,
        f"no loop 'nope' in session '{BASIC_ID}'",
    )
    # A file the user named that is not there: the path, then the system's words, exit 1.
    for command in ("record", "import"):
        result = run(command, "missing.jsonl", "--dir" if command == "record" else "--store", store_dir)
        assert_one_line_error(result, EXIT_FAILURE)
        assert result.stderr == "phi-session: error: missing.jsonl: No such file or directory\n"
    result = run("list", "--store", store_dir, "--prices", "missing.toml")
    assert_one_line_error(result, EXIT_FAILURE, "missing.toml: No such file or directory")
    # A file a command writes, in a directory that does not exist: the same.
    unwritable = str(Path(store_dir) / "no-dir" / "out.json")
    for args in (
        ("export", BASIC_ID, "-o", unwritable),
        ("fork", BASIC_ID, "#1", "--turn", "0", "--out", unwritable),
        ("record", EXAMPLE_STREAM, "--rejected", unwritable),
        ("record", EXAMPLE_STREAM, "--orphans", unwritable),
    ):
        result = run(*args, "--store", store_dir)
        assert_one_line_error(result, EXIT_FAILURE)
        assert result.stderr == f"phi-session: error: {unwritable}: No such file or directory\n"
    # An empty file name is not the working directory ("cannot read prices from .").
    result = run("list", "--store", store_dir, "--prices", "")
    assert_one_line_error(result, EXIT_USAGE)
    assert result.stderr == "phi-session: error: --prices: empty file name\n"


def test_a_bad_prices_file_names_where_it_came_from(
    store_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As $PHI_SESSION_STORE's errors: the option or the variable that named the file.
    prices = tmp_path / "team-prices.json"
    prices.write_text('{"gpt-4o": {"input": -1, "output": 1}}')
    why = f"{prices}: price of 'gpt-4o': input must be a finite non-negative number, got -1.0"
    given = run("stats", "--store", store_dir, "--prices", prices)
    assert_one_line_error(given, EXIT_FAILURE)
    assert given.stderr == f"phi-session: error: --prices: {why}\n"
    monkeypatch.setenv("PHI_SESSION_PRICES", str(prices))
    for command in ("stats", "list", "serve"):
        from_env = run(command, "--store", store_dir)
        assert_one_line_error(from_env, EXIT_FAILURE)
        assert from_env.stderr == f"phi-session: error: $PHI_SESSION_PRICES: {why}\n", command


def test_counts_have_plurals_and_thousands_separators(store_dir: Path, tmp_path: Path) -> None:
    single = run("record", EXAMPLE_STREAM.parent / "events.jsonl", "--dir", tmp_path / "one")
    assert (
        "total: 5 sessions, 7 loops, 9 turns, 2,970 tokens from 88 events; 0 malformed lines skipped"
        in single.stdout
    )
    (tmp_path / "min.jsonl").write_text("\n".join(line for line in example_lines() if MINIMAL_ID in line))
    one = run("record", tmp_path / "min.jsonl", "--dir", tmp_path / "two")
    assert "total: 1 session, 1 loop, 1 turn," in one.stdout
    stats = run("stats", "--store", store_dir, "--by", "model")
    assert "2,970" in stats.stdout


def test_status_names_are_case_insensitive(store_dir: Path) -> None:
    lower = json_out(run("list", "--store", store_dir, "--json", "--status", "completed"))
    assert lower == json_out(run("list", "--store", store_dir, "--json", "--status", "Completed"))
    assert len(lower) == 5  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--limit", "9" * 5000),
        ("--min-tokens", "9" * 5000),
        ("--since", "9" * 40 + "d"),
        ("--since", "99999999999w"),
        ("--limit", "99999999999999999999"),
    ],
)
def test_huge_filter_values_are_usage_errors(store_dir: Path, option: str, value: str) -> None:
    result = run("list", "--store", store_dir, option, value)
    assert_one_line_error(result, EXIT_USAGE, option)
    assert "internal error" not in result.stderr and len(result.stderr) < 300


@pytest.mark.parametrize(
    "command",
    ["list", "show", "tree", "stats", "record", "import", "export", "context", "rm", "demo", "serve"],
)
def test_help_has_no_markup(command: str) -> None:
    result = run(command, "--help")
    assert "``" not in result.stdout and "`" not in result.stdout


def test_writing_to_the_default_store_says_where(tmp_path: Path) -> None:
    result = run("record", EXAMPLE_STREAM)
    assert (
        f"store: sqlite:///{(tmp_path / '.phi-session' / 'sessions.db').as_posix().lstrip('/')}"
        in result.stderr
    )


def test_list_model_column_is_cut_not_wrapped(store_dir: Path, tmp_path: Path) -> None:
    for columns in (80, 120, 130, 160):
        result = CliRunner().invoke(main, ["list", "--store", str(store_dir)], env={"COLUMNS": str(columns)})
        lines = result.stdout.splitlines()
        assert len(lines) == 6, (columns, result.stdout)  # a header and one line per session
        assert max(len(line) for line in lines) <= columns


# -- record --to --------------------------------------------------------------------------------


def test_record_to_a_broker_keeps_the_lines_it_cannot_publish_in_the_rejected_file(tmp_path: Path) -> None:
    pytest.importorskip("nats", reason="the nats extra is not installed")
    stream = stream_with_rejected_lines(tmp_path / "in.jsonl")
    server = PrivateServer(tmp_path / "jetstream")
    server.start()
    try:
        result = run("record", stream, "--to", server.url, "--rejected", tmp_path / "r.jsonl")
    finally:
        server.stop()
    assert result.exit_code == EXIT_OK, result.stderr
    assert (tmp_path / "r.jsonl").read_bytes() == b"".join(REJECTED_LINES)
    assert f"4 malformed lines skipped, 4 lines kept in {tmp_path / 'r.jsonl'})" in result.stdout


def _record_to_a_broker(tmp_path: Path, lines: list[str]) -> tuple[Result, str]:
    """``record --to`` a nats-server of the test's own: the result, and the server's URL."""
    pytest.importorskip("nats", reason="the nats extra is not installed")
    (tmp_path / "events.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    server = PrivateServer(tmp_path / "jetstream")
    server.start()
    try:
        return run("record", tmp_path / "events.jsonl", "--to", server.url), server.url
    finally:
        server.stop()


def test_record_to_a_broker_sends_events_over_its_max_payload_in_pieces(tmp_path: Path) -> None:
    """An event over the broker's max_payload was never published, only set aside."""
    huge = '"' + "x" * 1_100_000 + '"'  # over NATS's default max_payload (1 MB)
    lines = [line.replace('"Say hello."', huge) for line in example_lines() if MINIMAL_ID in line]
    assert sum(len(line) > 1_100_000 for line in lines) > 1
    result, url = _record_to_a_broker(tmp_path, lines)
    assert result.exit_code == EXIT_OK, result.stderr
    assert f"published {len(lines)} events to {url}" in result.stdout
    assert not (tmp_path / ".phi-session" / "spill" / "rejected").exists()


def test_record_to_a_broker_fails_when_events_were_set_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event the broker cannot take even in pieces is never published, only set aside:
    the command still exited 0."""
    nats_client = pytest.importorskip("nats.aio.client", reason="the nats extra is not installed")
    # Too few bytes for a piece's headers.
    monkeypatch.setattr(nats_client.Client, "max_payload", property(lambda self: 100))
    lines = [line for line in example_lines() if MINIMAL_ID in line]
    result, _ = _record_to_a_broker(tmp_path, lines)
    assert result.exit_code == EXIT_FAILURE, result.stderr
    rejected = tmp_path / ".phi-session" / "spill" / "rejected"
    assert result.stderr.strip().splitlines()[-1] == (
        f"phi-session: error: {len(lines)} events not published (over the broker's max_payload even"
        f" in pieces): set aside in {rejected}"
    )
    assert len(list(rejected.iterdir())) == len(lines)


def _spilled_payloads(spill: Path) -> list[bytes]:
    """The events the sink's spill journals in `spill` hold, in order."""
    from phi_session.journal import read_records

    payloads = []
    for episode in sorted(path for path in spill.iterdir() if path.name != "rejected"):
        for record in read_records(episode):
            payloads.append(json.loads(record.payload)[3])
    return [encode_event(decode_event(json.dumps(payload))) for payload in payloads]


def _stream_payloads(url: str) -> dict[str, list[bytes]]:
    """Every message of the default stream: each partition's (subject's), in stream order."""
    import asyncio

    import nats

    async def read() -> dict[str, list[bytes]]:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            count = (await js.stream_info("PHI_EVENTS")).state.messages
            partitions: dict[str, list[bytes]] = {}
            for seq in range(1, count + 1):
                message = await js.get_msg("PHI_EVENTS", seq)
                partitions.setdefault(message.subject, []).append(message.data or b"")
            return partitions
        finally:
            await nc.close()

    return asyncio.run(read())


def test_record_to_an_unreachable_broker_keeps_the_events_and_says_so_in_one_line(tmp_path: Path) -> None:
    """It waited for the broker 60 s, then 10 s more, and said so in three warnings
    under a 'published 0 events' line."""
    pytest.importorskip("nats", reason="the nats extra is not installed")
    server = PrivateServer(tmp_path / "jetstream")  # not started yet: its port is closed
    spill = tmp_path / ".phi-session" / "spill"
    result = run("record", EXAMPLE_STREAM, "--to", server.url)
    assert_one_line_error(
        result,
        EXIT_FAILURE,
        f"phi-session: error: cannot reach NATS at {server.url}: ",
        f": 88 events kept in {spill}; the next 'phi-session record --to' from this directory sends them",
    )
    assert result.stdout == ""
    first = [encode_event(decode_event(line)) for line in example_lines()]
    assert _spilled_payloads(spill) == first

    # The broker back: the next run sends them first, then its own events.
    later = tmp_path / "later.jsonl"
    later.write_text("\n".join(xss_lines()) + "\n", encoding="utf-8")
    server.start()
    try:
        result = run("record", later, "--to", server.url)
        assert result.exit_code == EXIT_OK, result.stderr
        sent = first + [encode_event(decode_event(line)) for line in xss_lines()]
        partitions = _stream_payloads(server.url)
        assert sorted(payload for stored in partitions.values() for payload in stored) == sorted(sent)
        for stored in partitions.values():  # each partition in the order the events were given
            assert stored == [payload for payload in sent if payload in stored]
    finally:
        server.stop()
    assert _spilled_payloads(spill) == []


def test_record_to_a_broker_with_an_unwritable_spill_dir_fails_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From a read-only directory, the events were lost at the end (a traceback), and the
    command said "0 events kept in .phi-session/spill": the next run would send them."""
    pytest.importorskip("nats", reason="the nats extra is not installed")
    read_only(monkeypatch, tmp_path / ".phi-session")
    result = run("record", EXAMPLE_STREAM, "--to", PrivateServer(tmp_path / "jetstream").url)
    assert_one_line_error(
        result,
        EXIT_FAILURE,
        f"phi-session: error: spill_dir {tmp_path / '.phi-session' / 'spill'}: cannot write there: "
        "Read-only file system",
    )


def test_record_to_an_unreachable_broker_on_a_full_disk_says_the_events_are_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It said "0 events kept in .phi-session/spill", under the traceback of each loss."""
    pytest.importorskip("nats", reason="the nats extra is not installed")
    server = PrivateServer(tmp_path / "jetstream")  # not started: its port is closed
    with monkeypatch.context() as patched:
        full_disk_after(patched, 0)
        result = run("record", EXAMPLE_STREAM, "--to", server.url)
    spill = tmp_path / ".phi-session" / "spill"
    assert_one_line_error(
        result,
        EXIT_FAILURE,
        f"phi-session: error: LOST 88 events: 88 not taken by NATS at {server.url} and not written"
        f" to a spill journal in {spill} (No space left on device)",
    )
    assert result.stdout == ""


@pytest.mark.parametrize("port", ["99999", "0", "65536", "x"])
def test_a_nats_url_with_a_port_out_of_range_is_a_usage_error(tmp_path: Path, port: str) -> None:
    """`--to nats://HOST:99999` was "cannot reach NATS" (exit 1), every event spilled to be
    sent again by the next `record --to`."""
    url = f"nats://127.0.0.1:{port}"
    assert_one_line_error(run("record", EXAMPLE_STREAM, "--to", url), EXIT_USAGE, "--to: ", url, "port")
    assert not (tmp_path / ".phi-session").exists()
    postgres = "postgresql://nobody@127.0.0.1:1/none"
    for status in ([], ["--status"]):
        result = run("ingest", url, "--store", postgres, *status)
        assert_one_line_error(result, EXIT_USAGE, url, "port")


def test_an_unknown_postgres_url_parameter_is_a_usage_error_naming_it() -> None:
    pytest.importorskip("psycopg")
    result = run("list", "--store", "postgresql://agent:s3cret@127.0.0.1:1/db?sslmod=disable")
    assert_one_line_error(result, EXIT_USAGE, "--store: unknown PostgreSQL connection parameter 'sslmod'")
    assert "s3cret" not in result.stderr
    for status in ([], ["--status"]):
        url = "postgresql://agent:s3cret@127.0.0.1:1/db?sslmod=disable"
        result = run("ingest", "nats://127.0.0.1:1", "--store", url, *status)
        assert_one_line_error(result, EXIT_USAGE, "--store: unknown PostgreSQL connection parameter 'sslmod'")
        # libpq's other messages may quote the password: ingest showed them on connecting.
        result = run("ingest", "nats://127.0.0.1:1", "--store", "postgresql://agent:s3 cret@127.0.0.1:1/db")
        assert_one_line_error(result, EXIT_FAILURE, "invalid PostgreSQL connection string (not shown")
        assert "s3" not in result.stderr


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        (["--ack-wait", "-1"], "--ack-wait: must be a positive number of seconds"),
        (["--idle-timeout", "0"], "--idle-timeout: must be a positive number of seconds"),
        (["--partitions", "0"], "--partitions: expected an integer from 1 to 1024, got 0"),
        (["--stream", "a.b"], "--stream: expected 1-64 letters"),
        (["--subject-prefix", "a b"], "--subject-prefix: expected dot-separated tokens"),
        (["--durable", "a.b"], "--durable: expected 1-64 letters"),
    ],
)
def test_ingest_errors_name_its_options(arguments: list[str], error: str) -> None:
    """They named the library's parameters: "ack_wait must be ...", "partitions: ..."."""
    result = run(
        "ingest", "nats://127.0.0.1:1", "--store", "postgresql://nobody@127.0.0.1:1/none", *arguments
    )
    assert_one_line_error(result, EXIT_USAGE, f"error: {error}")


def test_ingest_names_where_a_bad_store_url_came_from(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("psycopg")
    monkeypatch.setenv(ENV_VAR, "bogus://x")
    result = run("ingest", "nats://127.0.0.1:1")
    assert_one_line_error(result, EXIT_USAGE, f"environment variable {ENV_VAR}='bogus://x' is not a store")
    monkeypatch.setenv(ENV_VAR, "postgresql://nobody@127.0.0.1:1/none?sslmod=disable")
    assert_one_line_error(run("ingest", "nats://127.0.0.1:1"), EXIT_USAGE, f"${ENV_VAR}: unknown PostgreSQL")
    assert_one_line_error(run("list"), EXIT_USAGE, f"${ENV_VAR}: unknown PostgreSQL connection parameter")


def test_serve_otlp_on_a_port_taken_leaves_no_state_directory_behind(tmp_path: Path) -> None:
    """It left .phi-session/otlp (a journal, a spool) for a receiver that never started; a
    state directory that was there already is kept."""
    import socket

    pytest.importorskip("opentelemetry.sdk.trace")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = run("serve", "--otlp", "--port", "0", "--otlp-port", port, "--store", tmp_path / "s.db")
        assert_one_line_error(result, EXIT_FAILURE, f"cannot listen on 127.0.0.1:{port}")
        assert not (tmp_path / ".phi-session").exists()
        (tmp_path / "kept").mkdir()
        state = tmp_path / "kept" / "otlp"
        result = run(
            "serve", "--otlp", "--otlp-port", port, "--otlp-state", state, "--store", tmp_path / "s.db"
        )
        assert_one_line_error(result, EXIT_FAILURE, "cannot listen")
        assert not state.exists() and (tmp_path / "kept").is_dir()
        state.mkdir()
        result = run(
            "serve", "--otlp", "--otlp-port", port, "--otlp-state", state, "--store", tmp_path / "s.db"
        )
        assert_one_line_error(result, EXIT_FAILURE, "cannot listen")
        assert state.is_dir()


def test_serve_otlp_without_the_sdk_names_the_otlp_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It named [otel], which lacks opentelemetry-proto: following it led to a second error."""
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # not installed
    result = run("serve", "--otlp", "--port", "0", "--otlp-port", "0")
    assert_one_line_error(result, EXIT_FAILURE, "serve --otlp needs the OpenTelemetry SDK")
    assert result.stderr.rstrip().endswith("pip install 'phi-session[otlp]'"), result.stderr
    assert not (tmp_path / ".phi-session").exists()  # no store made for a receiver never started


def test_a_tiny_known_cost_is_never_shown_as_zero() -> None:
    # Below $0.0001 four decimals read $0.0000, as free: two significant digits instead.
    from phi_session.cost import Cost

    shown = {
        usd: render.cost_text(Cost(usd=usd)).plain
        for usd in (0.0, 2.7e-05, 4.9e-05, 9.4e-05, 1e-09, 0.0123, 1234.5)
    }
    assert shown == {
        0.0: "$0.0000",
        2.7e-05: "$0.000027",
        4.9e-05: "$0.000049",
        9.4e-05: "$0.000094",
        1e-09: "$0.0000000010",
        0.0123: "$0.0123",
        1234.5: "$1,234.5000",
    }


def test_show_prints_a_tiny_cost_with_its_digits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PHI_SESSION_PRICES", raising=False)
    prices = tmp_path / "prices.json"
    prices.write_text('{"claude-haiku-4-5": {"input": 0.001, "output": 0.001}}')
    store = tmp_path / "tiny.db"
    assert run("import", EXAMPLES / "session-minimal.json", "--store", store).exit_code == EXIT_OK
    session_id = json.loads((EXAMPLES / "session-minimal.json").read_text())["session_id"]
    shown = run("show", session_id, "--store", store, "--prices", prices)
    assert shown.exit_code == EXIT_OK, shown.stderr
    [line] = [line for line in shown.stdout.splitlines() if "Cost" in line]
    assert "$0.0000 " not in line + " " and "$0.00000" in line, line


def test_a_call_without_a_total_counts_its_tokens_in_list_stats_and_show(tmp_path: Path) -> None:
    # phi-core's Anthropic provider sets no total: list, stats and show said 0 tokens.
    from phi_session.stores.conformance import calls_loop, make_session

    untotalled = ps.Usage(input=100_000, output=2_000, cache_read=50_000)
    record = calls_loop("s", 1, [untotalled], model="anthropic/claude-sonnet-4-5")
    store = tmp_path / "s.db"
    with ps.SqliteStore(store) as opened:
        opened.save(make_session("untotalled", loops=[record]))
    [row] = json_out(run("list", "--store", store, "--json"))
    assert row["total_tokens"] == 152_000
    assert "152,000" in run("list", "--store", store).stdout
    assert "152,000" in run("stats", "--by", "model", "--store", store).stdout
    shown = run("show", "untotalled", "--store", store).stdout
    assert " 0 tokens" not in shown and "turn 0 · User · 0.50s · 152,000 tokens" in shown
    assert "152,000" in run("show", "untotalled", "--timeline", "--store", store).stdout


def test_turns_models_and_diffs_count_each_reply_without_a_total(tmp_path: Path) -> None:
    # A turn of an untotalled claude-opus-4-1 reply (152,000 tokens) and a gpt-4o-mini fallback
    # reporting 1,100: show said 1,100 for the turn (counted_total of the summed usage), the
    # timeline's model bar of a lone untotalled reply 0, and diff "tokens 0 → 0".
    from phi_session.stores.conformance import calls_loop, make_session

    from .store_support import replies_session

    untotalled = ps.Usage(input=100_000, output=2_000, cache_read=50_000)
    fallback = ps.Usage(input=1_000, output=100, cache_read=400, total_tokens=1_100)
    mixed = replies_session(
        (("anthropic", "claude-opus-4-1", untotalled), ("openai", "gpt-4o-mini", fallback))
    )
    lone = make_session(
        "lone", loops=[calls_loop("lone", 1, [untotalled], model="anthropic/claude-sonnet-4-5")]
    )
    store = tmp_path / "s.db"
    with ps.SqliteStore(store) as opened:
        opened.save(mixed)
        opened.save(lone)
        opened.save(
            make_session(
                "lone2", loops=[calls_loop("lone2", 1, [untotalled], model="anthropic/claude-sonnet-4-5")]
            )
        )
    shown = run("show", mixed.session_id, "--store", store).stdout
    [turn_line] = [line for line in shown.splitlines() if "turn 0 ·" in line]
    assert turn_line.rstrip().endswith("· 153,100 tokens"), shown
    timeline = run("show", "lone", "--timeline", "--store", store).stdout
    # the model bar's row, by its stop reason
    [model_row] = [
        line for line in timeline.splitlines() if "anthropic/claude-sonnet-4-5" in line and "stop" in line
    ]
    assert "152,000" in model_row, timeline
    assert "153,100" in run("show", mixed.session_id, "--timeline", "--store", store).stdout
    diffed = run("diff", "lone", "lone2", "--store", store).stdout
    assert "tokens 0" not in diffed and "152,000" in diffed, diffed
