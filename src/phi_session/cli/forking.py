"""``phi-session fork``: the context a loop's model saw at one turn, to resume from."""

from __future__ import annotations

from pathlib import Path

import click
import msgspec
from rich.console import Group

from ..codec import encode_message
from ..diff import find_loop
from ..replay.script import RecordedTurn, ReplayScript
from . import render
from .app import (
    OutputFile,
    echo_json,
    load_cli_session,
    main,
    open_cli_store,
    path_error,
    refuse_store_file,
    stderr,
    stdout,
    store_options,
)


def fork_point_json(session_id: str, turn: RecordedTurn) -> dict[str, object]:
    """The fork point as JSON: where it is, and the request (phi-core message JSON)."""
    request = turn.request
    return {
        "session_id": session_id,
        "loop_id": turn.loop_id,
        "turn_index": turn.turn_index,
        "system_prompt": request.system_prompt,
        "tools": None if request.tools is None else msgspec.to_builtins(request.tools),
        "messages": [msgspec.Raw(encode_message(message)) for message in request.messages],
    }


@main.command("fork")
@click.argument("session_id", metavar="ID")
@click.argument("loop_id", metavar="LOOP_ID")
@click.option(
    "--turn", "turn_index", type=click.IntRange(min=0), required=True, help="The turn to fork at (0-based)."
)
@click.option(
    "--out",
    "out_file",
    metavar="FILE",
    type=OutputFile(dash=True),
    help="Write the JSON to FILE (- is stdout).",
)
@store_options
def fork_command(
    session_id: str,
    loop_id: str,
    turn_index: int,
    out_file: str | None,
    store_url: str | None,
    as_json: bool,
) -> None:
    """The context LOOP_ID's model saw at turn --turn: where a fork of it starts.

    LOOP_ID is a loop id, or #N for the N-th loop as 'show' numbers them.

    The system prompt and tools when the turn's request was captured, and the
    messages: the earlier loops' context, then this loop's up to the turn's own
    inputs. --json prints it as JSON (phi-core messages), --out FILE writes that
    JSON to FILE (--out - to stdout, as --json), for a program to resume from
    (phi_session.replay: fork, fork_lineage); phi_session.codec.decode_messages(FILE's
    bytes) reads its messages back.
    """
    if out_file == "-":
        out_file, as_json = None, True
    with open_cli_store(store_url, read_only=True) as store:
        if out_file is not None:
            refuse_store_file("--out", out_file, store_url)
        session = load_cli_session(store, session_id)
    loop_id = find_loop(session, loop_id).loop_id
    turn = ReplayScript.from_session(session, loop_id).turn(turn_index)
    if out_file is not None or as_json:
        data = fork_point_json(session.session_id, turn)
        if out_file is not None:
            try:
                Path(out_file).write_bytes(msgspec.json.format(msgspec.json.encode(data), indent=2))
            except OSError as error:  # a write error (full disk) does not name its file
                raise path_error(out_file, error) from None
            note = f"wrote the context of turn {turn_index} to {out_file}"
            stderr().print(render.plain(note, "dim"), soft_wrap=True)
        if as_json:
            echo_json(data)
        return
    console = stdout()
    request = turn.request
    if request.system_prompt is not None:
        console.print(render.plain("system prompt", "bold"))
        console.print(Group(*render.plain_lines(request.system_prompt)))
        console.print()
    if request.tools is not None:
        names = ", ".join(tool.name for tool in request.tools) or "(none)"
        console.print(render.plain(f"tools: {names}", "bold", one_line=True))
        console.print()
    for message in request.messages:
        console.print(render.message_view(message))
    note = (
        f"{render.count(len(request.messages), 'message')}: the context of turn {turn_index} "
        f"of {render.ident(loop_id)}"
    )
    stderr().print(render.plain(note, "dim"), soft_wrap=True)
