"""The smallest integration: one tracked message, and what became of it.

Start a local server in another terminal with ``./scripts/demo --serve``, then run
``.venv/bin/python examples/minimal.py``.
"""

import asyncio
import sys

import slixmpp

import xmpp_sm_tracker  # noqa: F401  (registers the "sm_tracker" plugin)
from xmpp_sm_tracker import TrackedMessage


async def main(port: int) -> None:
    xmpp = slixmpp.ClientXMPP("alice@localhost/minimal", "demo-pass")
    xmpp.enable_starttls = xmpp.enable_direct_tls = False  # the local server is plain text
    xmpp.enable_plaintext = True
    xmpp.register_plugin("xep_0198")
    xmpp.register_plugin("sm_tracker")
    xmpp.plugin["feature_mechanisms"].unencrypted_plain = True

    settled = asyncio.Event()

    def acked(record: TrackedMessage) -> None:
        print("✓ server has it")
        settled.set()

    def failed(record: TrackedMessage) -> None:
        print("✗", record.reason)
        settled.set()

    xmpp.add_event_handler("message:sent", lambda m: print("→ sent", repr(m.body)))
    xmpp.add_event_handler("message:acked", acked)
    xmpp.add_event_handler("message:failed", failed)
    xmpp.add_event_handler(
        "session_start",
        lambda _: xmpp.send_message(mto=slixmpp.JID("bob@localhost"), mbody="hello bob"),
    )
    xmpp.connect("127.0.0.1", port)
    await asyncio.wait_for(settled.wait(), 20)
    await xmpp.disconnect()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 15222))
