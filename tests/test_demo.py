"""The README's first command must keep working: run the demo story end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from devtools.demo import run_demo


async def test_demo_story_ends_with_every_message_acked_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run_demo(tmp_path) == 0
    out = capsys.readouterr().out
    for event in ("message:sent", "message:hibernated", "message:resent", "message:acked"):
        assert event in out
    assert "reason=resume-failed" in out
    assert "7 of 7 messages acked, 0 still failed, 0 received twice" in out
