"""The wheel users install (issue 17): the library and its test kit only, typed, with an
SPDX license and one version; pytest only with the ``testing`` extra.

The wheel is built from a copy of the checkout (``devtools/``, ``tests/`` and
``examples/`` included, to prove they stay out) with the venv's setuptools, without
build isolation: no download.
"""

from __future__ import annotations

import email
import email.message
import importlib.metadata
import re
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

import xmpp_sm_tracker

from .helpers.wheel import build_wheel

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
DEV_TOOLS = ("bench.py", "chaos.py", "demo.py", "serve.py")


class Built:
    def __init__(self, wheel: Path, output: str) -> None:
        self.wheel = wheel
        self.output = output
        with zipfile.ZipFile(wheel) as zf:
            self.names = zf.namelist()
            dist_info = next(n for n in self.names if n.endswith(".dist-info/METADATA"))
            self.metadata: email.message.Message = email.message_from_bytes(zf.read(dist_info))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    wheel, output = build_wheel(tmp_path_factory.mktemp("wheel"))
    return Built(wheel, output)


def test_the_wheel_holds_the_library_and_its_test_kit_only(built: Built) -> None:
    tops = {name.split("/", 1)[0] for name in built.names}
    version = xmpp_sm_tracker.__version__
    assert tops == {"xmpp_sm_tracker", f"xmpp_sm_tracker-{version}.dist-info"}
    for wanted in ("py.typed", "__init__.py", "testing/__init__.py", "testing/pytest_plugin.py"):
        assert f"xmpp_sm_tracker/{wanted}" in built.names
    for name in built.names:
        assert "devtools" not in name
        assert name.rsplit("/", 1)[-1] not in DEV_TOOLS, f"{name} is a dev tool"


def test_the_wheel_has_the_spdx_license_and_the_version(built: Built) -> None:
    meta = built.metadata
    assert meta["License-Expression"] == "MIT"
    assert meta["License"] is None  # the deprecated free-text field
    assert meta["License-File"] == "LICENSE"  # MIT wants its notice shipped
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in built.names)
    assert meta["Version"] == xmpp_sm_tracker.__version__
    assert built.wheel.name.startswith(f"xmpp_sm_tracker-{xmpp_sm_tracker.__version__}-")


def test_building_the_wheel_warns_of_nothing_deprecated(built: Built) -> None:
    deprecated = [line for line in built.output.splitlines() if "deprecat" in line.lower()]
    assert not deprecated, deprecated


def test_pytest_comes_with_the_testing_extra_only(built: Built) -> None:
    requires = built.metadata.get_all("Requires-Dist") or []
    plain = [r for r in requires if "extra ==" not in r]
    assert sorted(r.split(">", 1)[0].split("<", 1)[0] for r in plain) == [
        "aiosqlite",
        "pyee",
        "slixmpp",
    ]
    testing = sorted(r.split(">", 1)[0] for r in requires if 'extra == "testing"' in r)
    assert testing == ["pytest", "pytest-asyncio"]
    assert "testing" in (built.metadata.get_all("Provides-Extra") or [])
    # The dev extra (scripts/setup) brings the test kit's packages with it.
    assert "xmpp_sm_tracker[testing]" in PYPROJECT["project"]["optional-dependencies"]["dev"]


def test___version___is_the_installed_version() -> None:
    assert "__version__" in xmpp_sm_tracker.__all__
    assert xmpp_sm_tracker.__version__ == importlib.metadata.version("xmpp_sm_tracker")
    assert "version" in PYPROJECT["project"]["dynamic"]  # one source: the attribute


def test_the_library_and_the_test_kit_import_without_pytest() -> None:
    """What a user without the ``testing`` extra has: everything but the pytest plugin."""
    script = textwrap.dedent(
        """
        import sys

        class NoPytest:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("pytest", "pytest_asyncio", "_pytest"):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None

        sys.meta_path.insert(0, NoPytest())
        import xmpp_sm_tracker
        import xmpp_sm_tracker.testing
        import xmpp_sm_tracker.testing.client
        import xmpp_sm_tracker.testing.servers
        assert xmpp_sm_tracker.testing.FaultProxy
        try:
            import xmpp_sm_tracker.testing.pytest_plugin
        except ModuleNotFoundError as exc:
            print("plugin:", exc)
        else:
            raise SystemExit("the pytest plugin imported without pytest")
        assert not any(m.split(".")[0] in ("pytest", "_pytest") for m in sys.modules)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "pip install 'xmpp_sm_tracker[testing]'" in done.stdout


def test_the_highest_pins_of_scripts_test_are_allowed() -> None:
    """``scripts/test --deps highest`` tests versions that pyproject.toml allows (and the
    newest it allows: a range widened without a new pin would go untested)."""
    script = (ROOT / "scripts" / "test").read_text(encoding="utf-8")
    match = re.search(r"^HIGHEST_PINS=\((.*)\)$", script, re.MULTILINE)
    assert match, "scripts/test has no HIGHEST_PINS=(...)"
    pins = dict(pin.split("==") for pin in match.group(1).split())
    ranges = {
        (req := Requirement(text)).name: req.specifier
        for text in PYPROJECT["project"]["dependencies"]
    }
    assert set(pins) == {"pyee", "aiosqlite"}
    for name, version in pins.items():
        assert Version(version) in ranges[name], (name, version, ranges[name])
        [upper] = [s for s in ranges[name] if s.operator == "<"]
        # The pin is in the range's last release series: pyee 16.x for <17, 0.22.x for <0.23.
        bound = Version(upper.version).release
        assert Version(version).release[: len(bound)] >= (*bound[:-1], bound[-1] - 1)
