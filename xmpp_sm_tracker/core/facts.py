"""What we know about the managed session (XEP-0198 §3, §5)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SessionFacts", "SessionView"]


@dataclass(slots=True)
class SessionFacts:
    """What we know about the managed session (XEP-0198 §3, §5)."""

    sm_id: str | None = None
    resumable: bool = False
    location: str | None = None
    max: int | None = None
    #: Inbound stanzas handled, mod 2**32; survives resumption, reset by ``<enabled/>``.
    handled: int = 0
    #: The session comes from a saved state (another process); not resumed yet, so the
    #: server may have handled stanzas the state does not know about.
    restored: bool = False
    #: The full JID the session was bound to (a resumed session keeps it).
    jid: str | None = None

    @property
    def can_resume(self) -> bool:
        """True when a dropped connection may be resumed."""
        return self.resumable and self.sm_id is not None

    def view(self) -> SessionView:
        """A read-only snapshot, for everything outside the core."""
        return SessionView(
            self.sm_id,
            self.resumable,
            self.location,
            self.max,
            self.handled,
            self.restored,
            self.jid,
        )


@dataclass(frozen=True, slots=True)
class SessionView:
    """The managed session's facts as the core shows them: read-only."""

    sm_id: str | None
    resumable: bool
    location: str | None
    max: int | None
    handled: int
    restored: bool
    jid: str | None

    @property
    def can_resume(self) -> bool:
        """True when a dropped connection may be resumed."""
        return self.resumable and self.sm_id is not None
