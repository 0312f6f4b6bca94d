"""The whole journey of messages through a flaky link, on a local Prosody it starts.

Run with ``./scripts/demo`` (or ``python -m devtools.demo`` from the
repository root). It prints a
timeline of every tracker event alice sees while a fault proxy cuts, stalls and
blackholes her link and the server restarts under her, then what bob received.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import time
from collections import Counter
from pathlib import Path

from xmpp_sm_tracker.core.records import TrackedMessage
from xmpp_sm_tracker.testing import FaultProxy, ProsodyServer, ensure_prosody_installed
from xmpp_sm_tracker.testing.client import connect_client, make_client, tracker_of, wait_for

__all__ = ["main", "run_demo"]

EVENTS = ("sent", "hibernated", "resent", "acked", "failed")
MARKS = {"sent": "→", "hibernated": "zz", "resent": "↻", "acked": "✓", "failed": "✗"}


class Timeline:
    """Prints each event as it happens, with the time since the start."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.states: dict[str, str] = {}

    def note(self, text: str) -> None:
        print(f"\n{self._clock()}  ── {text}")

    def _clock(self) -> str:
        return f"+{time.monotonic() - self.start:6.2f}s"

    def event(self, name: str, record: TrackedMessage) -> None:
        self.states[record.id] = name
        extra = f"  reason={record.reason}" if record.reason else ""
        attempts = f"  attempt {record.attempts}" if record.attempts > 1 else ""
        print(
            f"{self._clock()}  {MARKS[name]:>2} message:{name:<10} {record.body!r:<14}"
            f" seq={record.seq!s:<4}{attempts}{extra}"
        )

    def count(self, name: str) -> int:
        return sum(1 for state in self.states.values() if state == name)


async def run_demo(base_dir: Path) -> int:
    """Run the story; returns 0 when every message ended where it should."""
    ensure_prosody_installed()
    server = ProsodyServer(base_dir / "prosody", hibernation_time=30)
    for user in ("alice", "bob"):
        server.register(user, "demo-pass")
    timeline = Timeline()
    received: Counter[str] = Counter()
    async with server, FaultProxy(server.host, server.c2s_port) as proxy:
        # bob runs the tracker too, only so that he reconnects after the restart.
        bob = make_client("bob@localhost/phone", "demo-pass")
        bob.add_event_handler(
            "message", lambda m: received.update([m["body"]]) if m["body"] else None
        )
        bob.add_event_handler("session_start", lambda _: bob.send_presence())
        alice = make_client(
            "alice@localhost/laptop",
            "demo-pass",
            tracker_config={"reconnect_delay": 0.2, "reconnect_max_delay": 1.0},
        )
        tracker = tracker_of(alice)
        for name in EVENTS:
            tracker.events.on(f"message:{name}", lambda r, n=name: timeline.event(n, r))
        await connect_client(bob, server.address)
        await connect_client(alice, proxy.address)
        print(
            f"Prosody on {server.host}:{server.c2s_port}, alice through a fault proxy on "
            f"{proxy.host}:{proxy.port}"
        )

        def send(body: str) -> str:
            message = alice.make_message(mto="bob@localhost", mbody=body, mtype="chat")
            message.send()
            return str(message["id"])

        timeline.note("1. a healthy link: sent, then acked by the server")
        for body in ("hi bob", "how are you?"):
            send(body)
        await wait_for(lambda: timeline.count("acked") == 2)

        timeline.note("2. the link stalls, then is cut: hibernated, resumed, resent, acked")
        proxy.stall()
        for body in ("are you there", "hello??"):
            send(body)
        await asyncio.sleep(0.3)
        proxy.cut()
        proxy.heal()
        await wait_for(lambda: timeline.count("acked") == 4, timeout=15)

        timeline.note("3. sent while the link is down: hibernated at once, resent after resume")
        proxy.refuse(True)
        proxy.cut()
        await wait_for(lambda: alice.transport is None)
        send("typed offline")
        await asyncio.sleep(0.5)
        proxy.refuse(False)
        await wait_for(lambda: timeline.count("acked") == 5, timeout=15)

        timeline.note(
            "4. the link turns into a blackhole and the server restarts: "
            "resumption fails, so what was unacked fails"
        )
        proxy.blackhole()
        lost = [send(body) for body in ("into the void", "anyone?")]
        await asyncio.sleep(0.3)
        await server.restart()
        proxy.heal()
        proxy.cut()
        await wait_for(lambda: timeline.count("failed") == 2, timeout=20)
        await wait_for(lambda: tracker.managed, timeout=15)

        timeline.note("5. the user resends the failed messages: same id, resent, acked")
        for message_id in lost:
            await tracker.resend(message_id)
        await wait_for(lambda: timeline.count("acked") == 7, timeout=15)
        await wait_for(lambda: sum(received.values()) >= 7, timeout=10)

        failed = await tracker.failed()
        stats = tracker.stats()
        alice.disconnect()
        bob.disconnect()
        await asyncio.sleep(0.3)

    print("\nbob received:")
    for body, times in received.items():
        print(f"  {times}× {body!r}")
    settled = timeline.count("acked")
    duplicates = [body for body, times in received.items() if times > 1]
    print(
        f"\n{settled} of {len(timeline.states)} messages acked, {len(failed)} still failed, "
        f"{len(duplicates)} received twice"
    )
    rtt = ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in stats.ack_rtt.items())
    print(
        f"tracker.stats(): reached {dict(stats.reached)}; in flight {stats.in_flight}; "
        f"reconnects {stats.reconnects}, resumptions {stats.resumptions} "
        f"(refused {stats.resumptions_failed}); ack round trip {rtt or 'none'}"
    )
    return 0 if settled == len(timeline.states) and not failed and not duplicates else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--verbose", action="store_true", help="log what the plugin does")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="sm-tracker-demo-") as tmp:
        code: int = asyncio.run(run_demo(Path(tmp)))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
