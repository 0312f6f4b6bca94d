"""A local Prosody for the examples: ``./scripts/demo --serve`` (Ctrl-C stops it).

It listens on 127.0.0.1:15222 (``--port``) with the accounts alice, bob and carol
(password ``demo-pass``), a MUC service at conversation.localhost-like
``conference.localhost``, and a fault proxy on the next port so examples can be
run through a link you break with the proxy commands printed at start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import tempfile
from pathlib import Path

from xmpp_sm_tracker.testing import FaultProxy, ProsodyServer, ensure_prosody_installed

__all__ = ["ACCOUNTS", "DEFAULT_PORT", "PASSWORD", "main", "serve"]

DEFAULT_PORT = 15222
PASSWORD = "demo-pass"
ACCOUNTS = ("alice", "bob", "carol")


async def serve(port: int, base_dir: Path, ready: asyncio.Event | None = None) -> None:
    """Run Prosody (and a fault proxy on ``port + 1``) until cancelled."""
    ensure_prosody_installed()
    server = ProsodyServer(base_dir, c2s_port=port, hibernation_time=120)
    for user in ACCOUNTS:
        server.register(user, PASSWORD)
    async with server, FaultProxy(server.host, port, port=port + 1) as proxy:
        print(
            f"Prosody on {server.host}:{port}  (accounts {', '.join(ACCOUNTS)}, password "
            f"{PASSWORD!r}, rooms on {server.muc_domain})",
            flush=True,
        )
        print(f"fault proxy on {proxy.host}:{proxy.port} -> {port}; Ctrl-C stops both", flush=True)
        if ready is not None:
            ready.set()
        await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sm-tracker-serve-") as tmp:
        loop = asyncio.new_event_loop()
        task = loop.create_task(serve(args.port, Path(tmp)))
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(task)
        loop.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
