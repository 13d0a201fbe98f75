"""`search`: the words of a text, as every store's index and queries take them."""

from __future__ import annotations

import re
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from phi_session.messages import TextContent, UserMessage
from phi_session.model import Session
from phi_session.stores.conformance import EXAMPLES_DIR, make_loop, make_session, record_lines
from phi_session.stores.search import SNIPPET_CHARS, document_hits, documents, query_words


def rule_words(text: str) -> tuple[str, ...]:
    """The match rule as the module docstring states it: each run of word characters of
    the composed text (NFC), case-folded on its own, once, in order of first occurrence."""
    composed = unicodedata.normalize("NFC", text)
    return tuple(dict.fromkeys(word.casefold() for word in re.findall(r"\w+", composed)))


@pytest.mark.parametrize(
    "text",
    [
        "".join(map(chr, range(128))),  # every ASCII character, each a boundary or a word character
        "Brew COFFEE, brew_coffee2 (coffee)\nbrew\tcoffee",
        '{"path": "src/Main.py", "max_results": 10}',
        "İstanbul İSTANBUL istanbul",  # folded whole, "İ" would end a word at its combining dot
        "Straße STRASSE ǅemal ǆemal café CAFÉ 東京 ١٢٣",
        "re\u0301sume\u0301 Zoe\u0308 cafe\u0301",  # decomposed accents: one word each, as composed
        "",
    ],
)
def test_query_words_follow_the_rule(text: str) -> None:
    assert query_words(text) == rule_words(text)


@given(st.text())
def test_query_words_follow_the_rule_for_any_text(text: str) -> None:
    assert query_words(text) == rule_words(text)


@given(st.text(st.characters(max_codepoint=127)))
def test_query_words_follow_the_rule_for_any_ascii_text(text: str) -> None:
    assert query_words(text) == rule_words(text)


def test_decomposed_and_composed_accents_are_the_same_words() -> None:
    # NFD text (macOS file names, some model outputs) and the NFC a user types.
    composed = "Send the r\u00e9sum\u00e9 to Zo\u00eb"
    decomposed = unicodedata.normalize("NFD", composed)
    assert decomposed != composed
    expected = ("send", "the", "r\u00e9sum\u00e9", "to", "zo\u00eb")
    assert query_words(decomposed) == query_words(composed) == expected


@pytest.mark.spec  # phi-core's example streams
@pytest.mark.parametrize("name", ["events-basic.jsonl", "events-parallel.jsonl", "events-subagent.jsonl"])
def test_a_loop_cut_off_before_its_end_finds_its_words_in_their_turns(name: str) -> None:
    # Its messages are those of its MessageEnd events, which carry no turnId: each takes
    # the turn its events put it in, as AgentEnd's messages have it (the prompt outside).
    lines = [line for line in (EXAMPLES_DIR / name).read_bytes().split(b"\n") if line]
    cut = [line for line in lines if b'"type":"AgentEnd"' not in line]

    def places(sessions: list[Session]) -> list[tuple[str, int | None, int, str, str]]:
        return [
            (document.loop_id, document.turn_index, document.message_index, document.kind, document.text)
            for session in sessions
            for document in documents(session)
        ]

    assert any(turn is not None for _, turn, *_ in places(record_lines(cut)))
    assert sorted(places(record_lines(cut)), key=str) == sorted(
        places(record_lines(lines)), key=str
    )  # loops in any order


@pytest.mark.spec  # phi-core's example stream
def test_a_milk_bank_hit_of_a_cut_loop_names_its_turn() -> None:
    lines = (EXAMPLES_DIR / "events-basic.jsonl").read_bytes().split(b"\n")
    [session] = record_lines([line for line in lines if line and b'"type":"AgentEnd"' not in line])
    hits = list(document_hits(session, query_words("milk bank")))
    assert [(hit.turn_index, hit.message_index, hit.kind) for hit in hits] == [
        (0, 2, "tool_result"),
        (1, 3, "text"),
    ]


def _hit(text: str, query: str) -> tuple[str, tuple[tuple[int, int], ...]]:
    """The snippet and highlights of `query`'s one hit in a loop whose prompt is `text`."""
    loop = make_loop("s", 1)
    loop.messages = (UserMessage(content=(TextContent(text=text),), timestamp=0),)
    [hit] = document_hits(make_session("s", loops=[loop]), query_words(query))
    return hit.snippet, hit.highlights


@pytest.mark.parametrize(
    "unit",
    [
        "\U0001f1eb\U0001f1f7",  # a flag: two regional indicators
        "\U0001f44d\U0001f3fd",  # a thumb and its skin tone
        "\U0001f468\u200d\U0001f469\u200d\U0001f467",  # a family: three people joined by ZWJs
        "\u2764\ufe0f",  # a heart and its emoji variation selector
        "\u00e9\u0302",  # a letter and a combining mark that does not compose with it
        "\u0915\u093f",  # a Devanagari consonant and its spacing vowel sign
    ],
)
@pytest.mark.parametrize("offset", range(5))
def test_a_snippet_never_splits_a_character_the_reader_sees_as_one(unit: str, offset: int) -> None:
    # Cut anywhere in a run of them (the offset moves the cut), at either end.
    text = "." * offset + unit * 60 + " target " + unit * 60 + "." * offset
    snippet, highlights = _hit(text, "target")
    assert snippet.startswith("\u2026") and snippet.endswith("\u2026")
    assert snippet[1:-1].replace(unit, "") == " target "
    assert [snippet[start:end] for start, end in highlights] == ["target"]


def test_a_snippet_cuts_a_pile_of_marks_short() -> None:
    # Zalgo text: one letter under thousands of marks is cut all the same, a few marks on.
    snippet, _ = _hit("target e" + "\u0302" * 5000, "target")
    assert SNIPPET_CHARS < len(snippet) <= SNIPPET_CHARS + 40


def test_a_word_longer_than_the_snippet_is_highlighted_where_it_shows() -> None:
    snippet, highlights = _hit("see " + "x" * 400 + " there", "x" * 400)
    assert snippet == "see " + "x" * (SNIPPET_CHARS - 4) + "\u2026"
    assert highlights == ((4, SNIPPET_CHARS),)
    snippet, highlights = _hit("a " * 100 + "y" * 400 + " b", "y" * 400)
    assert snippet == "\u2026" + "a " * 20 + "y" * (SNIPPET_CHARS - 40) + "\u2026"
    assert highlights == ((41, 1 + SNIPPET_CHARS),)
