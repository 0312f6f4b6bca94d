"""A console chat client that shows delivery ticks live.

Start a local server with ``./scripts/demo --serve``, then in two terminals:

    .venv/bin/python examples/console_chat.py alice bob
    .venv/bin/python examples/console_chat.py bob alice

Type a line to send it. Ticks: ``…`` sent, ``zz`` waiting for the link, ``↻`` resent,
``✓`` server has it, ``✓✓`` delivered to the peer, ``✗`` failed. Commands: ``/failed``
lists failed messages, ``/resend`` sends them again, ``/quit``. Send through the
server's fault proxy (``--port 15223``) to watch what a broken link does.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import slixmpp

import xmpp_sm_tracker  # noqa: F401  (registers the "sm_tracker" plugin)
from xmpp_sm_tracker import tracker_of

TICKS = {
    "sent": "…",
    "hibernated": "zz",
    "resent": "↻",
    "acked": "✓",
    "delivered": "✓✓",
    "displayed": "✓✓ seen",
    "failed": "✗",
}


def make_client(user: str, password: str) -> slixmpp.ClientXMPP:
    xmpp = slixmpp.ClientXMPP(f"{user}@localhost/console", password)
    xmpp.enable_starttls = xmpp.enable_direct_tls = False
    xmpp.enable_plaintext = True
    xmpp.register_plugin("xep_0198")
    xmpp.register_plugin("xep_0184")  # answer receipts, so peers see ✓✓
    xmpp.register_plugin("sm_tracker", pconfig={"request_receipts": True})
    xmpp.plugin["feature_mechanisms"].unencrypted_plain = True
    return xmpp


async def chat(user: str, peer: str, port: int, password: str) -> None:
    xmpp = make_client(user, password)
    tracker = tracker_of(xmpp)  # typed (xmpp.plugin[...] knows slixmpp's plugins only)
    started = asyncio.Event()

    def on_start(_: Any) -> None:
        xmpp.send_presence()
        started.set()

    def show(record: Any) -> None:
        reason = f" ({record.reason})" if record.reason else ""
        print(f"  {TICKS[record.state.value]:>7}  {record.body}{reason}", flush=True)

    for state in TICKS:
        xmpp.add_event_handler(f"message:{state}", show)
    xmpp.add_event_handler("session_start", on_start)
    xmpp.add_event_handler(
        "message",
        lambda m: (
            print(f"{m['from'].user}: {m['body']}", flush=True)
            if m["body"] and m["type"] in ("chat", "normal")
            else None
        ),
    )
    xmpp.connect("127.0.0.1", port)
    await asyncio.wait_for(started.wait(), 20)
    print(f"connected as {user}; talking to {peer}", flush=True)

    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        text = line.strip()
        if not line or text == "/quit":
            break
        if text == "/failed":
            for record in await tracker.failed():
                print(f"  ✗ {record.id}  {record.body}  ({record.reason})", flush=True)
        elif text == "/resend":
            await tracker.resend_failed()
        elif text:
            xmpp.send_message(mto=slixmpp.JID(f"{peer}@localhost"), mbody=text, mtype="chat")
    await asyncio.sleep(0.5)  # let the last ticks arrive
    await xmpp.disconnect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("user")
    parser.add_argument("peer")
    parser.add_argument("--port", type=int, default=15222)
    parser.add_argument("--password", default="demo-pass")
    args = parser.parse_args()
    asyncio.run(chat(args.user, args.peer, args.port, args.password))


if __name__ == "__main__":
    main()
