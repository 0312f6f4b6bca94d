"""PostgresStore's own promises, beyond the contract suite: accounts kept apart, foreign
or newer schemas refused untouched, clear errors that name the server but never the
password, a broken connection replaced. On the real PostgreSQL the harness starts."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from tests.helpers.pgdb import fresh_database
from tests.test_store_contract import record
from xmpp_sm_tracker import DeliveryState, StoreError
from xmpp_sm_tracker.stores.postgres import PostgresStore
from xmpp_sm_tracker.stores.postgres_schema import RECORDS, SCHEMA_VERSION, VERSION_TABLE
from xmpp_sm_tracker.testing.server import free_port

ALICE, ALICE2 = "alice@example.org", "alice@example.net"


@pytest.fixture
async def fresh_dsn(postgres_dsn: str) -> AsyncIterator[str]:
    """A DSN of a new, empty database of the session cluster, dropped after the test."""
    async with fresh_database(postgres_dsn) as dsn:
        yield dsn


async def run_sql(dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def test_two_accounts_in_one_database_never_see_each_other(fresh_dsn: str) -> None:
    async with (
        PostgresStore(fresh_dsn, account=ALICE) as one,
        PostgresStore(fresh_dsn, account=ALICE2) as two,
    ):
        # The same ids in both: keyed by (account, id).
        await one.upsert([record(1), record(2, DeliveryState.FAILED)])
        await two.upsert([record(1, DeliveryState.ACKED), record(3, DeliveryState.FAILED)])
        await one.save_sm_state({"version": 1, "id": "one"})
        assert await two.load_sm_state() is None
        await two.save_sm_state({"version": 1, "id": "two"})

        assert [r.id for r in await one.pending()] == ["m1"]
        assert await two.pending() == []
        got = await two.get("m1")
        assert got is not None and got.state is DeliveryState.ACKED
        assert await one.get("m3") is None
        assert await one.delete_failed() == 1
        assert [r.id for r in await two.failed()] == ["m3"]
        assert await one.delete("m3") is False
        assert await two.get("m3") is not None
        assert len(await two.conversation(record(1).to)) == 2

        await one.save_sm_state(None)
        assert await one.load_sm_state() is None
        assert await two.load_sm_state() == {"version": 1, "id": "two"}


async def test_two_stores_migrating_one_new_database_at_once_both_work(fresh_dsn: str) -> None:
    stores = [PostgresStore(fresh_dsn, account=f"u{n}@example.org") for n in range(4)]
    try:
        await asyncio.gather(*(store.open() for store in stores))
        await asyncio.gather(*(store.upsert([record(n)]) for n, store in enumerate(stores)))
        conn = await asyncpg.connect(fresh_dsn)
        try:
            assert await conn.fetchval(f"SELECT version FROM {VERSION_TABLE}") == SCHEMA_VERSION
            assert await conn.fetchval(f"SELECT count(*) FROM {VERSION_TABLE}") == 1
            assert await conn.fetchval(f"SELECT count(*) FROM {RECORDS}") == 4
        finally:
            await conn.close()
    finally:
        for store in stores:
            await store.aclose()


FOREIGN = {
    "our name, other columns": [f"CREATE TABLE {RECORDS} (id int PRIMARY KEY, note text)"],
    "newer version": [
        f"CREATE TABLE {VERSION_TABLE} (version integer NOT NULL)",
        f"INSERT INTO {VERSION_TABLE} VALUES ({SCHEMA_VERSION + 1})",
    ],
    "version table not ours": [f"CREATE TABLE {VERSION_TABLE} (v text, at timestamptz)"],
    "two version rows": [
        f"CREATE TABLE {VERSION_TABLE} (version integer NOT NULL)",
        f"INSERT INTO {VERSION_TABLE} VALUES (1), (1)",
    ],
    "current version, tables missing": [
        f"CREATE TABLE {VERSION_TABLE} (version integer NOT NULL)",
        f"INSERT INTO {VERSION_TABLE} VALUES ({SCHEMA_VERSION})",
    ],
}


@pytest.mark.parametrize("case", list(FOREIGN))
async def test_a_foreign_or_newer_schema_is_a_clear_error_and_left_untouched(
    fresh_dsn: str, case: str
) -> None:
    await run_sql(fresh_dsn, *FOREIGN[case])
    conn = await asyncpg.connect(fresh_dsn)
    try:
        before = await conn.fetch(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = 'public' ORDER BY 1, 2"
        )
    finally:
        await conn.close()
    store = PostgresStore(fresh_dsn, account=ALICE)
    with pytest.raises(StoreError) as caught:
        await store.pending()
    message = str(caught.value)
    assert "PostgreSQL store 127.0.0.1:" in message and ALICE in message
    assert ("newer" in message) if case == "newer version" else ("not" in message)
    assert urlsplit(fresh_dsn).password not in message
    await store.aclose()
    conn = await asyncpg.connect(fresh_dsn)
    try:
        after = await conn.fetch(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = 'public' ORDER BY 1, 2"
        )
    finally:
        await conn.close()
    assert after == before


async def test_an_unrelated_table_in_the_database_is_fine(fresh_dsn: str) -> None:
    await run_sql(fresh_dsn, "CREATE TABLE records (id int PRIMARY KEY)")
    async with PostgresStore(fresh_dsn, account=ALICE) as store:
        await store.upsert([record(1)])
        assert [r.id for r in await store.pending()] == ["m1"]


def with_password(dsn: str, password: str) -> str:
    parts = urlsplit(dsn)
    netloc = f"{parts.username}:{password}@{parts.hostname}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


async def test_connection_errors_name_the_server_never_the_password(postgres_dsn: str) -> None:
    secret = "s3cret-not-to-be-seen"
    port = urlsplit(postgres_dsn).port
    nobody_listens = with_password(postgres_dsn, secret).replace(f":{port}/", f":{free_port()}/")
    cases = {
        "wrong password": (with_password(postgres_dsn, secret), f"127.0.0.1:{port}/"),
        "nothing listening": (nobody_listens, "127.0.0.1:"),
        "no such database": (postgres_dsn.rsplit("/", 1)[0] + "/nosuchdb", "/nosuchdb"),
        "not a DSN": (f"mysql://u:{secret}@127.0.0.1/x", "127.0.0.1:5432/x"),
    }
    for name, (dsn, where) in cases.items():
        store = PostgresStore(dsn, account=ALICE, connect_timeout=5)
        with pytest.raises(StoreError) as caught:
            await store.open()
        message = str(caught.value)
        assert "cannot connect" in message and where in message, (name, message)
        assert secret not in message, name
        assert urlsplit(postgres_dsn).password not in message, name
        await store.aclose()


async def test_a_broken_connection_is_an_error_then_replaced(postgres_dsn: str) -> None:
    async with PostgresStore(postgres_dsn, account=f"{uuid.uuid4().hex}@x.org") as store:
        await store.upsert([record(1)])
        await run_sql(
            postgres_dsn,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE pid <> pg_backend_pid() AND datname = current_database() "
            "AND query NOT LIKE '%pg_terminate_backend%' AND backend_type = 'client backend' "
            "AND application_name = ''",
        )
        for _ in range(2):  # the first call may find out the hard way
            try:
                assert [r.id for r in await store.pending()] == ["m1"]
                break
            except StoreError as exc:
                assert "connection" in str(exc) or "terminat" in str(exc)
        assert [r.id for r in await store.pending()] == ["m1"]


async def test_a_lone_surrogate_is_a_store_error_and_writes_nothing(postgres_dsn: str) -> None:
    async with PostgresStore(postgres_dsn, account=f"{uuid.uuid4().hex}@x.org") as store:
        with pytest.raises(StoreError, match="lone surrogate"):
            await store.upsert([record(1), record(2, body="bad \ud800")])
        assert await store.pending() == []
        await store.upsert([record(3)])
        assert [r.id for r in await store.pending()] == ["m3"]


def test_account_must_be_a_bare_jid() -> None:
    for bad in ("", "alice@example.org/phone", " alice@example.org"):
        with pytest.raises(ValueError, match="bare JID"):
            PostgresStore("postgresql://127.0.0.1/x", account=bad)


async def test_a_hung_statement_is_a_store_error_after_command_timeout(fresh_dsn: str) -> None:
    async with PostgresStore(fresh_dsn, account=ALICE, command_timeout=0.5) as store:
        await store.save_sm_state({"version": 1})
        blocker = await asyncpg.connect(fresh_dsn)
        try:
            async with blocker.transaction():
                await blocker.execute("LOCK TABLE sm_tracker_sm_state IN ACCESS EXCLUSIVE MODE")
                started = asyncio.get_running_loop().time()
                with pytest.raises(StoreError, match=r"connection broke|Timeout"):
                    await store.load_sm_state()
                assert asyncio.get_running_loop().time() - started < 5
        finally:
            await blocker.close()
        assert await store.load_sm_state() == {"version": 1}  # a new connection
