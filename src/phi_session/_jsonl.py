"""Appending JSON lines to a file a crash or a full disk may have left with a torn last line."""

from __future__ import annotations

import os


def ends_mid_line(fd: int) -> bool:
    """Whether the file open for reading at `fd` ends inside a line (a write cut short).

    Lines appended to it must start with a newline, or the first would be glued to the
    torn one and be unreadable with it. Moves the descriptor's position.
    """
    size = os.lseek(fd, 0, os.SEEK_END)
    if not size:
        return False
    os.lseek(fd, size - 1, os.SEEK_SET)
    return os.read(fd, 1) != b"\n"
