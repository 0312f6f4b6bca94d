"""The SM state between the core and slixmpp: stanzas to text for ``sm.cache``, and a
saved state checked completely and back to stanzas for ``sm.load``."""

from __future__ import annotations

import logging
import time
from typing import Any
from xml.etree import ElementTree as ET

from slixmpp.jid import JID, InvalidJID
from slixmpp.stanza import Iq, Message, Presence
from slixmpp.xmlstream import StanzaBase

from . import stanzas
from .core.smstate import SMStateError, parse_state
from .core.tracker import Tracker
from .payloads import Payload, entry_text

__all__ = ["StateBridge"]

log = logging.getLogger(__name__)


class StateBridge:
    """``export`` and ``load`` for :class:`~.smhooks.SMStateHooks`."""

    def __init__(self, xmpp: Any, core: Tracker[Payload]) -> None:
        self.xmpp = xmpp
        self.core = core

    def export(self) -> dict[str, Any] | None:
        return self.core.export_state(entry_text, now=time.time())

    def load(self, state: object) -> None:
        """Check a saved state completely, then install it; on error stay fresh."""
        if self.xmpp.transport is not None or self.core.counting_out:
            raise SMStateError("sm.load() must be called before connect()")
        try:
            restored = parse_state(state, bare_jid=self.xmpp.boundjid.bare)
            _check_jids(restored.jid, *restored.rooms)
            payloads: list[Payload] = [self._stanza_from_xml(e.xml) for e in restored.unacked]
        except SMStateError as exc:
            log.warning("not resuming from the saved SM state: %s", exc)
            raise
        self.core.restore(restored, payloads)
        # Not the stream id: whoever reads the log could resume the stream with it.
        log.info("loaded a saved SM state: %d unacked stanzas to resume", len(payloads))

    def _stanza_from_xml(self, xml: str) -> StanzaBase:
        try:
            element = ET.fromstring(xml)
        except ET.ParseError as exc:
            raise SMStateError(f"SM state: an unacked stanza is not valid XML ({exc})") from exc
        kind = stanzas.stanza_kind(element)
        stanza_class = {"message": Message, "presence": Presence, "iq": Iq}.get(kind)
        if stanza_class is None:
            raise SMStateError(f"SM state: <{kind}> is not a stanza that can be resent")
        stanza: StanzaBase = stanza_class(self.xmpp, xml=element)
        return stanza


def _check_jids(*jids: str) -> None:
    """JIDs slixmpp would refuse later, half-way through a resumption, refused now."""
    for jid in jids:
        try:
            JID(jid)
        except InvalidJID as exc:
            raise SMStateError(f"SM state: {jid!r} is not a valid JID ({exc})") from exc
