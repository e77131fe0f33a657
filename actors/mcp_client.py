"""The MCP Streamable-HTTP replay client (runs in the event loop; not an actor).

It replays a gateway's JSON-RPC body against the sled's local MCP endpoint the
way an MCP client would: the ``Accept`` header
for JSON or SSE answers, the ``Mcp-Session-Id`` the server issued, the
``MCP-Protocol-Version`` once negotiated, and, when the server forgets its
session (404), a re-initialize with the gateway's last ``initialize`` body and
one retry. Every failure becomes a JSON-RPC error object carrying the
request's id: the caller always gets an answer to send.

The replays keep httpx's API on aiohttp's HTTP/1.1 engine
(``httpx_aiohttp.AiohttpTransport``, by an httpx maintainer): in the same run
it took a third off the uplink's CPU a replay and a quarter off its latency
against httpx's own httpcore (docs/benchmarks.md, "The MCP replay on aiohttp's
engine").

httpx and aiohttp are imported on the first replay, not with the uplink: a
gateway that never relays MCP never costs the sled their memory. The import
runs in a worker thread, so the event loop keeps serving heartbeats and
permissions meanwhile; if it fails, that replay, like any other failure, is
answered with a JSON-RPC error.
"""

from __future__ import annotations

import asyncio
import importlib
from typing import TYPE_CHECKING, Any

from loguru import logger

from protocol import JSON, McpRequest, RemoteProtocolError, dumps, loads
from protocol.jsonrpc import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    error_for,
    error_object,
    expected_ids,
    is_initialize,
    response_ids,
)
from protocol.sse import SseParser
from protocol.web import ascii_digits

if TYPE_CHECKING:
    import httpx

ACCEPT = "application/json, text/event-stream"
_INITIALIZED = dumps({"jsonrpc": "2.0", "method": "notifications/initialized"})


class ReplayError(Exception):
    """A replay failed; the message becomes the JSON-RPC error's message."""


class _SessionExpired(ReplayError):
    pass


class _NotLoaded(Exception):
    """Stands for ``httpx.HTTPError`` until httpx is loaded: nothing raises it."""


def _no_cookies() -> Any:
    """A cookie jar that keeps nothing, for the replay client.

    The replays carry the requests of whoever asked through the gateway: a
    cookie the local server set for one of them must not go out with the
    next. MCP keeps its session in ``Mcp-Session-Id``, which the client
    handles itself. And reading each answer's ``Set-Cookie`` (a
    ``email.message.Message`` of all its headers, through ``http.cookiejar``)
    cost about as much as the rest of the replay's own code.
    """
    import http.cookiejar  # loaded with httpx (which imports it), on the first replay

    class NoCookies(http.cookiejar.CookieJar):
        def extract_cookies(self, response: Any, request: Any) -> None:
            return None

        def set_cookie(self, cookie: Any) -> None:
            return None

    return NoCookies()


def load_http() -> tuple[Any, Any, Any]:
    """httpx, aiohttp and the transport joining them (in a worker thread: slow)."""
    return (
        importlib.import_module("httpx"),
        importlib.import_module("aiohttp"),
        importlib.import_module("httpx_aiohttp"),
    )


def replay_client(
    http: Any, aiohttp: Any, transports: Any, *, timeout: float, pool: int
) -> httpx.AsyncClient:
    """An httpx client for the replays, on aiohttp's engine (``bench.paths`` takes
    the same one for target 2's baseline, so both sides use one client).

    Each of httpx's defaults that matters here is set again on the aiohttp
    side, which has its own:
    - no cookies on either side (see ``_no_cookies``): aiohttp's session keeps
      a jar of its own unless given a ``DummyCookieJar``;
    - no proxy from the environment (``trust_env=False`` on both): a proxy set
      for the internet must not catch loopback MCP;
    - no redirects (the transport asks aiohttp for none, and httpx follows none
      by default);
    - the pool's size, and httpx's 5 s keep-alive.
    """
    limits = http.Limits(max_connections=pool, max_keepalive_connections=8)

    def session() -> Any:  # made in the loop, on the first request (aiohttp asks that)
        connector = aiohttp.TCPConnector(limit=pool, keepalive_timeout=limits.keepalive_expiry)
        return aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False
        )

    client: httpx.AsyncClient = http.AsyncClient(
        transport=transports.AiohttpTransport(limits=limits, trust_env=False, client=session),
        timeout=timeout,
        limits=limits,
        trust_env=False,
        cookies=_no_cookies(),
        # Every replay's; given once, not merged in from a dict each time.
        headers={"Content-Type": "application/json", "Accept": ACCEPT},
    )
    return client


class LocalMcpClient:
    """Replays JSON-RPC bodies against one local MCP URL, keeping its session."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        concurrency: int,
        max_response_bytes: int,
        log: Any = logger,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.max_response_bytes = max_response_bytes
        self.session_id: str | None = None
        self.protocol_version: str | None = None
        self.last_initialize: str | None = None
        self.in_flight = 0
        self.waiting = 0
        self._log = log
        self._slots = asyncio.Semaphore(concurrency)
        self._concurrency = concurrency
        self._renew_lock = asyncio.Lock()
        self._client: httpx.AsyncClient | None = None
        self._target: httpx.URL | None = None  # self.url, parsed by httpx once it is loaded
        # What a failed exchange raises: httpx.HTTPError once httpx is loaded.
        self._http_error: type[Exception] | tuple[type[Exception], ...] = _NotLoaded
        self._unreachable: tuple[type[Exception], ...] = ()  # a refused connect, once loaded

    async def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            try:
                http, aiohttp, transports = await asyncio.to_thread(load_http)
            except ImportError as exc:
                raise ReplayError(f"the HTTP client for local MCP cannot load: {exc}") from None
            if self._client is None:  # not made by another replay while this one waited
                self._client = replay_client(
                    http, aiohttp, transports, timeout=self.timeout, pool=self._concurrency + 2
                )
                # What the engine may raise past the transport's mapping (a header over
                # aiohttp's size limit, say) is a failed exchange all the same.
                self._http_error = (http.HTTPError, aiohttp.ClientError)
                self._unreachable = (http.ConnectError, aiohttp.ClientConnectorError)
                # Parsed once: httpx parses a str URL again on every request
                # (several times over: about twice the rest of building it).
                self._target = http.URL(self.url)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # ── the one entry point ────────────────────────────────────────────

    async def replay(self, payload: JSON) -> JSON:
        """Replay one ``mcp_request`` payload; always returns the answer to send."""
        try:
            text = McpRequest.from_payload(payload).body
        except RemoteProtocolError:
            return error_object(None, INVALID_REQUEST, "mcp_request payload has no string 'body'")
        try:
            body = loads(text)
        except ValueError as exc:
            return error_object(None, INVALID_REQUEST, f"mcp_request body is not JSON: {exc}")
        self.waiting += 1
        async with self._slots:
            self.waiting -= 1
            self.in_flight += 1
            try:
                async with asyncio.timeout(self.timeout):
                    return await self._replay(text, body)
            except TimeoutError:
                return error_for(
                    body, INTERNAL_ERROR, f"local MCP server timed out after {self.timeout:g}s"
                )
            except ReplayError as exc:
                return error_for(body, INTERNAL_ERROR, str(exc))
            except self._http_error as exc:
                # The engine's own error says more than the transport's mapping of it
                # (which calls a refused connection a ConnectTimeout).
                cause = exc.__cause__ if isinstance(exc.__cause__, self._http_error) else exc
                failed = (
                    "unreachable" if isinstance(cause, self._unreachable) else "exchange failed"
                )
                return error_for(
                    body,
                    INTERNAL_ERROR,
                    f"local MCP server {failed}: {type(cause).__name__}: {cause}",
                )
            finally:
                self.in_flight -= 1

    # ── Streamable HTTP ────────────────────────────────────────────────

    async def _replay(self, text: str, body: JSON) -> JSON:
        if self._renew_lock.locked():
            # A re-initialize is under way (no session id meanwhile): wait for its session.
            async with self._renew_lock:
                pass
        if is_initialize(body):
            # A new initialize starts a new local session; remember it to renew later.
            self.last_initialize = text
            self.session_id = None
            self.protocol_version = None
        sent_with = self.session_id
        try:
            return await self._post(text, body)
        except _SessionExpired:
            if sent_with is None:
                raise ReplayError("local MCP server answered HTTP 404") from None
        await self._renew(sent_with)
        try:
            return await self._post(text, body)
        except _SessionExpired:
            raise ReplayError(
                "local MCP server answered HTTP 404 again after re-initializing the session"
            ) from None

    async def _renew(self, expired: str) -> None:
        """Re-initialize once for every request that found ``expired`` stale."""
        async with self._renew_lock:
            if self.session_id is not None and self.session_id != expired:
                return  # another request already renewed it
            self.session_id = None
            self.protocol_version = None
            if self.last_initialize is None:
                raise ReplayError(
                    "local MCP session expired and no initialize has been seen to renew it"
                )
            self._log.warning("local MCP session expired (404); re-initializing")
            answer = await self._post(self.last_initialize, loads(self.last_initialize))
            if isinstance(answer, dict) and "error" in answer:
                raise ReplayError(f"re-initialize failed: {dumps(answer['error'])[:200]}")
            await self._post(_INITIALIZED, loads(_INITIALIZED))
            self._log.info("local MCP session renewed")

    async def _post(self, text: str, body: JSON) -> JSON:
        headers: dict[str, str] = {}  # Content-Type and Accept are the client's own
        if self.session_id is not None:
            headers["Mcp-Session-Id"] = self.session_id
        if self.protocol_version is not None:
            headers["MCP-Protocol-Version"] = self.protocol_version
        carried_session = self.session_id is not None
        client = await self._http()
        assert self._target is not None  # set with the client
        async with client.stream(
            "POST", self._target, content=text.encode("utf-8"), headers=headers or None
        ) as response:
            status = response.status_code
            if status == 404 and carried_session:
                raise _SessionExpired("local MCP server answered HTTP 404: its session expired")
            if status in (202, 204):
                return None
            if not 200 <= status < 300:
                detail = (await self._read_capped(response)).decode("utf-8", "replace")[:200]
                raise ReplayError(
                    f"local MCP server answered HTTP {status}"
                    + (f": {detail.strip()}" if detail.strip() else "")
                )
            new_session = response.headers.get("mcp-session-id")
            if new_session:
                self.session_id = new_session
            media = response.headers.get("content-type", "").split(";")[0].strip().lower()
            if media == "text/event-stream":
                answer = await self._read_sse(response, body)
            else:
                raw = await self._read_capped(response)
                if not raw.strip():
                    return None
                try:
                    answer = loads(raw)
                except ValueError as exc:
                    raise ReplayError(f"local MCP server sent unreadable JSON: {exc}") from None
        if is_initialize(body) and isinstance(answer, dict):
            version = (answer.get("result") or {}).get("protocolVersion")
            if isinstance(version, str):
                self.protocol_version = version
        return answer

    async def _read_capped(self, response: httpx.Response) -> bytes:
        declared = response.headers.get("content-length")
        if declared and ascii_digits(declared) and int(declared) > self.max_response_bytes:
            raise ReplayError(self._too_large())
        chunks = bytearray()
        async for chunk in response.aiter_bytes():
            chunks += chunk
            if len(chunks) > self.max_response_bytes:
                raise ReplayError(self._too_large())
        return bytes(chunks)

    async def _read_sse(self, response: httpx.Response, body: JSON) -> JSON:
        """Read events until every id the body asked about has its response."""
        wanted = expected_ids(body)
        answers: dict[Any, JSON] = {}
        parser = SseParser()
        size = 0
        async for chunk in response.aiter_text():
            size += len(chunk)
            if size > self.max_response_bytes:
                raise ReplayError(self._too_large())
            for event in parser.feed(chunk):
                if not event.data.strip():
                    continue
                try:
                    message = loads(event.data)
                except ValueError:
                    self._log.debug("unreadable SSE event skipped: {!r}", event.data[:200])
                    continue
                ids = response_ids(message)
                if not ids:
                    self._log.debug("server message in stream ignored: {}", event.data[:200])
                    continue
                for item in message if isinstance(message, list) else [message]:
                    answers[item.get("id")] = item
                if all(i in answers for i in wanted):
                    return self._assemble(body, wanted, answers)
        if wanted and all(i in answers for i in wanted):
            return self._assemble(body, wanted, answers)
        if not wanted:
            return None
        raise ReplayError("local MCP server ended its event stream before the response")

    @staticmethod
    def _assemble(body: JSON, wanted: list[Any], answers: dict[Any, JSON]) -> JSON:
        if isinstance(body, list):
            return [answers[i] for i in wanted]
        return answers[wanted[0]]

    def _too_large(self) -> str:
        return f"local MCP answer is larger than {self.max_response_bytes} bytes"
