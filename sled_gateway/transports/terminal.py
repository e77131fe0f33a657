"""The ``--interactive`` terminal prompt: approve / deny / always, one request at a time.

Two daemon threads: one only reads stdin lines into a queue (``readline``
cannot be interrupted, so it must never hold anything else up), the other
asks about the oldest unanswered request and applies the answer with
:meth:`Gateway.decide`. A request decided elsewhere (the web console) while
its prompt is showing is noticed within a fraction of a second and skipped.

Everything a sled sent (project, tool name, request id, tool input) is shown
through :func:`protocol.printable`: an escape sequence in a tool name must
not repaint the operator's terminal or fake a different prompt.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
from typing import Protocol

from loguru import logger

from protocol import Decision, decision_word, printable
from sled_gateway.principal import Principal
from sled_gateway.records import AlreadyDecided, PendingPermission, UnknownRequest
from sled_gateway.server import Gateway

log = logger.bind(actor="gateway")

_POLL = 0.1  # how often a waiting prompt checks it is still wanted
_MAX_INPUT_SHOWN = 2000


class _Reader(Protocol):
    def readline(self) -> str: ...


class _Writer(Protocol):
    def write(self, s: str, /) -> int: ...
    def flush(self) -> None: ...


def parse_answer(line: str) -> Decision | None:
    return decision_word(line, letters=True)


class TerminalPrompter:
    """Ask on a terminal about each pending permission request of ``gateway``."""

    def __init__(
        self, gateway: Gateway, stdin: _Reader | None = None, stdout: _Writer | None = None
    ) -> None:
        self._gateway = gateway
        self._stdin: _Reader = stdin if stdin is not None else sys.stdin
        self._stdout: _Writer = stdout if stdout is not None else sys.stdout
        self._items: queue.Queue[PendingPermission] = queue.Queue()
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stop = threading.Event()
        self._prompt_thread: threading.Thread | None = None

    def start(self) -> TerminalPrompter:
        self._gateway.add_pending_listener(self._items.put)
        for item in self._gateway.pending():  # anything that arrived before us
            self._items.put(item)
        threading.Thread(target=self._read_lines, name="gateway-stdin", daemon=True).start()
        self._prompt_thread = threading.Thread(
            target=self._prompt_loop, name="gateway-prompt", daemon=True
        )
        self._prompt_thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        # The prompt thread sees the flag within _POLL; the stdin reader may sit
        # in readline forever, which is why it is a daemon thread (not joined).
        if self._prompt_thread is not None:
            self._prompt_thread.join(1.0)

    def _say(self, text: str) -> None:
        self._stdout.write(text)
        self._stdout.flush()

    def _read_lines(self) -> None:
        try:
            for line in iter(self._stdin.readline, ""):
                self._lines.put(line)
        except (OSError, ValueError) as exc:  # closed stdin
            log.debug("stdin reader stopped: {}", exc)
        self._lines.put(None)  # EOF

    def _prompt_loop(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._items.get(timeout=_POLL)
            except queue.Empty:
                continue
            if not self._gateway.is_pending(item.project, item.req_id):
                continue
            if not self._ask(item):
                return

    def _ask(self, item: PendingPermission) -> bool:
        """Prompt until answered or moot; False once stdin is closed."""
        # json.dumps escapes C0 controls but not DEL, C1 or bidi overrides.
        shown = printable(json.dumps(item.tool_input, ensure_ascii=False), _MAX_INPUT_SHOWN)
        project, tool = printable(item.project, 200), printable(item.tool_name, 200)
        req_id = printable(item.req_id, 200)
        self._say(
            f"\n[permission] sled {project!r} asks to run {tool}"
            f" (req {req_id})\n"
            f"  input: {shown}\n"
            "  approve [y] / deny [n] / always [a]? "
        )
        while not self._stop.is_set():
            if not self._gateway.is_pending(item.project, item.req_id):
                self._say(f"\n  (req {req_id} was answered elsewhere)\n")
                return True
            try:
                line = self._lines.get(timeout=_POLL)
            except queue.Empty:
                continue
            if line is None:
                self._say("\n  stdin closed: answer in the web console from now on\n")
                log.warning("interactive prompt: stdin closed; use the web console")
                return False
            decision = parse_answer(line)
            if decision is None:
                self._say("  please answer y (approve), n (deny) or a (always allow): ")
                continue
            try:
                self._gateway.decide(item.project, item.req_id, decision, by=Principal.terminal())
            except (UnknownRequest, AlreadyDecided) as exc:
                self._say(f"  too late: {printable(exc)}\n")
            except Exception as exc:
                self._say(f"  could not answer: {exc!r}\n")
            else:
                self._say(f"  → {decision.value}\n")
            return True
        return True
