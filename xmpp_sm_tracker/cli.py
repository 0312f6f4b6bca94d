"""``xmpp-sm-tracker`` / ``python -m xmpp_sm_tracker``: look into a tracker database.

    xmpp-sm-tracker inspect alice.sqlite [--json]
    xmpp-sm-tracker inspect fleet.sqlite --account alice@example.org
    xmpp-sm-tracker inspect postgresql://user:password@host/db [--account JID]
    xmpp-sm-tracker export alice.sqlite [--state failed] > records.jsonl
    xmpp-sm-tracker delete-failed alice.sqlite [--conversation bob@example.org] [--yes]

It never creates a database: a missing path is an error, and so is a file that is
not a tracker store, an empty one included (the file is left untouched). ``inspect``
and ``export`` open it read-only and change nothing on disk, so they also work on the
file of a tracker that is running; ``delete-failed`` writes, and is refused while a
tracker has the file open. A file or database holding several accounts (a fleet)
needs ``--account``; without it, the accounts are listed. ``inspect`` reads a
PostgreSQL database in a read-only transaction and never prints its password.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import re
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol, TextIO

from .core.records import TrackedMessage
from .core.states import DeliveryState
from .stores.base import StoreError
from .stores.sqlite import SQLiteDatabase, SQLiteStore

__all__ = ["main"]


class CliError(Exception):
    """A problem the user can fix; printed without a traceback, exit status 2."""


#: What can drive a terminal or forge a line when printed: C0 controls, DEL and C1
#: controls (ESC starts CSI and OSC sequences, 0x9b is a CSI by itself), line and
#: paragraph separators, bidi marks, overrides and isolates, and lone surrogates.
_UNSAFE = re.compile(
    r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]"
)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _shown(text: object) -> str:
    """Text from the file (ids, JIDs, reasons: anyone's words) made safe to print: the
    characters a terminal would obey are written as escapes, on the same line."""
    return _UNSAFE.sub(_escape, str(text))


def _record_json(record: TrackedMessage) -> dict[str, Any]:
    data = asdict(record)
    data["state"] = record.state.value
    return data


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


class _Inspected(Protocol):
    """What ``inspect`` reads: one account's counts, in-flight and failed records."""

    async def counts(self) -> list[tuple[str, str, int]]: ...

    async def pending(self) -> list[TrackedMessage]: ...

    async def failed(self) -> list[TrackedMessage]: ...


def _is_dsn(db: str) -> bool:
    return db.startswith(("postgresql://", "postgres://"))


def _accounts_line(accounts: Sequence[str]) -> str:
    if not accounts:
        return "it holds no accounts"
    named = ", ".join(_shown(a) if a else "'' (the file's own records)" for a in accounts)
    return f"it holds {len(accounts)} accounts: {named}; name one with --account"


def _pick(where: str, accounts: Sequence[str], wanted: str | None) -> str:
    """The account to read: the one asked for, or the only one there is."""
    if wanted is not None:
        if wanted not in accounts:
            raise CliError(
                f"{where}: no records or SM state for {_shown(wanted)}; " + _accounts_line(accounts)
            )
        return wanted
    if len(accounts) > 1:
        raise CliError(f"{where}: {_accounts_line(accounts)}")
    return accounts[0] if accounts else ""


async def _open(
    path: Path, account: str | None, stack: AsyncExitStack, *, read_only: bool
) -> SQLiteStore:
    """The store of ``account`` in the file (or of its only account), closed by ``stack``."""
    if not path.exists():
        raise CliError(f"{path}: no such file (inspect never creates a database)")
    if not path.is_file():
        raise CliError(f"{path}: not a file")
    if path.stat().st_size == 0:
        # A store opened read-write would make an empty file a store: not our call here.
        raise CliError(f"{path}: empty file, not a tracker database (left untouched)")
    database = SQLiteDatabase(path, read_only=read_only)
    stack.push_async_callback(database.aclose)
    try:
        await database.open()
        chosen = _pick(str(path), await database.accounts(), account)
        if chosen:
            store = database.store(chosen)
            await store.open()
            return store
        await database.aclose()  # the file's own account: opened as it always was
        single = SQLiteStore(path, read_only=read_only)
        stack.push_async_callback(single.aclose)
        await single.open()
        return single
    except (StoreError, ValueError) as exc:
        raise CliError(str(exc)) from exc


async def _open_postgres(
    dsn: str, account: str | None, stack: AsyncExitStack
) -> tuple[_Inspected, dict[str, str]]:
    """A read-only snapshot of ``account`` in the database (or of its only account), and
    where it is (the password left out)."""
    try:
        from .stores.postgres_inspect import PostgresInspector
    except ModuleNotFoundError as exc:
        raise CliError(
            f"reading PostgreSQL needs {exc.name}: pip install 'xmpp_sm_tracker[postgres]'"
        ) from None
    inspector = PostgresInspector(dsn)
    try:
        await stack.enter_async_context(inspector)
        accounts = await inspector.accounts()
        if not accounts:
            raise CliError(f"{inspector.server}: {_accounts_line(accounts)} (nothing to inspect)")
        inspector.account = _pick(inspector.server, accounts, account)
    except StoreError as exc:
        raise CliError(str(exc)) from None
    return inspector, {"database": inspector.server, "account": inspector.account}


async def _inspect(store: _Inspected, where: dict[str, str], as_json: bool, out: TextIO) -> None:
    """``where``: what was read (``file`` or ``database``) and the ``account``, if named."""
    counts = await store.counts()
    pending, failed = await store.pending(), await store.failed()
    by_state: dict[str, int] = defaultdict(int)
    by_conversation: dict[str, dict[str, int]] = defaultdict(dict)
    for conversation, state, n in counts:
        by_state[state] += n
        by_conversation[conversation][state] = n
    if as_json:
        json.dump(
            {
                **where,
                "states": dict(by_state),
                "conversations": by_conversation,
                "pending": [_record_json(r) for r in pending],
                "failed": [_record_json(r) for r in failed],
            },
            out,
            indent=2,
        )
        out.write("\n")
        return
    now = time.time()
    total = sum(by_state.values())
    title = " ".join(_shown(v) if k != "account" else f"({_shown(v)})" for k, v in where.items())
    out.write(f"{title}: {total} messages\n\n")
    for known in DeliveryState:
        if by_state.get(known.value):
            out.write(f"  {known.value:<14} {by_state[known.value]:>8}\n")
    out.write("\nby conversation:\n")
    for conversation, states in sorted(by_conversation.items()):
        summary = ", ".join(f"{n} {_shown(st)}" for st, n in sorted(states.items()))
        out.write(f"  {_shown(conversation):<40} {summary}\n")
    for title, records in (("pending", pending), ("failed", failed)):
        out.write(f"\n{title} ({len(records)}):\n")
        for r in records:
            reason = f"  {_shown(r.reason)}" if r.reason else ""
            out.write(
                f"  {_shown(r.id):<34} {_shown(r.to):<30} {_age(now - r.created_at):>5}"
                f"  attempts={r.attempts}{reason}\n"
            )


async def _export(store: SQLiteStore, state: str | None, out: TextIO) -> None:
    for record in await store.all_records():
        if state is None or record.state.value == state:
            # ASCII: U+2028 or U+0085 in a body would split the line for line readers,
            # and an ASCII stdout could not take the rest.
            out.write(json.dumps(_record_json(record), ensure_ascii=True) + "\n")


async def _delete_failed(
    store: SQLiteStore, conversation: str | None, yes: bool, out: TextIO, answer: TextIO
) -> None:
    doomed = await store.failed(conversation)
    if not doomed:
        out.write("no failed messages\n")
        return
    if not yes:
        where = f" to {_shown(conversation)}" if conversation else ""
        out.write(f"delete {len(doomed)} failed messages{where}? [y/N] ")
        out.flush()
        if answer.readline().strip().lower() not in ("y", "yes"):
            out.write("nothing deleted\n")
            return
    deleted = await store.delete_failed(conversation)
    out.write(f"deleted {deleted} failed messages\n")


async def _run(args: argparse.Namespace, out: TextIO, answer: TextIO) -> None:
    async with AsyncExitStack() as stack:
        if _is_dsn(args.db):
            if args.command != "inspect":
                raise CliError(f"{args.command} works on SQLite files; inspect reads PostgreSQL")
            inspector, where = await _open_postgres(args.db, args.account, stack)
            await _inspect(inspector, where, args.json, out)
            return
        read_only = args.command != "delete-failed"
        store = await _open(Path(args.db), args.account, stack, read_only=read_only)
        if args.command == "inspect":
            where = {"file": str(store.path)}
            if store.account:
                where["account"] = store.account
            await _inspect(store, where, args.json, out)
        elif args.command == "export":
            await _export(store, args.state, out)
        else:
            await _delete_failed(store, args.conversation, args.yes, out, answer)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xmpp-sm-tracker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="counts, pending and failed messages")
    inspect.add_argument("db", help="an SQLite file, or a postgresql:// DSN")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    export = commands.add_parser("export", help="every record as JSON lines")
    export.add_argument("db", help="an SQLite file")
    export.add_argument("--state", choices=[s.value for s in DeliveryState])
    delete = commands.add_parser("delete-failed", help="delete failed messages")
    delete.add_argument("db", help="an SQLite file")
    delete.add_argument("--conversation", help="only those to this bare JID")
    delete.add_argument("--yes", action="store_true", help="do not ask")
    for command in (inspect, export, delete):
        command.add_argument(
            "--account", help="the account (bare JID) to read, where there are several"
        )
    return parser


def main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, answer: TextIO | None = None
) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    if out is None:
        out = sys.stdout
        if isinstance(out, io.TextIOWrapper):  # an ASCII terminal or pipe: escape, not crash
            out.reconfigure(errors="backslashreplace")
    try:
        asyncio.run(_run(args, out, answer or sys.stdin))
    except CliError as exc:
        print(f"xmpp-sm-tracker: {exc}", file=sys.stderr)
        return 2
    return 0
