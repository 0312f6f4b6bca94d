"""An echo bot that survives restarts, kill -9 included, with SQLiteStore.

Start a local server with ``./scripts/demo --serve``, then:

    .venv/bin/python examples/restart_bot.py            # Ctrl-C or kill -9 it, start again

Every reply is stored before it leaves (``tracker.send_message``). After a restart
the bot resumes its old stream when the server still has it (nothing resent twice,
nothing lost); otherwise what was in flight is failed, and the bot resends it.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import slixmpp

from xmpp_sm_tracker import SMStateError, SQLiteStore, tracker_of


async def run(db: str, port: int, password: str, run_for: float | None) -> None:
    xmpp = slixmpp.ClientXMPP("carol@localhost/bot", password)
    xmpp.enable_starttls = xmpp.enable_direct_tls = False
    xmpp.enable_plaintext = True
    xmpp.register_plugin("xep_0198")
    xmpp.register_plugin("sm_tracker", module="xmpp_sm_tracker")
    xmpp.plugin["feature_mechanisms"].unencrypted_plain = True
    tracker = tracker_of(xmpp)  # typed (xmpp.plugin[...] knows slixmpp's plugins only)

    async with SQLiteStore(db) as store:  # closed however the run ends
        await tracker.attach(store)  # adopts what a previous run left in flight
        try:
            tracker.sm.load(await store.load_sm_state())
        except SMStateError as exc:
            print("starting a fresh session:", exc)
        tracker.sm.cache(store.save_sm_state)

        async def on_message(message: Any) -> None:
            if message["type"] in ("chat", "normal") and message["body"]:
                await tracker.send_message(str(message["from"]), f"echo: {message['body']}")

        async def on_start(_: Any) -> None:
            xmpp.send_presence()
            failed = await tracker.resend_failed()
            print(f"online; {len(failed)} failed replies sent again", flush=True)

        xmpp.add_event_handler("message", on_message)
        xmpp.add_event_handler("session_start", on_start)
        xmpp.add_event_handler(
            "session_resumed", lambda _: print("resumed the old stream", flush=True)
        )
        xmpp.add_event_handler("message:acked", lambda m: print("✓", m.body, flush=True))
        xmpp.add_event_handler("message:failed", lambda m: print("✗", m.body, m.reason, flush=True))
        xmpp.connect("127.0.0.1", port)
        try:
            await asyncio.sleep(run_for if run_for is not None else float("inf"))
        finally:
            await xmpp.disconnect()
            await tracker.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--db", default="carol-bot.sqlite")
    parser.add_argument("--port", type=int, default=15222)
    parser.add_argument("--password", default="demo-pass")
    parser.add_argument("--run-for", type=float, default=None, help="stop after N seconds")
    args = parser.parse_args()
    asyncio.run(run(args.db, args.port, args.password, args.run_for))


if __name__ == "__main__":
    main()
