"""Full-text search over what agents said and did: the documents, the match rule and the snippets.

Every store searches the same documents with the same rule, so that the backends
agree (the conformance suite checks it):

* a **document** is one piece of text of one message of a loop's conversation
  (`LoopRecord.conversation`: its messages, or, for a loop that never ended, those of
  its ``MessageEnd`` events): a text block (``text``), a thinking block
  (``thinking``), a tool call's name and JSON arguments (``tool_call``) or a tool
  result's text (``tool_result``);
* the **match rule**: the query's words (runs of letters, digits and ``_`` of the
  text in Unicode's composed form, NFC, compared case-folded: ``Straße`` is ``STRASSE``,
  ``ﬁle`` is ``FILE``) all occur as words of the document. A query without a word
  matches nothing. Composed first, a word reads the same whether its accents came
  precomposed or as combining marks (decomposed, NFD: macOS file names, some model
  outputs).

`SearchHit` carries the session, loop, turn (`LoopRecord.conversation_turns`) and a
snippet of the document around the first match with the offsets of every matched
word in it, so each front end highlights in its own way (the viewer as text, never
as HTML).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from typing import Literal

import msgspec

from ..messages import (
    AgentMessage,
    AssistantMessage,
    TextContent,
    ThinkingContent,
    ToolCall,
    ToolResultMessage,
    UserMessage,
)
from ..model import LoopRecord, Session
from .query import MAX_COUNT, check_count

__all__ = [
    "DEFAULT_LIMIT",
    "DocumentKind",
    "SearchHit",
    "document_hits",
    "documents",
    "loop_text",
    "query_words",
    "search_words",
]

DocumentKind = Literal["text", "thinking", "tool_call", "tool_result"]
DEFAULT_LIMIT = 50
SNIPPET_CHARS = 160
_CLUSTER_CHARS = 32
"""How far a snippet's cut moves to keep a character a reader sees as one whole (`_joined`)."""
_WORD = re.compile(r"\w+")
# A word as the match rule compares it, what queries and indexes hold: Unicode's case
# folding, as ``str.lower`` is not ("ß" is "ss", "ﬁ" is "fi", a final sigma a sigma).
_folded = str.casefold
# ASCII text's bytes mapped to its words, folded and space-separated: a word character
# (``\w`` in ASCII is ``[A-Za-z0-9_]``) to its folded (lower) case, any other to a space.
_ASCII_WORD_BYTES = bytes(
    ord(_folded(char)) if char.isascii() and _WORD.fullmatch(char) else 0x20 for char in map(chr, range(256))
)
# A control character's escape in a tool call's JSON arguments (the newlines of a file a
# tool writes) would glue its letter to the next word ("\nimport" read as "nimport"): it
# is read as the blank it stands for. An escaped backslash is matched whole, so that the
# letter after it stays a letter.
_CONTROL_ESCAPE = re.compile(r"\\(?:[bfnrt]|u00[0-9a-fA-F]{2})|(\\.)")


def _arguments_text(arguments: object) -> str:
    text = msgspec.json.encode(arguments).decode()
    return _CONTROL_ESCAPE.sub(lambda match: match.group(1) or " ", text) if "\\" in text else text


class SearchHit(msgspec.Struct, frozen=True, kw_only=True):
    """One matching document: where it is and a snippet of it.

    ``highlights`` are ``[start, end)`` character offsets of the matched words
    inside ``snippet`` (of the part it shows of a word it cuts). ``message_index`` is
    the message's position in the loop's `LoopRecord.conversation`; ``turn_index`` is
    None for a message outside any turn.
    """

    session_id: str
    agent_id: str
    loop_id: str
    turn_index: int | None
    message_index: int
    kind: DocumentKind
    snippet: str
    highlights: tuple[tuple[int, int], ...]


class Document(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One searchable text of a session (see the module docstring)."""

    loop_id: str
    turn_index: int | None
    message_index: int
    kind: DocumentKind
    text: str


def _composed(text: str) -> str:
    """`text` in NFC, the form the match rule reads: a combining accent is no word
    character, so decomposed text would split its words at each accent."""
    if text.isascii() or unicodedata.is_normalized("NFC", text):
        return text
    return unicodedata.normalize("NFC", text)


def query_words(text: str) -> tuple[str, ...]:
    """The distinct words of a text (a query, or a loop's text for an index), case-folded
    (`_folded`), in order (`TypeError` for a non-string)."""
    if not isinstance(text, str):
        raise TypeError(f"search text must be str, not {type(text).__name__}")
    if text.isascii():
        # One C pass for the common case: folding ASCII moves no word boundary.
        return tuple(dict.fromkeys(text.encode().translate(_ASCII_WORD_BYTES).decode().split()))
    # Elsewhere folding may (``"İ".casefold()`` ends in a combining mark, not a word
    # character): each distinct word is folded on its own.
    words = _WORD.findall(_composed(text))
    return tuple(dict.fromkeys(map(_folded, dict.fromkeys(words))))


def _message_texts(message: AgentMessage) -> Iterator[tuple[DocumentKind, str]]:
    if isinstance(message, ToolResultMessage):
        for block in message.content:
            if isinstance(block, TextContent):
                yield "tool_result", block.text
        return
    if not isinstance(message, (UserMessage, AssistantMessage)):
        return
    for block in message.content:
        if isinstance(block, TextContent):
            yield "text", block.text
        elif isinstance(block, ThinkingContent):
            yield "thinking", block.thinking
        elif isinstance(block, ToolCall):
            yield "tool_call", f"{block.name} {_arguments_text(block.arguments)}"


def loop_text(record: LoopRecord) -> str:
    """All searchable text of one loop, one document a line: what a full-text index stores.

    An index finds the loops whose text holds every word; `document_hits` then applies
    the exact rule (all words in one document) to the loaded session.
    """
    return "\n".join(text for message in record.conversation() for _, text in _message_texts(message))


def documents(session: Session) -> Iterator[Document]:
    """The searchable documents of `session`, loop by loop, message by message."""
    for record in session.loops:
        for index, (turn_index, message) in enumerate(record.conversation_turns()):
            for kind, text in _message_texts(message):
                if text:
                    yield Document(
                        loop_id=record.loop_id,
                        turn_index=turn_index,
                        message_index=index,
                        kind=kind,
                        text=text,
                    )


def _regional_indicator(char: str) -> bool:
    return "\U0001f1e6" <= char <= "\U0001f1ff"


def _joined(text: str, index: int) -> bool:
    """Whether ``text[index]`` belongs to the character a reader sees in ``text[index - 1]``
    (a rough grapheme cluster, stdlib only): a mark (combining, spacing, a variation
    selector), a skin tone, either side of a zero-width joiner, or the second regional
    indicator of a flag."""
    char, before = text[index], text[index - 1]
    if (
        unicodedata.category(char)[0] == "M"
        or "\U0001f3fb" <= char <= "\U0001f3ff"
        or "\u200d" in (char, before)
    ):
        return True
    if not (_regional_indicator(char) and _regional_indicator(before)):
        return False
    start = index - 1
    while start > 0 and _regional_indicator(text[start - 1]):
        start -= 1
    return (index - start) % 2 == 1  # flags pair the indicators from the first of the run


def _snippet(text: str, words: tuple[str, ...]) -> tuple[str, tuple[tuple[int, int], ...]] | None:
    """The snippet of `text` (composed: `_composed`) around its first matched word, or None
    unless every word occurs."""
    text = _composed(text)
    spans = [match.span() for match in _WORD.finditer(text) if _folded(match.group()) in words]
    found = {_folded(text[start:end]) for start, end in spans}
    if not spans or found != set(words):
        return None
    first = spans[0][0]
    begin = max(0, min(first - SNIPPET_CHARS // 4, len(text) - SNIPPET_CHARS))
    end = min(len(text), begin + SNIPPET_CHARS)
    # The cuts move outward, so that no flag, emoji sequence or accented letter is split;
    # by `_CLUSTER_CHARS` at most, so that a pile of marks (zalgo text) is still cut short.
    floor, ceiling = max(0, begin - _CLUSTER_CHARS), min(len(text), end + _CLUSTER_CHARS)
    while floor < begin and _joined(text, begin):
        begin -= 1
    while end < ceiling and _joined(text, end):
        end += 1
    prefix = "…" if begin else ""
    suffix = "…" if end < len(text) else ""
    shift = len(prefix) - begin
    # A matched word the cut goes through (one longer than the snippet) is highlighted
    # as far as it shows.
    highlights = tuple(
        (max(start, begin) + shift, min(stop, end) + shift)
        for start, stop in spans
        if start < end and stop > begin
    )
    return f"{prefix}{text[begin:end]}{suffix}", highlights


def document_hits(session: Session, words: tuple[str, ...]) -> Iterator[SearchHit]:
    """The documents of `session` that match `words` (`query_words`), in document order."""
    if not words:
        return
    for document in documents(session):
        found = _snippet(document.text, words)
        if found is not None:
            snippet, highlights = found
            yield SearchHit(
                session_id=session.session_id,
                agent_id=session.agent_id,
                loop_id=document.loop_id,
                turn_index=document.turn_index,
                message_index=document.message_index,
                kind=document.kind,
                snippet=snippet,
                highlights=highlights,
            )


def search_words(text: str, limit: int) -> tuple[str, ...]:
    """Check the arguments of `SessionStore.search` once, for every backend; returns `query_words(text)`.

    `TypeError` for a non-string text or a non-int limit; `InvalidQuery` (parameter
    ``limit``) unless 0 <= limit <= `MAX_COUNT`.
    """
    words = query_words(text)
    check_count("limit", limit, MAX_COUNT)
    return words
