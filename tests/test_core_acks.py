"""AckClock: ask after N stanzas or T seconds, declare the link dead after a silent <r/>."""

from __future__ import annotations

import math

import pytest

from xmpp_sm_tracker.core.acks import AckClock, AckPolicy
from xmpp_sm_tracker.core.tracker import Tracker


def test_default_policy() -> None:
    policy = AckPolicy()
    assert (policy.every, policy.delay, policy.timeout) == (10, 0.2, 15.0)
    assert policy.at_burst_end
    assert AckClock().policy == policy


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every": 0}, "every"),
        ({"every": -3}, "every"),
        ({"delay": -0.1}, "delay"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": -1.0}, "timeout"),
    ],
)
def test_policy_validation(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AckPolicy(**kwargs)  # type: ignore[arg-type]


def test_policy_edge_values_are_accepted() -> None:
    policy = AckPolicy(every=1, delay=0, timeout=0.001)
    assert policy.every == 1


def test_policy_is_frozen() -> None:
    policy = AckPolicy()
    with pytest.raises(AttributeError):
        policy.every = 3  # type: ignore[misc]


def test_fresh_clock_has_nothing_to_do() -> None:
    clock = AckClock(AckPolicy(every=3, delay=1.0, timeout=5.0))
    assert clock.next_deadline() is None
    assert not clock.request_due(1e9)
    assert not clock.link_dead(1e9)


def test_asks_after_every_counted_stanzas() -> None:
    clock = AckClock(AckPolicy(every=3, delay=100.0, timeout=5.0))
    assert [clock.counted(0.0), clock.counted(0.1)] == [False, False]
    assert clock.counted(0.2) is True
    clock.request_sent(0.2)
    # The window starts over after the <r/>.
    assert [clock.counted(0.3), clock.counted(0.4), clock.counted(0.5)] == [False, False, True]


def test_every_one_asks_after_each_stanza() -> None:
    clock = AckClock(AckPolicy(every=1))
    assert clock.counted(0.0)
    clock.request_sent(0.0)
    assert clock.counted(0.1)


def test_window_stays_full_until_the_request_goes_out() -> None:
    clock = AckClock(AckPolicy(every=2))
    clock.counted(0.0)
    assert clock.counted(0.0)
    assert clock.counted(0.0)  # still asked for: nobody sent the <r/> yet


def test_request_due_after_delay_from_first_unasked_stanza() -> None:
    clock = AckClock(AckPolicy(every=100, delay=0.5, timeout=10.0))
    clock.counted(10.0)
    clock.counted(10.3)  # a later stanza does not push the deadline back
    assert clock.next_deadline() == pytest.approx(10.5)
    assert not clock.request_due(10.49)
    assert clock.request_due(10.5)
    assert clock.request_due(11.0)
    clock.request_sent(11.0)
    assert not clock.request_due(50.0)


def test_the_last_stanza_of_a_burst_asks_at_once() -> None:
    clock = AckClock(AckPolicy(every=10, delay=0.2))
    assert clock.counted(0.0, last=True)  # a lone message: asked right behind it
    clock.request_sent(0.0)
    assert [clock.counted(1.0) for _ in range(9)] == [False] * 9
    assert clock.counted(1.0)  # the tenth of a long burst, as ever
    clock.request_sent(1.0)
    assert [clock.counted(1.0), clock.counted(1.0, last=True)] == [False, True]


def test_asking_at_the_end_of_a_burst_can_be_turned_off() -> None:
    clock = AckClock(AckPolicy(every=10, delay=0.2, at_burst_end=False))
    assert not clock.counted(0.0, last=True)
    assert clock.next_deadline() == pytest.approx(0.2)  # ack_delay asks instead
    with pytest.raises(ValueError, match="at_burst_end"):
        AckPolicy(at_burst_end=1)  # type: ignore[arg-type]


def test_zero_delay_is_due_at_once() -> None:
    clock = AckClock(AckPolicy(delay=0))
    clock.counted(3.0)
    assert clock.request_due(3.0)


def test_link_dead_only_with_an_outstanding_request() -> None:
    clock = AckClock(AckPolicy(every=100, delay=0.2, timeout=5.0))
    clock.counted(0.0)
    assert not clock.link_dead(100.0)  # stanzas but no <r/>: nothing to time out
    clock.request_sent(1.0)
    assert not clock.link_dead(5.99)
    assert clock.link_dead(6.0)


def test_ack_received_clears_the_outstanding_request() -> None:
    clock = AckClock(AckPolicy(every=100, delay=0.2, timeout=5.0))
    clock.counted(0.0)
    clock.request_sent(0.5)
    clock.ack_received(2.0)
    assert not clock.link_dead(100.0)
    assert clock.next_deadline() is None


def test_several_requests_wait_for_as_many_answers() -> None:
    clock = AckClock(AckPolicy(every=1, delay=0.2, timeout=5.0))
    clock.counted(0.0)
    clock.request_sent(0.0)
    clock.counted(1.0)
    clock.request_sent(1.0)  # waiting since the first one still
    assert clock.next_deadline() == pytest.approx(5.0)
    clock.ack_received(2.0)  # one answered: the link is alive, wait afresh for the other
    assert not clock.link_dead(6.9)
    assert clock.next_deadline() == pytest.approx(7.0)
    assert clock.link_dead(7.0)
    clock.ack_received(3.0)
    assert not clock.link_dead(1e9)
    assert clock.next_deadline() is None


def test_unsolicited_ack_does_not_go_negative() -> None:
    clock = AckClock(AckPolicy(every=1, timeout=5.0))
    clock.ack_received(0.0)
    clock.ack_received(0.0)
    clock.counted(1.0)
    clock.request_sent(1.0)
    assert clock.link_dead(6.0)  # the earlier spare acks did not pre-answer this request


def test_next_deadline_is_the_earlier_of_request_and_timeout() -> None:
    clock = AckClock(AckPolicy(every=100, delay=2.0, timeout=3.0))
    clock.counted(0.0)
    clock.request_sent(0.0)  # timeout at 3.0
    clock.counted(0.5)  # request due at 2.5
    assert clock.next_deadline() == pytest.approx(2.5)
    clock.request_sent(2.5)
    assert clock.next_deadline() == pytest.approx(3.0)  # waiting since 0.0, not 2.5


def test_next_deadline_with_timeout_sooner_than_delay() -> None:
    clock = AckClock(AckPolicy(every=100, delay=10.0, timeout=1.0))
    clock.counted(0.0)
    clock.request_sent(0.0)
    clock.counted(0.5)
    assert clock.next_deadline() == pytest.approx(1.0)


def test_deadline_is_consistent_with_the_predicates() -> None:
    clock = AckClock(AckPolicy(every=100, delay=0.25, timeout=2.0))
    for t in (0.0, 0.1, 0.2):
        clock.counted(t)
    deadline = clock.next_deadline()
    assert deadline is not None
    assert not clock.request_due(math.nextafter(deadline, -math.inf))
    assert clock.request_due(deadline)


def test_reset_forgets_everything() -> None:
    clock = AckClock(AckPolicy(every=2, delay=0.2, timeout=1.0))
    clock.counted(0.0)
    clock.request_sent(0.0)
    clock.counted(0.1)
    clock.reset()
    assert clock.next_deadline() is None
    assert not clock.link_dead(100.0)
    assert not clock.request_due(100.0)
    assert not clock.counted(200.0)  # the window restarted from zero
    assert clock.counted(200.0)


# ---------------------------------------------------------------- keepalive


def test_keepalive_asks_when_the_server_has_been_silent_that_long() -> None:
    # A link that died while idle is otherwise found only when the next message goes
    # unacked, and by then the server may have dropped the session.
    clock = AckClock(AckPolicy(timeout=5.0, keepalive=30.0))
    assert clock.next_deadline() is None  # nothing heard yet: no session
    clock.heard(100.0)
    assert clock.next_deadline() == 130.0
    assert not clock.keepalive_due(129.9)
    clock.heard(120.0)  # any stanza from the server says the link is alive
    assert not clock.keepalive_due(130.0)
    assert clock.keepalive_due(150.0)
    clock.request_sent(150.0)
    assert not clock.keepalive_due(200.0)  # one question at a time
    assert clock.next_deadline() == 155.0  # now the ack timeout runs
    assert clock.link_dead(155.0)


def test_keepalive_off_by_default_and_reset_forgets_what_was_heard() -> None:
    quiet = AckClock(AckPolicy(timeout=5.0))
    quiet.heard(0.0)
    assert quiet.next_deadline() is None and not quiet.keepalive_due(1e9)
    clock = AckClock(AckPolicy(keepalive=1.0))
    clock.heard(0.0)
    clock.reset()
    assert clock.next_deadline() is None and not clock.keepalive_due(1e9)


@pytest.mark.parametrize("keepalive", [0, -1.0, math.nan])
def test_keepalive_must_be_positive(keepalive: float) -> None:
    with pytest.raises(ValueError, match="keepalive"):
        AckPolicy(keepalive=keepalive)


def test_an_ack_that_tells_nothing_is_no_proof_of_life() -> None:
    # Issue 20: a server answering every <r/> with the same h while stanzas wait kept
    # the link "alive" for ever, unacked messages piling up.
    clock = AckClock(AckPolicy(every=1, timeout=15.0))
    clock.request_sent(0.0)
    clock.ack_received(1.0, news=False)
    assert not clock.link_dead(14.9)
    clock.request_sent(5.0)
    clock.ack_received(6.0, news=False)
    assert clock.link_dead(15.0)  # 15 s since the first unanswered wait, not since 6.0
    fresh = AckClock(AckPolicy(every=1, timeout=15.0))
    fresh.request_sent(0.0)
    fresh.ack_received(1.0)  # news: the wait is over
    assert not fresh.link_dead(100.0)
    clock.request_sent(16.0)
    clock.ack_received(16.5)  # h moved: alive, nothing outstanding
    assert not clock.link_dead(100.0)


def test_the_core_says_whether_an_ack_is_news() -> None:
    tracker: Tracker[str] = Tracker(clock=lambda: 0.0)
    tracker.sm_offered()
    tracker.enable_queued()
    tracker.enable_sent()
    tracker.enabled("s", resumable=True, location=None, max=None)
    assert tracker.ack_is_news(0)  # nothing waits: any answer is fine
    for n in range(3):
        tracker.counted(f"stanza {n}", None, link_up=True)
    assert not tracker.ack_is_news(0)  # h did not move
    assert tracker.ack_is_news(2)
    assert not tracker.ack_is_news(7)  # beyond what was sent: ack() will raise
    tracker.ack(2)
    assert not tracker.ack_is_news(2)
    assert tracker.ack_is_news(3)
