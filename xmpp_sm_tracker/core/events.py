"""What the core hands back: events to emit, and what it is told of a new message."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

from .states import DeliveryState

__all__ = [
    "MESSAGE_EVENT",
    "STANZA_ACKED",
    "STANZA_EVENT",
    "STANZA_FAILED",
    "STANZA_HIBERNATED",
    "STANZA_RESENT",
    "Event",
    "OutgoingMessage",
    "new_event",
]

_S = DeliveryState

#: Event names per state a message moves into.
MESSAGE_EVENT = {state: f"message:{state.value}" for state in DeliveryState}
#: Event names per ledger fate of a stanza.
STANZA_ACKED = "stanza:acked"
STANZA_HIBERNATED = "stanza:hibernated"
STANZA_RESENT = "stanza:resent"
STANZA_FAILED = "stanza:failed"
STANZA_EVENT = {
    _S.ACKED: STANZA_ACKED,
    _S.HIBERNATED: STANZA_HIBERNATED,
    _S.RESENT: STANZA_RESENT,
    _S.FAILED: STANZA_FAILED,
}


class Event(NamedTuple):
    """One event to emit: ``message:*`` carries a TrackedMessage, ``stanza:*`` the stanza.

    A named tuple: several are made per message, and a tuple is the cheapest to build.
    """

    name: str
    payload: object


#: ``new_event((name, payload))`` is ``Event(name, payload)`` without the named tuple's
#: ``__new__`` in Python: the tracker makes two per record at every change.
new_event: Callable[[tuple[str, object]], Event] = partial(tuple.__new__, Event)


class OutgoingMessage(NamedTuple):
    """What the adapter read off a message stanza that is to be tracked (one per message:
    a named tuple, the cheapest immutable value to build)."""

    id: str
    origin_id: str
    to: str
    type: str
    body: str
    xml: str
    via_carbon: bool = False
