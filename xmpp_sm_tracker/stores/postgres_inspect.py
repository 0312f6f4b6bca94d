"""Looking into a PostgreSQL tracker database without changing it (``inspect`` with a DSN).

:class:`~.postgres.PostgresStore` creates or migrates the schema when it connects:
right for a tracker, wrong for a look. This reads in one read-only transaction (the
session refuses writes too), so the database is left exactly as it was, even an
empty one or one of another version, and all it shows is one consistent snapshot.
The password in the DSN never appears in what it prints or raises.

Needs the ``postgres`` extra, like the store.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from ..core.records import TrackedMessage
from .base import OpenClose, StoreError
from .postgres_db import describe_dsn, masked
from .postgres_schema import (
    IS_FAILED,
    IS_IN_FLIGHT,
    OLDEST_FIRST,
    RECORDS,
    SCHEMA_VERSION,
    SELECT,
    SM_STATE,
    VERSION_TABLE,
)
from .sqlite_schema import record_of

__all__ = ["PostgresInspector"]


class PostgresInspector(OpenClose):
    """A read-only snapshot of a tracker database: its accounts, and one account's
    counts, in-flight and failed records (set :attr:`account` first).

    ``async with PostgresInspector(dsn) as db``: connects, starts the read-only
    transaction and checks the schema is ours and current; leaving rolls back.
    """

    def __init__(self, dsn: str, *, connect_timeout: float = 10.0) -> None:
        self._dsn = dsn
        self.connect_timeout = connect_timeout
        self.server, self._password = describe_dsn(dsn)
        #: The account whose records :meth:`counts`, :meth:`pending` and :meth:`failed` read.
        self.account = ""
        self._conn: asyncpg.Connection | None = None

    def error(self, what: str, exc: BaseException | None = None) -> StoreError:
        """A StoreError naming the server (never the password)."""
        text = f"PostgreSQL database {self.server}: {what}"
        if exc is not None:
            text += f" ({type(exc).__name__}: {exc})"
        return StoreError(masked(text, self._password))

    async def open(self) -> None:
        """Connect, start the read-only transaction, check the schema is ours."""
        try:
            conn = await asyncpg.connect(
                self._dsn,
                timeout=self.connect_timeout,
                server_settings={"default_transaction_read_only": "on"},
            )
        except Exception as exc:
            raise self.error("cannot connect", exc) from None
        try:
            await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            self._conn = conn
            await self._check_schema()
        except BaseException:
            self._conn = None
            conn.terminate()
            raise

    async def aclose(self) -> None:
        """Roll the snapshot back and disconnect."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.execute("ROLLBACK")
                await conn.close(timeout=self.connect_timeout)
            except Exception:
                conn.terminate()

    async def _fetch(self, sql: str, *params: Any) -> list[Any]:
        if self._conn is None:
            raise self.error("not connected (use 'async with')")
        try:
            return list(await self._conn.fetch(sql, *params))
        except Exception as exc:
            raise self.error("reading failed", exc) from None

    async def _check_schema(self) -> None:
        found = await self._fetch(
            "SELECT 1 FROM information_schema.tables "
            "WHERE table_schema = current_schema() AND table_name = $1",
            VERSION_TABLE,
        )
        if not found:
            raise self.error("holds no tracker schema (nothing to inspect; left untouched)")
        versions = await self._fetch(f"SELECT version FROM {VERSION_TABLE}")
        version = int(versions[0][0]) if len(versions) == 1 else None
        if version != SCHEMA_VERSION:
            raise self.error(
                f"has schema version {version}, not the {SCHEMA_VERSION} this version "
                "reads (a tracker of this version migrates it; left untouched)"
            )

    async def accounts(self) -> list[str]:
        """Every account with records or an SM state, sorted."""
        rows = await self._fetch(
            f"SELECT account FROM {RECORDS} UNION SELECT account FROM {SM_STATE} ORDER BY 1"
        )
        return [str(row[0]) for row in rows]

    async def counts(self) -> list[tuple[str, str, int]]:
        """(conversation, state value, how many) for every pair the account has."""
        rows = await self._fetch(
            f"SELECT conversation, state, COUNT(*) FROM {RECORDS} WHERE account = $1 "
            "GROUP BY conversation, state ORDER BY conversation, state",
            self.account,
        )
        return [(str(c), str(st), int(n)) for c, st, n in rows]

    async def _records(self, sql: str) -> list[TrackedMessage]:
        rows = await self._fetch(sql, self.account)
        try:
            return [record_of(tuple(row)) for row in rows]
        except (KeyError, TypeError, ValueError) as exc:
            raise self.error("holds a record this version cannot read", exc) from exc

    async def pending(self) -> list[TrackedMessage]:
        """The account's SENT, HIBERNATED and RESENT records, oldest first."""
        return await self._records(f"{SELECT} AND {IS_IN_FLIGHT} {OLDEST_FIRST}")

    async def failed(self) -> list[TrackedMessage]:
        """The account's FAILED records, oldest first."""
        return await self._records(f"{SELECT} AND {IS_FAILED} {OLDEST_FIRST}")
