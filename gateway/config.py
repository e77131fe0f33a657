"""Validated settings of the reference gateway (shared by the library and the CLI)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from protocol import ConfigError, Decision

#: Largest MCP body relayed; JSON escaping inside the frame can grow it, and
#: the uplink accepts frames up to 16 MiB (PROTOCOL.md §1).
MAX_MCP_BODY = 8 * 1024 * 1024
#: WebSocket message limit, matching the uplink's.
MAX_FRAME = 16 * 1024 * 1024


def positive_seconds(option: str, value: float | str) -> float:
    """``value`` as a finite duration > 0, else :class:`ConfigError` naming ``option``."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ConfigError(option, f"not a number: {value!r}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(option, f"must be a number of seconds greater than 0, not {value!r}")
    return seconds


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """What the gateway does; ``token=None`` means no authentication."""

    token: str | None = None
    auto: Decision | None = None  # answer every permission request at once
    heartbeat_interval: float = 10.0  # sleds are stale after 3 missed intervals
    mcp_timeout: float = 30.0
    ping_interval: float | None = 20.0  # WebSocket keepalive towards sleds
    ping_timeout: float | None = 20.0
    max_mcp_body: int = MAX_MCP_BODY

    def __post_init__(self) -> None:
        if self.token is not None and (not isinstance(self.token, str) or not self.token):
            raise ConfigError("--token", "must be a non-empty string")
        if self.auto is not None and self.auto not in (Decision.APPROVE, Decision.DENY):
            raise ConfigError("--auto", "must be approve or deny")
        positive_seconds("--heartbeat-interval", self.heartbeat_interval)
        positive_seconds("--mcp-timeout", self.mcp_timeout)
        for name, v in (("ping_interval", self.ping_interval), ("ping_timeout", self.ping_timeout)):
            if v is not None:
                positive_seconds(name, v)
