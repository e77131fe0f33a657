"""The gateway's one shape of HTTP error: ``{"error": "<what is wrong>", ...}`` as JSON."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from starlette.responses import JSONResponse

from protocol.web import error_body

if TYPE_CHECKING:
    from sled_gateway.approvals import Forbidden


def error(
    status: int, message: str, *, headers: Mapping[str, str] | None = None, **extra: Any
) -> JSONResponse:
    """``status`` with ``{"error": message, **extra}``; ``extra`` carries what the client
    needs to act on it (the decision that won a race, the rule already revoked)."""
    return JSONResponse(error_body(message, **extra), status_code=status, headers=headers)


def forbidden(exc: Forbidden) -> JSONResponse:
    """``403`` with the role the request needed: ``{"error", "needs": ROLE}``."""
    return error(403, str(exc), needs=exc.needs.value)
