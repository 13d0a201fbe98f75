"""`search`: the words of a text, as every store's index and queries take them."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from phi_session.stores.search import query_words


def rule_words(text: str) -> tuple[str, ...]:
    """The match rule as the module docstring states it: each run of word characters,
    lower-cased on its own, once, in order of first occurrence."""
    return tuple(dict.fromkeys(word.lower() for word in re.findall(r"\w+", text)))


@pytest.mark.parametrize(
    "text",
    [
        "".join(map(chr, range(128))),  # every ASCII character, each a boundary or a word character
        "Brew COFFEE, brew_coffee2 (coffee)\nbrew\tcoffee",
        '{"path": "src/Main.py", "max_results": 10}',
        "İstanbul İSTANBUL istanbul",  # lowered whole, "İ" would end a word at its combining dot
        "Straße STRASSE ǅemal ǆemal café CAFÉ 東京 ١٢٣",
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
