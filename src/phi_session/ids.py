"""Loop ids: ``{session_id}.{config_segment}.{N}`` (wire-format §8)."""

from __future__ import annotations

from ._alphanumeric import is_alphanumeric


def session_id_from_loop_id(loop_id: str) -> str:
    """The part before the first ``.`` (the whole id when it has none)."""
    return loop_id.split(".", 1)[0]


def config_segment_from_loop_id(loop_id: str) -> str | None:
    """The part strictly between the first and the last ``.``; None with fewer than two dots."""
    first, last = loop_id.find("."), loop_id.rfind(".")
    if first == -1 or first == last:
        return None
    return loop_id[first + 1 : last]


def model_slug(model: str) -> str:
    """Characters neither alphanumeric (as Rust's ``char::is_alphanumeric``) nor ``-`` become ``-``.

    Not ``str.isalnum``: it refuses marks Rust counts as alphabetic, and its Unicode is older.
    """
    return "".join(c if c == "-" or is_alphanumeric(c) else "-" for c in model)


def derive_config_id(provider: str, model: str, *, thinking: bool = False) -> str:
    """phi-core's config segment when none is configured: ``{provider}.{slug}[.thinking]``."""
    segment = f"{provider}.{model_slug(model)}"
    return f"{segment}.thinking" if thinking else segment
