"""Framework adapters: phi-core sessions from agents written with an agent framework.

Each framework has a module here that imports its framework only when used
(``import phi_session.adapters`` imports none):

* `phi_session.adapters.openai_agents`: the OpenAI Agents SDK (``pip install 'phi-session[openai-agents]'``).
* `phi_session.adapters.google_adk`: Google ADK, a plugin (``pip install 'phi-session[google-adk]'``).
* `phi_session.adapters.pydantic_ai`: pydantic-ai, a capability
  (``pip install 'phi-session[pydantic-ai]'``).

They share one core (`AdapterCore`, see `phi_session.adapters._core`) that holds the rules
every adapter follows: one framework run is one loop, the framework's session id is
the session id, continuations, handoffs and sub-agents, usage per model response, and
an adapter fault never reaching the host.
"""

from ._core import (
    FRAMEWORK_SESSION_NAMESPACE,
    AdapterCore,
    AdapterRun,
    RunningTool,
    SinkArg,
    enter_tool,
    leave_tool,
    replay_recording,
    require_extra,
    session_id_for,
    usage_of,
)

__all__ = [
    "FRAMEWORK_SESSION_NAMESPACE",
    "AdapterCore",
    "AdapterRun",
    "RunningTool",
    "SinkArg",
    "enter_tool",
    "leave_tool",
    "replay_recording",
    "require_extra",
    "session_id_for",
    "usage_of",
]
