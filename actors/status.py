"""The snapshot of every actor's state: the same data for logs, /status and /metrics."""

from __future__ import annotations

import json
from typing import Any

from loguru import logger

from actors.context import UplinkContext


def snapshot(ctx: UplinkContext) -> dict[str, Any]:
    """All actors' published state plus the counters and gauges."""
    states: dict[str, Any] = ctx.board.snapshot()
    states.setdefault("connection", {"state": "connecting"})
    states.setdefault("permissions", {"pending": 0})
    states.update(ctx.stats.snapshot())
    return states


def log_snapshot(ctx: UplinkContext) -> None:
    logger.bind(actor="status").info("snapshot {}", json.dumps(snapshot(ctx), sort_keys=True))
