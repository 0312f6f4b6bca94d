"""How the SQLite store writes: a record moved to another state is written as a move
(state and time only), everything else whole; never a None bound; the in-flight index
costs no temporary table per row; version 2 files move to version 3.

The results are the contract's (test_store_contract.py, whose random model also mixes
moves and whole writes); here we prove which statement did the work, and that every
way out of a move (a row gone, a record changed, an id twice, an old SQLite) still
lands the right row.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from xmpp_sm_tracker import DeliveryState, SQLiteDatabase, SQLiteStore
from xmpp_sm_tracker.stores import sqlite_engine, sqlite_file, sqlite_schema
from xmpp_sm_tracker.stores.sqlite import MIGRATIONS, SCHEMA_VERSION

from .test_store_contract import record

S = DeliveryState
MOVE = "UPDATE records SET state"
UPSERT = "INSERT INTO records"


@asynccontextmanager
async def traced(path: Path) -> AsyncIterator[tuple[SQLiteStore, list[str]]]:
    """A store on ``path`` and the statements its connection runs (each once per
    execution), cleared once the store is open."""
    statements: list[str] = []
    async with SQLiteStore(path) as store:
        await store.open()
        connection = store._engine.connection
        assert connection is not None
        await connection.set_trace_callback(statements.append)
        yield store, statements


def ran(statements: list[str], prefix: str) -> int:
    return sum(1 for s in statements if s.startswith(prefix))


async def test_an_acked_record_is_written_as_a_move(tmp_path: Path) -> None:
    sent = [record(n) for n in range(3)]
    acked = [r.moved(S.ACKED, 3000.0 + n) for n, r in enumerate(sent)]
    async with traced(tmp_path / "m.sqlite") as (store, statements):
        await store.upsert(sent)
        assert (ran(statements, UPSERT), ran(statements, MOVE)) == (1, 0)
        statements.clear()
        await store.upsert(acked)
        assert (ran(statements, UPSERT), ran(statements, MOVE)) == (0, 1)
        assert [await store.get(r.id) for r in acked] == acked
        assert await store.pending() == []
        assert await store.conversation(sent[0].to) == acked


async def test_a_move_whose_row_is_gone_writes_the_record_whole(tmp_path: Path) -> None:
    sent, other = record(1), record(2)
    acked = sent.moved(S.ACKED, 3000.0)
    async with traced(tmp_path / "gone.sqlite") as (store, statements):
        await store.upsert([sent, other])
        connection = store._engine.connection
        assert connection is not None
        # Gone behind the store's back (it cannot happen through the store: delete()
        # forgets the record): the move changes no row, and the record goes whole.
        await connection.execute("DELETE FROM records WHERE id = 'm1'")
        await connection.commit()
        statements.clear()
        await store.upsert([acked, other.moved(S.ACKED, 3000.0)])
        assert ran(statements, MOVE) == 1 and ran(statements, UPSERT) == 1
        assert await store.get("m1") == acked
        assert await store.get("m2") == other.moved(S.ACKED, 3000.0)


async def test_a_deleted_record_comes_back_whole(tmp_path: Path) -> None:
    async with traced(tmp_path / "d.sqlite") as (store, statements):
        await store.upsert([record(1)])
        assert await store.delete("m1")
        statements.clear()
        await store.upsert([record(1).moved(S.ACKED, 3000.0)])
        assert (ran(statements, UPSERT), ran(statements, MOVE)) == (1, 0)
        assert await store.get("m1") == record(1).moved(S.ACKED, 3000.0)


@pytest.mark.parametrize(
    "change",
    [
        {"attempts": 2},
        {"reason": "resume-failed"},
        {"seq": 9},
        {"seq": None},
        {"xml": "<message id='m1'/>"},
        {"body": "other"},
        {"to": "carol@example.org"},
        {"via_carbon": True},
        {"created_at": 5.0},
    ],
    ids=lambda change: next(iter(change)),
)
async def test_a_record_changed_beyond_state_and_time_is_written_whole(
    tmp_path: Path, change: dict[str, object]
) -> None:
    changed = replace(record(1), state=S.FAILED, updated_at=3000.0, **change)
    async with traced(tmp_path / "c.sqlite") as (store, statements):
        await store.upsert([record(1)])
        statements.clear()
        await store.upsert([changed])
        assert (ran(statements, UPSERT), ran(statements, MOVE)) == (1, 0)
        assert await store.get("m1") == changed


@pytest.mark.parametrize("last", [S.ACKED, S.FAILED])
async def test_an_id_twice_in_one_batch_is_written_whole_and_the_last_wins(
    tmp_path: Path, last: DeliveryState
) -> None:
    acked = record(1).moved(S.ACKED, 3000.0)
    failed = record(1).moved(S.FAILED, 3001.0, reason="resume-failed")
    batch = [failed, acked] if last is S.ACKED else [acked, failed]
    async with traced(tmp_path / "twice.sqlite") as (store, statements):
        await store.upsert([record(1)])
        statements.clear()
        await store.upsert(batch)
        assert ran(statements, MOVE) == 0
        assert await store.get("m1") == batch[-1]


async def test_two_accounts_with_the_same_id_each_move_their_own(tmp_path: Path) -> None:
    async with SQLiteDatabase(tmp_path / "fleet.sqlite") as database:
        alice, bob = database.store("alice@example.org"), database.store("bob@example.org")
        await alice.upsert([record(1)])
        await bob.upsert([record(1, body="bob's")])
        # In one transaction, as a fleet's writes go: a move for one, a whole row for
        # the other (bob's id is new to the engine under his account).
        await asyncio.gather(
            alice.upsert([record(1).moved(S.ACKED, 3000.0)]),
            bob.upsert([record(1, body="bob's", attempts=2)]),
        )
        assert await alice.get("m1") == record(1).moved(S.ACKED, 3000.0)
        assert await bob.get("m1") == record(1, body="bob's", attempts=2)


async def test_without_update_from_every_record_is_written_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_engine, "_CAN_MOVE", False)  # SQLite before 3.33
    async with traced(tmp_path / "old.sqlite") as (store, statements):
        await store.upsert([record(1)])
        await store.upsert([record(1).moved(S.ACKED, 3000.0)])
        assert ran(statements, MOVE) == 0
        assert await store.get("m1") == record(1).moved(S.ACKED, 3000.0)


@pytest.mark.parametrize(
    ("reason", "seq"), [(None, None), ("", 0), ("x", 7)], ids=["none", "empty", "set"]
)
async def test_nullable_columns_keep_none_apart_from_empty_and_zero(
    tmp_path: Path, reason: str | None, seq: int | None
) -> None:
    path = tmp_path / "n.sqlite"
    written = record(1, S.FAILED, reason=reason, seq=seq)
    async with SQLiteStore(path) as store:
        await store.upsert([written])
        assert await store.get("m1") == written
    db = sqlite3.connect(path)
    try:
        row = db.execute("SELECT reason, seq FROM records WHERE id = 'm1'").fetchone()
    finally:
        db.close()
    assert row == (reason, seq)


def test_no_value_is_bound_as_none() -> None:
    # The sqlite3 module looks every None (and bool) up in its adapters, raising and
    # clearing an AttributeError each time: the rows it binds hold neither.
    bare = record(1, S.FAILED, reason=None, seq=None)
    for values in (sqlite_schema.bound_row_of("", bare), sqlite_schema.move_of("", bare)):
        assert all(type(v) in (str, int, float) for v in values), values


@pytest.mark.parametrize(("reason", "seq"), [(None, None), ("cancel:gone", 7), ("", 0)])
def test_a_row_holds_the_record_in_column_order(reason: str | None, seq: int | None) -> None:
    # A full JID, so that recipient and conversation differ.
    message = record(1, S.FAILED, to="bob@example.org/phone", reason=reason, seq=seq)
    assert sqlite_schema.row_of(message) == (
        message.id,
        message.origin_id,
        message.to,
        message.conversation,
        message.type,
        message.body,
        "failed",
        message.xml,
        message.created_at,
        message.updated_at,
        int(message.via_carbon),
        message.attempts,
        reason,
        seq,
    )
    assert sqlite_schema.bound_row_of("acct", message)[0] == "acct"


async def test_writing_a_row_opens_no_temporary_table(tmp_path: Path) -> None:
    # SQLite codes ``state IN (three constants)`` in a partial index's WHERE as a
    # temporary table, built anew for every row written: the index of version 3 does not.
    path = tmp_path / "plan.sqlite"
    async with SQLiteStore(path) as store:
        await store.open()
    db = sqlite3.connect(path)
    try:
        statement = sqlite_schema.UPSERT_ROWS[2]
        opcodes = [row[1] for row in db.execute(f"EXPLAIN {statement}", [0] * 34)]
        assert "OpenEphemeral" not in opcodes
        plan = db.execute(f"EXPLAIN QUERY PLAN {sqlite_schema.MOVE_ROWS[2]}", ["x"] * 8).fetchall()
        assert any("sqlite_autoindex_records_1 (account=? AND id=?)" in row[3] for row in plan)
    finally:
        db.close()


async def test_a_version_2_file_moves_to_version_3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "v2.sqlite"
    records = [record(1, S.SENT, seq=2), record(2, S.HIBERNATED), record(3, S.ACKED)]
    records += [record(4, S.RESENT, created=999.0), record(5, S.FAILED)]
    monkeypatch.setattr(sqlite_file, "MIGRATIONS", MIGRATIONS[:2])
    async with SQLiteStore(path) as store:
        await store.upsert(records)
    monkeypatch.setattr(sqlite_file, "MIGRATIONS", MIGRATIONS)
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone() == (2,)
    finally:
        db.close()

    async with SQLiteStore(path) as store:
        assert [r.id for r in await store.pending()] == ["m4", "m1", "m2"]
        assert [await store.get(r.id) for r in records] == records
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,) == (3,)
        (index,) = db.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'records_in_flight'"
        ).fetchone()
        assert " IN " not in index.upper() and "OR" in index.upper()
        plan = db.execute(
            f"EXPLAIN QUERY PLAN {sqlite_schema.SELECT} AND {sqlite_schema.IS_IN_FLIGHT} "
            f"{sqlite_schema.OLDEST_FIRST}",
            ("",),
        ).fetchall()
        assert any("records_in_flight" in row[3] for row in plan), plan
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        db.close()
