"""``phi-session diff``: compare two runs, two loops turn by turn or two sessions loop by loop."""

from __future__ import annotations

from collections.abc import Callable

import click

from ..diff import LoopDiff, SessionDiff, diff_loops, diff_sessions, load_ref
from ..errors import InvalidArgument
from ..model import Session
from . import render_diff
from .app import (
    EXIT_USAGE,
    CliError,
    echo_json,
    load_cli_session,
    main,
    open_cli_store,
    stdout,
    store_options,
)


def _side(
    text: str, loop: str | None, name: str, load: Callable[[str], Session]
) -> tuple[Session, str | None]:
    """The session and loop of argument `name` (`load_ref`; with ``--loop-NAME``, `text`
    is the whole id)."""
    try:
        return load_ref(text, loop, load)
    except InvalidArgument as error:
        raise CliError(f"--loop-{name.lower()}: {error}", EXIT_USAGE) from None


@main.command("diff")
@click.argument("a", metavar="A")
@click.argument("b", metavar="B")
@click.option("--loop-a", metavar="LOOP", help="The loop of A (A is then the session id as written).")
@click.option("--loop-b", metavar="LOOP", help="The loop of B (B is then the session id as written).")
@store_options
def diff_command(
    a: str, b: str, loop_a: str | None, loop_b: str | None, store_url: str | None, as_json: bool
) -> None:
    """Compare two runs: loop A with loop B turn by turn, or session A with session B.

    A and B are SESSION:LOOP (a loop) or SESSION (a whole session, its loops
    paired in tree order). LOOP is a loop id or #N, the N-th loop as 'show'
    numbers them. The text is split at its first colon, unless it is, whole, the
    id of a stored session (then it names that session); for a loop of a session
    whose id holds a colon, give the loop with --loop-a/--loop-b. Name a loop on
    both sides or on neither. Both may be in one session: a fork and the loop it
    forked from.

    Per turn it shows what differs in content: input messages, the system prompt
    and tools offered (when requests were captured), text and thinking (line
    diff), tool calls (names, arguments compared as JSON, path by path),
    tool results and stop reasons; then where the runs first diverge. Timing,
    tokens, the model and tool call ids are shown as differences, never as
    divergence. With --json, the diff as JSON (phi_session.diff: "diff" is
    "loops" or "sessions").

    Exit status 0 whether or not they differ; 1 an unknown session or loop; 2 usage.
    """
    with open_cli_store(store_url, read_only=True) as store:
        loaded: dict[str, Session] = {}

        def load(session_id: str) -> Session:  # a session on both sides is loaded once
            if session_id not in loaded:
                loaded[session_id] = load_cli_session(store, session_id)
            return loaded[session_id]

        first, ref_a = _side(a, loop_a, "A", load)
        second, ref_b = _side(b, loop_b, "B", load)
    if (ref_a is None) != (ref_b is None):
        raise CliError("name a loop on both sides (SESSION:LOOP) or on neither (SESSION)", EXIT_USAGE)
    result: LoopDiff | SessionDiff
    if ref_a is not None and ref_b is not None:
        result = diff_loops(first, ref_a, second, ref_b)
    else:
        result = diff_sessions(first, second)
    if as_json:
        echo_json(result)
        return
    view = (
        render_diff.loop_diff_view(result)
        if isinstance(result, LoopDiff)
        else render_diff.session_diff_view(result)
    )
    stdout().print(view)
