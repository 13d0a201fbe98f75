"""The commands: each parses its options, asks the library, and hands the result to `render`."""

from __future__ import annotations

import codecs
import contextlib
import errno
import os
import re
import shutil
import signal
import stat
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, Protocol

import click
import msgspec
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from ..codec import decode_event, decode_json, decode_session, encode_event, encode_message, encode_session
from ..cost import Cost, Pricer
from ..diff import find_loop
from ..errors import (
    DecodeError,
    InvalidQuery,
    InvalidSessionId,
    InvalidStoreUrl,
    PhiSessionError,
    SessionNotFound,
    StoreError,
)
from ..events import AgentEvent
from ..model import CompactionBlock, Session
from ..recorder import SessionRecorder, SessionRecorderConfig
from ..saver import SessionSaver
from ..stores.base import SessionStore, summarize, summarize_outline, to_builtins, validate_session_id
from ..stores.query import GROUP_BYS, LOOP_STATUSES, ORDERS, TIME_HELP, SessionQuery, parse_group_by
from ..stores.search import DEFAULT_LIMIT
from ..stores.urls import default_store_url
from ..views import event_stream, loop_forest, outline_span, outline_timeline, spawn_graph
from . import render
from .app import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    PROG,
    CliError,
    F,
    OutputFile,
    cli_pricer,
    echo_json,
    load_cli_session,
    main,
    new_directories,
    open_cli_store,
    open_new_cli_store,
    path_error,
    prices_option,
    refuse_store_file,
    reported_by_the_command,
    saver_errors_reported_by_the_command,
    session_id_argument,
    stderr,
    stdout,
    store_options,
    store_url_error,
    warn,
)

MAX_REPORTED_LINES = 20
"""Malformed input lines reported one by one; later ones are only counted."""
_SPILL_EVERY = 100_000  # lines between saves of the finished sessions while recording


def _note_default_store(store_url: str | None, directory: str | None = None) -> None:
    """Say where a command that writes wrote, when the user did not name the store."""
    if store_url is None and directory is None:
        stderr().print(render.plain(f"store: {default_store_url()}", "dim"), soft_wrap=True)


# -- list -------------------------------------------------------------------------------------


def _filter_options(fn: Callable[..., None]) -> Callable[..., None]:
    """The session filters of ``list`` and ``search`` (all of `SessionQuery` but ``limit``)."""
    options = [
        click.option("--agent", help="Only sessions of this agent id."),
        click.option("--since", metavar="WHEN", help=f"Last active at or after WHEN: {TIME_HELP}."),
        click.option("--until", metavar="WHEN", help="Last active before WHEN (same forms as --since)."),
        click.option(
            "--status",
            metavar="STATUS",
            help=f"Sessions with a loop in this status ({', '.join(LOOP_STATUSES)}; any case).",
        ),
        click.option("--model", help="Sessions with a loop on this model (provider/model or model)."),
        click.option("--min-tokens", metavar="N", help="Sessions with at least N tokens in total."),
        click.option("--parent", metavar="ID", help="Sub-agent sessions spawned from session ID."),
        click.option("--order", metavar="ORDER", help=f"Sort order: {', '.join(ORDERS)} (default newest)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _option_error(error: ValueError, options: Mapping[str, str]) -> CliError:
    """A library's refusal of an argument, as the usage error of the option that gave it
    (`options`: the library's names of the options): ``ack_wait must be …`` becomes
    ``--ack-wait: must be …``, ``group_by: expected …`` ``--by: expected …``. An error
    naming nothing of `options` (one from an environment variable names it) stays as it is."""
    if isinstance(error, InvalidQuery):
        name, reason = error.parameter, error.reason
    else:
        named = re.fullmatch(r"(\w+)(?:: | (?=must ))(.*)", str(error), re.DOTALL)
        name, reason = named.groups() if named is not None else (None, str(error))
    option = options.get(name) if name is not None else None
    return CliError(f"{option}: {reason}" if option is not None else str(error), EXIT_USAGE)


def _session_query(filters: dict[str, str | None]) -> SessionQuery:
    try:
        return SessionQuery.from_strings(filters)
    except InvalidQuery as error:
        # (Every filter's option is named as its parameter.)
        raise _option_error(error, {name: f"--{name.replace('_', '-')}" for name in filters}) from None


def _note_unknown_costs(pricer: Pricer, costs: Iterable[Cost]) -> None:
    """Say how to get prices when some cost is unknown for want of the price table."""
    if pricer.hint is not None and any(not cost.known for cost in costs):
        stderr().print(render.plain(pricer.hint, "dim"), soft_wrap=True)


def _session_cost(store: SessionStore, pricer: Pricer, session_id: str) -> Cost:
    try:
        return pricer.outline(store.load_outline(session_id))
    except SessionNotFound:  # deleted since it was listed
        return Cost(usd=None)
    except StoreError as error:  # its summary was listed: the row stays, its cost unknown
        warn(f"warning: cost of session {session_id!r} unknown: {error}")
        return Cost(usd=None)


@main.command("list")
@_filter_options
@click.option("--limit", metavar="N", help="Show at most N sessions.")
@click.option(
    "--after",
    metavar="CURSOR",
    help="The page after CURSOR (printed on stderr under a full page of --limit rows).",
)
@prices_option
@store_options
def list_command(
    store_url: str | None, as_json: bool, prices_file: str | None, **filters: str | None
) -> None:
    """List stored sessions, newest first, with their first prompt, duration and cost (each listed
    session's outline is read to price it)."""
    query = _session_query(filters)
    pricer = cli_pricer(prices_file)
    with open_cli_store(store_url, read_only=True) as store:
        rows = store.query(query)
        costs = [_session_cost(store, pricer, row.session_id) for row in rows]
    following = query.next_page(rows)
    if following is not None and following.after is not None:
        stderr().print(  # one line, whatever the width: a script reads the cursor from it
            # The cursor holds a stored session id: escaped, as every other shown id.
            f"more may follow: --after {render.safe(str(following.after), one_line=True)}",
            style="dim",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    if as_json:
        echo_json(
            [{**to_builtins(row), "cost": to_builtins(cost)} for row, cost in zip(rows, costs, strict=True)]
        )
    elif rows:
        console = stdout()
        console.print(render.summaries_table(rows, console.width, costs))
        _note_unknown_costs(pricer, costs)
    else:
        stderr().print("no sessions match", style="dim")


# -- show, tree, context ----------------------------------------------------------------------


@main.command()
@click.argument("session_id", metavar="ID")
@click.option("--events", "with_events", is_flag=True, help="Also print the ordered event log.")
@click.option(
    "--timeline",
    "with_timeline",
    is_flag=True,
    help="Draw a waterfall of loops, turns, model and tool calls (sub-agent sessions inline) "
    "instead of the loop tree.",
)
@prices_option
@store_options
def show(
    session_id: str,
    with_events: bool,
    with_timeline: bool,
    store_url: str | None,
    as_json: bool,
    prices_file: str | None,
) -> None:
    """Show a session: header, usage and its loop tree (or, with --timeline, its waterfall).

    With --json, prints the session's phi-core JSON (which includes the events);
    with --timeline --json, the waterfall's bars.
    """
    if with_timeline:
        if with_events:  # a waterfall has no event log to add: say so rather than drop the flag
            raise CliError("--timeline and --events both name a view: give one", EXIT_USAGE)
        _show_timeline(session_id, store_url, as_json, prices_file)
        return
    with open_cli_store(store_url, read_only=True) as store:
        session = load_cli_session(store, session_id)
    if as_json:
        click.echo(encode_session(session).decode())
        return
    pricer = cli_pricer(prices_file)
    cost = pricer.session(session)
    console = stdout()
    console.print(render.session_header(session, summarize(session), cost))
    _note_unknown_costs(pricer, [cost])
    console.print()
    console.print(render.loop_tree(session, loop_forest(session)))
    if with_events:
        console.print()
        console.print(Text("events (LOOP is the loop's #number in the tree above)", style="bold"))
        console.print(render.events_table(session, console.width))


def _show_timeline(session_id: str, store_url: str | None, as_json: bool, prices_file: str | None) -> None:
    """``show --timeline``: from the session's outline, the waterfall printed a page of
    loops at a time (`outline_timeline`), so a huge session is never whole in memory."""
    with open_cli_store(store_url, read_only=True) as store:
        outline = store.load_outline(session_id_argument(session_id))
        span = outline_span(outline, store)  # it may read loops: once
        pages = outline_timeline(store, outline, span=span)
        if as_json:
            echo_json(to_builtins([bar for page in pages for bar in page]))
            return
        pricer = cli_pricer(prices_file)
        cost = pricer.outline(outline)
        console = stdout()
        console.print(render.session_header(outline.session, summarize_outline(outline), cost))
        _note_unknown_costs(pricer, [cost])
        console.print()
        for number, bars in enumerate(pages):
            console.print(render.timeline_table(bars, console.width, span, header=number == 0))


@main.command()
@click.argument("session_id", metavar="ID")
@store_options
def tree(session_id: str, store_url: str | None, as_json: bool) -> None:
    """Show the spawn graph of sub-agent sessions.

    The session, the sub-agent sessions its tools spawned, theirs, and so on,
    loaded from the store (a child missing from the store is marked).
    """
    with open_cli_store(store_url, read_only=True) as store:
        root = load_cli_session(store, session_id)
        graph = spawn_graph(store, root)
    if as_json:
        echo_json(render.spawn_node_json(graph))
        return
    console = stdout()
    parent = root.parent_spawn_ref
    if parent is not None:
        console.print(
            render.plain(
                f"(spawned by session {render.ident(parent.parent_session_id)} via {parent.tool_name})", "dim"
            )
        )
    console.print(render.spawn_tree(graph))


@main.command()
@click.argument("session_id", metavar="ID")
@click.argument("loop_id", metavar="LOOP_ID")
@store_options
def context(session_id: str, loop_id: str, store_url: str | None, as_json: bool) -> None:
    """The messages needed to resume from LOOP_ID.

    LOOP_ID is a loop id, or #N for the N-th loop as 'show' numbers them.

    The messages of every loop from the root down to LOOP_ID, following each
    loop's parent, in order; a loop with a compaction block contributes the
    block instead of its messages. A compaction pass recorded from events stores
    no block (its events carry only token counts): its context is uncompacted.
    """
    with open_cli_store(store_url, read_only=True) as store:
        session = load_cli_session(store, session_id)
    loop_id = find_loop(session, loop_id).loop_id
    index = session.loop_index()
    messages = session.context_at(loop_id, index=index)
    if as_json:
        echo_json([msgspec.Raw(encode_message(message)) for message in messages])
        return
    console = stdout()
    for message in messages:
        console.print(render.message_view(message))
    note = render.count(len(messages), "message")
    chain = [index.get(chain_id) for chain_id in session.loop_chain_to(loop_id, index=index)]
    if any(
        record is not None
        and record.kind.kind == "Compaction"
        and not isinstance(record.compaction_block, CompactionBlock)
        for record in chain
    ):
        note += " (uncompacted: the compaction pass stored no compaction block)"
    stderr().print(note, style="dim")


# -- stats ------------------------------------------------------------------------------------


@main.command()
@click.option(
    "--by",
    "group_by",
    default="agent",
    show_default=True,
    metavar="|".join(GROUP_BYS),
    help="Group usage by agent, by model (provider/model serving each call) or by UTC day of creation.",
)
@prices_option
@store_options
def stats(group_by: str, store_url: str | None, as_json: bool, prices_file: str | None) -> None:
    """Token usage and cost totals, grouped by agent, model or day.

    Cost is priced now from the stored usage: each model call at its model's price
    (and tier) when the call was made.
    """
    try:
        by = parse_group_by(group_by)
    except InvalidQuery as error:
        raise _option_error(error, {"group_by": "--by"}) from None
    pricer = cli_pricer(prices_file)
    with open_cli_store(store_url, read_only=True) as store:
        totals = store.usage_totals(by, pricer=pricer)
    if as_json:
        echo_json(to_builtins(totals))
    elif totals:
        console = stdout()
        console.print(render.usage_totals_table(totals, by, console.width))
        _note_unknown_costs(pricer, [row.cost for row in totals if isinstance(row.cost, Cost)])
    else:
        stderr().print("no sessions", style="dim")


# -- search -------------------------------------------------------------------------------------


@main.command()
@click.argument("text")
@_filter_options
@click.option(
    "--limit", metavar="N", default=str(DEFAULT_LIMIT), show_default=True, help="Show at most N hits."
)
@store_options
def search(text: str, limit: str, store_url: str | None, as_json: bool, **filters: str | None) -> None:
    """Find where agents said TEXT: message text, thinking, tool calls and tool results.

    Every word of TEXT must occur (whole words, any case) in one text. Hits come
    newest session first (see --order), with the matched words highlighted.
    """
    query = _session_query(filters)
    hit_limit = _session_query({"limit": limit}).limit
    with open_cli_store(store_url, read_only=True) as store:
        hits = store.search(text, query, DEFAULT_LIMIT if hit_limit is None else hit_limit)
    if as_json:
        echo_json(to_builtins(hits))
    elif hits:
        console = stdout()
        console.print(render.search_hits_table(hits, console.width))
    else:
        stderr().print("no matches", style="dim")


# -- record -------------------------------------------------------------------------------------


class _LineSource:
    """The input of ``record``: a file or stdin, read as bytes line by line."""

    def __init__(self, name: str) -> None:
        self.name = "stdin" if name == "-" else name
        self.size: int | None = None
        if name == "-":
            self.stream: IO[bytes] = sys.stdin.buffer
            return
        path = Path(name)
        if path.is_dir():
            raise CliError(f"{name}: is a directory, expected a JSONL event file", EXIT_USAGE)
        try:
            self.stream = path.open("rb")
        except OSError as error:
            raise path_error(name, error) from None
        self.size = path.stat().st_size

    def close(self) -> None:
        if self.name != "stdin":
            self.stream.close()

    def may_wait(self) -> bool:
        """Whether a read may wait for input (a pipe, a terminal), unlike a regular file's."""
        try:
            return not stat.S_ISREG(os.fstat(self.stream.fileno()).st_mode)
        except (OSError, ValueError):  # a stream without a descriptor: anything
            return True

    def is_file(self, path: str) -> bool:
        """Whether `path` is the file read (stdin redirected from it too)."""
        try:
            return os.path.samestat(os.fstat(self.stream.fileno()), os.stat(path))
        except (OSError, ValueError):  # no such file, or a stream without a descriptor
            return False


class _LineConsumer(Protocol):
    def on_json(self, data: bytes | str) -> None: ...


class _RejectedLines:
    """The ``--rejected`` file (None: not asked for): every input line that could not be
    recorded, byte for byte, its line end included, so the file is those lines of the input."""

    def __init__(self, path: str | None, file: IO[bytes] | None) -> None:
        self.path, self.file = path, file
        self.kept = 0
        self.error: str | None = None  # why they are not all kept

    def keep(self, line: bytes) -> None:
        if self.file is None or self.error is not None:
            return
        try:
            self.file.write(line)
        except OSError as error:
            self.error = error.strerror or str(error)
            return
        self.kept += 1

    def close(self) -> None:
        if self.file is None:
            return
        try:
            self.file.close()  # closing flushes: a full disk shows up here
        except OSError as error:
            self.error = self.error or error.strerror or str(error)

    def outcome(self, malformed: int) -> str:
        """What became of the `malformed` lines skipped, for the summary line."""
        if not malformed:
            return ""
        if self.path is None:
            return ", not kept (--rejected FILE keeps them)"
        if self.error is not None:
            return f", NOT kept in {self.path}: {self.error}"
        return f", {render.count(self.kept, 'line')} kept in {self.path}"


class _CtrlC:
    """Ctrl-C (SIGINT) while ``record`` runs, once `installed`.

    The first one stops the reading: the line in hand is still recorded whole, then no
    other is read (`stopped`); only a read that may wait for input (a pipe, a terminal)
    is ended at once, by a KeyboardInterrupt, as nothing else would end it. Later ones
    are only counted, so that what was read is still saved, until `abortable`: from then
    on a second one gives the save up (KeyboardInterrupt). Ctrl-C hits a whole pipeline,
    so ``tail -f x | phi-session record -`` often reads the end of its input before the
    signal is handled: that must not cost what was read.
    """

    def __init__(self) -> None:
        self.signals = 0
        self.waiting = False  # in a read that may wait for input
        self._abortable = False

    @property
    def stopped(self) -> bool:
        return self.signals > 0

    def __call__(self, signum: int, frame: object) -> None:
        self.signals += 1
        if self.waiting:
            self.waiting = False
            raise KeyboardInterrupt
        if self._abortable and self.signals > 1:
            raise KeyboardInterrupt

    def read_line(self, stream: IO[bytes], may_wait: bool) -> bytes:
        """The next line of `stream` (b"" at its end); a Ctrl-C ends a wait for it."""
        self.waiting = may_wait
        try:
            return stream.readline()
        finally:
            self.waiting = False

    def abortable(self) -> None:
        """From now on a second Ctrl-C gives up (one already given: now)."""
        self._abortable = True
        if self.signals > 1:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator[_CtrlC]:
        previous = signal.getsignal(signal.SIGINT)
        if previous is signal.SIG_IGN:  # (a background job's): Ctrl-C is not for it
            yield self
            return
        try:
            signal.signal(signal.SIGINT, self)
        except ValueError:  # not the main thread: Python's own KeyboardInterrupt stays
            yield self
            return
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)

    def interrupted_at(self, outcome: dict[str, Any]) -> int | None:
        """The line after which the reading was stopped (the last one, for a Ctrl-C that
        came after the input ended); None: no Ctrl-C."""
        at: int | None = outcome["interrupted_at"]
        return outcome["lines"] if at is None and self.signals else at


def _record_stream(
    source: _LineSource,
    recorder: _LineConsumer,
    progress: Progress | None,
    ctrl_c: _CtrlC,
    spill: Callable[[], object] | None = None,
    rejected: _RejectedLines | None = None,
) -> dict[str, Any]:
    """Feed every non-empty line to the recorder; malformed lines are reported, skipped
    and kept in `rejected`.

    Every `_SPILL_EVERY` lines `spill()` saves the finished sessions, so memory stays
    bounded on long streams. Ctrl-C stops the reading, not the recording: what was
    read is still flushed and saved by the caller (``interrupted_at`` says after which
    line); a later one is counted by `ctrl_c`.
    """
    task = progress.add_task("recording", total=source.size) if progress is not None else None
    outcome: dict[str, Any] = {
        "events": 0,
        "malformed_lines": 0,
        "errors": [],
        "interrupted_at": None,
        "lines": 0,
        "session_file": False,
    }
    consumed = number = 0  # number: the lines handled whole (recorded or skipped)
    may_wait = source.may_wait()
    try:
        while not ctrl_c.stopped:
            line = ctrl_c.read_line(source.stream, may_wait)
            if not line:
                break
            consumed += len(line)
            # A BOM (Windows editors write one) is no part of the first event.
            data = (line.removeprefix(codecs.BOM_UTF8) if number == 0 else line).strip()
            if data and not (outcome["events"] or outcome["malformed_lines"]):  # the first
                if _is_session_file(source, data, may_wait):
                    outcome["session_file"] = True
                    break
            if data and not _record_line(recorder, data, number + 1, source.name, outcome) and rejected:
                rejected.keep(line)
            number += 1
            if progress is not None and task is not None and number % 512 == 0:
                progress.update(task, completed=consumed)
            if spill is not None and number % _SPILL_EVERY == 0:
                spill()
        if ctrl_c.stopped:
            outcome["interrupted_at"] = number
    except KeyboardInterrupt:  # a read ended by Ctrl-C, or one not sent through ctrl_c
        outcome["interrupted_at"] = number
    outcome["lines"] = number
    if progress is not None and task is not None:
        progress.update(task, completed=consumed)
    hidden = outcome["malformed_lines"] - len(outcome["errors"])
    if hidden:
        warn(f"{source.name}: {render.count(hidden, 'more malformed line')} skipped, not shown")
    return outcome


def _is_session_file(source: _LineSource, first: bytes, may_wait: bool) -> bool:
    """Whether the input, `first` its first line holding anything, is a session file (or a
    JSON array of them, ``export --format json``'s output) rather than an event stream.
    Looked into only when that line is no event; a stream that may wait for input is
    not read on for it (one line holding a whole session is still found)."""
    if first[:1] not in (b"{", b"["):
        return False
    try:
        decode_event(first)
        return False
    except DecodeError:
        pass
    try:
        decode_json(first)
    except DecodeError:
        # Not JSON on its own (or nested too deep to read): a pretty-printed file starts
        # with a bracket alone on its line, which a file is read whole for; any other line
        # is a broken one of a stream, whose size is not to be held in memory to tell.
        if may_wait or first.strip() not in (b"{", b"["):
            return False
        at = source.stream.tell()
        whole = first + source.stream.read()
        source.stream.seek(at)
    else:
        # One line holding a whole value: a session file only if nothing else follows
        # (a header line some tools write before their events is not one).
        if not may_wait and not _only_whitespace_follows(source.stream):
            return False
        whole = first
    try:
        sessions = _read_sessions(whole)
    except DecodeError:
        return False
    return bool(sessions) and all(isinstance(session, Session) for session in sessions)


def _only_whitespace_follows(stream: IO[bytes]) -> bool:
    """Whether `stream` (a file) holds nothing but whitespace from where it is; read in
    chunks, stopping at the first other byte, then put back where it was."""
    at = stream.tell()
    try:
        while chunk := stream.read(1 << 16):
            if chunk.strip():
                return False
        return True
    finally:
        stream.seek(at)


def _record_line(
    recorder: _LineConsumer, data: bytes, number: int, name: str, outcome: dict[str, Any]
) -> bool:
    """Whether the line was recorded (else it is reported and counted)."""
    try:
        recorder.on_json(data)
    except DecodeError as error:
        outcome["malformed_lines"] += 1
        if outcome["malformed_lines"] <= MAX_REPORTED_LINES:
            outcome["errors"].append({"line": number, "error": str(error)})
            warn(f"{name}: line {number:,}: skipped: {error}")
        return False
    outcome["events"] += 1
    return True


class _OrphansFile:
    """The ``--orphans`` file: takes events, one JSON line each, and counts them."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file = file
        self.events = 0

    def __call__(self, events: Iterable[AgentEvent]) -> None:
        lines = [encode_event(event) + b"\n" for event in events]
        self.file.writelines(lines)
        self.events += len(lines)


def _check_output_file(
    option: str, path: str, lines: _LineSource, store_url: str | None, directory: str | None
) -> None:
    """Opening the file of `option` empties it: never the input nor a file of the store."""
    if lines.is_file(path):
        raise CliError(f"{option} {path}: the input it records; write elsewhere", EXIT_USAGE)
    refuse_store_file(option, path, store_url, directory)


def _open_output_file(path: str) -> IO[bytes]:
    """Opened (created) before any input is consumed: an unwritable path must fail now,
    not after the stream is gone. Closed by the caller's ExitStack."""
    try:
        return open(path, "wb")
    except OSError as error:
        raise path_error(path, error) from None


def _output_file_option(name: str, dest: str, what: str, form: str) -> Callable[[F], F]:
    """An option naming a file `record` writes what it cannot store into."""
    return click.option(
        name,
        dest,
        metavar="FILE",
        type=OutputFile(dash=False),
        help=f"Write {what} to FILE ({form}; created, empty if there are none, before any input "
        "is read; never the input, a store file or stdout, which has the summary).",
    )


def _open_rejected(path: str | None) -> _RejectedLines:
    """The ``--rejected`` file, once `_check_output_file` passed it; close it when done."""
    return _RejectedLines(path, _open_output_file(path) if path else None)


@main.command()
@click.argument("source", metavar="FILE|-")
@click.option(
    "--dir",
    "directory",
    metavar="DIR",
    type=click.Path(file_okay=False),
    help="Store the sessions as phi-core JSON files in DIR (created if missing).",
)
@click.option("--include-streaming-events", is_flag=True, help="Also store MessageUpdate deltas.")
@click.option("--capture-turn-requests", is_flag=True, help="Copy TurnRequest payloads into their turns.")
@_output_file_option(
    "--orphans",
    "orphans_path",
    "events that belong to no known loop, and those of a session no store accepts",
    "JSONL",
)
@_output_file_option(
    "--rejected",
    "rejected_path",
    "every input line that could not be recorded (malformed, unknown event type)",
    "byte for byte; not the --orphans file",
)
@click.option(
    "--to",
    "broker_url",
    metavar="NATS_URL",
    help="Publish the events to NATS JetStream (nats://HOST[:PORT]) for 'phi-session ingest' "
    "workers instead of recording them here.",
)
@store_options
def record(
    source: str,
    directory: str | None,
    include_streaming_events: bool,
    capture_turn_requests: bool,
    orphans_path: str | None,
    rejected_path: str | None,
    broker_url: str | None,
    store_url: str | None,
    as_json: bool,
) -> None:
    """Record a JSONL event stream into the store.

    FILE (or - for stdin) is phi-core's event stream, one JSON event per line.
    Every session is saved to the store (merged with what is stored under its
    id) and summarised in one line. A malformed line is reported with its number
    (the first 20; later ones are counted) and skipped, and kept byte for byte in
    the --rejected file if one is given (also with --to); everything else is
    recorded. No valid line at all is an error (exit status 1), and leaves no new
    store behind. Ctrl-C stops reading and saves what was read (exit 130); a
    second one gives up the save, saying how many sessions were saved.

    With --to nats://HOST the events are published to JetStream instead (stream
    and partitions from $PHI_SESSION_NATS_*), and the command ends once the broker
    acknowledged them all. An event over the broker's max_payload goes in pieces; one
    it cannot take even so is set aside as a file in .phi-session/spill/rejected, and
    the command then fails (exit status 1). A broker that cannot be reached fails it
    at once: the events are kept in
    .phi-session/spill, and the next 'record --to' from this directory sends them.
    """
    if broker_url is not None:
        if directory is not None or store_url is not None or orphans_path is not None:
            raise CliError(
                "--to publishes to a broker: --store, --dir and --orphans do not apply", EXIT_USAGE
            )
        _publish(source, broker_url, as_json, rejected_path)
        return
    recorder = SessionRecorder(
        SessionRecorderConfig(
            include_streaming_events=include_streaming_events, capture_turn_requests=capture_turn_requests
        )
    )
    with contextlib.ExitStack() as cleanup:
        # The input first: a missing one must leave no new store nor emptied output file.
        lines = _LineSource(source)
        cleanup.callback(lines.close)
        if orphans_path:
            _check_output_file("--orphans", orphans_path, lines, store_url, directory)
        if rejected_path:
            _check_output_file("--rejected", rejected_path, lines, store_url, directory)
            if orphans_path and Path(orphans_path).resolve() == Path(rejected_path).resolve():
                raise CliError(f"--rejected {rejected_path}: the --orphans file; write elsewhere", EXIT_USAGE)
        orphans_file = cleanup.enter_context(_open_output_file(orphans_path)) if orphans_path else None
        rejected = _open_rejected(rejected_path)
        cleanup.callback(rejected.close)
        store, discard_store = cleanup.enter_context(open_new_cli_store(store_url, directory))
        orphans_out = _OrphansFile(orphans_file) if orphans_file is not None else None
        saved: dict[str, None] = {}  # ids of every session saved, in order
        # Sessions no store accepts join the orphans; a failed save is reported by the saver.
        saver = SessionSaver(
            store, orphans=orphans_out, on_saved=lambda session: saved.setdefault(session.session_id)
        )

        def spill(*, final: bool = False) -> list[Session]:
            return saver.drain(recorder, flush=final)

        ctrl_c = _CtrlC()
        try:
            with ctrl_c.installed():
                if sys.stderr.isatty() and not as_json:
                    columns = (
                        TextColumn("{task.description}"),
                        BarColumn(),
                        DownloadColumn(),
                        TimeElapsedColumn(),
                    )
                    with Progress(*columns, console=stderr(), transient=True) as progress:
                        outcome = _record_stream(lines, recorder, progress, ctrl_c, spill, rejected)
                else:
                    outcome = _record_stream(lines, recorder, None, ctrl_c, spill, rejected)
                ctrl_c.abortable()
                rejected.close()
                spilled = bool(saved)
                sessions = spill(final=True)
        except KeyboardInterrupt:  # Ctrl-C again: the user gives up what is not saved yet
            left = {session.session_id for session in (*saver.pending, *saver.unsaved, *recorder.sessions())}
            whole = sum(session_id not in left for session_id in saved)
            warn(
                f"interrupted again: the save was given up ({render.count(whole, 'session')} saved, "
                f"{render.count(len(left), 'session')} not saved)"
            )
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
        outcome["interrupted_at"] = ctrl_c.interrupted_at(outcome)
        if outcome["events"] == 0:
            discard_store()
        # Summarised from what the store now holds for every session touched, each
        # outline in turn (loops bare): memory stays bounded whatever the stream's length.
        summaries = (
            [summarize_outline(store.load_outline(sid)) for sid in saved]
            if spilled
            else [summarize(session) for session in sessions]
        )
        unsaved = saver.unsaved
        if outcome["interrupted_at"] is not None:
            warn(f"interrupted after line {outcome['interrupted_at']:,}: what was read is recorded and saved")
        orphans = recorder.orphans()
        orphans_lost = False
        where = "not stored (use --orphans FILE to keep them)"
        orphaned_sessions, orphaned_events = saver.stats().orphaned, 0  # (no sink: none orphaned)
        if orphans_out is not None:
            orphaned_events = orphans_out.events
            try:
                orphans_out(orphan.event for orphan in orphans)
                orphans_out.file.close()  # closing flushes: a full disk shows up here
                where = f"written to {orphans_path}"
            except OSError as error:
                orphans_lost = True
                where = f"NOT written to {orphans_path}: {error.strerror or error}"
        if orphaned_sessions:
            warn(
                f"warning: {render.count(orphaned_sessions, 'session')} no store accepts "
                f"({render.count(orphaned_events, 'event')}): {where}"
            )
        if orphans:
            warn(f"warning: {render.count(len(orphans), 'event')} belonged to no known loop: {where}")
    if outcome["session_file"]:  # (raised once the store made for it was discarded)
        raise CliError(
            f"{lines.name}: a session file, not an event stream: import it with '{PROG} import FILE'"
        )
    totals = {
        "sessions": len(summaries),
        "loops": sum(row.loop_count for row in summaries),
        "turns": sum(row.turn_count for row in summaries),
        "total_tokens": sum(row.total_tokens for row in summaries),
        "events": outcome["events"],
        "malformed_lines": outcome["malformed_lines"],
        "malformed_lines_kept": rejected.kept if rejected.error is None else 0,
        "orphan_events": orphaned_events + len(orphans),
        "unsaved_sessions": len(unsaved),
        "interrupted_at_line": outcome["interrupted_at"],
    }
    if as_json:
        echo_json(
            {
                "sessions": [render.summary_record(row) for row in summaries],
                "totals": totals,
                "errors": outcome["errors"],
            }
        )
    else:
        console = stdout()
        for row in summaries:  # one line each, whatever the width: scripts read these
            console.print(render.summary_text(row), soft_wrap=True)
        console.print(
            Text(
                f"total: {render.count(totals['sessions'], 'session')}, "
                f"{render.count(totals['loops'], 'loop')}, "
                f"{render.count(totals['turns'], 'turn')}, {render.count(totals['total_tokens'], 'token')} "
                f"from {render.count(totals['events'], 'event')}; "
                f"{render.count(totals['malformed_lines'], 'malformed line')} skipped"
                f"{rejected.outcome(totals['malformed_lines'])}",
                style="bold",
            ),
            soft_wrap=True,
        )
        if outcome["events"]:
            _note_default_store(store_url, directory)
    if outcome["interrupted_at"] is not None:
        raise click.exceptions.Exit(EXIT_INTERRUPTED)
    if outcome["events"] == 0:
        raise CliError(f"nothing recorded: {lines.name} holds no valid event line")
    if unsaved or orphans_lost or rejected.error is not None:
        raise click.exceptions.Exit(EXIT_FAILURE)


# -- import / export ---------------------------------------------------------------------------


def _session_files(path: Path) -> list[Path]:
    if path.is_dir():
        # Only `*.json`: lock sidecars and temporary files have another final suffix.
        return sorted(p for p in path.iterdir() if p.suffix == ".json" and p.is_file())
    return [path]


def _read_sessions(data: bytes) -> list[Session | DecodeError]:
    """The sessions of one file: a phi-core session, or a JSON array of them (``export``'s output).

    An array item that is no session is its error, naming the item, in its place: the
    others are still imported. An event stream (JSONL) gets an error that points to ``record``.
    """
    if data.lstrip()[:1] == b"[":
        try:
            items = decode_json(data, list[msgspec.Raw])
        except DecodeError as error:
            raise DecodeError(f"not a JSON array of sessions: {error}") from None
        read: list[Session | DecodeError] = []
        for number, item in enumerate(items, start=1):
            try:
                read.append(decode_session(bytes(item)))
            except DecodeError as error:
                read.append(DecodeError(f"session {number} of {len(items)}: {error}"))
        return read
    try:
        return [decode_session(data)]
    except DecodeError as error:
        try:
            decode_event(data.lstrip().split(b"\n", 1)[0])
        except DecodeError:
            raise error from None  # the session's error: the file is no event stream either
        raise DecodeError(
            f"an event stream (JSONL), not a session file: record it with '{PROG} record FILE'"
        ) from None


@main.command("import")
@click.argument("paths", metavar="PATH...", nargs=-1, required=True)
@store_options
def import_command(paths: tuple[str, ...], store_url: str | None, as_json: bool) -> None:
    """Import phi-core session files or directories of them.

    A file holds one session, or a JSON array of sessions (what export --format
    json writes for several ids). A directory contributes every *.json file
    directly in it. A session already stored under the same id is merged (no
    stored loop is lost). A file that cannot be read is reported and skipped
    (exit status 1), and so is a session of an array that cannot be read or
    stored (the others are imported); importing nothing leaves no new store behind. An event stream
    (export --format jsonl) is recorded with record, not imported.
    """
    if "" in paths:  # as from "$UNSET": it would import every *.json of the working directory
        raise CliError("PATH: empty path; give a session file or a directory of them", EXIT_USAGE)
    imported: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    with open_new_cli_store(store_url) as (store, discard_store), saver_errors_reported_by_the_command():
        saver = SessionSaver(store)
        for name in paths:
            path = Path(name)
            if not path.exists():
                errors.append({"path": name, "error": os.strerror(errno.ENOENT)})
                continue
            for file in _session_files(path):
                try:
                    sessions = _read_sessions(file.read_bytes().removeprefix(codecs.BOM_UTF8))
                except (OSError, PhiSessionError) as error:
                    message = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
                    errors.append({"path": str(file), "error": message})
                    continue
                for session in sessions:
                    try:  # an unreadable array item; an unsafe id, checked here: the saver would log it too
                        if isinstance(session, DecodeError):
                            raise session
                        validate_session_id(session.session_id)
                    except (DecodeError, InvalidSessionId) as error:
                        errors.append({"path": str(file), "error": str(error)})
                        continue
                    outcome = saver.save(session)
                    if outcome.saved:
                        imported.append(
                            {"path": str(file), "session_id": session.session_id, "loops": len(session.loops)}
                        )
                    else:
                        errors.append(
                            {
                                "path": str(file),
                                "error": f"session {render.ident(session.session_id)} not saved: "
                                f"{outcome.error}",
                            }
                        )
        if not imported:
            discard_store()
    for failure in errors:
        warn(f"error: {failure['path']}: {failure['error']}")
    if as_json:
        echo_json({"imported": imported, "errors": errors})
    else:
        console = stdout()
        for row in imported:
            console.print(
                render.plain(
                    f"imported {render.ident(row['session_id'])} ({render.count(row['loops'], 'loop')}) "
                    f"from {row['path']}"
                ),
                soft_wrap=True,
            )
        console.print(
            Text(f"{render.count(len(imported), 'session')} imported, {len(errors):,} failed", style="bold")
        )
        if imported:
            _note_default_store(store_url)
    if errors:
        raise click.exceptions.Exit(EXIT_FAILURE)


@main.command()
@click.argument("session_ids", metavar="ID...", nargs=-1, required=True)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["json", "jsonl"]),
    default="json",
    show_default=True,
    help="json: phi-core session JSON (import reads it back); jsonl: the stored event "
    "stream (record reads it back).",
)
@click.option(
    "-o",
    "--output",
    metavar="FILE",
    type=OutputFile(dash=True),
    help="Write to FILE instead of stdout (- is stdout; never a file of the store it reads).",
)
@store_options
def export(
    session_ids: tuple[str, ...], fmt: str, output: str | None, store_url: str | None, as_json: bool
) -> None:
    """Export sessions as phi-core JSON or as a JSONL event stream.

    json: one ID gives its session file exactly as stored (phi-core's bytes, with
    no final newline: a terminal alone gets one, for its prompt); several give a
    JSON array of sessions (an ID given twice, once). jsonl: every loop's stored
    events, one compact phi-core event per line, in time order across loops and
    sessions, with each parallel group's ParallelLoopStart/End (rebuilt
    from its loops when the session file does not keep them; a group that never
    ended, only its start, for its branches that never started), so that record
    rebuilds the same sessions.
    --json is accepted for uniformity; both formats are JSON already.
    """
    del as_json  # both formats are machine-readable already
    if output == "-":
        output = None
    with open_cli_store(store_url, read_only=True) as store:
        if output is not None:
            refuse_store_file("-o", output, store_url)
        # An id given twice is exported once: its events twice would record another session.
        sessions = [load_cli_session(store, session_id) for session_id in dict.fromkeys(session_ids)]
    if fmt == "jsonl":
        exported = {session.session_id for session in sessions}
        for session in sessions:
            spawn = session.parent_spawn_ref
            if spawn is not None and spawn.parent_session_id not in exported:
                # The tool call that spawned it is in its parent's events only.
                warn(
                    f"warning: sub-agent session {session.session_id!r} is exported without its parent "
                    f"{spawn.parent_session_id!r}: record rebuilds it without the tool call that spawned it"
                )
        chunks: Iterable[bytes] = (
            encode_event(event) + b"\n" for event in event_stream(sessions, parallel_groups=True)
        )
    elif len(sessions) == 1:
        # Exactly phi-core's file, which has no final newline; on a terminal the prompt would follow it.
        on_terminal = output is None and sys.stdout.isatty()
        chunks = [encode_session(sessions[0]), *([b"\n"] if on_terminal else [])]
    else:
        chunks = [b"[\n", b",\n".join(encode_session(s) for s in sessions), b"\n]\n"]
    try:
        if output is None:
            out = sys.stdout.buffer
            out.writelines(chunks)
            out.flush()
        else:
            with open(output, "wb") as file:
                file.writelines(chunks)
    except BrokenPipeError:
        raise  # the reader went away (`| head`): the command group ends quietly
    except OSError as error:  # a write error (full disk) does not name its file
        raise path_error(output or "stdout", error) from None


# -- rm -----------------------------------------------------------------------------------------


@main.command()
@click.argument("session_ids", metavar="ID...", nargs=-1, required=True)
@store_options
def rm(session_ids: tuple[str, ...], store_url: str | None, as_json: bool) -> None:
    """Delete sessions. Missing ids are reported (exit status 1); the others are deleted.

    A malformed id is a usage error (exit status 2) that deletes nothing: every id is
    checked before the first deletion.
    """
    # An id given twice, once (it was both removed and missing).
    valid_ids = [session_id_argument(session_id) for session_id in dict.fromkeys(session_ids)]
    removed: list[str] = []
    missing: list[str] = []
    with open_cli_store(store_url, must_exist=True) as store:
        for session_id in valid_ids:
            try:
                store.delete(session_id)
            except SessionNotFound as error:
                missing.append(session_id)
                warn(f"error: {error}")
                continue
            removed.append(session_id)
    if as_json:
        echo_json({"removed": removed, "missing": missing})
    else:
        for session_id in removed:
            stdout().print(render.plain(f"removed {render.ident(session_id)}"), soft_wrap=True)
    if missing:
        raise click.exceptions.Exit(EXIT_FAILURE)


# -- demo / serve -------------------------------------------------------------------------------


@main.command()
@click.option(
    "--dir",
    "directory",
    metavar="DIR",
    type=click.Path(file_okay=False),
    help="Store the demo sessions as phi-core JSON files in DIR (created if missing).",
)
@store_options
def demo(directory: str | None, store_url: str | None, as_json: bool) -> None:
    """Record an offline demo scenario and show its loop trees.

    A coding assistant's day on a simulated clock: continuations, a rerun and a
    branch, a parallel evaluation, a sub-agent, a rejection, a compaction and an
    inactivity rotation. Running it again rewrites the same sessions.
    """
    from ..demo import run_demo

    with open_cli_store(store_url, directory) as store:
        sessions = run_demo(store=store, console=None if as_json else stderr())
    if as_json:
        echo_json({"sessions": [render.summary_record(summarize(session)) for session in sessions]})
        return
    console = stdout()
    for session in sessions:
        console.print(render.loop_tree(session, loop_forest(session), details=False))
    console.print(
        Text(
            f"{render.count(len(sessions), 'demo session')} stored; try: {PROG} list, {PROG} serve",
            style="bold",
        )
    )
    _note_default_store(store_url, directory)


@main.command()
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. Anything but loopback exposes every session to the network.",
)
@click.option(
    "--port",
    default=8765,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port (0: pick a free one).",
)
@click.option(
    "--otlp",
    is_flag=True,
    help="Also receive OpenTelemetry traces (OTLP/HTTP, POST /v1/traces) and record them as "
    "sessions (needs pip install 'phi-session[otlp]').",
)
@click.option(
    "--otlp-port",
    default=4318,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port of the OTLP receiver (0: pick a free one); it listens on --host.",
)
@click.option(
    "--otlp-state",
    metavar="DIR",
    default=".phi-session/otlp",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the OTLP receiver keeps its journal and spool (what it acknowledged survives a crash).",
)
@prices_option
@store_options
def serve(
    host: str,
    port: int,
    otlp: bool,
    otlp_port: int,
    otlp_state: str,
    store_url: str | None,
    as_json: bool,
    prices_file: str | None,
) -> None:
    """Serve the read-only web viewer over the store (Ctrl-C stops it).

    With --otlp, also record the traces of any OpenTelemetry GenAI-instrumented agent
    sent to http://HOST:OTLP_PORT/v1/traces (set OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318).
    """
    from ..web.server import make_server

    if otlp:
        _require_otlp()  # before the store is opened to write: a missing extra makes none
    pricer = cli_pricer(prices_file)  # the viewer's costs are list's, show's and stats'
    with open_cli_store(store_url, read_only=not otlp) as store, contextlib.ExitStack() as cleanup:
        try:
            server = make_server(store, host=host, port=port, pricer=pricer)
        except OSError as error:
            raise CliError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
        cleanup.callback(server.server_close)
        addresses = {"url": server.url}
        if otlp:
            addresses["otlp_url"] = _start_otlp(store, host, otlp_port, otlp_state, cleanup)
        if as_json:
            click.echo(msgspec.json.encode(addresses).decode())
        else:
            stderr().print(f"phi-session viewer on {server.url}  (Ctrl-C to stop)")
            if otlp:
                stderr().print(f"OTLP/HTTP traces to {addresses['otlp_url']}")
        if not server.host_guard.loopback_only:
            warn(f"warning: listening on {host}: anyone who can reach it can read every session")
        with contextlib.suppress(KeyboardInterrupt):
            _stop_on_sigterm()
            server.serve_forever()


def _stop_on_sigterm() -> None:
    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


def _require_otlp() -> None:
    from ..errors import MissingExtra
    from ..otel._sdk import require_proto, require_sdk

    try:
        require_sdk("serve --otlp", "otlp")  # (the otel extra lacks the protobuf package)
        require_proto()
    except MissingExtra as error:
        raise CliError(str(error)) from None


def _start_otlp(store: SessionStore, host: str, port: int, state: str, cleanup: contextlib.ExitStack) -> str:
    """Start the OTLP receiver in a thread; `cleanup` stops it and saves what it holds."""
    import threading

    from ..otel.endpoint import OtlpEndpoint, make_otlp_server

    made = new_directories(Path(state).absolute())
    endpoint = OtlpEndpoint(store, state)
    try:
        receiver = make_otlp_server(endpoint, host=host, port=port)
    except OSError as error:
        endpoint.close()
        _remove_unused_state(made)
        raise CliError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    cleanup.callback(endpoint.close)
    cleanup.callback(receiver.server_close)
    cleanup.callback(receiver.shutdown)
    threading.Thread(target=receiver.serve_forever, name="phi-session otlp", daemon=True).start()
    return receiver.url


def _remove_unused_state(made: list[Path]) -> None:
    """Removes the state directory of a receiver that never started, made with the
    directories holding it (`made`, innermost first), unless it holds data."""
    if not made or any(path.is_file() and path.stat().st_size for path in made[0].rglob("*")):
        return
    with contextlib.suppress(OSError):
        shutil.rmtree(made[0])
        for parent in made[1:]:
            parent.rmdir()


# -- the broker -------------------------------------------------------------------------------


class _Publisher:
    """``record --to``: each valid line is published, as the recorder would have taken it."""

    def __init__(self, sink: Callable[[Any], None]) -> None:
        self.sink = sink

    def on_json(self, data: bytes | str) -> None:
        self.sink(decode_event(data))


def _publish(source: str, url: str, as_json: bool, rejected_path: str | None) -> None:
    from ..broker import JetStreamSink
    from ..broker.sink import backlog_logger

    try:
        sink = JetStreamSink(url)
    except ValueError as error:
        raise CliError(f"--to: {error}", EXIT_USAGE) from None
    with contextlib.ExitStack() as cleanup:
        # What waits for the broker, and why, is the command's own last line; a spill
        # journal's failure is the sink's error (`close`: events lost).
        cleanup.enter_context(reported_by_the_command(backlog_logger.name))
        cleanup.enter_context(reported_by_the_command("phi_session.journal"))
        # The flush below is the one wait: closing only spills what it left.
        cleanup.callback(sink.close, 0)
        lines = _LineSource(source)
        cleanup.callback(lines.close)
        if rejected_path:
            _check_output_file("--rejected", rejected_path, lines, None, None)
        rejected = _open_rejected(rejected_path)
        cleanup.callback(rejected.close)
        ctrl_c = _CtrlC()
        with ctrl_c.installed():
            try:
                outcome = _record_stream(lines, _Publisher(sink), None, ctrl_c, rejected=rejected)
            finally:
                lines.close()
                rejected.close()
                ctrl_c.abortable()  # (Ctrl-C again: what is not sent is only spilled, by `close`)
                sent = sink.flush(timeout=60, fail_fast=True)
    outcome["interrupted_at"] = ctrl_c.interrupted_at(outcome)
    stats = sink.stats()
    unreachable = None if sent else sink.unreachable
    if as_json:
        echo_json(
            {
                "events": outcome["events"],
                "published": stats.published,
                "pending": stats.pending,
                "rejected": stats.rejected,
                "malformed_lines": outcome["malformed_lines"],
                "malformed_lines_kept": rejected.kept if rejected.error is None else 0,
                "errors": outcome["errors"],
            }
        )
    elif unreachable is None or stats.published or outcome["malformed_lines"]:
        # (Not when it would only say nothing was published: the error line says why.)
        stdout().print(
            Text(
                f"published {render.count(stats.published, 'event')} to {url} "
                f"({render.count(outcome['malformed_lines'], 'malformed line')} skipped"
                f"{rejected.outcome(outcome['malformed_lines'])})",
                style="bold",
            ),
            soft_wrap=True,
        )
    kept = f"kept in {sink.spill_dir}; the next 'phi-session record --to' from this directory sends them"
    if unreachable is not None:
        message = f"{unreachable}: {render.count(stats.pending, 'event')} {kept}"
        if outcome["interrupted_at"] is None:
            raise CliError(message)
        warn(f"error: {message}")
    elif not sent:
        warn(f"warning: {render.count(stats.pending, 'event')} not acknowledged yet are {kept}")
    if outcome["interrupted_at"] is not None:
        raise click.exceptions.Exit(EXIT_INTERRUPTED)
    if outcome["events"] == 0:
        raise CliError(f"nothing published: {lines.name} holds no valid event line")
    if stats.rejected:
        raise CliError(
            f"{render.count(stats.rejected, 'event')} not published (over the broker's max_payload"
            f" even in pieces): set aside in {sink.rejected_dir}"
        )
    if not sent or rejected.error is not None:
        raise click.exceptions.Exit(EXIT_FAILURE)


_INGEST_OPTIONS = {
    name: f"--{name.replace('_', '-')}"
    for name in ("stream", "subject_prefix", "partitions", "durable", "ack_wait", "idle_timeout")
}
"""`IngestWorker`'s parameters that are ``ingest`` options of the same names."""


def _ingest_error(error: ValueError, store_url: str | None) -> CliError:
    if isinstance(error, InvalidStoreUrl):
        return store_url_error(error, store_url)
    return _option_error(error, _INGEST_OPTIONS)


@main.command()
@click.argument("url", metavar="NATS_URL")
@click.option("--status", is_flag=True, help="Show each partition's lag and owner, then exit.")
@click.option("--stream", help="JetStream stream name (default $PHI_SESSION_NATS_STREAM, else PHI_EVENTS).")
@click.option(
    "--subject-prefix", help="Subject prefix (default $PHI_SESSION_NATS_SUBJECT_PREFIX, else phi.events)."
)
@click.option("--partitions", type=int, help="Partitions, if this creates the stream (default 8).")
@click.option(
    "--durable",
    default="phi-ingest",
    show_default=True,
    help="Consumer name prefix: workers with the same one share the partitions.",
)
@click.option(
    "--ack-wait",
    type=float,
    default=5.0,
    show_default=True,
    metavar="SECONDS",
    help="Redeliver what a worker took but did not acknowledge after SECONDS (the catch-up "
    "delay after a worker dies; set when the consumers are created).",
)
@click.option(
    "--idle-timeout",
    type=float,
    default=3600.0,
    show_default=True,
    metavar="SECONDS",
    help="Abort the open loops of a session no event came for in SECONDS (its agent died) and save it.",
)
@store_options
def ingest(
    url: str,
    status: bool,
    stream: str | None,
    subject_prefix: str | None,
    partitions: int | None,
    durable: str,
    ack_wait: float,
    idle_timeout: float,
    store_url: str | None,
    as_json: bool,
) -> None:
    """Record events from NATS JetStream into a PostgreSQL store, until SIGTERM or Ctrl-C.

    Run one or more on any machines: they share the stream's partitions, each
    event is recorded once, and stopping saves what is complete (the rest is
    picked up by the next worker). A second SIGTERM or Ctrl-C quits at once, not
    waiting for PostgreSQL or NATS (exit status 130; nothing is lost). With
    --status, show each partition's lag.
    """
    import asyncio

    from ..broker import IngestWorker, ingest_status
    from ..stores.urls import postgres_dsn_and_schema, store_path

    target = store_url if store_url is not None else default_store_url()
    try:
        local = store_path(store_url)
    except InvalidStoreUrl as error:
        raise store_url_error(error, store_url) from None
    if local is not None:
        raise CliError(
            f"ingest needs a PostgreSQL store (--store postgresql://...), not {target}", EXIT_USAGE
        )
    dsn, schema = postgres_dsn_and_schema(target)
    schema = schema or "phi_session"
    if status:
        try:
            rows = asyncio.run(
                ingest_status(
                    url, dsn, schema=schema, stream=stream, subject_prefix=subject_prefix, durable=durable
                )
            )
        except ValueError as error:
            raise _ingest_error(error, store_url) from None
        if as_json:
            echo_json([render.partition_status_record(row) for row in rows])
        else:
            stdout().print(render.partition_status_table(rows))
        return
    try:
        worker = IngestWorker(
            url,
            dsn,
            schema=schema,
            stream=stream,
            subject_prefix=subject_prefix,
            partitions=partitions,
            durable=durable,
            ack_wait=ack_wait,
            idle_timeout=idle_timeout,
        )
    except ValueError as error:
        raise _ingest_error(error, store_url) from None

    signals = 0

    def stop() -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            worker.stop()
            return
        # The clean stop waits for PostgreSQL and NATS, which may never answer: a second signal
        # quits at once. Nothing is lost: what was not acknowledged is delivered again, what
        # was staged is replayed by the next worker.
        warn("interrupted")
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop)
        await worker.run()

    started = f"ingesting {worker.settings.stream} from {url} (SIGTERM or Ctrl-C stops, a second one at once)"
    stderr().print(render.plain(started, "dim"), soft_wrap=True)
    asyncio.run(run())
    stats = worker.stats
    if as_json:
        echo_json(
            {
                "received": stats.received,
                "duplicates": stats.duplicates,
                "recorded": stats.recorded,
                "rejected": stats.rejected,
                "sessions_saved": stats.sessions_saved,
            }
        )
    else:
        stdout().print(
            Text(
                f"recorded {render.count(stats.recorded, 'event')} "
                f"({render.count(stats.duplicates, 'duplicate')} dropped, "
                f"{render.count(stats.rejected, 'rejected event')}), "
                f"saved {render.count(stats.sessions_saved, 'session')}",
                style="bold",
            ),
            soft_wrap=True,
        )
