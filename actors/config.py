"""The uplink's configuration: one frozen object, checked before anything starts.

Its fields are also the command line's options: each carries the option's
name, environment variable, help and value rule (:func:`actors.cli.option`),
and ``run_uplink.py`` builds its parser from them.
"""

from __future__ import annotations

import os
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from actors.cli import check_fields, library_only, option
from protocol import ConfigError, redact
from protocol.options import (
    NO_LISTEN,
    MiB,
    at_least_one,
    byte_size,
    host_name,
    name_list,
    non_empty,
    parse_listen,
    positive_int,
    positive_seconds,
)
from protocol.urls import with_token
from protocol.version import __version__

#: The command's ingress address (the library runs none unless asked).
DEFAULT_LISTEN = "127.0.0.1:3002"

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


def _owner(option: str, value: str) -> str | None:
    """The email of the person the sled works for (empty: none)."""
    value = value.strip()
    if not value:
        return None
    if len(value) > 320 or any(ord(c) < 33 or ord(c) == 127 for c in value):
        raise ConfigError(option, "expected the owner's email address (no spaces)")
    return value


#: What separates the gateway URLs in one ``--upstream-gateway`` value and in
#: its variable (a comma inside a URL is written %2C).
URL_SEPARATOR = ","


def split_urls(value: str) -> tuple[str, ...]:
    """The URLs of an ``upstream_url`` value; empty for the empty value (disabled)."""
    return tuple(part.strip() for part in value.split(URL_SEPARATOR)) if value.strip() else ()


def _ws_url(option: str, value: str) -> str:
    """One or more ws:// or wss:// URLs with a host, comma-separated; empty means
    "disabled", but an empty URL beside others is refused (a stray comma)."""
    for url in split_urls(value):
        if not url:
            raise ConfigError(option, "an empty URL in the list (a stray comma?)")
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            # redact(): the URL may carry the token.
            raise ConfigError(option, f"expected a ws:// or wss:// URL, not {redact(url)!r}")
    return value


def _http_url(option: str, value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(option, f"expected an http:// or https:// URL, not {redact(value)!r}")
    return value


def _listen(option: str, value: str) -> str | None:
    """HOST:PORT, or one of the words that turn the ingress off (→ None)."""
    if value.strip().lower() in NO_LISTEN:
        return None
    parse_listen(option, value)
    return value


def _ca_file(option: str, path: str) -> str:
    """``path`` if it holds loadable CA certificates (else every wss:// connect
    would fail the same way, forever, after the start)."""
    if not os.path.isfile(path):
        raise ConfigError(option, f"expected a file of CA certificates, not {path!r}")
    try:
        ssl.create_default_context().load_verify_locations(cafile=path)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise ConfigError(option, f"cannot load CA certificates from {path!r}: {exc}") from None
    return path


@dataclass(frozen=True, slots=True, repr=False)
class UplinkConfig:
    """Everything a user can set. Durations are seconds.

    An empty ``upstream_url`` disables the uplink. ``listen=None`` (or
    ``"off"``) runs no local HTTP ingress (the library default; the command
    defaults to ``127.0.0.1:3002``).

    Each field that the command exposes carries its :class:`~actors.cli.Option`
    in its metadata (the option, the environment variable, help, and the
    value rule): ``run_uplink.py`` builds its parser from them and
    :meth:`validate` applies the same rules, so the two cannot disagree.
    """

    upstream_url: str = option(
        "",
        "--upstream-gateway",
        "ws:// or wss:// URL of the gateway's /api/sled-uplink (may carry ?token=, "
        "but --token-file keeps it out of the process list); unset disables the uplink. "
        "Repeat it (or separate URLs with commas) for several gateway replicas: they are "
        "tried in a shuffled order, the next one after each ended or failed connection",
        rule=_ws_url,
        metavar="URL",
        join=URL_SEPARATOR,
        env="HUSKIES_UPSTREAM_GATEWAY",
        shown_default="unset",
    )
    project: str = option(
        "",
        "--project",
        "name this sled identifies as",
        rule=non_empty,
        metavar="NAME",
        env="HUSKIES_PROJECT",
        default_factory=_default_project,
        shown_default="the current directory's name",
    )
    owner: str | None = option(
        None,
        "--owner",
        "email of the person this sled works for, sent in the identity frame: the "
        "gateway never counts their vote alone toward a quorum on this sled's requests",
        rule=_owner,
        metavar="EMAIL",
        env="HUSKIES_OWNER",
        shown_default="none",
    )
    local_mcp_url: str = option(
        "http://127.0.0.1:3001/mcp",
        "--local-mcp-url",
        "the sled's own MCP endpoint, where mcp_requests are replayed",
        rule=_http_url,
        metavar="URL",
        env="HUSKIES_LOCAL_MCP_URL",
    )
    listen: str | None = option(
        None,
        "--listen",
        "local HTTP ingress; 'off' disables it",
        rule=_listen,
        metavar="HOST:PORT",
        env="HUSKIES_UPLINK_LISTEN",
        cli_default=DEFAULT_LISTEN,
    )
    heartbeat_interval: float = option(
        10.0, "--heartbeat-interval", "seconds between heartbeats", rule=positive_seconds
    )
    backoff_initial: float = option(
        1.0, "--backoff-initial", "first reconnect wait (jittered)", rule=positive_seconds
    )
    backoff_max: float = option(
        60.0, "--backoff-max", "longest reconnect wait", rule=positive_seconds
    )
    backoff_multiplier: float = option(
        2.0,
        "--backoff-multiplier",
        "each failed connect multiplies the wait by this",
        rule=at_least_one,
        metavar="X",
    )
    backoff_reset_after: float = option(
        30.0,
        "--backoff-reset-after",
        "a session up this long resets the back-off",
        rule=positive_seconds,
    )
    permission_timeout: float = option(
        120.0,
        "--permission-timeout",
        "deny a permission request the gateway has not answered within this",
        rule=positive_seconds,
    )
    max_pending: int = option(
        10_000,
        "--max-pending",
        "deny a permission request at once when this many are undecided",
        rule=positive_int,
        metavar="N",
    )
    mcp_timeout: float = option(
        120.0,
        "--mcp-timeout",
        "how long a replayed MCP request may take at the local endpoint",
        rule=positive_seconds,
    )
    mcp_concurrency: int = option(
        16,
        "--mcp-concurrency",
        "MCP requests replayed at the same time; more wait their turn",
        rule=positive_int,
        metavar="N",
    )
    mcp_max_response_bytes: int = option(
        8 * MiB,
        "--mcp-max-bytes",
        "largest local MCP answer accepted (e.g. 8MiB)",
        rule=byte_size,
        metavar="N",
    )
    ping_interval: float = option(
        20.0, "--ping-interval", "WebSocket keepalive ping interval", rule=positive_seconds
    )
    ping_timeout: float = option(
        20.0,
        "--ping-timeout",
        "WebSocket keepalive: drop the session if no pong within this",
        rule=positive_seconds,
    )
    open_timeout: float = option(
        10.0, "--open-timeout", "give up a connect/handshake after this", rule=positive_seconds
    )
    close_timeout: float = library_only(1.0, "close_timeout", positive_seconds)
    max_frame_bytes: int = library_only(16 * MiB, "max_frame_bytes", byte_size)
    ca_file: str | None = option(
        None,
        "--ca-file",
        "extra CA certificate(s) for wss:// (the system's stay trusted)",
        rule=_ca_file,
        metavar="PATH",
        shown_default="none",
    )
    status_interval: float = option(
        60.0,
        "--status-interval",
        "how often to log the snapshot of every actor's state",
        rule=positive_seconds,
    )
    # The gateway token kept out of the URL text (--token-file, env
    # HUSKIES_UPSTREAM_TOKEN); it still travels as the URL's ?token=.
    upstream_token: str | None = None
    # The local ingress's request checks (DNS rebinding, CSRF, local users).
    ingress_token: str | None = option(
        None,
        "--ingress-token",
        "require 'Authorization: Bearer TOKEN' on every ingress endpoint but /healthz "
        "(prefer the environment variable: argv is visible to other users)",
        rule=non_empty,
        metavar="TOKEN",
        env="HUSKIES_UPLINK_INGRESS_TOKEN",
        secret=True,
        shown_default="none, no token needed",
    )
    ingress_allowed_hosts: tuple[str, ...] = option(
        (),
        "--ingress-allowed-host",
        "also accept this Host header at the ingress (repeatable; others get 421)",
        rule=host_name,
        metavar="HOST",
        repeat=True,
        shown_default="localhost, 127.0.0.1, [::1] and the --listen host",
    )
    # The ingress's deadlines and connection caps (slow heads and bodies).
    ingress_header_timeout: float = option(
        10.0,
        "--ingress-header-timeout",
        "close an ingress connection whose request head is not in within this",
        rule=positive_seconds,
    )
    ingress_request_timeout: float = option(
        30.0,
        "--ingress-request-timeout",
        "a whole ingress request (head and body) must be in within this; else 408 "
        "(the wait for a decision afterwards is not counted)",
        rule=positive_seconds,
    )
    ingress_max_connections: int = option(
        2048,
        "--ingress-max-connections",
        "open ingress connections; beyond, idle ones are closed first",
        rule=positive_int,
        metavar="N",
    )
    # Half the total: every local caller shares one address (127.0.0.1), and a
    # burst of hooks from many agents is legitimate; the request deadline bounds
    # how long a slow client holds its share.
    ingress_max_connections_per_client: int = option(
        1024,
        "--ingress-max-connections-per-client",
        "ingress connections one client address may have receiving a request (head or "
        "body); beyond, its own oldest are closed",
        rule=positive_int,
        metavar="N",
    )
    # The tool inputs undecided requests may hold in memory, all together.
    max_pending_bytes: int = option(
        64 * MiB,
        "--max-pending-bytes",
        "deny a permission request at once when the undecided ones would hold more than "
        "this many bytes of tool input together (e.g. 64MiB)",
        rule=byte_size,
        metavar="N",
    )
    # Claude Code (/mcp and /hooks/claude-code on the ingress): how often a
    # waiting permission_prompt call sends progress, and the tools whose
    # PreToolUse hook is never forwarded (answered "no decision").
    claude_progress_interval: float = option(
        10.0,
        "--claude-progress-interval",
        "how often a waiting Claude Code permission prompt (/mcp) gets a progress note",
        rule=positive_seconds,
    )
    hook_never_forward: tuple[str, ...] = option(
        DEFAULT_HOOK_NEVER_FORWARD,
        "--hook-never-forward",
        "comma-separated tools whose PreToolUse hook is never forwarded (no decision)",
        rule=name_list,
        metavar="TOOLS",
    )
    # Extra identity keys; the token never goes here (it rides in the URL).
    identity_extra: dict[str, object] = field(default_factory=lambda: {"version": __version__})

    @property
    def identity_payload(self) -> dict[str, object]:
        """The identity frame's keys beside the project: ``owner`` only when set."""
        if self.owner is None:
            return self.identity_extra
        return {**self.identity_extra, "owner": self.owner}

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
        """The first URL the connection dials: ``upstream_url`` with ``upstream_token``
        as its ``?token=`` (added or replaced) when one is set; with several gateway
        URLs, the first of :attr:`gateway_urls`."""
        urls = self.gateway_urls
        return urls[0] if urls else ""

    @property
    def gateway_urls(self) -> tuple[str, ...]:
        """Every gateway URL to dial, each with ``upstream_token`` as its ``?token=``
        when one is set (``upstream_url`` may list several, comma-separated)."""
        urls = split_urls(self.upstream_url)
        if self.upstream_token:
            return tuple(with_token(url, self.upstream_token) for url in urls)
        return urls

    @property
    def enabled(self) -> bool:
        return bool(self.upstream_url.strip())  # split_urls's test, without the split

    @property
    def listen_address(self) -> tuple[str, int] | None:
        """The ingress's (host, port), or None when it is off."""
        if self.listen is None or _listen("--listen", self.listen) is None:
            return None
        return parse_listen("--listen", self.listen)

    def validate(self) -> UplinkConfig:
        """Raise :class:`ConfigError` naming the first unusable value; return self.

        Each field goes through the same rule as its command-line option;
        then the checks that relate two fields.
        """
        check_fields(self)
        if self.backoff_max < self.backoff_initial:
            raise ConfigError(
                "--backoff-max",
                f"expected at least --backoff-initial ({self.backoff_initial:g}), "
                f"not {self.backoff_max:g}",
            )
        if self.upstream_token is not None and not self.upstream_token.strip():
            raise ConfigError("--token-file", "the gateway token is empty")
        return self


_SECRET_FIELDS = frozenset({"upstream_token", "ingress_token"})


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
