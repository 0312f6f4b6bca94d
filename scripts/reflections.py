"""Time matching room reflections in the core: Tracker.find_reflected + room_received.

Not a test: numbers to compare before and after a change to the matching. N groupchat
messages to one room are tracked, written and acked, then the room reflects each one
(by origin-id, or by body alone for a room that rewrites ids). A chat run beside it
shows what tracking costs a message the index does not concern, a groupchat run what
indexing adds to sending.

    PYTHONPATH=. .venv/bin/python scripts/reflections.py [N ...] [--repeat R]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from xmpp_sm_tracker.core.tracker import OutgoingMessage, Tracker

ROOM = "room@conference.localhost"


def _tracker() -> Tracker[str]:
    tracker: Tracker[str] = Tracker(clock=time.monotonic)
    for step in ("sm_offered", "enable_queued"):  # cores with SM phases want these first
        if hasattr(tracker, step):
            getattr(tracker, step)()
    tracker.enable_sent()
    tracker.enabled("sm-1", resumable=True, location=None, max=None, jid="me@localhost/r")
    return tracker


def _message(i: int, kind: str) -> OutgoingMessage:
    to = f"{ROOM}/me" if kind == "groupchat" else "bob@localhost"
    return OutgoingMessage(f"m{i}", f"o{i}", to, kind, f"body {i}", f"<message id='m{i}'/>")


def _send_and_ack(tracker: Tracker[str], n: int, kind: str) -> None:
    for i in range(n):
        tracker.track(_message(i, kind), link_up=True)
        tracker.counted(f"s{i}", f"m{i}", link_up=True, same_as_record=True)
    tracker.ack(n)


def reflect(n: int, *, by_body: bool) -> float:
    """Seconds to match and settle n reflections (the sending is not timed)."""
    tracker = _tracker()
    _send_and_ack(tracker, n, "groupchat")
    assert len(tracker.records) == n
    start = time.perf_counter()
    for i in range(n):
        origin = None if by_body else f"o{i}"
        stanza_id = "rewritten" if by_body else f"m{i}"
        found = tracker.find_reflected(ROOM, origin, stanza_id, f"body {i}")
        assert found == f"m{i}", (found, i)
        tracker.room_received(found)
    elapsed = time.perf_counter() - start
    assert not tracker.records
    return elapsed


def send(n: int, kind: str) -> float:
    """Seconds to track, count and ack n messages (chat: the hot path the index must
    not slow down; groupchat: what indexing costs)."""
    tracker = _tracker()
    start = time.perf_counter()
    _send_and_ack(tracker, n, kind)
    elapsed = time.perf_counter() - start
    assert len(tracker.records) == (n if kind == "groupchat" else 0)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", nargs="*", type=int, default=[1_000, 5_000, 20_000])
    parser.add_argument("--repeat", type=int, default=3, help="best of R runs")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for n in args.sizes:
        best = {
            "origin-id": min(reflect(n, by_body=False) for _ in range(args.repeat)),
            "body only": min(reflect(n, by_body=True) for _ in range(args.repeat)),
            "chat send+ack": min(send(n, "chat") for _ in range(args.repeat)),
            "groupchat send+ack": min(send(n, "groupchat") for _ in range(args.repeat)),
        }
        rows.append({"n": n, **best})
        cells = "  ".join(
            f"{name}: {s * 1e3:.1f} ms ({s / n * 1e6:.2f} us)" for name, s in best.items()
        )
        print(f"N={n:>6}  {cells}", flush=True)


if __name__ == "__main__":
    main()
