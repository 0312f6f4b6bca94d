"""Sans-I/O core: every decision about a message or the connection, with time passed
in. Standard library only: no slixmpp, no asyncio, no clock read (see
``docs/architecture.md``)."""

from .acks import AckClock, AckPolicy
from .counters import MAX_SEQ, distance, is_behind, seq_add
from .events import Event, OutgoingMessage
from .facts import SessionFacts
from .ledger import Entry, HBackwards, HTooHigh, Ledger, ResumeResult, SMProtocolError
from .outbox import Outbox, Verdict
from .phases import (
    LINK_TRANSITIONS,
    SM_TRANSITIONS,
    IllegalPhaseEvent,
    LinkEvent,
    LinkPhase,
    PhaseMachine,
    SMEvent,
    SMPhase,
)
from .reconnect import backoff_delay, choose_address
from .records import FailureReason, TrackedMessage
from .rooms import ReflectionIndex, Rooms, own_presence
from .states import IN_FLIGHT, SETTLED, TRANSITIONS, DeliveryState, IllegalTransition, next_state
from .tracker import Tracker

__all__ = [
    "IN_FLIGHT",
    "LINK_TRANSITIONS",
    "MAX_SEQ",
    "SETTLED",
    "SM_TRANSITIONS",
    "TRANSITIONS",
    "AckClock",
    "AckPolicy",
    "DeliveryState",
    "Entry",
    "Event",
    "FailureReason",
    "HBackwards",
    "HTooHigh",
    "IllegalPhaseEvent",
    "IllegalTransition",
    "Ledger",
    "LinkEvent",
    "LinkPhase",
    "Outbox",
    "OutgoingMessage",
    "PhaseMachine",
    "ReflectionIndex",
    "ResumeResult",
    "Rooms",
    "SMEvent",
    "SMPhase",
    "SMProtocolError",
    "SessionFacts",
    "TrackedMessage",
    "Tracker",
    "Verdict",
    "backoff_delay",
    "choose_address",
    "distance",
    "is_behind",
    "next_state",
    "own_presence",
    "seq_add",
]
