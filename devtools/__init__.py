"""Developer tools: the benchmark, chaos runs, the demo and the examples' local server.

Not part of the wheel (``pyproject.toml`` packages ``xmpp_sm_tracker*`` only): run them
from a checkout with ``./scripts/bench``, ``./scripts/chaos``, ``./scripts/demo`` and
``./scripts/demo --serve`` (or ``python -m devtools.bench`` etc. from the repository
root). They use the library and its test kit, never the other way round.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The checkout these tools live in (the parent of ``devtools/``).
REPO_ROOT = Path(__file__).resolve().parent.parent


def child_env(**extra: str) -> dict[str, str]:
    """``os.environ`` for a child ``python`` that imports ``devtools`` from any directory."""
    path = os.environ.get("PYTHONPATH")
    root = str(REPO_ROOT)
    return {
        **os.environ,
        "PYTHONPATH": f"{root}{os.pathsep}{path}" if path else root,
        **extra,
    }
