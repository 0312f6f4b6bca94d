"""``xmpp-sm-tracker`` / ``python -m xmpp_sm_tracker``: look into a tracker database.

    xmpp-sm-tracker inspect alice.sqlite [--json]
    xmpp-sm-tracker export alice.sqlite [--state failed] > records.jsonl
    xmpp-sm-tracker delete-failed alice.sqlite [--conversation bob@example.org] [--yes]

It never creates a database: a missing path is an error, and so is a file that is
not a tracker store, an empty one included (the file is left untouched). ``inspect``
and ``export`` open it read-only and change nothing on disk, so they also work on the
file of a tracker that is running; ``delete-failed`` writes, and is refused while a
tracker has the file open.
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
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from .core.records import TrackedMessage
from .core.states import DeliveryState
from .stores.base import StoreError
from .stores.sqlite import SQLiteStore

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


async def _open(path: Path, *, read_only: bool) -> SQLiteStore:
    if not path.exists():
        raise CliError(f"{path}: no such file (inspect never creates a database)")
    if not path.is_file():
        raise CliError(f"{path}: not a file")
    if path.stat().st_size == 0:
        # A store opened read-write would make an empty file a store: not our call here.
        raise CliError(f"{path}: empty file, not a tracker database (left untouched)")
    store = SQLiteStore(path, read_only=read_only)
    try:
        await store.open()
    except StoreError as exc:
        await store.aclose()
        raise CliError(str(exc)) from exc
    return store


async def _inspect(store: SQLiteStore, as_json: bool, out: TextIO) -> None:
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
                "file": str(store.path),
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
    out.write(f"{_shown(store.path)}: {total} messages\n\n")
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
    store = await _open(Path(args.db), read_only=args.command != "delete-failed")
    try:
        if args.command == "inspect":
            await _inspect(store, args.json, out)
        elif args.command == "export":
            await _export(store, args.state, out)
        else:
            await _delete_failed(store, args.conversation, args.yes, out, answer)
    finally:
        await store.aclose()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xmpp-sm-tracker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="counts, pending and failed messages")
    inspect.add_argument("db")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    export = commands.add_parser("export", help="every record as JSON lines")
    export.add_argument("db")
    export.add_argument("--state", choices=[s.value for s in DeliveryState])
    delete = commands.add_parser("delete-failed", help="delete failed messages")
    delete.add_argument("db")
    delete.add_argument("--conversation", help="only those to this bare JID")
    delete.add_argument("--yes", action="store_true", help="do not ask")
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
