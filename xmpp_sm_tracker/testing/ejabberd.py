"""An isolated, throw-away ejabberd 23.01 server for live tests, beside the Prosody one.

Each :class:`EjabberdServer` owns one directory -- its configuration (``etc/``), its
Mnesia spool (``spool/``), its logs (``logs/``), its Erlang cookie -- one Erlang node
name, one free c2s port and one free distribution port, all on 127.0.0.1, so several
instances and a system ejabberd can run side by side without touching each other.

How it runs, and why (Debian's ejabberd 23.01, checked as root in a sandbox):

- ``ejabberdctl`` does the work, with ``--config-dir``, ``--spool``, ``--logs`` and
  ``--node`` pointing into the instance's directory. Run as root it would re-run
  itself through ``su ejabberd``, which cannot enter a root-private test directory
  (pytest's ``/tmp/pytest-of-root`` is 0700): the instance's ``ejabberdctl.cfg``
  (sourced by ``ejabberdctl``) sets ``EXEC_CMD=as_current_user`` so it runs as the
  user that calls it. ``HOME`` is the instance's directory, so the server and every
  ``ejabberdctl`` command share the instance's own cookie.
- No epmd: ``ERL_DIST_PORT`` gives the node a fixed distribution port (picked free,
  bound to 127.0.0.1 by ``inet_dist_use_interface``) and ``ejabberdctl`` talks to it
  there. Nothing else listens: no s2s, no http, no epmd.
- The archive (``mod_mam``) and offline messages are kept in RAM (``ram_copies``):
  on disk (``disc_only_copies``, the default) every insert reads the user's whole
  archive, which makes long runs quadratic. A Mnesia ``ejabberd.schema`` in the spool
  says so, but ejabberd 23.01 applies it only to tables that already exist; on the
  first start of a fresh spool the tables are converted once through the node.
- Accounts are made with ``ejabberdctl register`` (``change_password`` when the
  account exists), which needs the node running: :meth:`EjabberdServer.register`
  before :meth:`~EjabberdServer.start` is remembered and done by the start.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from .server import (
    HOST,
    LocalXMPPServer,
    LogLevel,
    PortInUse,
    ServerError,
    apt_install,
    dpkg_version,
    free_port,
    run_tool,
)

__all__ = [
    "EjabberdError",
    "EjabberdServer",
    "ensure_ejabberd_installed",
    "installed_ejabberd_version",
]

_DEFAULT_EJABBERDCTL = "/usr/sbin/ejabberdctl"
#: Tables kept in RAM: MAM (1:1 and rooms) and offline messages.
_RAM_TABLES = ("archive_msg", "archive_prefs", "offline_msg")
_LOG_LEVELS: Mapping[str, str] = {
    "debug": "debug",
    "info": "info",
    "warn": "warning",
    "error": "error",
}
# Inherited variables that ejabberdctl or erl would pick up instead of ours.
_FOREIGN_ENV = ("EJABBERD", "ERL_", "ERLANG_", "MNESIA_", "CONTRIB_MODULES")
_FOREIGN_NAMES = {"CONFIG_DIR", "SPOOL_DIR", "LOGS_DIR", "VMARGS", "INET_DIST_INTERFACE"}


class EjabberdError(ServerError):
    """ejabberd could not be installed, configured, started or driven."""


class _PortInUse(EjabberdError, PortInUse):
    """The c2s or distribution port was taken before ejabberd bound it."""


def installed_ejabberd_version() -> str | None:
    """Return the Debian package version of ejabberd, or None if not installed."""
    return dpkg_version("ejabberd")


def _system_instance_running() -> bool:
    """Whether a beam runs the Debian package's own node (``ejabberd@localhost``)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"beam" in a for a in argv[:1]) and b"ejabberd@localhost" in argv:
            return True
    return False


def _stop_system_instance() -> None:
    """Stop (and otherwise leave alone) an ejabberd the package started."""
    if not _system_instance_running():
        return
    if shutil.which("systemctl") is not None:
        subprocess.run(["systemctl", "stop", "ejabberd"], capture_output=True, check=False)
    if _system_instance_running():
        subprocess.run([_DEFAULT_EJABBERDCTL, "stop"], capture_output=True, check=False)


def ensure_ejabberd_installed() -> Path:
    """Install ejabberd from the distribution if it is missing; return ``ejabberdctl``.

    The package starts a system instance on the standard ports (on all interfaces);
    a temporary ``policy-rc.d`` keeps it from starting, and one that starts anyway is
    stopped (not removed or disabled): the test instances need nothing from it.
    """
    existing = shutil.which("ejabberdctl") or _DEFAULT_EJABBERDCTL
    if Path(existing).exists():
        return Path(existing)
    if shutil.which("apt-get") is None:
        raise EjabberdError(
            "ejabberd is not installed (no /usr/sbin/ejabberdctl) and apt-get is "
            "unavailable; install ejabberd 23.01 manually."
        )
    apt_install("ejabberd", EjabberdError, no_services=True)
    _stop_system_instance()
    if not Path(_DEFAULT_EJABBERDCTL).exists():
        raise EjabberdError("apt-get reported success but no ejabberdctl was found")
    return Path(_DEFAULT_EJABBERDCTL)


def _yaml(value: Any, indent: int = 0) -> list[str]:
    """Block YAML for a mapping of plain keys; strings double-quoted (JSON escapes)."""
    pad = " " * indent
    lines: list[str] = []
    for key, item in value.items():
        if isinstance(item, Mapping) and item:
            lines.append(f"{pad}{key}:")
            lines += _yaml(item, indent + 2)
        elif isinstance(item, list) and item and isinstance(item[0], Mapping):
            lines.append(f"{pad}{key}:")
            for entry in item:
                first, *rest = _yaml(entry, indent + 4)
                lines.append(f"{pad}  - {first.lstrip()}")
                lines += rest
        else:
            lines.append(f"{pad}{key}: {_scalar(item)}")
    return lines


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, Mapping) and not value:
        return "{}"
    raise TypeError(f"no YAML for {value!r}")


class EjabberdServer(LocalXMPPServer):
    """One isolated ejabberd node bound to 127.0.0.1 with plain (non-TLS) c2s.

    Accounts are on disk (Mnesia) and survive :meth:`restart`; stream management
    sessions, archives, offline messages and rooms are in RAM and do not.
    ``hibernation_time`` is ``mod_stream_mgmt``'s ``resume_timeout`` (and the most a
    client may ask for with ``<enable max>``); ``max_ack_queue`` is its queue limit.
    ``modules`` adds or overrides module options, e.g. ``{"mod_muc": {...}}``.
    """

    kind: ClassVar[str] = "ejabberd"
    error: ClassVar[type[ServerError]] = EjabberdError
    port_error: ClassVar[type[PortInUse]] = _PortInUse

    def __init__(
        self,
        base_dir: Path,
        *,
        hibernation_time: int = 60,
        domain: str = "localhost",
        muc_domain: str | None = None,
        log_level: LogLevel = "info",
        c2s_port: int | None = None,
        max_ack_queue: int = 5000,
        modules: Mapping[str, Mapping[str, Any]] | None = None,
        start_timeout: float = 30.0,
        ejabberdctl_bin: str | None = None,
    ) -> None:
        if max_ack_queue < 1:
            raise ValueError("max_ack_queue must be >= 1")
        super().__init__(
            base_dir,
            hibernation_time=hibernation_time,
            domain=domain,
            muc_domain=muc_domain,
            log_level=log_level,
            c2s_port=c2s_port,
            start_timeout=start_timeout,
        )
        self._max_ack_queue = max_ack_queue
        self._modules = {k: dict(v) for k, v in (modules or {}).items()}
        self._ctl = ejabberdctl_bin or shutil.which("ejabberdctl") or _DEFAULT_EJABBERDCTL
        self._erl = shutil.which("erl") or "/usr/bin/erl"
        self._dist_port = free_port(HOST)
        self._node = f"ejabberd-{secrets.token_hex(4)}@{HOST}"
        self._beam: int | None = None
        self._pending_accounts: dict[tuple[str, str], str] = {}
        for path in (self.config_dir, self.spool_path, self.logs_path):
            path.mkdir(exist_ok=True)
        cookie = self._base_dir / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(16).upper())
            cookie.chmod(0o400)
        self._write_config()

    # -- paths and names ------------------------------------------------------------

    @property
    def config_dir(self) -> Path:
        return self._base_dir / "etc"

    @property
    def config_path(self) -> Path:
        return self.config_dir / "ejabberd.yml"

    @property
    def spool_path(self) -> Path:
        """The Mnesia directory: accounts, rosters, room configurations."""
        return self._base_dir / "spool"

    @property
    def logs_path(self) -> Path:
        return self._base_dir / "logs"

    @property
    def log_path(self) -> Path:
        return self.logs_path / "ejabberd.log"

    @property
    def node(self) -> str:
        """The Erlang node name (``ejabberd-<random>@127.0.0.1``)."""
        return self._node

    @property
    def dist_port(self) -> int:
        """The Erlang distribution port (127.0.0.1), which ``ejabberdctl`` talks to."""
        return self._dist_port

    @property
    def listen_ports(self) -> set[int]:
        return {self._c2s_port, self._dist_port}

    @property
    def pid(self) -> int | None:
        """The Erlang VM (``beam.smp``), not the ``ejabberdctl`` shell above it."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return None
        if self._beam is None:
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
            with contextlib.suppress(OSError, ValueError):
                found = children.read_text().split()
                self._beam = int(found[0]) if found else None
        return self._beam

    # -- configuration ------------------------------------------------------------

    def _write_config(self) -> None:
        hibernation = self._hibernation_time
        modules: dict[str, dict[str, Any]] = {
            "mod_roster": {},
            "mod_disco": {},
            "mod_offline": {},
            "mod_carboncopy": {},
            "mod_ping": {},
            # ejabberdctl's change_password (and other account commands).
            "mod_admin_extra": {},
            "mod_stream_mgmt": {
                "resume_timeout": hibernation,
                "max_resume_timeout": hibernation,
                "max_ack_queue": self._max_ack_queue,
            },
            # Archive everything, like Prosody's mod_mam by default.
            "mod_mam": {"default": "always"},
            # Rooms created by a join are usable at once (ejabberd does not lock them)
            # and archived, like Prosody's muc_mam.
            "mod_muc": {
                "host": self._muc_domain,
                "history_size": 20,
                "default_room_options": {"mam": True},
            },
        }
        for name, options in self._modules.items():
            modules[name] = {**modules.get(name, {}), **options}
        config: dict[str, Any] = {
            "hosts": [self._domain],
            "loglevel": _LOG_LEVELS[self._log_level],
            "listen": [
                {
                    "port": self._c2s_port,
                    "ip": HOST,
                    "module": "ejabberd_c2s",
                    # No TLS (no certificate): plain c2s, as in the Prosody harness.
                    "starttls": False,
                    "max_stanza_size": 262144,
                    "backlog": 128,
                }
            ],
            # No s2s: a message to another domain bounces at once.
            "s2s_access": "none",
            "auth_method": ["internal"],
            "auth_password_format": "plain",
            "modules": modules,
        }
        header = "# Generated by xmpp_sm_tracker.testing.ejabberd; rewritten on every start."
        self.config_path.write_text("\n".join([header, *_yaml(config), ""]), encoding="utf-8")
        schema = {table: {"storage_type": "ram_copies"} for table in _RAM_TABLES}
        (self.spool_path / "ejabberd.schema").write_text("\n".join([*_yaml(schema), ""]))
        ctl = [
            "# Generated by xmpp_sm_tracker.testing.ejabberd; sourced by ejabberdctl.",
            # As root, ejabberdctl would run erl through `su ejabberd`, which cannot
            # reach this directory: run as the caller instead.
            "EXEC_CMD=as_current_user",
            f"ERLANG_NODE={self._node}",
            # A fixed distribution port and no epmd at all.
            f"ERL_DIST_PORT={self._dist_port}",
            f"ERL_EPMD_ADDRESS={HOST}",
            # No crash dumps; no busy-waiting schedulers on a shared machine.
            'ERL_OPTIONS="-env ERL_CRASH_DUMP_BYTES 0 +sbwt none +sbwtdcpu none +sbwtdio none"',
            f"EJABBERD_PID_PATH={self._base_dir / 'ejabberd.pid'}",
            "",
        ]
        (self.config_dir / "ejabberdctl.cfg").write_text("\n".join(ctl))
        (self.config_dir / "vm.args").write_text("-kernel inet_dist_use_interface {127,0,0,1}\n")
        (self.config_dir / "inetrc").write_text(
            '{lookup,["file","native"]}.\n{host,{127,0,0,1},["localhost"]}.\n'
        )

    def _env(self) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(_FOREIGN_ENV) and key not in _FOREIGN_NAMES
        }
        env["HOME"] = str(self._base_dir)
        return env

    def _ctl_argv(self, *args: str) -> list[str]:
        return [
            self._ctl,
            "--config-dir",
            str(self.config_dir),
            "--spool",
            str(self.spool_path),
            "--logs",
            str(self.logs_path),
            "--node",
            self._node,
            *args,
        ]

    def _command(self) -> tuple[list[str], dict[str, str] | None]:
        if os.geteuid() != 0 and _user_name() != "ejabberd":
            raise EjabberdError("ejabberdctl runs only as root or as the user ejabberd")
        self._beam = None
        return self._ctl_argv("foreground-quiet"), self._env()

    def _ready_marker(self) -> str | None:
        return f"is started in the node '{self._node}'"

    def _port_taken(self, new_log: str, new_stderr: str) -> bool:
        # c2s: "Failed to start listener ... eaddrinuse"; distribution: "could not
        # start distribution" / "Protocol 'inet_tcp': the name ... seems to be in use".
        return "eaddrinuse" in new_log or "eaddrinuse" in new_stderr

    def _pick_new_ports(self) -> None:
        super()._pick_new_ports()
        self._dist_port = free_port(HOST)

    async def _after_start(self) -> None:
        pending, self._pending_accounts = self._pending_accounts, {}
        for (user, host), password in pending.items():
            self._register_now(user, host, password)
        fresh = not self._ram_marker.exists()
        if fresh or pending:
            self._settle_tables(to_ram=fresh)
        if fresh:
            self._ram_marker.touch()

    @property
    def _ram_marker(self) -> Path:
        return self.spool_path / ".ram-tables"

    def _settle_tables(self, *, to_ram: bool) -> None:
        """Through the node: the archive tables to RAM (``to_ram``), then the
        transaction log dumped into the tables.

        Mnesia keeps a committed write in its log, buffered, until it dumps the log
        into the table files (every few minutes), and the accounts' table file (dets)
        delays its own writes by seconds: a SIGKILL (``kill()``, a hard restart) soon
        after would lose the accounts just made. Dumped and synced, they survive.
        """
        node = f"'{self._node}'"
        tables = ", ".join(_RAM_TABLES) if to_ram else ""
        code = (
            f"R = [{{T, rpc:call({node}, mnesia, change_table_copy_type, "
            f"[T, {node}, ram_copies])}} || T <- [{tables}]], "
            f"D = rpc:call({node}, mnesia, dump_log, []), "
            f"S = [rpc:call({node}, dets, sync, [passwd])], "
            'io:format("~p~n", [{D, S, R}]), '
            "Ok = fun({_, {atomic, ok}}) -> true; "
            "({_, {aborted, {already_exists, _, _, _}}}) -> true; (_) -> false end, "
            "halt(case {D, S} =:= {dumped, [ok]} andalso lists:all(Ok, R) of "
            "true -> 0; false -> 1 end)."
        )
        argv = [
            self._erl,
            "-name",
            f"setup-{secrets.token_hex(3)}@{HOST}",
            "-hidden",
            "-noshell",
            "-noinput",
            "-start_epmd",
            "false",
            "-erl_epmd_port",
            str(self._dist_port),
            "-dist_listen",
            "false",
            "-eval",
            code,
        ]
        run_tool(argv, "settling ejabberd's tables", EjabberdError, self._env())

    # -- accounts -----------------------------------------------------------------

    def register(self, user: str, password: str, *, domain: str | None = None) -> None:
        """Create (or set the password of) an account with ``ejabberdctl register``.

        ``ejabberdctl`` needs the node: while the server is stopped the account is
        remembered and made by the next :meth:`start`.
        """
        host = domain or self._domain
        if not self.running:
            self._pending_accounts[(user, host)] = password
            return
        self._register_now(user, host, password)
        self._settle_tables(to_ram=False)

    def _register_now(self, user: str, host: str, password: str) -> None:
        try:
            self.ctl("register", user, host, password)
        except EjabberdError as exc:
            if "already registered" not in str(exc):
                raise
            self.ctl("change_password", user, host, password)

    def ctl(self, *args: str) -> str:
        """Run an ``ejabberdctl`` command against this (running) node; its output."""
        what = f"ejabberdctl {' '.join(args[:3])}"
        return run_tool(self._ctl_argv(*args), what, EjabberdError, self._env())

    def _terminate(self) -> None:
        beam = self.pid
        proc = self._proc
        if beam is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(beam, signal.SIGTERM)
        elif proc is not None:  # the VM is not up yet: the whole group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)


def _user_name() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name
