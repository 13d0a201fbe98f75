"""How the command line draws sessions: tables, loop trees, spawn graphs and messages.

Everything taken from a session (messages, tool output, ids) is untrusted: it is
drawn as plain text, with rich markup not interpreted and terminal control
characters shown as escapes, never sent raw to the terminal. Numbers carry
thousands separators and counted nouns their plural.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from .._float32 import Float32
from .._time import Timestamp
from ..codec import encode_event
from ..cost import ZERO_COST, Cost, total
from ..events import AgentEvent
from ..messages import (
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
from ..model import LoopRecord, Session, counted_total, is_replayed
from ..stores.base import SessionSummary, UsageTotal
from ..stores.query import LOOP_STATUSES
from ..stores.search import SearchHit
from ..views import LoopNode, SpawnNode, TimelineBar

STATUS_STYLES = {
    "Completed": "green",
    "Running": "cyan",
    "Pending": "yellow",
    "Aborted": "red",
    "Rejected": "magenta",
}

# C0/C1 control characters (except newline and tab) would let recorded content drive
# the terminal (colours, cursor moves, title changes), and bidirectional controls would
# make it show text in another order than it is stored; all are shown as escapes. The
# viewer shows the bidirectional ones so too (web/static/app.js, BIDI_CONTROLS).
BIDI_CONTROLS = (*range(0x202A, 0x202F), *range(0x2066, 0x206A))
_CONTROL = {
    **{c: f"\\x{c:02x}" for c in (*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0)) if c not in (9, 10)},
    **{c: f"\\u{c:04x}" for c in BIDI_CONTROLS},
}
_ONE_LINE = {**_CONTROL, 10: "\u23ce", 9: " "}
# Ids are what users copy and tell rows apart by: a newline in one drawn raw makes a
# second row, one shown as ⏎ or a tab as a space makes another id; they are escaped
# like every other control character instead, and so is a backslash (as \\, as Python
# does), or an id holding the text \x0a would show as one holding a newline.
_ID = {**_CONTROL, 10: "\\x0a", 9: "\\x09", 0x5C: "\\\\"}


def safe(text: str, *, one_line: bool = False) -> str:
    """`text` with terminal control characters escaped (and newlines shown as ⏎ if `one_line`)."""
    return text.translate(_ONE_LINE if one_line else _CONTROL)


def ident(value: str) -> str:
    """A session, loop or agent id as the CLI shows it: every control character and the
    backslash escaped (`\\x0a`, `\\\\`), so that two ids never look alike."""
    return value.translate(_ID)


def plain(text: str, style: str = "", *, one_line: bool = False, limit: int | None = None) -> Text:
    """Untrusted text as a rich `Text`: markup is not interpreted, controls are escaped."""
    value = safe(text, one_line=one_line)
    if limit is not None and len(value) > limit:
        value = value[: limit - 1] + "\u2026"
    return Text(value, style=style)


def plain_lines(text: str, style: str = "") -> list[Text]:
    """Untrusted text of any number of lines as `plain` draws it, one `Text` per line: rich
    splits one `Text`'s output at each newline by partitioning what is left of it, time in
    the square of its lines (a tool result of 80,000 lines took 21 s to print); lines drawn
    one after another come out the same, wrapped and styled line by line as before."""
    return [Text(line, style=style) for line in safe(text).split("\n")]


def _cut(text: Text) -> Text:
    """`text` kept to one line, cut with an ellipsis at the terminal's width."""
    text.no_wrap = True
    text.overflow = "ellipsis"
    return text


def short_time(ts: Timestamp | None) -> str:
    """``YYYY-MM-DD HH:MM:SS`` (UTC) for tables; the full value stays in ``--json``."""
    return "" if ts is None else str(ts)[:19].replace("T", " ")


def number(n: int) -> str:
    return f"{n:,}"


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``1 session``, ``2,000 sessions``."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {plural or noun + 's'}"


def status_counts(counts: dict[str, int]) -> Text:
    """``2 Completed, 1 Aborted``, coloured by status, in a fixed status order."""
    out = Text()
    for status in sorted(counts, key=lambda s: (LOOP_STATUSES.index(s) if s in LOOP_STATUSES else 99, s)):
        if out:
            out.append(", ")
        out.append(f"{counts[status]:,} {status}", style=STATUS_STYLES.get(status, ""))
    return out


_LAST_DECIMAL = 0.0001  # the last of four decimals: a cost below it would read $0.0000, as free


def usd_text(usd: float) -> str:
    """``$0.0123``: four decimals, or two significant digits for a non-zero cost below
    $0.0001 (``$0.000027``), so a known cost never reads as free."""
    if 0 < usd < _LAST_DECIMAL:
        decimals = 1 - math.floor(math.log10(usd))
        return f"${usd:.{decimals}f}"
    return f"${usd:,.4f}"


def cost_text(cost: Cost, *, sources: bool = False) -> Text:
    """``$0.0123`` (with its price sources when asked), or a dim ``unknown``: never a made-up 0."""
    if cost.usd is None:
        text = Text("unknown", style="dim")
        unsplit = cost.unsplit or ()
        missing = [name for name in cost.unpriced if name not in unsplit]
        if sources and missing:
            text.append(f" (no price for {safe(', '.join(missing))})", style="dim")
        if sources and unsplit:
            text.append(f" (tokens not split by kind for {safe(', '.join(unsplit))})", style="dim")
        return text
    text = Text(usd_text(cost.usd))
    if sources and cost.sources:
        text.append(f" ({safe(', '.join(cost.sources))})", style="dim")
    return text


def usage_line(usage: Usage) -> str:
    parts = [
        f"{number(usage.total_tokens)} tokens",
        f"in {number(usage.input)}",
        f"out {number(usage.output)}",
    ]
    for label, value in (
        ("reasoning", usage.reasoning),
        ("cache read", usage.cache_read),
        ("cache write", usage.cache_write),
    ):
        if value:
            parts.append(f"{label} {number(value)}")
    return " · ".join(parts)


# -- list, stats, record --------------------------------------------------------------------


def summaries_table(rows: Sequence[SessionSummary], width: int, costs: Sequence[Cost]) -> Table:
    """The ``list`` table for a terminal `width` columns wide.

    Ids, times, durations, loop counts, tokens and costs are never cut; the agent id
    is shortened. Narrower terminals lose columns instead: below 180 the creation time
    and the first prompt, below 130 the cost and the model, below 100 the agent, the
    duration (creation to last activity) and the turn count, and these go at any width
    the others do not fit in. The model and prompt columns give way, cut with an
    ellipsis rather than wrapped. When even the fewest columns do not fit, the loop
    counts and then the last-active time wrap at their spaces; then the time, the tokens
    and the loop counts go in turn. The id, what users copy, goes last: alone, it folds
    only on a terminal narrower than itself.
    """
    level = 3 if width >= 180 else 2 if width >= 130 else 1 if width >= 100 else 0
    while True:
        columns = _summary_columns(level)
        cells = [
            [cell(row, cost) for _, _, _, cell in columns] for row, cost in zip(rows, costs, strict=True)
        ]
        widths = [
            max([len(header), *(Text.assemble(line[index]).cell_len for line in cells)])
            for index, (header, *_) in enumerate(columns)
        ]
        # Fixed columns get their widest cell; the shrinking ones take what is left in
        # turn, each leaving 8 columns to each one after it.
        shrinking = [index for index, column in enumerate(columns) if column[2]]
        fixed = sum(w for w, c in zip(widths, columns, strict=True) if not c[2])
        left = width - 2 * (len(columns) - 1) - fixed
        # Down to the fewest columns, wrapping some down to their longest words comes first.
        wrapping = [index for name in _SUMMARY_WRAPS for index, c in enumerate(columns) if c[0] == name]
        least = {
            index: max(
                len(word)
                for text in (columns[index][0], *(line[index] for line in cells))
                for word in Text.assemble(text).plain.split()
            )
            for index in wrapping
        }
        if left >= 8 * len(shrinking):
            break
        if level <= 0 and (left + sum(widths[i] - least[i] for i in wrapping) >= 0 or level == _FEWEST):
            break
        level -= 1
    wrapped = set()
    for index in wrapping if left < 0 else ():  # (at level 0 or below: wider ones fit unwrapped)
        size = max(least[index], widths[index] + left)
        left += widths[index] - size
        widths[index] = size
        wrapped.add(index)
    if left < 0:  # the id alone, on a terminal narrower than it: folded, never cut
        widths[0] = width
        wrapped.add(0)
    for place, index in enumerate(shrinking):
        widths[index] = max(8, min(widths[index], left - 8 * (len(shrinking) - place - 1)))
        left -= widths[index]
    table = Table(box=None, header_style="bold", pad_edge=False)
    for index, ((header, right, shrinks, _), size) in enumerate(zip(columns, widths, strict=True)):
        table.add_column(
            header,
            no_wrap=index not in wrapped,
            overflow="ellipsis" if shrinks else "fold",
            width=size,
            justify="right" if right else "left",
        )
    for line in cells:
        table.add_row(*line)
    return table


_SUMMARY_WRAPS = ("LOOPS", "LAST ACTIVE")
"""The ``list`` columns that wrap at their spaces when the fewest do not fit, in turn."""
_FEWEST = -3
"""The ``list`` detail level of the id alone."""


def _summary_columns(level: int) -> list[tuple[str, bool, bool, Any]]:
    """The ``list`` columns of a detail `level` (`_FEWEST` to 3: more columns, from the
    agent up; below 0 the time, the tokens, then the loop counts go): (header,
    right-justified, shrinks, the cell of a row and its cost) each."""
    columns: list[tuple[str, bool, bool, Any]] = [
        ("ID", False, False, lambda row, _: Text(ident(row.session_id)))
    ]
    if level >= 1:
        columns.append(("AGENT", False, False, lambda row, _: plain(ident(row.agent_id), limit=9)))
    if level >= 3:
        columns.append(("CREATED", False, False, lambda row, _: Text(short_time(row.created_at))))
    if level >= 0:
        columns.append(("LAST ACTIVE", False, False, lambda row, _: Text(short_time(row.last_active_at))))
    if level >= 1:
        columns.append(("DURATION", True, False, lambda row, _: Text(_span(row))))
    if level >= -2:
        columns.append(("LOOPS", False, False, lambda row, _: _loops_cell(row)))
    if level >= 1:
        columns.append(("TURNS", True, False, lambda row, _: Text(number(row.turn_count))))
    if level >= -1:
        columns.append(("TOKENS", True, False, lambda row, _: Text(number(row.total_tokens))))
    if level >= 2:
        columns.append(("COST", True, False, lambda _, cost: cost_text(cost)))
        columns.append(("MODEL", False, True, lambda row, _: plain(", ".join(row.models), one_line=True)))
    if level >= 3:
        columns.append(("PROMPT", False, True, lambda row, _: plain(row.first_prompt or "", one_line=True)))
    return columns


def _span(row: SessionSummary) -> str:
    return duration((row.last_active_at.ns - row.created_at.ns) / 1e9)


def _loops_cell(row: SessionSummary) -> Text:
    loops = status_counts(row.loops_by_status)
    if row.rejected:
        loops.append(" rejected", style="magenta")
    return loops


USAGE_COLUMNS = ("input", "output", "reasoning", "cache_read", "cache_write", "total_tokens")


_PARTITION_COLUMNS = ("partition", "in_stream", "unacknowledged", "staged", "rejected", "owner")


def partition_status_table(rows: Sequence[Any]) -> Table:
    """``ingest --status``: one line per partition (`phi_session.broker.PartitionStatus`)."""
    table = Table(box=None, header_style="bold", pad_edge=False, show_footer=len(rows) > 1)
    table.add_column("PARTITION", footer="total")
    titles = ("LAG", "UNACKED", "STAGED", "REJECTED")
    for title, attribute in zip(titles, _PARTITION_COLUMNS[1:5], strict=True):
        table.add_column(title, justify="right", footer=number(sum(getattr(row, attribute) for row in rows)))
    table.add_column("OWNER")
    for row in rows:
        table.add_row(
            str(row.partition),
            *(number(getattr(row, name)) for name in _PARTITION_COLUMNS[1:5]),
            f"pid {row.owner}" if row.owner is not None else "none",
        )
    return table


def partition_status_record(row: Any) -> dict[str, Any]:
    return {name: getattr(row, name) for name in _PARTITION_COLUMNS}


_STATS_DROPPED = ("reasoning", "cache_write", "cache_read", "input", "output", "loops")
"""The ``stats`` columns a narrow terminal loses, in turn (those all zero first)."""
_STATS_DROPPED_LAST = ("sessions", "cost", "total_tokens")
"""The ``stats`` columns a terminal narrower still loses, in turn, down to the key alone."""


def usage_totals_table(totals: Sequence[UsageTotal], by: str, width: int) -> Table:
    """The ``stats`` table: usage and cost (priced totals) per group, with totals, for a
    terminal `width` columns wide. Keys, counts and costs are never cut: headers wrap, and
    where the table would still not fit it loses token breakdowns (all-zero ones first),
    then the loop count, the session count, the cost and the total tokens. The key goes
    last: alone, it folds only on a terminal narrower than itself."""
    table = Table(box=None, header_style="bold", pad_edge=False, show_footer=len(totals) > 1)
    costs = [row.cost if isinstance(row.cost, Cost) else ZERO_COST for row in totals]
    grand = sum((row.usage for row in totals), Usage(input=0, output=0))
    # A session (or a loop) with calls on several models counts once per model: no session
    # or loop total then.
    sessions_total = "" if by == "model" else number(sum(row.sessions for row in totals))
    loops_total = "" if by == "model" else number(sum(row.loops for row in totals))
    # name: (header, footer, cells)
    columns: dict[str, tuple[str, Text, list[Text]]] = {
        "key": (by.upper(), Text("total"), [plain(row.key) for row in totals]),
        "sessions": ("SESSIONS", Text(sessions_total), [Text(number(row.sessions)) for row in totals]),
        "loops": (
            "LOOPS",
            Text(loops_total),
            [Text(number(r.loops)) for r in totals],
        ),
        **{
            name: (
                name.replace("_", " ").upper(),
                Text(number(getattr(grand, name))),
                [Text(number(getattr(row.usage, name))) for row in totals],
            )
            for name in USAGE_COLUMNS
        },
        "cost": ("COST", cost_text(total(costs)), [cost_text(cost) for cost in costs]),
    }

    def fits(widths: dict[str, int]) -> bool:
        return sum(widths.values()) + 2 * (len(widths) - 1) <= width

    widths = {
        name: max(len(header), *(text.cell_len for text in (footer, *cells)))
        for name, (header, footer, cells) in columns.items()
    }
    if not fits(widths):  # headers wrap, then columns go
        widths = {
            name: max(*(len(word) for word in header.split()), *(text.cell_len for text in (footer, *cells)))
            for name, (header, footer, cells) in columns.items()
        }
        dropped = sorted(_STATS_DROPPED, key=lambda name: getattr(grand, name, None) != 0)
        for name in (*dropped, *_STATS_DROPPED_LAST):
            if fits(widths):
                break
            del columns[name], widths[name]
        if not fits(widths):  # the key alone, on a terminal narrower than it
            widths["key"] = width
    for name, (header, footer, _) in columns.items():
        table.add_column(
            header,
            footer=footer,
            justify="left" if name == "key" else "right",
            width=widths[name],
            overflow="fold",
        )
    for index in range(len(totals)):
        table.add_row(*(cells[index] for _, _, cells in columns.values()))
    return table


_MIN_SNIPPET = 24
"""The ``search`` snippet's least width, however long the ids beside it."""


def search_hits_table(hits: Sequence[SearchHit], width: int) -> Table:
    """The ``search`` table for a terminal `width` columns wide: where each hit is and its
    snippet, the matched words in bold. Nothing is cut: the loop ids fold and the snippets
    wrap, keeping at least `_MIN_SNIPPET` columns. A terminal too narrow for all that loses
    the kind, the turn, the loop id, then the snippet, down to the session id alone (which
    folds only on a terminal narrower than itself)."""
    lines: list[list[Text]] = []
    for hit in hits:
        snippet = Text()
        end = 0
        for start, stop in hit.highlights:
            snippet.append_text(plain(hit.snippet[end:start], one_line=True))
            snippet.append_text(plain(hit.snippet[start:stop], "bold yellow", one_line=True))
            end = stop
        snippet.append_text(plain(hit.snippet[end:], one_line=True))
        turn = "-" if hit.turn_index is None else str(hit.turn_index)
        lines.append(
            [Text(ident(hit.session_id)), Text(ident(hit.loop_id)), Text(turn), Text(hit.kind), snippet]
        )
    headers = ("SESSION", "LOOP", "TURN", "KIND", "SNIPPET")
    widths = [
        max(len(header), *(line[index].cell_len for line in lines)) for index, header in enumerate(headers)
    ]
    least = [widths[0], 10, widths[2], widths[3], 8]  # the loop ids fold, the snippets wrap
    shown = list(range(len(headers)))
    for dropped in (3, 2, 1, 4):  # kind, turn, loop, snippet
        if sum(least[index] for index in shown) + 2 * (len(shown) - 1) <= width:
            break
        shown.remove(dropped)
    left = width - 2 * (len(shown) - 1) - sum(widths[index] for index in shown if index in (0, 2, 3))
    if 1 in shown:
        widths[1] = max(10, min(widths[1], left - (min(widths[4], _MIN_SNIPPET) if 4 in shown else 0)))
        left -= widths[1]
    widths[4] = max(8, min(widths[4], left))
    folded = widths[0] > width  # the session id alone, on a terminal narrower than it
    widths[0] = min(widths[0], width)
    table = Table(box=None, header_style="bold", pad_edge=False)
    for index in shown:
        no_wrap = index in (2, 3) or (index == 0 and not folded)
        table.add_column(headers[index], no_wrap=no_wrap, overflow="fold", width=widths[index])
    for line in lines:
        table.add_row(*(line[index] for index in shown))
    return table


def summary_record(summary: SessionSummary) -> dict[str, Any]:
    """The one-session summary ``record`` and ``demo`` print with ``--json``."""
    return {
        "session_id": summary.session_id,
        "agent_id": summary.agent_id,
        "loops_by_status": summary.loops_by_status,
        "turns": summary.turn_count,
        "total_tokens": summary.total_tokens,
        "rejected": summary.rejected,
    }


def summary_text(summary: SessionSummary) -> Text:
    text = Text(ident(summary.session_id), style="bold")
    text.append("  agent ")
    text.append(ident(summary.agent_id))
    text.append("  loops: ")
    text.append_text(status_counts(summary.loops_by_status) or Text("none"))
    text.append(f"  turns: {number(summary.turn_count)}  tokens: {number(summary.total_tokens)}")
    if summary.rejected:
        text.append("  rejected", style="magenta")
    return text


# -- show: the session header, the loop tree, the events -----------------------------------


def _formation_text(session: Session) -> str:
    formation = session.formation
    text = f"{formation.kind} at {formation.timestamp}"
    if formation.kind == "InactivityTimeout":
        text += f" (threshold {formation.threshold_secs:,}s"
        text += (
            f", after session {ident(formation.previous_session_id)})"
            if formation.previous_session_id
            else ")"
        )
    return text


def session_header(session: Session, summary: SessionSummary, cost: Cost) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")  # an id wider than the terminal folds: never cut
    spawn = session.parent_spawn_ref
    parent = (
        plain(
            f"session {ident(spawn.parent_session_id)}, loop {ident(spawn.parent_loop_id)}, "
            f"tool {spawn.tool_name} (call {spawn.tool_call_id})"
        )
        if spawn is not None
        else Text("none", style="dim")
    )
    rows: list[tuple[str, RenderableType]] = [
        ("Session", Text(ident(session.session_id))),
        ("Agent", Text(ident(session.agent_id))),
        ("Formation", plain(_formation_text(session))),
        ("Scope", session.scope),
        ("Created", str(session.created_at)),
        ("Last active", str(session.last_active_at)),
        ("Parent", parent),
        ("Rejected", Text("yes", style="magenta bold") if session.is_rejected else Text("no", style="dim")),
        ("Loops", status_counts(summary.loops_by_status)),
        ("Usage", usage_line(summary.usage)),
        ("Cost", cost_text(cost, sources=True)),
    ]
    for key, value in rows:
        grid.add_row(key, value)
    return grid


def _kind_text(record: LoopRecord) -> str:
    kind = record.kind
    return kind.kind if kind.tag is None else f"{kind.kind}:{kind.tag}"


def _config_value(value: object) -> str:
    # A 32-bit temperature reads as written (0.2), not as its 64-bit expansion.
    if isinstance(value, Float32):
        return value.to_json().decode()
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _config_text(record: LoopRecord) -> str:
    config = record.config
    if config is None:
        return "no config"
    parts = [f"{config.provider}/{config.model}"]
    details = [
        ("config", config.config_id),
        ("name", config.name),
        ("api", config.api),
        ("thinking", config.thinking_level),
        ("temperature", config.temperature),
        ("max tokens", config.max_tokens),
        ("context", config.context_window),
    ]
    parts += [
        f"{label} {_config_value(value)}"
        for label, value in details
        if value is not None and not isinstance(value, msgspec.UnsetType)
    ]
    return " · ".join(parts)


def loop_label(record: LoopRecord, position: int, session: Session, *, details: bool) -> Text:
    """``#n ● Status  Kind  loop id …  turns · tool calls · tokens``.

    Without `details` the loop id is shortened to what follows the session id
    (``.anthropic.claude-sonnet-4-5.3``) and the line cut to fit a narrow terminal;
    with `details` (``show``) the whole id is kept, what users copy: the line wraps.
    """
    loop_id = record.loop_id
    if not details and loop_id.startswith(session.session_id) and loop_id != session.session_id:
        loop_id = "\u2026" + loop_id[len(session.session_id) :]
    label = Text(f"#{position} ", style="bold")
    label.append(f"\u25cf {record.status}", style=STATUS_STYLES.get(record.status, "") + " bold")
    label.append(safe(f"  {_kind_text(record)}  ", one_line=True), style="blue")
    label.append(ident(loop_id))
    group = record.parallel_group
    if group is not None:
        label.append(
            "  \u2605 parallel winner" if group.is_selected else "  parallel, not selected",
            style="yellow bold" if group.is_selected else "dim",
        )
    label.append(
        f"  {count(record.turn_count(), 'turn')} · "
        f"{count(record.tool_call_count(), 'tool call')} · "
        f"{count(record.billed_usage().total_tokens, 'token')}",
        style="dim",
    )
    return label if details else _cut(label)


def _turn_line(record: LoopRecord, turn_index: int) -> Text:
    turn = record.turns[turn_index]
    content = getattr(turn.output_message, "content", ())  # extension messages have none
    tools = [block.name for block in content if isinstance(block, ToolCall)]
    line = Text(
        f"turn {turn.index} · {turn.triggered_by} · {turn.duration():.2f}s · "
        f"{number(record.turn_usage(turn).total_tokens)} tokens"
    )
    if tools:
        line.append(" · calls ")
        line.append(safe(", ".join(tools), one_line=True), style="cyan")
    if is_replayed(turn.output_message):
        line.append(" · replayed, not billed", style="dim")
    return line


def _add_loop(
    tree: Tree,
    session: Session,
    index: int,
    drawn_under: int | None,
    details: bool,
    loops: Mapping[str, LoopRecord],
) -> Tree:
    """Add loop `index` under `tree`; returns its branch for the child loops.

    `drawn_under` is the index of its parent loop when the tree is too deep to draw it
    nested there, so the relation is spelled out instead. `loops` is the session's
    `Session.loop_index` with `details` (built once for the whole tree).
    """
    record = session.loops[index]
    branch = tree.add(loop_label(record, index + 1, session, details=details))
    if drawn_under is not None:
        branch.add(Text(f"continues loop #{drawn_under + 1}", style="dim"))
    if details:
        ended = f"ended {record.ended_at}" if record.ended_at is not None else "not ended"
        branch.add(Text(f"started {record.started_at} · {ended}", style="dim"))
        branch.add(plain(_config_text(record), "dim"))
        if record.parent_loop_id is not None and record.parent_loop_id not in loops:
            branch.add(plain(f"continues loop {ident(record.parent_loop_id)} (not in this session)", "dim"))
        branch.add(Text(f"usage: {usage_line(record.billed_usage())}", style="dim"))
        unfinished = record.unfinished_usage()
        if unfinished.total_tokens or unfinished.input or unfinished.output:
            branch.add(Text(f"  of which in the unfinished turn: {usage_line(unfinished)}", style="dim"))
        replayed = record.replayed_usage()
        if replayed.total_tokens or replayed.input or replayed.output:
            branch.add(
                Text(f"  replayed from the recording, not billed: {usage_line(replayed)}", style="dim")
            )
    if record.rejection is not None:
        branch.add(_cut(plain(f"rejected: {record.rejection}", "magenta", one_line=True)))
    if isinstance(record.error, str):
        branch.add(_cut(plain(f"error: {record.error}", "red", one_line=True)))
    group = record.parallel_group
    if details and group is not None:
        branch.add(
            plain(
                f"parallel group of {len(group.all_loop_ids)}: winner {ident(group.selected_loop_id)} "
                f"(config #{group.selected_config_index}), "
                f"evaluation {number(group.evaluation_usage.total_tokens)} tokens",
                "yellow",
            )
        )
    for ref in record.child_loop_refs:
        text = (
            f"\u2192 sub-agent session {ident(ref.child_session_id)} (loop {ident(ref.child_loop_id)}) "
            f"via {ref.tool_name} call {ref.tool_call_id}"
            if details
            else f"\u2192 sub-agent session {ident(ref.child_session_id)} via {ref.tool_name}"
        )
        branch.add(_cut(plain(text, "cyan", one_line=True)))
    if details:
        for turn_index in range(len(record.turns)):
            branch.add(_turn_line(record, turn_index))
    return branch


MAX_TREE_DEPTH = 12
"""Loops nested deeper than this are drawn at this depth (with a "continues loop #n" line):
every level indents by four columns, so a long continuation chain would otherwise run off
the terminal and take rich quadratic time to lay out."""


def loop_tree(session: Session, forest: Sequence[LoopNode], *, details: bool = True) -> Tree:
    """The loop tree of `session` (its `phi_session.views.loop_forest`).

    With `details` (``show``) every loop lists its times, config, usage and turns
    under a ``loops (n)`` root; without (``demo``) each loop is one line under a
    session line, every line cut to the terminal's width.
    """
    if details:
        root = Text(f"loops ({len(session.loops):,})", style="bold")
    else:
        spawn = session.parent_spawn_ref
        root = plain(f"session {ident(session.session_id)}", "bold", one_line=True)
        root.append(
            safe(f"  spawned via {spawn.tool_name}", one_line=True)
            if spawn is not None
            else f"  {session.formation.kind}",
            style="cyan" if spawn is not None else "",
        )
        root.append(f"  {count(session.billed_usage().total_tokens, 'token')}")
    tree = Tree(_cut(root))
    # An explicit stack (reversed so siblings keep session order): a chain of thousands
    # of continued loops must not hit the recursion limit.
    # Entries: (tree to draw under, depth, parent loop index, forest node).
    stack: list[tuple[Tree, int, int | None, LoopNode]] = [(tree, 1, None, node) for node in reversed(forest)]
    loops = session.loop_index() if details else {}
    while stack:
        under, depth, parent, node = stack.pop()
        flattened = depth > MAX_TREE_DEPTH
        branch = _add_loop(under, session, node.index, parent if flattened else None, details, loops)
        below = under if depth >= MAX_TREE_DEPTH else branch
        stack.extend((below, depth + 1, node.index, child) for child in reversed(node.children))
    return tree


def _event_detail(event: AgentEvent) -> str:
    fields = msgspec.json.decode(encode_event(event))
    for key in ("type", "loop_id", "timestamp"):
        fields.pop(key, None)
    return msgspec.json.encode(fields).decode()


def events_table(session: Session, width: int) -> Table:
    """Every stored event (`Session.iter_events`), its loop shown by its #number in the tree.

    The detail column gets what the others leave of `width` (rich would rather drop
    whole columns than cut one long cell).
    """
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("LOOP", no_wrap=True)
    table.add_column("SEQ", no_wrap=True, justify="right")
    table.add_column("TYPE", no_wrap=True)
    table.add_column("TIME", no_wrap=True)
    table.add_column("DETAIL", no_wrap=True, overflow="ellipsis", max_width=max(20, width - 85))
    positions = {id(record): index for index, record in enumerate(session.loops, start=1)}
    for loop, sequence, event in session.iter_events():
        table.add_row(
            "session" if loop is None else f"#{positions[id(loop)]}",
            "" if sequence is None else number(sequence),
            type(event).__name__,
            str(getattr(event, "timestamp", "")),
            plain(_event_detail(event), one_line=True, limit=160),
        )
    return table


# -- show --timeline ---------------------------------------------------------------------------

_BAR_STYLES = {"session": "bold", "loop": "blue", "turn": "cyan", "model": "magenta", "tool": "yellow"}


def duration(seconds: float) -> str:
    """``850ms``, ``12.4s``, ``3m05s``: a span as a person reads it."""
    if seconds <= -0.0005:  # a clock that went back: the same units as forwards
        return f"-{duration(-seconds)}"
    if seconds < 1:
        return f"{abs(seconds) * 1000:.0f}ms"  # (no "-0ms")
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def timeline_table(
    bars: Sequence[TimelineBar],
    width: int,
    span: tuple[Timestamp, Timestamp] | None = None,
    *,
    header: bool = True,
) -> Table:
    """`views.timeline` as a text waterfall: one row per bar, drawn to scale on an axis
    from the first start to the last end (or `span`, the whole session's when `bars` are
    one page of it: the pages' tables then line up, the first one with the `header`); a
    bar still running reaches the end, one beyond the axis is clamped to it."""
    table = Table(box=None, header_style="bold", pad_edge=False, show_header=header)
    label_width = max(24, min(60, width // 3))
    axis = max(10, width - label_width - 24)
    table.add_column("WHAT", no_wrap=True, overflow="ellipsis", width=label_width)
    table.add_column("TIME", no_wrap=True, justify="right", width=8)
    table.add_column("TOKENS", no_wrap=True, justify="right", width=9)
    table.add_column("WATERFALL", no_wrap=True, width=axis)
    if not bars:
        return table
    if span is None:
        first = min(bar.start for bar in bars)
        span = first, max([first, *(bar.end for bar in bars if bar.end is not None)])
    first, last = span
    seconds = max(last - first, 1e-9)
    shift = 0  # indentation taken off a loop (and what is under it) nested beyond MAX_TREE_DEPTH
    for bar in bars:
        if bar.kind in ("session", "loop"):
            shift = max(0, bar.depth - MAX_TREE_DEPTH)
        end = bar.end if bar.end is not None else last
        left = max(0, round((bar.start - first) / seconds * axis))
        cells = max(1, min(axis, round((end - first) / seconds * axis)) - left)
        left = min(left, axis - 1)
        drawn = Text(" " * left)
        drawn.append("\u2588" * min(cells, axis - left), style=_BAR_STYLES[bar.kind])
        label = Text("  " * max(0, bar.depth - shift))
        label.append_text(plain(bar.label, style=_BAR_STYLES[bar.kind], one_line=True))
        if bar.detail:
            label.append_text(plain(f" {bar.detail}", style="dim", one_line=True))
        if bar.status is not None and bar.status != "Completed":
            label.append(f" {bar.status}", style=STATUS_STYLES.get(bar.status, ""))
        table.add_row(
            label,
            duration(end - bar.start) + ("" if bar.end is not None else "+"),
            "" if bar.usage is None else number(bar.usage.total_tokens),
            drawn,
        )
    return table


# -- tree: the spawn graph --------------------------------------------------------------------


def spawn_node_json(node: SpawnNode) -> dict[str, Any]:
    """A `SpawnNode` as ``tree --json`` prints it."""
    data: dict[str, Any] = {
        "session_id": node.session_id,
        "via": node.via,
        "found": node.found,
        "repeated": node.repeated,
        "children": [spawn_node_json(child) for child in node.children],
    }
    if node.summary is not None:
        data.update(
            agent_id=node.summary.agent_id,
            loops=node.summary.loop_count,
            total_tokens=node.summary.total_tokens,
            loops_by_status=node.summary.loops_by_status,
        )
    return data


def _graph_label(node: SpawnNode) -> Text:
    label = Text()
    if node.via is not None:
        label.append(
            safe(f"{node.via['tool_name']} ({node.via['tool_call_id']}) \u2192 ", one_line=True), style="cyan"
        )
    label.append(ident(node.session_id), style="bold")
    if node.repeated:
        label.append("  (shown above)", style="dim")
    elif node.summary is None:
        label.append("  not in this store", style="red")
    else:
        label.append("  agent ")
        label.append(ident(node.summary.agent_id))
        label.append("  ")
        label.append_text(status_counts(node.summary.loops_by_status))
        label.append(f"  {number(node.summary.total_tokens)} tokens", style="dim")
    return label


def spawn_tree(graph: SpawnNode) -> Tree:
    drawing = Tree(_graph_label(graph))
    stack = [(drawing, child) for child in reversed(graph.children)]
    while stack:
        under, node = stack.pop()
        branch = under.add(_graph_label(node))
        stack.extend((branch, child) for child in reversed(node.children))
    return drawing


# -- context: messages ------------------------------------------------------------------------


def _content_texts(message: AgentMessage) -> list[Text]:
    if isinstance(message, ExtensionMessage):
        return [plain(msgspec.json.encode(message.data).decode(), "dim")]
    lines: list[Text] = []
    for block in message.content:
        if isinstance(block, TextContent):
            lines += plain_lines(block.text)
        elif isinstance(block, ThinkingContent):
            lines += plain_lines(f"(thinking) {block.thinking}", "dim italic")
        elif isinstance(block, ToolCall):
            lines.append(
                plain(
                    f"\u2192 {block.name}({msgspec.json.encode(block.arguments).decode()}) [{block.id}]",
                    "cyan",
                )
            )
        elif isinstance(block, ImageContent):
            lines.append(plain(f"[image {block.mime_type}, {len(block.data):,} base64 chars]", "dim"))
    return lines


def message_view(message: AgentMessage) -> Group:
    role = message_role(message)
    head = plain(role, "bold", one_line=True)
    if isinstance(message, AssistantMessage):
        head.append(
            safe(
                f"  {message.provider}/{message.model} · {message.stop_reason} · "
                f"{number(counted_total(message.usage))} tokens",
                one_line=True,
            ),
            style="dim",
        )
    elif isinstance(message, ToolResultMessage):
        head.append(safe(f"  {message.tool_name} [{message.tool_call_id}]", one_line=True), style="dim")
        if message.is_error:
            head.append("  error", style="red")
    elif isinstance(message, ExtensionMessage):
        head.append(safe(f"  {message.kind}", one_line=True), style="dim")
    return Group(head, *_content_texts(message), Text())
