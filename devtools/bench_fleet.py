"""Store benchmarks (state changes, start-up recovery) and the fleet run (issue 18).

The fleet run: many accounts in one process, each a slixmpp client, all tracked through
one shared store (one SQLite file, or one PostgreSQL pool), each sending a few messages
to the next account. It reports messages per second until every one was received (and,
tracked, acked), the memory each idle tracked client holds (tracemalloc: Python's heap,
the whole client with slixmpp), and the store's transactions per second. Bare slixmpp
clients run the same fleet beside them, so the numbers read as ratios.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import slixmpp

from xmpp_sm_tracker.core.records import TrackedMessage
from xmpp_sm_tracker.core.states import DeliveryState
from xmpp_sm_tracker.stores.base import TrackerStore
from xmpp_sm_tracker.stores.postgres import PostgresDatabase
from xmpp_sm_tracker.stores.sqlite import SQLiteDatabase
from xmpp_sm_tracker.testing import ProsodyServer
from xmpp_sm_tracker.testing.client import connect_client, make_client, tracker_of, wait_for
from xmpp_sm_tracker.writer import StoreWriter

__all__ = [
    "FLEET_KINDS",
    "FLEET_PASSWORD",
    "bench_records",
    "disconnect_client",
    "fill_store",
    "fleet_database",
    "fleet_names",
    "fleet_run",
    "recover_run",
    "store_changes_run",
    "store_ids_run",
]

Progress = Callable[[str], None]
#: The fleet's columns: bare slixmpp, and the tracker on each shared store.
FLEET_KINDS = ("bare", "sqlite", "postgres")
FLEET_PASSWORD = "fleet-pass"
_MESSAGE_XML = (
    "<message xmlns='jabber:client' to='bob@localhost' type='chat' id='{id}'>"
    "<body>recovered message number {n}</body>"
    "<origin-id xmlns='urn:xmpp:sid:0' id='{id}'/></message>"
)
#: Clients connecting at once (Prosody and the event loop take them in turn anyway).
_CONNECTING = 50


class SharedDatabase(Protocol):
    """What the fleet needs of SQLiteDatabase and PostgresDatabase."""

    @property
    def transactions(self) -> int: ...

    def store(self, account: str) -> TrackerStore: ...

    async def aclose(self) -> None: ...


def bench_records(
    n: int, state: DeliveryState, now: float, new_id: Callable[[], str] | None = None
) -> list[TrackedMessage]:
    """``n`` records as the tracker writes them, for the store benchmarks; ids from
    ``new_id``, or ``bench-0000000`` on (in order, as time-ordered ids are)."""
    ids = [new_id() if new_id is not None else f"bench-{i:07d}" for i in range(n)]
    return [
        TrackedMessage(
            id=message_id,
            origin_id=message_id,
            to="bob@localhost",
            type="chat",
            body=f"recovered message number {i}",
            state=state,
            xml=_MESSAGE_XML.format(id=message_id, n=i),
            created_at=now + i * 1e-6,
            updated_at=now + i * 1e-6,
            seq=i + 1,
        )
        for i, message_id in enumerate(ids)
    ]


async def store_changes_run(store: TrackerStore, changes: int, burst: int) -> dict[str, Any]:
    """Half the changes new SENT records, half the same records ACKED, through the
    tracker's StoreWriter (``burst`` changes per event-loop turn); closes ``store``."""
    half = changes // 2
    now = time.time()
    sent = bench_records(half, DeliveryState.SENT, now)
    acked = [r.moved(DeliveryState.ACKED, now + 1) for r in sent]
    opener = getattr(store, "open", None)
    if opener is not None:
        await opener()  # not timed: opening is the recovery benchmark's business
    try:
        writer = StoreWriter(store)
        start = time.perf_counter()
        for batch in (sent, acked):
            for i, record in enumerate(batch, start=1):
                writer.put(record)
                if i % burst == 0:
                    await asyncio.sleep(0)
        await writer.flush()
        seconds = time.perf_counter() - start
        last = await store.get(acked[-1].id)
        pending = len(await store.pending())
    finally:
        await store.aclose()
    return {
        "changes": 2 * half,
        "burst": burst,
        "seconds": seconds,
        "changes_per_s": 2 * half / seconds,
        "last_state": last.state.value if last is not None else None,
        "pending_after": pending,
    }


def _bytes_written() -> int | None:
    """Bytes this process has handed to write calls so far (Linux), or None."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


async def store_ids_run(
    store: TrackerStore, kept: int, messages: int, batch: int, new_id: Callable[[], str]
) -> dict[str, Any]:
    """What a store's index of ids costs per message: ``kept`` settled records first
    (not timed), then ``messages`` sent and acked as on a busy live link, each
    transaction writing ``batch`` new records and the acks of the ``batch`` before.
    Process CPU (the store's thread included) and bytes written per message; ids from
    ``new_id`` (slixmpp's random ones or the tracker's time-ordered ones). Closes ``store``."""
    now = time.time()
    history = bench_records(kept, DeliveryState.ACKED, now - 3600, new_id)
    sent = bench_records(messages, DeliveryState.SENT, now, new_id)
    acked = [r.moved(DeliveryState.ACKED, now + 1) for r in sent]
    try:
        for i in range(0, kept, 10_000):
            await store.upsert(history[i : i + 10_000])
        gc.collect()
        cpu, written = time.process_time(), _bytes_written()
        for i in range(0, messages + batch, batch):
            await store.upsert([*sent[i : i + batch], *acked[max(0, i - batch) : i]])
        cpu = time.process_time() - cpu
        after = _bytes_written()
        pending = len(await store.pending())
    finally:
        await store.aclose()
    return {
        "kept": kept,
        "messages": messages,
        "batch": batch,
        "cpu_us": 1e6 * cpu / messages,
        "bytes": None if written is None or after is None else (after - written) / messages,
        "pending_after": pending,
    }


async def fill_store(store: TrackerStore, n: int) -> None:
    """``n`` records in flight, written 10 000 at a time; closes ``store``."""
    try:
        records = bench_records(n, DeliveryState.SENT, time.time())
        for i in range(0, n, 10_000):
            await store.upsert(records[i : i + 10_000])
    finally:
        await store.aclose()


async def recover_run(store: TrackerStore, n: int) -> dict[str, Any]:
    """A fresh process's ``attach()``: open the store, load and adopt what is in flight."""
    alice = make_client("alice@localhost/recover", FLEET_PASSWORD)
    tracker = tracker_of(alice)
    try:
        start = time.perf_counter()
        await tracker.attach(store)
        seconds = time.perf_counter() - start
        recovered = len(tracker.core.records)
    finally:
        await store.aclose()
    return {"records": n, "recovered": recovered, "seconds": seconds}


# ---------------------------------------------------------------------- the fleet


def fleet_names(accounts: int) -> list[str]:
    """The fleet's user names (letters and digits: ProsodyServer.register_many)."""
    return [f"fleet{i}" for i in range(accounts)]


async def fleet_run(
    server: ProsodyServer,
    kind: str,
    accounts: int,
    per_account: int,
    database: SharedDatabase | None,
    say: Progress,
) -> dict[str, Any]:
    """One fleet: connect ``accounts`` clients (tracked through ``database``'s stores
    unless ``kind`` is "bare"), each sends ``per_account`` messages to the next one."""
    tracked = kind != "bare"
    jids = [f"{name}@localhost" for name in fleet_names(accounts)]
    received: dict[str, int] = {}
    acked = 0

    def on_acked(_message: Any) -> None:
        nonlocal acked
        acked += 1

    def on_message(message: Any) -> None:
        body = message["body"]
        if body.startswith(f"{kind}:"):
            received[body] = received.get(body, 0) + 1

    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    clients: list[slixmpp.ClientXMPP] = []
    for jid in jids:
        xmpp = make_client(f"{jid}/{kind}", FLEET_PASSWORD, tracked=tracked)
        xmpp.add_event_handler("message", on_message)
        if tracked:
            assert database is not None
            tracker = tracker_of(xmpp)
            store = database.store(jid)
            await tracker.attach(store)
            tracker.sm.load(await store.load_sm_state())
            tracker.sm.cache(store.save_sm_state)
            xmpp.add_event_handler("message:acked", on_acked)
        clients.append(xmpp)
    connecting = asyncio.Semaphore(_CONNECTING)

    async def connect(xmpp: slixmpp.ClientXMPP) -> None:
        async with connecting:
            await connect_client(xmpp, server.address, timeout=60)

    started = time.perf_counter()
    try:
        await asyncio.gather(*(connect(x) for x in clients))
        connect_s = time.perf_counter() - started
        if tracked:
            await asyncio.gather(*(tracker_of(x).flush() for x in clients))
        for _ in range(3):
            await asyncio.sleep(0)
        gc.collect()
        idle = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        say(f"fleet {kind}: {accounts} clients connected in {connect_s:.1f} s")
        total = accounts * per_account
        transactions = database.transactions if database is not None else 0
        start = time.perf_counter()
        for i, xmpp in enumerate(clients):
            peer = jids[(i + 1) % accounts]
            for n in range(per_account):
                xmpp.send_message(mto=peer, mbody=f"{kind}:{i}:{n}", mtype="chat")
        await wait_for(
            lambda: len(received) >= total and (not tracked or acked >= total),
            timeout=max(60.0, total / 100),
            interval=0.01,
        )
        seconds = time.perf_counter() - start
        if tracked:
            await asyncio.gather(*(tracker_of(x).flush() for x in clients))
        store_s = time.perf_counter() - start
        transactions = (database.transactions if database is not None else 0) - transactions
        await asyncio.sleep(0.3)  # a duplicate would show now
    finally:
        if tracemalloc.is_tracing():
            tracemalloc.stop()
        await asyncio.gather(*(_close(x, tracked) for x in clients))
    return {
        "variant": kind,
        "accounts": accounts,
        "messages": total,
        "connect_s": connect_s,
        "seconds": seconds,
        "msgs_per_s": total / seconds,
        "acked": acked if tracked else None,
        "lost": total - len(received),
        "duplicated": sum(n - 1 for n in received.values()),
        "bytes_per_idle_client": idle / accounts,
        "transactions": transactions,
        "transactions_per_s": transactions / store_s if tracked else None,
    }


async def disconnect_client(xmpp: slixmpp.ClientXMPP) -> None:
    """A graceful close that gives up after a few seconds."""
    if xmpp.transport is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(xmpp.disconnect(wait=2.0), 10)
        if xmpp.transport is not None:
            xmpp.abort()
    # slixmpp cancels its send-queue task only when the client is garbage-collected,
    # which destroys the task while it is still pending: stop it here instead.
    task = getattr(xmpp, "_run_out_filters", None)
    if task is not None and not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _close(xmpp: slixmpp.ClientXMPP, tracked: bool) -> None:
    """Disconnect; a tracked client hands its last SM state (None) to its store too,
    before the caller closes the shared database."""
    await disconnect_client(xmpp)
    if tracked:
        await tracker_of(xmpp).flush()


def fleet_database(kind: str, sqlite_path: Path, dsn: str) -> SharedDatabase | None:
    """The one store a fleet run shares: None for bare slixmpp."""
    if kind == "sqlite":
        return SQLiteDatabase(sqlite_path)
    if kind == "postgres":
        return PostgresDatabase(dsn, max_connections=10)
    return None
