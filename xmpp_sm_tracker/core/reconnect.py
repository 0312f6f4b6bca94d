"""Where and when to reconnect after the link dropped: pure functions of the facts.

slixmpp never reconnects after a dropped connection by itself, and when it does
connect it keeps the server's ``<enabled location>`` for good, even when nothing
answers there. These answer the two questions the plugin asks before it calls
``connect()``: how long to wait, and which address to knock on.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["Address", "backoff_delay", "choose_address", "location_trusted"]

#: (host, port)
Address = tuple[str, int]


def backoff_delay(attempt: int, base: float, maximum: float) -> float:
    """Seconds before reconnect attempt number ``attempt`` (0 for the first):
    ``base`` doubled per attempt, at most ``maximum``."""
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, not {attempt}")
    return float(min(maximum, base * (2 ** min(attempt, 16))))


def location_trusted(host: str, domain: str, allowed: Iterable[str] = ()) -> bool:
    """Whether to follow ``<enabled location>`` to ``host``: the account's ``domain``
    or a subdomain of it, or a host the app allowed. Anything else (an IP literal,
    loopback, another domain) would let the server, or whoever forged its answer,
    send our next connection, resumption id included, wherever it likes."""
    host, domain = host.lower().rstrip("."), domain.lower().rstrip(".")
    if host in {h.lower().rstrip(".") for h in allowed}:
        return True
    return bool(domain) and (host == domain or host.endswith("." + domain))


def choose_address(
    location: Address | None, dead: Address | None, app_address: Address | None
) -> Address | None:
    """The address to connect to: the server's resumption ``location`` unless it is
    the one that did not answer, else the address the app gave (None: DNS)."""
    if location is not None and location != dead:
        return location
    return app_address
