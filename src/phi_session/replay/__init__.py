"""Replay and fork recorded agent runs: answer a run's model (and tool) calls from its
recording, or hand it to another model from a chosen turn on.

The framework-independent core, one module per concept:

* `phi_session.replay.request`: `RequestShape` (what a model was asked at one turn)
  and how two requests are compared;
* `phi_session.replay.script`: `RecordedTurn`, `ReplayScript` (the turns of a stored
  loop, or of a chain of loops, in order);
* `phi_session.replay.divergence`: `Divergence` (``ReplayDiverged`` carries it);
* `phi_session.replay.cursor`: `ReplayCursor`, what every replay model drives (its
  docstring is the contract framework replay models keep);
* `phi_session.replay.lineage`: `Lineage`, `replay_lineage`, `fork_lineage`,
  `recording_as` (how a replayed or forked run is recorded: a ``Rerun{replay}`` or
  ``Branch{tag}`` loop of the original session, continuing the original loop);
* `phi_session.replay.recorded`: `RecordedModel` for hand-instrumented loops;
* `phi_session.replay.forking`: `fork`, a recorded loop run again up to a turn and then
  handed to another model, for any recorded loop.

A replay calls no model and makes no network call: the recorded replies are
returned, with the usage they reported, and with ``tools="recorded"`` the recorded
tool results too.

What is billed: only what was spent. Every reply served from a recording is marked
(`phi_session.model.is_replayed`): by `RecordedModel.next` (finish the turn with the
reply it returned, ``reply.finish(message=...)``), by `fork` for the turns it repeats,
and for a framework adapter by its loop, run in a ``recording_as`` block: the replay's
cursors are the one given (``recording_as(lineage, cursor)``, which
`phi_session.adapters.replay_recording` does), else the first replaying the session
the lineage replays to answer a model call inside the block (not a replayed
sub-agent's; any, for a lineage whose metadata names none), and every other
replaying the lineage's session (a replay model per agent of a handoff). The
replay's turns keep the recorded usage
(`LoopRecord.reported_usage`, what `phi_session.diff` compares: a replay shows no
usage change), while `LoopRecord.billed_usage`, `LoopRecord.model_calls` and every
roll-up built on them (the stores' summaries and `usage_totals`, cost, the CLI, the
viewer) leave the tagged turns out: a replay bills nothing, a fork the turns from its
fork point on, a replay handed over to its fallback the fallback's turns. Stores total
a loop when they save it: replays recorded before replies were tagged keep their
recorded usage in totals.
"""

from __future__ import annotations

from ..errors import RecordedModelError, RecordedToolError, ReplayDiverged, TurnNotFound
from .cursor import OnDivergence, ReplayCursor, ToolsMode, check_request
from .divergence import Divergence, DivergenceKind
from .forking import ToolFn, fork
from .lineage import ActiveLineage, Lineage, active_lineage, fork_lineage, recording_as, replay_lineage
from .recorded import ModelFn, RecordedModel
from .request import RequestShape
from .script import RecordedTurn, ReplayScript

__all__ = [
    "ActiveLineage",
    "Divergence",
    "DivergenceKind",
    "Lineage",
    "ModelFn",
    "OnDivergence",
    "RecordedModel",
    "RecordedModelError",
    "RecordedToolError",
    "RecordedTurn",
    "ReplayCursor",
    "ReplayDiverged",
    "ReplayScript",
    "RequestShape",
    "ToolFn",
    "ToolsMode",
    "TurnNotFound",
    "active_lineage",
    "check_request",
    "fork",
    "fork_lineage",
    "recording_as",
    "replay_lineage",
]
