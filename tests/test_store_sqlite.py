"""What only the SQLite store has to prove: durability, privacy, refusing bad files."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

from xmpp_sm_tracker import DeliveryState, SQLiteStore, StoreError
from xmpp_sm_tracker.stores.sqlite import SCHEMA_VERSION

from .test_store_contract import record


async def test_everything_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite"
    async with SQLiteStore(path) as store:
        await store.upsert([record(n, DeliveryState.FAILED) for n in range(5)])
        await store.save_sm_state({"version": 1, "x": [1, 2]})
    async with SQLiteStore(path) as again:
        assert [r.id for r in await again.failed()] == [f"m{n}" for n in range(5)]
        assert await again.load_sm_state() == {"version": 1, "x": [1, 2]}


async def test_files_are_private_to_their_owner(tmp_path: Path) -> None:
    path = tmp_path / "private.sqlite"
    old_umask = os.umask(0o022)
    try:
        async with SQLiteStore(path) as store:
            await store.upsert([record(1)])
            for candidate in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
                if candidate.exists():
                    assert stat.S_IMODE(candidate.stat().st_mode) == 0o600, candidate
    finally:
        os.umask(old_umask)


async def test_a_file_that_is_not_a_database_is_refused_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "garbage.sqlite"
    garbage = os.urandom(4096)
    path.write_bytes(garbage)
    store = SQLiteStore(path)
    with pytest.raises(StoreError, match=r"garbage\.sqlite"):
        await store.open()
    await store.aclose()
    assert path.read_bytes() == garbage


async def test_a_foreign_database_is_refused_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "foreign.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE invoices (n INTEGER)")
    before = path.read_bytes()
    store = SQLiteStore(path)
    with pytest.raises(StoreError, match="invoices"):
        await store.pending()
    await store.aclose()
    assert path.read_bytes() == before


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.sqlite"
    async with SQLiteStore(path) as store:
        await store.upsert([record(1)])
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    store = SQLiteStore(path)
    with pytest.raises(StoreError, match="newer than this library"):
        await store.open()
    await store.aclose()


async def test_a_failing_batch_leaves_nothing_half_written(tmp_path: Path) -> None:
    path = tmp_path / "atomic.sqlite"
    async with SQLiteStore(path) as store:
        await store.upsert([record(0)])
        bad = record(3, body=None)  # type: ignore[arg-type]  # violates NOT NULL
        with pytest.raises(StoreError, match="rolled back"):
            await store.upsert([record(1), record(2), bad, record(4)])
        assert [r.id for r in await store.pending()] == ["m0"]


async def test_a_database_that_refuses_writes_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "ro.sqlite"
    async with SQLiteStore(path) as store:
        await store.upsert([record(1)])
        # As root (CI) file modes do not stop writes: make SQLite itself refuse them.
        connection = store._db
        assert connection is not None
        await connection.execute("PRAGMA query_only = ON")
        with pytest.raises(StoreError, match=r"ro\.sqlite.*rolled back"):
            await store.upsert([record(2)])
        assert [r.id for r in await store.pending()] == ["m1"]
