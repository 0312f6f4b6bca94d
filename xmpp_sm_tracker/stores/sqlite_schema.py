"""The SQLite store's schema: its migrations, and rows to records and back.

Versioned with ``PRAGMA user_version``: ``MIGRATIONS[n]`` takes a database from
version n to n + 1. Append a function for the next version; never edit one that shipped.
Since version 2 every row is keyed by account (a bare JID; ``''`` for the one account of
:class:`~.sqlite.SQLiteStore`), so one file holds a fleet (:class:`~.sqlite.SQLiteDatabase`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Iterator, Sequence
from itertools import chain, islice
from typing import Any, Final

import aiosqlite

from ..core.records import TrackedMessage, build_record
from ..core.states import DeliveryState

__all__ = [
    "COLUMNS",
    "FIELDS",
    "IS_FAILED",
    "IS_IN_FLIGHT",
    "MAX_LIMIT",
    "MIGRATIONS",
    "MOVE_ROWS",
    "NEWEST_FIRST",
    "OLDEST_FIRST",
    "ROWS_PER_UPSERT",
    "SCHEMA_VERSION",
    "SELECT",
    "TABLES",
    "UPSERT_ROWS",
    "Migration",
    "bound_row_of",
    "move_of",
    "only_moved",
    "record_of",
    "row_of",
    "unencodable",
    "upsert_runs",
]

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


async def _v2_accounts(db: aiosqlite.Connection) -> None:
    """Records and SM states keyed by account, so one file can hold a fleet.

    The rows of version 1 become the default account ``''`` (:class:`SQLiteStore`'s),
    each keeping its rowid: the order of first sight that breaks ties in every listing.
    SQLite cannot change a primary key in place, so the tables are built anew.
    """
    for statement in (
        """
        CREATE TABLE records_v2 (
            account TEXT NOT NULL,
            id TEXT NOT NULL,
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
            seq INTEGER,
            PRIMARY KEY (account, id)
        )
        """,
        """
        INSERT INTO records_v2 (rowid, account, id, origin_id, recipient, conversation, type,
            body, state, xml, created_at, updated_at, via_carbon, attempts, reason, seq)
        SELECT rowid, '', id, origin_id, recipient, conversation, type, body, state, xml,
            created_at, updated_at, via_carbon, attempts, reason, seq
        FROM records
        """,
        "DROP TABLE records",  # its indexes go with it
        "ALTER TABLE records_v2 RENAME TO records",
        # As in version 1, with the account first: each matches one query's WHERE and
        # ORDER BY (rowid is every index's last key), so no listing ever sorts.
        """
        CREATE INDEX records_in_flight ON records (account, created_at, COALESCE(seq, 0))
        WHERE state IN ('hibernated', 'resent', 'sent')
        """,
        """
        CREATE INDEX records_failed ON records (account, created_at, COALESCE(seq, 0))
        WHERE state = 'failed'
        """,
        """
        CREATE INDEX records_by_conversation
        ON records (account, conversation, created_at, COALESCE(seq, 0))
        """,
        """
        CREATE TABLE sm_state_v2 (
            account TEXT PRIMARY KEY NOT NULL,
            state TEXT NOT NULL
        )
        """,
        "INSERT INTO sm_state_v2 (account, state) SELECT '', state FROM sm_state WHERE slot = 1",
        "DROP TABLE sm_state",
        "ALTER TABLE sm_state_v2 RENAME TO sm_state",
    ):
        await db.execute(statement)


async def _v3_in_flight_without_an_in_list(db: aiosqlite.Connection) -> None:
    """The in-flight index's WHERE as equalities joined by OR, not ``state IN (...)``.

    SQLite evaluates a partial index's WHERE for every row it writes, and codes an IN
    list of three constants as a temporary table built anew each time (opened, zeroed,
    filled): a quarter of the instructions of an insert, and two of them in every
    upsert that replaces a row. Three equalities cost a few comparisons. The queries
    use the same text (:data:`IS_IN_FLIGHT`), so the planner still picks the index.
    """
    for statement in (
        "DROP INDEX records_in_flight",
        """
        CREATE INDEX records_in_flight ON records (account, created_at, COALESCE(seq, 0))
        WHERE state = 'hibernated' OR state = 'resent' OR state = 'sent'
        """,
    ):
        await db.execute(statement)


#: ``MIGRATIONS[n]`` takes a database from version n to n + 1. Append, never edit.
MIGRATIONS: list[Migration] = [_v1_first_schema, _v2_accounts, _v3_in_flight_without_an_in_list]
#: The schema version this library writes.
SCHEMA_VERSION: Final = len(MIGRATIONS)

#: Column order of the records table; ``recipient`` holds ``TrackedMessage.to``.
FIELDS: Final = (
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
TABLES: Final = {
    "records": frozenset({"account", *FIELDS}),
    "sm_state": frozenset({"account", "state"}),
}
# Only identifiers and fixed state literals are in the SQL text; values are bound parameters.
COLUMNS: Final = ", ".join(FIELDS)
#: Every query is for one account: its first parameter.
SELECT: Final = f"SELECT {COLUMNS} FROM records WHERE account = ?"
# The sqlite3 module binds None through its adapter lookup, which raises and clears an
# AttributeError for every None (a third of a microsecond each): the nullable columns
# go as a flag and a value instead (see bound_row_of), and the flag makes the NULL.
_NULLABLE: Final = "CASE WHEN ? THEN ? END"
_ROW: Final = f"({', '.join(['?'] * (len(FIELDS) - 1) + [_NULLABLE] * 2)})"
_ON_CONFLICT: Final = "ON CONFLICT(account, id) DO UPDATE SET " + ", ".join(
    f"{name} = excluded.{name}" for name in FIELDS[1:]
)
#: Rows one upsert statement writes at most. The sqlite3 module lets go of the GIL for
#: each statement it runs and must take it back after: a statement per row, under a busy
#: event loop, made the worker thread wait for the GIL once per row (5-7× the CPU per
#: row, measured). 50 rows of 17 values stay below SQLite's oldest limit of 999.
ROWS_PER_UPSERT: Final = 50
#: The upsert of n rows (account first, then :func:`bound_row_of`) in one statement,
#: by n; a later row with the same id wins, as if written after.
UPSERT_ROWS: Final = {
    n: f"INSERT INTO records (account, {COLUMNS}) VALUES {', '.join([_ROW] * n)} {_ON_CONFLICT}"
    for n in range(1, ROWS_PER_UPSERT + 1)
}


#: Moves n records written before to another state (``(account, id, state,
#: updated_at)`` a row, as :func:`move_of` makes them) in one statement, by n. Only
#: state and time change, so SQLite rewrites the row and the indexes on state, not
#: every index an upsert names (its replace deletes and inserts them all): 27 000
#: instructions a row instead of 42 000, measured. A row that is not there is not
#: made: the statement's count of changed rows says so. Needs SQLite 3.33 or later.
MOVE_ROWS: Final = {
    n: "UPDATE records SET state = v.column3, updated_at = v.column4 FROM (VALUES "
    + ", ".join(["(?, ?, ?, ?)"] * n)
    + ") AS v WHERE records.account = v.column1 AND records.id = v.column2"
    for n in range(1, ROWS_PER_UPSERT + 1)
}


def upsert_runs(
    rows: Iterator[tuple[Any, ...]], count: int
) -> Iterator[tuple[int, Iterator[tuple[Any, ...]]]]:
    """(n, parameters per run) that upsert the ``count`` ``rows`` in order when each
    ``runs`` goes to ``executemany(UPSERT_ROWS[n], runs)``, before the next is asked
    for: at most :data:`ROWS_PER_UPSERT` rows a run. Lazy, so a batch of 100 000 is
    never in memory twice over."""
    size = ROWS_PER_UPSERT
    whole, rest = divmod(count, size)
    if whole:
        yield size, (tuple(chain.from_iterable(islice(rows, size))) for _ in range(whole))
    if rest:
        yield rest, iter([tuple(chain.from_iterable(rows))])


# rowid breaks ties like MemoryStore's dict: a replaced record keeps its first place.
OLDEST_FIRST: Final = "ORDER BY created_at, COALESCE(seq, 0), rowid"
NEWEST_FIRST: Final = "ORDER BY created_at DESC, COALESCE(seq, 0) DESC, rowid DESC"
# The same text as the partial indexes' WHERE, so the planner can use them.
IS_IN_FLIGHT: Final = "(state = 'hibernated' OR state = 'resent' OR state = 'sent')"
IS_FAILED: Final = "state = 'failed'"
_STATES: Final = {state.value: state for state in DeliveryState}
_TEXT_OF: Final = {state: state.value for state in DeliveryState}  # .value is a Python call
MAX_LIMIT: Final = 2**63 - 1  # SQLite's largest integer


def bound_row_of(account: str, record: TrackedMessage) -> tuple[Any, ...]:
    """One row of :data:`UPSERT_ROWS`: the account, then the record's values in
    :data:`FIELDS` order with the nullable ones as a flag and a value, never a None
    (see ``_NULLABLE``). One tuple: it runs in the worker thread for every row written,
    and each tuple it saves is one less for the garbage collector to count."""
    reason, seq = record.reason, record.seq
    return (
        account,
        record.id,
        record.origin_id,
        record.to,
        record.conversation,
        record.type,
        record.body,
        _TEXT_OF[record.state],
        record.xml,
        record.created_at,
        record.updated_at,
        int(record.via_carbon),
        record.attempts,
        0 if reason is None else 1,  # an int: a bool, too, goes through the adapters
        "" if reason is None else reason,
        0 if seq is None else 1,
        0 if seq is None else seq,
    )


def row_of(record: TrackedMessage) -> tuple[Any, ...]:
    """The record's values in :data:`FIELDS` order (None for no reason, no seq)."""
    _, *values, reason_set, reason, seq_set, seq = bound_row_of("", record)
    return (*values, reason if reason_set else None, seq if seq_set else None)


def move_of(account: str, record: TrackedMessage) -> tuple[str, str, str, float]:
    """The parameters of one row of :data:`MOVE_ROWS`."""
    return (account, record.id, _TEXT_OF[record.state], record.updated_at)


def only_moved(before: TrackedMessage, after: TrackedMessage) -> bool:
    """True when ``after`` differs from ``before`` (the same id) in state and time
    only, so :data:`MOVE_ROWS` can write it. Snapshots share their unchanged strings,
    so most of these comparisons stop at identity."""
    return (
        after.xml == before.xml
        and after.body == before.body
        and after.to == before.to
        and after.origin_id == before.origin_id
        and after.type == before.type
        and after.created_at == before.created_at
        and after.via_carbon == before.via_carbon
        and after.attempts == before.attempts
        and after.reason == before.reason
        and after.seq == before.seq
    )


def record_of(row: sqlite3.Row | tuple[Any, ...]) -> TrackedMessage:
    (mid, origin, to, _conv, kind, body, state, xml, created, updated, carbon, attempts,
     reason, seq) = row  # fmt: skip
    # build_record is TrackedMessage(...) made faster: a start-up reads every in-flight row.
    return build_record(
        mid, origin, to, kind, body, _STATES[state], xml, created, updated,
        bool(carbon), attempts, reason, seq,
    )  # fmt: skip


def unencodable(records: Sequence[TrackedMessage]) -> str | None:
    """The id of the first record with text UTF-8 cannot encode (a lone surrogate): a
    database's error would quote the whole text (a body), ours names the record."""
    for record in records:
        for text in row_of(record):
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    return record.id
    return None
