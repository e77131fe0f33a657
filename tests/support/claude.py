"""Running the real Claude Code binary in tests: where it is, and an offline environment.

The binary is the pinned one ``scripts/install-claude-code.sh`` puts in
``.tools/claude-code/bin/claude`` (``SLED_CLAUDE_BIN`` names another). It runs
fully offline: the model is the loopback stand-in (``ANTHROPIC_BASE_URL``, a
dummy key), HOME and the config dir are fresh temporary folders, and
telemetry, auto-update and other nonessential traffic are switched off.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
CLAUDE = Path(os.environ.get("SLED_CLAUDE_BIN") or ROOT / ".tools/claude-code/bin/claude")
SKIP_REASON = (
    f"Claude Code is not installed at {CLAUDE}: run `bash scripts/install-claude-code.sh` "
    "(needs npm and the npm registry) to enable the Claude Code tests"
)


def claude_available() -> bool:
    return CLAUDE.is_file() and os.access(CLAUDE, os.X_OK)


def claude_env(base_url: str, home: Path, **extra: str) -> dict[str, str]:
    """Environment for an offline ``claude`` run against the stand-in at ``base_url``."""
    home.mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "CLAUDE_CONFIG_DIR": str(home / ".claude"),
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": "sk-ant-test-dummy",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "TERM": "dumb",
    }
    env.update(extra)
    return env


class ClaudeRun:
    """One ``claude`` process on a thread; ``result()`` waits for it."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str], timeout: float) -> None:
        self.argv = [str(CLAUDE), *argv]
        self.completed: subprocess.CompletedProcess[str] | None = None
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.elapsed = 0.0
        self._thread = threading.Thread(
            target=self._run, args=(cwd, env, timeout), name="claude", daemon=True
        )
        self._thread.start()

    def _run(self, cwd: Path, env: dict[str, str], timeout: float) -> None:
        try:
            self.completed = subprocess.run(
                self.argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except BaseException as exc:
            self.error = exc
        finally:
            self.elapsed = time.monotonic() - self.started

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self, timeout: float) -> subprocess.CompletedProcess[str]:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"claude did not finish within {timeout} s"
        if self.error is not None:
            raise self.error
        assert self.completed is not None
        print(
            f"\n$ claude {' '.join(self.argv[1:])}\n  → exit {self.completed.returncode} "
            f"in {self.elapsed:.1f} s; stdout: {self.completed.stdout.strip()!r}"
        )
        if self.completed.stderr.strip():
            print(f"  stderr: {self.completed.stderr.strip()[:2000]}")
        return self.completed


class Decider:
    """Answers every pending request at a reference gateway from a thread,
    after ``delay`` seconds (``decision=None`` never answers)."""

    def __init__(self, gw: Any, decision: str | None, delay: float = 0.0) -> None:
        self.gw = gw
        self.decision = decision
        self.delay = delay
        self.seen: list[Any] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="decider", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        answered: set[tuple[str, str]] = set()
        while not self._stop.wait(0.02):
            for item in self.gw.pending():
                key = (item.project, item.req_id)
                if key in answered:
                    continue
                answered.add(key)
                self.seen.append(item)
                if self.decision is None:
                    continue
                if self._stop.wait(self.delay):
                    return
                self.gw.decide(item.project, item.req_id, self.decision)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"{what} not met within {timeout:.1f} s")
