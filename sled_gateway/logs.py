"""Logging for the gateway: the uplink's setup, and the token never in a line.

The command logs through :func:`actors.logsetup.configure_logging`, which
redacts (:func:`protocol.redact`) and escapes (:func:`protocol.printable`)
each line at the sink, the one place our lines leave the process.

Sleds put the token in the URL (``?token=``), and uvicorn logs request paths
with their query string (``"WebSocket /api/sled-uplink?token=…" [accepted]``,
and websockets' debug line ``< GET /api/sled-uplink?token=… HTTP/1.1``). When
the gateway runs inside another program, that program's own handlers see
uvicorn's records, not our sink: a filter on uvicorn's loggers rewrites each
record through :func:`protocol.redact` before any handler can see it. The
gateway escapes the fields it logs from a sled (project and tool names) where
it logs them, for those programs too.
"""

from __future__ import annotations

import logging
from typing import TextIO

from loguru import logger

from actors.logsetup import configure_logging
from protocol import redact

_UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


class RedactFilter(logging.Filter):
    """Replace a record's message with its redacted rendering."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


class DenialQuirkFilter(logging.Filter):
    """Drop uvicorn's false alarm after a WebSocket *denial response*.

    uvicorn's websockets-sansio protocol never marks the handshake complete
    when the app answers with ``websocket.http.response.*`` (our 401), so it
    logs "ASGI callable returned without completing handshake." although the
    401 went out correctly. Our app always either accepts or denies, so for
    the gateway this line is never a real error.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "ASGI callable returned without completing handshake."


def protect_uvicorn_loggers() -> None:
    """Install :class:`RedactFilter` (and the quirk filter) on uvicorn's loggers; idempotent."""
    for name in _UVICORN_LOGGERS:
        log = logging.getLogger(name)
        if not any(isinstance(f, RedactFilter) for f in log.filters):
            log.addFilter(RedactFilter())
    error_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, DenialQuirkFilter) for f in error_log.filters):
        error_log.addFilter(DenialQuirkFilter())


def configure_cli_logging(level: str, *, stream: TextIO | None = None) -> None:
    """The ``sled-gateway`` command's logging: the uplink's setup (the same line
    format, redacted and made printable where lines leave the process), with
    uvicorn's loggers quieter and filtered."""
    configure_logging(level, stream=stream)
    # uvicorn's own lines duplicate ours; keep its warnings, and its chatter at DEBUG.
    verbose = logger.level(level.upper()).no <= logger.level("DEBUG").no
    for name in _UVICORN_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
    protect_uvicorn_loggers()
