"""Issue 17: a store's lifecycle cannot hang a process or leak quietly."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from xmpp_sm_tracker import SQLiteStore, StoreError
from xmpp_sm_tracker.testing import LocalXMPPServer
from xmpp_sm_tracker.testing.client import ClientPool

ROOT = Path(__file__).resolve().parent.parent


def test_a_process_that_never_closes_its_store_still_exits(tmp_path: Path) -> None:
    # aiosqlite's worker thread is not a daemon: before the exit guard, this script
    # (the README's restart snippet without `async with`) never exited.
    script = textwrap.dedent(
        f"""
        import asyncio
        from xmpp_sm_tracker import SQLiteStore
        kept = []
        async def main():
            store = SQLiteStore({str(tmp_path / "left-open.sqlite")!r})
            await store.save_sm_state(None)
            kept.append(store)
        asyncio.run(main())
        print("main done", flush=True)
        """
    )
    done = subprocess.run(
        [sys.executable, "-W", "default", "-c", script],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "main done"
    assert "left-open.sqlite was never closed" in done.stderr
    assert not (tmp_path / "left-open.sqlite.lock").exists()  # let go at exit


async def test_a_store_collected_open_warns(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "dropped.sqlite")
    await store.open()
    with pytest.warns(ResourceWarning, match="dropped.sqlite.*never closed"):
        del store
        gc.collect()
    await asyncio.sleep(0.05)  # aiosqlite stops its own worker thread meanwhile
    async with SQLiteStore(tmp_path / "dropped.sqlite") as again:  # its lock went with it
        await again.pending()


async def test_a_closed_store_does_not_warn_and_refuses_use(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "closed.sqlite") as store:
        await store.pending()
    assert store.closed
    with pytest.raises(StoreError, match="closed"):
        await store.pending()
    await store.aclose()  # again: harmless


async def test_the_plugin_closes_its_store_when_it_ends_after_writing_everything(
    server: LocalXMPPServer, clients: ClientPool, tmp_path: Path
) -> None:
    alice = await clients("alice", server.address, ack_delay=0.05)
    tracker = alice.tracker  # (xmpp.plugin[...] would load it again once disabled)
    store = SQLiteStore(tmp_path / "alice.sqlite")
    await tracker.attach(store)
    handle = await tracker.send_message("bob@localhost", "kept")
    await handle.settled(timeout=10)
    alice.xmpp.plugin.disable("sm_tracker")
    assert tracker.closing_store is not None
    await tracker.closing_store
    assert store.closed
    async with SQLiteStore(tmp_path / "alice.sqlite") as reopened:
        record = await reopened.get(handle.id)
    assert record is not None and record.state is handle.state
