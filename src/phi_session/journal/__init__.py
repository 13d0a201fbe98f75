"""A write-ahead journal of agent events: append-only, segmented, checksummed, recoverable.

Every event is appended to the journal *before* a recorder applies it
(`JournaledRecorder`), so a process that dies mid-run loses no acknowledged
event: `recover` replays the journal into a fresh recorder and saves every session
into a store.

The package in layers: `format` (the on-disk layout: segments, frames, checksums,
reading back with damage skipped, the checkpoint and lock files), `writer` (`Journal`,
and the order of its locks), `adapter` (`JournaledRecorder`), `recovery` (`recover`,
`read_records`). A writer never appends to a segment it did not create: a new
`Journal` on an existing directory starts a new segment after the ones left by an
earlier run (the *leftovers*), whose last frame may be torn.

Durability policies (what an *acknowledged* event survives):

* ``"always"``: `Journal.append` returns after the record is fsynced (threads
  appending at once share an fsync). Acknowledged = appended. Survives a process
  kill and an OS crash or power loss (if the disk honours fsync).
* ``"interval"``: records wait in the process; a flusher thread writes and fsyncs
  them every ``interval_ms`` (sooner once 4 MiB wait), then acknowledges them
  (`acknowledged_seq`, `wait_acknowledged`). Acknowledged events survive a process
  kill and a power loss; events appended in the last ``interval_ms`` or so (not yet
  acknowledged) may be lost by either.
* ``"os"``: every record is handed to the OS (``write``) before `append` returns;
  fsync only when a segment is full and on `close`. Acknowledged = appended. Survives
  a process kill, not an OS crash or power loss (the kernel writes dirty pages back
  within ~30 s).

A failed write or fsync (a full disk) raises `StoreError` and the journal then refuses
appends (``"os"`` and ``"always"`` write each record in `append`, so `JournaledRecorder`
refuses an event whose write failed; an fsync that fails after, `EventNotDurable`);
`close` still closes and unlocks (and raises `StoreError`), so `recover` can run at
once and brings back every acknowledged event.

When a segment is deleted (never before every event in it is safe elsewhere):

* `recover`, after it saved every session rebuilt from the segments it replayed (and
  wrote their orphans and the records it could not decode): all of those segments,
  i.e. every segment of a directory no writer holds, or the leftovers of an open
  `Journal` (never its own segments);
* `Journal.release(stored_below, ...)`: a segment other than the active one whose
  records are all numbered below `stored_below`. `AutoPersistingRecorder` passes the
  first record number of the oldest session not yet saved (held in memory, queued or
  refused by the store); the promise is recorded in ``checkpoint.json`` so that
  `recover` skips what was saved;
* `Journal.close`: the segments `release` covered, and an active one holding nothing.
"""

from ..errors import EventNotDurable, JournalLocked, NotAJournal, RecoveryError
from .adapter import JournaledRecorder
from .format import CHECKPOINT_FILE as CHECKPOINT_FILE
from .format import MAGIC as MAGIC
from .format import ORPHANS_FILE as ORPHANS_FILE
from .recovery import JournalRecord, RecoveryReport, read_records, recover
from .writer import Durability, Journal

__all__ = [
    "Durability",
    "EventNotDurable",
    "Journal",
    "JournalLocked",
    "JournalRecord",
    "JournaledRecorder",
    "NotAJournal",
    "RecoveryError",
    "RecoveryReport",
    "read_records",
    "recover",
]
