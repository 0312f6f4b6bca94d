"""The connection and stream-management phases: two enums, one transition table each.

Modelled on h11's ``_state.py``: a phase changes only through an event that the
table allows for it; any other event raises :class:`IllegalPhaseEvent`, because it
can only come from a bug (ours, or slixmpp calling us in an order we did not
foresee). Two machines rather than one product of both, as h11 keeps one per role:

- :class:`LinkPhase`: the connection, as the app and slixmpp see it (offline,
  negotiating, live, closing ...). The plugin drives it from slixmpp's events.
- :class:`SMPhase`: the XEP-0198 session on top of it (offered, enabling, on,
  suspended, resuming ...). The tracker drives it from stream-management facts;
  what is counted in each direction follows from it alone.
"""

from __future__ import annotations

from enum import Enum
from typing import Generic, TypeVar

__all__ = [
    "CLOSED_BY_APP",
    "COUNTING_IN",
    "COUNTING_OUT",
    "LINK_TRANSITIONS",
    "SESSION_UP",
    "SM_TRANSITIONS",
    "IllegalPhaseEvent",
    "LinkEvent",
    "LinkPhase",
    "PhaseMachine",
    "SMEvent",
    "SMPhase",
]


class IllegalPhaseEvent(RuntimeError):
    """An event that cannot happen in the current phase: a bug, not a user error."""


class LinkPhase(Enum):
    """Where the connection stands."""

    #: No connection; a reconnect may be scheduled.
    OFFLINE = "offline"
    #: Connected, stream being negotiated (TLS, SASL, bind); no session yet.
    NEGOTIATING = "negotiating"
    #: A session started or resumed: stanzas flow.
    LIVE = "live"
    #: We dropped the link on purpose to resume at once (the app's ``reconnect()``).
    DROPPING = "dropping"
    #: The app called ``disconnect()``: the session ends with this connection.
    CLOSING = "closing"
    #: Closed by the app: nothing reconnects until it connects again.
    CLOSED = "closed"

    __hash__ = object.__hash__


class LinkEvent(Enum):
    """What happens to the connection."""

    CONNECTED = "connected"
    SESSION_STARTED = "session_started"
    DROP_TO_RESUME = "drop_to_resume"
    CLOSE = "close"
    DISCONNECTED = "disconnected"

    __hash__ = object.__hash__


class SMPhase(Enum):
    """Where the XEP-0198 session stands."""

    #: No managed session: nothing is counted, nothing can be resumed.
    NONE = "none"
    #: This connection offers ``<sm/>`` and a fresh session is to be enabled after bind.
    OFFERED = "offered"
    #: ``<enable/>`` is queued, not written: stanzas written before it do not count.
    ENABLE_QUEUED = "enable_queued"
    #: ``<enable/>`` went out: outbound stanzas count from zero, inbound not yet.
    ENABLING = "enabling"
    #: ``<enabled/>`` or ``<resumed/>`` came in: counting both ways.
    ON = "on"
    #: The link is down (or a saved state was loaded) and the session can be resumed.
    SUSPENDED = "suspended"
    #: ``<resume/>`` went out: outbound counting goes on from the old stream.
    RESUMING = "resuming"

    __hash__ = object.__hash__


class SMEvent(Enum):
    """Stream-management facts."""

    #: The connection offers ``<sm/>`` and we will not resume over it.
    OFFERED = "offered"
    ENABLE_QUEUED = "enable_queued"
    ENABLE_SENT = "enable_sent"
    ENABLED = "enabled"
    #: ``<failed/>`` answered ``<enable/>``.
    REFUSED = "refused"
    #: A saved state was loaded (before connect).
    RESTORED = "restored"
    RESUME_SENT = "resume_sent"
    RESUMED = "resumed"
    #: ``<failed/>``, a stream error or silence answered ``<resume/>``.
    RESUME_FAILED = "resume_failed"
    LINK_LOST_RESUMABLE = "link_lost_resumable"
    LINK_LOST = "link_lost"
    #: The session is over (a clean close, a protocol error, the server's end).
    ENDED = "ended"

    __hash__ = object.__hash__


_L, _LE = LinkPhase, LinkEvent
_M, _ME = SMPhase, SMEvent

# fmt: off
#: phase -> {event: next phase}. A pair that is absent is illegal.
LINK_TRANSITIONS: dict[LinkPhase, dict[LinkEvent, LinkPhase]] = {
    _L.OFFLINE: {
        _LE.CONNECTED: _L.NEGOTIATING, _LE.CLOSE: _L.CLOSED, _LE.DISCONNECTED: _L.OFFLINE,
    },
    _L.NEGOTIATING: {
        _LE.SESSION_STARTED: _L.LIVE, _LE.DROP_TO_RESUME: _L.DROPPING, _LE.CLOSE: _L.CLOSED,
        _LE.DISCONNECTED: _L.OFFLINE,
    },
    _L.LIVE: {
        _LE.SESSION_STARTED: _L.LIVE, _LE.DROP_TO_RESUME: _L.DROPPING, _LE.CLOSE: _L.CLOSING,
        _LE.DISCONNECTED: _L.OFFLINE,
    },
    _L.DROPPING: {
        _LE.SESSION_STARTED: _L.DROPPING, _LE.DROP_TO_RESUME: _L.DROPPING,
        _LE.CLOSE: _L.CLOSED, _LE.DISCONNECTED: _L.OFFLINE,
    },
    # A live session closing gracefully: stanzas still flow until the footer.
    _L.CLOSING: {
        _LE.SESSION_STARTED: _L.CLOSING, _LE.DROP_TO_RESUME: _L.CLOSING, _LE.CLOSE: _L.CLOSING,
        _LE.DISCONNECTED: _L.CLOSED,
    },
    # Closed by the app (a link that was still negotiating may still be going down).
    _L.CLOSED: {
        _LE.CONNECTED: _L.NEGOTIATING, _LE.SESSION_STARTED: _L.CLOSED,
        _LE.DROP_TO_RESUME: _L.CLOSED, _LE.CLOSE: _L.CLOSED, _LE.DISCONNECTED: _L.CLOSED,
    },
}

SM_TRANSITIONS: dict[SMPhase, dict[SMEvent, SMPhase]] = {
    _M.NONE: {
        _ME.OFFERED: _M.OFFERED, _ME.RESTORED: _M.SUSPENDED, _ME.LINK_LOST: _M.NONE,
        _ME.ENDED: _M.NONE,
    },
    # The offer belongs to the connection: a session that ends (a refused resumption
    # is followed by slixmpp's session_end) leaves it, and <enable/> goes out at bind.
    _M.OFFERED: {
        _ME.OFFERED: _M.OFFERED, _ME.ENABLE_QUEUED: _M.ENABLE_QUEUED,
        _ME.LINK_LOST_RESUMABLE: _M.SUSPENDED, _ME.LINK_LOST: _M.NONE, _ME.ENDED: _M.OFFERED,
    },
    _M.ENABLE_QUEUED: {
        _ME.OFFERED: _M.ENABLE_QUEUED, _ME.ENABLE_SENT: _M.ENABLING,
        _ME.LINK_LOST_RESUMABLE: _M.SUSPENDED, _ME.LINK_LOST: _M.NONE, _ME.ENDED: _M.NONE,
    },
    _M.ENABLING: {
        _ME.OFFERED: _M.ENABLING, _ME.ENABLED: _M.ON, _ME.REFUSED: _M.NONE,
        _ME.LINK_LOST: _M.NONE, _ME.ENDED: _M.NONE,
    },
    _M.ON: {
        _ME.OFFERED: _M.ON, _ME.LINK_LOST_RESUMABLE: _M.SUSPENDED, _ME.LINK_LOST: _M.NONE,
        _ME.ENDED: _M.NONE,
    },
    # Not resuming over a connection that offers <sm/> (resumption switched off): the
    # old session is given up for a fresh one, which <enable/> makes final.
    _M.SUSPENDED: {
        _ME.OFFERED: _M.OFFERED, _ME.RESTORED: _M.SUSPENDED, _ME.RESUME_SENT: _M.RESUMING,
        _ME.LINK_LOST_RESUMABLE: _M.SUSPENDED, _ME.LINK_LOST: _M.NONE, _ME.ENDED: _M.NONE,
    },
    # A refused resumption leaves a connection that still offers <sm/>: enable afresh.
    _M.RESUMING: {
        _ME.RESUMED: _M.ON, _ME.RESUME_FAILED: _M.OFFERED,
        _ME.LINK_LOST_RESUMABLE: _M.SUSPENDED, _ME.LINK_LOST: _M.NONE, _ME.ENDED: _M.NONE,
    },
}
# fmt: on

#: Link phases in which a session is up and stanzas go out.
SESSION_UP = frozenset({_L.LIVE, _L.CLOSING})
#: Link phases in which the app closed the connection: nothing reconnects.
CLOSED_BY_APP = frozenset({_L.CLOSING, _L.CLOSED})
#: Phases in which stanzas we write are counted (XEP-0198 §4: from ``<enable/>`` on).
COUNTING_OUT = frozenset({_M.ENABLING, _M.ON, _M.RESUMING})
#: Phases in which stanzas we receive are counted (from ``<enabled/>``/``<resumed/>``).
COUNTING_IN = frozenset({_M.ON})

P = TypeVar("P", LinkPhase, SMPhase)
E = TypeVar("E", LinkEvent, SMEvent)


class PhaseMachine(Generic[P, E]):
    """One phase and the table that moves it; read ``phase``, change it by ``handle``."""

    __slots__ = ("_phase", "_table")

    def __init__(self, table: dict[P, dict[E, P]], initial: P) -> None:
        self._table: dict[P, dict[E, P]] = table
        self._phase: P = initial

    @property
    def phase(self) -> P:
        return self._phase

    def handle(self, event: E) -> P:
        """Apply ``event``; returns the phase it left. Raises for an illegal event."""
        before = self._phase
        after = self._table[before].get(event)
        if after is None:
            raise IllegalPhaseEvent(f"{event.name} is not legal in phase {before.name}")
        self._phase = after
        return before
