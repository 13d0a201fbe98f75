"""Loop records kept with each distinct message once: templates and a session's book.

phi-core's loop record repeats its messages: ``MessageStart``/``MessageEnd``,
``TurnEnd``, ``AgentEnd``, the record's ``messages`` and ``turns`` all carry them, and
every ``TurnRequest`` carries the whole conversation so far, so a session's stored
size grows with the square of its length. A store keeps instead

* each distinct message once, as its compact JSON (the *body*, in the form the
  record writes it: agent form, or a ``TurnRequest``'s plain form), content-addressed
  by its `digest`;
* each loop as a *template*: its compact phi-core JSON (`codec.encode_loop_with`) with
  every message replaced by a marker, a NUL byte and the message's number in the
  session's `MessageBook`. JSON text never holds a raw NUL (encoders escape it in
  strings), so `expand` gives back the record's exact bytes;
* per session, which stored message each number stands for.

Templates are stored zlib-compressed (`pack`): what is left of a loop once its
messages are out is mostly the same keys, ids and timestamps again, which level 1
shrinks about sevenfold for a few microseconds per kilobyte.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgspec

from ..codec import encode_loop_with, encode_message, encode_plain_message
from ..errors import DecodeError, StoreError
from ..model import LoopRecord

__all__ = ["MessageBook", "digest", "expand", "numbers_in", "pack", "unpack"]

_MARK = b"\x00"  # the byte opening a marker
_MARKER = re.compile(rb"\x00(\d+)")
_LEVEL = 1  # zlib level: 6 gains a tenth in size for twice the time


def digest(body: bytes) -> bytes:
    """A message's content address: 16 bytes of BLAKE2b of its body."""
    return hashlib.blake2b(body, digest_size=16).digest()


def pack(template: bytes) -> bytes:
    """A template as stored."""
    return zlib.compress(template, _LEVEL)


def unpack(blob: bytes) -> bytes:
    """The template stored as `blob`; `DecodeError` if it is not one."""
    try:
        return zlib.decompress(blob)
    except zlib.error as error:
        raise DecodeError(f"not a stored loop template ({error})") from None


def numbers_in(template: bytes) -> set[int]:
    """The message numbers a template refers to."""
    return {int(number) for number in _MARKER.findall(template)}


def expand(template: bytes, bodies: Sequence[bytes | None]) -> bytes:
    """The loop's compact JSON: `template` with each marker replaced by its message's
    body (``bodies[number]``). `DecodeError` if a number has no body."""
    parts: list[Any] = _MARKER.split(template)
    try:
        parts[1::2] = [bodies[int(number)] for number in parts[1::2]]
        return b"".join(parts)
    except (IndexError, TypeError) as error:  # a number out of range, or a hole (None)
        raise DecodeError(f"a loop template refers to a message that is not stored ({error})") from None


class MessageBook:
    """The distinct messages of one session, numbered in the order first met.

    `digests` seeds the book with a stored session's numbering (None: a number no
    longer used), so that saving the session again numbers its messages as before
    and unchanged loops give unchanged templates. `template` numbers the messages
    it meets; the ones it adds are ``digests[seeded:]``, in `added` with their bodies.
    """

    def __init__(self, digests: Iterable[bytes | None] = ()) -> None:
        self.digests: list[bytes | None] = list(digests)
        self.seeded = len(self.digests)
        self.added: list[tuple[bytes, bytes]] = []  # (digest, body) of the numbers added here
        self._numbers = {address: n for n, address in enumerate(self.digests) if address is not None}
        self._markers = [msgspec.Raw(b"\x00%d" % n) for n in range(self.seeded)]
        self._used: list[int] = []  # the number of each marker written into the template being built
        self._agent_marker = self._marker_for(encode_message)
        self._plain_marker = self._marker_for(encode_plain_message)

    def template(self, record: LoopRecord) -> tuple[bytes, set[int]]:
        """`record`'s template and the message numbers it refers to."""
        used = self._used
        used.clear()
        template = encode_loop_with(record, agent=self._agent_marker, plain=self._plain_marker)
        # Counted as bytes.replace finds them (memchr), several times faster than bytes.count.
        if len(template) - len(template.replace(_MARK, b"")) != len(used):
            # A NUL the encoder did not escape would be read back as a marker.
            raise StoreError(f"loop {record.loop_id!r} encodes to JSON holding a NUL byte")
        return template, set(used)

    def _marker_for(self, encode: Callable[[Any], bytes]) -> Callable[[Any], msgspec.Raw]:
        """What a message of one form is written as: its number's marker. Called for every
        message a record repeats, so the common case (met before) is kept short; it holds
        the book's containers, not the book (no reference cycle keeps a book alive)."""
        # id(message) -> (its marker, its number, message): a conversation's messages are
        # the same objects in every record that repeats them. The message is held so that
        # its id is not reused while the book lives: an id found is the same message's.
        memo: dict[int, tuple[msgspec.Raw, int, Any]] = {}
        used, numbers = self._used, self._numbers
        digests, added, markers = self.digests, self.added, self._markers

        def marker(message: Any) -> msgspec.Raw:
            hit = memo.get(id(message))
            if hit is None:
                body = encode(message)
                address = digest(body)
                number = numbers.get(address)
                if number is None:
                    number = numbers[address] = len(digests)
                    digests.append(address)
                    added.append((address, body))
                    markers.append(msgspec.Raw(b"\x00%d" % number))
                hit = memo[id(message)] = (markers[number], number, message)
            used.append(hit[1])
            return hit[0]

        return marker
