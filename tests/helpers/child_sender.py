"""A separate process that sends tracked messages durably, then waits to be killed.

Used by the restart tests: ``python -m tests.helpers.child_sender DB HOST PORT COUNT``.
It prints READY once connected, reads one line (the go signal), sends COUNT
messages to bob through ``tracker.send_message`` (durable), flushes records and the
SM state into the store, prints FLUSHED and sleeps until SIGKILL. DB is an SQLite
file, or ``-`` for the PostgreSQL DSN in ``$CHILD_STORE_DSN`` (not on the command line,
which any local user can read).
"""

from __future__ import annotations

import asyncio
import os
import sys

from xmpp_sm_tracker import SQLiteStore, TrackerStore
from xmpp_sm_tracker.stores.postgres import PostgresStore
from xmpp_sm_tracker.testing.client import connect_client, make_client, tracker_of, wait_for

DSN_VARIABLE = "CHILD_STORE_DSN"


#: The child's lease on alice's account in PostgreSQL: the next process waits this long
#: after the SIGKILL before it may take the account over.
LEASE_TTL = 2.0


def open_store(where: str, *, read_only: bool = False) -> TrackerStore:
    """alice's store: the SQLite file ``where``, or PostgreSQL for a DSN."""
    if where == "-":
        where = os.environ[DSN_VARIABLE]
    if where.startswith("postgresql://"):
        return PostgresStore(
            where, account="alice@localhost", read_only=read_only, lease_ttl=LEASE_TTL
        )
    return SQLiteStore(where, read_only=read_only)


async def take_over(store: TrackerStore) -> None:
    """Open ``store`` as the next owner: for PostgreSQL, once the killed one's lease lapsed."""
    if isinstance(store, PostgresStore):
        await store.take_over(poll=0.1, timeout=LEASE_TTL * 5)


async def main(db: str, host: str, port: int, count: int) -> None:
    xmpp = make_client("alice@localhost/child", "pass", tracker_config={"ack_delay": 0.05})
    tracker = tracker_of(xmpp)
    store = open_store(db)
    await take_over(store)
    await tracker.attach(store)
    tracker.sm.load(await store.load_sm_state())
    tracker.sm.cache(store.save_sm_state)
    await connect_client(xmpp, (host, port))
    await wait_for(lambda: tracker.sm.calls > 0)
    print("READY", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for i in range(count):
        await tracker.send_message("bob@localhost", f"durable {i}")
    await wait_for(lambda: all(r.seq is not None for r in tracker.core.records.values()))
    await tracker.flush()
    print("FLUSHED", flush=True)
    await asyncio.sleep(3600)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
