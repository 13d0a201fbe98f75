"""Scale-out through NATS JetStream: many agent processes, one store, every event recorded once.

Install with ``pip install 'phi-session[nats]'`` (nats-py; the worker also needs the
``postgres`` extra). The picture::

    agents ──JetStreamSink──▶ JetStream stream ──▶ N IngestWorkers ──▶ PostgreSQL ◀── phi-session serve
             (bounded buffer,   (partitions by       (durable pull        (PostgresStore)
              local spill)       session)             consumers)

* `JetStreamSink` (`sink`): a `Sink` that publishes each event with a stable id,
  never blocking the agent beyond a bounded buffer, spilling to a local journal
  while the broker is unreachable.
* `IngestWorker` (`worker`): records a share of the partitions into a
  `PostgresStore`; acknowledges an event only once it is staged in PostgreSQL
  (`staging`), records each event id once, saves through `SessionSaver`.
* `StreamSettings` (`settings`): the stream both sides agree on.

At least once on the wire, exactly once in the store: JetStream drops a retried
publish within its duplicate window; the worker drops any later copy by event id.

This package imports without nats-py; using the sink or the worker without it
raises `MissingExtra` naming the extra.
"""

from .settings import StreamSettings, partition_of
from .sink import JetStreamSink, SinkStats
from .worker import IngestWorker, PartitionStatus, WorkerStats, ingest_status

__all__ = [
    "IngestWorker",
    "JetStreamSink",
    "PartitionStatus",
    "SinkStats",
    "StreamSettings",
    "WorkerStats",
    "ingest_status",
    "partition_of",
]
