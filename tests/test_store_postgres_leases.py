"""Issue 18: one owner per account in PostgreSQL, a shared pool for a fleet, and a standby
that takes an account over when its owner dies. On the real PostgreSQL the harness starts;
a killed owner is a real process killed with SIGKILL."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from tests.helpers.pgdb import fresh_database
from tests.test_store_contract import record
from xmpp_sm_tracker import AccountLeased, LeaseLost, StoreError, TrackedMessage
from xmpp_sm_tracker.stores.postgres import PostgresDatabase, PostgresStore
from xmpp_sm_tracker.stores.postgres_schema import (
    LEASES,
    MIGRATIONS,
    SCHEMA_VERSION,
    SM_STATE,
    UPSERT,
    VERSION_TABLE,
)
from xmpp_sm_tracker.stores.sqlite_schema import row_of

ALICE, BOB = "alice@example.org", "bob@example.org"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def dsn(postgres_dsn: str) -> AsyncIterator[str]:
    async with fresh_database(postgres_dsn) as fresh:
        yield fresh


async def sql(dsn: str, statement: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(statement, *args))
    finally:
        await conn.close()


async def test_a_second_process_on_a_live_account_gets_a_clear_error(dsn: str) -> None:
    async with PostgresStore(dsn, account=ALICE) as owner:
        await owner.upsert([record(1)])
        other = PostgresStore(dsn, account=ALICE)
        with pytest.raises(AccountLeased) as caught:
            await other.pending()
        message = str(caught.value)
        assert ALICE in message and owner.database.owner in message and "lease runs" in message
        with pytest.raises(AccountLeased):
            await other.upsert([record(2)])
        await other.aclose()
        # Another account in the same database is free.
        async with PostgresStore(dsn, account=BOB) as bob:
            await bob.upsert([record(3)])
        assert [r.id for r in await owner.pending()] == ["m1"]


async def test_a_closed_owner_gives_the_account_back_at_once(dsn: str) -> None:
    owner = PostgresStore(dsn, account=ALICE, lease_ttl=60)
    await owner.upsert([record(1)])
    await owner.aclose()
    started = time.monotonic()
    async with PostgresStore(dsn, account=ALICE) as successor:
        assert [r.id for r in await successor.pending()] == ["m1"]
    assert time.monotonic() - started < 5  # not the 60 s of the lease


async def test_a_read_only_store_takes_no_lease_and_writes_nothing(dsn: str) -> None:
    async with PostgresStore(dsn, account=ALICE) as owner:
        await owner.upsert([record(1)])
        async with PostgresStore(dsn, account=ALICE, read_only=True) as looker:
            assert [r.id for r in await looker.pending()] == ["m1"]
            for write in (
                looker.upsert([record(2)]),
                looker.upsert([]),
                looker.delete("m1"),
                looker.save_sm_state({"version": 1}),
            ):
                with pytest.raises(StoreError, match="read-only"):
                    await write
        assert [r.id for r in await owner.pending()] == ["m1"]


async def test_a_write_after_a_takeover_is_refused_and_the_owner_is_told(dsn: str) -> None:
    async with PostgresStore(dsn, account=ALICE) as owner:
        told: list[LeaseLost] = []
        owner.on_lease_lost(told.append)
        await owner.upsert([record(1)])
        # Another owner took the account (as a standby does once the lease lapsed).
        await sql(dsn, f"UPDATE {LEASES} SET owner = 'standby', token = token + 1")
        with pytest.raises(LeaseLost, match="another process owns the account"):
            await owner.upsert([record(2)])
        assert len(told) == 1 and owner.lease_lost is told[0]
        for write in (owner.save_sm_state({"version": 1}), owner.delete("m1")):
            with pytest.raises(LeaseLost):
                await write
        assert len(told) == 1
    rows = await sql(dsn, "SELECT id FROM sm_tracker_records")
    assert [r["id"] for r in rows] == ["m1"]  # nothing written after the takeover


async def test_the_owner_learns_of_a_takeover_from_its_renewals_without_writing(
    dsn: str,
) -> None:
    async with PostgresStore(dsn, account=ALICE, lease_ttl=0.6) as owner:
        lost = asyncio.get_running_loop().create_future()
        owner.on_lease_lost(lost.set_result)
        await sql(dsn, f"UPDATE {LEASES} SET owner = 'standby', token = token + 1")
        error = await asyncio.wait_for(lost, 5)
        assert "another process took it over" in str(error)


async def test_an_owner_that_cannot_renew_in_time_lets_go_before_a_standby_may_come(
    dsn: str,
) -> None:
    """The lease table locked (a hung database): renewals hang, and the owner gives up
    at its own deadline, which comes before the database's expiry lets anyone in."""
    async with PostgresStore(dsn, account=ALICE, lease_ttl=1.0) as owner:
        lost = asyncio.get_running_loop().create_future()
        owner.on_lease_lost(lost.set_result)
        blocker = await asyncpg.connect(dsn)
        try:
            async with blocker.transaction():
                await blocker.execute(f"LOCK TABLE {LEASES} IN ACCESS EXCLUSIVE MODE")
                error = await asyncio.wait_for(lost, 5)
                rows = await blocker.fetch(
                    f"SELECT expires_at > now() AS live FROM {LEASES} WHERE account = $1", ALICE
                )
                assert rows[0]["live"], "the owner let go only after a standby could come"
        finally:
            await blocker.close()
        assert "could not renew the lease in time" in str(error)


async def test_a_standby_waits_for_the_lease_to_lapse_after_the_owner_is_killed(
    dsn: str,
) -> None:
    """A real owner process, SIGKILLed: its lease lapses after lease_ttl and the standby
    takes the account with everything the owner wrote."""
    script = (
        "import asyncio, sys\n"
        "from tests.test_store_contract import record\n"
        "from xmpp_sm_tracker.stores.postgres import PostgresStore\n"
        "async def main():\n"
        f"    store = PostgresStore(sys.argv[1], account={ALICE!r}, lease_ttl=2.0)\n"
        "    await store.upsert([record(1), record(2)])\n"
        "    await store.save_sm_state({'version': 1, 'id': 'stream'})\n"
        "    print('OWNED', flush=True)\n"
        "    await asyncio.sleep(3600)\n"
        "asyncio.run(main())\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        dsn,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        assert (await asyncio.wait_for(proc.stdout.readline(), 30)).strip() == b"OWNED"
        with pytest.raises(AccountLeased):
            await PostgresStore(dsn, account=ALICE).open()  # it is alive: no takeover
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        killed = time.monotonic()
        standby = PostgresStore(dsn, account=ALICE, lease_ttl=2.0)
        await standby.take_over(poll=0.1, timeout=20)
        waited = time.monotonic() - killed
        async with standby:
            assert [r.id for r in await standby.pending()] == ["m1", "m2"]
            assert await standby.load_sm_state() == {"version": 1, "id": "stream"}
            await standby.upsert([record(3)])
        assert 0.5 < waited < 6, waited  # the lapse (<= 2 s), not at once, not never
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_take_over_of_a_free_account_is_immediate_and_a_timeout_is_clear(
    dsn: str,
) -> None:
    standby = PostgresStore(dsn, account=ALICE)
    await asyncio.wait_for(standby.take_over(), 5)
    await standby.upsert([record(1)])
    other = PostgresStore(dsn, account=ALICE)
    with pytest.raises(TimeoutError):
        await other.take_over(poll=0.05, timeout=0.5)
    await other.aclose()
    await standby.aclose()


async def test_a_fleet_shares_one_pool_and_each_account_has_one_store(dsn: str) -> None:
    async with PostgresDatabase(dsn, max_connections=4) as database:
        stores = [database.store(f"bot{n}@example.org") for n in range(50)]
        with pytest.raises(StoreError, match="already has an open store"):
            database.store("bot0@example.org")
        await asyncio.gather(*(s.open() for s in stores))
        before = database.transactions
        await asyncio.gather(*(s.upsert([record(n)]) for n, s in enumerate(stores)))
        assert database.transactions - before == 1  # one turn's writes, one transaction
        for n, store in enumerate(stores):
            assert [r.id for r in await store.pending()] == [f"m{n}"]
        rows = await sql(
            dsn, "SELECT count(*) FROM pg_stat_activity WHERE datname = $1", dsn.rsplit("/", 1)[1]
        )
        assert rows[0][0] <= 4 + 1  # the pool, plus this query's own connection
        await stores[0].aclose()
        database.store("bot0@example.org")  # free again once closed
    assert all(s.closed for s in stores)
    with pytest.raises(StoreError, match="closed"):
        await stores[1].pending()
    # Every lease was given back: another process takes any account at once.
    async with PostgresStore(dsn, account="bot7@example.org") as successor:
        assert [r.id for r in await successor.pending()] == ["m7"]


async def test_a_version_1_database_moves_to_leases_in_place_keeping_every_record(
    dsn: str,
) -> None:
    """Databases made before leases (schema 1) gain the lease table; nothing else moves."""
    conn = await asyncpg.connect(dsn)
    try:
        for statement in MIGRATIONS[0]:
            await conn.execute(statement)
        await conn.execute(f"INSERT INTO {VERSION_TABLE} VALUES (1)")
        await conn.execute(UPSERT, ALICE, *_row_values(record(1)))
        await conn.execute(
            f"INSERT INTO {SM_STATE} (account, state) VALUES ($1, $2)", ALICE, '{"version": 1}'
        )
    finally:
        await conn.close()
    async with PostgresStore(dsn, account=ALICE) as store:
        assert [r.id for r in await store.pending()] == ["m1"]
        assert await store.load_sm_state() == {"version": 1}
        with pytest.raises(AccountLeased):
            await PostgresStore(dsn, account=ALICE).open()
    rows = await sql(dsn, f"SELECT version FROM {VERSION_TABLE}")
    assert [r["version"] for r in rows] == [SCHEMA_VERSION] and SCHEMA_VERSION == 2


def _row_values(message: TrackedMessage) -> tuple[object, ...]:
    row = row_of(message)
    return (*row[:10], bool(row[10]), *row[11:])


async def test_in_a_shared_write_one_bad_account_fails_alone(dsn: str) -> None:
    """A lost lease or an unwritable record fails its own caller; the others are written."""
    async with PostgresDatabase(dsn) as database:
        stores = [database.store(f"bot{n}@example.org") for n in range(4)]
        await asyncio.gather(*(s.open() for s in stores))
        await sql(
            dsn,
            f"UPDATE {LEASES} SET owner = 'standby', token = token + 1 WHERE account = $1",
            "bot1@example.org",
        )
        results = await asyncio.gather(
            stores[0].upsert([record(0)]),
            stores[1].upsert([record(1)]),
            stores[2].upsert([record(2, body="bad \ud800")]),
            stores[3].upsert([record(3)]),
            return_exceptions=True,
        )
        assert results[0] is None and results[3] is None
        assert isinstance(results[1], LeaseLost) and stores[1].lease_lost is not None
        assert isinstance(results[2], StoreError) and "lone surrogate" in str(results[2])
        for n in (0, 3):
            assert [r.id for r in await stores[n].pending()] == [f"m{n}"]
        assert await stores[2].pending() == []
    rows = await sql(dsn, "SELECT account FROM sm_tracker_records ORDER BY account")
    assert [r["account"] for r in rows] == ["bot0@example.org", "bot3@example.org"]


async def test_leases_taken_after_all_were_given_back_are_still_renewed(dsn: str) -> None:
    """The renewals stop when a process has no lease left, and start again with the next."""
    async with PostgresDatabase(dsn, lease_ttl=0.6) as database:
        first = database.store(ALICE)
        await first.open()
        await first.aclose()  # the last lease given back: nothing to renew
        await asyncio.sleep(0.5)
        second = database.store(BOB)
        await second.open()
        await asyncio.sleep(1.5)  # more than twice the lease: only renewals keep it
        with pytest.raises(AccountLeased):
            await PostgresStore(dsn, account=BOB).open()
        await second.upsert([record(1)])
        assert second.lease_lost is None
