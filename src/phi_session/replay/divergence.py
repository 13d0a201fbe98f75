"""Where a replayed run first left its recording: `Divergence`."""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = ["Divergence", "DivergenceKind"]

DivergenceKind = Literal["system_prompt", "tools", "messages", "tool_call", "tool_arguments", "exhausted"]
"""What differed:

* ``system_prompt``: the system prompt (compared when both sides know it);
* ``tools``: the tools offered (compared when both sides know them);
* ``messages``: the context sent to the model (inputs, earlier replies, tool results);
* ``tool_call``: a tool call the recording does not hold (unknown id, other tool
  name, a call of a turn not replayed yet, or no recorded result);
* ``tool_arguments``: a recorded tool call asked for with other arguments;
* ``exhausted``: the agent asked for a model call after the last recorded turn.
"""


class Divergence(msgspec.Struct, frozen=True, kw_only=True):
    """The first point where a replayed run did not match its recording.

    `loop_id` and `turn_index` name the recorded turn (of the original loop) where it
    happened: the turn whose request differed, the turn whose tool call was asked for
    differently, or, for ``exhausted``, one past the last recorded turn. `detail` is
    one human line; `expected` and `actual` summarize both sides (None when a side
    has nothing to show).
    """

    loop_id: str
    turn_index: int
    what: DivergenceKind
    detail: str
    expected: str | None = None
    actual: str | None = None

    def describe(self) -> str:
        """One line: where, what, and both sides."""
        text = f"turn {self.turn_index} of {self.loop_id}: {self.what}: {self.detail}"
        sides = [
            f"{name}: {side}"
            for name, side in (("recorded", self.expected), ("replayed", self.actual))
            if side is not None
        ]
        return f"{text} ({'; '.join(sides)})" if sides else text
