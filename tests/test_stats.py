"""Issue 17: tracker.stats(), what a service watches."""

from __future__ import annotations

from xmpp_sm_tracker import TrackerStats
from xmpp_sm_tracker.core.acks import AckClock, AckPolicy
from xmpp_sm_tracker.stats import StatsCounters
from xmpp_sm_tracker.testing import FaultProxy, LocalXMPPServer
from xmpp_sm_tracker.testing.client import ClientPool, wait_for

FAST = {"reconnect_delay": 0.1, "reconnect_max_delay": 1.0, "ack_delay": 0.05}


def test_the_ack_clock_times_each_request_to_its_answer_in_order() -> None:
    clock = AckClock(AckPolicy(every=1))
    clock.request_sent(10.0)
    clock.request_sent(10.5)
    assert clock.ack_received(10.2) == 10.2 - 10.0
    assert clock.ack_received(11.0) == 11.0 - 10.5
    assert clock.ack_received(12.0) is None  # nobody asked: no round trip
    clock.request_sent(20.0)
    clock.reset()  # a new connection: the old request is never answered
    assert clock.ack_received(21.0) is None


def test_percentiles_over_the_latest_round_trips() -> None:
    counters = StatsCounters()
    assert counters.rtt_percentiles() == {}
    counters.rtts.extend(float(i) for i in range(1, 101))
    assert counters.rtt_percentiles() == {"p50": 50.0, "p90": 90.0, "p99": 99.0, "max": 100.0}
    counters.rtts.extend([1000.0] * 2000)  # only the latest RTT_WINDOW count
    assert counters.rtt_percentiles()["p50"] == 1000.0


async def test_stats_through_a_cut_and_a_resumption(
    server: LocalXMPPServer, proxy: FaultProxy, clients: ClientPool
) -> None:
    await clients("bob", server.address, tracked=False)
    alice = await clients("alice", (proxy.host, proxy.port), **FAST)
    fresh = alice.tracker.stats()
    assert isinstance(fresh, TrackerStats)
    assert (fresh.in_flight, fresh.reconnects, fresh.resumptions) == (0, 0, 0)
    assert fresh.oldest_in_flight_age is None
    proxy.stall()
    ids = [alice.send("bob@localhost", f"m{i}") for i in range(10)]
    await wait_for(lambda: alice.on_wire(ids))
    stalled = alice.tracker.stats()
    assert stalled.in_flight == 10
    assert stalled.oldest_in_flight_age is not None and stalled.oldest_in_flight_age >= 0
    proxy.cut()
    proxy.heal()
    await wait_for(lambda: alice.log.count("message:acked") == 10, timeout=15)
    after = alice.tracker.stats()
    assert after.in_flight == 0 and after.oldest_in_flight_age is None
    assert after.reached["sent"] == 10
    assert after.reached["hibernated"] == 10
    assert after.reached["resent"] == 10
    assert after.reached["acked"] == 10
    assert (after.reconnects, after.resumptions, after.resumptions_failed) == (1, 1, 0)
    assert set(after.ack_rtt) == {"p50", "p90", "p99", "max"}
    assert 0 < after.ack_rtt["p50"] <= after.ack_rtt["max"] < 15


async def test_a_refused_resumption_is_counted(
    fresh_server: LocalXMPPServer, clients: ClientPool
) -> None:
    async with FaultProxy(fresh_server.host, fresh_server.c2s_port) as proxy:
        alice = await clients("alice", (proxy.host, proxy.port), **FAST)
        await fresh_server.restart()
        proxy.cut()
        await wait_for(lambda: alice.tracker.stats().resumptions_failed == 1, timeout=20)
        await wait_for(lambda: alice.tracker.managed, timeout=10)
        stats = alice.tracker.stats()
        assert stats.resumptions == 0
        # (the proxy takes each connection while ejabberd restarts, then drops it)
        assert stats.reconnects >= 1
