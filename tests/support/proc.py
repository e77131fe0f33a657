"""A subprocess whose stdout and stderr a test can wait on by pattern.

Used by the gateway and end-to-end tests that drive ``run_gateway.py`` and
``run_uplink.py`` as real processes. Output is read in chunks, not lines (an
interactive prompt has no trailing newline), and ``kill`` leaves nothing
behind: process, reader threads and pipes.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
from pathlib import Path

#: Every process started since the running test's setup began, and every one started
#: before that is still running: when the test fails, its report carries the tail of
#: each one's stderr (``pytest_runtest_makereport`` in conftest).
STARTED: list[WatchedProcess] = []
#: How much of each process's stderr a failed test's report shows.
REPORTED_TAIL = 6000


class WatchedProcess:
    def __init__(
        self, argv: list[str], *, cwd: Path, env: dict[str, str] | None, timeout: float
    ) -> None:
        self.timeout = timeout
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.out = {"stdout": "", "stderr": ""}
        STARTED.append(self)
        self._cond = threading.Condition()
        self._pumps = [
            threading.Thread(target=self._pump, args=(name,), daemon=True)
            for name in ("stdout", "stderr")
        ]
        for pump in self._pumps:
            pump.start()

    def _pump(self, name: str) -> None:
        stream = getattr(self.proc, name)
        while chunk := os.read(stream.fileno(), 65536):
            with self._cond:
                self.out[name] += chunk.decode("utf-8", "replace")
                self._cond.notify_all()

    def wait_for(self, pattern: str, stream: str = "stderr", count: int = 1) -> re.Match[str]:
        """The ``count``-th match of ``pattern``, waiting for it (or for the exit)."""

        def found() -> list[re.Match[str]]:
            return list(re.finditer(pattern, self.out[stream]))

        with self._cond:
            self._cond.wait_for(
                lambda: len(found()) >= count or self.proc.poll() is not None, 3 * self.timeout
            )
            matches = found()
        if len(matches) < count:
            raise AssertionError(
                f"{pattern!r} x{count} not in {stream} (exit {self.proc.poll()}):\n"
                f"{self.out[stream][-4000:]}"
            )
        return matches[count - 1]

    def type(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)  # in case a test left it stopped
            self.proc.kill()
        self.proc.wait(self.timeout)
        for pump in self._pumps:  # they end at EOF; then the pipes can be closed
            pump.join(self.timeout)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
