"""A loopback TCP proxy that injects network faults between an XMPP client and server.

Stream management is about surviving broken links, so tests need links that break on
command: reset (:meth:`FaultProxy.cut`), a server that is "down"
(:meth:`FaultProxy.refuse`), a link that hangs but recovers (:meth:`FaultProxy.stall`),
a dead NAT that swallows everything (:meth:`FaultProxy.blackhole`) and a link that dies
mid-stanza (:meth:`FaultProxy.drop_after`). For hostile-server tests it can also speak
for one end (:meth:`FaultProxy.inject`) or rewrite what the server says
(:meth:`FaultProxy.rewrite`).

Built on asyncio Protocols with transport-level flow control, so it adds little
overhead to high-volume benchmarks. It is independent of slixmpp and XMPP: it only
moves bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import struct
import time
from collections.abc import Callable
from types import TracebackType
from typing import Literal, Self, cast

__all__ = ["Direction", "FaultProxy", "TrafficMode"]

log = logging.getLogger(__name__)

Direction = Literal["upstream", "downstream", "both"]
"""``upstream`` is client -> server, ``downstream`` is server -> client."""

TrafficMode = Literal["flow", "stall", "blackhole"]

_LINGER_RESET = struct.pack("ii", 1, 0)


def _abort_with_reset(transport: asyncio.Transport) -> None:
    """Close at once, sending RST (SO_LINGER 0) so the peer sees a reset, not a clean EOF."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


class _RefusingProtocol(asyncio.Protocol):
    """Accepts and immediately resets: the client's view of a server that is down."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _abort_with_reset(cast(asyncio.Transport, transport))


class _Side(asyncio.Protocol):
    """One end (client-facing or server-facing) of a proxied connection."""

    __slots__ = ("eof", "is_client", "lost", "pipe", "reading", "transport", "write_paused")

    def __init__(self, pipe: _Pipe, *, is_client: bool) -> None:
        self.pipe = pipe
        self.is_client = is_client
        self.transport: asyncio.Transport | None = None
        self.reading = True
        self.write_paused = False
        self.eof = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.pipe.guard(self.pipe.on_connected, self)

    def data_received(self, data: bytes) -> None:
        self.pipe.guard(self.pipe.on_data, self, data)

    def eof_received(self) -> bool:
        self.pipe.guard(self.pipe.on_eof, self)
        # Keep our write half open: the other direction may still carry data.
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.pipe.guard(self.pipe.on_lost, self)

    def pause_writing(self) -> None:
        self.write_paused = True
        self.pipe.guard(self.pipe.update_reading)

    def resume_writing(self) -> None:
        self.write_paused = False
        self.pipe.guard(self.pipe.update_reading)


class _Pipe:
    """A client connection and its upstream connection, pumped in both directions."""

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.client = _Side(self, is_client=True)
        self.server = _Side(self, is_client=False)
        self.closed = False
        self.connect_task: asyncio.Task[None] | None = None
        # Bytes that arrived while stalled (normally none: reading is paused).
        self.pending: dict[bool, list[bytes]] = {True: [], False: []}
        self.budget: int | None = None
        self.budget_dir: Direction = "both"

    # -- helpers ------------------------------------------------------------------

    def guard(self, fn: Callable[..., None], *args: object) -> None:
        """Run a protocol callback; a bug here must drop this pipe, not the event loop."""
        try:
            fn(*args)
        except Exception:
            log.exception("FaultProxy: internal error, dropping connection")
            with contextlib.suppress(Exception):
                self.close(abort=True)

    def peer(self, side: _Side) -> _Side:
        return self.server if side.is_client else self.client

    @property
    def done(self) -> bool:
        server_done = self.server.lost or (
            self.server.transport is None
            and (self.connect_task is None or self.connect_task.done())
        )
        return self.client.lost and server_done

    def set_budget(self, n_bytes: int | None, direction: Direction) -> None:
        self.budget = n_bytes
        self.budget_dir = direction

    # -- lifecycle ----------------------------------------------------------------

    def on_connected(self, side: _Side) -> None:
        if side.is_client:
            # Hold client bytes in the kernel until the upstream connection exists.
            assert side.transport is not None
            side.transport.pause_reading()
            side.reading = False
            return
        if self.closed or self.client.lost:
            assert side.transport is not None
            _abort_with_reset(side.transport)
            return
        self.update_reading()

    async def connect_upstream(self) -> None:
        proxy = self.proxy
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(proxy.connect_timeout):
                await loop.create_connection(
                    lambda: self.server, proxy.target_host, proxy.target_port
                )
        except (OSError, TimeoutError) as exc:
            log.debug("FaultProxy: upstream connect failed: %s", exc)
            self.close(abort=True)
        except asyncio.CancelledError:
            self.close(abort=True)
            raise
        except Exception:
            log.exception("FaultProxy: unexpected upstream connect error")
            self.close(abort=True)

    def close(self, *, abort: bool, flush: _Side | None = None) -> None:
        """Tear the pipe down; ``flush`` names a side whose buffered writes go out first."""
        self.closed = True
        for side in (self.client, self.server):
            t = side.transport
            if t is None or side.lost or t.is_closing():
                continue
            if side is flush or not abort:
                t.close()
            else:
                _abort_with_reset(t)
        if self.connect_task is not None and not self.connect_task.done():
            self.connect_task.cancel()
        self.proxy._forget_if_done(self)

    def on_lost(self, side: _Side) -> None:
        if not self.closed and not self.proxy._frozen:
            # Normal forwarding: the peer learns of the close once its buffer is flushed.
            self.close(abort=False)
        # When frozen (stall/blackhole) the other end is left open, like a dead link;
        # heal() propagates the close later.
        self.proxy._forget_if_done(self)

    def on_eof(self, side: _Side) -> None:
        side.eof = True
        if self.closed:
            return
        mode = self.proxy._mode
        if mode == "flow":
            self.forward_eof(side)
        elif mode == "blackhole" and side.transport is not None:
            # The sender is gone as far as it is concerned; drop our end so it does not
            # linger in CLOSE_WAIT. The other end is told only on heal().
            side.transport.close()

    def forward_eof(self, side: _Side) -> None:
        dst = self.peer(side)
        t = dst.transport
        if t is not None and not dst.lost and not t.is_closing():
            try:
                if t.can_write_eof():
                    t.write_eof()
                else:
                    t.close()
            except OSError:  # the peer vanished meanwhile (ENOTCONN): nothing to tell it
                t.close()
        if self.client.eof and self.server.eof:
            self.close(abort=False)

    # -- data ---------------------------------------------------------------------

    def update_reading(self) -> None:
        mode = self.proxy._mode
        for side in (self.client, self.server):
            t = side.transport
            if t is None or side.lost or side.eof or t.is_closing():
                continue
            dst = self.peer(side)
            if self.closed or mode == "stall":
                want = False
            elif mode == "blackhole":
                want = True  # read and discard, so the sender believes all is well
            else:
                want = dst.transport is not None and not dst.lost and not dst.write_paused
            if want != side.reading:
                side.reading = want
                if want:
                    t.resume_reading()
                else:
                    t.pause_reading()

    def on_data(self, side: _Side, data: bytes) -> None:
        if self.closed:
            return
        proxy = self.proxy
        mode = proxy._mode
        if mode == "blackhole":
            proxy.bytes_discarded += len(data)
            return
        if mode == "stall" or self.pending[side.is_client]:
            self.pending[side.is_client].append(data)
            self.update_reading()
            return
        self.forward(side, data)

    def forward(self, src: _Side, data: bytes) -> None:
        dst = self.peer(src)
        t = dst.transport
        if t is None or dst.lost or t.is_closing():
            return
        upstream = src.is_client
        if upstream and self.proxy._rewrites_up:
            data = self.proxy._rewritten(data, self.proxy._rewrites_up)
        elif not upstream and self.proxy._rewrites:
            data = self.proxy._rewritten(data, self.proxy._rewrites)
        if self.budget is not None and self.budget_dir in (
            "both",
            "upstream" if upstream else "downstream",
        ):
            if len(data) >= self.budget:
                part = data[: self.budget]
                self.budget = 0
                if part:
                    t.write(part)
                    self.proxy._count(upstream, len(part))
                # The n bytes still reach dst (graceful close flushes them); the
                # sending side is reset.
                self.close(abort=True, flush=dst)
                return
            self.budget -= len(data)
        t.write(data)
        self.proxy._count(upstream, len(data))

    def heal(self) -> None:
        """Flush what a stall held back and deliver closes that a fault swallowed."""
        if self.closed:
            return
        for side in (self.client, self.server):
            queued = self.pending[side.is_client]
            while queued and not self.closed:
                self.forward(side, queued.pop(0))
        if self.closed:
            return
        if self.client.lost or self.server.lost:
            self.close(abort=False)
            return
        for side in (self.client, self.server):
            if side.eof:
                self.forward_eof(side)
        self.update_reading()


class FaultProxy:
    """Loopback TCP proxy with switchable faults.

    Faults apply to every current connection and, until :meth:`heal`, to new ones
    too (except :meth:`cut`, which is a one-shot event). ``bytes_up``/``bytes_down``
    count bytes actually forwarded; ``bytes_discarded`` counts what a blackhole ate.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        connect_timeout: float = 10.0,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.connect_timeout = connect_timeout
        self._host = host
        self._requested_port = port
        self._port: int | None = None
        self._server: asyncio.Server | None = None
        self._pipes: set[_Pipe] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._mode: TrafficMode = "flow"
        self._refusing = False
        self._drop: tuple[int, Direction] | None = None
        self._rewrites: list[tuple[re.Pattern[bytes], bytes]] = []
        self._rewrites_up: list[tuple[re.Pattern[bytes], bytes]] = []
        self.bytes_up = 0
        self.bytes_down = 0
        self.bytes_discarded = 0
        self.connections = 0
        self.refused = 0

    # -- properties ---------------------------------------------------------------

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FaultProxy not started")
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` for ``slixmpp.ClientXMPP.connect``."""
        return (self._host, self.port)

    @property
    def active(self) -> int:
        """Client connections currently open."""
        return sum(1 for p in self._pipes if not p.client.lost)

    @property
    def mode(self) -> TrafficMode:
        return self._mode

    @property
    def refusing(self) -> bool:
        return self._refusing

    @property
    def _frozen(self) -> bool:
        return self._mode != "flow"

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Start listening (on a free port unless one was given)."""
        if self._server is not None:
            return
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._accept, self._host, self._requested_port, reuse_address=True
        )
        self._port = int(self._server.sockets[0].getsockname()[1])

    async def aclose(self) -> None:
        """Stop listening, reset every connection and wait for background tasks."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for pipe in list(self._pipes):
            pipe.close(abort=True)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        # Let transports run their connection_lost callbacks before the loop may close.
        for _ in range(3):
            await asyncio.sleep(0)
        self._pipes.clear()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _accept(self) -> asyncio.Protocol:
        self.connections += 1
        if self._refusing:
            self.refused += 1
            return _RefusingProtocol()
        pipe = _Pipe(self)
        if self._drop is not None:
            pipe.set_budget(*self._drop)
        self._pipes.add(pipe)
        task = asyncio.get_running_loop().create_task(pipe.connect_upstream())
        pipe.connect_task = task
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._task_done(t, pipe))
        return pipe.client

    def _task_done(self, task: asyncio.Task[None], pipe: _Pipe) -> None:
        self._tasks.discard(task)
        self._forget_if_done(pipe)

    def _forget_if_done(self, pipe: _Pipe) -> None:
        if pipe.done:
            self._pipes.discard(pipe)

    def _count(self, upstream: bool, n: int) -> None:
        if upstream:
            self.bytes_up += n
        else:
            self.bytes_down += n

    # -- faults -------------------------------------------------------------------

    def cut(self) -> None:
        """Reset every current connection (both ends); new connections still work."""
        for pipe in list(self._pipes):
            pipe.close(abort=True)

    def refuse(self, on: bool = True) -> None:
        """While on, new connections are accepted and reset at once (server "down")."""
        self._refusing = on

    def stall(self) -> None:
        """Stop forwarding both ways but keep sockets open; :meth:`heal` delivers the rest.

        Bytes wait in kernel buffers (reading is paused), so senders eventually block
        just as on a real hung link, and closes are not noticed until healed.
        """
        self._mode = "stall"
        self._apply()

    def blackhole(self) -> None:
        """Keep sockets open but silently discard everything, closes included.

        Discarded bytes are gone for good; after :meth:`heal` new bytes flow again and
        closes that happened meanwhile are propagated.
        """
        self._mode = "blackhole"
        self._apply()

    def drop_after(self, n_bytes: int, direction: Direction = "upstream") -> None:
        """Forward ``n_bytes`` more in ``direction``, then cut that connection.

        With ``"both"`` the budget is shared by the two directions. New connections get
        a fresh budget until :meth:`heal`.
        """
        if n_bytes < 0:
            raise ValueError("n_bytes must be >= 0")
        if direction not in ("upstream", "downstream", "both"):
            raise ValueError(f"invalid direction {direction!r}")
        self._drop = (n_bytes, direction)
        for pipe in self._pipes:
            pipe.set_budget(n_bytes, direction)

    def heal(self) -> None:
        """Back to normal: forward again, flush stalled bytes, stop refusing/dropping/rewriting."""
        self._mode = "flow"
        self._refusing = False
        self._drop = None
        self._rewrites.clear()
        self._rewrites_up.clear()
        for pipe in list(self._pipes):
            pipe.set_budget(None, "both")
            pipe.guard(pipe.heal)

    def _apply(self) -> None:
        for pipe in list(self._pipes):
            pipe.guard(pipe.update_reading)

    # -- a hostile server -------------------------------------------------------

    def inject(self, data: bytes, direction: Direction = "downstream") -> int:
        """Write ``data`` into every live connection as if one end had sent it.

        ``downstream`` bytes reach the client as if the server wrote them (a hostile
        or buggy server: a bogus ``<a h>``, a stray ``<resumed/>``); ``upstream`` bytes
        reach the server. The bytes bypass the current fault (a stall or blackhole
        does not hold them) and are not counted in ``bytes_up``/``bytes_down``, which
        count forwarded traffic only. Returns how many connections got them.
        """
        if direction not in ("upstream", "downstream", "both"):
            raise ValueError(f"invalid direction {direction!r}")
        written = 0
        for pipe in list(self._pipes):
            targets: list[_Side] = []
            if direction in ("downstream", "both"):
                targets.append(pipe.client)
            if direction in ("upstream", "both"):
                targets.append(pipe.server)
            hit = False
            for side in targets:
                t = side.transport
                if pipe.closed or t is None or side.lost or t.is_closing():
                    continue
                t.write(data)
                hit = True
            written += hit
        return written

    def rewrite(self, pattern: bytes, replacement: bytes, *, upstream: bool = False) -> None:
        """Rewrite what the server sends: ``re.sub(pattern, replacement)`` on each chunk.

        For tests of a server that answers wrongly (an ``<enabled max>`` that is not a
        number, a ``<resumed previd>`` for another stream) without patching the
        server. It works per chunk read from the socket, so a match split across two
        reads is missed; servers write each top-level element at once, which is
        what it is for. Rules add up, apply to current and new connections, and are
        dropped by :meth:`heal`. ``upstream=True`` rewrites what the client sends
        instead (a ``<resume previd>`` for a stream the server never had).
        """
        rules = self._rewrites_up if upstream else self._rewrites
        rules.append((re.compile(pattern), replacement))

    @staticmethod
    def _rewritten(data: bytes, rules: list[tuple[re.Pattern[bytes], bytes]]) -> bytes:
        for regex, replacement in rules:
            data = regex.sub(replacement, data)
        return data

    # -- waiting ------------------------------------------------------------------

    async def wait_until(
        self, predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition"
    ) -> None:
        """Poll ``predicate`` until true; TimeoutError names ``what`` otherwise."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"FaultProxy: timed out after {timeout:g}s waiting for {what}")
            await asyncio.sleep(0.01)

    async def wait_active(self, count: int, timeout: float = 10.0) -> None:
        """Wait until exactly ``count`` client connections are open."""
        await self.wait_until(lambda: self.active == count, timeout, f"active == {count}")

    async def wait_connections(self, total: int, timeout: float = 10.0) -> None:
        """Wait until at least ``total`` connections have been accepted in all."""
        await self.wait_until(lambda: self.connections >= total, timeout, f"connections >= {total}")

    def __repr__(self) -> str:
        where = f"{self._host}:{self._port}" if self._port is not None else "not started"
        return (
            f"<FaultProxy {where} -> {self.target_host}:{self.target_port} mode={self._mode}"
            f" refusing={self._refusing} active={self.active}>"
        )
