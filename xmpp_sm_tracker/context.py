"""What the plugin's parts share: built once by ``plugin_init``, handed to each part.

The plugin is split into parts that each move one kind of bytes (acks, the
session's negotiation and connection, outgoing stanzas, inbound proofs); none of
them reaches into another. They meet here: the client, the core, the settings,
the connection's phase, and the two ways out (emit events, note a state change).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .core.phases import SESSION_UP, LinkEvent, LinkPhase, PhaseMachine
from .core.tracker import Event, Tracker
from .payloads import Payload
from .stats import StatsCounters

__all__ = ["Context"]


@dataclass(slots=True, eq=False)
class Context:
    """The client, the core and the channels every part of the plugin uses."""

    #: The slixmpp client (``ClientXMPP``).
    xmpp: Any
    #: The sans-I/O tracker: every decision about a message or the session.
    core: Tracker[Payload]
    #: The plugin's settings (its ``config`` dict: changes show at once).
    config: dict[str, Any]
    #: The connection's phase.
    link: PhaseMachine[LinkPhase, LinkEvent]
    #: Store and emit what the core decided (the plugin's one emit function).
    emit: Callable[[Iterable[Event]], None]
    #: Note a change of the SM state for ``sm.cache`` (``urgent``: hand it over now).
    state_changed: Callable[..., None]
    #: slixmpp's own ``send`` (the tracking wrapper sits in front of it).
    send: Callable[..., None]
    #: Running counts for ``tracker.stats()``.
    stats: StatsCounters

    @property
    def session_live(self) -> bool:
        """True while a session (fresh or resumed) is up and stanzas go out."""
        return self.link.phase in SESSION_UP

    @property
    def now(self) -> float:
        """The event loop's clock, for the ack clock and timers."""
        now: float = self.xmpp.loop.time()
        return now
