"""A sans-I/O parser for ``text/event-stream`` (the WHATWG SSE format).

Feed it decoded text in any chunking; it yields complete events. Used to read
MCP Streamable-HTTP answers.
"""

from __future__ import annotations

from collections.abc import Iterator
import re
from dataclasses import dataclass

_EOL = re.compile(r"\r\n|\n|\r")


@dataclass(frozen=True, slots=True)
class Event:
    data: str
    event: str = "message"
    id: str | None = None


class SseParser:
    """Incremental SSE parser: ``for ev in parser.feed(chunk): ...``."""

    def __init__(self) -> None:
        self._buffer = ""
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None

    def feed(self, chunk: str) -> Iterator[Event]:
        self._buffer += chunk
        pos = 0
        while (match := _EOL.search(self._buffer, pos)) is not None:
            if match.group() == "\r" and match.end() == len(self._buffer):
                break  # a trailing CR may be the first half of a CRLF
            line = self._buffer[pos : match.start()]
            pos = match.end()
            event = self._line(line)
            if event is not None:
                yield event
        self._buffer = self._buffer[pos:]

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
