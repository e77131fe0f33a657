"""Reading what an HTTP request carries: bounded query numbers, times, and bodies."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime

from starlette.requests import ClientDisconnect, Request

from protocol.web import ascii_digits


class BodyTooLarge(Exception):
    """The body is larger than the handler accepts (HTTP 413)."""


class BodyTooSlow(Exception):
    """The body did not arrive within the body deadline (a slow-body attack or a dead client)."""


def int_param(request: Request, name: str, default: int | None, low: int, high: int) -> int | None:
    """``?name=``: a whole number in ``[low, high]``, or ``default`` if absent; ValueError."""
    text = request.query_params.get(name)
    if text is None or text == "":
        return default
    if not ascii_digits(text) or not low <= int(text) <= high:
        raise ValueError(f"{name} must be a whole number from {low} to {high}, not {text[:40]!r}")
    return int(text)


def time_param(text: str | None) -> float | None:
    """``since=``: ISO 8601 (UTC unless it says) or Unix seconds."""
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if math.isfinite(seconds):
            return seconds
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"since must be an ISO 8601 time or Unix seconds, not {text[:40]!r}"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


async def read_body(request: Request, limit: int, deadline: float) -> bytes:
    """The whole body: :class:`BodyTooLarge` past ``limit`` bytes, :class:`BodyTooSlow`
    if it takes longer than ``deadline`` seconds."""
    # The server's header deadline ends once the head is in; a body sent a
    # byte at a time would hold this request (and a relay slot) forever.
    chunks, size = [], 0
    try:
        async with asyncio.timeout(deadline):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge
                chunks.append(chunk)
    except (TimeoutError, ClientDisconnect):
        # A client gone, or cut by the server's whole-request deadline (which
        # has answered 408 itself): the same as too slow, nobody is listening.
        raise BodyTooSlow from None
    return b"".join(chunks)
