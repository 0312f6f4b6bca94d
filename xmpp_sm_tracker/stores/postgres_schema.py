"""The PostgreSQL store's schema: its migrations and the SQL the store runs.

Many accounts share one database, so every row is keyed by ``account`` (a bare JID) and
every table name starts with ``sm_tracker_`` to stay clear of the application's own.
The version is the one row of ``sm_tracker_schema_version``: ``MIGRATIONS[n]`` takes a
database from version n to n + 1. Append a tuple for the next version; never edit one
that shipped. A database whose tables look like ours but are not is refused, untouched.
"""

from __future__ import annotations

from typing import Final

from .sqlite_schema import FIELDS

__all__ = [
    "IS_FAILED",
    "IS_IN_FLIGHT",
    "LEASES",
    "MIGRATIONS",
    "NEWEST_FIRST",
    "OLDEST_FIRST",
    "RECORDS",
    "SCHEMA_VERSION",
    "SELECT",
    "SM_STATE",
    "TABLES",
    "UPSERT",
    "VERSION_TABLE",
]

RECORDS: Final = "sm_tracker_records"
SM_STATE: Final = "sm_tracker_sm_state"
VERSION_TABLE: Final = "sm_tracker_schema_version"
LEASES: Final = "sm_tracker_leases"

_V1: Final = (
    f"""
    CREATE TABLE {VERSION_TABLE} (
        version integer NOT NULL
    )
    """,
    # pos: the order of first sight (a replaced record keeps it, a re-inserted one is new),
    # as MemoryStore's dict and SQLite's rowid give it.
    f"""
    CREATE TABLE {RECORDS} (
        account text NOT NULL,
        id text NOT NULL,
        pos bigint GENERATED ALWAYS AS IDENTITY,
        origin_id text NOT NULL,
        recipient text NOT NULL,
        conversation text NOT NULL,
        type text NOT NULL,
        body text NOT NULL,
        state text NOT NULL,
        xml text NOT NULL,
        created_at double precision NOT NULL,
        updated_at double precision NOT NULL,
        via_carbon boolean NOT NULL,
        attempts integer NOT NULL,
        reason text,
        seq bigint,
        PRIMARY KEY (account, id)
    )
    """,
    # Each index matches one query's WHERE and ORDER BY. Frozen text: a new state is v2.
    f"""
    CREATE INDEX sm_tracker_records_in_flight
    ON {RECORDS} (account, created_at, COALESCE(seq, 0), pos)
    WHERE state IN ('hibernated', 'resent', 'sent')
    """,
    f"""
    CREATE INDEX sm_tracker_records_failed
    ON {RECORDS} (account, conversation, created_at, COALESCE(seq, 0), pos)
    WHERE state = 'failed'
    """,
    f"""
    CREATE INDEX sm_tracker_records_by_conversation
    ON {RECORDS} (account, conversation, created_at, COALESCE(seq, 0), pos)
    """,
    # JSON text, not jsonb: jsonb would turn 1e308 into an integer and refuse "\\u0000".
    f"""
    CREATE TABLE {SM_STATE} (
        account text PRIMARY KEY,
        state text NOT NULL
    )
    """,
)

# One owner per account: a lease row renewed while its owner lives, timed by the
# database's clock (never the machines'). ``token`` grows with every change of owner, and
# every write checks it (FOR SHARE) in its own transaction, so a process that lost the
# lease can never write again, however late its write arrives.
_V2: Final = (
    f"""
    CREATE TABLE {LEASES} (
        account text PRIMARY KEY,
        owner text NOT NULL,
        token bigint NOT NULL,
        expires_at timestamptz NOT NULL
    )
    """,
)

#: ``MIGRATIONS[n]`` takes a database from version n to n + 1. Append, never edit.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (_V1, _V2)
#: The schema version this library writes.
SCHEMA_VERSION: Final = len(MIGRATIONS)

#: Our tables and their columns at :data:`SCHEMA_VERSION`, to tell ours from others.
TABLES: Final = {
    VERSION_TABLE: frozenset({"version"}),
    RECORDS: frozenset({"account", "pos", *FIELDS}),
    SM_STATE: frozenset({"account", "state"}),
    LEASES: frozenset({"account", "owner", "token", "expires_at"}),
}

_COLUMNS: Final = ", ".join(FIELDS)
# Only identifiers and fixed state literals are in the SQL text; values are bound.
SELECT: Final = f"SELECT {_COLUMNS} FROM {RECORDS} WHERE account = $1"
UPSERT: Final = (
    f"INSERT INTO {RECORDS} (account, {_COLUMNS}) "
    f"VALUES ({', '.join(f'${n}' for n in range(1, len(FIELDS) + 2))}) "
    "ON CONFLICT (account, id) DO UPDATE SET "
    + ", ".join(f"{name} = excluded.{name}" for name in FIELDS[1:])
)
OLDEST_FIRST: Final = "ORDER BY created_at, COALESCE(seq, 0), pos"
NEWEST_FIRST: Final = "ORDER BY created_at DESC, COALESCE(seq, 0) DESC, pos DESC"
IS_IN_FLIGHT: Final = "state IN ('hibernated', 'resent', 'sent')"
IS_FAILED: Final = "state = 'failed'"
