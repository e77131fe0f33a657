"""A real WebSocket gateway for tests: a websockets server on 127.0.0.1:0.

It runs its own event loop in a thread, records every connection and every
frame, and lets a test answer, send, close or abort from the test thread.
Waiting is done with conditions and timeouts, never bare sleeps.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

Auto = Callable[["Session", dict[str, Any]], None]


@dataclass
class Session:
    """One accepted WebSocket connection, as the gateway saw it."""

    number: int
    ws: ServerConnection
    path: str
    frames: list[dict[str, Any]] = field(default_factory=list)
    raw: list[str | bytes] = field(default_factory=list)
    opened_at: float = field(default_factory=time.monotonic)
    frame_times: list[float] = field(default_factory=list)
    closed: bool = False
    close_code: int | None = None

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("type") == kind]


class Gateway:
    """Start with ``with Gateway() as gw:``; ``gw.url`` is the uplink URL."""

    def __init__(
        self,
        *,
        token: str = "s3cret-token",
        auto: str | Auto | None = None,
        reject_status: int | None = None,
        ping_interval: float | None = None,
        ping_timeout: float | None = None,
        ssl: Any = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.token = token
        self.auto = auto  # "approve" | "deny" | "always" | callable | None
        self.reject_status = reject_status
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.ssl = ssl
        self.host = host
        self.sessions: list[Session] = []
        self.handshakes = 0
        self.port = 0
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._tasks: set[asyncio.Future[None]] = set()

    # ── lifecycle ───────────────────────────────────────────────────────

    def __enter__(self) -> Gateway:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        scheme = "wss" if self.ssl is not None else "ws"
        return f"{scheme}://{self.host}:{self.port}/api/sled-uplink?token={self.token}"

    def start(self, port: int = 0) -> None:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(port, ready), daemon=True)
        self._thread.start()
        if not ready.wait(5):
            raise RuntimeError("test gateway did not start")

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(5)
        self._thread = None

    def restart(self) -> None:
        """Stop listening and listen again on the same port."""
        self.stop()
        self.start(self.port)

    def _run(self, port: int, ready: threading.Event) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            async with serve(
                self._handler,
                "127.0.0.1",
                port,
                process_request=self._process_request,
                ping_interval=self.ping_interval,
                ping_timeout=self.ping_timeout,
                ssl=self.ssl,
                max_size=None,
                close_timeout=1,
            ) as server:
                self._server = server
                self.port = server.sockets[0].getsockname()[1]
                ready.set()
                await self._stop.wait()
                # Abort what is left, as a dying gateway would.
                for session in self.sessions:
                    if not session.closed:
                        session.ws.transport.abort()

        asyncio.run(main())

    def _process_request(self, _conn: ServerConnection, request: Request) -> Response | None:
        with self._cond:
            self.handshakes += 1
            self._cond.notify_all()
        if self.reject_status is not None:
            return Response(self.reject_status, "Refused", Headers(), b"refused\n")
        if f"token={self.token}" not in request.path:
            return Response(401, "Unauthorized", Headers(), b"bad token\n")
        return None

    async def _handler(self, ws: ServerConnection) -> None:
        with self._cond:
            session = Session(len(self.sessions) + 1, ws, ws.request.path if ws.request else "")
            self.sessions.append(session)
            self._cond.notify_all()
        try:
            async for message in ws:
                try:
                    frame = json.loads(message)
                except ValueError:
                    frame = {"type": "<invalid>", "raw": message}
                with self._cond:
                    session.raw.append(message)
                    session.frames.append(frame)
                    session.frame_times.append(time.monotonic())
                    self._cond.notify_all()
                self._answer(session, frame)
        except Exception:
            pass
        finally:
            with self._cond:
                session.closed = True
                session.close_code = ws.close_code
                self._cond.notify_all()

    def _answer(self, session: Session, frame: dict[str, Any]) -> None:
        if frame.get("type") != "perm_request" or self.auto is None:
            return
        if callable(self.auto):
            self.auto(session, frame)
            return
        payload = {
            "approve": {"approved": True, "always_allow": False},
            "deny": {"approved": False, "always_allow": False},
            "always": {"approved": True, "always_allow": True},
        }[self.auto]
        self.send_in_loop(session, "perm_response", frame["req_id"], payload)

    # ── acting from the test thread ─────────────────────────────────────

    def _call(self, coro_fn: Callable[[], Any], timeout: float = 5) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro_fn(), self._loop).result(timeout)

    def send_in_loop(self, session: Session, kind: str, req_id: str, payload: Any) -> None:
        text = json.dumps({"type": kind, "req_id": req_id, "payload": payload})
        task = asyncio.ensure_future(session.ws.send(text))
        self._tasks.add(task)  # keep a reference until it is done
        task.add_done_callback(self._tasks.discard)

    def send(self, session: Session, kind: str, req_id: str, payload: Any = None) -> None:
        self.send_raw(session, json.dumps({"type": kind, "req_id": req_id, "payload": payload}))

    def send_raw(self, session: Session, data: str | bytes) -> None:
        self._call(lambda: session.ws.send(data))

    def respond(self, session: Session, req_id: str, payload: Any) -> None:
        self.send(session, "perm_response", req_id, payload)

    def close(self, session: Session, code: int = 1000, reason: str = "") -> None:
        self._call(lambda: session.ws.close(code, reason))

    def abort_mid_frame(self, session: Session) -> None:
        """Write the first bytes of a text frame header, then drop the TCP connection."""
        assert self._loop is not None

        def cut() -> None:
            session.ws.transport.write(b"\x81\x7e\x01")  # text, 16-bit length, 1 of 2 length bytes
            session.ws.transport.abort()

        self._loop.call_soon_threadsafe(cut)

    def abort(self, session: Session) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(session.ws.transport.abort)

    # ── waiting ─────────────────────────────────────────────────────────

    def wait_until(self, predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                result = predicate()
                if result:
                    return result
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("gateway condition not met in time")
                self._cond.wait(remaining)

    def session(self, number: int = 1, timeout: float = 5.0) -> Session:
        return self.wait_until(
            lambda: self.sessions[number - 1] if len(self.sessions) >= number else None, timeout
        )

    def frame(
        self, session: Session, kind: str, index: int = 0, timeout: float = 5.0
    ) -> dict[str, Any]:
        return self.wait_until(
            lambda: session.of_type(kind)[index] if len(session.of_type(kind)) > index else None,
            timeout,
        )

    def wait_closed(self, session: Session, timeout: float = 5.0) -> None:
        self.wait_until(lambda: session.closed, timeout)
