"""How ``phi-session diff`` draws a `LoopDiff` or a `SessionDiff`: side by side, A left, B right.

Recorded content is untrusted and drawn as plain text (`render.plain`). A turn
that matches shows as one dim line; a turn that diverges lists its changes, a text
as the lines that differ with two lines of context on each side, a JSON value as
compact JSON. Timing and token counts show as ``A → B (Δ)``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Any

import msgspec
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

from ..diff import FieldChange, FirstDifference, LoopDiff, LoopSide, SessionDiff, TurnDiff, UsageDelta
from ..messages import Usage
from .render import STATUS_STYLES, count, duration, ident, number, plain

__all__ = ["loop_diff_view", "session_diff_view"]

_STATUS_MARKS = {
    "equal": ("=", "dim"),
    "changed": ("\u2260", "yellow bold"),
    "added": ("+", "green bold"),
    "removed": ("-", "red bold"),
}
_CONTEXT = 2  # lines of unchanged text kept around a changed line


def _seconds_delta(delta: float) -> str:
    return ("-" if delta < 0 else "+") + duration(abs(delta))


def _tokens_line(usage_a: Usage | None, usage_b: Usage | None, delta: UsageDelta) -> str:
    a = "-" if usage_a is None else number(usage_a.total_tokens)
    b = "-" if usage_b is None else number(usage_b.total_tokens)
    return f"tokens {a} \u2192 {b} ({delta.total_tokens:+,})"


def _seconds_line(a: float | None, b: float | None, delta: float | None) -> str:
    text = f"{'-' if a is None else duration(a)} \u2192 {'-' if b is None else duration(b)}"
    if delta is not None:
        text += f" ({_seconds_delta(delta)})"
    return text


class _Sides:
    """Both loops' facts side by side, under the header ``A`` and ``B``: the rich `Table`
    of `table`, drawn here directly while it fits the console's width.

    A session diff draws one per loop pair, and rich lays a table out cell by cell
    (measured, wrapped, padded): about 2 ms, three quarters of drawing a pair. Every
    cell is one line of one style, so while the widest cells fit side by side the
    table's layout is known: each column as wide as its widest cell, one space
    between columns, each cell padded to its column's width. These are the segments
    rich yields for it (the header row bold throughout); a table too wide for the
    console is left to rich, which folds its cells.
    """

    _HEADER = ("", "A", "B")
    _PADDING = ((0, 1), (1, 1), (1, 0))  # (left, right) spaces of each column: no outer edge

    def __init__(self, rows: list[tuple[Text, Text, Text]]) -> None:
        self.rows = rows

    def table(self) -> Table:
        table = Table(box=None, header_style="bold", pad_edge=False)
        table.add_column(self._HEADER[0])
        table.add_column(self._HEADER[1], ratio=1, overflow="fold")
        table.add_column(self._HEADER[2], ratio=1, overflow="fold")
        for row in self.rows:
            table.add_row(*row)
        return table

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        header = tuple(Text(name, style="bold") for name in self._HEADER)
        rows = [header, *self.rows]
        lengths = [[cell_len(cell.plain) for cell in row] for row in rows]
        widths = [max(row[column] for row in lengths) for column in range(3)]
        if sum(widths) + sum(map(sum, self._PADDING)) > options.max_width:
            yield self.table()
            return
        bold = console.get_style("bold")
        for row, row_lengths in zip(rows, lengths, strict=True):
            padding = bold if row is header else None
            for cell, length, width, (left, right) in zip(
                row, row_lengths, widths, self._PADDING, strict=True
            ):
                if left:
                    yield Segment(" " * left, padding)
                yield Segment(cell.plain + " " * (width - length), console.get_style(cell.style))
                if right:
                    yield Segment(" " * right, padding)
            yield Segment.line()


def _sides_table(a: LoopSide, b: LoopSide, diff: LoopDiff) -> _Sides:
    rows: list[tuple[Text, Text, Text]] = []

    def row(label: str, value_a: str, value_b: str, style: str = "") -> None:
        rows.append(
            (
                Text(label, style="bold"),
                plain(value_a, style, one_line=True),
                plain(value_b, style, one_line=True),
            )
        )

    row("session", ident(a.session_id), ident(b.session_id))
    row("loop", f"#{a.position + 1} {ident(a.loop_id)}", f"#{b.position + 1} {ident(b.loop_id)}")
    row("kind", a.continuation, b.continuation, "blue")
    rows.append(
        (
            Text("status", style="bold"),
            Text(a.status, style=STATUS_STYLES.get(a.status, "")),
            Text(b.status, style=STATUS_STYLES.get(b.status, "")),
        )
    )
    row("model", a.model or "no config", b.model or "no config")
    row("turns", number(a.turn_count), number(b.turn_count))
    delta = diff.usage_delta.total_tokens
    row("tokens", number(a.usage.total_tokens), f"{number(b.usage.total_tokens)} ({delta:+,})")
    row(
        "duration",
        "-" if a.seconds is None else duration(a.seconds),
        _seconds_line(a.seconds, b.seconds, diff.seconds_delta),
    )
    return _Sides(rows)


def _json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def _value(change: FieldChange, side: str) -> Text:
    value = change.a if side == "a" else change.b
    if value is msgspec.UNSET:
        return Text("\u2014", style="dim")
    style = "red" if side == "a" else "green"
    return plain(value if isinstance(value, str) else _json(value), style)


def _text_rows(a: str, b: str) -> Iterator[tuple[Text, Text]]:
    """The lines of `a` and `b` side by side: only the differing ones and their context."""
    lines_a, lines_b = a.splitlines(), b.splitlines()
    matcher = difflib.SequenceMatcher(None, lines_a, lines_b, autojunk=False)
    for number_, group in enumerate(matcher.get_grouped_opcodes(_CONTEXT)):
        if number_:
            yield Text("\u22ee", style="dim"), Text("\u22ee", style="dim")
        for tag, a_start, a_end, b_start, b_end in group:
            left, right = lines_a[a_start:a_end], lines_b[b_start:b_end]
            for index in range(max(len(left), len(right))):
                if tag == "equal":
                    yield plain(left[index], "dim"), plain(right[index], "dim")
                    continue
                yield (
                    plain(left[index], "red") if index < len(left) else Text(""),
                    plain(right[index], "green") if index < len(right) else Text(""),
                )


def _change_rows(change: FieldChange, style: str = "") -> Iterator[tuple[Text, Text, Text]]:
    label = plain(change.path, style or "bold", one_line=True)
    if change.kind != "changed":
        label.append(f" ({change.kind})", style="dim")
    if change.kind == "changed" and isinstance(change.a, str) and isinstance(change.b, str):
        first = True
        for left, right in _text_rows(change.a, change.b):
            yield (label if first else Text(""), left, right)
            first = False
        return
    yield label, _value(change, "a"), _value(change, "b")


def _turn_view(turn: TurnDiff) -> RenderableType:
    mark, style = _STATUS_MARKS[turn.status]
    head = Text(f"turn {turn.index} ", style="bold")
    head.append(f"{mark} {turn.status}", style=style)
    head.append(
        f"  {_seconds_line(turn.seconds_a, turn.seconds_b, turn.seconds_delta)} · "
        f"{_tokens_line(turn.usage_a, turn.usage_b, turn.usage_delta)}",
        style="dim",
    )
    if not turn.changes and not turn.incidental:
        return head
    return Group(head, _changes_table(turn.changes, turn.incidental))


def _changes_table(changes: tuple[FieldChange, ...], incidental: tuple[FieldChange, ...] = ()) -> Table:
    """`changes`, then the `incidental` ones dim: where, A's value, B's value."""
    table = Table(box=None, show_header=False, pad_edge=False, padding=(0, 1, 0, 2))
    table.add_column("WHAT", no_wrap=True, width=30, overflow="ellipsis")
    table.add_column("A", ratio=1, overflow="fold")
    table.add_column("B", ratio=1, overflow="fold")
    for change in changes:
        for row in _change_rows(change):
            table.add_row(*row)
    for change in incidental:
        for row in _change_rows(change, "dim"):
            table.add_row(*row)
    return table


def _divergence_line(first: FirstDifference | None) -> Text:
    if first is None:
        return Text(
            "no divergence: the runs match in content (timing, tokens and ids aside)", style="green bold"
        )
    line = Text("first divergence: ", style="yellow bold")
    line.append_text(plain(first.summary, "yellow", one_line=True))
    return line


def loop_diff_view(diff: LoopDiff) -> Group:
    """Both loops' facts side by side, how the loops differ in themselves, every turn
    (changes listed), then where they first diverge."""
    parts: list[RenderableType] = [_sides_table(diff.a, diff.b, diff), Text()]
    if diff.changes:
        head = Text("loop ", style="bold")
        head.append(f"{_STATUS_MARKS['changed'][0]} changed", style=_STATUS_MARKS["changed"][1])
        parts += [head, _changes_table(diff.changes), Text()]
    parts += [_turn_view(turn) for turn in diff.turns]
    if not diff.turns:
        parts.append(Text("no turns on either side", style="dim"))
    parts += [Text(), _divergence_line(diff.first_divergence)]
    return Group(*parts)


def session_diff_view(diff: SessionDiff) -> Group:
    """Each pair of loops (tree order) drawn as `loop_diff_view` does, the unpaired loops,
    then the first divergence."""
    head = plain(f"session A {ident(diff.session_a)}\nsession B {ident(diff.session_b)}", "bold")
    head.append(
        f"\n{count(len(diff.loops), 'loop pair')} in tree order; tokens "
        f"{diff.usage_delta.total_tokens:+,} (B - A)",
        style="dim",
    )
    parts: list[RenderableType] = [head]
    for position, pair in enumerate(diff.loops, start=1):
        title = Text(f"\u2500\u2500 pair {position}: ", style="bold")
        title.append(
            "identical in content" if pair.identical else "diverges",
            style="green" if pair.identical else "yellow",
        )
        parts += [Text(), title, loop_diff_view(pair)]
    for label, sides in (("A", diff.only_in_a), ("B", diff.only_in_b)):
        for side in sides:
            parts.append(
                plain(
                    f"only in {label}: loop #{side.position + 1} {ident(side.loop_id)} ({side.continuation}, "
                    f"{count(side.turn_count, 'turn')})",
                    "green" if label == "B" else "red",
                    one_line=True,
                )
            )
    parts += [Text(), _divergence_line(diff.first_divergence)]
    return Group(*parts)
