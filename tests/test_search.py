"""`search`: the words of a text, as every store's index and queries take them."""

from __future__ import annotations

import re
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from phi_session.stores.search import query_words


def rule_words(text: str) -> tuple[str, ...]:
    """The match rule as the module docstring states it: each run of word characters of
    the composed text (NFC), lower-cased on its own, once, in order of first occurrence."""
    composed = unicodedata.normalize("NFC", text)
    return tuple(dict.fromkeys(word.lower() for word in re.findall(r"\w+", composed)))


@pytest.mark.parametrize(
    "text",
    [
        "".join(map(chr, range(128))),  # every ASCII character, each a boundary or a word character
        "Brew COFFEE, brew_coffee2 (coffee)\nbrew\tcoffee",
        '{"path": "src/Main.py", "max_results": 10}',
        "İstanbul İSTANBUL istanbul",  # lowered whole, "İ" would end a word at its combining dot
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
