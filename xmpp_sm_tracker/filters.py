"""Who writes last: whether our ``out_sync`` filter is the last one a stanza passes.

Only then may it hand slixmpp the text to write (each message serialized once), and
only when every other outgoing filter is known to leave messages alone may a record's
text stand for what went on the wire. Asked for every stanza, so the answer is kept
until a filter is added or removed (``add_filter``/``del_filter`` are wrapped).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["FilterWatch"]

#: slixmpp outgoing filters that never touch a message stanza (checked on 1.17).
_MESSAGE_SAFE_FILTERS = frozenset({"Roster._save_last_status", "XEP_0115._filter_add_caps"})


class FilterWatch:
    """Watches slixmpp's filter registry for the filter ``ours``."""

    def __init__(self, xmpp: Any, ours: Callable[..., Any]) -> None:
        self.xmpp = xmpp
        self._ours = ours
        self._facts: tuple[bool, bool] | None = None
        self._original_add_filter = xmpp.add_filter
        self._original_del_filter = xmpp.del_filter

    def install(self) -> None:
        self.xmpp.add_filter = self._add_filter
        self.xmpp.del_filter = self._del_filter

    def uninstall(self) -> None:
        self.xmpp.add_filter = self._original_add_filter
        self.xmpp.del_filter = self._original_del_filter

    def we_write_last(self) -> bool:
        """True when our filter is the last a stanza passes (no filter is skipped if it
        hands slixmpp the text)."""
        return self._known()[0]

    def messages_kept(self) -> bool:
        """True when no other outgoing filter can have rewritten a message since we
        serialized it (only filters known to leave messages alone are registered)."""
        return self._known()[1]

    def _known(self) -> tuple[bool, bool]:
        if self._facts is None:
            self._facts = self._check()
        return self._facts

    def _add_filter(self, mode: str, handler: Callable[..., Any], order: int | None = None) -> None:
        self._facts = None
        self._original_add_filter(mode, handler, order)

    def _del_filter(self, mode: str, handler: Callable[..., Any]) -> None:
        self._facts = None
        self._original_del_filter(mode, handler)

    def _check(self) -> tuple[bool, bool]:
        filters = getattr(self.xmpp, "_XMLStream__filters", None)
        if filters is None:
            return False, False
        last = not filters.get("out_sce") and all(
            f == self._ours for f in filters.get("out_sync", ())
        )
        kept = last and all(
            getattr(f, "__qualname__", None) in _MESSAGE_SAFE_FILTERS
            for f in filters.get("out", ())
        )
        return last, kept
