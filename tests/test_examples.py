"""The README's runnable library example works as shown."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_example(name: str) -> subprocess.CompletedProcess[str]:
    """Run ``examples/<name>`` as a user would; it must exit 0."""
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    return result


def test_library_example_runs_and_approves() -> None:
    result = run_example("library.py")
    lines = result.stdout.splitlines()
    assert lines[0] == "decision: approve reason: gateway"
    assert lines[1] == "second decision: approve"
    assert lines[2].startswith("connection: connected | url: ws://127.0.0.1:")
    assert lines[2].endswith("token=***")
    assert "s3cret" not in result.stdout + result.stderr


def test_asyncio_library_example_runs_and_approves() -> None:
    result = run_example("library_async.py")
    assert result.stdout.splitlines() == [
        "decision: approve reason: gateway",
        "gathered: approve, approve, approve",
        "pending: 0",
    ]
    assert "s3cret" not in result.stdout + result.stderr
