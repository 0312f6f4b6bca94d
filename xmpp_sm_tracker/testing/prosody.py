"""An isolated, throw-away Prosody 0.12 server for live tests, demos and benchmarks.

Each :class:`ProsodyServer` owns one directory (config, data, pidfile, logs) and one
free c2s port on 127.0.0.1, so several instances -- and a system Prosody installed by
the Debian package -- can run side by side without touching each other. What all test
servers share (ports, process, readiness, teardown) is in :mod:`.server`.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

from .server import (
    LocalXMPPServer,
    LogLevel,
    PortInUse,
    ServerError,
    apt_install,
    dpkg_version,
    run_tool,
)

__all__ = [
    "LogLevel",
    "ProsodyError",
    "ProsodyServer",
    "ensure_prosody_installed",
    "installed_prosody_version",
]

_HOST = "127.0.0.1"
_DEFAULT_PROSODY = "/usr/bin/prosody"
_DEFAULT_PROSODYCTL = "/usr/bin/prosodyctl"


class ProsodyError(ServerError):
    """Prosody could not be installed, configured, started or driven."""


class _PortInUse(ProsodyError, PortInUse):
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
    return dpkg_version("prosody")


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
    apt_install("prosody", ProsodyError)
    path = _find_binary("prosody", _DEFAULT_PROSODY)
    if not Path(path).exists():
        raise ProsodyError("apt-get reported success but no prosody binary was found")
    return Path(path)


_PLAIN_NAME = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")


def _lua_path(host: str) -> str:
    """A host as Prosody's internal storage names its directory: every character but
    letters and digits escaped (``%W`` in its datamanager), so ``.`` is ``%2e``."""
    return "".join(ch if ch.isalnum() else f"%{ord(ch):02x}" for ch in host)


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


class ProsodyServer(LocalXMPPServer):
    """One isolated Prosody process bound to 127.0.0.1 with plain (non-TLS) c2s.

    Accounts use ``internal_plain`` storage under ``base_dir`` so they survive
    :meth:`restart`; MAM and MUC logs use memory storage so a restart also forgets
    archives, exactly like stream-management sessions.
    """

    kind: ClassVar[str] = "prosody"
    error: ClassVar[type[ServerError]] = ProsodyError
    port_error: ClassVar[type[PortInUse]] = _PortInUse

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
        if smacks_max_queue_size < 1:
            raise ValueError("smacks_max_queue_size must be >= 1")
        super().__init__(
            base_dir,
            hibernation_time=hibernation_time,
            domain=domain,
            muc_domain=muc_domain,
            log_level=log_level,
            c2s_port=c2s_port,
            start_timeout=start_timeout,
        )
        self._smacks_max_queue_size = smacks_max_queue_size
        self._extra_config = extra_config
        self._prosody_bin = prosody_bin or _find_binary("prosody", _DEFAULT_PROSODY)
        self._prosodyctl_bin = prosodyctl_bin or _find_binary("prosodyctl", _DEFAULT_PROSODYCTL)
        self.data_path.mkdir(exist_ok=True)
        # An empty certificate directory keeps certmanager from logging errors at
        # startup; no certificate is needed because c2s runs without TLS.
        self._certs_dir.mkdir(exist_ok=True)
        self._write_config()

    # -- paths ----------------------------------------------------------------------

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
    def pidfile_path(self) -> Path:
        return self._base_dir / "prosody.pid"

    @property
    def _certs_dir(self) -> Path:
        return self._base_dir / "certs"

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

    def _command(self) -> tuple[list[str], dict[str, str] | None]:
        return [self._prosody_bin, "--config", str(self.config_path), "-F"], None

    def _ready_marker(self) -> str | None:
        # At debug/info level the log proves that *this* process owns the port rather
        # than some other process that happened to grab it meanwhile.
        if self._log_level not in ("debug", "info"):
            return None
        return f"Activated service 'c2s' on [{self.host}]:{self._c2s_port}"

    def _port_taken(self, new_log: str, new_stderr: str) -> bool:
        return "Failed to open server port" in new_log

    # -- accounts -----------------------------------------------------------------

    def register(self, user: str, password: str, *, domain: str | None = None) -> None:
        """Create (or overwrite the password of) an account via ``prosodyctl``.

        Works whether or not the server runs: internal storage is read from disk on
        every login.
        """
        host = domain or self._domain
        cmd = [self._prosodyctl_bin, "--config", str(self.config_path)]
        run_tool(
            [*cmd, "register", user, host, password],
            f"prosodyctl register {user}@{host}",
            ProsodyError,
        )

    def register_many(self, users: Iterable[str], password: str) -> None:
        """Create many accounts at once (a fleet): written straight into the internal
        store, as ``prosodyctl register`` would, without a process per account.

        Names are limited to lowercase letters and digits (Prosody escapes every other
        character in file names). Works whether or not the server runs.
        """
        accounts = self.data_path / _lua_path(self._domain) / "accounts"
        accounts.mkdir(parents=True, exist_ok=True)
        entry = f'return {{\n\t["password"] = {_lua_string(password)};\n}};\n'
        for user in users:
            if not user or not set(user) <= _PLAIN_NAME:
                raise ValueError(f"register_many takes plain user names, not {user!r}")
            (accounts / f"{user}.dat").write_text(entry, encoding="utf-8")
