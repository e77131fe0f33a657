"""The README's runnable library example works as shown."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_library_example_runs_and_approves() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "library.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "decision: approve reason: gateway"
    assert lines[1] == "second decision: approve"
    assert lines[2].startswith("connection: connected | url: ws://127.0.0.1:")
    assert lines[2].endswith("token=***")
    assert "s3cret" not in result.stdout + result.stderr


def test_asyncio_library_example_runs_and_approves() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "library_async.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "decision: approve reason: gateway",
        "gathered: approve, approve, approve",
        "pending: 0",
    ]
    assert "s3cret" not in result.stdout + result.stderr
