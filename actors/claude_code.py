"""Claude Code, natively: its permission prompts and hooks answered by the uplink.

Three doors lead to the same permission request, and all answer in Claude
Code's own words:

* the MCP tool ``permission_prompt`` (``--permission-prompt-tool
  mcp__sled__permission_prompt``), served by the ingress at ``/mcp`` with the
  official MCP SDK's Streamable HTTP server;
* ``POST /hooks/claude-code`` for ``type: "http"`` hooks, and the ``hook``
  command (stdin → stdout) for command hooks, both for ``PreToolUse`` and
  ``PermissionRequest``;
* the ``can_use_tool`` adapter for the Agent SDK (``actors.agent_sdk``).

The request id is Claude Code's ``tool_use_id``, so the sled's and the
gateway's logs name the same call. Every path that cannot get the gateway's
answer denies, with the uplink's deny message: this module never allows on
its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import threading
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from loguru import logger

from actors.config import DEFAULT_HOOK_NEVER_FORWARD
from protocol import JSON, LocalProtocolError, Outcome, dumps
from protocol.claude_code import (
    SERVER_NAME,
    TOOL_NAME,
    deny_answer,
    hook_answer,
    parse_hook,
    prompt_answer,
    trouble_message,
)
from protocol.web import LOOPBACK_HOSTS, error_body

#: How this module asks for a decision: ``request_permission(tool_name,
#: tool_input, request_id=...)`` returns an awaitable of the ``Outcome``
#: (``Uplink.arequest_permission``, or the callable the ingress was given).
RequestPermission = Callable[..., Awaitable[Outcome]]

_log = logger.bind(actor="claude-code")


def regular_file(path: str) -> bool:
    """Whether ``path`` is, right now, an existing regular file itself (``lstat``: a
    symlink, a directory or anything else is not), the only thing a Claude Code
    session rule may name by path (see :func:`protocol.claude_code.session_rule`)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except (OSError, ValueError):  # missing, unreadable, or a NUL in the path
        return False


# ── asking the uplink ───────────────────────────────────────────────────


async def ask(
    request_permission: RequestPermission,
    tool_name: str,
    tool_input: JSON,
    request_id: str | None,
    *,
    on_wait: Callable[[float], Awaitable[None]] | None = None,
    interval: float = 10.0,
    abandon: Callable[[str], None] | None = None,
    suggestions: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Ask the uplink and return the permission-prompt answer; never raises
    (but ``CancelledError``).

    ``suggestions``: Claude Code's own rule suggestions, forwarded with the
    request so the gateway can offer them for "always allow" (given to
    ``request_permission`` only when there are some).

    ``on_wait(elapsed)`` runs every ``interval`` seconds while the gateway has
    not answered (the MCP tool sends progress with it). When the wait is
    cancelled (the caller went away), ``abandon(request_id)`` denies the
    request at once and the gateway withdraws it: nobody is left to act on a
    person's answer, and the card must not outlive the question.
    """
    if request_id is None and abandon is not None:
        from actors.permissions import new_request_id

        request_id = new_request_id()  # named here, so it can be abandoned
    try:
        extra = {"suggestions": suggestions} if suggestions else {}
        future = request_permission(tool_name, tool_input, request_id=request_id, **extra)
    except (LocalProtocolError, RecursionError, ValueError, TypeError) as exc:
        return deny_answer(trouble_message(str(exc) or type(exc).__name__))
    except Exception as exc:  # fail closed on anything else, and say so in the log
        _log.exception("permission request for {} could not be submitted", tool_name)
        return deny_answer(trouble_message(type(exc).__name__))
    loop = asyncio.get_running_loop()
    started = loop.time()
    while True:
        try:
            outcome = await asyncio.wait_for(asyncio.shield(future), interval)
            break
        except TimeoutError:
            if on_wait is not None:
                await on_wait(loop.time() - started)
        except asyncio.CancelledError:
            if abandon is not None and request_id is not None:
                _log.info("the caller of {!r} went away; abandoning it", request_id)
                abandon(request_id)
            raise
        except Exception as exc:
            _log.exception("permission request for {} failed", tool_name)
            return deny_answer(trouble_message(type(exc).__name__))
    return prompt_answer(outcome, tool_name, tool_input, regular_file)


async def answer_hook(
    request_permission: RequestPermission,
    body: JSON,
    never_forward: Iterable[str] = DEFAULT_HOOK_NEVER_FORWARD,
    *,
    abandon: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The output for one hook JSON: ``{}`` (no decision) for a never-forwarded
    PreToolUse, else the gateway's answer in the event's shape."""
    call = parse_hook(body)
    if call.event == "PreToolUse" and call.tool_name in set(never_forward):
        return {}
    answer = await ask(
        request_permission,
        call.tool_name,
        call.tool_input,
        call.tool_use_id,
        abandon=abandon,
        suggestions=call.suggestions,
    )
    return hook_answer(call.event, answer)


# ── the MCP server ──────────────────────────────────────────────────────

INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "tool_name": {"type": "string", "description": "The tool Claude Code wants to use."},
        "input": {"type": "object", "description": "The tool's input."},
        "tool_use_id": {"type": "string", "description": "Claude Code's id for this tool use."},
    },
    "required": ["tool_name", "input"],
}


class McpPermissionServer:
    """The ``permission_prompt`` tool on the SDK's Streamable HTTP session manager.

    Answers stream as SSE (never one JSON body: Claude Code kills a plain
    answer after 60 s, the permission timeout is longer) and carry a progress
    notification every ``progress_interval`` seconds while the gateway has
    not answered. A client that sent no progress token still gets the SSE
    stream's keep-alive comments. The result is one text block of JSON and
    no ``structuredContent``, which Claude Code would reject.
    """

    def __init__(
        self,
        request_permission: RequestPermission,
        *,
        version: str = "",
        permission_timeout: float = 120.0,
        progress_interval: float = 10.0,
        allowed_hosts: Iterable[str] = (),
        waiting: Callable[[int], None] | None = None,
        abandon: Callable[[str], None] | None = None,
    ) -> None:
        import mcp_types as types
        from mcp.server.lowlevel import Server
        from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
        from mcp.server.transport_security import TransportSecuritySettings

        self.request_permission = request_permission
        self.abandon = abandon
        self.permission_timeout = permission_timeout
        self.progress_interval = progress_interval
        self._waiting = waiting or (lambda _delta: None)
        self._types = types
        self.server: Any = Server(
            SERVER_NAME,
            version=version,
            instructions="Answers Claude Code's permission prompts through the sled's gateway.",
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
        )
        hosts = sorted({*LOOPBACK_HOSTS, *allowed_hosts})
        # The ingress checks Host and Origin for every endpoint; the SDK's own
        # check stays on as a second wall, with the same names.
        security = TransportSecuritySettings(
            enable_dns_rebinding_protection=True,
            allowed_hosts=[f"{host}:*" for host in hosts] + hosts,
            allowed_origins=[f"http://{host}:*" for host in hosts],
        )
        self.manager = StreamableHTTPSessionManager(
            app=self.server, json_response=False, security_settings=security
        )
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()

    async def _list_tools(self, _ctx: Any, _params: Any) -> Any:
        types = self._types
        return types.ListToolsResult(
            tools=[
                types.Tool(
                    name=TOOL_NAME,
                    description=(
                        "Ask the sled's gateway (a human) whether Claude Code may use a tool. "
                        "Answers Claude Code's --permission-prompt-tool protocol."
                    ),
                    input_schema=INPUT_SCHEMA,
                )
            ]
        )

    async def _call_tool(self, ctx: Any, params: Any) -> Any:
        types = self._types
        if params.name != TOOL_NAME:
            answer = deny_answer(trouble_message(f"no such tool: {params.name}"))
        else:
            answer = await self._permission(ctx, params.arguments or {})
        return types.CallToolResult(content=[types.TextContent(type="text", text=dumps(answer))])

    async def _permission(self, ctx: Any, arguments: dict[str, Any]) -> dict[str, Any]:
        tool_name = arguments.get("tool_name")
        if not isinstance(tool_name, str) or not tool_name.strip():
            return deny_answer(trouble_message("tool_name must be a non-empty string"))
        tool_input = arguments.get("input", {})
        tool_use_id = arguments.get("tool_use_id")
        if not isinstance(tool_use_id, str) or not tool_use_id:
            tool_use_id = None
        total = self.permission_timeout
        meta = getattr(ctx, "meta", None) or {}
        _log.debug(
            "permission_prompt {} for {} (progress token: {})",
            tool_use_id,
            tool_name,
            "yes" if meta.get("progress_token", meta.get("progressToken")) is not None else "no",
        )

        async def progress(elapsed: float) -> None:
            # report_progress is a no-op when the client sent no progressToken.
            with contextlib.suppress(Exception):
                await ctx.session.report_progress(
                    round(elapsed, 1), total, "waiting for the gateway's decision"
                )

        self._waiting(1)
        try:
            return await ask(
                self.request_permission,
                tool_name,
                tool_input,
                tool_use_id,
                on_wait=progress,
                interval=self.progress_interval,
                abandon=self.abandon,
            )
        finally:
            self._waiting(-1)

    async def handle(self, scope: Any, receive: Any, send: Any) -> None:
        await self.manager.handle_request(scope, receive, send)

    async def run(self) -> None:
        """Keep the session manager's task group alive until :meth:`request_stop`."""
        self._stop = asyncio.Event()
        async with self.manager.run():
            self._ready.set()
            await self._stop.wait()

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    def request_stop(self) -> None:
        """From the loop thread (``EventLoop.call_soon``)."""
        if self._stop is not None:
            self._stop.set()


class McpEndpoint:
    """``/mcp`` on the ingress: loads the MCP SDK on its first request, then serves.

    The SDK and what it imports (pydantic, Starlette, ...) hold about half of
    an idle uplink's memory, and an uplink whose Claude Code asks through
    hooks never needs them, so nothing of it is imported until a request
    reaches ``/mcp``. That request starts a helper thread that imports it
    (seconds on a busy machine: the event loop keeps serving meanwhile) and
    starts the session manager's task group in the uplink's loop (the ingress
    runs with lifespan off). It, and any request that comes meanwhile, wait
    for the load; if it fails or does not end within a minute, they get a
    JSON ``503``, and so does every later request: a broken install is not
    re-imported on every call.
    """

    def __init__(
        self,
        request_permission: RequestPermission,
        loop: Any,
        *,
        version: str,
        permission_timeout: float,
        progress_interval: float,
        allowed_hosts: Iterable[str],
        waiting: Callable[[int], None],
        on_state: Callable[[str], None] = lambda _state: None,
        abandon: Callable[[str], None] | None = None,
    ) -> None:
        # on_state("loading") when the first request starts the load, then
        # "ready" or "unavailable" once it ends (for /status).
        self._on_state = on_state
        self._request_permission = request_permission
        self._loop = loop  # the uplink's EventLoop
        self._options: dict[str, Any] = {
            "version": version,
            "permission_timeout": permission_timeout,
            "progress_interval": progress_interval,
            "allowed_hosts": list(allowed_hosts),
            "waiting": waiting,
            "abandon": abandon,
        }
        self._server: McpPermissionServer | None = None
        self._running: Any = None  # concurrent future of McpPermissionServer.run
        self._loaded = threading.Event()
        self._lock = threading.Lock()
        self._loading = False
        self._stopping = False

    def _start_loading(self) -> None:
        """The first request's call (any later one's is a no-op): import the SDK off the loop."""
        with self._lock:
            if self._loading or self._stopping:
                return
            self._loading = True
        self._on_state("loading")
        try:
            threading.Thread(target=self._load, name="ingress-mcp-load", daemon=True).start()
        except RuntimeError:  # no thread to be had: unavailable, like a failed import
            _log.exception("the MCP endpoint could not start loading; /mcp answers 503")
            self._on_state("unavailable")
            self._loaded.set()

    def _load(self) -> None:
        state = "unavailable"
        try:
            server = McpPermissionServer(self._request_permission, **self._options)
            with self._lock:
                if self._stopping:
                    return
                self._server = server
                self._running = self._loop.spawn(server.run)
            if server.wait_ready(30):
                state = "ready"
            else:
                _log.error("the MCP endpoint did not start within 30 s")
        except Exception:
            _log.exception("the MCP endpoint could not start; /mcp answers 503")
        finally:
            try:  # said before the waiting requests go on, so /status agrees with them
                self._on_state("stopped" if self._stopping else state)
            finally:
                self._loaded.set()

    async def handle(self, scope: Any, receive: Any, send: Any) -> None:
        self._start_loading()
        deadline = asyncio.get_running_loop().time() + 60
        while not self._loaded.is_set() and asyncio.get_running_loop().time() < deadline:
            if self._stopping:
                break
            await asyncio.sleep(0.02)
        server = self._server
        if server is None or self._stopping or not server.wait_ready(0):
            problem = "shutting down" if self._stopping else "not available"
            payload = dumps(error_body(f"the MCP endpoint is {problem}")).encode()
            headers = [(b"content-type", b"application/json")]
            headers.append((b"content-length", str(len(payload)).encode()))
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": payload})
            return
        await server.handle(scope, receive, send)

    def stop(self, timeout: float) -> None:
        with self._lock:
            self._stopping = True
            server, running = self._server, self._running
        if server is None or running is None:
            return
        self._loop.call_soon(server.request_stop)
        try:
            running.result(timeout=max(0.2, timeout))
        except Exception as exc:
            _log.debug("MCP endpoint stop: {!r}", exc)
