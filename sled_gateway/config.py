"""Validated settings of the reference gateway (shared by the library and the CLI)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from protocol import ConfigError, Decision, printable
from protocol.options import positive_int, positive_seconds

#: Largest MCP body relayed; JSON escaping inside the frame can grow it, and
#: the uplink accepts frames up to 16 MiB.
MAX_MCP_BODY = 8 * 1024 * 1024
#: WebSocket message limit, matching the uplink's.
MAX_FRAME = 16 * 1024 * 1024


def load_sled_tokens(path: str | Path) -> dict[str, str]:
    """Read a ``--sled-tokens`` file: a JSON object ``{"<project>": "<token>", ...}``.

    Errors name the file and the project, never a token.
    """
    try:
        text = Path(path).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError("--sled-tokens", f"cannot read {str(path)!r}: {reason}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        # The position only: the message of a JSON error can quote the text.
        where = f"line {exc.lineno}" if hasattr(exc, "lineno") else "somewhere"
        raise ConfigError("--sled-tokens", f"{str(path)!r} is not JSON ({where})") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(
            "--sled-tokens", f'{str(path)!r} must hold a JSON object {{"project": "token", ...}}'
        )
    return check_sled_tokens(data)


def check_sled_tokens(data: Mapping[Any, Any]) -> dict[str, str]:
    """Validate a project → token mapping (non-empty strings, one token per project)."""
    out: dict[str, str] = {}
    owner: dict[str, str] = {}
    for project, token in data.items():
        if not isinstance(project, str) or not project:
            raise ConfigError("--sled-tokens", "every project name must be a non-empty string")
        if not isinstance(token, str) or not token:
            raise ConfigError(
                "--sled-tokens",
                f"the token of {printable(project, 80)!r} must be a non-empty string",
            )
        if token in owner:
            raise ConfigError(
                "--sled-tokens",
                f"projects {printable(owner[token], 80)!r} and {printable(project, 80)!r} "
                "share a token; each sled needs its own",
            )
        owner[token] = project
        out[project] = token
    return out


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """What the gateway does.

    ``token`` is the one shared sled token (demos); ``sled_tokens`` maps each
    project to its own. With neither, any sled may connect (``--no-auth``).
    The operator token is always required: the console and API are never open.
    """

    operator_token: str = ""
    token: str | None = None
    sled_tokens: Mapping[str, str] = field(default_factory=dict)
    allowed_hosts: tuple[str, ...] = ()  # on top of the loopback names and the listen host
    auto: Decision | None = None  # answer every permission request at once
    heartbeat_interval: float = 10.0  # sleds are stale after 3 missed intervals
    mcp_timeout: float = 30.0
    ping_interval: float | None = 20.0  # WebSocket keepalive towards sleds
    ping_timeout: float | None = 20.0
    max_mcp_body: int = MAX_MCP_BODY
    max_relays_per_sled: int = 8  # concurrent MCP relays to one sled; 503 beyond
    max_pending_per_sled: int = 1000  # pending permission requests of one sled; denied beyond
    forget_disconnected_after: float = 3600.0  # drop a gone sled's record after this long
    identity_timeout: float = 10.0  # an accepted sled must identify within this
    header_timeout: float = 10.0  # an HTTP request head must arrive within this
    max_connections: int = 200  # open TCP connections; idle ones are evicted first

    @property
    def body_timeout(self) -> float:
        """How long a request body may take to arrive, once its head is in."""
        return 3 * self.header_timeout

    def __post_init__(self) -> None:
        if not isinstance(self.operator_token, str) or not self.operator_token:
            raise ConfigError("--operator-token", "must be a non-empty string")
        if self.token is not None and (not isinstance(self.token, str) or not self.token):
            raise ConfigError("--token", "must be a non-empty string")
        object.__setattr__(
            self, "sled_tokens", MappingProxyType(check_sled_tokens(dict(self.sled_tokens)))
        )
        sled_secrets = set(self.sled_tokens.values())
        if self.token is not None and self.token in sled_secrets:
            raise ConfigError("--token", "must differ from every token in --sled-tokens")
        if self.operator_token == self.token or self.operator_token in sled_secrets:
            # A sled's credential must never open the console.
            raise ConfigError("--operator-token", "must differ from every sled token")
        for option, number in (
            ("--max-relays-per-sled", self.max_relays_per_sled),
            ("--max-pending-per-sled", self.max_pending_per_sled),
            ("--max-connections", self.max_connections),
        ):
            positive_int(option, number)
        positive_seconds("--forget-disconnected-after", self.forget_disconnected_after)
        positive_seconds("--identity-timeout", self.identity_timeout)
        positive_seconds("--header-timeout", self.header_timeout)
        if self.auto is not None and self.auto not in (Decision.APPROVE, Decision.DENY):
            raise ConfigError("--auto", "must be approve or deny")
        positive_seconds("--heartbeat-interval", self.heartbeat_interval)
        positive_seconds("--mcp-timeout", self.mcp_timeout)
        for name, v in (("ping_interval", self.ping_interval), ("ping_timeout", self.ping_timeout)):
            if v is not None:
                positive_seconds(name, v)
