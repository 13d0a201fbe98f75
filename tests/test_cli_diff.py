"""``phi-session diff`` through its entry point: loops, sessions, JSON, errors."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from click.testing import CliRunner, Result
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console, Group
from rich.text import Text

from phi_session.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, main
from phi_session.cli.render import STATUS_STYLES
from phi_session.cli.render_diff import _Sides
from phi_session.diff import LoopDiff, SessionDiff, diff_loops, diff_sessions

from .diff_support import BASE, Step, Stored, record_turnless, store_colon_ids, store_fork

HOSTILE = "\x1b[31mred[/] [bold]not markup[/bold]"
FORK = [*BASE[:2], Step("Saturday: Orsay.\nSunday: Louvre.\nBring sunglasses."), Step(HOSTILE)]


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(arg) for arg in args], env={"COLUMNS": "160"})


@pytest.fixture
def store(tmp_path: Path) -> Stored:
    return store_fork(tmp_path / "store", FORK)


def test_a_fork_against_its_parent(store: Stored) -> None:
    directory, session, parent, fork = store.directory, store.forked.session_id, store.parent, store.fork
    result = run("diff", "--store", directory, f"{session}:{parent}", f"{session}:{fork}")
    assert result.exit_code == EXIT_OK, result.stderr
    out = result.stdout
    assert "turn 0 = equal" in out and "turn 1 = equal" in out
    assert "turn 2 \u2260 changed" in out and "turn 3 + added" in out
    assert "Branch:fork" in out
    assert "Sunday: Orsay." in out and "Saturday: Orsay." in out
    assert out.strip().splitlines()[-1] == "first divergence: turn 2: output.text changed"
    # Recorded text is shown as text: no terminal escape, no markup interpreted.
    assert "\x1b" not in out and "\\x1b[31mred[/] [bold]not markup[/bold]" in out
    by_position = run("diff", "--store", directory, f"{session}:#1", f"{session}:#2")
    assert by_position.exit_code == EXIT_OK and by_position.stdout == out


def test_identical_loops_and_json(store: Stored) -> None:
    directory, session, parent, fork = store.directory, store.forked.session_id, store.parent, store.fork
    other = store.other.session_id
    same = run("diff", "--store", directory, f"{session}:#1", f"{other}:#1")
    assert same.exit_code == EXIT_OK
    assert same.stdout.strip().splitlines()[-1].startswith("no divergence")
    result = run("diff", "--json", "--store", directory, f"{session}:{parent}", f"{session}:{fork}")
    assert result.exit_code == EXIT_OK
    data = json.loads(result.stdout)
    assert data["diff"] == "loops" and data["first_divergence"]["turn"] == 2
    expected = diff_loops(store.forked, parent, store.forked, fork)
    assert msgspec.json.decode(result.stdout, type=LoopDiff | SessionDiff) == expected


def test_loops_without_turns_that_ended_otherwise(tmp_path: Path) -> None:
    # A rejected input against a compaction pass: "no divergence: the runs match in content".
    session, ids = record_turnless(tmp_path)
    refs = (f"{session.session_id}:{ids['injection']}", f"{session.session_id}:{ids['compaction']}")
    result = run("diff", "--store", tmp_path, *refs)
    assert result.exit_code == EXIT_OK, result.stderr
    out = result.stdout
    assert "match in content" not in out and "prompt injection" in out
    assert "loop \u2260 changed" in out and "no turns on either side" in out
    assert out.strip().splitlines()[-1] == "first divergence: loop.status changed (and 1 more)"
    data = run("diff", "--json", "--store", tmp_path, *refs).stdout
    expected = diff_loops(session, ids["injection"], session, ids["compaction"])
    assert msgspec.json.decode(data, type=LoopDiff | SessionDiff) == expected
    assert json.loads(data)["first_divergence"]["path"] == "loop.status"


def test_loop_options_and_sessions(store: Stored) -> None:
    directory, session, parent, fork = store.directory, store.forked.session_id, store.parent, store.fork
    other = store.other.session_id
    result = run(
        "diff", "--json", "--store", directory, session, session, "--loop-a", parent, "--loop-b", fork
    )
    assert result.exit_code == EXIT_OK
    assert json.loads(result.stdout)["first_divergence"]["turn"] == 2
    whole = run("diff", "--store", directory, session, other)
    assert whole.exit_code == EXIT_OK
    assert "only in A: loop #2" in whole.stdout and "pair 1: identical in content" in whole.stdout
    data = json.loads(run("diff", "--json", "--store", directory, session, other).stdout)
    assert data["diff"] == "sessions" and data["first_divergence"]["field"] == "loop"
    assert [side["loop_id"] for side in data["only_in_a"]] == [fork]


def test_two_sessions_whose_ids_hold_a_colon(tmp_path: Path) -> None:
    # "team:alpha" was read as loop "alpha" of session "team": no such loop.
    sessions = store_colon_ids(tmp_path)
    result = run("diff", "--json", "--store", tmp_path, "team:alpha", "team:beta")
    assert result.exit_code == EXIT_OK, result.stderr
    expected = diff_sessions(sessions["team:alpha"], sessions["team:beta"])
    assert msgspec.json.decode(result.stdout, type=LoopDiff | SessionDiff) == expected
    loops = run("diff", "--json", "--store", tmp_path, "team:#1", "team:beta", "--loop-b", "#1")
    assert loops.exit_code == EXIT_OK and json.loads(loops.stdout)["a"]["session_id"] == "team"


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (("{s}:#1", "missing-session:#1"), EXIT_FAILURE, "missing-session"),
        (("{s}:#1", "{s}:#9"), EXIT_FAILURE, "no loop '#9'"),
        (("{s}:#1", "{s}:nope"), EXIT_FAILURE, "no loop 'nope'"),
        (("{s}:#1", "{s}"), EXIT_USAGE, "on both sides"),
        (("../x:#1", "{s}:#1"), EXIT_USAGE, "unsafe session id"),
        (("{s}", "{s}", "--loop-a", ""), EXIT_USAGE, "--loop-a: empty loop"),
        (("{s}:#1",), EXIT_USAGE, "Missing argument 'B'"),
    ],
)
def test_errors_are_one_line(store: Stored, args: tuple[str, ...], code: int, fragment: str) -> None:
    directory, session = store.directory, store.forked.session_id
    result = run("diff", "--store", directory, *(arg.format(s=session) for arg in args))
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("phi-session") and fragment in lines[0], lines


def test_a_missing_store_is_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.db"
    result = run("diff", "--store", missing, "a:#1", "b:#1")
    assert result.exit_code == EXIT_FAILURE and "no store at" in result.stderr
    assert not missing.exists()


# -- the loops' facts side by side, drawn without rich's table layout ---------------------------

# Narrow, wide (two cells) and combining characters, and spaces that a fold could break at.
_CELL_TEXT = st.lists(
    st.sampled_from(["a", "Z", "7", " ", "-", "#", ":", "\u4e2d", "\U0001f600", "e\u0301", "\\x1b"]),
    max_size=30,
).map("".join)
_CELL_STYLE = st.sampled_from(["", "bold", "blue", "dim", *STATUS_STYLES.values()])


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(
        st.tuples(_CELL_TEXT, _CELL_STYLE, _CELL_TEXT, _CELL_STYLE, _CELL_TEXT, _CELL_STYLE),
        min_size=1,
        max_size=8,
    ),
    width=st.integers(min_value=8, max_value=140),
)
def test_sides_are_drawn_as_rich_draws_their_table(
    rows: list[tuple[str, str, str, str, str, str]], width: int
) -> None:
    """Byte for byte, colours included, at any width: those the rows fit in side by side
    (drawn directly) and narrower ones (rich folds the cells)."""
    sides = _Sides(
        [(Text(label, style=s0), Text(a, style=s1), Text(b, style=s2)) for label, s0, a, s1, b, s2 in rows]
    )

    def drawn(renderable: Any, colour: bool) -> str:
        out = io.StringIO()
        console = Console(
            file=out,
            width=width,
            force_terminal=colour,
            color_system="truecolor" if colour else None,
            highlight=False,
            soft_wrap=False,
        )
        console.print(Group(Text("before"), renderable, Text("after")))
        return out.getvalue()

    for colour in (False, True):
        assert drawn(sides, colour) == drawn(sides.table(), colour)
