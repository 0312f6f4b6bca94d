"""What tests compare against: a transport that records writes, and event journeys."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import slixmpp

from xmpp_sm_tracker import SMTracker

#: The events of a message that was on the wire when the link dropped, then resent
#: after the resumption and acked.
RESUMED_JOURNEY = ["message:sent", "message:hibernated", "message:resent", "message:acked"]


class RecordingTransport:
    """Stands in for the socket: keeps every write."""

    def __init__(self) -> None:
        self.out: list[str] = []

    def write(self, data: bytes) -> None:
        self.out.append(data.decode())

    def get_extra_info(self, *_args: Any, **_kwargs: Any) -> None:
        return None

    def bodies(self) -> list[str]:
        """The bodies of the messages written, in order."""
        found = (re.search(r"<body>(.*?)</body>", data) for data in self.out)
        return [match.group(1) for match in found if match is not None]


class WiredClient:
    """alice's real plugin on a live session over a :class:`RecordingTransport`: for
    orders decided within one event-loop turn, which a live server cannot pin.
    Subclasses set their scene up, then call :meth:`start_writing`."""

    def __init__(self, **config: Any) -> None:
        self.xmpp = slixmpp.ClientXMPP("alice@localhost/r", "pass")
        self.xmpp.register_plugin("xep_0198")
        self.xmpp.register_plugin("sm_tracker", pconfig=config)
        self.tracker: SMTracker = self.xmpp.plugin["sm_tracker"]
        self.transport = RecordingTransport()
        self.xmpp.transport = self.transport
        self.xmpp._session_started = True
        self.xmpp.event("connected")  # the link phases a live session goes through
        self.xmpp.event("session_start")

    def start_writing(self) -> None:
        """slixmpp's send loop: what is sent now goes through the filters to the wire."""
        self.sender = asyncio.ensure_future(self.xmpp.run_filters())

    async def turns(self, n: int = 50) -> None:
        for _ in range(n):
            await asyncio.sleep(0)

    async def aclose(self) -> None:
        self.sender.cancel()
        await asyncio.gather(self.sender, return_exceptions=True)
        self.tracker._cancel_timers()
        self.tracker.resender.cancel()


class Inbound:
    """Everything a live client reads from the server, as text: the wire evidence of
    what a server said (``<failed h>``, a stream error, ...). Attach before connecting
    or at any time; it records from then on, across reconnections."""

    def __init__(self, xmpp: slixmpp.ClientXMPP) -> None:
        self.chunks: list[str] = []
        read = xmpp.data_received

        def data_received(data: bytes) -> None:
            self.chunks.append(data.decode("utf-8", "replace"))
            read(data)

        xmpp.data_received = data_received

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    def find(self, pattern: str) -> list[str]:
        """Every match of a regular expression in what was read."""
        return re.findall(pattern, self.text, re.S)
