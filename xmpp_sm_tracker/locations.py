"""Where the next connection goes: the server's ``<enabled location>`` while it answers
and may be trusted, otherwise the address the app gave.

slixmpp keeps a location for good, even when nothing answers there; and a location
is the server's word alone: followed anywhere, a forged ``<enabled>`` could send our
next connection, resumption id included, to a host of its choosing. The rule itself
(:func:`~.core.reconnect.location_trusted`) and the choice
(:func:`~.core.reconnect.choose_address`) are the core's.
"""

from __future__ import annotations

import logging
from typing import Any

from .core.reconnect import Address, choose_address, location_trusted
from .stanzas import parse_location

__all__ = ["Locations"]

log = logging.getLogger(__name__)


class Locations:
    """The app's address, the location tried, and one that did not answer."""

    def __init__(self, xmpp: Any, config: dict[str, Any]) -> None:
        self.xmpp = xmpp
        self._config = config
        #: Where the app connected us (None: DNS), the ``<enabled location>`` we went
        #: to instead, and one that did not answer (not tried again for that session).
        self.app_address: Address | None = None
        self.tried: Address | None = None
        self._dead: Address | None = None

    def accept(self, location: str | None) -> str | None:
        """The location of a new ``<enabled>`` to keep for the session, or None."""
        self._dead = None  # a new session: its location gets a chance
        usable = parse_location(location)
        if location and usable is None:
            log.warning("ignoring an unusable <enabled location=%r>", location)
        elif usable is not None and not self._trusted(usable):
            log.warning(
                "not following <enabled location=%r>: not %s or a subdomain of it, nor in "
                "location_allow",
                location,
                self.xmpp.boundjid.domain,
            )
            usable = None
        return location if usable else None

    def next_address(self, saved: str | None) -> Address | None:
        """Where to reconnect (None: DNS for the account's domain)."""
        if self.xmpp.custom_address != self.tried:
            self.app_address = self.xmpp.custom_address  # the app's (None: DNS)
        location = parse_location(saved)
        if location is not None and not self._trusted(location):
            log.warning("not following the saved location %r", saved)
            location = None  # (saved by an older version, or the allow-list changed)
        address = choose_address(location, self._dead, self.app_address)
        self.tried = address if address == location else None
        return address

    def tried_failed(self) -> bool:
        """The connection that failed went to the server's location: never again for
        this session (True: reconnect to the app's address now)."""
        tried = self.tried
        if tried is None or self.xmpp.custom_address != tried:
            return False
        log.warning(
            "the server's resumption location %s:%s does not answer: back to %s",
            *tried,
            self.app_address or self.xmpp.boundjid.domain,
        )
        self._dead = tried
        return True

    def _trusted(self, location: Address) -> bool:
        allowed = self._config["location_allow"]
        return location_trusted(location[0], self.xmpp.boundjid.domain, allowed)
