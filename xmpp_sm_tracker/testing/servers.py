"""The test servers by name: ``"prosody"`` (0.12) and ``"ejabberd"`` (23.01).

What the test kit's ``--server`` option, the chaos run and your own fixtures use to
get "a server of this kind" without caring which::

    server = make_server("ejabberd", tmp_path / "ejabberd", hibernation_time=5)
    server.register("alice", "pass")
    async with server:
        ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

from .ejabberd import EjabberdServer, ensure_ejabberd_installed, installed_ejabberd_version
from .prosody import ProsodyServer, ensure_prosody_installed, installed_prosody_version
from .server import LocalXMPPServer

__all__ = [
    "SERVER_KINDS",
    "ServerKind",
    "ensure_server_installed",
    "installed_server_version",
    "make_server",
    "server_class",
]

ServerKind = Literal["prosody", "ejabberd"]
#: Every server the kit can start, in the order a ``--server all`` run takes them.
SERVER_KINDS: tuple[ServerKind, ...] = get_args(ServerKind)


def server_class(kind: str) -> type[LocalXMPPServer]:
    """The launcher class for ``kind``; ValueError for an unknown one."""
    if kind == "prosody":
        return ProsodyServer
    if kind == "ejabberd":
        return EjabberdServer
    raise ValueError(f"unknown server {kind!r} (known: {', '.join(SERVER_KINDS)})")


def ensure_server_installed(kind: str) -> Path:
    """Install the server with apt-get when it is missing; the path of its tool."""
    server_class(kind)  # the same error for an unknown kind
    return ensure_prosody_installed() if kind == "prosody" else ensure_ejabberd_installed()


def installed_server_version(kind: str) -> str | None:
    """The Debian package version of the server, or None if it is not installed."""
    server_class(kind)
    return installed_prosody_version() if kind == "prosody" else installed_ejabberd_version()


def make_server(kind: str, base_dir: Path, **options: Any) -> LocalXMPPServer:
    """A (stopped) server of ``kind`` in ``base_dir``.

    Every kind takes ``hibernation_time``, ``domain``, ``muc_domain``, ``log_level``,
    ``c2s_port`` and ``start_timeout``; the others are the kind's own (e.g. Prosody's
    ``smacks_max_queue_size``, ejabberd's ``max_ack_queue``).
    """
    server: LocalXMPPServer = server_class(kind)(base_dir, **options)
    return server
