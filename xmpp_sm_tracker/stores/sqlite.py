"""The durable default store: one SQLite file (aiosqlite, WAL), private to its owner.

The schema is versioned with ``PRAGMA user_version`` and moved forward by the
functions in :data:`MIGRATIONS`, so version 2 is one more function. A file that is
not a database, holds another schema, or comes from a newer version is refused
with a :class:`StoreError` naming it, and is never written to.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiosqlite

from ..core.records import TrackedMessage
from ..core.states import IN_FLIGHT, DeliveryState
from .base import SMState, StoreError

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "SQLiteStore"]

_COLUMNS = (
    "id, origin_id, recipient, conversation, type, body, state, xml, created_at, "
    "updated_at, via_carbon, attempts, reason, seq"
)
_UPSERT = (
    f"INSERT INTO records ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT(id) DO UPDATE SET origin_id=excluded.origin_id, "
    "recipient=excluded.recipient, conversation=excluded.conversation, type=excluded.type, "
    "body=excluded.body, state=excluded.state, xml=excluded.xml, "
    "created_at=excluded.created_at, updated_at=excluded.updated_at, "
    "via_carbon=excluded.via_carbon, attempts=excluded.attempts, reason=excluded.reason, "
    "seq=excluded.seq"
)
_ORDER = "ORDER BY created_at, COALESCE(seq, 0)"
_IN_FLIGHT = tuple(sorted(state.value for state in IN_FLIGHT))


async def _schema_v1(db: aiosqlite.Connection) -> None:
    await db.executescript(
        """
        CREATE TABLE records (
            id TEXT PRIMARY KEY,
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
        );
        CREATE INDEX records_by_state ON records (state, created_at);
        CREATE INDEX records_by_conversation ON records (conversation, created_at);
        CREATE TABLE sm_state (
            slot INTEGER PRIMARY KEY CHECK (slot = 1),
            state TEXT NOT NULL
        );
        """
    )


#: ``MIGRATIONS[n]`` takes a database from version n to n + 1.
MIGRATIONS: tuple[Callable[[aiosqlite.Connection], Awaitable[None]], ...] = (_schema_v1,)
SCHEMA_VERSION = len(MIGRATIONS)
_OUR_TABLES = {"records", "sm_state"}


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
    return TrackedMessage(
        id=mid,
        origin_id=origin,
        to=to,
        type=kind,
        body=body,
        state=DeliveryState(state),
        xml=xml,
        created_at=created,
        updated_at=updated,
        via_carbon=bool(carbon),
        attempts=attempts,
        reason=reason,
        seq=seq,
    )


class SQLiteStore:
    """Records and the SM state in one SQLite file (created with mode 0600)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._db: aiosqlite.Connection | None = None
        self._closed = False
        self._open_lock = asyncio.Lock()

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
        detail = f": {exc}" if exc is not None else ""
        return StoreError(f"SQLite store {self.path}: {what}{detail}")

    # ---------------------------------------------------------------- opening

    async def open(self) -> None:
        """Open (and create or migrate) the database; safe to call more than once."""
        await self._connection()

    async def _connection(self) -> aiosqlite.Connection:
        if self._closed:
            raise self._error("the store is closed")
        if self._db is not None:
            return self._db
        async with self._open_lock:
            if self._db is None:
                self._db = await self._connect()
        return self._db

    async def _connect(self) -> aiosqlite.Connection:
        created = self._create_private_file()
        try:
            db = await aiosqlite.connect(self.path)
        except sqlite3.Error as exc:
            raise self._error("cannot open the database", exc) from exc
        try:
            await self._check_and_migrate(db, created)
            await db.execute("PRAGMA synchronous=NORMAL")
        except BaseException:
            await db.close()
            raise
        self._make_private(self.path.with_name(self.path.name + "-wal"))
        self._make_private(self.path.with_name(self.path.name + "-shm"))
        return db

    def _create_private_file(self) -> bool:
        """Create the file with mode 0600 before SQLite does (it would use the umask)."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            return False
        except OSError as exc:
            raise self._error("cannot create the database file", exc) from exc
        os.close(fd)
        return True

    @staticmethod
    def _make_private(path: Path) -> None:
        try:
            if path.exists() and path.stat().st_mode & 0o077:
                path.chmod(0o600)
        except OSError:
            pass

    async def _check_and_migrate(self, db: aiosqlite.Connection, created: bool) -> None:
        try:
            async with db.execute("PRAGMA user_version") as cursor:
                row = await cursor.fetchone()
            version = int(row[0]) if row else 0
            async with db.execute("SELECT name FROM sqlite_master WHERE type='table'") as cursor:
                tables = {name for (name,) in await cursor.fetchall()}
        except sqlite3.DatabaseError as exc:
            raise self._error("not a usable SQLite database (left untouched)", exc) from exc
        if version > SCHEMA_VERSION:
            raise self._error(
                f"schema version {version} is newer than this library's {SCHEMA_VERSION}; "
                "upgrade xmpp_sm_tracker (the file was left untouched)"
            )
        if version == 0 and tables:
            raise self._error(
                f"holds other tables ({', '.join(sorted(tables))}), not a tracker store "
                "(left untouched)"
            )
        if version > 0 and not tables >= _OUR_TABLES:
            raise self._error(f"schema version {version} but tables are missing: {tables}")
        try:
            if version < SCHEMA_VERSION:
                await db.execute("PRAGMA journal_mode=WAL")
            for step in range(version, SCHEMA_VERSION):
                await MIGRATIONS[step](db)
                await db.execute(f"PRAGMA user_version = {step + 1:d}")
                await db.commit()
            if version == SCHEMA_VERSION:
                await db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.Error as exc:
            raise self._error("cannot prepare the schema", exc) from exc

    # ---------------------------------------------------------------- records

    async def _write(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        db = await self._connection()
        try:
            cursor = await db.executemany(sql, rows)
            await db.commit()
        except sqlite3.Error as exc:
            await db.rollback()
            raise self._error("write failed (rolled back)", exc) from exc
        return cursor.rowcount

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[TrackedMessage]:
        db = await self._connection()
        try:
            async with db.execute(sql, params) as cursor:
                rows = await cursor.fetchall()
        except sqlite3.Error as exc:
            raise self._error("read failed", exc) from exc
        return [_record(row) for row in rows]

    async def upsert(self, records: Sequence[TrackedMessage]) -> None:
        if records:
            await self._write(_UPSERT, [_row(record) for record in records])

    async def get(self, message_id: str) -> TrackedMessage | None:
        rows = await self._read(f"SELECT {_COLUMNS} FROM records WHERE id = ?", (message_id,))
        return rows[0] if rows else None

    async def pending(self) -> list[TrackedMessage]:
        marks = ", ".join("?" * len(_IN_FLIGHT))
        return await self._read(
            f"SELECT {_COLUMNS} FROM records WHERE state IN ({marks}) {_ORDER}", _IN_FLIGHT
        )

    async def failed(self, conversation: str | None = None) -> list[TrackedMessage]:
        sql = f"SELECT {_COLUMNS} FROM records WHERE state = ?"
        params: list[Any] = [DeliveryState.FAILED.value]
        if conversation is not None:
            sql += " AND conversation = ?"
            params.append(conversation)
        return await self._read(f"{sql} {_ORDER}", params)

    async def conversation(
        self, jid: str, limit: int = 50, before: float | None = None
    ) -> list[TrackedMessage]:
        if limit <= 0:
            return []
        sql = f"SELECT {_COLUMNS} FROM records WHERE conversation = ?"
        params: list[Any] = [jid.split("/", 1)[0]]
        if before is not None:
            sql += " AND created_at < ?"
            params.append(before)
        sql += " ORDER BY created_at DESC, COALESCE(seq, 0) DESC LIMIT ?"
        params.append(limit)
        return list(reversed(await self._read(sql, params)))

    async def delete(self, message_id: str) -> bool:
        return await self._write("DELETE FROM records WHERE id = ?", [(message_id,)]) > 0

    async def delete_failed(self, conversation: str | None = None) -> int:
        if conversation is None:
            return await self._write(
                "DELETE FROM records WHERE state = ?", [(DeliveryState.FAILED.value,)]
            )
        return await self._write(
            "DELETE FROM records WHERE state = ? AND conversation = ?",
            [(DeliveryState.FAILED.value, conversation)],
        )

    # ---------------------------------------------------------------- SM state

    async def save_sm_state(self, state: SMState | None) -> None:
        if state is None:
            await self._write("DELETE FROM sm_state", [()])
            return
        await self._write(
            "INSERT INTO sm_state (slot, state) VALUES (1, ?) "
            "ON CONFLICT(slot) DO UPDATE SET state = excluded.state",
            [(json.dumps(state, separators=(",", ":")),)],
        )

    async def load_sm_state(self) -> SMState | None:
        db = await self._connection()
        try:
            async with db.execute("SELECT state FROM sm_state WHERE slot = 1") as cursor:
                row = await cursor.fetchone()
        except sqlite3.Error as exc:
            raise self._error("read failed", exc) from exc
        if row is None:
            return None
        try:
            state = json.loads(row[0])
        except ValueError as exc:
            raise self._error("the saved SM state is not valid JSON", exc) from exc
        if not isinstance(state, dict):
            raise self._error("the saved SM state is not a JSON object")
        return state

    async def aclose(self) -> None:
        self._closed = True
        db, self._db = self._db, None
        if db is not None:
            await db.close()
