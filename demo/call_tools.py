"""Use the demo sled's tools through the gateway with the official MCP SDK client.

    python -m demo.call_tools --token-file /tmp/sled-demo-…/operator-token
    SLED_GATEWAY_OPERATOR_TOKEN=… python -m demo.call_tools --text "hi there"

The gateway's relay needs the operator token (``Authorization: Bearer``); it is
read from a file or the environment, never from the command line.

The gateway relays each JSON-RPC request over the sled's uplink WebSocket
(``mcp_request``); the uplink replays it against the sled's local MCP server
and sends the answer back (``mcp_response``). This client neither knows nor
cares: it is an ordinary Streamable-HTTP MCP client (``ClientSession``).

Exit status: 0 if every call worked, 1 otherwise. When the gateway refuses a request
(a wrong token: 401; no such sled: 404), the reason it gives is printed: the SDK itself
reports it only as a JSON-RPC error without the status.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from demo import DEFAULT_GATEWAY_PORT, GATEWAY_PORT_ENV, LOOPBACK, env_port, env_project

OPERATOR_TOKEN_ENV = "SLED_GATEWAY_OPERATOR_TOKEN"


def _text(result: Any) -> str:
    """The text parts of a ``tools/call`` result, joined."""
    return "".join(getattr(part, "text", "") for part in result.content)


async def call_tools(url: str, text: str, token: str, refusals: list[str]) -> int:
    """List and call the tools; each error answer of the gateway's is added to ``refusals``."""

    async def note_refusal(response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        await response.aread()
        try:
            reason = response.json().get("error")
        except (ValueError, AttributeError):
            reason = None
        refusals.append(
            f"{response.status_code} {response.reason_phrase}: {reason or response.text[:200]}"
        )

    client = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})
    client.event_hooks["response"].append(note_refusal)
    async with (
        streamable_http_client(url, http_client=client) as (read, write),
        ClientSession(read, write) as session,
    ):
        init = await session.initialize()
        server = init.server_info
        print(f"initialized: {server.name} {server.version or ''} (MCP {init.protocol_version})")

        listed = await session.list_tools()
        print("tools:")
        for tool in listed.tools:
            summary = (tool.description or "").strip().splitlines()
            print(f"  - {tool.name}: {summary[0] if summary else ''}")

        status = 0
        for name, arguments in (
            ("echo", {"text": text}),
            ("add", {"a": 2, "b": 3}),
            ("server_time", {}),
        ):
            if name not in {t.name for t in listed.tools}:
                continue
            result = await session.call_tool(name, arguments)
            shown = _text(result)
            print(f"{name}({arguments}) -> {shown!r}{'  [error]' if result.is_error else ''}")
            if result.is_error:
                status = 1
        return status


def main(argv: list[str] | None = None) -> int:
    default_gateway = f"http://{LOOPBACK}:{env_port(GATEWAY_PORT_ENV, DEFAULT_GATEWAY_PORT)}"
    parser = argparse.ArgumentParser(
        prog="python -m demo.call_tools",
        description="List and call the sled's tools through the gateway's MCP relay.",
    )
    parser.add_argument(
        "--gateway",
        default=default_gateway,
        help=f"the gateway's base URL (env {GATEWAY_PORT_ENV} sets the port; default %(default)s)",
    )
    parser.add_argument(
        "--project", default=env_project(), help="the sled's name (default %(default)s)"
    )
    parser.add_argument("--text", default="hello through the gateway", help="what echo echoes")
    parser.add_argument(
        "--token-file",
        default=None,
        help=f"file holding the gateway's operator token (default: env {OPERATOR_TOKEN_ENV})",
    )
    args = parser.parse_args(argv)
    if args.token_file:
        try:
            token = Path(args.token_file).read_text("utf-8").strip()
        except OSError as exc:
            parser.error(f"--token-file: cannot read {args.token_file}: {exc.strerror or exc}")
    else:
        token = os.environ.get(OPERATOR_TOKEN_ENV, "").strip()
    if not token:
        parser.error(f"the operator token is needed: --token-file PATH or env {OPERATOR_TOKEN_ENV}")
    url = f"{args.gateway.rstrip('/')}/sleds/{quote(args.project, safe='')}/mcp"
    print(f"MCP endpoint: {url}", flush=True)
    refusals: list[str] = []
    try:
        return asyncio.run(asyncio.wait_for(call_tools(url, args.text, token, refusals), 60))
    except Exception as exc:
        if refusals:
            print(f"call_tools: the gateway answered {refusals[0]}", file=sys.stderr)
            if refusals[0].startswith("401"):
                print(
                    "call_tools: is that the operator token of the gateway running now? "
                    "Each demo run makes a new one (its operator-token file).",
                    file=sys.stderr,
                )
        for cause in _root_causes(exc):
            print(f"call_tools: failed: {cause!r}", file=sys.stderr)
        return 1


def _root_causes(exc: BaseException) -> list[BaseException]:
    """The SDK wraps failures in exception groups, nested: the exceptions inside them."""
    if isinstance(exc, BaseExceptionGroup):
        return [cause for inner in exc.exceptions for cause in _root_causes(inner)]
    return [exc]


if __name__ == "__main__":
    sys.exit(main())
