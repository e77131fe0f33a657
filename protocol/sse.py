"""A sans-I/O parser for ``text/event-stream`` (the WHATWG SSE format).

Feed it decoded text in any chunking; it yields complete events. Used to read
MCP Streamable-HTTP answers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_EOL = re.compile(r"\r\n|\n|\r")


@dataclass(frozen=True, slots=True)
class Event:
    data: str
    event: str = "message"
    id: str | None = None


class SseParser:
    """Incremental SSE parser: ``events = parser.feed(chunk)``."""

    def __init__(self) -> None:
        self._pending: list[str] = []  # pieces of the unfinished line (no CR/LF in them)
        self._skip_lf = False  # the last chunk ended in CR: a leading LF completes a CRLF
        self._started = False
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None

    def feed(self, chunk: str) -> list[Event]:
        """Consume ``chunk``; return the events it completed, in order."""
        if not chunk:
            return []
        if not self._started:
            self._started = True
            chunk = chunk.removeprefix("\ufeff")  # WHATWG: ignore one leading BOM
        if self._skip_lf:
            self._skip_lf = False
            chunk = chunk.removeprefix("\n")
        if "\n" not in chunk and "\r" not in chunk:
            # Still inside one line: keep the piece, neither rescan nor recopy
            # the line (a long line in small chunks would cost quadratic time).
            if chunk:
                self._pending.append(chunk)
            return []
        scan = sum(map(len, self._pending))  # no line ending before this offset
        self._pending.append(chunk)
        text = "".join(self._pending)
        self._pending.clear()
        events: list[Event] = []
        pos = 0
        while (match := _EOL.search(text, max(pos, scan))) is not None:
            line = text[pos : match.start()]
            pos = match.end()
            event = self._line(line)
            if event is not None:
                events.append(event)
        # A final CR ends its line now (so the last event is not held back);
        # should the next chunk start with LF, that LF belongs to this CR.
        self._skip_lf = text.endswith("\r")
        if pos < len(text):
            self._pending.append(text[pos:])
        return events

    def _line(self, line: str) -> Event | None:
        if line == "":
            if not self._data:
                self._event = ""
                return None
            event = Event("\n".join(self._data), self._event or "message", self._id)
            self._data, self._event = [], ""
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return None
