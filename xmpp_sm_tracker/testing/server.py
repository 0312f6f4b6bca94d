"""What every throw-away test server of the kit shares: ports, process, readiness, teardown.

:class:`LocalXMPPServer` is the base of :class:`~.prosody.ProsodyServer` and
:class:`~.ejabberd.EjabberdServer`. One instance owns one directory and one free c2s
port on 127.0.0.1; its process runs in its own session (a Ctrl-C aimed at pytest
reaches it only through our orderly :meth:`~LocalXMPPServer.stop`), is polled with
``asyncio.sleep`` (so an instance started from one event loop may be used from
others) and is killed at interpreter exit if a run was aborted.

The subclasses say how to write their configuration, which command starts the server,
which log line proves that *this* process owns the port, and how accounts are made.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import signal
import socket
import subprocess
import time
import weakref
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Literal, NoReturn, Self

__all__ = [
    "HOST",
    "LocalXMPPServer",
    "LogLevel",
    "PortInUse",
    "ServerError",
    "apt_install",
    "dpkg_version",
    "file_size",
    "free_port",
    "read_from",
    "run_tool",
]

LogLevel = Literal["debug", "info", "warn", "error"]

#: Every listener of every test server is on loopback only.
HOST = "127.0.0.1"
TAIL_CHARS = 4000

# Every instance that may own a live process; killed at interpreter exit so an aborted
# test run never leaves stray servers holding ports.
_LIVE: weakref.WeakSet[LocalXMPPServer] = weakref.WeakSet()

# Ports already handed to an instance in this process, so two servers created back to
# back never get the same one even if the kernel offers it twice.
_HANDED_OUT: set[int] = set()


class ServerError(RuntimeError):
    """A test server could not be installed, configured, started or driven."""


class PortInUse(ServerError):
    """A port was taken between picking it and the server binding it."""


def free_port(host: str = HOST) -> int:
    """Ask the kernel for an unused TCP port on ``host`` (never the same one twice)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def read_from(path: Path, offset: int) -> str:
    """Return the text of ``path`` after byte ``offset`` ('' if missing)."""
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def run_tool(
    cmd: list[str], what: str, error: type[ServerError], env: dict[str, str] | None = None
) -> str:
    """Run a command line tool; its output, or ``error`` with the output's tail."""
    try:
        res = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise error(f"{what} failed: {exc}") from exc
    output: str = res.stdout + res.stderr
    if res.returncode != 0:
        raise error(f"{what} exited with {res.returncode}:\n{output[-TAIL_CHARS:]}")
    return output


def dpkg_version(package: str) -> str | None:
    """The installed Debian package version of ``package``, or None if not installed."""
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Status}\t${Version}", package],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    status, _, version = out.stdout.partition("\t")
    if out.returncode != 0 or "installed" not in status.split() or not version:
        return None
    return version


_POLICY_RC_D = Path("/usr/sbin/policy-rc.d")


def apt_install(package: str, error: type[ServerError], *, no_services: bool = False) -> None:
    """``apt-get update`` and ``apt-get install -y package`` (root needed).

    ``no_services``: a temporary ``policy-rc.d`` keeps the system service the package
    brings from starting (on all interfaces, on the standard ports) while it installs.
    """
    guard = no_services and not _POLICY_RC_D.exists()
    if guard:
        _POLICY_RC_D.write_text("#!/bin/sh\n# xmpp_sm_tracker: no service starts\nexit 101\n")
        _POLICY_RC_D.chmod(0o755)
    try:
        _apt_get(package, error)
    finally:
        if guard:
            _POLICY_RC_D.unlink(missing_ok=True)


def _apt_get(package: str, error: type[ServerError]) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", package]):
        try:
            res = subprocess.run(
                cmd, capture_output=True, text=True, env=env, timeout=900, check=False
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise error(f"Installing {package} failed: {' '.join(cmd)}: {exc}") from exc
        if res.returncode != 0:
            output = (res.stdout + res.stderr)[-TAIL_CHARS:]
            raise error(
                f"Installing {package} failed: `{' '.join(cmd)}` exited with "
                f"{res.returncode} (root needed?).\n{output}"
            )


class LocalXMPPServer(ABC):
    """One isolated XMPP server process bound to 127.0.0.1 with plain (non-TLS) c2s.

    Accounts are kept on disk under ``base_dir`` and survive :meth:`restart`; stream
    management sessions, archives and rooms are in memory and do not.
    """

    #: ``"prosody"`` or ``"ejabberd"``: what the test kit's ``--server`` option names.
    kind: ClassVar[str]
    #: The exception this server raises (a :class:`ServerError`).
    error: ClassVar[type[ServerError]] = ServerError
    #: What it raises when its port was taken (a :class:`PortInUse` and an ``error``).
    port_error: ClassVar[type[PortInUse]] = PortInUse

    def __init__(
        self,
        base_dir: Path,
        *,
        hibernation_time: int = 60,
        domain: str = "localhost",
        muc_domain: str | None = None,
        log_level: LogLevel = "info",
        c2s_port: int | None = None,
        start_timeout: float = 15.0,
    ) -> None:
        if hibernation_time < 0:
            raise ValueError("hibernation_time must be >= 0")
        if log_level not in ("debug", "info", "warn", "error"):
            raise ValueError(f"invalid log_level {log_level!r}")
        self._base_dir = Path(base_dir).resolve()
        self._hibernation_time = hibernation_time
        self._domain = domain
        self._muc_domain = muc_domain or f"conference.{domain}"
        self._log_level: LogLevel = log_level
        self._start_timeout = start_timeout
        self._c2s_port = c2s_port if c2s_port is not None else free_port(HOST)
        # An automatically chosen port may be re-chosen until the first successful start;
        # after that it is fixed so restart() keeps the address clients know.
        self._port_fixed = c2s_port is not None
        self._proc: subprocess.Popen[bytes] | None = None
        self._base_dir.mkdir(parents=True, exist_ok=True)

    # -- paths and addresses ------------------------------------------------------

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    @property
    @abstractmethod
    def config_path(self) -> Path:
        """The server's main configuration file (rewritten on every start)."""

    @property
    @abstractmethod
    def log_path(self) -> Path:
        """The server's main log."""

    @property
    def stderr_path(self) -> Path:
        return self._base_dir / f"{self.kind}.stderr.log"

    @property
    def host(self) -> str:
        """Every listener is on loopback only."""
        return HOST

    @property
    def c2s_port(self) -> int:
        return self._c2s_port

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` as accepted by ``slixmpp.ClientXMPP.connect``."""
        return (HOST, self._c2s_port)

    @property
    def listen_ports(self) -> set[int]:
        """Every port the server listens on (all on 127.0.0.1, nothing else)."""
        return {self._c2s_port}

    @property
    def domain(self) -> str:
        return self._domain

    @property
    def muc_domain(self) -> str:
        return self._muc_domain

    @property
    def hibernation_time(self) -> int:
        """Seconds a dropped stream stays resumable."""
        return self._hibernation_time

    @property
    def pid(self) -> int | None:
        """The server's own process (the one that owns its sockets)."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def jid(self, user: str) -> str:
        """Bare JID of ``user`` on this server's domain."""
        return f"{user}@{self._domain}"

    # -- what a server type says ----------------------------------------------------

    @abstractmethod
    def register(self, user: str, password: str, *, domain: str | None = None) -> None:
        """Create an account, or set the password of an existing one."""

    @abstractmethod
    def _write_config(self) -> None:
        """Write the configuration for the current ports."""

    @abstractmethod
    def _command(self) -> tuple[list[str], dict[str, str] | None]:
        """The command line that runs the server in the foreground, and its environment."""

    @abstractmethod
    def _ready_marker(self) -> str | None:
        """A log line that proves this process is up (None: the TCP probe is enough)."""

    @abstractmethod
    def _port_taken(self, new_log: str, new_stderr: str) -> bool:
        """Whether the output since the start says a port could not be bound."""

    async def _after_start(self) -> None:  # noqa: B027 (a hook, empty by default)
        """Work once the server accepts connections, before start() returns."""

    # -- process control ----------------------------------------------------------

    async def start(self) -> None:
        """Start the server and wait until it accepts TCP connections on the c2s port."""
        if self.running:
            return
        for attempt in range(3):
            try:
                await self._start_once()
            except PortInUse:
                if self._port_fixed or attempt == 2:
                    raise
                self._pick_new_ports()
            else:
                self._port_fixed = True
                return

    def _pick_new_ports(self) -> None:
        """After a port was taken: new ports (only until the first successful start)."""
        self._c2s_port = free_port(HOST)

    async def _start_once(self) -> None:
        self._write_config()
        log_offset = file_size(self.log_path)
        err_offset = file_size(self.stderr_path)
        argv, env = self._command()
        try:
            with self.stderr_path.open("ab") as err:
                self._proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=err,
                    stderr=err,
                    cwd=self._base_dir,
                    env=env,
                    # Own process group: a Ctrl-C aimed at pytest does not reach the
                    # server before our own orderly stop() does.
                    start_new_session=True,
                )
        except OSError as exc:
            raise self.error(
                f"Cannot execute {argv[0]!r}: {exc}. Install {self.kind} first "
                f"(xmpp_sm_tracker.testing.ensure_server_installed({self.kind!r}))."
            ) from exc
        _LIVE.add(self)
        try:
            await self._wait_ready(log_offset, err_offset)
            await self._after_start()
        except BaseException:
            self._kill_now()
            raise

    async def _wait_ready(self, log_offset: int, err_offset: int) -> None:
        proc = self._proc
        assert proc is not None
        marker = self._ready_marker()
        deadline = time.monotonic() + self._start_timeout
        last_error = "no connection attempt yet"
        while True:
            code = proc.poll()
            new_log = read_from(self.log_path, log_offset)
            if self._port_taken(new_log, read_from(self.stderr_path, err_offset)):
                self._raise_start_error(
                    f"could not bind c2s port {self._c2s_port}",
                    log_offset,
                    err_offset,
                    error=self.port_error,
                )
            if code is not None:
                self._raise_start_error(f"exited with status {code}", log_offset, err_offset)
            if marker is None or marker in new_log:
                try:
                    await self._probe()
                    return
                except OSError as exc:
                    last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                self._raise_start_error(
                    f"did not accept connections on {HOST}:{self._c2s_port} within "
                    f"{self._start_timeout:g}s (last error: {last_error})",
                    log_offset,
                    err_offset,
                )
            await asyncio.sleep(0.05)

    async def _probe(self) -> None:
        """One TCP connect to the c2s port; raises OSError if nothing listens."""
        async with asyncio.timeout(1.0):
            _reader, writer = await asyncio.open_connection(HOST, self._c2s_port)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()

    def _raise_start_error(
        self,
        what: str,
        log_offset: int,
        err_offset: int,
        error: type[ServerError] | None = None,
    ) -> NoReturn:
        log_tail = read_from(self.log_path, log_offset)[-TAIL_CHARS:]
        err_tail = read_from(self.stderr_path, err_offset)[-TAIL_CHARS:]
        message = (
            f"{self.kind} ({self.config_path}) {what}.\n"
            f"--- {self.log_path} (tail) ---\n{log_tail or '<empty>'}\n"
            f"--- stdout/stderr (tail) ---\n{err_tail or '<empty>'}"
        )
        raise (error or self.error)(message)

    def _terminate(self) -> None:
        """Ask the server to shut down gracefully (SIGTERM to its own process)."""
        pid = self.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    async def stop(self, timeout: float = 10.0) -> None:
        """Graceful shutdown (SIGTERM); SIGKILL if it has not exited in ``timeout``."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            self._terminate()
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        await self._reap(proc)

    async def kill(self) -> None:
        """Abrupt death (SIGKILL): no stream close, no chance to flush anything."""
        proc = self._proc
        if proc is None:
            return
        await self._reap(proc)

    async def _reap(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            _kill_group(proc)
            while proc.poll() is None:
                await asyncio.sleep(0.01)
        self._proc = None
        _LIVE.discard(self)

    async def restart(self) -> None:
        """Stop and start again on the same port and data directory.

        Accounts persist (on disk); SM sessions, archives and rooms do not.
        """
        await self.stop()
        await self.start()

    def _kill_now(self) -> None:
        """Synchronous SIGKILL for error paths and interpreter exit."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                _kill_group(proc)
                proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self._proc = None
        _LIVE.discard(self)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"<{type(self).__name__} {self._domain} {HOST}:{self._c2s_port} {state}>"


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process and everything it started (its own session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_LIVE):
        server._kill_now()
