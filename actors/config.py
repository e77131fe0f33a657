"""The uplink's configuration: one frozen object, checked before anything starts."""

from __future__ import annotations

import math
import os
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from protocol import ConfigError, redact
from protocol.urls import with_token
from protocol.version import __version__

MiB = 1024 * 1024

# Tools whose PreToolUse hook the ingress answers "no decision" without asking
# the gateway: they only read the workspace, and PreToolUse fires on every
# call, so forwarding them would flood the humans with questions Claude Code
# itself never asks. WebFetch/WebSearch are absent on purpose: they send data out.
DEFAULT_HOOK_NEVER_FORWARD: tuple[str, ...] = (
    "Read",
    "Glob",
    "Grep",
    "LS",
    "NotebookRead",
    "TodoWrite",
    "BashOutput",
)


def _default_project() -> str:
    return Path.cwd().name or "sled"


@dataclass(frozen=True, slots=True, repr=False)
class UplinkConfig:
    """Everything PROTOCOL.md §2 lets a user set. Durations are seconds.

    An empty ``upstream_url`` disables the uplink. ``listen=None`` runs no
    local HTTP ingress (the library default; the command defaults to
    ``127.0.0.1:3002``).
    """

    upstream_url: str = ""
    project: str = field(default_factory=_default_project)
    local_mcp_url: str = "http://127.0.0.1:3001/mcp"
    listen: str | None = None
    heartbeat_interval: float = 10.0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    backoff_multiplier: float = 2.0
    backoff_reset_after: float = 30.0
    permission_timeout: float = 120.0
    max_pending: int = 10_000
    mcp_timeout: float = 120.0
    mcp_concurrency: int = 16
    mcp_max_response_bytes: int = 8 * MiB
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    open_timeout: float = 10.0
    close_timeout: float = 1.0
    max_frame_bytes: int = 16 * MiB
    ca_file: str | None = None
    status_interval: float = 60.0
    # The gateway token kept out of the URL text (--token-file, env
    # HUSKIES_UPSTREAM_TOKEN); it still travels as the URL's ?token=.
    upstream_token: str | None = None
    # The local ingress's request checks (DNS rebinding, CSRF, local users).
    ingress_token: str | None = None
    ingress_allowed_hosts: tuple[str, ...] = ()
    # The tool inputs undecided requests may hold in memory, all together.
    max_pending_bytes: int = 64 * MiB
    # Claude Code (/mcp and /hooks/claude-code on the ingress): how often a
    # waiting permission_prompt call sends progress, and the tools whose
    # PreToolUse hook is never forwarded (answered "no decision").
    claude_progress_interval: float = 10.0
    hook_never_forward: tuple[str, ...] = DEFAULT_HOOK_NEVER_FORWARD
    # Extra identity keys; the token never goes here (it rides in the URL).
    identity_extra: dict[str, object] = field(default_factory=lambda: {"version": __version__})

    def __repr__(self) -> str:
        def shown(name: str) -> str:
            value = getattr(self, name)
            if name in _SECRET_FIELDS and value is not None:
                return "'***'"
            return repr(value)

        return redact(
            "UplinkConfig("
            + ", ".join(f"{name}={shown(name)}" for name in self.__dataclass_fields__)
            + ")"
        )

    @property
    def connect_url(self) -> str:
        """The URL the connection dials: ``upstream_url`` with ``upstream_token``
        as its ``?token=`` (added or replaced) when one is set."""
        if self.upstream_token and self.upstream_url:
            return with_token(self.upstream_url, self.upstream_token)
        return self.upstream_url

    @property
    def enabled(self) -> bool:
        return bool(self.upstream_url)

    @property
    def listen_address(self) -> tuple[str, int] | None:
        return None if self.listen is None else parse_listen(self.listen)

    def validate(self) -> UplinkConfig:
        """Raise :class:`ConfigError` naming the first unusable value; return self."""
        if self.upstream_url:
            parts = urlsplit(self.upstream_url)
            if parts.scheme not in ("ws", "wss"):
                raise ConfigError("--upstream-gateway", "must be a ws:// or wss:// URL")
            if not parts.hostname:
                raise ConfigError("--upstream-gateway", "has no host")
        if not self.project or not self.project.strip():
            raise ConfigError("--project", "must not be empty")
        mcp = urlsplit(self.local_mcp_url)
        if mcp.scheme not in ("http", "https") or not mcp.hostname:
            raise ConfigError("--local-mcp-url", "must be an http:// or https:// URL")
        durations = {
            "--heartbeat-interval": self.heartbeat_interval,
            "--backoff-initial": self.backoff_initial,
            "--backoff-max": self.backoff_max,
            "--backoff-reset-after": self.backoff_reset_after,
            "--permission-timeout": self.permission_timeout,
            "--mcp-timeout": self.mcp_timeout,
            "--ping-interval": self.ping_interval,
            "--ping-timeout": self.ping_timeout,
            "--open-timeout": self.open_timeout,
            "--status-interval": self.status_interval,
            "--claude-progress-interval": self.claude_progress_interval,
        }
        for option, value in durations.items():
            if not value > 0 or math.isinf(value):  # NaN fails "> 0" too
                raise ConfigError(
                    option, f"must be a number of seconds greater than 0, not {value}"
                )
        if self.backoff_max < self.backoff_initial:
            raise ConfigError("--backoff-max", "must not be less than --backoff-initial")
        if not self.backoff_multiplier >= 1 or self.backoff_multiplier == float("inf"):
            raise ConfigError("--backoff-multiplier", "must be at least 1")
        if self.max_pending < 1:
            raise ConfigError("--max-pending", "must be at least 1")
        if self.max_pending_bytes < 1:
            raise ConfigError("--max-pending-bytes", "must be at least 1")
        if self.upstream_token is not None and not self.upstream_token.strip():
            raise ConfigError("--token-file", "the gateway token is empty")
        if self.ingress_token is not None and not self.ingress_token.strip():
            raise ConfigError("--ingress-token", "must not be empty")
        for host in self.ingress_allowed_hosts:
            if not host or any(c in host for c in "/ @?#") or host != host.strip():
                raise ConfigError(
                    "--ingress-allowed-host", f"expected a host name or address, got {host!r}"
                )
        if self.mcp_concurrency < 1:
            raise ConfigError("--mcp-concurrency", "must be at least 1")
        if self.ca_file is not None:
            _check_ca_file(self.ca_file)
        if self.listen is not None:
            parse_listen(self.listen)
        return self


_SECRET_FIELDS = frozenset({"upstream_token", "ingress_token"})


def _check_ca_file(path: str) -> None:
    """ConfigError unless ``path`` holds loadable CA certificates (else every
    wss:// connect would fail the same way, forever, after the start)."""
    if not os.path.isfile(path):
        raise ConfigError("--ca-file", f"no such file: {path}")
    try:
        ssl.create_default_context().load_verify_locations(cafile=path)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise ConfigError("--ca-file", f"cannot load CA certificates from {path}: {exc}") from None


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) → (host, port); ConfigError if not."""
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError("--listen", f"expected HOST:PORT, got {text!r}")
    return host, int(port_text)


def check_bindable(address: tuple[str, int]) -> None:
    """ConfigError if ``address`` cannot be bound now (port in use, bad host)."""
    host, port = address
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, sockaddr = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(sockaddr)
    except OSError as exc:
        raise ConfigError(
            "--listen", f"cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from None
