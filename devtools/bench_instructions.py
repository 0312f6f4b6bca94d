"""CPU instructions per message, counted by valgrind: the bench's one exact number.

CPU time on a shared VM varies by ±20% within a minute, for bare slixmpp as much as for
the tracker, so a 5% change hides in it. An instruction count does not vary: the same
work counts the same (but for SQLite's random ids, a few hundred in 500 000). It is
not time either (a cache miss costs no instruction), so the table shows both.

Each count is one child process run under ``valgrind --tool=cachegrind``: alice on the
in-process wire of ``bench_wire`` (no server, no socket) sends ``n`` messages and gets
them acked, after a warm-up. The same run without the ``n`` gives what start-up and
warm-up cost, so ``(with - without) / n`` is the cost of one message sent and acked,
whole client included (parser, filters, the plugin, its store and SQLite's thread).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from .bench_wire import send_and_ack, sqlite_store

__all__ = ["VARIANTS", "instructions_run", "valgrind"]

#: Variants counted, as the bench names them.
VARIANTS = ("bare", "bare_oid", "memory", "sqlite")
#: Messages sent and acked before the counted ones (first-call costs are nobody's).
WARMUP = 300
_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")


def valgrind() -> str | None:
    """The valgrind executable, or None when it is not installed."""
    return shutil.which("valgrind")


async def _count(variant: str, n: int, workdir: Path) -> int:
    """Instructions of one child process that runs ``send_and_ack(variant, n)``."""
    tool = valgrind()
    if tool is None:
        raise RuntimeError("valgrind is not installed")
    command = [
        tool,
        "--tool=cachegrind",
        "--cache-sim=no",
        "--cachegrind-out-file=/dev/null",
        sys.executable,
        "-m",
        "devtools.bench_instructions",
        variant,
        str(n),
        str(workdir),
    ]
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # the same dict layouts every run
    child = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
    )
    _, err = await child.communicate()
    text = err.decode(errors="replace")
    found = _REFS.search(text)
    if child.returncode != 0 or found is None:
        raise RuntimeError(f"valgrind run of {variant} (n={n}) failed: {text[-2000:]}")
    return int(found.group(1).replace(",", ""))


async def instructions_run(variant: str, n: int, workdir: Path) -> dict[str, Any]:
    """Instructions per message sent and acked for ``variant`` (two valgrind runs)."""
    with_n, without = await asyncio.gather(_count(variant, n, workdir), _count(variant, 0, workdir))
    return {
        "variant": variant,
        "messages": n,
        "instructions": with_n,
        "instructions_without": without,
        "per_message": (with_n - without) / n,
    }


async def _child(variant: str, n: int, workdir: Path) -> None:
    store = None
    if variant == "sqlite":
        store = sqlite_store(Path(tempfile.mkdtemp(dir=workdir)) / "wire.sqlite")
    await send_and_ack(variant, n, WARMUP, store)


if __name__ == "__main__":
    asyncio.run(_child(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])))
