"""Processes the broker tests start: ``producer`` publishes a workload stream through a
`JetStreamSink`; ``worker`` runs an `IngestWorker` until SIGTERM (it prints ``ready`` once
a SIGTERM stops it cleanly).

    python broker_processes.py producer URL STREAM PREFIX SPILL_DIR SEED SESSIONS
    python broker_processes.py worker URL DSN SCHEMA STREAM PREFIX
    python broker_processes.py spill_limited URL STREAM PREFIX SPILL_DIR SEED FILE_BYTES

``spill_limited`` publishes one session while the broker is down, its spill journals
limited to FILE_BYTES each (RLIMIT_FSIZE: a full disk), prints ``spilled``, then
flushes (the test starts the broker meanwhile), closes and prints what was published.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import workload

from phi_session.broker import IngestWorker, JetStreamSink


def producer(url: str, stream: str, prefix: str, spill: str, seed: str, sessions: str) -> None:
    with JetStreamSink(url, stream=stream, subject_prefix=prefix, partitions=4, spill_dir=spill) as sink:
        for event in workload.events(int(sessions), seed=int(seed)):
            sink(event)
        if not sink.flush(120):
            sys.exit("not flushed")


def spill_limited(url: str, stream: str, prefix: str, spill: str, seed: str, file_bytes: str) -> None:
    events = list(workload.events(1, seed=int(seed)))
    unlimited = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(file_bytes), unlimited[1]))
    sink = JetStreamSink(
        url,
        stream=stream,
        subject_prefix=prefix,
        partitions=1,
        spill_dir=spill,
        buffer=100,
        publish_timeout=0.5,
    )
    for event in events:
        sink(event)
    resource.setrlimit(resource.RLIMIT_FSIZE, unlimited)
    print("spilled", flush=True)
    flushed = sink.flush(60)
    sink.close()
    print("flushed" if flushed else "not flushed", sink.stats().published, flush=True)


def worker(url: str, dsn: str, schema: str, stream: str, prefix: str) -> None:
    ingest = IngestWorker(
        url,
        dsn,
        schema=schema,
        stream=stream,
        subject_prefix=prefix,
        partitions=4,  # as the producers: whichever side creates the stream, it has four
        ack_wait=2.0,
        checkpoint_interval=0.3,
        rebalance_interval=0.3,
    )

    async def main() -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, ingest.stop)
        print("ready", flush=True)  # a SIGTERM before this ended it with -15, stats unprinted
        await ingest.run()

    asyncio.run(main())
    print(ingest.stats, flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    {"producer": producer, "worker": worker, "spill_limited": spill_limited}[sys.argv[1]](*sys.argv[2:])
