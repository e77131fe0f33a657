"""Logging for the gateway: loguru everywhere, and the token never in a line.

Sleds put the token in the URL (``?token=``), and uvicorn logs request paths
with their query string (``"WebSocket /api/sled-uplink?token=…" [accepted]``,
and websockets' debug line ``< GET /api/sled-uplink?token=… HTTP/1.1``). A
filter on uvicorn's loggers rewrites each record through
:func:`protocol.redact` before any handler (ours or an embedding
application's) can see it.

Text lines also pass through :func:`protocol.printable` at the sink, so a CR,
LF or escape sequence that reached a message (from a sled's project name or
tool name, a request path uvicorn logs) cannot forge a line or drive the
terminal. The gateway escapes those fields where it logs them too, for
embedding programs with sinks of their own.
"""

from __future__ import annotations

import logging
import sys

from loguru import logger

from actors.logsetup import InterceptHandler  # one stdlib → loguru bridge for both
from protocol import printable, redact

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


def _redact_record(record: dict) -> None:  # type: ignore[type-arg]
    record["message"] = printable(redact(record["message"]))


def configure_cli_logging(level: str) -> None:
    """Loguru to stderr at ``level``; stdlib logging routed into it; all redacted."""
    logger.remove()
    logger.configure(extra={"actor": "main"}, patcher=_redact_record)  # type: ignore[arg-type]
    logger.add(
        sys.stderr,
        level=level,
        format="{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {extra[actor]: <8} | {message}",
        backtrace=False,
        diagnose=False,  # diagnose would print local variables, the token among them
    )
    logging.basicConfig(handlers=[InterceptHandler()], level=0, force=True)
    # uvicorn's own lines duplicate ours; keep its warnings, and its chatter at DEBUG.
    verbose = logger.level(level).no <= logger.level("DEBUG").no
    for name in _UVICORN_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
    protect_uvicorn_loggers()
