"""The reference sled gateway: the upstream end of the uplink.

It accepts sled WebSockets at ``/api/sled-uplink?token=…``, tracks each sled's
identity and heartbeat, turns ``perm_request`` frames into pending items that
a policy (``auto``), the terminal or the web console answers, and relays MCP
JSON-RPC posted to ``/sleds/{project}/mcp`` to that sled as ``mcp_request``.

Everything but ``GET /healthz`` and the sled WebSocket needs the operator
token (a bearer header, or the console's session cookie), and every request
passes a Host allowlist and CSRF checks first (:mod:`sled_gateway.http.guard`).

It is a test peer and a demo, not a production gateway: one process, live
state in memory, and the audit log and rules in a SQLite file (``--db``).
Run it with ``run_gateway.py`` (console script ``sled-gateway``) or embed
:class:`Gateway` (see :mod:`sled_gateway.server`).
"""

from sled_gateway.approvals import Forbidden, NotRecorded
from sled_gateway.config import GatewayConfig
from sled_gateway.principal import Channel, Principal, Role
from sled_gateway.records import (
    AlreadyDecided,
    DecisionRecord,
    InputMismatch,
    PendingPermission,
    UnknownRequest,
)
from sled_gateway.server import Gateway
from sled_gateway.state import SledState

__all__ = [
    "AlreadyDecided",
    "Channel",
    "DecisionRecord",
    "Forbidden",
    "Gateway",
    "GatewayConfig",
    "InputMismatch",
    "NotRecorded",
    "PendingPermission",
    "Principal",
    "Role",
    "SledState",
    "UnknownRequest",
]
