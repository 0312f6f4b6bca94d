"""Sans-I/O core: counters, states, the ledger and the tracker. No slixmpp, no asyncio."""

from .acks import AckClock, AckPolicy
from .counters import MAX_SEQ, distance, is_behind, seq_add
from .ledger import Entry, HBackwards, HTooHigh, Ledger, ResumeResult, SMProtocolError
from .records import FailureReason, TrackedMessage
from .states import IN_FLIGHT, SETTLED, TRANSITIONS, DeliveryState, IllegalTransition, next_state
from .tracker import Event, OutgoingMessage, SessionFacts, Tracker

__all__ = [
    "IN_FLIGHT",
    "MAX_SEQ",
    "SETTLED",
    "TRANSITIONS",
    "AckClock",
    "AckPolicy",
    "DeliveryState",
    "Entry",
    "Event",
    "FailureReason",
    "HBackwards",
    "HTooHigh",
    "IllegalTransition",
    "Ledger",
    "OutgoingMessage",
    "ResumeResult",
    "SMProtocolError",
    "SessionFacts",
    "TrackedMessage",
    "Tracker",
    "distance",
    "is_behind",
    "next_state",
    "seq_add",
]
