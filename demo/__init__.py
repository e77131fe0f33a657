"""The one-command demo: a gateway, an uplink and a local MCP server on loopback.

``bash scripts/demo.sh`` (which runs ``python -m demo.run``) starts all three;
``demo.ask_permission`` fires a sample permission request at the uplink, and
``demo.call_tools`` uses the sled's tools through the gateway with the MCP SDK.
"""

#: Default loopback ports; each can be overridden by its environment variable.
DEFAULT_GATEWAY_PORT = 8080
DEFAULT_MCP_PORT = 3001
DEFAULT_UPLINK_PORT = 3002
DEFAULT_PROJECT = "demo-sled"

GATEWAY_PORT_ENV = "SLED_DEMO_GATEWAY_PORT"
MCP_PORT_ENV = "SLED_DEMO_MCP_PORT"
UPLINK_PORT_ENV = "SLED_DEMO_UPLINK_PORT"
PROJECT_ENV = "SLED_DEMO_PROJECT"
LOOPBACK = "127.0.0.1"


def env_port(name: str, default: int) -> int:
    """A port from the environment variable ``name`` (``default`` when unset)."""
    import os

    from protocol.web import ascii_digits

    text = os.environ.get(name, "").strip()
    if not text:
        return default
    if not ascii_digits(text) or not 0 < int(text) < 65536:
        raise SystemExit(f"{name} must be a port number 1-65535, not {text!r}")
    return int(text)


def env_project() -> str:
    import os

    return os.environ.get(PROJECT_ENV, "").strip() or DEFAULT_PROJECT
