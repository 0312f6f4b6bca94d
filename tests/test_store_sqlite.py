"""What only the SQLite store has to prove: durability, privacy, atomicity, bad files.

The shared behaviour is in test_store_contract.py; this file is about the file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiosqlite
import pytest

from xmpp_sm_tracker import DeliveryState, SQLiteStore, StoreError, TrackedMessage
from xmpp_sm_tracker.stores import sqlite_engine, sqlite_file, sqlite_schema
from xmpp_sm_tracker.stores.sqlite import MIGRATIONS, SCHEMA_VERSION

from .test_store_contract import NESTED, record

S = DeliveryState
ROOT = Path(__file__).resolve().parent.parent


def ids(records: list[TrackedMessage]) -> list[str]:
    return [r.id for r in records]


def raw(path: Path, sql: str) -> list[Any]:
    """Look at the file with plain sqlite3, behind the store's back."""
    db = sqlite3.connect(path)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def user_version(path: Path) -> int:
    return int(raw(path, "PRAGMA user_version")[0][0])


async def make_db(path: Path, n: int = 3) -> list[TrackedMessage]:
    records = [record(i, S.FAILED if i % 2 else S.SENT) for i in range(n)]
    async with SQLiteStore(path) as store:
        await store.upsert(records)
    return records


# ------------------------------------------------------------------ durability


async def test_everything_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite"
    records = [
        record(n, state, to=f"bob@example.org/r{n}", via_carbon=bool(n % 2), reason=f"r{n}")
        for n, state in enumerate(DeliveryState)
    ]
    async with SQLiteStore(path) as store:
        await store.upsert(records)
        await store.save_sm_state(NESTED)
    again = SQLiteStore(path)  # lazily opened by its first call
    try:
        assert [await again.get(r.id) for r in records] == records
        assert await again.pending() == [r for r in records if r.in_flight]
        assert await again.conversation("bob@example.org", limit=100) == records
        assert await again.load_sm_state() == NESTED
        await again.save_sm_state(None)
    finally:
        await again.aclose()
    async with SQLiteStore(path) as third:
        assert await third.load_sm_state() is None


def test_every_tracked_message_field_has_a_column() -> None:
    # A new field on TrackedMessage needs a migration, not a silent loss on reopen.
    fields = {f.name for f in dataclasses.fields(TrackedMessage)}
    columns = set(sqlite_schema.FIELDS) - {"recipient", "conversation"} | {"to"}
    assert fields == columns


async def test_schema_is_wal_and_versioned(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    await make_db(path)
    assert raw(path, "PRAGMA journal_mode") == [("wal",)]
    assert user_version(path) == SCHEMA_VERSION == len(MIGRATIONS)


async def test_no_call_scans_or_sorts_the_table(tmp_path: Path) -> None:
    path = tmp_path / "plans.sqlite"
    await make_db(path, 50)
    statements: list[str] = []
    async with SQLiteStore(path) as store:
        connection = store._engine.connection
        assert connection is not None
        await connection.set_trace_callback(statements.append)
        await store.get("m1")
        await store.pending()
        await store.failed()
        await store.failed("bob@example.org")
        await store.conversation("bob@example.org/x", limit=5)
        await store.conversation("bob@example.org", limit=5, before=1010.0)
        await store.delete("m1")
        await store.delete_failed("bob@example.org")
        await store.delete_failed()
    queries = [q for q in statements if q.startswith(("SELECT", "DELETE FROM records"))]
    assert len(queries) == 9
    for query in queries:
        plan = " / ".join(row[3] for row in raw(path, f"EXPLAIN QUERY PLAN {query}"))
        assert "INDEX" in plan and "TEMP B-TREE" not in plan, (query, plan)


@pytest.mark.parametrize(
    ("pragma", "value"),
    [
        # NORMAL: with WAL, no fsync per commit; only a power cut can undo the last ones.
        ("synchronous", 1),
        # MEMORY: a 50-row statement's journal would otherwise spill to a temporary file.
        ("temp_store", 2),
    ],
)
async def test_connection_settings(tmp_path: Path, pragma: str, value: int) -> None:
    async with SQLiteStore(tmp_path / "n.sqlite") as store:
        db = store._engine.connection
        assert db is not None
        async with db.execute(f"PRAGMA {pragma}") as cursor:
            assert await cursor.fetchone() == (value,)


# ------------------------------------------------------------------ privacy


@pytest.mark.parametrize("umask", [0o022, 0o000], ids=["umask-022", "umask-000"])
async def test_files_are_private_to_their_owner(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "private.sqlite"
    old = os.umask(umask)
    try:
        async with SQLiteStore(path) as store:
            await store.upsert([record(1)])
            companions = [Path(f"{path}-wal"), Path(f"{path}-shm")]
            assert all(p.exists() for p in companions)  # WAL: both exist while open
            for candidate in (path, *companions):
                assert stat.S_IMODE(candidate.stat().st_mode) == 0o600, candidate
    finally:
        os.umask(old)


async def test_loose_wal_files_are_tightened(tmp_path: Path) -> None:
    path = tmp_path / "loose.sqlite"
    await make_db(path)
    with sqlite3.connect(path) as other:  # another process keeps -wal/-shm around
        other.execute("SELECT 1 FROM records").fetchall()
        for suffix in ("-wal", "-shm"):
            Path(f"{path}{suffix}").chmod(0o644)
        async with SQLiteStore(path) as store:
            await store.pending()
            for suffix in ("-wal", "-shm"):
                assert stat.S_IMODE(Path(f"{path}{suffix}").stat().st_mode) == 0o600


# ------------------------------------------------------------------ bad files


async def refused(path: Path, match: str) -> StoreError:
    """Open ``path``, expect a StoreError naming it, and prove the bytes are unchanged."""
    before = path.read_bytes()
    store = SQLiteStore(path)
    with pytest.raises(StoreError, match=match) as caught:
        await store.pending()
    assert str(path) in str(caught.value)
    with pytest.raises(StoreError):  # still refused, still untouched, on a second try
        await store.upsert([record(1)])
    await store.aclose()
    assert path.read_bytes() == before
    assert not Path(f"{path}.lock").exists()  # a refused file keeps no lock
    return caught.value


async def test_a_file_that_is_not_a_database_is_refused_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "garbage.sqlite"
    path.write_bytes(b"not a database, just some bytes\n" * 200)
    await refused(path, "not an SQLite database")


async def test_a_file_with_a_sqlite_header_and_garbage_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.sqlite"
    path.write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 16)
    await refused(path, "corrupt.sqlite")


async def test_a_truncated_database_is_refused_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "cut.sqlite"
    async with SQLiteStore(path) as store:
        await store.upsert([record(n, body="x" * 2000) for n in range(200)])
    data = path.read_bytes()
    path.write_bytes(data[:100] + b"\xff" * 3000 + data[3100:])  # smash the first pages
    await refused(path, "cut.sqlite")


async def test_a_foreign_database_is_refused_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "foreign.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE invoices (n INTEGER)")
    await refused(path, "invoices")


async def test_a_foreign_schema_with_our_table_names_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "lookalike.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE records (id TEXT, value TEXT)")
        db.execute("CREATE TABLE sm_state (slot INTEGER, state TEXT)")
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    await refused(path, "records.*not ours")


async def test_a_newer_schema_is_refused_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "future.sqlite"
    await make_db(path)
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    error = await refused(path, "newer")
    assert f"version {SCHEMA_VERSION + 1}" in str(error)
    assert f"the {SCHEMA_VERSION} " in str(error)
    assert user_version(path) == SCHEMA_VERSION + 1


@pytest.mark.parametrize("kind", ["directory", "fifo"])
async def test_something_that_is_not_a_file_is_refused(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "odd.sqlite"
    if kind == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)  # opening it to read would block forever
    store = SQLiteStore(path)
    with pytest.raises(StoreError, match=r"odd\.sqlite: is not a regular file"):
        await store.open()
    await store.aclose()


async def test_an_empty_file_becomes_a_store(tmp_path: Path) -> None:
    path = tmp_path / "empty.sqlite"
    path.touch()
    async with SQLiteStore(path) as store:
        await store.upsert([record(1)])
    assert user_version(path) == SCHEMA_VERSION


# ------------------------------------------------------------------ migrations


async def test_version_two_is_one_more_function(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "v1.sqlite"
    records = await make_db(path)

    async def v2(db: aiosqlite.Connection) -> None:
        await db.execute("CREATE INDEX records_by_reason ON records (reason)")

    monkeypatch.setattr(sqlite_file, "MIGRATIONS", [*MIGRATIONS, v2])
    async with SQLiteStore(path) as store:
        assert ids(await store.conversation("bob@example.org")) == ids(records)
    assert user_version(path) == SCHEMA_VERSION + 1
    assert raw(path, "SELECT name FROM sqlite_master WHERE name = 'records_by_reason'")


@pytest.mark.parametrize("failure", ["sql", "python"])
async def test_a_failing_migration_leaves_the_file_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    path = tmp_path / "v1.sqlite"
    records = await make_db(path)

    async def broken_v2(db: aiosqlite.Connection) -> None:
        await db.execute("CREATE INDEX half_done ON records (reason)")
        await db.execute("UPDATE records SET body = 'changed'")
        if failure == "sql":
            await db.execute("CREATE TABLE records (again TEXT)")
        raise RuntimeError("migration bug")

    monkeypatch.setattr(sqlite_file, "MIGRATIONS", [*MIGRATIONS, broken_v2])
    store = SQLiteStore(path)
    with pytest.raises(StoreError if failure == "sql" else RuntimeError):
        await store.open()
    await store.aclose()
    assert user_version(path) == SCHEMA_VERSION
    assert raw(path, "SELECT name FROM sqlite_master WHERE name = 'half_done'") == []
    monkeypatch.setattr(sqlite_file, "MIGRATIONS", MIGRATIONS)
    async with SQLiteStore(path) as store:
        assert [await store.get(r.id) for r in records] == records


# ------------------------------------------------------------------ atomicity


async def test_a_batch_failing_half_way_leaves_none_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "atomic.sqlite"
    real_row = sqlite_engine.bound_row_of
    seen: list[str] = []

    def row_that_breaks_on_m3(account: str, r: TrackedMessage) -> tuple[Any, ...]:
        seen.append(r.id)  # proves m1 and m2 were already bound in the transaction
        if r.id == "m3":
            raise RuntimeError("crash in the middle of the batch")
        return real_row(account, r)

    async with SQLiteStore(path) as store:
        await store.upsert([record(0)])
        monkeypatch.setattr(sqlite_engine, "bound_row_of", row_that_breaks_on_m3)
        with pytest.raises(RuntimeError, match="middle"):
            await store.upsert([record(1), record(2), record(3), record(4), record(0, S.ACKED)])
        assert seen == ["m1", "m2", "m3"]
        assert await store.pending() == [record(0)]
        monkeypatch.setattr(sqlite_engine, "bound_row_of", real_row)
        await store.upsert([record(5)])  # the connection is not stuck in a transaction
        assert ids(await store.pending()) == ["m0", "m5"]
    assert raw(path, "SELECT id FROM records ORDER BY id") == [("m0",), ("m5",)]


async def test_a_record_sqlite_refuses_fails_the_whole_batch(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "atomic.sqlite") as store:
        await store.upsert([record(0)])
        bad = record(3, body=None)  # NOT NULL
        with pytest.raises(StoreError, match=r"atomic\.sqlite.*rolled back"):
            await store.upsert([record(1), record(2), bad, record(4)])
        assert ids(await store.pending()) == ["m0"]


async def test_a_batch_of_many_statements_lands_whole_and_in_order(tmp_path: Path) -> None:
    # Rows go out ROWS_PER_UPSERT to a statement: the split must not show, not in what
    # lands, not in the order of first sight, not when an id comes twice in one batch.
    size = sqlite_schema.ROWS_PER_UPSERT
    n = 2 * size + 7
    batch = [record(i) for i in range(n)]
    batch[size + 3] = record(0, S.ACKED)  # m0 again, in another statement: it wins
    async with SQLiteStore(tmp_path / "many.sqlite") as store:
        await store.upsert(batch)
        assert await store.get("m0") == record(0, S.ACKED)
        pending = ids(await store.pending())
        assert pending == [f"m{i}" for i in range(1, n) if i != size + 3]
        later = [record(i, S.FAILED) for i in range(n, n + size)]  # exactly one statement
        bad = record(n + size, body=None)  # NOT NULL, in the batch's last statement
        with pytest.raises(StoreError, match="rolled back"):
            await store.upsert([*later, *batch[:size], bad])
        assert ids(await store.pending()) == pending and await store.failed() == []
        await store.upsert(later)
        assert ids(await store.failed()) == ids(later)
    rowids = raw(tmp_path / "many.sqlite", "SELECT id FROM records ORDER BY rowid")
    assert [row[0] for row in rowids][:3] == ["m0", "m1", "m2"]


@pytest.mark.parametrize(
    ("statements", "per_row"),
    [
        (sqlite_schema.UPSERT_ROWS, len(sqlite_schema.bound_row_of("", record(1)))),
        (sqlite_schema.MOVE_ROWS, len(sqlite_schema.move_of("", record(1)))),
    ],
    ids=["upsert", "move"],
)
def test_runs_cover_every_row_once_in_order(statements: dict[int, str], per_row: int) -> None:
    size = sqlite_schema.ROWS_PER_UPSERT
    assert sorted(statements) == list(range(1, size + 1))
    assert size * per_row <= 999  # SQLite's oldest limit of parameters a statement
    for n in (1, size - 1, size, size + 1, 3 * size + 5):
        rows = [tuple(f"r{i}c{c}" for c in range(per_row)) for i in range(n)]
        flat: list[Any] = []
        for count, lazy in sqlite_schema.upsert_runs(iter(rows), len(rows)):
            runs = list(lazy)  # each run is taken before the next is asked for
            marks = statements[count].count("?")
            assert marks == count * per_row and all(len(run) == marks for run in runs)
            flat += [value for run in runs for value in run]
        assert flat == [value for row in rows for value in row]


async def test_a_cancelled_upsert_is_all_or_nothing(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "cancel.sqlite") as store:
        batch = [record(n) for n in range(20_000)]
        task = asyncio.ensure_future(store.upsert(batch))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(await store.pending()) in (0, 20_000)
        await store.upsert([record(0, S.ACKED)])  # and the store still works
        assert (await store.get("m0")) == record(0, S.ACKED)


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from xmpp_sm_tracker import DeliveryState, SQLiteStore, TrackedMessage

    async def main(path: str, size: int) -> None:
        async with SQLiteStore(path) as store:
            for batch in range(10**6):
                records = [
                    TrackedMessage(
                        id=f"b{batch}-{i}", origin_id="o", to="bob@example.org",
                        type="chat", body="x" * 300, state=DeliveryState.SENT, xml="<m/>",
                        created_at=float(batch), updated_at=0.0, seq=i,
                    )
                    for i in range(size)
                ]
                print(f"begin {batch}", flush=True)  # the transaction starts now
                await store.upsert(records)

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
)


@pytest.mark.parametrize("delay", [0.001, 0.005, 0.01])
async def test_a_process_killed_mid_batch_leaves_whole_batches(
    tmp_path: Path, delay: float
) -> None:
    path, size = tmp_path / "killed.sqlite", 3000
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(size)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        try:
            assert child.stdout is not None
            line = ""
            while line != "begin 3\n":  # three batches committed, the fourth under way
                line = child.stdout.readline()
                assert line, "the child died before writing"
            await asyncio.sleep(delay)
        finally:
            child.send_signal(signal.SIGKILL)
    assert child.returncode == -signal.SIGKILL
    async with SQLiteStore(path) as store:
        counts: dict[float, int] = {}
        for r in await store.pending():
            counts[r.created_at] = counts.get(r.created_at, 0) + 1
    assert set(counts.values()) == {size}, counts  # every batch whole, none half
    assert {0.0, 1.0, 2.0} <= set(counts)
    assert raw(path, "PRAGMA integrity_check") == [("ok",)]


# ------------------------------------------------------------------ read-only


@contextmanager
def read_only(path: Path) -> Iterator[None]:
    """Make ``path`` unwritable; as root (CI) modes do not bind, so use chattr +i."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o500 if path.is_dir() else 0o400)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(path)], check=False).returncode:
        pytest.fail("running as root and chattr +i failed: cannot make a file read-only here")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", str(path)], check=True)


async def test_a_read_only_file_reads_but_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "ro.sqlite"
    records = await make_db(path)
    before = path.read_bytes()
    with read_only(path):
        store = SQLiteStore(path)
        try:
            assert await store.get("m0") == records[0]
            with pytest.raises(StoreError, match=r"ro\.sqlite.*(readonly|read-only)"):
                await store.upsert([record(9)])
            with pytest.raises(StoreError, match=r"ro\.sqlite"):
                await store.save_sm_state({"version": 1})
            assert await store.get("m9") is None
        finally:
            await store.aclose()
    assert path.read_bytes() == before


async def test_a_new_file_in_a_read_only_directory_is_a_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "locked"
    folder.mkdir()
    with read_only(folder):
        store = SQLiteStore(folder / "new.sqlite")
        with pytest.raises(StoreError, match=r"locked/new\.sqlite.*cannot create"):
            await store.upsert([record(1)])
        await store.aclose()
    assert list(folder.iterdir()) == []


async def test_a_database_in_a_read_only_directory_is_a_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "locked"
    folder.mkdir()
    path = folder / "old.sqlite"
    await make_db(path)  # closed cleanly: no -wal/-shm left, and none can be made
    with read_only(folder):
        store = SQLiteStore(path)
        with pytest.raises(StoreError, match=r"locked/old\.sqlite"):
            await store.upsert([record(9)])
        await store.aclose()


# ------------------------------------------------------------------ concurrency, batching


@pytest.mark.parametrize("window", [0.0, 0.01])
async def test_concurrent_upserts_all_land(tmp_path: Path, window: float) -> None:
    async with SQLiteStore(tmp_path / "c.sqlite", batch_window=window) as store:
        await asyncio.gather(
            *(store.upsert([record(n), record(n + 1000)]) for n in range(50)),
            *(store.pending() for _ in range(5)),
            store.save_sm_state({"version": 1}),
        )
        assert len(await store.pending()) == 100
        assert await store.load_sm_state() == {"version": 1}


async def test_a_batch_window_shares_one_transaction(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "b.sqlite", batch_window=0.02) as store:
        before = store.database.transactions
        await asyncio.gather(*(store.upsert([record(n)]) for n in range(20)))
        assert store.database.transactions - before == 1
        assert ids(await store.pending()) == [f"m{n}" for n in range(20)]


async def test_upserts_made_while_a_transaction_runs_share_the_next(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "g.sqlite") as store:  # no window: group commit
        before = store.database.transactions
        first = asyncio.ensure_future(store.upsert([record(0)]))
        await asyncio.sleep(0)  # its transaction is under way
        await asyncio.gather(first, *(store.upsert([record(n)]) for n in range(1, 50)))
        assert store.database.transactions - before == 2
        assert len(await store.pending()) == 50


async def test_one_bad_caller_in_a_window_fails_alone(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "b.sqlite", batch_window=0.02) as store:
        results = await asyncio.gather(
            store.upsert([record(1)]),
            store.upsert([record(2), record(3, body=None)]),  # NOT NULL
            store.upsert([record(4)]),
            return_exceptions=True,
        )
        assert results[0] is None and results[2] is None
        assert isinstance(results[1], StoreError)
        assert ids(await store.pending()) == ["m1", "m4"]


async def test_calls_after_a_batched_upsert_see_it(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "b.sqlite", batch_window=10.0) as store:
        task = asyncio.ensure_future(store.upsert([record(1, S.FAILED)]))
        await asyncio.sleep(0)  # queued, the window is far from closing
        assert ids(await store.failed()) == ["m1"]  # a later call does not overtake it
        await task
        queued = asyncio.ensure_future(store.upsert([record(2, S.FAILED)]))
        await asyncio.sleep(0)
        assert await store.delete_failed() == 2
        await queued


async def test_a_cancelled_batched_upsert_that_has_not_started_is_dropped(
    tmp_path: Path,
) -> None:
    async with SQLiteStore(tmp_path / "b.sqlite", batch_window=10.0) as store:
        task = asyncio.ensure_future(store.upsert([record(1)]))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await store.get("m1") is None


async def test_aclose_writes_what_is_still_batched(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite"
    store = SQLiteStore(path, batch_window=10.0)
    await store.open()
    task = asyncio.ensure_future(store.upsert([record(1)]))
    await asyncio.sleep(0)
    await store.aclose()
    await task
    async with SQLiteStore(path) as again:
        assert await again.get("m1") == record(1)


def test_a_negative_batch_window_is_refused() -> None:
    with pytest.raises(ValueError, match="batch_window"):
        SQLiteStore("x.sqlite", batch_window=-1)
