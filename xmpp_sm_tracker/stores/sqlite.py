"""The durable default store: one SQLite file (aiosqlite, WAL), private to its owner.

The schema is versioned with ``PRAGMA user_version`` and moved forward by the
functions in :data:`MIGRATIONS`, so version 2 is one more function. A file that is
not a database, holds another schema, or comes from a newer version is refused
with a :class:`StoreError` naming it, and is never written to.

Every write is one explicit transaction on the one connection, so a batch is
all or nothing even if the process dies half way through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import stat
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TypeVar

import aiosqlite

from ..core.records import TrackedMessage, build_record
from ..core.states import DeliveryState
from .base import SMState, StoreError

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "Migration", "SQLiteStore"]

_T = TypeVar("_T")

#: A step of the schema: takes a database from version n to n + 1 inside a transaction.
Migration = Callable[[aiosqlite.Connection], Awaitable[None]]


async def _v1_first_schema(db: aiosqlite.Connection) -> None:
    """Records by id (with the lookups we need indexed) and a one-row SM state table."""
    # ``executescript`` would commit on its own: one statement at a time keeps the
    # migration inside the runner's transaction, so it lands whole or not at all.
    for statement in (
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
        # Each index matches one query's WHERE and ORDER BY (rowid is every index's
        # last key), so no listing ever sorts. Frozen text: a new state means version 2.
        """
        CREATE INDEX records_in_flight ON records (created_at, COALESCE(seq, 0))
        WHERE state IN ('hibernated', 'resent', 'sent')
        """,
        """
        CREATE INDEX records_failed ON records (created_at, COALESCE(seq, 0))
        WHERE state = 'failed'
        """,
        """
        CREATE INDEX records_by_conversation
        ON records (conversation, created_at, COALESCE(seq, 0))
        """,
        """
        CREATE TABLE sm_state (
            slot INTEGER PRIMARY KEY CHECK (slot = 1),
            state TEXT NOT NULL
        )
        """,
    ):
        await db.execute(statement)


#: ``MIGRATIONS[n]`` takes a database from version n to n + 1. Append, never edit.
MIGRATIONS: list[Migration] = [_v1_first_schema]
#: The schema version this library writes.
SCHEMA_VERSION: Final = len(MIGRATIONS)

#: Column order of the records table; ``recipient`` holds ``TrackedMessage.to``.
_FIELDS: Final = (
    "id",
    "origin_id",
    "recipient",
    "conversation",
    "type",
    "body",
    "state",
    "xml",
    "created_at",
    "updated_at",
    "via_carbon",
    "attempts",
    "reason",
    "seq",
)
_TABLES: Final = {"records": frozenset(_FIELDS), "sm_state": frozenset({"slot", "state"})}
# Only identifiers and fixed state literals are in the SQL text; values are bound parameters.
_COLUMNS: Final = ", ".join(_FIELDS)
_SELECT: Final = f"SELECT {_COLUMNS} FROM records"
_UPSERT: Final = (
    f"INSERT INTO records ({_COLUMNS}) VALUES ({', '.join('?' * len(_FIELDS))}) "
    "ON CONFLICT(id) DO UPDATE SET "
    + ", ".join(f"{name} = excluded.{name}" for name in _FIELDS[1:])
)
# rowid breaks ties like MemoryStore's dict: a replaced record keeps its first place.
_OLDEST_FIRST: Final = "ORDER BY created_at, COALESCE(seq, 0), rowid"
_NEWEST_FIRST: Final = "ORDER BY created_at DESC, COALESCE(seq, 0) DESC, rowid DESC"
# The same text as the partial indexes' WHERE, so the planner can use them.
_IS_IN_FLIGHT: Final = "state IN ('hibernated', 'resent', 'sent')"
_IS_FAILED: Final = "state = 'failed'"
_STATES: Final = {state.value: state for state in DeliveryState}
_MAX_LIMIT: Final = 2**63 - 1  # SQLite's largest integer


def _row(record: TrackedMessage) -> tuple[Any, ...]:
    return (
        record.id,
        record.origin_id,
        record.to,
        record.conversation,
        record.type,
        record.body,
        record.state.value,
        record.xml,
        record.created_at,
        record.updated_at,
        int(record.via_carbon),
        record.attempts,
        record.reason,
        record.seq,
    )


def _record(row: sqlite3.Row | tuple[Any, ...]) -> TrackedMessage:
    (mid, origin, to, _conv, kind, body, state, xml, created, updated, carbon, attempts,
     reason, seq) = row  # fmt: skip
    # build_record is TrackedMessage(...) made faster: a start-up reads every in-flight row.
    return build_record(
        mid, origin, to, kind, body, _STATES[state], xml, created, updated,
        bool(carbon), attempts, reason, seq,
    )  # fmt: skip


def _new_future() -> asyncio.Future[None]:
    return asyncio.get_running_loop().create_future()


@dataclass(eq=False)
class _Queued:
    """One caller's upsert waiting for the batch window to close."""

    records: Sequence[TrackedMessage]
    done: asyncio.Future[None] = field(default_factory=_new_future)

    def settle(self, exc: BaseException | None) -> None:
        if self.done.done():
            return
        if exc is None:
            self.done.set_result(None)
        else:
            self.done.set_exception(exc)


class SQLiteStore:
    """Records and the SM state in one SQLite file (created with mode 0600).

    Opens lazily (on :meth:`open`, ``async with``, or the first call); use one
    instance per file and event loop. With ``batch_window`` > 0, upserts made within
    that many seconds of each other share one transaction (each caller still gets its
    own all-or-nothing result): it helps many concurrent writers, and only slows down
    a lone one that awaits each call. Any other call first writes the upserts queued
    before it, so what a caller awaited in turn is applied in turn.
    """

    def __init__(self, path: str | os.PathLike[str], *, batch_window: float = 0.0) -> None:
        if not batch_window >= 0:
            raise ValueError(f"batch_window must be >= 0 seconds, not {batch_window!r}")
        self.path = Path(path)
        self.batch_window = batch_window
        self._db: aiosqlite.Connection | None = None
        self._closed = False
        # One connection, one transaction at a time: also keeps a reader from seeing
        # another caller's uncommitted batch.
        self._lock = asyncio.Lock()
        self._queue: list[_Queued] = []
        self._timer: asyncio.TimerHandle | None = None
        self._flushes: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _error(self, what: str, exc: BaseException | None = None) -> StoreError:
        if isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorname", None):
            detail = f" ({exc.sqlite_errorname}: {exc})"
        elif exc is not None:
            detail = f" ({exc})"
        else:
            detail = ""
        return StoreError(f"SQLite store {self.path}: {what}{detail}")

    # ---------------------------------------------------------------- opening

    async def open(self) -> None:
        """Open (and create or migrate) the database now rather than on first use."""
        async with self._lock:
            await self._connection()

    async def _connection(self) -> aiosqlite.Connection:
        """The open connection; the caller holds ``_lock``."""
        if self._closed:
            raise self._error("the store is closed")
        if self._db is None:
            self._db = await self._connect()
        return self._db

    async def _connect(self) -> aiosqlite.Connection:
        self._create_private_file()
        try:
            # isolation_level=None: we write BEGIN/COMMIT ourselves, nothing implicit.
            db = await aiosqlite.connect(self.path, isolation_level=None)
        except sqlite3.Error as exc:
            raise self._error("cannot open the database", exc) from exc
        try:
            await self._prepare(db)
            await db.execute("PRAGMA synchronous=NORMAL")
            # SQLite gives -wal/-shm the database file's mode; check rather than trust.
            for suffix in ("-wal", "-shm"):
                self._make_private(self.path.with_name(self.path.name + suffix))
        except BaseException:
            await db.close()
            raise
        return db

    def _create_private_file(self) -> None:
        """Create the file 0600 before SQLite does (it would follow the umask).

        No umask dance: the umask is per process, and other threads may be creating
        files meanwhile. An existing file is checked here too, because a failed
        ``aiosqlite.connect`` leaves its worker thread to report to the event loop later.
        """
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            try:
                if not stat.S_ISREG(os.stat(self.path).st_mode):
                    raise self._error("is not a regular file") from None
                os.close(os.open(self.path, os.O_RDONLY))
            except OSError as exc:
                raise self._error("cannot read the database file", exc) from exc
            return
        except OSError as exc:
            raise self._error("cannot create the database file", exc) from exc
        os.close(fd)

    def _make_private(self, path: Path) -> None:
        try:
            if path.exists() and path.stat().st_mode & 0o077:
                path.chmod(0o600)
        except OSError as exc:
            raise self._error(f"cannot make {path.name} private (mode 0600)", exc) from exc

    async def _inspect(self, db: aiosqlite.Connection) -> tuple[int, dict[str, set[str]]]:
        """The file's schema version and its tables with their columns (reads only)."""
        try:
            async with db.execute("PRAGMA user_version") as cursor:
                row = await cursor.fetchone()
            version = int(row[0]) if row else 0
            async with db.execute(
                "SELECT name, type FROM sqlite_master WHERE name NOT LIKE 'sqlite\\_%' ESCAPE '\\'"
            ) as cursor:
                objects = list(await cursor.fetchall())
            tables: dict[str, set[str]] = {}
            for name, kind in objects:
                if kind != "table":
                    tables.setdefault(f"{kind} {name}", set())
                    continue
                async with db.execute("SELECT name FROM pragma_table_info(?)", (name,)) as cur:
                    tables[name] = {column for (column,) in await cur.fetchall()}
        except sqlite3.Error as exc:
            raise self._error(self._unreadable(exc), exc) from exc
        return version, tables

    @staticmethod
    def _unreadable(exc: sqlite3.Error) -> str:
        name = getattr(exc, "sqlite_errorname", "")
        if name == "SQLITE_NOTADB":
            return "is not an SQLite database (left untouched)"
        if name.startswith("SQLITE_CORRUPT"):
            return "is corrupt (left untouched)"
        if name.startswith("SQLITE_CANTOPEN"):
            return "cannot be opened (are the file and its directory readable and writable?)"
        return "cannot be read (left untouched)"

    def _refuse_foreign(self, version: int, tables: dict[str, set[str]]) -> None:
        latest = len(MIGRATIONS)
        if version > latest:
            raise self._error(
                f"schema version {version} is newer than the {latest} this version of "
                "xmpp_sm_tracker knows; upgrade it (the file was left untouched)"
            )
        if version == 0 and tables:
            raise self._error(
                f"holds other things ({', '.join(sorted(tables))}), not a tracker store "
                "(left untouched)"
            )
        if version == latest:
            found = {name: frozenset(columns) for name, columns in tables.items()}
            wrong = sorted(name for name, cols in _TABLES.items() if found.get(name) != cols)
            if wrong:
                raise self._error(
                    f"says schema version {version} but its {', '.join(wrong)} table(s) are "
                    "not ours (left untouched)"
                )

    async def _prepare(self, db: aiosqlite.Connection) -> None:
        """Refuse foreign files, bring ours to the latest version, switch to WAL."""
        version, tables = await self._inspect(db)
        self._refuse_foreign(version, tables)
        try:
            if version < len(MIGRATIONS):
                await db.execute("PRAGMA journal_mode=WAL")
                await self._migrate(db)
            else:
                async with db.execute("PRAGMA journal_mode") as cursor:
                    row = await cursor.fetchone()
                if row is None or str(row[0]).lower() != "wal":
                    await db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.Error as exc:
            raise self._error("cannot prepare the schema", exc) from exc

    async def _migrate(self, db: aiosqlite.Connection) -> None:
        """Run the missing migrations in one transaction: the file moves whole or not."""
        await db.execute("BEGIN IMMEDIATE")
        try:
            # Under the write lock now: another process may have migrated it meanwhile.
            version, tables = await self._inspect(db)
            self._refuse_foreign(version, tables)
            for step in range(version, len(MIGRATIONS)):
                await MIGRATIONS[step](db)
                # PRAGMA takes no bound parameters; this is our own int, never user data.
                await db.execute(f"PRAGMA user_version = {int(step + 1):d}")
            self._refuse_foreign(*await self._inspect(db))
            await db.commit()
        except BaseException:
            await self._rollback(db)
            raise

    # ---------------------------------------------------------------- plumbing

    @staticmethod
    async def _rollback(db: aiosqlite.Connection) -> None:
        # A no-op when no transaction is open; if it fails, the original error matters more.
        with contextlib.suppress(Exception):
            await db.rollback()

    async def _write(self, what: str, work: Callable[[aiosqlite.Connection], Awaitable[_T]]) -> _T:
        """Run ``work`` in its own transaction, after any batched upserts made before."""
        await self._drain()
        return await self._transaction(what, work)

    async def _transaction(
        self, what: str, work: Callable[[aiosqlite.Connection], Awaitable[_T]]
    ) -> _T:
        """Run ``work`` committed whole, or rolled back whole.

        A cancelled caller still rolls back (aiosqlite finishes queued statements in
        order), so the connection is never left inside a half-done transaction.
        """
        async with self._lock:
            db = await self._connection()
            try:
                await db.execute("BEGIN IMMEDIATE")
                result = await work(db)
                await db.commit()
            except BaseException as exc:
                await self._rollback(db)
                if isinstance(exc, sqlite3.Error):
                    raise self._error(f"{what} failed (rolled back)", exc) from exc
                raise
        return result

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        await self._drain()
        async with self._lock:
            db = await self._connection()
            try:
                async with db.execute(sql, params) as cursor:
                    return list(await cursor.fetchall())
            except sqlite3.Error as exc:
                raise self._error("reading failed", exc) from exc

    async def _records(self, sql: str, params: Sequence[Any] = ()) -> list[TrackedMessage]:
        rows = await self._read(sql, params)
        try:
            return [_record(row) for row in rows]
        except (KeyError, TypeError, ValueError) as exc:
            raise self._error("holds a record this version cannot read", exc) from exc

    # ---------------------------------------------------------------- batching

    async def _drain(self) -> None:
        """Finish batched upserts made before this call, so calls apply in call order."""
        if self._queue:
            self._start_flush()
        if self._flushes:
            # wait() does not cancel the flushes if we are cancelled: others await them.
            await asyncio.wait(set(self._flushes))

    def _start_flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._queue = self._queue, []
        if batch:
            task = asyncio.ensure_future(self._flush(batch))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _flush(self, batch: list[_Queued]) -> None:
        """Write a window's upserts together; if that fails, each alone, for its own result."""
        try:
            if len(batch) > 1:
                try:
                    await self._upsert_now([r for queued in batch for r in queued.records])
                except Exception:
                    pass  # one bad caller must not fail the others: retry one by one
                else:
                    for queued in batch:
                        queued.settle(None)
                    return
            for queued in batch:
                try:
                    await self._upsert_now(queued.records)
                except Exception as exc:
                    queued.settle(exc)
                else:
                    queued.settle(None)
        except BaseException as exc:
            for queued in batch:
                queued.settle(exc)
            raise

    async def _upsert_now(self, records: Sequence[TrackedMessage]) -> None:
        async def work(db: aiosqlite.Connection) -> None:
            # Rows are built lazily inside the transaction, so an exception from any
            # record (or the process dying) leaves none of this batch behind.
            await db.executemany(_UPSERT, (_row(record) for record in records))

        await self._transaction(f"writing {len(records)} records", work)

    # ---------------------------------------------------------------- records

    async def upsert(self, records: Sequence[TrackedMessage]) -> None:
        """Insert or replace records by id in one transaction, all or nothing."""
        if not records:
            await self._drain()
            await self.open()  # still an error on a closed or unusable store
            return
        if self.batch_window <= 0:
            await self._drain()
            await self._upsert_now(records)
            return
        if self._closed or self._db is None:
            await self.open()  # raises on a closed or unusable store
        queued = _Queued(list(records))
        self._queue.append(queued)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(
                self.batch_window, self._start_flush
            )
        try:
            await queued.done
        except asyncio.CancelledError:
            if queued in self._queue:  # not started yet: it will not be written
                self._queue.remove(queued)
            raise

    async def get(self, message_id: str) -> TrackedMessage | None:
        """One record by id."""
        found = await self._records(f"{_SELECT} WHERE id = ?", (message_id,))
        return found[0] if found else None

    async def counts(self) -> list[tuple[str, str, int]]:
        """(conversation, state value, how many) for every pair present: for inspection."""
        rows = await self._read(
            "SELECT conversation, state, COUNT(*) FROM records "
            "GROUP BY conversation, state ORDER BY conversation, state"
        )
        return [(str(c), str(st), int(n)) for c, st, n in rows]

    async def all_records(self) -> list[TrackedMessage]:
        """Every record, oldest first: for export."""
        return await self._records(f"{_SELECT} {_OLDEST_FIRST}")

    async def pending(self) -> list[TrackedMessage]:
        """SENT, HIBERNATED and RESENT records, oldest first."""
        return await self._records(f"{_SELECT} WHERE {_IS_IN_FLIGHT} {_OLDEST_FIRST}")

    async def failed(self, conversation: str | None = None) -> list[TrackedMessage]:
        """FAILED records, oldest first, optionally for one conversation (bare JID)."""
        if conversation is None:
            return await self._records(f"{_SELECT} WHERE {_IS_FAILED} {_OLDEST_FIRST}")
        return await self._records(
            f"{_SELECT} WHERE {_IS_FAILED} AND conversation = ? {_OLDEST_FIRST}",
            (conversation,),
        )

    async def conversation(
        self, jid: str, limit: int = 50, before: float | None = None
    ) -> list[TrackedMessage]:
        """The newest ``limit`` records to ``jid`` created before ``before``, oldest first."""
        if limit <= 0:
            await self._read("SELECT 1")  # same errors as any other call
            return []
        bare = jid.split("/", 1)[0]
        if before is None:
            sql = f"{_SELECT} WHERE conversation = ? {_NEWEST_FIRST} LIMIT ?"
            params: tuple[Any, ...] = (bare, min(limit, _MAX_LIMIT))
        else:
            sql = f"{_SELECT} WHERE conversation = ? AND created_at < ? {_NEWEST_FIRST} LIMIT ?"
            params = (bare, before, min(limit, _MAX_LIMIT))
        newest = await self._records(sql, params)
        newest.reverse()
        return newest

    async def delete(self, message_id: str) -> bool:
        """Delete one record; True if it existed."""

        async def work(db: aiosqlite.Connection) -> int:
            cursor = await db.execute("DELETE FROM records WHERE id = ?", (message_id,))
            return cursor.rowcount

        return await self._write("deleting a record", work) > 0

    async def delete_failed(self, conversation: str | None = None) -> int:
        """Delete FAILED records (all, or one conversation's); how many went."""

        async def work(db: aiosqlite.Connection) -> int:
            if conversation is None:
                cursor = await db.execute(f"DELETE FROM records WHERE {_IS_FAILED}")
            else:
                cursor = await db.execute(
                    f"DELETE FROM records WHERE {_IS_FAILED} AND conversation = ?",
                    (conversation,),
                )
            return cursor.rowcount

        return await self._write("deleting failed records", work)

    # ---------------------------------------------------------------- SM state

    async def save_sm_state(self, state: SMState | None) -> None:
        """Keep the SM state as JSON text; None deletes it (the session ended cleanly)."""
        if state is None:

            async def forget(db: aiosqlite.Connection) -> None:
                await db.execute("DELETE FROM sm_state")

            await self._write("forgetting the SM state", forget)
            return
        try:
            text = json.dumps(state, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise self._error("the SM state is not JSON-safe", exc) from exc

        async def keep(db: aiosqlite.Connection) -> None:
            await db.execute(
                "INSERT INTO sm_state (slot, state) VALUES (1, ?) "
                "ON CONFLICT(slot) DO UPDATE SET state = excluded.state",
                (text,),
            )

        await self._write("saving the SM state", keep)

    async def load_sm_state(self) -> SMState | None:
        """The SM state saved last (a fresh dict every time), or None."""
        rows = await self._read("SELECT state FROM sm_state WHERE slot = 1")
        if not rows:
            return None
        try:
            state = json.loads(rows[0][0])
        except ValueError as exc:
            raise self._error("the saved SM state is not valid JSON", exc) from exc
        if not isinstance(state, dict):
            raise self._error("the saved SM state is not a JSON object")
        return state

    async def aclose(self) -> None:
        """Write what is still batched, then close; calling it again is harmless."""
        try:
            await self._drain()
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            async with self._lock:
                self._closed = True
                db, self._db = self._db, None
                if db is not None:
                    await db.close()
