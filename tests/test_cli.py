"""The command line a user (or a script) runs against a tracker database."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from xmpp_sm_tracker import DeliveryState, SQLiteDatabase, SQLiteStore, StoreError
from xmpp_sm_tracker.cli import main
from xmpp_sm_tracker.stores.postgres import PostgresStore

from .helpers.pgdb import fresh_database
from .test_store_contract import record

S = DeliveryState
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def db(tmp_path: Path) -> Path:
    path = tmp_path / "alice.sqlite"
    async with SQLiteStore(path) as store:
        await store.upsert(
            [
                record(1, S.ACKED),
                record(2, S.FAILED, reason="resume-failed"),
                record(3, S.FAILED, to="carol@example.org", reason="cancel:item-not-found"),
                record(4, S.HIBERNATED),
            ]
        )
    return path


def run(*argv: str, answer: str = "") -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out, answer=io.StringIO(answer))
    return code, out.getvalue()


def test_inspect_shows_counts_pending_and_failed(db: Path) -> None:
    code, out = run("inspect", str(db))
    assert code == 0
    assert "4 messages" in out
    assert "failed" in out and "hibernated" in out
    assert "bob@example.org" in out and "carol@example.org" in out
    assert "m4" in out.split("pending (1):")[1].split("failed")[0]
    assert "cancel:item-not-found" in out


def test_inspect_json_is_for_scripts(db: Path) -> None:
    code, out = run("inspect", str(db), "--json")
    data = json.loads(out)
    assert code == 0
    assert data["states"] == {"acked": 1, "failed": 2, "hibernated": 1}
    assert data["conversations"]["carol@example.org"] == {"failed": 1}
    assert [r["id"] for r in data["failed"]] == ["m2", "m3"]
    assert [r["id"] for r in data["pending"]] == ["m4"]


def test_export_writes_json_lines(db: Path) -> None:
    code, out = run("export", str(db), "--state", "failed")
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0
    assert [r["id"] for r in lines] == ["m2", "m3"]
    assert lines[0]["state"] == "failed" and lines[0]["body"].startswith("body 2")


def test_delete_failed_asks_first(db: Path) -> None:
    code, out = run("delete-failed", str(db), answer="n\n")
    assert code == 0 and "nothing deleted" in out
    code, out = run("delete-failed", str(db), "--conversation", "carol@example.org", answer="y\n")
    assert code == 0 and "deleted 1 failed messages" in out
    code, out = run("delete-failed", str(db), "--yes")
    assert "deleted 1 failed messages" in out
    states = json.loads(run("inspect", str(db), "--json")[1])["states"]
    assert states == {"acked": 1, "hibernated": 1}


def test_missing_file_is_a_clear_error_and_is_not_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.sqlite"
    assert run("inspect", str(missing))[0] == 2
    assert "no such file" in capsys.readouterr().err
    assert not missing.exists()


def test_foreign_database_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "other.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE invoices (n INTEGER)")
    before = path.read_bytes()
    assert run("inspect", str(path))[0] == 2
    assert "other.sqlite" in capsys.readouterr().err
    assert path.read_bytes() == before


def test_python_dash_m_and_console_script_work(db: Path) -> None:
    by_module = subprocess.run(
        [sys.executable, "-m", "xmpp_sm_tracker", "inspect", str(db), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(by_module.stdout)["states"]["failed"] == 2
    script = Path(sys.executable).with_name("xmpp-sm-tracker")
    # This checkout's package, even when the venv's editable install points at another.
    here = {**os.environ, "PYTHONPATH": str(ROOT)}
    by_script = subprocess.run(
        [str(script), "export", str(db)], capture_output=True, text=True, check=True, env=here
    )
    assert len(by_script.stdout.splitlines()) == 4


# ------------------------------------------------------------------ read-only (issue 20)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file in ``folder`` with its bytes: what "changes nothing" compares."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("command", ["inspect", "export"])
def test_reading_commands_change_nothing(db: Path, command: str) -> None:
    before = snapshot(db.parent)
    assert sorted(before) == ["alice.sqlite"]  # closed cleanly: no -wal, -shm or lock
    code, out = run(command, str(db))
    assert code == 0 and "m4" in out
    assert snapshot(db.parent) == before


@pytest.mark.parametrize("command", ["inspect", "export", "delete-failed"])
def test_a_zero_byte_file_is_a_clear_error_and_stays_empty(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    path = tmp_path / "empty.sqlite"
    path.touch()
    assert run(command, str(path), answer="y\n")[0] == 2
    assert "empty.sqlite" in capsys.readouterr().err
    assert snapshot(tmp_path) == {"empty.sqlite": b""}


def test_inspect_leaves_a_rollback_journal_database_in_its_mode(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA journal_mode=DELETE")
    before = snapshot(db.parent)
    assert run("inspect", str(db))[0] == 0
    assert snapshot(db.parent) == before
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)


async def test_inspect_reads_the_file_of_a_running_tracker(db: Path) -> None:
    async with SQLiteStore(db) as running:  # holds the lock, its commits in the WAL
        await running.upsert([record(5, S.FAILED, reason="late")])
        code, out = await asyncio.to_thread(run, "inspect", str(db), "--json")
        assert code == 0
        assert [r["id"] for r in json.loads(out)["failed"]] == ["m2", "m3", "m5"]
        await running.upsert([record(6)])  # and it is not disturbed


async def test_delete_failed_is_refused_while_a_tracker_runs(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with SQLiteStore(db) as running:
        code, _ = await asyncio.to_thread(run, "delete-failed", str(db), "--yes")
        assert code == 2
        assert "another tracker" in capsys.readouterr().err
        assert len(await running.failed()) == 2


async def test_a_read_only_store_refuses_every_write(db: Path) -> None:
    before = snapshot(db.parent)
    async with SQLiteStore(db, read_only=True) as store:
        assert len(await store.all_records()) == 4
        for write in (
            store.upsert([record(9)]),
            store.delete("m1"),
            store.delete_failed(),
            store.save_sm_state(None),
        ):
            with pytest.raises(StoreError, match=r"alice\.sqlite.*read-only"):
                await write
    assert snapshot(db.parent) == before


# ------------------------------------------------------------------ hostile text (issue 20)

#: An OSC title change, a screen clear, a C1 CSI, a bell, DEL, a fake line and a
#: bidi override: what a resource, an id or a bounce text may carry.
NASTY = "\x1b]0;pwned\x07\x1b[2J\x9b31m\x7f\r\nFAKE LINE\u202e\u2028end"


def terminal_controls(text: str) -> list[str]:
    """Characters that can drive a terminal: C0 (but newline), DEL, C1."""
    return [c for c in text if (ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) <= 0x9F]


@pytest.fixture
async def nasty_db(tmp_path: Path) -> Path:
    path = tmp_path / "nasty.sqlite"
    async with SQLiteStore(path) as store:
        await store.upsert(
            [
                record(1, S.SENT, to=f"bob@example.org/{NASTY}", body=NASTY),
                record(2, S.FAILED, reason=f"cancel:{NASTY}", id=f"id{NASTY}"),
                record(3, S.FAILED, body="a\u2028b\u0085c\nd é ✓ \U0001f600"),
            ]
        )
    return path


def test_inspect_escapes_terminal_controls(nasty_db: Path) -> None:
    code, out = run("inspect", str(nasty_db))
    assert code == 0
    assert terminal_controls(out) == []
    assert "FAKE LINE" not in out.splitlines()[-1]  # no line of its own
    assert not any(line.startswith("FAKE LINE") for line in out.splitlines())
    assert "\u202e" not in out and "\u2028" not in out
    assert "\\x1b]0;pwned" in out and "\\x9b" in out  # visible, not obeyed
    assert "bob@example.org" in out and "cancel:" in out


def test_export_lines_survive_line_readers_and_are_ascii(nasty_db: Path) -> None:
    code, out = run("export", str(nasty_db))
    assert code == 0
    assert out.isascii()
    lines = out.splitlines()  # splits on U+2028 and U+0085 too
    assert len(lines) == 3
    records = [json.loads(line) for line in lines]
    assert records[0]["body"] == NASTY  # escaped, not lost
    assert records[2]["body"] == "a\u2028b\u0085c\nd é ✓ \U0001f600"


@pytest.mark.parametrize("command", ["inspect", "export"])
def test_an_ascii_stdout_does_not_crash_the_cli(nasty_db: Path, command: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "xmpp_sm_tracker", command, str(nasty_db)],
        capture_output=True,
        env={**__import__("os").environ, "PYTHONIOENCODING": "ascii"},
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert done.stdout.isascii() and terminal_controls(done.stdout.decode()) == []


def test_inspect_json_is_ascii_too(nasty_db: Path) -> None:
    code, out = run("inspect", str(nasty_db), "--json")
    assert code == 0 and out.isascii()
    assert json.loads(out)["pending"][0]["to"] == f"bob@example.org/{NASTY}"


# ------------------------------------------------------------------ fleets (issue 18)

ALICE, ALICE2 = "alice@example.org", "alice@example.net"


@pytest.fixture
async def fleet(tmp_path: Path) -> Path:
    """One file, two accounts, the same ids in both."""
    path = tmp_path / "fleet.sqlite"
    async with SQLiteDatabase(path) as database:
        await database.store(ALICE).upsert([record(1, S.FAILED), record(2, S.HIBERNATED)])
        await database.store(ALICE2).upsert([record(1, S.ACKED)])
    return path


def test_a_fleet_file_needs_an_account_and_lists_them(
    fleet: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for command in ("inspect", "export", "delete-failed"):
        assert run(command, str(fleet), answer="y\n")[0] == 2
        err = capsys.readouterr().err
        assert f"2 accounts: {ALICE2}, {ALICE}; name one with --account" in err, err


def test_a_fleet_file_is_read_per_account(fleet: Path) -> None:
    before = snapshot(fleet.parent)
    code, out = run("inspect", str(fleet), "--account", ALICE, "--json")
    data = json.loads(out)
    assert code == 0
    assert data["account"] == ALICE and data["file"] == str(fleet)
    assert data["states"] == {"failed": 1, "hibernated": 1}
    code, out = run("inspect", str(fleet), "--account", ALICE2)
    assert code == 0 and f"({ALICE2}): 1 messages" in out and "acked" in out
    code, out = run("export", str(fleet), "--account", ALICE2)
    assert [json.loads(line)["state"] for line in out.splitlines()] == ["acked"]
    assert snapshot(fleet.parent) == before  # read-only
    code, out = run("delete-failed", str(fleet), "--account", ALICE, "--yes")
    assert code == 0 and "deleted 1 failed messages" in out
    states = json.loads(run("inspect", str(fleet), "--account", ALICE, "--json")[1])["states"]
    assert states == {"hibernated": 1}


def test_an_unknown_account_is_a_clear_error(
    fleet: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("inspect", str(fleet), "--account", "nobody@example.org")[0] == 2
    err = capsys.readouterr().err
    assert "no records or SM state for nobody@example.org" in err and ALICE in err


async def test_a_fleet_file_with_one_account_needs_no_account(tmp_path: Path) -> None:
    path = tmp_path / "one.sqlite"
    async with SQLiteDatabase(path) as database:
        await database.store(ALICE).upsert([record(1, S.FAILED)])
    code, out = await asyncio.to_thread(run, "inspect", str(path), "--json")
    assert code == 0 and json.loads(out)["account"] == ALICE


# ------------------------------------------------------------------ PostgreSQL (issue 18)


@pytest.fixture
async def pg_fleet(postgres_dsn: str) -> AsyncIterator[str]:
    """A fresh database with two accounts' records, dropped afterwards."""
    async with fresh_database(postgres_dsn) as dsn:
        async with (
            PostgresStore(dsn, account=ALICE) as one,
            PostgresStore(dsn, account=ALICE2) as two,
        ):
            await one.upsert([record(1, S.FAILED, reason="resume-failed"), record(2)])
            await one.save_sm_state({"version": 1})
            await two.upsert([record(1, S.ACKED)])
        yield dsn


async def pg_tables(dsn: str) -> list[tuple[str, int]]:
    """Every table with its row count: what "changes nothing" compares."""
    conn = await asyncpg.connect(dsn)
    try:
        names = [
            str(row[0])
            for row in await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
            )
        ]
        return [(n, int(await conn.fetchval(f'SELECT COUNT(*) FROM "{n}"'))) for n in names]
    finally:
        await conn.close()


async def test_inspect_reads_a_postgresql_database_per_account(
    pg_fleet: str, capsys: pytest.CaptureFixture[str]
) -> None:
    password = urlsplit(pg_fleet).password
    assert password
    before = await pg_tables(pg_fleet)
    code, out = await asyncio.to_thread(run, "inspect", pg_fleet)
    assert code == 2
    err = capsys.readouterr().err
    assert f"2 accounts: {ALICE2}, {ALICE}; name one with --account" in err
    code, out = await asyncio.to_thread(run, "inspect", pg_fleet, "--account", ALICE, "--json")
    assert code == 0
    data = json.loads(out)
    assert data["account"] == ALICE and data["database"].endswith(urlsplit(pg_fleet).path)
    assert data["states"] == {"failed": 1, "sent": 1}
    assert [r["id"] for r in data["pending"]] == ["m2"]
    assert [r["reason"] for r in data["failed"]] == ["resume-failed"]
    code, out = await asyncio.to_thread(run, "inspect", pg_fleet, "--account", ALICE2)
    assert code == 0 and f"({ALICE2}): 1 messages" in out and "acked" in out
    code, _ = await asyncio.to_thread(run, "inspect", pg_fleet, "--account", "x@example.org")
    assert code == 2 and "no records or SM state for x@example.org" in capsys.readouterr().err
    assert password not in out and password not in capsys.readouterr().err
    assert await pg_tables(pg_fleet) == before


async def test_inspect_of_a_database_without_our_schema_creates_nothing(
    postgres_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async with fresh_database(postgres_dsn) as dsn:
        code, out = await asyncio.to_thread(run, "inspect", dsn, "--account", ALICE)
        assert code == 2 and out == ""
        err = capsys.readouterr().err
        assert "holds no tracker schema" in err
        assert str(urlsplit(dsn).password) not in err
        assert await pg_tables(dsn) == []  # read-only: no schema made


async def test_a_bad_password_is_an_error_that_does_not_show_it(
    postgres_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    parts = urlsplit(postgres_dsn)
    wrong = "wrong-s3cret-pw"
    dsn = urlunsplit(
        parts._replace(netloc=f"{parts.username}:{wrong}@{parts.hostname}:{parts.port}")
    )
    code, out = await asyncio.to_thread(run, "inspect", dsn)
    assert code == 2
    err = capsys.readouterr().err
    assert "cannot connect" in err and f"{parts.hostname}:{parts.port}" in err
    assert wrong not in err and wrong not in out


def test_only_inspect_takes_a_dsn(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("export", "delete-failed"):
        assert run(command, "postgresql://u:pw@127.0.0.1:1/db", answer="y\n")[0] == 2
        err = capsys.readouterr().err
        assert "inspect reads PostgreSQL" in err and "pw@" not in err
