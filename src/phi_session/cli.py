"""The ``phi-session`` command line: record, list, inspect, export and serve sessions.

Every command takes ``--store URL`` (default: the embedded store, see
`phi_session.stores.urls.default_store`) and ``--json`` for machine-readable output
on stdout. Exit codes: 0 success; 1 something named was not found, or could not be
read or stored; 2 usage error (bad option, malformed argument, invalid session id).
Errors go to stderr as one line each; no traceback is shown unless
``PHI_SESSION_DEBUG=1``.

Everything taken from a session (messages, tool output, ids) is untrusted: it is
printed as plain text, with rich markup not interpreted and terminal control
characters shown as escapes, never sent raw to the terminal.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

import click
import msgspec
from rich.console import Console, Group, RenderableType
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from . import __version__
from ._float32 import Float32
from ._time import Timestamp
from .codec import decode_session, encode_event, encode_message, encode_session
from .errors import DecodeError, InvalidQuery, InvalidSessionId, PhiSessionError, SessionNotFound
from .events import AgentEvent
from .messages import (
    AgentMessage,
    AssistantMessage,
    ExtensionMessage,
    ImageContent,
    TextContent,
    ThinkingContent,
    ToolCall,
    ToolResultMessage,
    Usage,
    message_role,
)
from .model import LoopRecord, Session
from .recorder import SessionRecorder, SessionRecorderConfig
from .stores.base import SessionStore, SessionSummary, to_builtins, validate_session_id
from .stores.query import GROUP_BYS, LOOP_STATUSES, ORDERS, TIME_HELP, SessionQuery, parse_group_by

__all__ = ["EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "main"]

EXIT_OK = 0
EXIT_FAILURE = 1
"""Something named was not found, or could not be read or stored."""
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
"""Ctrl-C (128 + SIGINT), as shells report it."""

PROG = "phi-session"
F = TypeVar("F", bound=Callable[..., Any])

STATUS_STYLES = {
    "Completed": "green", "Running": "cyan", "Pending": "yellow",
    "Aborted": "red", "Rejected": "magenta",
}
_MAX_REPORTED_LINES = 100  # malformed lines reported one by one; later ones only counted
_SPILL_EVERY = 100_000  # lines between saves of the finished sessions while recording


class CliError(Exception):
    """A failure the user must see as one line on stderr, with an exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# -- output helpers -----------------------------------------------------------------------

# C0/C1 control characters (except newline and tab) would let recorded content drive
# the terminal (colours, cursor moves, title changes); they are shown as escapes.
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0)) if c not in (9, 10)}
_ONE_LINE = {**_CONTROL, 10: "\u23ce", 9: " "}


def safe(text: str, *, one_line: bool = False) -> str:
    """`text` with terminal control characters escaped (and newlines shown as ⏎ if `one_line`)."""
    return text.translate(_ONE_LINE if one_line else _CONTROL)


def plain(text: str, style: str = "", *, one_line: bool = False, limit: int | None = None) -> Text:
    """Untrusted text as a rich `Text`: markup is not interpreted, controls are escaped."""
    value = safe(text, one_line=one_line)
    if limit is not None and len(value) > limit:
        value = value[: limit - 1] + "\u2026"
    return Text(value, style=style)


def _stdout() -> Console:
    # Piped output is colourless and, unless $COLUMNS says otherwise, wide: ids are never cut.
    tty = sys.stdout.isatty()
    width = None if tty or "COLUMNS" in os.environ else 200
    return Console(highlight=False, soft_wrap=False, width=width, no_color=not tty)


def _stderr() -> Console:
    return Console(stderr=True, highlight=False)


def _echo_json(value: Any) -> None:
    click.echo(msgspec.json.format(msgspec.json.encode(value), indent=2).decode())


def _warn(message: str) -> None:
    click.echo(f"{PROG}: {safe(message, one_line=True)}", err=True)


def short_time(ts: Timestamp | None) -> str:
    """``YYYY-MM-DD HH:MM:SS`` (UTC) for tables; the full value stays in ``--json``."""
    return "" if ts is None else str(ts)[:19].replace("T", " ")


def _tokens(n: int) -> str:
    return f"{n:,}"


def status_counts(counts: dict[str, int]) -> Text:
    """``2 Completed, 1 Aborted``, coloured by status, in a fixed status order."""
    out = Text()
    for status in sorted(counts, key=lambda s: (LOOP_STATUSES.index(s) if s in LOOP_STATUSES else 99, s)):
        if out:
            out.append(", ")
        out.append(f"{counts[status]} {status}", style=STATUS_STYLES.get(status, ""))
    return out


def usage_line(usage: Usage) -> str:
    parts = [f"{_tokens(usage.total_tokens)} tokens", f"in {_tokens(usage.input)}",
             f"out {_tokens(usage.output)}"]
    for label, value in (("reasoning", usage.reasoning), ("cache read", usage.cache_read),
                         ("cache write", usage.cache_write)):
        if value:
            parts.append(f"{label} {_tokens(value)}")
    return " · ".join(parts)


# -- store access ---------------------------------------------------------------------------


@contextlib.contextmanager
def open_store(url: str | None, directory: str | None = None) -> Iterator[SessionStore]:
    """The store named by `url` (None: the default store), closed afterwards.

    `directory` (the ``--dir`` option) names a JSON-file store directly; it is
    created on the first save if it does not exist yet.
    """
    from .stores.json_dir import JsonDirStore
    from .stores.urls import open_store as open_url

    if directory is not None and url is not None:
        raise CliError("--dir and --store both name a store: give one", EXIT_USAGE)
    try:
        store = JsonDirStore(directory) if directory is not None else open_url(url)
    except ValueError as error:  # a malformed store URL
        raise CliError(f"--store: {error}", EXIT_USAGE) from None
    try:
        yield store
    finally:
        store.close()


def _session_id(value: str) -> str:
    try:
        return validate_session_id(value)
    except InvalidSessionId as error:
        raise CliError(str(error), EXIT_USAGE) from None


def load_session(store: SessionStore, session_id: str) -> Session:
    return store.load(_session_id(session_id))


# -- the command group and its error handling --------------------------------------------------


class _StderrLogHandler(logging.Handler):
    """Library warnings (e.g. orphan events) as one ``phi-session: warning:`` line each."""

    def emit(self, record: logging.LogRecord) -> None:
        _warn(f"warning: {self.format(record)}")


class PhiSessionGroup(click.Group):
    """The ``phi-session`` group; its `main` turns every failure into one stderr line."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        code = self._run(args, prog_name or PROG, complete_var, **extra)
        if standalone_mode:
            sys.exit(code)
        return code

    def _run(self, args: Sequence[str] | None, prog_name: str, complete_var: str | None,
             **extra: Any) -> int:
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
            _warn(f"{where}: error: {' '.join(error.format_message().split())}{hint}")
            return error.exit_code
        except CliError as error:
            _warn(f"error: {error}")
            return error.exit_code
        except InvalidSessionId as error:
            _warn(f"error: {error}")
            return EXIT_USAGE
        except PhiSessionError as error:
            _warn(f"error: {error}")
            return EXIT_FAILURE
        except (click.Abort, KeyboardInterrupt):
            _warn("interrupted")
            return EXIT_INTERRUPTED
        except BrokenPipeError:
            # The reader went away (e.g. `| head`): no message, exit 1 as rich does for
            # its own output. stdout goes to /dev/null so the final flush stays quiet.
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_FAILURE
        except OSError as error:
            _warn(f"error: {error.strerror or error}" + (f": {error.filename}" if error.filename else ""))
            return EXIT_FAILURE
        except Exception as error:
            if os.environ.get("PHI_SESSION_DEBUG"):
                raise
            _warn(f"internal error: {type(error).__name__}: {error} "
                  "(PHI_SESSION_DEBUG=1 shows the traceback)")
            return EXIT_FAILURE
        finally:
            library_logger.removeHandler(handler)


@click.group(cls=PhiSessionGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name=PROG)
def main() -> None:
    """Record, inspect and serve phi-core agent sessions.

    Stores are named by URL: sqlite:///path/to.db, postgresql://..., or a directory
    path (one phi-core JSON file per session). The default is $PHI_SESSION_STORE,
    else ./.phi-session/sessions.db.

    Exit codes: 0 ok, 1 not found or failed, 2 usage error.
    """


def store_options(fn: F) -> F:
    """``--store URL`` and ``--json``, shared by every command."""
    fn = click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON on stdout.")(fn)
    return click.option(
        "--store", "store_url", metavar="URL", default=None,
        help="Session store URL or directory (default: $PHI_SESSION_STORE or ./.phi-session/sessions.db).",
    )(fn)


# -- list ---------------------------------------------------------------------------------------


def summaries_table(rows: Sequence[SessionSummary], width: int) -> Table:
    """The ``list`` table for a terminal `width` columns wide.

    Ids, times, loop counts and tokens are never cut. Narrower terminals lose
    columns instead: below 150 the creation time (and the agent id is shortened),
    below 120 the model, below 100 the agent and the turn count.
    """
    show_created, show_model, show_agent = width >= 150, width >= 120, width >= 100
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("ID", no_wrap=True)
    if show_agent:
        table.add_column("AGENT", no_wrap=True, overflow="ellipsis", max_width=None if show_created else 9)
    if show_created:
        table.add_column("CREATED", no_wrap=True)
    table.add_column("LAST ACTIVE", no_wrap=True)
    table.add_column("LOOPS", min_width=11)
    if show_agent:
        table.add_column("TURNS", justify="right", no_wrap=True)
    table.add_column("TOKENS", justify="right", no_wrap=True)
    if show_model:
        table.add_column("MODEL", overflow="fold")
    for row in rows:
        loops = status_counts(row.loops_by_status)
        if row.rejected:
            loops.append(" rejected", style="magenta")
        cells: list[RenderableType] = [plain(row.session_id)]
        if show_agent:
            cells.append(plain(row.agent_id))
        if show_created:
            cells.append(short_time(row.created_at))
        cells += [short_time(row.last_active_at), loops]
        if show_agent:
            cells.append(str(row.turn_count))
        cells.append(_tokens(row.total_tokens))
        if show_model:
            cells.append(plain(", ".join(row.models)))
        table.add_row(*cells)
    return table


@main.command("list")
@click.option("--agent", help="Only sessions of this agent id.")
@click.option("--since", metavar="WHEN", help=f"Last active at or after WHEN: {TIME_HELP}.")
@click.option("--until", metavar="WHEN", help="Last active before WHEN (same forms as --since).")
@click.option("--status", metavar="STATUS",
              help=f"Sessions with a loop in this status ({', '.join(LOOP_STATUSES)}).")
@click.option("--model", help="Sessions with a loop on this model (provider/model or model).")
@click.option("--min-tokens", metavar="N", help="Sessions with at least N tokens in total.")
@click.option("--parent", metavar="ID", help="Sub-agent sessions spawned from session ID.")
@click.option("--order", metavar="ORDER", help=f"Sort order: {', '.join(ORDERS)} (default newest).")
@click.option("--limit", metavar="N", help="Show at most N sessions.")
@store_options
def list_command(store_url: str | None, as_json: bool, **filters: str | None) -> None:
    """List stored sessions, newest first."""
    try:
        query = SessionQuery.from_strings(filters)
    except InvalidQuery as error:
        raise CliError(f"--{str(error.parameter).replace('_', '-')}: {error.reason}", EXIT_USAGE) from None
    with open_store(store_url) as store:
        rows = store.query(query)
    if as_json:
        _echo_json(to_builtins(rows))
    elif rows:
        console = _stdout()
        console.print(summaries_table(rows, console.width))
    else:
        _stderr().print("no sessions match", style="dim")


# -- show ------------------------------------------------------------------------------------


def _formation_text(session: Session) -> str:
    formation = session.formation
    text = f"{formation.kind} at {formation.timestamp}"
    if formation.kind == "InactivityTimeout":
        text += f" (threshold {formation.threshold_secs}s"
        text += f", after session {formation.previous_session_id})" if formation.previous_session_id else ")"
    return text


def session_header(session: Session) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    spawn = session.parent_spawn_ref
    parent = (plain(f"session {spawn.parent_session_id}, loop {spawn.parent_loop_id}, "
                    f"tool {spawn.tool_name} (call {spawn.tool_call_id})")
              if spawn is not None else Text("none", style="dim"))
    rows: list[tuple[str, RenderableType]] = [
        ("Session", plain(session.session_id)),
        ("Agent", plain(session.agent_id)),
        ("Formation", plain(_formation_text(session))),
        ("Scope", session.scope),
        ("Created", str(session.created_at)),
        ("Last active", str(session.last_active_at)),
        ("Parent", parent),
        ("Rejected", Text("yes", style="magenta bold") if session.is_rejected else Text("no", style="dim")),
        ("Loops", status_counts(_count_statuses(session.loops))),
        ("Usage", usage_line(session.total_usage())),
    ]
    for key, value in rows:
        grid.add_row(key, value)
    return grid


def _count_statuses(loops: Iterable[LoopRecord]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in loops:
        counts[record.status] = counts.get(record.status, 0) + 1
    return counts


def loop_forest(session: Session) -> list[tuple[int, list[Any]]]:
    """The loops as a forest of ``(index, children)`` nodes, following ``parent_loop_id``.

    Roots are loops without a parent in this session. A loop caught in a parent
    cycle (phi-core's compaction pass can make a loop its own parent) is shown
    once, as a root, rather than lost or repeated.
    """
    first_index: dict[str, int] = {}
    for index, record in enumerate(session.loops):
        first_index.setdefault(record.loop_id, index)
    children: dict[int, list[int]] = {}
    roots: list[int] = []
    for index, record in enumerate(session.loops):
        parent = first_index.get(record.parent_loop_id) if record.parent_loop_id is not None else None
        if parent is None or parent == index:
            roots.append(index)
        else:
            children.setdefault(parent, []).append(index)
    seen: set[int] = set()
    forest: list[tuple[int, list[Any]]] = []
    # Depth-first with an explicit stack: a chain of thousands of continued loops
    # must not hit Python's recursion limit.
    for root in [*roots, *range(len(session.loops))]:
        if root in seen:
            continue
        seen.add(root)
        forest.append((root, []))
        stack: list[tuple[list[Any], Iterator[int]]] = [(forest[-1][1], iter(children.get(root, [])))]
        while stack:
            siblings, pending = stack[-1]
            for child in pending:
                if child not in seen:
                    seen.add(child)
                    siblings.append((child, []))
                    stack.append((siblings[-1][1], iter(children.get(child, []))))
                    break
            else:
                stack.pop()
    return forest


def _kind_text(record: LoopRecord) -> str:
    kind = record.kind
    return kind.kind if kind.tag is None else f"{kind.kind}:{kind.tag}"


def _config_text(record: LoopRecord) -> str:
    config = record.config
    if config is None:
        return "no config"
    parts = [f"{config.provider}/{config.model}"]
    details = [
        ("config", config.config_id), ("name", config.name), ("api", config.api),
        ("thinking", config.thinking_level), ("temperature", config.temperature),
        ("max tokens", config.max_tokens), ("context", config.context_window),
    ]
    parts += [f"{label} {_config_value(value)}" for label, value in details
              if value is not None and not isinstance(value, msgspec.UnsetType)]
    return " · ".join(parts)


def _config_value(value: object) -> str:
    # A 32-bit temperature reads as written (0.2), not as its 64-bit expansion.
    return value.to_json().decode() if isinstance(value, Float32) else str(value)


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def loop_label(record: LoopRecord, number: int) -> Text:
    label = Text(f"#{number} ", style="bold")
    label.append(f"\u25cf {record.status}", style=STATUS_STYLES.get(record.status, "") + " bold")
    label.append(safe(f"  {_kind_text(record)}  ", one_line=True), style="blue")
    label.append(safe(record.loop_id, one_line=True))
    group = record.parallel_group
    if group is not None:
        label.append("  \u2605 parallel winner" if group.is_selected else "  parallel, not selected",
                     style="yellow bold" if group.is_selected else "dim")
    label.append(f"  {_count(record.turn_count(), 'turn')} · "
                 f"{_count(record.tool_call_count(), 'tool call')} · "
                 f"{_count(record.usage.total_tokens, 'token')}", style="dim")
    return label


def _turn_line(record: LoopRecord, turn_index: int) -> Text:
    turn = record.turns[turn_index]
    content = getattr(turn.output_message, "content", ())  # extension messages have none
    tools = [block.name for block in content if isinstance(block, ToolCall)]
    line = Text(f"turn {turn.index} · {turn.triggered_by} · {turn.duration():.2f}s · "
                f"{_tokens(turn.usage.total_tokens)} tokens")
    if tools:
        line.append(" · calls ")
        line.append(safe(", ".join(tools), one_line=True), style="cyan")
    return line


def _add_loop(tree: Tree, session: Session, index: int, drawn_under: int | None) -> Tree:
    """Add loop `index` with its details under `tree`; returns its branch for the child loops.

    `drawn_under` is the index of its parent loop when the tree is too deep to draw it
    nested there, so the relation is spelled out instead.
    """
    record = session.loops[index]
    branch = tree.add(loop_label(record, index + 1))
    ended = f"ended {record.ended_at}" if record.ended_at is not None else "not ended"
    branch.add(Text(f"started {record.started_at} · {ended}", style="dim"))
    if drawn_under is not None:
        branch.add(Text(f"continues loop #{drawn_under + 1}", style="dim"))
    branch.add(plain(_config_text(record), "dim"))
    if record.parent_loop_id is not None and session.get_loop(record.parent_loop_id) is None:
        branch.add(plain(f"continues loop {record.parent_loop_id} (not in this session)", "dim"))
    branch.add(Text(f"usage: {usage_line(record.usage)}", style="dim"))
    if record.rejection is not None:
        branch.add(plain(f"rejected: {record.rejection}", "magenta"))
    if isinstance(record.error, str):
        branch.add(plain(f"error: {record.error}", "red"))
    group = record.parallel_group
    if group is not None:
        branch.add(plain(
            f"parallel group of {len(group.all_loop_ids)}: winner {group.selected_loop_id} "
            f"(config #{group.selected_config_index}), "
            f"evaluation {_tokens(group.evaluation_usage.total_tokens)} tokens",
            "yellow"))
    for ref in record.child_loop_refs:
        branch.add(plain(f"\u2192 sub-agent session {ref.child_session_id} (loop {ref.child_loop_id}) "
                         f"via {ref.tool_name} call {ref.tool_call_id}", "cyan"))
    for turn_index in range(len(record.turns)):
        branch.add(_turn_line(record, turn_index))
    return branch


MAX_TREE_DEPTH = 12
"""Loops nested deeper than this are drawn at this depth (with a "continues loop #n" line):
every level indents by four columns, so a long continuation chain would otherwise run off
the terminal and take rich quadratic time to lay out."""


def loop_tree(session: Session) -> Tree:
    tree = Tree(Text(f"loops ({len(session.loops)})", style="bold"))
    # An explicit stack (reversed so siblings keep session order): a chain of thousands
    # of continued loops must not hit the recursion limit.
    # Entries: (tree to draw under, depth, parent loop index, forest node).
    stack: list[tuple[Tree, int, int | None, tuple[int, list[Any]]]] = [
        (tree, 1, None, node) for node in reversed(loop_forest(session))]
    while stack:
        under, depth, parent, (index, children) = stack.pop()
        flattened = depth > MAX_TREE_DEPTH
        branch = _add_loop(under, session, index, parent if flattened else None)
        if depth >= MAX_TREE_DEPTH:
            stack.extend((under, depth + 1, index, child) for child in reversed(children))
        else:
            stack.extend((branch, depth + 1, index, child) for child in reversed(children))
    return tree


def _event_detail(event: AgentEvent) -> str:
    fields = msgspec.json.decode(encode_event(event))
    for key in ("type", "loop_id", "timestamp"):
        fields.pop(key, None)
    return msgspec.json.encode(fields).decode()


def events_table(session: Session, width: int) -> Table:
    """Every stored event: per loop (in session order) by sequence, then session-scoped ones.

    The detail column gets what the others leave of `width` (rich would rather drop
    whole columns than cut one long cell).
    """
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("LOOP", no_wrap=True)
    table.add_column("SEQ", no_wrap=True, justify="right")
    table.add_column("TYPE", no_wrap=True)
    table.add_column("TIME", no_wrap=True)
    table.add_column("DETAIL", no_wrap=True, overflow="ellipsis", max_width=max(20, width - 85))
    for number, record in enumerate(session.loops, start=1):
        for stored in sorted(record.events, key=lambda item: item.sequence):
            event = stored.event
            table.add_row(f"#{number}", str(stored.sequence), type(event).__name__,
                          str(getattr(event, "timestamp", "")),
                          plain(_event_detail(event), one_line=True, limit=160))
    if not isinstance(session.session_events, msgspec.UnsetType):
        for event in session.session_events:
            table.add_row("session", "", type(event).__name__, str(getattr(event, "timestamp", "")),
                          plain(_event_detail(event), one_line=True, limit=160))
    return table


@main.command()
@click.argument("session_id", metavar="ID")
@click.option("--events", "with_events", is_flag=True, help="Also print the ordered event log.")
@store_options
def show(session_id: str, with_events: bool, store_url: str | None, as_json: bool) -> None:
    """Show a session: header, usage and its loop tree.

    With --json, prints the session's phi-core JSON (which includes the events).
    """
    with open_store(store_url) as store:
        session = load_session(store, session_id)
    if as_json:
        click.echo(encode_session(session).decode())
        return
    console = _stdout()
    console.print(session_header(session))
    console.print()
    console.print(loop_tree(session))
    if with_events:
        console.print()
        console.print(Text("events (LOOP is the loop's #number in the tree above)", style="bold"))
        console.print(events_table(session, console.width))


# -- tree -------------------------------------------------------------------------------------


def spawn_graph(store: SessionStore, root: Session) -> dict[str, Any]:
    """The sub-agent sessions reachable from `root`, as nested dicts.

    Each node: ``session_id``, ``found`` (in the store), ``agent_id``, ``loops``,
    ``total_tokens``, ``loops_by_status``, ``via`` (the spawning ref, None at the
    root), ``repeated`` (already shown higher up: not expanded again) and ``children``.
    """
    expanded: set[str] = set()

    def visit(session_id: str, via: dict[str, str] | None, session: Session | None) -> dict[str, Any]:
        node: dict[str, Any] = {"session_id": session_id, "via": via, "found": True,
                                "repeated": session_id in expanded, "children": []}
        if node["repeated"]:
            return node
        expanded.add(session_id)
        if session is None:
            try:
                session = store.load(session_id)
            except (SessionNotFound, InvalidSessionId):
                node["found"] = False
                return node
        node.update(agent_id=session.agent_id, loops=len(session.loops),
                    total_tokens=session.total_usage().total_tokens,
                    loops_by_status=_count_statuses(session.loops))
        for record in session.loops:
            for ref in record.child_loop_refs:
                node["children"].append(visit(ref.child_session_id, {
                    "parent_loop_id": record.loop_id, "tool_name": ref.tool_name,
                    "tool_call_id": ref.tool_call_id, "child_loop_id": ref.child_loop_id,
                }, None))
        return node

    return visit(root.session_id, None, root)


def _graph_label(node: dict[str, Any]) -> Text:
    label = Text()
    via = node["via"]
    if via is not None:
        label.append(safe(f"{via['tool_name']} ({via['tool_call_id']}) \u2192 ", one_line=True), style="cyan")
    label.append(safe(node["session_id"], one_line=True), style="bold")
    if node["repeated"]:
        label.append("  (shown above)", style="dim")
    elif not node["found"]:
        label.append("  not in this store", style="red")
    else:
        label.append("  agent ")
        label.append(safe(node["agent_id"], one_line=True))
        label.append("  ")
        label.append_text(status_counts(node["loops_by_status"]))
        label.append(f"  {_tokens(node['total_tokens'])} tokens", style="dim")
    return label


def _add_graph(tree: Tree, node: dict[str, Any]) -> None:
    branch = tree.add(_graph_label(node))
    for child in node["children"]:
        _add_graph(branch, child)


@main.command()
@click.argument("session_id", metavar="ID")
@store_options
def tree(session_id: str, store_url: str | None, as_json: bool) -> None:
    """Show the spawn graph of sub-agent sessions.

    The session, the sub-agent sessions its tools spawned, theirs, and so on,
    loaded from the store (a child missing from the store is marked).
    """
    with open_store(store_url) as store:
        root = load_session(store, session_id)
        graph = spawn_graph(store, root)
    parent = root.parent_spawn_ref
    if as_json:
        _echo_json(graph)
        return
    drawing = Tree(_graph_label(graph))
    for child in graph["children"]:
        _add_graph(drawing, child)
    console = _stdout()
    if parent is not None:
        console.print(plain(f"(spawned by session {parent.parent_session_id} via {parent.tool_name})", "dim"))
    console.print(drawing)


# -- stats --------------------------------------------------------------------------------------


@main.command()
@click.option("--by", "group_by", default="agent", show_default=True, metavar="|".join(GROUP_BYS),
              help="Group usage by agent, by model (provider/model) or by UTC day of creation.")
@store_options
def stats(group_by: str, store_url: str | None, as_json: bool) -> None:
    """Token usage totals, grouped by agent, model or day."""
    try:
        by = parse_group_by(group_by)
    except InvalidQuery as error:
        raise CliError(f"--by: {error.reason}", EXIT_USAGE) from None
    with open_store(store_url) as store:
        totals = store.usage_totals(by)
    if as_json:
        _echo_json(to_builtins(totals))
        return
    table = Table(box=None, header_style="bold", pad_edge=False, show_footer=len(totals) > 1)
    usage_columns = ("input", "output", "reasoning", "cache_read", "cache_write", "total_tokens")
    grand = sum((row.usage for row in totals), Usage(input=0, output=0))
    # A session with loops on several models counts once per model: no session total then.
    sessions_total = "" if by == "model" else str(sum(row.sessions for row in totals))
    table.add_column(by.upper(), footer="total")
    table.add_column("SESSIONS", justify="right", footer=sessions_total)
    table.add_column("LOOPS", justify="right", footer=str(sum(row.loops for row in totals)))
    for name in usage_columns:
        table.add_column(name.replace("_", " ").upper(), justify="right",
                         footer=_tokens(getattr(grand, name)))
    for row in totals:
        table.add_row(plain(row.key), str(row.sessions), str(row.loops),
                      *(_tokens(getattr(row.usage, name)) for name in usage_columns))
    if totals:
        _stdout().print(table)
    else:
        _stderr().print("no sessions", style="dim")


# -- record ----------------------------------------------------------------------------------


def _summary_record(session: Session) -> dict[str, Any]:
    return {
        "session_id": session.session_id, "agent_id": session.agent_id,
        "loops_by_status": _count_statuses(session.loops),
        "turns": sum(len(record.turns) for record in session.loops),
        "total_tokens": session.total_usage().total_tokens,
        "rejected": session.is_rejected,
    }


def _summary_text(row: dict[str, Any]) -> Text:
    text = plain(row["session_id"], "bold")
    text.append("  agent ")
    text.append(safe(row["agent_id"], one_line=True))
    text.append("  loops: ")
    text.append_text(status_counts(row["loops_by_status"]) or Text("none"))
    text.append(f"  turns: {row['turns']}  tokens: {_tokens(row['total_tokens'])}")
    if row["rejected"]:
        text.append("  rejected", style="magenta")
    return text


class _LineSource:
    """The input of ``record``: a file or stdin, read as bytes line by line."""

    def __init__(self, name: str) -> None:
        self.name = "stdin" if name == "-" else name
        self.size: int | None = None
        if name == "-":
            self.stream: IO[bytes] = sys.stdin.buffer
            return
        path = Path(name)
        if not path.exists():
            raise CliError(f"{name}: no such file", EXIT_FAILURE)
        if path.is_dir():
            raise CliError(f"{name}: is a directory, expected a JSONL event file", EXIT_USAGE)
        self.stream = path.open("rb")
        self.size = path.stat().st_size

    def close(self) -> None:
        if self.name != "stdin":
            self.stream.close()


def _record_stream(
    source: _LineSource, recorder: SessionRecorder, progress: Progress | None,
    spill: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Feed every non-empty line to the recorder; malformed lines are reported and skipped.

    Every `_SPILL_EVERY` lines `spill()` saves the finished sessions, so memory stays
    bounded on long streams. Ctrl-C stops the reading, not the recording: what was
    read is still flushed and saved by the caller (``interrupted_at`` says after which line).
    """
    task = progress.add_task("recording", total=source.size) if progress is not None else None
    outcome: dict[str, Any] = {"events": 0, "malformed_lines": 0, "errors": [], "interrupted_at": None}
    consumed = number = 0
    try:
        for number, line in enumerate(source.stream, start=1):
            consumed += len(line)
            if progress is not None and task is not None and number % 512 == 0:
                progress.update(task, completed=consumed)
            data = line.strip()
            if data:
                _record_line(recorder, data, number, source.name, outcome)
            if spill is not None and number % _SPILL_EVERY == 0:
                spill()
    except KeyboardInterrupt:
        outcome["interrupted_at"] = number
    if progress is not None and task is not None:
        progress.update(task, completed=consumed)
    return outcome


def _record_line(
    recorder: SessionRecorder, data: bytes, number: int, name: str, outcome: dict[str, Any]
) -> None:
    try:
        recorder.on_json(data)
    except DecodeError as error:
        outcome["malformed_lines"] += 1
        if outcome["malformed_lines"] <= _MAX_REPORTED_LINES:
            outcome["errors"].append({"line": number, "error": str(error)})
            _warn(f"{name}: line {number}: skipped: {error}")
        elif outcome["malformed_lines"] == _MAX_REPORTED_LINES + 1:
            _warn(f"{name}: more malformed lines: counted, not shown")
        return
    outcome["events"] += 1


@main.command()
@click.argument("source", metavar="FILE|-")
@click.option("--dir", "directory", metavar="DIR", type=click.Path(file_okay=False),
              help="Store the sessions as phi-core JSON files in DIR (created if missing).")
@click.option("--include-streaming-events", is_flag=True, help="Also store MessageUpdate deltas.")
@click.option("--capture-turn-requests", is_flag=True, help="Copy TurnRequest payloads into their turns.")
@click.option("--orphans", "orphans_path", metavar="FILE", type=click.Path(dir_okay=False),
              help="Write events that belong to no known loop to FILE (JSONL; created, "
                   "empty if there are none, before any input is read).")
@store_options
def record(source: str, directory: str | None, include_streaming_events: bool, capture_turn_requests: bool,
           orphans_path: str | None, store_url: str | None, as_json: bool) -> None:
    """Record a JSONL event stream into the store.

    FILE (or - for stdin) is phi-core's event stream, one JSON event per line. Every session is saved to
    the store (merged with what is stored under its id) and summarised in one
    line. A malformed line is reported with its number and skipped; everything
    else is recorded. Ctrl-C stops reading and saves what was read (exit 130).
    """
    recorder = SessionRecorder(SessionRecorderConfig(
        include_streaming_events=include_streaming_events, capture_turn_requests=capture_turn_requests))
    with contextlib.ExitStack() as cleanup:
        # Opened (created) before any input is consumed: an unwritable path must fail
        # now, not after the stream is gone.
        orphans_file = cleanup.enter_context(_open_orphans_file(orphans_path)) if orphans_path else None
        store = cleanup.enter_context(open_store(store_url, directory))
        spilled: dict[str, None] = {}  # ids of sessions saved while reading, in order
        failed: list[str] = []
        # Drained sessions wait here until saved: a Ctrl-C in the middle of a spill
        # leaves the unsaved ones for the final save instead of dropping them.
        pending: deque[Session] = deque()

        def spill() -> None:
            # Saving merges by loop id (and re-links continuations), so a session saved
            # now and again later (even twice, if interrupted in between) loses nothing.
            recorder.checkpoint()
            pending.extend(recorder.drain_completed())
            while pending:
                session = pending[0]
                failed.extend(_save_all(store, [session]))
                spilled[session.session_id] = None
                pending.popleft()

        lines = _LineSource(source)
        try:
            if sys.stderr.isatty() and not as_json:
                columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                           TimeElapsedColumn())
                with Progress(*columns, console=_stderr(), transient=True) as progress:
                    outcome = _record_stream(lines, recorder, progress, spill)
            else:
                outcome = _record_stream(lines, recorder, None, spill)
        finally:
            lines.close()
        recorder.flush()
        pending.extend(recorder.drain_completed())
        sessions = list(pending)
        failed.extend(_save_all(store, sessions))
        if spilled:  # summarise what the store now holds for every session touched
            touched = {**spilled, **dict.fromkeys(session.session_id for session in sessions)}
            sessions = [store.load(sid) for sid in touched if sid not in failed]
        if outcome["interrupted_at"] is not None:
            _warn(f"interrupted after line {outcome['interrupted_at']}: what was read is recorded and saved")
        orphans = recorder.orphans()
        orphans_lost = False
        if orphans:
            where = "not stored (use --orphans FILE to keep them)"
            if orphans_file is not None:
                try:
                    orphans_file.writelines(encode_event(orphan.event) + b"\n" for orphan in orphans)
                    orphans_file.close()  # closing flushes: a full disk shows up here
                    where = f"written to {orphans_path}"
                except OSError as error:
                    orphans_lost = True
                    where = f"NOT written to {orphans_path}: {error.strerror or error}"
            _warn(f"warning: {len(orphans)} events belonged to no known loop: {where}")
    rows = [_summary_record(session) for session in sessions]
    totals = {
        "sessions": len(rows), "loops": sum(len(s.loops) for s in sessions),
        "turns": sum(row["turns"] for row in rows), "total_tokens": sum(row["total_tokens"] for row in rows),
        "events": outcome["events"], "malformed_lines": outcome["malformed_lines"],
        "orphan_events": len(orphans), "unsaved_sessions": len(failed),
        "interrupted_at_line": outcome["interrupted_at"],
    }
    if as_json:
        _echo_json({"sessions": rows, "totals": totals, "errors": outcome["errors"]})
    else:
        console = _stdout()
        for row in rows:  # one line each, whatever the width: scripts read these
            console.print(_summary_text(row), soft_wrap=True)
        console.print(Text(
            f"total: {totals['sessions']} sessions, {totals['loops']} loops, {totals['turns']} turns, "
            f"{_tokens(totals['total_tokens'])} tokens from {totals['events']} events; "
            f"{totals['malformed_lines']} malformed lines skipped", style="bold"), soft_wrap=True)
    if outcome["interrupted_at"] is not None:
        raise click.exceptions.Exit(EXIT_INTERRUPTED)
    if failed or orphans_lost:
        raise click.exceptions.Exit(EXIT_FAILURE)


def _open_orphans_file(path: str) -> IO[bytes]:
    try:
        return open(path, "wb")  # closed by the caller's ExitStack
    except OSError as error:
        raise CliError(f"--orphans: cannot write {path}: {error.strerror or error}", EXIT_USAGE) from None


def _save_all(store: SessionStore, sessions: Iterable[Session]) -> list[str]:
    """Save every session; a failure is reported and the others are still saved."""
    failed = []
    for session in sessions:
        try:
            store.save(session)
        except PhiSessionError as error:
            failed.append(session.session_id)
            _warn(f"error: session {session.session_id} not saved: {error}")
    return failed


# -- import / export ---------------------------------------------------------------------------


def _session_files(path: Path) -> list[Path]:
    if path.is_dir():
        # Only `*.json`: lock sidecars and temporary files have another final suffix.
        return sorted(p for p in path.iterdir() if p.suffix == ".json" and p.is_file())
    return [path]


@main.command("import")
@click.argument("paths", metavar="PATH...", nargs=-1, required=True)
@store_options
def import_command(paths: tuple[str, ...], store_url: str | None, as_json: bool) -> None:
    """Import phi-core session files or directories of them.

    A directory contributes every ``*.json`` file directly in it.
    A session already stored under the same id is merged (no stored loop is lost).
    A file that cannot be read is reported and skipped (exit status 1).
    """
    imported: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    with open_store(store_url) as store:
        for name in paths:
            path = Path(name)
            if not path.exists():
                errors.append({"path": name, "error": "no such file or directory"})
                continue
            for file in _session_files(path):
                try:
                    session = decode_session(file.read_bytes())
                    store.save(session)
                except (OSError, PhiSessionError) as error:
                    message = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
                    errors.append({"path": str(file), "error": message})
                    continue
                imported.append({"path": str(file), "session_id": session.session_id,
                                 "loops": len(session.loops)})
    for failure in errors:
        _warn(f"error: {failure['path']}: {failure['error']}")
    if as_json:
        _echo_json({"imported": imported, "errors": errors})
    else:
        console = _stdout()
        for row in imported:
            console.print(plain(f"imported {row['session_id']} ({row['loops']} loops) from {row['path']}"),
                          soft_wrap=True)
        console.print(Text(f"{len(imported)} sessions imported, {len(errors)} failed", style="bold"))
    if errors:
        raise click.exceptions.Exit(EXIT_FAILURE)


def _timed(events: Sequence[AgentEvent], fallback: Timestamp) -> Iterator[tuple[int, bytes]]:
    """`events` (one loop's, in order) as ``(ns, line)`` with non-decreasing times.

    Many events carry no timestamp (messages, tool executions); each takes the time
    of the next timestamped event of its loop, since it happened no later than
    that: a tool's end then sorts after the sub-agent run it waited for. Events
    after the last timestamp take that timestamp (or `fallback`).
    """
    keys: list[int] = []
    upcoming: int | None = None
    for event in reversed(events):
        stamp = getattr(event, "timestamp", None)
        if isinstance(stamp, Timestamp):
            upcoming = stamp.ns if upcoming is None else min(upcoming, stamp.ns)
        keys.append(upcoming if upcoming is not None else -1)
    keys.reverse()
    latest = fallback.ns
    for key, event in zip(keys, events, strict=True):
        latest = key if key >= 0 else latest
        yield latest, encode_event(event)


def _timed_events(session: Session) -> list[Iterator[tuple[int, bytes]]]:
    """Each loop's events (and the session-scoped ones) as sorted ``(ns, line)`` streams."""
    streams = [
        _timed([item.event for item in sorted(record.events, key=lambda e: e.sequence)], record.started_at)
        for record in session.loops
    ]
    if not isinstance(session.session_events, msgspec.UnsetType):
        streams.append(_timed(session.session_events, session.created_at))
    return streams


def event_stream(sessions: Sequence[Session]) -> Iterator[bytes]:
    """The stored events of `sessions` as JSONL lines, merged in time order.

    Every loop's events keep their sequence order; between loops (and sessions)
    the event times decide, so the stream reads like the one that was recorded,
    minus what the recorder did not store (streaming deltas, by default).
    """
    streams = [stream for session in sessions for stream in _timed_events(session)]
    for _, line in heapq.merge(*streams, key=lambda item: item[0]):
        yield line + b"\n"


@main.command()
@click.argument("session_ids", metavar="ID...", nargs=-1, required=True)
@click.option("--format", "fmt", type=click.Choice(["json", "jsonl"]), default="json", show_default=True,
              help="json: phi-core session JSON; jsonl: the stored event stream.")
@click.option("-o", "--output", metavar="FILE", type=click.Path(dir_okay=False),
              help="Write to FILE instead of stdout.")
@store_options
def export(session_ids: tuple[str, ...], fmt: str, output: str | None, store_url: str | None,
           as_json: bool) -> None:
    """Export sessions as phi-core JSON or as a JSONL event stream.

    json: one ID gives its session file exactly as stored (phi-core's bytes);
    several give a JSON array of sessions. jsonl: every loop's stored events, one
    compact phi-core event per line, in time order across loops and sessions.
    --json is accepted for uniformity; both formats are JSON already.
    """
    del as_json  # both formats are machine-readable already
    with open_store(store_url) as store:
        sessions = [load_session(store, session_id) for session_id in session_ids]
    if fmt == "jsonl":
        chunks: Iterable[bytes] = event_stream(sessions)
    elif len(sessions) == 1:
        chunks = [encode_session(sessions[0]), b"\n"]
    else:
        chunks = [b"[\n", b",\n".join(encode_session(s) for s in sessions), b"\n]\n"]
    if output is None:
        out = sys.stdout.buffer
        out.writelines(chunks)
        out.flush()
    else:
        with open(output, "wb") as file:
            file.writelines(chunks)


# -- context ------------------------------------------------------------------------------------


def _content_texts(message: AgentMessage) -> list[Text]:
    if isinstance(message, ExtensionMessage):
        return [plain(msgspec.json.encode(message.data).decode(), "dim")]
    lines: list[Text] = []
    for block in message.content:
        if isinstance(block, TextContent):
            lines.append(plain(block.text))
        elif isinstance(block, ThinkingContent):
            lines.append(plain(f"(thinking) {block.thinking}", "dim italic"))
        elif isinstance(block, ToolCall):
            lines.append(plain(f"\u2192 {block.name}({msgspec.json.encode(block.arguments).decode()}) "
                               f"[{block.id}]", "cyan"))
        elif isinstance(block, ImageContent):
            lines.append(plain(f"[image {block.mime_type}, {len(block.data)} base64 chars]", "dim"))
    return lines


def message_view(message: AgentMessage) -> Group:
    role = message_role(message)
    head = plain(role, "bold", one_line=True)
    if isinstance(message, AssistantMessage):
        head.append(safe(f"  {message.provider}/{message.model} · {message.stop_reason} · "
                         f"{_tokens(message.usage.total_tokens)} tokens", one_line=True), style="dim")
    elif isinstance(message, ToolResultMessage):
        head.append(safe(f"  {message.tool_name} [{message.tool_call_id}]", one_line=True), style="dim")
        if message.is_error:
            head.append("  error", style="red")
    elif isinstance(message, ExtensionMessage):
        head.append(safe(f"  {message.kind}", one_line=True), style="dim")
    return Group(head, *_content_texts(message), Text())


@main.command()
@click.argument("session_id", metavar="ID")
@click.argument("loop_id", metavar="LOOP_ID")
@store_options
def context(session_id: str, loop_id: str, store_url: str | None, as_json: bool) -> None:
    """The messages needed to resume from LOOP_ID.

    The messages of every loop from the root down to LOOP_ID, in order; a loop
    with a compaction block contributes the block instead of its messages.
    """
    with open_store(store_url) as store:
        session = load_session(store, session_id)
    if session.get_loop(loop_id) is None:
        raise CliError(f"session {session_id} has no loop {loop_id}", EXIT_FAILURE)
    messages = session.context_at(loop_id)
    if as_json:
        raw = [msgspec.Raw(encode_message(message)) for message in messages]
        _echo_json(raw)
        return
    console = _stdout()
    for message in messages:
        console.print(message_view(message))
    _stderr().print(f"{len(messages)} messages", style="dim")


# -- rm -----------------------------------------------------------------------------------------


@main.command()
@click.argument("session_ids", metavar="ID...", nargs=-1, required=True)
@store_options
def rm(session_ids: tuple[str, ...], store_url: str | None, as_json: bool) -> None:
    """Delete sessions. Missing ids are reported (exit status 1); the others are deleted.

    A malformed id is a usage error (exit status 2) that deletes nothing: every id is
    checked before the first deletion.
    """
    valid_ids = [_session_id(session_id) for session_id in session_ids]
    removed: list[str] = []
    missing: list[str] = []
    with open_store(store_url) as store:
        for session_id in valid_ids:
            try:
                store.delete(session_id)
            except SessionNotFound:
                missing.append(session_id)
                _warn(f"error: no session {session_id}")
                continue
            removed.append(session_id)
    if as_json:
        _echo_json({"removed": removed, "missing": missing})
    else:
        for session_id in removed:
            _stdout().print(plain(f"removed {session_id}"), soft_wrap=True)
    if missing:
        raise click.exceptions.Exit(EXIT_FAILURE)


# -- demo / serve -------------------------------------------------------------------------------


@main.command()
@click.option("--dir", "directory", metavar="DIR", type=click.Path(file_okay=False),
              help="Store the demo sessions as phi-core JSON files in DIR (created if missing).")
@store_options
def demo(directory: str | None, store_url: str | None, as_json: bool) -> None:
    """Record an offline demo scenario and show its loop trees.

    A coding assistant's day on a simulated clock: continuations, a rerun and a
    branch, a parallel evaluation, a sub-agent, a rejection, a compaction and an
    inactivity rotation. Running it again rewrites the same sessions.
    """
    from .demo import render_tree, run_demo

    with open_store(store_url, directory) as store:
        console = _stdout()
        sessions = run_demo(store=store, console=None if as_json else _stderr())
    if as_json:
        _echo_json({"sessions": [_summary_record(session) for session in sessions]})
        return
    for session in sessions:
        console.print(render_tree(session))
    console.print(Text(f"{len(sessions)} demo sessions stored; try: {PROG} list, {PROG} serve", style="bold"))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback exposes every session to the network.")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535),
              help="Port (0: pick a free one).")
@store_options
def serve(host: str, port: int, store_url: str | None, as_json: bool) -> None:
    """Serve the read-only web viewer over the store (Ctrl-C stops it)."""
    from .web.server import is_loopback, make_server

    with open_store(store_url) as store:
        try:
            server = make_server(store, host=host, port=port)
        except OSError as error:
            raise CliError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
        url = server.url
        if as_json:
            click.echo(msgspec.json.encode({"url": url}).decode())
        else:
            _stderr().print(f"phi-session viewer on {url}  (Ctrl-C to stop)")
        if not is_loopback(host):
            _warn(f"warning: listening on {host}: anyone who can reach it can read every session")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
