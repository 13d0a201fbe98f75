"""One of several processes saving overlapping sessions to one PostgresStore at once.

Run by ``tests/test_store_postgres.py``::

    python pg_concurrency_worker.py DSN SCHEMA WORKER ROUNDS GATE_KEY

The worker opens the store, then waits on the shared advisory lock ``GATE_KEY``
that the test holds, so every worker starts saving at the same moment. In each
round it saves every session of `SESSION_IDS` with its own new loop, its own loop
of the previous round again (a later checkpoint of the same loop, now finished)
and the round's shared loop, which every worker saves too: as Running if the
worker number is odd, as Completed if it is even. Prints ``done`` at the end.
"""

from __future__ import annotations

import sys

from phi_session import Session
from phi_session.stores.conformance import at, make_loop, make_session

SESSION_IDS = ("shared-a", "shared-b", "shared-c")
SHARED_LOOPS = 4
"""How many distinct shared loops each session gets (round ``r`` saves shared loop ``r % SHARED_LOOPS``)."""


def own_loop_index(worker: int, round_: int) -> int:
    return worker * 1000 + round_


def shared_loop_index(round_: int) -> int:
    return 1_000_000 + round_ % SHARED_LOOPS


def round_session(session_id: str, worker: int, round_: int) -> Session:
    """What `worker` saves for `session_id` in round `round_`."""
    loops = [make_loop(session_id, own_loop_index(worker, round_), status="Running", events=1)]
    if round_ > 0:
        loops.append(make_loop(session_id, own_loop_index(worker, round_ - 1), events=3))
    loops.append(
        make_loop(
            session_id,
            shared_loop_index(round_),
            status="Completed" if worker % 2 == 0 else "Running",
            events=2,
        )
    )
    return make_session(session_id, loops=loops, last_active_at=at(round_))


def main(argv: list[str]) -> None:
    import psycopg

    from phi_session.stores.postgres import PostgresStore

    dsn, schema, worker, rounds, gate = argv[0], argv[1], int(argv[2]), int(argv[3]), int(argv[4])
    with PostgresStore(dsn, schema=schema, pool_size=1, lock_timeout=60) as store:
        with psycopg.connect(dsn, autocommit=True) as gate_conn:
            gate_conn.execute("SELECT pg_advisory_lock_shared(%s)", (gate,))
            gate_conn.execute("SELECT pg_advisory_unlock_shared(%s)", (gate,))
        for round_ in range(rounds):
            for session_id in SESSION_IDS:
                store.save(round_session(session_id, worker, round_))
    print("done")


if __name__ == "__main__":
    main(sys.argv[1:])
