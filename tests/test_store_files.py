"""Issue 20, "Files": the SQLite store trusts only a file that is its own.

A loose file is made private, a symlink or another user's file is refused, and one
file has one tracker: a second opener (in this process or another) is refused.
"""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from xmpp_sm_tracker import SQLiteStore, StoreError

from .test_store_contract import record
from .test_store_sqlite import make_db, raw

ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def companion(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


# ------------------------------------------------------------------ private


async def test_a_loose_database_file_is_tightened_on_open(tmp_path: Path) -> None:
    path = tmp_path / "restored.sqlite"
    await make_db(path)
    path.chmod(0o644)  # as `cp` from a backup leaves it
    async with SQLiteStore(path) as store:
        assert mode(path) == 0o600
        await store.upsert([record(9)])
        for suffix in ("-wal", "-shm"):
            assert mode(companion(path, suffix)) == 0o600, suffix
    assert mode(path) == 0o600


@pytest.mark.parametrize("suffix", ["-wal", "-shm", "-journal"])
async def test_loose_companion_files_are_tightened_before_sqlite_opens_them(
    tmp_path: Path, suffix: str
) -> None:
    path = tmp_path / "loose.sqlite"
    await make_db(path)
    # Left by another process (a -journal in rollback mode): SQLite would use them as
    # they are; an empty -wal or -shm is fine for it, an empty -journal is not hot.
    companion(path, suffix).touch(0o644)
    companion(path, suffix).chmod(0o644)
    async with SQLiteStore(path) as store:
        await store.pending()
        if companion(path, suffix).exists():
            assert mode(companion(path, suffix)) == 0o600


# ------------------------------------------------------------------ ours only


async def test_a_symlink_at_the_path_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.sqlite"
    await make_db(target)
    before = target.read_bytes()
    link = tmp_path / "link.sqlite"
    link.symlink_to(target)
    store = SQLiteStore(link)
    with pytest.raises(StoreError, match=r"link\.sqlite: is a symbolic link"):
        await store.upsert([record(9)])
    await store.aclose()
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere.sqlite", "link.sqlite"]


async def test_a_dangling_symlink_is_refused_and_nothing_is_created(tmp_path: Path) -> None:
    link = tmp_path / "dangling.sqlite"
    link.symlink_to(tmp_path / "planted.sqlite")
    store = SQLiteStore(link)
    with pytest.raises(StoreError, match=r"dangling\.sqlite: is a symbolic link"):
        await store.open()
    await store.aclose()
    assert not (tmp_path / "planted.sqlite").exists()


@pytest.mark.parametrize("suffix", ["-wal", "-shm", ".lock"])
async def test_a_symlinked_companion_is_refused(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / "a.sqlite"
    await make_db(path)
    decoy = tmp_path / "decoy"
    decoy.write_bytes(b"")
    companion(path, suffix).symlink_to(decoy)
    store = SQLiteStore(path)
    with pytest.raises(StoreError, match=rf"a\.sqlite.*a\.sqlite{suffix}.*symbolic link"):
        await store.open()
    await store.aclose()
    assert decoy.read_bytes() == b""


@contextmanager
def owned_by_someone_else(path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """As root, really give the file away; otherwise pretend to be another user."""
    if os.geteuid() == 0:
        os.chown(path, NOBODY, NOBODY)
        yield
        return
    them = path.stat().st_uid + 1
    monkeypatch.setattr(os, "geteuid", lambda: them)
    yield


@pytest.mark.parametrize("which", ["", "-wal", ".lock"])
async def test_a_file_of_another_user_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    path = tmp_path / "theirs.sqlite"
    await make_db(path)
    target = companion(path, which)
    target.touch(0o600)
    target.chmod(0o666)  # and writable by everyone: used silently before
    before = path.read_bytes()
    with owned_by_someone_else(target, monkeypatch):
        store = SQLiteStore(path)
        with pytest.raises(StoreError, match=r"theirs\.sqlite.*not owned by you") as caught:
            await store.open()
        await store.aclose()
    assert target.name in str(caught.value)
    assert path.read_bytes() == before
    assert mode(target) == 0o666  # not ours to change either


# ------------------------------------------------------------------ one tracker per file


async def test_a_second_store_on_one_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite"
    async with SQLiteStore(path) as first:
        await first.upsert([record(1)])
        second = SQLiteStore(path)
        with pytest.raises(StoreError, match=r"shared\.sqlite.*another tracker"):
            await second.pending()
        await second.aclose()
        assert [r.id for r in await first.pending()] == ["m1"]  # the first goes on
    async with SQLiteStore(path) as third:  # closed: the lock went with it
        assert [r.id for r in await third.pending()] == ["m1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.sqlite"]


async def test_a_refused_open_holds_no_lock(tmp_path: Path) -> None:
    path = tmp_path / "garbage.sqlite"
    path.write_bytes(b"not a database" * 100)
    store = SQLiteStore(path)
    for _ in range(2):  # refused for what it is, not for a lock it kept
        with pytest.raises(StoreError, match="not an SQLite database"):
            await store.open()
    await store.aclose()
    assert not companion(path, ".lock").exists()


async def test_a_stale_lock_file_from_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "stale.sqlite"
    await make_db(path)
    companion(path, ".lock").touch(0o600)
    async with SQLiteStore(path) as store:
        assert len(await store.all_records()) == 3


HOLDER = textwrap.dedent(
    """
    import asyncio, sys
    from xmpp_sm_tracker import SQLiteStore

    async def main(path: str) -> None:
        async with SQLiteStore(path) as store:
            await store.pending()
            print("OPEN", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    asyncio.run(main(sys.argv[1]))
    """
)


def start_holder(path: Path) -> subprocess.Popen[str]:
    """Another process that opens the store, prints OPEN, and closes it at EOF."""
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


async def test_a_store_held_by_another_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "busy.sqlite"
    await make_db(path)
    with start_holder(path) as holder:
        assert holder.stdin is not None and holder.stdout is not None
        try:
            assert holder.stdout.readline() == "OPEN\n"
            store = SQLiteStore(path)
            with pytest.raises(StoreError, match=r"busy\.sqlite.*another tracker") as caught:
                await store.open()
            await store.aclose()
            assert "holds it" in str(caught.value)
        finally:
            holder.stdin.close()  # EOF: the holder closes its store and exits
            holder.wait(timeout=20)
    assert holder.returncode == 0
    async with SQLiteStore(path) as store:
        assert len(await store.all_records()) == 3


async def test_a_killed_holder_leaves_the_file_free(tmp_path: Path) -> None:
    path = tmp_path / "killed.sqlite"
    await make_db(path)
    with start_holder(path) as holder:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "OPEN\n"
        holder.kill()
        holder.wait(timeout=20)
    async with SQLiteStore(path) as store:
        assert len(await store.all_records()) == 3
    assert raw(path, "PRAGMA integrity_check") == [("ok",)]


async def test_concurrent_opens_in_one_process_let_exactly_one_in(tmp_path: Path) -> None:
    path = tmp_path / "race.sqlite"
    stores = [SQLiteStore(path) for _ in range(5)]
    results = await asyncio.gather(*(s.open() for s in stores), return_exceptions=True)
    try:
        assert sum(r is None for r in results) == 1, results
        assert all(
            isinstance(r, StoreError) and "another tracker" in str(r)
            for r in results
            if r is not None
        )
    finally:
        for s in stores:
            await s.aclose()


# ------------------------------------------------------------------ read-only


@pytest.mark.parametrize("kind", ["missing", "empty", "symlink"])
async def test_a_read_only_store_creates_nothing(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "ro.sqlite"
    if kind == "empty":
        path.touch()
    elif kind == "symlink":
        await make_db(tmp_path / "real.sqlite")
        path.symlink_to(tmp_path / "real.sqlite")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    store = SQLiteStore(path, read_only=True)
    message = {"missing": "does not exist", "empty": "is empty", "symlink": "symbolic link"}
    with pytest.raises(StoreError, match=rf"ro\.sqlite.*{message[kind]}"):
        await store.pending()
    await store.aclose()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
