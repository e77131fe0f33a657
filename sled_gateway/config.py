"""The gateway's settings: one frozen object, each field declared once.

Every field carries its :class:`~actors.cli.Option` (flag, environment
variable, help, value rule, default), as the uplink's ``UplinkConfig`` does:
``run_gateway.py`` builds its parser and ``--help`` from them,
``scripts/gen-cli-docs.py`` the table of docs/command-line.md, and
:class:`~sled_gateway.server.Gateway` takes the same names as keywords.
A field without a flag (``host``, ``port``, ``sled_tokens``…) is set by a
command option that is not a plain value (``--listen``, the ``--sled-tokens``
file) or only by the library; its rule still applies.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import SplitResult, urlsplit

from actors.cli import OPTION, Option, check_fields, library_only, option
from protocol import ConfigError, Decision, printable
from protocol.options import byte_size, positive_int, positive_number, positive_seconds
from sled_gateway.access import Access
from sled_gateway.auth.login_limits import LOGIN_RATE, MAX_LOGINS
from sled_gateway.http.guard import AllowedHosts
from sled_gateway.store import MEMORY

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Largest MCP body relayed; JSON escaping inside the frame can grow it, and
#: the uplink accepts frames up to 16 MiB.
MAX_MCP_BODY = 8 * 1024 * 1024
#: WebSocket message limit, matching the uplink's: an ``mcp_response`` carries
#: an MCP answer of up to 8 MiB (the uplink's --mcp-max-bytes), which JSON
#: escaping can grow.
MAX_FRAME = 16 * 1024 * 1024
#: Room in a ``perm_request`` frame beside its tool input (envelope, id, name).
FRAME_SLACK = 64 * 1024


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


TOKEN_ENV = "SLED_GATEWAY_TOKEN"
OPERATOR_TOKEN_ENV = "SLED_GATEWAY_OPERATOR_TOKEN"

#: ``--db``'s default as ``--help`` shows it: the command's own file
#: (run_gateway.py), or nothing kept when asked.
DEFAULT_DB_SHOWN = "$XDG_DATA_HOME/sled-gateway/gateway.db; ':memory:' keeps nothing"


def new_operator_token() -> str:
    """A fresh operator token (the console URL printed at start carries it)."""
    return secrets.token_urlsafe(24)


# ── value rules of the gateway's own options ────────────────────────────────
# Each takes (option, value) like those of protocol.options: the command
# line's text or a library caller's typed value, and returns the value to use.


def _token(option: str, value: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(option, "must be a non-empty string")
    return value


def _auto(option: str, value: Decision | str) -> Decision:
    """``approve`` or ``deny`` (or that :class:`Decision`): every request's answer."""
    word = value.value if isinstance(value, Decision) else value
    if word not in (Decision.APPROVE.value, Decision.DENY.value):
        raise ConfigError(option, f"expected approve or deny, not {value!r}")
    return Decision(word)


def _allowed_host(option: str, value: str) -> str:
    """A Host name or HOST:PORT, as the Host allowlist reads it."""
    try:
        if not isinstance(value, str) or not value.strip() or "/" in value:
            raise ValueError(value)
        AllowedHosts([value])
    except ValueError:
        raise ConfigError(option, f"expected HOST or HOST:PORT, not {value!r}") from None
    return value


def _host(option: str, value: str) -> str:
    """The address to bind: a name or an address (0.0.0.0 or :: for every one)."""
    if not isinstance(value, str) or any(c in value for c in "/ @?#"):
        raise ConfigError(option, f"expected a host name or address, not {value!r}")
    return value


def _port(option: str, value: int) -> int:
    """0 to 65535; 0 asks the system for a free port."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ConfigError(option, f"expected a port from 0 to 65535, not {value!r}")
    return value


def _days(option: str, value: float | str) -> float | None:
    """Days > 0, or 0 (``--audit-retention-days 0``) to keep every row."""
    if not isinstance(value, bool) and value in (0, "0"):
        return None
    return positive_number(option, value, "days")


def _drain_seconds(option: str, value: float | str) -> float:
    """Finite seconds, 0 or more (0: every sled closed at once)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number < 0:
        raise ConfigError(option, f"expected a number of seconds, 0 or more, not {value!r}")
    return number


def _db(option: str, value: str | os.PathLike[str]) -> str | os.PathLike[str]:
    if not isinstance(value, str | os.PathLike) or not os.fspath(value):
        raise ConfigError(
            option, f"expected a file path, ':memory:' or a postgresql:// URL, not {value!r}"
        )
    return value


def _bus(option: str, value: str) -> str:
    """``local``, or NATS URLs (``nats://``/``tls://``) with a host, comma-separated."""
    if value == "local":
        return value
    urls = value.split(",") if isinstance(value, str) else []
    for url in urls:
        scheme, sep, rest = url.strip().partition("://")
        if not sep or scheme not in ("nats", "tls") or not rest.strip("/"):
            # The value itself is not quoted: a URL may carry a password.
            raise ConfigError(option, "expected 'local' or nats://HOST:PORT (or tls://), not that")
    if not urls:
        raise ConfigError(option, "expected 'local' or nats://HOST:PORT (or tls://), not that")
    return value


def redact_userinfo(urls: str) -> str:
    """``nats://user:secret@host`` → ``nats://***@host``, for logs and reprs."""
    return _USERINFO.sub(r"\1***@", urls)


_USERINFO = re.compile(r"(://)[^/@,]*@")


def _cap_bytes(option: str, value: int | str) -> int | None:
    """A byte count, or 0 for no cap."""
    if not isinstance(value, bool) and value in (0, "0"):
        return None
    return byte_size(option, value)


def _issuer(option: str, value: str) -> str:
    """An OpenID Provider's issuer URL: https, or http on a loopback address (tests, a
    provider beside the gateway); the ID tokens' ``iss`` must equal what its discovery says."""
    parts: SplitResult | None = None
    host: str | None = None
    try:
        parts = urlsplit(value) if isinstance(value, str) else None
        host = parts.hostname if parts is not None else None
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not host or parts.query:
        raise ConfigError(
            option, f"expected the provider's issuer URL (https://...), not {value!r}"
        )
    if parts.scheme == "http" and host not in ("localhost", "127.0.0.1", "::1"):
        raise ConfigError(option, "must be https:// (http only for a provider on loopback)")
    return value


def read_client_secret(path: str | os.PathLike[str]) -> str:
    """The OpenID Connect client secret: the file's first line, never shown in errors."""
    try:
        text = Path(path).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(
            "--oidc-client-secret-file", f"cannot read {str(path)!r}: {reason}"
        ) from None
    secret = text.strip()
    if not secret or "\n" in secret:
        raise ConfigError(
            "--oidc-client-secret-file", f"{str(path)!r} must hold the secret on one line"
        )
    return secret


def _secret_file(option: str, value: str | os.PathLike[str]) -> str | os.PathLike[str]:
    if not isinstance(value, str | os.PathLike) or not os.fspath(value):
        raise ConfigError(option, f"expected a file path, not {value!r}")
    read_client_secret(value)  # unreadable or empty: an error at start, not at the first login
    return value


def _sled_tokens(option: str, value: Mapping[Any, Any]) -> Mapping[str, str]:
    if not isinstance(value, Mapping):
        raise ConfigError(option, 'expected a mapping {"project": "token", ...}')
    return MappingProxyType(check_sled_tokens(dict(value)))


def parse_trusted_proxies(value: str) -> tuple[IPNetwork, ...]:
    """``--trusted-proxy``'s checked text as the networks it names."""
    return tuple(ipaddress.ip_network(item) for item in value.split(",") if item)


def _trusted_proxy(option: str, value: str | Iterable[str]) -> str:
    """Addresses or CIDRs, comma-separated (or a library caller's list of them): the
    peers whose PROXY protocol header is believed. Returned as one normalised text."""
    items = value.split(",") if isinstance(value, str) else list(value)
    networks = []
    for item in items:
        text = item.strip() if isinstance(item, str) else ""
        try:
            # strict: 10.0.0.5/8 names a host and a network at once, most likely a typo.
            networks.append(ipaddress.ip_network(text, strict=True))
        except ValueError:
            raise ConfigError(
                option,
                f"expected addresses or CIDRs, comma-separated (10.0.0.2, 10.0.1.0/24), "
                f"not {printable(str(item), 80)!r}",
            ) from None
    if not networks:
        raise ConfigError(option, "expected at least one address or CIDR")
    return ",".join(str(n) for n in networks)


def _access(option: str, value: Any) -> Access:
    if not isinstance(value, Access):
        raise ConfigError(option, "expected the access file's grants (sled_gateway.access.Access)")
    return value


@dataclass(frozen=True, slots=True, repr=False)
class GatewayConfig:
    """What the gateway does. Durations are seconds.

    ``token`` is the one shared sled token (demos); ``sled_tokens`` maps each
    project to its own. With neither, any sled may connect (``--no-auth``).
    The operator token is always required: the console and API are never
    open; one is generated when none is given.

    Each value goes through its option's rule when the object is made (text
    becomes the typed value, e.g. ``auto="approve"`` → ``Decision.APPROVE``),
    then the checks that relate two fields; a bad one raises
    :class:`ConfigError` naming the option.
    """

    host: str = library_only("127.0.0.1", "host", _host)  # --listen sets it
    port: int = library_only(0, "port", _port)  # --listen sets it
    operator_token: str = option(
        None,
        "--operator-token",
        "the operator's token for the console, REST API and MCP relay "
        "(prefer the environment variable: arguments show in ps)",
        rule=_token,
        metavar="TOKEN",
        env=OPERATOR_TOKEN_ENV,
        secret=True,
        default_factory=new_operator_token,
        shown_default="a new one, printed once in the console URL",
    )
    token: str | None = option(
        None,
        "--token",
        "the one shared sled token, for demos: any sled not in --sled-tokens may present "
        "it as ?token= (prefer the environment variable: arguments show in ps)",
        rule=_token,
        metavar="TOKEN",
        env=TOKEN_ENV,
        secret=True,
    )
    # The --sled-tokens FILE's content (run_gateway.py reads it).
    sled_tokens: Mapping[str, str] = field(
        default_factory=dict,
        metadata={OPTION: Option("", "--sled-tokens", rule=_sled_tokens)},
    )
    # The --access FILE's content (run_gateway.py reads it): people's roles and quorums.
    access: Access | None = field(
        default=None, metadata={OPTION: Option("", "--access", rule=_access)}
    )
    allowed_hosts: tuple[str, ...] = option(
        (),
        "--allowed-host",
        "a Host name (or HOST:PORT) the gateway answers to, repeatable (DNS-rebinding guard)",
        rule=_allowed_host,
        metavar="HOST",
        repeat=True,
        shown_default="localhost, 127.0.0.1, [::1] and the --listen host",
    )
    auto: Decision | None = option(  # noqa: RUF009 (option() returns a dataclasses.field)
        None,
        "--auto",
        "answer every permission request at once: approve or deny",
        rule=_auto,
        metavar="approve|deny",
        shown_default="none, people answer",
    )
    heartbeat_interval: float = option(
        10.0,
        "--heartbeat-interval",
        "sleds' heartbeat interval; a sled is stale after 3 missed",
        rule=positive_seconds,
    )
    mcp_timeout: float = option(
        30.0, "--mcp-timeout", "how long an MCP relay waits for the sled", rule=positive_seconds
    )
    ping_interval: float | None = library_only(20.0, "ping_interval", positive_seconds)
    ping_timeout: float | None = library_only(20.0, "ping_timeout", positive_seconds)
    max_mcp_body: int = library_only(MAX_MCP_BODY, "max_mcp_body", byte_size)
    max_relays_per_sled: int = option(
        8,
        "--max-relays-per-sled",
        "MCP relays in flight to one sled; 503 beyond",
        rule=positive_int,
        metavar="N",
    )
    bus: str = option(
        "local",
        "--bus",
        "'local' (one process) or the NATS server(s) replicas share: nats://HOST:PORT, "
        "comma-separated for a cluster",
        rule=_bus,
        metavar="local|URL",
    )
    max_pending_per_sled: int = option(
        1000,
        "--max-pending-per-sled",
        "pending permission requests of one sled; more are denied",
        rule=positive_int,
        metavar="N",
    )
    max_input_bytes: int = option(
        1024 * 1024,
        "--max-input-bytes",
        "deny a permission request at once when its tool input (canonical JSON) is larger "
        "(e.g. 1MiB)",
        rule=byte_size,
        metavar="N",
    )
    max_pending_bytes_per_sled: int = option(
        64 * 1024 * 1024,
        "--max-pending-bytes-per-sled",
        "deny a permission request at once when one sled's undecided ones would hold more "
        "than this many bytes of tool input together (e.g. 64MiB)",
        rule=byte_size,
        metavar="N",
    )
    max_pending_bytes: int = option(
        256 * 1024 * 1024,
        "--max-pending-bytes",
        "the same bound over every sled together (e.g. 256MiB)",
        rule=byte_size,
        metavar="N",
    )
    max_frame_bytes: int = option(
        MAX_FRAME,
        "--max-frame-bytes",
        "largest WebSocket message a sled may send; a larger one closes its session "
        "(1009). At least --max-input-bytes plus 64KiB; an MCP answer relayed back needs "
        "room too (the uplink's --mcp-max-bytes)",
        rule=byte_size,
        metavar="N",
    )
    forget_disconnected_after: float = option(
        3600.0,
        "--forget-disconnected-after",
        "drop a disconnected sled from the state after this long",
        rule=positive_seconds,
    )
    identity_timeout: float = option(
        10.0,
        "--identity-timeout",
        "close (1008) a sled that sends no identity within this",
        rule=positive_seconds,
    )
    header_timeout: float = option(
        10.0,
        "--header-timeout",
        "close an HTTP connection whose request head is not in within this; "
        "a handler waits 3 times as long for a body (408), at most --request-timeout",
        rule=positive_seconds,
    )
    request_timeout: float = option(
        30.0,
        "--request-timeout",
        "a whole HTTP request (head and body) must be in within this, whatever the "
        "handler does; else 408 and the connection is closed",
        rule=positive_seconds,
    )
    drain_seconds: float = option(
        10.0,
        "--drain-seconds",
        "on SIGTERM, close the sleds spread over this long (1012, retry_after), then exit; "
        "0 closes them all at once",
        rule=_drain_seconds,
    )
    lease_seconds: float = option(
        10.0,
        "--lease-seconds",
        "replicas on a shared database: one that has not renewed its lease for this long "
        "is taken for dead, and the others withdraw what it held",
        rule=positive_seconds,
    )
    sweep_interval: float = option(
        2.0,
        "--sweep-interval",
        "replicas on a shared database: how often each renews its lease, releases dead "
        "replicas, delivers decisions made elsewhere and re-reads the fleet (on every "
        "sweep while the bus is away, else on one in 15)",
        rule=positive_seconds,
    )
    max_connections: int = option(
        200,
        "--max-connections",
        "open connections; beyond, idle ones are closed first",
        rule=positive_int,
        metavar="N",
    )
    max_connections_per_client: int = option(
        32,
        "--max-connections-per-client",
        "connections one client address may have receiving a request (head or body); "
        "beyond, its own oldest are closed",
        rule=positive_int,
        metavar="N",
    )
    trusted_proxy: str | None = option(
        None,
        "--trusted-proxy",
        "addresses or CIDRs of the load balancers in front (comma-separated, or repeat it): "
        "their connections must begin with a PROXY protocol v2 header (HAProxy's "
        "send-proxy-v2), whose client address then counts for the per-client caps and the "
        "logs; nobody else's header is believed (docs/deploy.md)",
        rule=_trusted_proxy,
        metavar="ADDR[,ADDR...]",
        env="SLED_GATEWAY_TRUSTED_PROXY",
        join=",",
        shown_default="none, every peer is the client",
    )
    db: str | os.PathLike[str] = option(  # noqa: RUF009 (option() returns a field)
        MEMORY,
        "--db",
        "SQLite file, or a postgresql:// URL (docs/deploy.md), for the audit log and rules",
        rule=_db,
        metavar="PATH|URL",
        cli_default=None,  # run_gateway.py puts it in $XDG_DATA_HOME
        shown_default=DEFAULT_DB_SHOWN,
    )
    audit_retention_days: float | None = option(
        90.0,
        "--audit-retention-days",
        "delete audit rows older than N days (checked at start and hourly); 0 keeps them all",
        rule=_days,
        metavar="N",
    )
    audit_max_bytes: int | None = option(
        1024 * 1024 * 1024,
        "--audit-max-bytes",
        "delete the oldest audit rows while the SQLite database holds more than this "
        "(e.g. 1GiB); 0 for no cap",
        rule=_cap_bytes,
        metavar="N",
        shown_default="1GiB",
    )
    oidc_issuer: str | None = option(
        None,
        "--oidc-issuer",
        "sign people in with this OpenID Connect provider (its issuer URL; discovery and "
        "keys are read from it): GET /login",
        rule=_issuer,
        metavar="URL",
        shown_default="none, only the operator token",
    )
    oidc_client_id: str | None = option(
        None,
        "--oidc-client-id",
        "the gateway's client id at the provider (with --oidc-issuer)",
        rule=_token,
        metavar="ID",
    )
    oidc_client_secret_file: str | os.PathLike[str] | None = option(  # noqa: RUF009
        None,
        "--oidc-client-secret-file",
        "a file holding the client's secret (a confidential client); without one the "
        "gateway is a public client (PKCE only)",
        rule=_secret_file,
        metavar="PATH",
    )
    login_rate: int = option(
        LOGIN_RATE,
        "--login-rate",
        "sign-ins (GET /login) one client address may start a minute, in bursts of twice "
        "that, and at most three times that in flight (over every replica on one database); "
        "429 beyond (docs/sign-in.md)",
        rule=positive_int,
        metavar="N",
    )
    # Logins in flight in the store at once; new ones are refused (503) beyond.
    max_logins: int = library_only(MAX_LOGINS, "max_logins", positive_int)

    def __repr__(self) -> str:
        def shown(name: str) -> str:
            value = getattr(self, name)
            if name in _SECRET_FIELDS and value:
                return "{...}" if isinstance(value, Mapping) else "'***'"
            if name == "bus":
                return repr(redact_userinfo(value))
            return repr(value)

        return f"GatewayConfig({', '.join(f'{n}={shown(n)}' for n in self.__dataclass_fields__)})"

    @property
    def trusted_proxies(self) -> tuple[IPNetwork, ...]:
        """The networks ``--trusted-proxy`` names (empty: no header is believed)."""
        return parse_trusted_proxies(self.trusted_proxy) if self.trusted_proxy else ()

    @property
    def body_timeout(self) -> float:
        """How long a handler waits for a request body, once its head is in (the
        server's whole-request deadline cuts it anyway)."""
        return min(3 * self.header_timeout, self.request_timeout)

    def __post_init__(self) -> None:
        if self.operator_token is None:  # a caller's explicit "generate one"
            object.__setattr__(self, "operator_token", new_operator_token())
        for f in fields(self):
            spec = f.metadata.get(OPTION)
            value = getattr(self, f.name)
            if spec is None or spec.rule is None or value is None:
                continue
            name = spec.flag or spec.help  # a field without a flag: its name
            if spec.repeat:
                items: Iterable[Any] = (value,) if isinstance(value, str) else value
                value = tuple(spec.rule(name, item) for item in items)
            else:
                value = spec.rule(name, value)
            object.__setattr__(self, f.name, value)
        self._check_together()

    def validate(self) -> GatewayConfig:
        """Raise :class:`ConfigError` naming the first unusable value; return self.

        The object was checked when made; this repeats it (the uplink's
        ``UplinkConfig.validate`` reads the same).
        """
        check_fields(self)
        self._check_together()
        return self

    def _check_together(self) -> None:
        if (self.oidc_issuer is None) != (self.oidc_client_id is None):
            raise ConfigError(
                "--oidc-issuer" if self.oidc_issuer is None else "--oidc-client-id",
                "--oidc-issuer and --oidc-client-id go together",
            )
        if self.oidc_client_secret_file is not None and self.oidc_issuer is None:
            raise ConfigError("--oidc-client-secret-file", "needs --oidc-issuer")
        if self.max_frame_bytes < self.max_input_bytes + FRAME_SLACK:
            raise ConfigError(
                "--max-frame-bytes",
                f"must be at least --max-input-bytes plus {FRAME_SLACK} "
                f"({self.max_input_bytes + FRAME_SLACK}), not {self.max_frame_bytes}",
            )
        if self.lease_seconds < 2 * self.sweep_interval:
            raise ConfigError(
                "--lease-seconds",
                f"must be at least twice --sweep-interval ({2 * self.sweep_interval:g}), "
                f"not {self.lease_seconds:g}: a live replica renews it at each sweep",
            )
        sled_secrets = set(self.sled_tokens.values())
        if self.token is not None and self.token in sled_secrets:
            raise ConfigError("--token", "must differ from every token in --sled-tokens")
        if self.operator_token == self.token or self.operator_token in sled_secrets:
            # A sled's credential must never open the console.
            raise ConfigError("--operator-token", "must differ from every sled token")


_SECRET_FIELDS = frozenset({"operator_token", "token", "sled_tokens"})
