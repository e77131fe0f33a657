"""Logging: loguru everywhere, stdlib (pykka, websockets, httpx) routed into it.

Every line passes through :func:`protocol.redact` at the sink, the one place
text leaves the process, so a token in a URL never reaches a log at any level
(websockets logs the handshake request line at DEBUG). ``json_lines`` gives one
JSON object per line: time, level, actor, message, and any bound extras.

A text line's message also passes :func:`protocol.text.printable`: a tool
name or request id comes from a sled process or the gateway, and a raw CR/LF
would forge a log line, an ANSI escape would drive the reader's terminal.
JSON lines need no such care (JSON escapes control characters itself).
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from typing import Any, TextIO

from loguru import logger

from protocol import redact
from protocol.text import printable

_TEXT_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {extra[actor]: <13} | {message}"
_FIELDS = 3  # " | "-separated fields before the message in _TEXT_FORMAT


class InterceptHandler(logging.Handler):
    """Forward stdlib log records to loguru, keeping level and origin."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        actor = record.name.split(".")[0]
        bound = logger.bind(actor=actor)
        if record.name == "pykka" and record.levelno >= logging.CRITICAL:
            bound = bound.bind(_multiline=True)  # log_thread_tracebacks: one block per thread
        bound.opt(exception=record.exc_info, depth=0).log(level, record.getMessage())


def _text_sink(stream: TextIO) -> Any:
    def write(message: Any) -> None:
        stream.write(redact(_printable_line(message)))
        stream.flush()

    return write


def _printable_line(message: Any) -> str:
    """The formatted text line with its message part made printable; the
    traceback after it (our own code's) keeps its lines. pykka's thread dump
    (SIGUSR1) is our own multi-line text too: kept as it is. Done here, not in
    a loguru patcher, which costs every log call (a flood of frames notices)."""
    text = str(message)
    record = message.record
    if record["extra"].get("_multiline"):
        return text
    raw = record["message"]
    parts = text.split(" | ", _FIELDS)
    if len(parts) <= _FIELDS or not parts[_FIELDS].startswith(raw):
        return printable(text.rstrip("\n")) + "\n"  # not our format: the whole line
    rest = parts[_FIELDS]
    return " | ".join(parts[:_FIELDS]) + " | " + printable(raw) + rest[len(raw) :]


def _json_sink(stream: TextIO) -> Any:
    def write(message: Any) -> None:
        record = message.record
        line: dict[str, Any] = {
            "time": record["time"].isoformat(),
            "level": record["level"].name,
            "actor": record["extra"].get("actor", "main"),
            "message": record["message"],
        }
        extras = {
            k: v for k, v in record["extra"].items() if k != "actor" and not k.startswith("_")
        }
        if extras:
            line["extra"] = extras
        if record["exception"] is not None:
            line["exception"] = "".join(traceback.format_exception(*record["exception"]))
        # Redact the values, not the serialized line: redacting JSON text could
        # eat an escaping backslash (token=abc\" -> token=***") and break the line.
        stream.write(json.dumps(_redacted(json.loads(json.dumps(line, default=str)))) + "\n")
        stream.flush()

    return write


def _redacted(value: Any) -> Any:
    """``value`` (plain JSON data) with every string passed through :func:`redact`."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact(k): _redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    return value


def configure_logging(
    level: str = "INFO", *, json_lines: bool = False, stream: TextIO | None = None
) -> None:
    """(Re)configure loguru and route the stdlib loggers into it."""
    out = stream or sys.stderr
    logger.remove()
    logger.configure(extra={"actor": "main"})
    if json_lines:
        # diagnose=False: tracebacks must not print variable values (secrets).
        logger.add(
            _json_sink(out),
            level=level.upper(),
            format="{message}",
            backtrace=False,
            diagnose=False,
        )
    else:
        logger.add(
            _text_sink(out),
            level=level.upper(),
            format=_TEXT_FORMAT,
            backtrace=False,
            diagnose=False,
        )
    logging.basicConfig(handlers=[InterceptHandler()], level=0, force=True)
    # websockets is chatty at DEBUG (every frame); follow our level otherwise.
    numeric = logging.getLevelName(level.upper())
    for name in ("websockets", "pykka", "httpx", "httpcore", "uvicorn"):
        logging.getLogger(name).setLevel(numeric if isinstance(numeric, int) else logging.INFO)
    logging.getLogger("httpcore").setLevel(
        max(logging.INFO, numeric if isinstance(numeric, int) else 0)
    )
