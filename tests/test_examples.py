"""Every example and the README's quick start run against a local server, as a user
would run them: copied into a fresh directory, with the library installed from the
built wheel (not the source tree), and type-checked with mypy --strict there.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from devtools.serve import ACCOUNTS, PASSWORD
from xmpp_sm_tracker.testing import LocalXMPPServer
from xmpp_sm_tracker.testing.client import Received, connect_client, make_client, wait_for
from xmpp_sm_tracker.testing.servers import ensure_server_installed, make_server

from .helpers.wheel import build_wheel, install_wheel

ROOT = Path(__file__).resolve().parent.parent
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


@dataclass(frozen=True)
class UserDir:
    """A fresh directory with the examples and the quick start, and the wheel installed
    alone into ``site`` (on PYTHONPATH: the source tree is never importable there)."""

    app: Path
    site: Path

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(self.site)}


def quick_start(port: int) -> str:
    """The README's first code block, pointed at the local server (names, password,
    plain text) and nothing else changed."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    code = PYTHON_BLOCK.findall(readme)[0]
    for old, new in (
        ('"alice@example.org/laptop", "secret"', f'"alice@localhost/quickstart", "{PASSWORD}"'),
        ("bob@example.org", "bob@localhost"),
        (
            "    xmpp.connect()\n",
            "    xmpp.enable_starttls = xmpp.enable_direct_tls = False\n"
            "    xmpp.enable_plaintext = True\n"
            '    xmpp.plugin["feature_mechanisms"].unencrypted_plain = True\n'
            f'    xmpp.connect("127.0.0.1", {port})\n',
        ),
    ):
        assert old in code, f"the README quick start no longer has {old!r}"
        code = code.replace(old, new)
    return code


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory: pytest.TempPathFactory) -> UserDir:
    base = tmp_path_factory.mktemp("user")
    wheel, _ = build_wheel(base)
    site = install_wheel(wheel, base / "site")
    app = base / "app"
    shutil.copytree(ROOT / "examples", app, ignore=shutil.ignore_patterns("__pycache__"))
    (app / "quickstart.py").write_text(quick_start(15222), encoding="utf-8")
    return UserDir(app, site)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(
    xmpp_server_kind: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[LocalXMPPServer]:
    """A server with the demo's accounts and password (``scripts/demo --serve``)."""
    ensure_server_installed(xmpp_server_kind)
    demo = make_server(xmpp_server_kind, tmp_path_factory.mktemp(f"examples-{xmpp_server_kind}"))
    for user in ACCOUNTS:
        demo.register(user, PASSWORD)
    async with demo:
        yield demo


async def run_example(user: UserDir, *args: str, stdin: bytes = b"", timeout: float = 40) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        cwd=user.app,
        env=user.env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(stdin), timeout)
    text = out.decode()
    assert proc.returncode == 0, text
    return text


def test_the_user_dir_imports_the_installed_wheel_not_the_source_tree(user_dir: UserDir) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import xmpp_sm_tracker; print(xmpp_sm_tracker.__file__)"],
        cwd=user_dir.app,
        env=user_dir.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).is_relative_to(user_dir.site)


def test_the_examples_and_the_quick_start_pass_mypy_strict_as_user_code(
    user_dir: UserDir, tmp_path: Path
) -> None:
    # A user's mypy sees the installed package (py.typed) and slixmpp's own types: the
    # examples must type-check there, not only in our tree (where slixmpp is skipped).
    files = sorted(p.name for p in user_dir.app.glob("*.py"))
    assert {"minimal.py", "console_chat.py", "restart_bot.py", "quickstart.py"} <= set(files)
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path), *files],
        cwd=user_dir.app,
        env=user_dir.env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr


async def test_the_readme_quick_start_runs(server: LocalXMPPServer, user_dir: UserDir) -> None:
    script = user_dir.app / f"quickstart_{server.kind}.py"
    script.write_text(quick_start(server.c2s_port), encoding="utf-8")
    out = await run_example(user_dir, script.name)
    assert "✓ server has" in out and "hello: acked" in out


async def test_minimal_example_sees_its_message_acked(
    server: LocalXMPPServer, user_dir: UserDir
) -> None:
    out = await run_example(user_dir, "minimal.py", str(server.c2s_port))
    assert "→ sent 'hello bob'" in out
    assert "✓ server has it" in out


async def test_console_chat_shows_ticks_and_receipts(
    server: LocalXMPPServer, user_dir: UserDir
) -> None:
    bob = make_client("bob@localhost/phone", PASSWORD, tracked=False)
    bob.register_plugin("xep_0184")
    received = Received()
    received.attach(bob)
    await connect_client(bob, server.address)
    try:
        out = await run_example(
            user_dir,
            "console_chat.py",
            "alice",
            "bob",
            "--port",
            str(server.c2s_port),
            stdin=b"hi there\n/failed\n/quit\n",
        )
    finally:
        await bob.disconnect()
    assert "connected as alice" in out
    assert "✓✓  hi there" in out  # bob's client answered the receipt request
    assert received.bodies == ["hi there"]


async def test_restart_bot_echoes_and_keeps_its_state_across_runs(
    server: LocalXMPPServer, user_dir: UserDir, tmp_path: Path
) -> None:
    db = tmp_path / "bot.sqlite"
    bob = make_client("bob@localhost/desk", PASSWORD, tracked=False)
    received = Received()
    received.attach(bob)
    await connect_client(bob, server.address)
    args = (user_dir, "restart_bot.py", "--db", str(db), "--port", str(server.c2s_port))
    try:
        first = asyncio.ensure_future(run_example(*args, "--run-for", "4"))
        await asyncio.sleep(2.0)
        bob.send_message(mto="carol@localhost", mbody="ping", mtype="chat")
        await wait_for(lambda: "echo: ping" in received.bodies, timeout=10)
        out = await first
        assert "✓ echo: ping" in out
        second = await run_example(*args, "--run-for", "2")
        assert "online; 0 failed replies sent again" in second
    finally:
        await bob.disconnect()
    assert db.exists()
