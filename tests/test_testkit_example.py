"""The example from docs/testing.md: how a user tests their own app with the test kit."""

import pytest

from xmpp_sm_tracker.testing.client import Received, wait_for

pytestmark = pytest.mark.asyncio


async def test_my_bot_survives_a_cut_link(xmpp_client, flaky_link):
    bob = await xmpp_client("bob", tracked=False)
    inbox = Received()
    inbox.attach(bob)
    alice = await xmpp_client("alice", via=flaky_link, ack_delay=0.05, reconnect_delay=0.1)
    acked = []
    alice.add_event_handler("message:acked", lambda m: acked.append(m.body))

    alice.send_message(mto="bob@localhost", mbody="before the cut")
    flaky_link.cut()  # the link dies; the tracker reconnects and resumes
    alice.send_message(mto="bob@localhost", mbody="after the cut")

    await wait_for(lambda: len(acked) == 2, timeout=15)
    await wait_for(lambda: len(inbox.bodies) == 2)
    assert sorted(inbox.bodies) == ["after the cut", "before the cut"]
