"""An isolated, throw-away Prosody 0.12 server for live tests, demos and benchmarks.

Each :class:`ProsodyServer` owns one directory (config, data, pidfile, logs) and one
free c2s port on 127.0.0.1, so several instances -- and a system Prosody installed by
the Debian package -- can run side by side without touching each other.

The class is deliberately independent of slixmpp and of any particular event loop: the
process is driven with :mod:`subprocess` and polled with ``asyncio.sleep``, so one
instance may be started from one loop (e.g. a session-scoped pytest fixture) and used
from others.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import Literal, NoReturn, Self

__all__ = [
    "LogLevel",
    "ProsodyError",
    "ProsodyServer",
    "ensure_prosody_installed",
    "installed_prosody_version",
]

LogLevel = Literal["debug", "info", "warn", "error"]

_HOST = "127.0.0.1"
_DEFAULT_PROSODY = "/usr/bin/prosody"
_DEFAULT_PROSODYCTL = "/usr/bin/prosodyctl"
_TAIL_CHARS = 4000

# Every instance that may own a live process; killed at interpreter exit so an aborted
# test run never leaves stray Prosody processes holding ports.
_LIVE: weakref.WeakSet[ProsodyServer] = weakref.WeakSet()


class ProsodyError(RuntimeError):
    """Prosody could not be installed, configured, started or driven."""


class _PortInUse(ProsodyError):
    """The c2s port was taken between picking it and Prosody binding it."""


def _find_binary(name: str, default: str) -> str:
    """Prefer the Debian location, fall back to PATH (e.g. a source install)."""
    if Path(default).exists():
        return default
    return shutil.which(name) or default


def installed_prosody_version() -> str | None:
    """Return the Debian package version of Prosody, or None if not installed.

    ``prosody --version`` is not a version query on 0.12 (it starts a server), so ask
    dpkg instead.
    """
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Status}\t${Version}", "prosody"],
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


def ensure_prosody_installed() -> Path:
    """Install Prosody from the distribution if it is missing; return the binary path.

    CI images may lack the package; installing it may also start a system instance on
    the standard ports, which is harmless because our instances use their own ports,
    pidfile and data directory.
    """
    existing = _find_binary("prosody", _DEFAULT_PROSODY)
    if Path(existing).exists():
        return Path(existing)
    if shutil.which("apt-get") is None:
        raise ProsodyError(
            "Prosody is not installed (no /usr/bin/prosody) and apt-get is unavailable; "
            "install Prosody 0.12 manually."
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "prosody"]):
        try:
            res = subprocess.run(
                cmd, capture_output=True, text=True, env=env, timeout=900, check=False
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise ProsodyError(f"Installing Prosody failed: {' '.join(cmd)}: {exc}") from exc
        if res.returncode != 0:
            output = (res.stdout + res.stderr)[-_TAIL_CHARS:]
            raise ProsodyError(
                f"Installing Prosody failed: `{' '.join(cmd)}` exited with "
                f"{res.returncode} (root needed?).\n{output}"
            )
    path = _find_binary("prosody", _DEFAULT_PROSODY)
    if not Path(path).exists():
        raise ProsodyError("apt-get reported success but no prosody binary was found")
    return Path(path)


# Ports already handed to an instance in this process, so two servers created back to
# back never get the same one even if the kernel offers it twice.
_HANDED_OUT: set[int] = set()


def _free_port(host: str) -> int:
    """Ask the kernel for an unused TCP port on ``host``."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def _lua_string(value: str) -> str:
    """Quote ``value`` as a Lua string literal (paths may contain anything)."""
    out = ['"']
    for ch in value:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\{ord(ch):03d}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _read_from(path: Path, offset: int) -> str:
    """Return the text of ``path`` after byte ``offset`` ('' if missing)."""
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


class ProsodyServer:
    """One isolated Prosody process bound to 127.0.0.1 with plain (non-TLS) c2s.

    Accounts use ``internal_plain`` storage under ``base_dir`` so they survive
    :meth:`restart`; MAM and MUC logs use memory storage so a restart also forgets
    archives, exactly like stream-management sessions.
    """

    def __init__(
        self,
        base_dir: Path,
        *,
        hibernation_time: int = 60,
        domain: str = "localhost",
        muc_domain: str = "conference.localhost",
        log_level: LogLevel = "info",
        c2s_port: int | None = None,
        smacks_max_queue_size: int = 500,
        extra_config: str = "",
        start_timeout: float = 15.0,
        prosody_bin: str | None = None,
        prosodyctl_bin: str | None = None,
    ) -> None:
        if hibernation_time < 0:
            raise ValueError("hibernation_time must be >= 0")
        if smacks_max_queue_size < 1:
            raise ValueError("smacks_max_queue_size must be >= 1")
        if log_level not in ("debug", "info", "warn", "error"):
            raise ValueError(f"invalid log_level {log_level!r}")
        self._base_dir = Path(base_dir).resolve()
        self._hibernation_time = hibernation_time
        self._domain = domain
        self._muc_domain = muc_domain
        self._log_level: LogLevel = log_level
        self._smacks_max_queue_size = smacks_max_queue_size
        self._extra_config = extra_config
        self._start_timeout = start_timeout
        self._prosody_bin = prosody_bin or _find_binary("prosody", _DEFAULT_PROSODY)
        self._prosodyctl_bin = prosodyctl_bin or _find_binary("prosodyctl", _DEFAULT_PROSODYCTL)
        self._c2s_port = c2s_port if c2s_port is not None else _free_port(self.host)
        # An automatically chosen port may be re-chosen until the first successful start;
        # after that it is fixed so restart() keeps the address clients know.
        self._port_fixed = c2s_port is not None
        self._proc: subprocess.Popen[bytes] | None = None
        self._base_dir.mkdir(parents=True, exist_ok=True)
        self.data_path.mkdir(exist_ok=True)
        # An empty certificate directory keeps certmanager from logging errors at
        # startup; no certificate is needed because c2s runs without TLS.
        self._certs_dir.mkdir(exist_ok=True)
        self._write_config()

    # -- paths and addresses ------------------------------------------------------

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    @property
    def config_path(self) -> Path:
        return self._base_dir / "prosody.cfg.lua"

    @property
    def data_path(self) -> Path:
        return self._base_dir / "data"

    @property
    def log_path(self) -> Path:
        return self._base_dir / "prosody.log"

    @property
    def stderr_path(self) -> Path:
        return self._base_dir / "prosody.stderr.log"

    @property
    def pidfile_path(self) -> Path:
        return self._base_dir / "prosody.pid"

    @property
    def _certs_dir(self) -> Path:
        return self._base_dir / "certs"

    @property
    def host(self) -> str:
        """Every listener is on loopback only."""
        return _HOST

    @property
    def c2s_port(self) -> int:
        return self._c2s_port

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` as accepted by ``slixmpp.ClientXMPP.connect``."""
        return (self.host, self._c2s_port)

    @property
    def domain(self) -> str:
        return self._domain

    @property
    def muc_domain(self) -> str:
        return self._muc_domain

    @property
    def hibernation_time(self) -> int:
        return self._hibernation_time

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def jid(self, user: str) -> str:
        """Bare JID of ``user`` on this server's domain."""
        return f"{user}@{self._domain}"

    # -- configuration ------------------------------------------------------------

    def _write_config(self) -> None:
        q = _lua_string
        lines = [
            "-- Generated by xmpp_sm_tracker.testing.prosody; rewritten on every start.",
            # The harness runs as root in CI; without this mod_posix refuses to start.
            "run_as_root = true",
            f"pidfile = {q(str(self.pidfile_path))}",
            f"data_path = {q(str(self.data_path))}",
            f"certificates = {q(str(self._certs_dir))}",
            "plugin_paths = {}",
            "admins = {}",
            # Only loopback listeners; the s2s module is disabled below so no s2s port
            # is opened at all, and nothing else (http, components) listens by default.
            f"interfaces = {{ {q(_HOST)} }}",
            f"local_interfaces = {{ {q(_HOST)} }}",
            f"c2s_ports = {{ {self._c2s_port} }}",
            "c2s_direct_tls_ports = {}",
            "legacy_ssl_ports = {}",
            "s2s_ports = {}",
            "s2s_direct_tls_ports = {}",
            "component_ports = {}",
            "http_ports = {}",
            "https_ports = {}",
            # No "tls" (no certificates) and no "limits" (nothing throttles benchmarks).
            "modules_enabled = {",
            '    "roster"; "saslauth"; "disco"; "carbons"; "mam"; "ping"; "smacks";',
            "}",
            'modules_disabled = { "s2s"; "s2s_auth_certs"; "dialback" }',
            "c2s_require_encryption = false",
            "s2s_require_encryption = false",
            "allow_unencrypted_plain_auth = true",
            'authentication = "internal_plain"',
            'default_storage = "internal"',
            'storage = { archive = "memory"; muc_log = "memory" }',
            f"smacks_hibernation_time = {self._hibernation_time}",
            f"smacks_max_queue_size = {self._smacks_max_queue_size}",
            f"log = {{ {self._log_level} = {q(str(self.log_path))} }}",
        ]
        if self._extra_config:
            lines += ["-- extra_config", self._extra_config]
        lines += [
            "",
            f"VirtualHost {q(self._domain)}",
            "",
            f"Component {q(self._muc_domain)} {q('muc')}",
            '    modules_enabled = { "muc_mam" }',
            # Rooms created by a join are usable at once (no owner configuration step).
            "    muc_room_locking = false",
            "",
        ]
        self.config_path.write_text("\n".join(lines), encoding="utf-8")

    # -- accounts -----------------------------------------------------------------

    def register(self, user: str, password: str, *, domain: str | None = None) -> None:
        """Create (or overwrite the password of) an account via ``prosodyctl``.

        Works whether or not the server runs: internal storage is read from disk on
        every login.
        """
        host = domain or self._domain
        cmd = [
            self._prosodyctl_bin,
            "--config",
            str(self.config_path),
            "register",
            user,
            host,
            password,
        ]
        try:
            res = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise ProsodyError(f"prosodyctl register {user}@{host} failed: {exc}") from exc
        if res.returncode != 0:
            raise ProsodyError(
                f"prosodyctl register {user}@{host} exited with {res.returncode}:\n"
                f"{(res.stdout + res.stderr)[-_TAIL_CHARS:]}"
            )

    # -- process control ----------------------------------------------------------

    async def start(self) -> None:
        """Start Prosody and wait until it accepts TCP connections on the c2s port."""
        if self.running:
            return
        for attempt in range(3):
            try:
                await self._start_once()
            except _PortInUse:
                if self._port_fixed or attempt == 2:
                    raise
                self._c2s_port = _free_port(self.host)
            else:
                self._port_fixed = True
                return

    async def _start_once(self) -> None:
        self._write_config()
        log_offset = _size(self.log_path)
        err_offset = _size(self.stderr_path)
        try:
            with self.stderr_path.open("ab") as err:
                self._proc = subprocess.Popen(
                    [self._prosody_bin, "--config", str(self.config_path), "-F"],
                    stdin=subprocess.DEVNULL,
                    stdout=err,
                    stderr=err,
                    cwd=self._base_dir,
                    # Own process group: a Ctrl-C aimed at pytest does not reach Prosody
                    # before our own orderly stop() does.
                    start_new_session=True,
                )
        except OSError as exc:
            raise ProsodyError(
                f"Cannot execute {self._prosody_bin!r}: {exc}. "
                "Call ensure_prosody_installed() first."
            ) from exc
        _LIVE.add(self)
        try:
            await self._wait_ready(log_offset, err_offset)
        except BaseException:
            self._kill_now()
            raise

    async def _wait_ready(self, log_offset: int, err_offset: int) -> None:
        proc = self._proc
        assert proc is not None
        # At debug/info level the log proves that *this* process owns the port rather
        # than some other process that happened to grab it meanwhile.
        marker = f"Activated service 'c2s' on [{self.host}]:{self._c2s_port}"
        need_marker = self._log_level in ("debug", "info")
        deadline = time.monotonic() + self._start_timeout
        last_error = "no connection attempt yet"
        while True:
            code = proc.poll()
            if code is not None:
                self._raise_start_error(f"exited with status {code}", log_offset, err_offset)
            new_log = _read_from(self.log_path, log_offset)
            if "Failed to open server port" in new_log:
                self._raise_start_error(
                    f"could not bind c2s port {self._c2s_port}",
                    log_offset,
                    err_offset,
                    error=_PortInUse,
                )
            if not need_marker or marker in new_log:
                try:
                    await self._probe()
                    return
                except OSError as exc:
                    last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                self._raise_start_error(
                    f"did not accept connections on {self.host}:{self._c2s_port} within "
                    f"{self._start_timeout:g}s (last error: {last_error})",
                    log_offset,
                    err_offset,
                )
            await asyncio.sleep(0.05)

    async def _probe(self) -> None:
        """One TCP connect to the c2s port; raises OSError if nothing listens."""
        async with asyncio.timeout(1.0):
            _reader, writer = await asyncio.open_connection(self.host, self._c2s_port)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()

    def _raise_start_error(
        self,
        what: str,
        log_offset: int,
        err_offset: int,
        error: type[ProsodyError] = ProsodyError,
    ) -> NoReturn:
        log_tail = _read_from(self.log_path, log_offset)[-_TAIL_CHARS:]
        err_tail = _read_from(self.stderr_path, err_offset)[-_TAIL_CHARS:]
        raise error(
            f"Prosody ({self.config_path}) {what}.\n"
            f"--- {self.log_path} (tail) ---\n{log_tail or '<empty>'}\n"
            f"--- stdout/stderr (tail) ---\n{err_tail or '<empty>'}"
        )

    async def stop(self, timeout: float = 10.0) -> None:
        """Graceful shutdown (SIGTERM); SIGKILL if Prosody has not exited in ``timeout``."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
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
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            while proc.poll() is None:
                await asyncio.sleep(0.01)
        self._proc = None
        _LIVE.discard(self)

    async def restart(self) -> None:
        """Stop and start again on the same port and data dir.

        Accounts persist (on disk); SM sessions, MAM archives and MUC state do not.
        """
        await self.stop()
        await self.start()

    def _kill_now(self) -> None:
        """Synchronous SIGKILL for error paths and interpreter exit."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                proc.kill()
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
        return f"<ProsodyServer {self._domain} {self.host}:{self._c2s_port} {state}>"


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_LIVE):
        server._kill_now()
