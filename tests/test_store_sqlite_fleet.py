"""Issue 18, a fleet in one process: many accounts in one SQLite file (``SQLiteDatabase``).

Each account gets a view (``db.store(account)``) that passes the whole contract suite
(test_store_contract.py runs it beside a neighbour account); this file proves what only
a shared file has to: accounts kept apart, writes of many views sharing transactions,
one view per account, the database's lifecycle, and files of the one-account schema
(version 1) migrated in place.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from xmpp_sm_tracker import DeliveryState, SQLiteDatabase, SQLiteStore, StoreError
from xmpp_sm_tracker import stores as stores_package
from xmpp_sm_tracker.stores.sqlite_schema import FIELDS, SCHEMA_VERSION, row_of
from xmpp_sm_tracker.testing import LocalXMPPServer
from xmpp_sm_tracker.testing.client import ClientPool

from .test_store_contract import NESTED, record
from .test_store_sqlite import ids, raw, user_version

S = DeliveryState
ALICE, ALICE2 = "alice@example.org", "alice@example.net"


def test_it_is_exported_from_the_package_and_stores() -> None:
    import xmpp_sm_tracker

    assert xmpp_sm_tracker.SQLiteDatabase is SQLiteDatabase is stores_package.SQLiteDatabase
    assert "SQLiteDatabase" in xmpp_sm_tracker.__all__
    assert "SQLiteDatabase" in stores_package.__all__


# ------------------------------------------------------------------ accounts apart


async def test_two_accounts_in_one_file_never_see_each_other(tmp_path: Path) -> None:
    async with SQLiteDatabase(tmp_path / "fleet.sqlite") as db:
        one, two = db.store(ALICE), db.store(ALICE2)
        # The same ids in both: keyed by (account, id).
        await one.upsert([record(1), record(2, S.FAILED), record(4, S.FAILED)])
        await two.upsert([record(1, S.ACKED), record(3, S.FAILED), record(4, S.FAILED)])
        await one.save_sm_state({"version": 1, "id": "one"})
        assert await two.load_sm_state() is None
        await two.save_sm_state({"version": 1, "id": "two"})

        assert ids(await one.pending()) == ["m1"]
        assert await two.pending() == []
        got = await two.get("m1")
        assert got is not None and got.state is S.ACKED
        assert await one.get("m3") is None
        assert ids(await one.conversation("bob@example.org")) == ["m1", "m2", "m4"]
        assert await one.delete_failed("bob@example.org") == 2
        assert ids(await two.failed()) == ["m3", "m4"]
        assert await one.delete("m3") is False
        assert await two.delete("m1") is True
        assert ids(await one.pending()) == ["m1"]
        await one.save_sm_state(None)
        assert await one.load_sm_state() is None
        assert await two.load_sm_state() == {"version": 1, "id": "two"}
        assert await two.counts() == [("bob@example.org", "failed", 2)]
        assert ids(await two.all_records()) == ["m3", "m4"]
        assert await db.accounts() == [ALICE2, ALICE]
        assert await one.delete("m1") is True
        assert await db.accounts() == [ALICE2]  # alice@example.org has nothing left


async def test_accounts_lists_every_account_with_records_or_a_state(tmp_path: Path) -> None:
    async with SQLiteDatabase(tmp_path / "fleet.sqlite") as db:
        assert await db.accounts() == []
        await db.store("b@example.org").upsert([record(1)])
        await db.store("a@example.org").save_sm_state(NESTED)
        db.store("c@example.org")  # opened, never written: not listed
        assert await db.accounts() == ["a@example.org", "b@example.org"]


@pytest.mark.parametrize("bad", ["", "alice@example.org/phone", " alice@example.org", "a\n"])
def test_an_account_must_be_a_bare_jid(tmp_path: Path, bad: str) -> None:
    db = SQLiteDatabase(tmp_path / "fleet.sqlite")
    with pytest.raises(ValueError, match="bare JID"):
        db.store(bad)


async def test_a_second_store_for_one_account_is_refused_while_the_first_is_open(
    tmp_path: Path,
) -> None:
    async with SQLiteDatabase(tmp_path / "fleet.sqlite") as db:
        first = db.store(ALICE)
        await first.upsert([record(1)])
        with pytest.raises(StoreError, match=rf"{ALICE}.*already open"):
            db.store(ALICE)
        other = db.store(ALICE2)  # another account is fine
        await first.aclose()
        assert first.closed and not other.closed and not db.closed
        again = db.store(ALICE)  # closed: free again, and its records are there
        assert ids(await again.pending()) == ["m1"]


# ------------------------------------------------------------------ shared transactions


async def test_five_hundred_views_writing_at_once_share_a_few_transactions(
    tmp_path: Path,
) -> None:
    async with SQLiteDatabase(tmp_path / "fleet.sqlite") as db:
        views = [db.store(f"user{n}@example.org") for n in range(500)]
        await views[0].pending()  # opened (and the schema made) before counting
        before = db.transactions
        await asyncio.gather(
            *(view.upsert([record(n), record(n + 1000)]) for n, view in enumerate(views))
        )
        used = db.transactions - before
        assert 1 <= used <= 5, used
        for n in (0, 250, 499):
            assert ids(await views[n].pending()) == [f"m{n}", f"m{n + 1000}"]
        assert raw(tmp_path / "fleet.sqlite", "SELECT COUNT(*) FROM records") == [(1000,)]


async def test_a_batch_window_gathers_writes_made_one_after_another(tmp_path: Path) -> None:
    async with SQLiteDatabase(tmp_path / "fleet.sqlite", batch_window=0.05) as db:
        views = [db.store(f"user{n}@example.org") for n in range(20)]
        await views[0].pending()
        before = db.transactions
        tasks = []
        for n, view in enumerate(views):
            tasks.append(asyncio.ensure_future(view.upsert([record(n)])))
            await asyncio.sleep(0.001)  # a different loop turn each
        await asyncio.gather(*tasks)
        assert db.transactions - before == 1


async def test_one_bad_account_in_a_shared_transaction_fails_alone(tmp_path: Path) -> None:
    async with SQLiteDatabase(tmp_path / "fleet.sqlite", batch_window=0.02) as db:
        good, bad, other = db.store("a@example.org"), db.store("b@example.org"), db.store(ALICE)
        results = await asyncio.gather(
            good.upsert([record(1)]),
            bad.upsert([record(2), record(3, body=None)]),  # NOT NULL
            other.upsert([record(4)]),
            return_exceptions=True,
        )
        assert results[0] is None and results[2] is None
        assert isinstance(results[1], StoreError)
        assert ids(await good.pending()) == ["m1"]
        assert await bad.pending() == []
        assert ids(await other.pending()) == ["m4"]


async def test_a_view_closing_writes_what_it_had_batched(tmp_path: Path) -> None:
    async with SQLiteDatabase(tmp_path / "fleet.sqlite", batch_window=10.0) as db:
        view = db.store(ALICE)
        await view.pending()
        task = asyncio.ensure_future(view.upsert([record(1)]))
        await asyncio.sleep(0)
        await view.aclose()
        await task
        assert ids(await db.store(ALICE).pending()) == ["m1"]


# ------------------------------------------------------------------ lifecycle


async def test_a_closed_database_closes_its_views(tmp_path: Path) -> None:
    db = SQLiteDatabase(tmp_path / "fleet.sqlite")
    view = db.store(ALICE)
    await view.upsert([record(1)])
    await db.aclose()
    assert db.closed and view.closed
    with pytest.raises(StoreError, match=r"fleet\.sqlite.*closed"):
        await view.pending()
    with pytest.raises(StoreError, match="closed"):
        await view.upsert([record(2)])
    with pytest.raises(StoreError, match="closed"):
        db.store(ALICE2)
    with pytest.raises(StoreError, match="closed"):
        await db.accounts()
    await view.aclose()  # harmless
    await db.aclose()
    async with SQLiteDatabase(tmp_path / "fleet.sqlite") as again:  # the lock went with it
        assert ids(await again.store(ALICE).pending()) == ["m1"]


async def test_the_database_and_a_one_account_store_exclude_each_other(tmp_path: Path) -> None:
    path = tmp_path / "fleet.sqlite"
    async with SQLiteDatabase(path) as db:
        await db.store(ALICE).upsert([record(1)])
        single = SQLiteStore(path)
        with pytest.raises(StoreError, match="another tracker"):
            await single.pending()
        await single.aclose()
        second = SQLiteDatabase(path)
        with pytest.raises(StoreError, match="another tracker"):
            await second.open()
        await second.aclose()


async def test_a_read_only_database_reads_and_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "fleet.sqlite"
    async with SQLiteDatabase(path) as db:
        await db.store(ALICE).upsert([record(1, S.FAILED)])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    async with SQLiteDatabase(path, read_only=True) as db:
        assert await db.accounts() == [ALICE]
        view = db.store(ALICE)
        assert ids(await view.failed()) == ["m1"]
        with pytest.raises(StoreError, match="read-only"):
            await view.delete_failed()
        with pytest.raises(StoreError, match="read-only"):
            await view.upsert([record(2)])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_negative_batch_window_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="batch_window"):
        SQLiteDatabase(tmp_path / "x.sqlite", batch_window=-1)


# ------------------------------------------------------------------ migration from version 1

#: The schema of version 1 as it shipped (one account per file), to build old files.
V1_DDL = (
    """
    CREATE TABLE records (
        id TEXT PRIMARY KEY NOT NULL,
        origin_id TEXT NOT NULL,
        recipient TEXT NOT NULL,
        conversation TEXT NOT NULL,
        type TEXT NOT NULL,
        body TEXT NOT NULL,
        state TEXT NOT NULL,
        xml TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        via_carbon INTEGER NOT NULL,
        attempts INTEGER NOT NULL,
        reason TEXT,
        seq INTEGER
    )
    """,
    """
    CREATE INDEX records_in_flight ON records (created_at, COALESCE(seq, 0))
    WHERE state IN ('hibernated', 'resent', 'sent')
    """,
    "CREATE INDEX records_failed ON records (created_at, COALESCE(seq, 0)) WHERE state = 'failed'",
    """
    CREATE INDEX records_by_conversation
    ON records (conversation, created_at, COALESCE(seq, 0))
    """,
    "CREATE TABLE sm_state (slot INTEGER PRIMARY KEY CHECK (slot = 1), state TEXT NOT NULL)",
)


def make_v1_file(path: Path, rows: list[tuple[Any, ...]], state: str | None) -> None:
    db = sqlite3.connect(path)
    try:
        for statement in V1_DDL:
            db.execute(statement)
        # Version 1's upsert: a replaced record keeps its rowid (its first place).
        db.executemany(
            f"INSERT INTO records VALUES ({', '.join('?' * len(FIELDS))}) ON CONFLICT(id) "
            f"DO UPDATE SET {', '.join(f'{name} = excluded.{name}' for name in FIELDS[1:])}",
            rows,
        )
        if state is not None:
            db.execute("INSERT INTO sm_state VALUES (1, ?)", (state,))
        db.execute("PRAGMA user_version = 1")
        db.execute("PRAGMA journal_mode = WAL")
        db.commit()
    finally:
        db.close()


V1_RECORDS = [
    record(1, S.SENT, created=5.0, seq=3),
    record(2, S.FAILED, created=5.0, seq=None, reason="resume-failed"),
    record(3, S.HIBERNATED, created=5.0, seq=None),
    record(4, S.ACKED, to="carol@example.org/x", via_carbon=True, attempts=2),
    record(5, S.FAILED, to="carol@example.org", reason="cancel:item-not-found"),
]
V1_STATE = '{"version":1,"id":"stream-1","handled":7,"unacked":[{"seq":1,"xml":"<m/>"}]}'


async def test_a_version_1_file_migrates_in_place_keeping_records_order_and_state(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.sqlite"
    replaced = record(2, S.FAILED, created=5.0, seq=None, reason="resume-failed")
    # m2 first sent as m2 (SENT), replaced later: it keeps its first place (rowid).
    rows = [row_of(record(2, S.SENT, created=5.0, seq=None))]
    rows += [row_of(r) for r in V1_RECORDS if r.id != "m2"] + [row_of(replaced)]
    make_v1_file(path, rows, V1_STATE)
    assert user_version(path) == 1

    async with SQLiteStore(path) as store:
        assert [await store.get(r.id) for r in V1_RECORDS] == V1_RECORDS
        assert ids(await store.pending()) == ["m3", "m1"]  # ties: seq, then first sight
        assert ids(await store.failed()) == ["m2", "m5"]
        assert ids(await store.conversation("bob@example.org")) == ["m2", "m3", "m1"]
        assert await store.load_sm_state() == {
            "version": 1,
            "id": "stream-1",
            "handled": 7,
            "unacked": [{"seq": 1, "xml": "<m/>"}],
        }
        await store.upsert([record(6)])  # and it writes as before
    assert user_version(path) == SCHEMA_VERSION
    assert raw(path, "PRAGMA integrity_check") == [("ok",)]
    assert raw(path, "SELECT DISTINCT account FROM records") == [("",)]

    # The one-account records are the database's default account, apart from the others.
    async with SQLiteDatabase(path) as db:
        assert await db.accounts() == [""]
        alice = db.store(ALICE)
        assert await alice.pending() == []
        await alice.save_sm_state({"version": 1, "id": "alice"})
    async with SQLiteStore(path) as store:
        assert ids(await store.pending()) == ["m3", "m1", "m6"]
        state = await store.load_sm_state()
        assert state is not None and state["id"] == "stream-1"


async def test_a_version_1_file_without_a_state_or_records_migrates(tmp_path: Path) -> None:
    path = tmp_path / "empty-v1.sqlite"
    make_v1_file(path, [], None)
    async with SQLiteDatabase(path) as db:
        assert await db.accounts() == []
        assert await db.store(ALICE).load_sm_state() is None
    assert user_version(path) == SCHEMA_VERSION


async def test_a_read_only_open_of_a_version_1_file_asks_to_migrate_it_first(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.sqlite"
    make_v1_file(path, [row_of(r) for r in V1_RECORDS], V1_STATE)
    before = path.read_bytes()
    db = SQLiteDatabase(path, read_only=True)
    with pytest.raises(StoreError, match="open it read-write once to migrate"):
        await db.open()
    await db.aclose()
    assert path.read_bytes() == before


# ------------------------------------------------------------------ trackers (live)


async def test_two_trackers_share_one_database_and_their_end_closes_only_their_view(
    server: LocalXMPPServer, clients: ClientPool, tmp_path: Path
) -> None:
    async with SQLiteDatabase(tmp_path / "fleet.sqlite") as db:
        parties = {
            name: await clients(name, server.address, ack_delay=0.05) for name in ("alice", "carol")
        }
        views = {}
        for name, party in parties.items():
            views[name] = db.store(f"{name}@localhost")
            await party.tracker.attach(views[name])
            party.tracker.sm.cache(views[name].save_sm_state)
        handles = {
            name: [
                await party.tracker.send_message("bob@localhost", f"{name} {i}") for i in range(5)
            ]
            for name, party in parties.items()
        }
        for name in parties:
            for handle in handles[name]:
                assert (await handle.settled(timeout=10)).state is S.ACKED
        alice_tracker = parties["alice"].tracker  # (looked up again once disabled, it loads anew)
        parties["alice"].xmpp.plugin.disable("sm_tracker")
        closing = alice_tracker.closing_store
        assert closing is not None
        await closing
        assert views["alice"].closed and not views["carol"].closed and not db.closed
        await parties["carol"].tracker.flush()
        assert {r.body for r in await views["carol"].conversation("bob@localhost")} == {
            f"carol {i}" for i in range(5)
        }
        alice_again = db.store("alice@localhost")  # free again once its tracker ended
        assert [r.body for r in await alice_again.conversation("bob@localhost")] == [
            f"alice {i}" for i in range(5)
        ]
        assert await db.accounts() == ["alice@localhost", "carol@localhost"]
