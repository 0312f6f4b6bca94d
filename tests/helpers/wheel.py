"""Build the wheel users install, and install it where only it is importable."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def build_wheel(tmp: Path) -> tuple[Path, str]:
    """The wheel built from a copy of the checkout (``devtools/``, ``tests/`` and
    ``examples/`` included, to prove they stay out) with the venv's setuptools,
    without build isolation: no download. Returns the wheel and pip's output."""
    src = tmp / "src"
    junk = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc", "*.sqlite*")
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "CHANGELOG.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("xmpp_sm_tracker", "devtools", "tests", "examples"):
        shutil.copytree(ROOT / name, src / name, ignore=junk)
    dist = tmp / "dist"
    pip_wheel = ["pip", "wheel", "--no-deps", "--no-build-isolation", "-v", "-w", str(dist)]
    done = subprocess.run(
        [sys.executable, "-m", *pip_wheel, str(src)], capture_output=True, text=True, timeout=300
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    (wheel,) = dist.glob("xmpp_sm_tracker-*.whl")
    return wheel, output


def install_wheel(wheel: Path, target: Path) -> Path:
    """Install ``wheel`` alone into ``target`` (its dependencies are the venv's): put
    ``target`` on PYTHONPATH and it is what ``import xmpp_sm_tracker`` finds."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return target
