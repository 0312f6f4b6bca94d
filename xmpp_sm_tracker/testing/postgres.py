"""A throw-away PostgreSQL cluster for the PostgresStore tests and your own.

:class:`PostgresServer` makes a cluster with ``initdb`` in a fresh temporary directory,
listens on 127.0.0.1 (a free port) and on a Unix socket inside that directory only,
lets one role in with a random password (scram-sha-256), creates one database and
removes it all on :meth:`~PostgresServer.stop` (or at interpreter exit if a run was
aborted). ``initdb`` refuses to run as root, so as root the cluster belongs to the
system user ``xmpp-sm-pg`` (made with ``useradd`` when missing)::

    with PostgresServer() as pg:
        store = PostgresStore(pg.dsn, account="alice@example.org")

PostgreSQL itself comes from Debian's packages (:func:`ensure_postgres_installed`);
the package's own cluster service is kept from starting, or stopped.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import weakref
from pathlib import Path
from types import TracebackType
from typing import Self

from .server import HOST, TAIL_CHARS, ServerError, apt_install, free_port, read_from

__all__ = ["PostgresError", "PostgresServer", "ensure_postgres_installed", "postgres_bin_dir"]

_LIB = Path("/usr/lib/postgresql")
#: The unprivileged system user that owns the cluster when the tests run as root.
RUN_AS = "xmpp-sm-pg"
_LIVE: weakref.WeakSet[PostgresServer] = weakref.WeakSet()


class PostgresError(ServerError):
    """PostgreSQL could not be installed, initialised, started or stopped."""


def postgres_bin_dir() -> Path | None:
    """The newest installed ``/usr/lib/postgresql/N/bin`` with ``initdb``, or None."""
    found = [p / "bin" for p in _LIB.glob("*") if (p / "bin" / "initdb").exists()]
    if not found:
        return None
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)


def _stop_system_clusters() -> None:
    """Stop (and otherwise leave alone) clusters the package's service started."""
    if shutil.which("pg_ctlcluster") is None or shutil.which("pg_lsclusters") is None:
        return
    res = subprocess.run(["pg_lsclusters", "-h"], capture_output=True, text=True, check=False)
    for line in res.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[3] == "online":
            subprocess.run(
                ["pg_ctlcluster", parts[0], parts[1], "stop"], capture_output=True, check=False
            )


def ensure_postgres_installed() -> Path:
    """Install PostgreSQL with apt-get if it is missing; its ``bin`` directory."""
    existing = postgres_bin_dir()
    if existing is not None:
        return existing
    if shutil.which("apt-get") is None:
        raise PostgresError(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb) and apt-get "
            "is unavailable; install PostgreSQL manually."
        )
    apt_install("postgresql", PostgresError, no_services=True)
    _stop_system_clusters()
    found = postgres_bin_dir()
    if found is None:
        raise PostgresError("apt-get reported success but no initdb was found")
    return found


def _run_as_user() -> pwd.struct_passwd | None:
    """Who runs the cluster: ``xmpp-sm-pg`` as root (made if missing), else nobody else."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(RUN_AS)
    except KeyError:
        pass
    res = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", RUN_AS],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0 and "already exists" not in res.stderr:
        raise PostgresError(f"useradd {RUN_AS} failed: {res.stderr.strip()}")
    return pwd.getpwnam(RUN_AS)


class PostgresServer:
    """One private PostgreSQL cluster in a temporary directory, 127.0.0.1 only."""

    def __init__(self, *, database: str = "xmpp_sm_tracker", role: str = "xmpp_sm_test") -> None:
        self.database = database
        self.role = role
        self.password = secrets.token_urlsafe(18)
        self.port = 0
        self.base_dir: Path | None = None
        self._user = _run_as_user()
        self._bin: Path | None = None

    @property
    def data_dir(self) -> Path:
        assert self.base_dir is not None, "not started"
        return self.base_dir / "data"

    @property
    def dsn(self) -> str:
        """``postgresql://role:password@127.0.0.1:port/database``."""
        return f"postgresql://{self.role}:{self.password}@{HOST}:{self.port}/{self.database}"

    @property
    def running(self) -> bool:
        return self.base_dir is not None and (self.data_dir / "postmaster.pid").exists()

    def __repr__(self) -> str:
        state = f"{HOST}:{self.port}" if self.running else "stopped"
        return f"<PostgresServer {self.database} {state}>"

    def _tool(self, name: str, *args: str, env: dict[str, str] | None = None) -> str:
        """Run one of PostgreSQL's tools as the cluster's owner; its output."""
        assert self._bin is not None and self.base_dir is not None
        kwargs: dict[str, object] = {}
        if self._user is not None:
            kwargs = {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}
        try:
            res = subprocess.run(
                [str(self._bin / name), *args],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
                stdin=subprocess.DEVNULL,
                cwd=self.base_dir,
                env=dict(os.environ, **(env or {})),
                **kwargs,  # type: ignore[call-overload]
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise PostgresError(f"{name} failed: {exc}") from exc
        output: str = res.stdout + res.stderr
        if res.returncode != 0:
            log = read_from(self.base_dir / "postgres.log", 0)[-TAIL_CHARS:]
            raise PostgresError(
                f"{name} {' '.join(args[:2])} exited with {res.returncode}:\n"
                f"{output[-TAIL_CHARS:]}\n{log}"
            )
        return output

    def start(self) -> Self:
        """Install if needed, initdb, start on a free port and create the database."""
        if self.running:
            return self
        self._bin = ensure_postgres_installed()
        self.base_dir = Path(tempfile.mkdtemp(prefix="xmpp-sm-pg-"))
        _LIVE.add(self)
        try:
            if self._user is not None:
                os.chown(self.base_dir, self._user.pw_uid, self._user.pw_gid)
            pwfile = self.base_dir / "pwfile"
            pwfile.write_text(self.password + "\n")
            if self._user is not None:
                os.chown(pwfile, self._user.pw_uid, self._user.pw_gid)
            self._tool(
                "initdb", "-D", str(self.data_dir), "-U", self.role, "--pwfile", str(pwfile),
                "--auth", "scram-sha-256", "-E", "UTF8", "--locale", "C", "--no-sync",
            )  # fmt: skip
            pwfile.unlink()
            self._start_on_a_free_port()
            self._tool(
                "createdb", "-h", HOST, "-p", str(self.port), "-U", self.role, self.database,
                env={"PGPASSWORD": self.password},
            )  # fmt: skip
        except BaseException:
            self.stop()
            raise
        return self

    def _start_on_a_free_port(self) -> None:
        assert self.base_dir is not None
        for attempt in range(3):
            self.port = free_port()
            settings = {
                "listen_addresses": f"'{HOST}'",
                "port": str(self.port),
                "unix_socket_directories": f"'{self.base_dir}'",
                "fsync": "off",  # a test cluster: nothing in it outlives the run
                "synchronous_commit": "off",
                "full_page_writes": "off",
                "max_connections": "200",
                "shared_buffers": "64MB",
            }
            with (self.data_dir / "postgresql.conf").open("a") as conf:
                conf.write("\n# xmpp_sm_tracker test cluster\n")
                conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
            try:
                self._tool(
                    "pg_ctl", "-D", str(self.data_dir), "-l", str(self.base_dir / "postgres.log"),
                    "-w", "-t", "60", "start",
                )  # fmt: skip
                return
            except PostgresError as exc:
                if "already in use" not in str(exc) or attempt == 2:
                    raise

    def stop(self) -> None:
        """Stop the cluster (fast shutdown) and remove its directory; idempotent."""
        base = self.base_dir
        if base is None:
            return
        try:
            if (self.data_dir / "postmaster.pid").exists():
                with contextlib.suppress(PostgresError):
                    self._tool("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop")
                if (self.data_dir / "postmaster.pid").exists():
                    self._tool("pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "stop")
        finally:
            self.base_dir = None
            _LIVE.discard(self)
            shutil.rmtree(base, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.stop()
