"""A standby process for alice's account: waits for the owner's lease, then takes over.

``python -m tests.helpers.standby HOST PORT COUNT`` with the PostgreSQL DSN in
``$CHILD_STORE_DSN``. It prints WAITING, takes the account over as soon as the owner's
lease is given back or lapses (``PostgresStore.take_over``), prints OWNED, loads the
dead owner's SM state and records, connects (resuming its stream), and once all COUNT
messages are acked or failed prints SETTLED and a JSON line of how they ended.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter

from tests.helpers.child_sender import open_store
from xmpp_sm_tracker.stores.postgres import PostgresStore
from xmpp_sm_tracker.testing.client import make_client, tracker_of, wait_for


async def main(host: str, port: int, count: int) -> None:
    store = open_store("-")
    assert isinstance(store, PostgresStore)
    print("WAITING", flush=True)
    await store.take_over(poll=0.05)
    print("OWNED", flush=True)
    xmpp = make_client("alice@localhost/standby", "pass", tracker_config={"ack_delay": 0.05})
    tracker = tracker_of(xmpp)
    resent: list[str] = []
    ended: dict[str, str] = {}
    xmpp.add_event_handler("message:resent", lambda m: resent.append(m.id))
    for event in ("message:acked", "message:failed"):
        xmpp.add_event_handler(event, lambda m: ended.__setitem__(m.id, m.state.value))
    await tracker.attach(store)
    tracker.sm.load(await store.load_sm_state())
    tracker.sm.cache(store.save_sm_state)
    xmpp.connect(host, port)

    async def report() -> None:  # for a test that fails: where the standby stands
        while True:
            await asyncio.sleep(5)
            print(
                f"standby: {len(ended)} of {count} settled, link {tracker.link_phase.name}, "
                f"sm {tracker.sm_phase.name}, resent {len(resent)}",
                file=sys.stderr,
                flush=True,
            )

    reporter = asyncio.ensure_future(report())
    await wait_for(lambda: len(ended) >= count, timeout=60)
    reporter.cancel()
    await tracker.flush()
    print("SETTLED", flush=True)
    states = Counter(ended.values())
    print(json.dumps({"states": states, "resent": len(resent), "jid": str(xmpp.boundjid)}))
    sys.stdout.flush()
    xmpp.disconnect(wait=1.0)
    await asyncio.sleep(0.5)
    await store.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
