"""The connection and stream-management phase tables (core/phases.py)."""

from __future__ import annotations

import pytest

from xmpp_sm_tracker.core.phases import (
    COUNTING_IN,
    COUNTING_OUT,
    LINK_TRANSITIONS,
    SM_TRANSITIONS,
    IllegalPhaseEvent,
    LinkEvent,
    LinkPhase,
    PhaseMachine,
    SMEvent,
    SMPhase,
)
from xmpp_sm_tracker.core.tracker import Tracker

_ALL_SM = [(phase, event) for phase in SMPhase for event in SMEvent]
_ALL_LINK = [(phase, event) for phase in LinkPhase for event in LinkEvent]


def test_every_phase_has_a_row() -> None:
    assert set(SM_TRANSITIONS) == set(SMPhase)
    assert set(LINK_TRANSITIONS) == set(LinkPhase)


@pytest.mark.parametrize(("phase", "event"), _ALL_SM)
def test_sm_events_move_by_the_table_or_raise(phase: SMPhase, event: SMEvent) -> None:
    machine = PhaseMachine(SM_TRANSITIONS, phase)
    expected = SM_TRANSITIONS[phase].get(event)
    if expected is None:
        with pytest.raises(
            IllegalPhaseEvent, match=f"{event.name} is not legal in phase {phase.name}"
        ):
            machine.handle(event)
        assert machine.phase is phase  # nothing changed
    else:
        assert machine.handle(event) is phase
        assert machine.phase is expected


@pytest.mark.parametrize(("phase", "event"), _ALL_LINK)
def test_link_events_move_by_the_table_or_raise(phase: LinkPhase, event: LinkEvent) -> None:
    machine = PhaseMachine(LINK_TRANSITIONS, phase)
    expected = LINK_TRANSITIONS[phase].get(event)
    if expected is None:
        with pytest.raises(IllegalPhaseEvent):
            machine.handle(event)
        assert machine.phase is phase
    else:
        assert machine.handle(event) is phase
        assert machine.phase is expected


def test_a_link_drop_is_legal_in_every_phase() -> None:
    # slixmpp's "disconnected" can come at any time: it must never raise.
    assert all(LinkEvent.DISCONNECTED in row for row in LINK_TRANSITIONS.values())
    assert all(SMEvent.LINK_LOST in row for row in SM_TRANSITIONS.values())
    assert all(SMEvent.ENDED in row for row in SM_TRANSITIONS.values())


def test_counting_follows_the_xep() -> None:
    # XEP-0198 §4: outbound from <enable/>/<resume/> written, inbound from the answer.
    assert {SMPhase.ENABLING, SMPhase.ON, SMPhase.RESUMING} == COUNTING_OUT
    assert {SMPhase.ON} == COUNTING_IN


def _drive(tracker: Tracker[object], *steps: str) -> None:
    for step in steps:
        getattr(tracker, step)()


def test_fresh_session_path() -> None:
    tracker: Tracker[object] = Tracker(clock=lambda: 0.0)
    assert tracker.sm_phase is SMPhase.NONE
    _drive(tracker, "sm_offered", "enable_queued")
    assert tracker.sm_phase is SMPhase.ENABLE_QUEUED and not tracker.counting_out
    tracker.enable_sent()
    assert tracker.counting_out and not tracker.counting_in
    tracker.enabled("s1", resumable=True, location=None, max=None, jid="a@b/c")
    assert tracker.sm_phase is SMPhase.ON and tracker.counting_in
    tracker.link_lost()
    assert tracker.sm_phase is SMPhase.SUSPENDED


def test_a_refused_resumption_then_session_end_still_enables_at_bind() -> None:
    # Found by chaos (seed 5): slixmpp fires session_end after our refused <resume/>;
    # that must not forget that the connection offers <sm/>, or <enable/> goes out
    # late, after the messages parked for the session start (never counted).
    tracker: Tracker[object] = Tracker(clock=lambda: 0.0)
    _drive(tracker, "sm_offered", "enable_queued", "enable_sent")
    tracker.enabled("s1", resumable=True, location=None, max=None, jid="a@b/c")
    tracker.link_lost()
    tracker.resume_sent()
    tracker.resume_failed(None)
    assert tracker.sm_phase is SMPhase.OFFERED
    tracker.session_ended()
    assert tracker.sm_phase is SMPhase.OFFERED
    tracker.enable_queued()  # at bind


def test_unsolicited_answers_raise_in_the_core() -> None:
    tracker: Tracker[object] = Tracker(clock=lambda: 0.0)
    with pytest.raises(IllegalPhaseEvent):
        tracker.enabled("s1", resumable=True, location=None, max=None)
    with pytest.raises(IllegalPhaseEvent):
        tracker.resumed(0)
    with pytest.raises(IllegalPhaseEvent):
        tracker.enable_failed()
