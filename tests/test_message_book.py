"""`message_book`: loop templates with each distinct message replaced by its number."""

from __future__ import annotations

import msgspec
import pytest

from phi_session.codec import encode_loop
from phi_session.errors import StoreError
from phi_session.stores.conformance import at, talking_loop
from phi_session.stores.message_book import MessageBook, expand, numbers_in


def test_a_template_expands_to_the_loop_json_and_names_its_messages() -> None:
    book = MessageBook()
    record = talking_loop("a", 1, "brew coffee")
    template, numbers = book.template(record)
    assert numbers == numbers_in(template) == set(range(len(book.digests)))
    assert [address for address, _ in book.added] == book.digests
    bodies = [body for _, body in book.added]
    assert expand(template, bodies) == encode_loop(record, pretty=False)
    # Met again (another loop repeating them): the same numbers, nothing added.
    assert book.template(record) == (template, numbers)
    assert len(book.added) == len(bodies)
    later = talking_loop("a", 2, "grind beans", started_at=at(5))
    template, numbers = book.template(later)
    assert expand(template, [body for _, body in book.added]) == encode_loop(later, pretty=False)
    assert numbers == numbers_in(template)


def test_a_seeded_book_numbers_stored_messages_as_before() -> None:
    record = talking_loop("a", 1, "brew coffee")
    first = MessageBook()
    template, _ = first.template(record)
    again = MessageBook(first.digests)
    assert again.template(record)[0] == template
    assert again.added == []


def test_a_loop_whose_json_holds_a_raw_nul_is_refused() -> None:
    # A NUL the encoder did not escape would read back as a marker.
    record = msgspec.structs.replace(talking_loop("a", 1, "brew coffee"), metadata=msgspec.Raw(b'"\x00"'))
    with pytest.raises(StoreError, match="NUL"):
        MessageBook().template(record)
