"""The :class:`~sled_gateway.bus.Bus` over NATS core (``--bus nats://host:port``), with nats-py.

Replicas of one gateway share a NATS server: a sled's holder serves
``sled.<project>.mcp`` there, so an MCP relay call that reaches any replica
is answered by the one holding the sled's socket. NATS is only a doorbell:
nothing here is stored, and correctness never depends on a message arriving
(the holder re-reads the database on :meth:`NatsBus.on_reconnect`).

**Threads.** nats-py is asyncio; the Bus protocol's ``publish``/``subscribe``
/``serve`` are synchronous and may be called from any thread (the gateway's
``open``/``close`` run on its caller's thread, the hub on the gateway loop).
So the client lives on its own event loop in its own thread (``sled-nats``):
the gateway loop never waits for NATS, and a stalled NATS socket never stalls
a sled. Each handler and responder runs on the loop that was running when it
was registered (the gateway's), handed over with ``call_soon_threadsafe``.

**Ordering.** Every publish, subscribe, unsubscribe and request start goes
through one FIFO queue that one task drains in order, awaiting each
nats-py call before the next: a ``subscribe`` followed by a ``publish`` puts
``SUB`` before ``PUB`` on the wire, and two publishes from one thread reach
the server, and every subscriber, in the order they were made. Messages of
one subscription are handed to its handler in arrival order.

**Subjects** are escaped at the edge: a token outside ``[A-Za-z0-9_-]``
(a project may hold dots, spaces, ``*`` or ``>``) is encoded by
:func:`escape_token` (and :func:`~sled_gateway.bus.sled_subject` already
escapes the project, so its dots are not read as separators).

**Serving.** One responder per subject per replica, the newest wins (as on
the local bus). Across replicas the holder of the sled's socket is its only
server; while a sled moves (its old socket on replica A is half-open, its new
one on B) both subscribe, every server gets the request, and the requester
takes the first reply: a plain subscription, not a queue group, so the live
socket answers instead of a random replica's dead one. The request carries
its timeout (header ``Sled-Timeout``) and the server cancels its responder
after it, as the local bus does.

**Stopping** drains the subscription instead of dropping it (through
:mod:`sled_gateway.bus.nats_adapter`, which orders nats-py's drain): NATS routes a
request to a holder until it has read the holder's ``UNSUB``, and nats-py
forgets an unsubscribed subscription at once, dropping what arrives after, so
that requester would hear nothing until its timeout (a relay's 504 while its
sled moves between replicas). Until a ``PING``'s ``PONG`` confirms the
``UNSUB`` (one round trip), a request routed there is answered ``not_sent``
(retry: nothing was sent to a sled); closing the bus drains the whole
connection the same way. After that, or if the drain fails, a stale
subscription answers nothing: were its sled held elsewhere by then, a "not
sent" could beat that holder's real answer and invite a retry that runs the
call twice.

A request to a subject this replica serves itself is a direct call of its
responder (no NATS hop, as on the local bus; it works while NATS is away); a
responder's ``None`` (it defers to another replica's server) sends it over
NATS after all. A holder that learns its sled moved to another replica stops
quietly (``stop(quiet=True)``): while it drains, it answers nothing, and the
new holder's answer is the only one.

**NATS down.** ``request`` raises :class:`~sled_gateway.bus.BusUnavailable`
(a :class:`~sled_gateway.bus.NoResponders`) at once while disconnected;
``publish`` never raises or blocks: nats-py buffers during a reconnect up to
its pending size, beyond which the message is dropped and logged. nats-py
reconnects forever and resubscribes; then the ``on_reconnect`` callbacks run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import re
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import nats
import nats.errors
from loguru import logger
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from sled_gateway.bus import (
    NOT_SENT,
    TOO_LARGE,
    BusError,
    BusUnavailable,
    Handler,
    Message,
    MessageTooLarge,
    NoResponders,
    Responder,
    StopServing,
    escape_token,
)
from sled_gateway.bus.nats_adapter import drain_subscription
from sled_gateway.config import redact_userinfo

log = logger.bind(actor="gateway")

_SAFE_TOKEN = re.compile(r"[A-Za-z0-9_-]+")
TIMEOUT_HEADER = "Sled-Timeout"
#: How long a stopped subscription waits for the server to confirm its UNSUB.
_DRAIN_S = 2.0
#: Seconds between the client's PINGs. A path that drops packets (a partition, a dead
#: NAT) leaves the socket open and TCP silent; two PINGs unanswered and the connection
#: is stale: dropped, and a new one dialled, so the bus says it is away (the replicas
#: then read the whole fleet every sweep) within about three of these, instead of the
#: six minutes or more of nats-py's default (120 s, two outstanding).
PING_INTERVAL = 5.0
_MAX_OUTSTANDING_PINGS = 2
_NOT_SENT_REPLY = json.dumps({"error": NOT_SENT}).encode("utf-8")


def nats_subject(subject: str) -> str:
    """A bus subject as a NATS subject: safe tokens kept, others escaped."""
    return ".".join(
        token if _SAFE_TOKEN.fullmatch(token) else escape_token(token)
        for token in subject.split(".")
    )


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


_Hook = tuple[Callable[[], None], asyncio.AbstractEventLoop | None]


@dataclass(eq=False)
class _Subscriber:
    handler: Handler
    loop: asyncio.AbstractEventLoop | None
    active: bool = True
    sub: Subscription | None = None


# A replica serves one subject per sled it holds, for as long as the sled stays: what
# serving keeps is slotted, and its callbacks are bound methods and partials rather
# than closures (each closure keeps a function object and its cells, per sled).
@dataclass(eq=False, slots=True)
class _Server:
    responder: Responder
    loop: asyncio.AbstractEventLoop | None
    # Stopped because another process serves the subject now: a request still routed
    # here is left to that server, unanswered (see StopServing).
    quiet: bool = False


@dataclass(eq=False, slots=True)
class _Served:
    """One NATS subscription for a subject this replica serves, and its newest server."""

    bus: NatsBus
    subject: str
    server: _Server
    sub: Subscription | None = None
    # Stopped, and its UNSUB not yet confirmed by the server: what NATS routed here
    # meanwhile is answered "not sent" (nats-py would drop it after a plain unsubscribe,
    # and its requester would wait out its whole timeout).
    draining: bool = False
    # Stopped: its server is not called any more (while draining, "not sent" answers).
    stopped: bool = False

    async def on_request(self, msg: Msg) -> None:
        """nats-py's callback: answer in a task, so a slow responder holds up no other."""
        if self.stopped:
            if self.draining and msg.reply and not self.server.quiet:
                # Inline, so a draining subscription is done once its answers went out.
                with contextlib.suppress(nats.errors.Error):
                    await msg.respond(_NOT_SENT_REPLY)
            return
        task = asyncio.get_running_loop().create_task(self.bus._handle(self, msg))
        self.bus._answering.add(task)
        task.add_done_callback(self.bus._answering.discard)


class NatsBus:
    """The bus on a NATS server at ``url``; see the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        name: str = "sled-gateway",
        connect_timeout: float = 5.0,
        reconnect_wait: float = 0.5,
        ping_interval: float = PING_INTERVAL,
    ) -> None:
        self.url = url
        self.name = name
        self.connect_timeout = connect_timeout
        self.reconnect_wait = reconnect_wait
        self.ping_interval = ping_interval
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._nc: Client | None = None
        self._ops: asyncio.Queue[Callable[[], Awaitable[None]]] | None = None
        self._pump: asyncio.Task[None] | None = None
        self._served: dict[str, _Served] = {}  # touched on the bus loop only
        self._local: dict[str, _Server] = {}  # the same servers, as serve() made them
        self._answering: set[asyncio.Task[None]] = set()  # requests being answered (bus loop)
        self._asking: set[asyncio.Task[None]] = set()  # requests waiting for a reply (bus loop)
        self._reconnect_hooks: list[_Hook] = []
        self._open = False
        self._lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------

    def open(self) -> None:
        """Start the ``sled-nats`` thread and connect; raises if NATS cannot be reached."""
        with self._lock:
            if self._open:
                return
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="sled-nats", daemon=True)
            thread.start()
            self._loop, self._thread = loop, thread
            connecting = asyncio.run_coroutine_threadsafe(self._connect(), loop)
            try:
                connecting.result(self.connect_timeout + 5)
            except BaseException as exc:
                connecting.cancel()
                self._stop_thread()
                if isinstance(exc, Exception):
                    # Not an OSError (as a timeout is): the command would call it a --listen fault.
                    raise BusError(
                        f"cannot reach NATS at {redact_userinfo(self.url)} within "
                        f"{self.connect_timeout:g} s ({type(exc).__name__})"
                    ) from None
                raise
            self._open = True
        log.info("bus: connected to NATS at {}", redact_userinfo(self.url))

    async def _connect(self) -> None:
        self._ops = asyncio.Queue()
        # nats-py retries a first connection forever when reconnecting is allowed: bounded
        # here, so a replica whose NATS is unreachable fails at start and says so.
        self._nc = await asyncio.wait_for(self._dial(), self.connect_timeout)
        self._pump = asyncio.get_running_loop().create_task(self._run_ops())

    async def _dial(self) -> Client:
        return await nats.connect(
            [url.strip() for url in self.url.split(",")],
            name=self.name,
            connect_timeout=max(1, round(self.connect_timeout)),
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=self.reconnect_wait,
            ping_interval=self.ping_interval,
            max_outstanding_pings=_MAX_OUTSTANDING_PINGS,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
        )

    def close(self) -> None:
        """Stop every subscription and server and disconnect; idempotent."""
        with self._lock:
            if not self._open:
                return
            self._open = False
            loop = self._loop
            assert loop is not None
            try:
                asyncio.run_coroutine_threadsafe(self._disconnect(), loop).result(5)
            except Exception as exc:
                log.warning("bus: closing the NATS connection: {!r}", exc)
            self._stop_thread()
        log.info("bus: disconnected from NATS")

    async def _disconnect(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
        # What is still served has lost its sled with this gateway (a sled whose unserve
        # is still queued among them): from here on a request is answered "not sent".
        for served in self._served.values():
            served.stopped = served.draining = True
        # The hub stops before the bus and answers its requests in flight ("stopping"):
        # those answers still go out, then anything left is cancelled.
        answering = set(self._answering)
        if answering:
            await asyncio.wait(answering, timeout=1.0)
        for task in answering | self._asking:
            task.cancel()
        self._served.clear()
        self._local.clear()
        try:
            if self._nc is not None:
                await self._close_connection(self._nc)
        finally:
            await _finish_tasks_left()

    @staticmethod
    async def _close_connection(nc: Client) -> None:
        """Drain, then close: a plain close drops unanswered what the server routed here
        before it saw this connection go, and each of those requesters would wait out
        its whole timeout."""
        if nc.is_connected:
            try:
                await asyncio.wait_for(nc.drain(), _DRAIN_S)
            except (nats.errors.Error, TimeoutError) as exc:
                log.debug("bus: draining the NATS connection: {!r}", exc)
        if not nc.is_closed:
            await asyncio.wait_for(nc.close(), 3.0)

    def _stop_thread(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
            if not thread.is_alive():
                loop.close()
        self._loop = self._thread = self._nc = None

    @property
    def connected(self) -> bool:
        nc = self._nc
        return self._open and nc is not None and nc.is_connected

    def on_reconnect(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` each time the connection to NATS comes back (on the loop that
        was running when this was called, else the bus thread); returns the removal."""
        hook = (callback, _running_loop())
        self._reconnect_hooks.append(hook)

        def remove() -> None:
            if hook in self._reconnect_hooks:
                self._reconnect_hooks.remove(hook)

        return remove

    async def _on_error(self, exc: Exception) -> None:
        log.debug("bus: NATS: {!r}", exc)

    async def _on_disconnected(self) -> None:
        if self._open:
            log.warning("bus: lost NATS at {}; reconnecting", redact_userinfo(self.url))

    async def _on_reconnected(self) -> None:
        log.info("bus: reconnected to NATS at {}", redact_userinfo(self.url))
        for callback, loop in list(self._reconnect_hooks):
            _call_on(loop, callback)

    # -- the ordered queue -------------------------------------------------------------

    def _enqueue(self, op: Callable[[], Awaitable[None]]) -> bool:
        loop, ops = self._loop, self._ops
        if not self._open or loop is None or ops is None:
            return False
        try:
            loop.call_soon_threadsafe(ops.put_nowait, op)
        except RuntimeError:  # the loop closed meanwhile
            return False
        return True

    async def _run_ops(self) -> None:
        assert self._ops is not None
        while True:
            op = await self._ops.get()
            try:
                await op()
            except Exception as exc:
                log.warning("bus: NATS operation failed: {!r}", exc)

    # -- publish / subscribe -----------------------------------------------------------

    def publish(self, subject: str, message: Message) -> None:
        data = json.dumps(message, separators=(",", ":")).encode("utf-8")
        wire = nats_subject(subject)

        async def send() -> None:
            assert self._nc is not None
            try:
                await self._nc.publish(wire, data)
            except nats.errors.OutboundBufferLimitError:
                log.warning("bus: NATS unreachable and its buffer full; dropped a {}", subject)

        self._enqueue(send)

    def subscribe(self, subject: str, handler: Handler) -> Callable[[], None]:
        subscriber = _Subscriber(handler, _running_loop())
        wire = nats_subject(subject)

        async def deliver(msg: Msg) -> None:
            if not subscriber.active:
                return
            try:
                message = json.loads(msg.data)
            except ValueError:
                log.warning("bus: a message on {} is not JSON; dropped", subject)
                return
            _call_on(subscriber.loop, lambda: self._call_handler(subscriber, subject, message))

        async def sub() -> None:
            assert self._nc is not None
            if subscriber.active:
                subscriber.sub = await self._nc.subscribe(wire, cb=deliver)

        async def unsub() -> None:
            if subscriber.sub is not None:
                await subscriber.sub.unsubscribe()
                subscriber.sub = None

        self._enqueue(sub)

        def unsubscribe() -> None:
            if subscriber.active:
                subscriber.active = False
                self._enqueue(unsub)

        return unsubscribe

    @staticmethod
    def _call_handler(subscriber: _Subscriber, subject: str, message: Message) -> None:
        if not subscriber.active:
            return
        try:
            subscriber.handler(message)
        except Exception:
            log.exception("bus subscriber of {} failed", subject)

    # -- request / serve ---------------------------------------------------------------

    async def request(self, subject: str, message: Message, timeout: float) -> Message:
        if not self._open:
            raise NoResponders(subject)
        local = self._local.get(subject)
        if local is not None and local.loop is not None and local.loop.is_closed():
            # Its loop has ended (a stopped gateway): unserved, before this request goes out.
            self._local.pop(subject, None)
            ended = local

            async def unserve() -> None:
                await self._unserve(subject, ended)

            self._enqueue(unserve)
            local = None
        if local is not None:
            # This replica holds the sled: no hop through NATS, as on the local bus,
            # and it works while NATS is away.
            began = time.monotonic()
            answer = await _run_on(local.loop, local.responder(message), timeout)
            if answer is not None:
                return answer
            # It defers to another replica's server (its sled moved there): ask NATS.
            timeout = max(0.0, timeout - (time.monotonic() - began))
        if not self.connected:
            raise BusUnavailable(subject)
        data = json.dumps(message, separators=(",", ":")).encode("utf-8")
        wire = nats_subject(subject)
        result: concurrent.futures.Future[Msg] = concurrent.futures.Future()

        async def start() -> None:
            assert self._nc is not None
            nc = self._nc

            async def ask() -> None:
                try:
                    reply = await nc.request(
                        wire, data, timeout=timeout, headers={TIMEOUT_HEADER: f"{timeout:.3f}"}
                    )
                except asyncio.CancelledError:  # the bus is closing
                    if not result.done():
                        result.set_exception(nats.errors.ConnectionClosedError())
                    raise
                except Exception as exc:
                    if not result.done():
                        result.set_exception(exc)
                else:
                    if not result.done():
                        result.set_result(reply)

            # A task, so a slow answer never holds up the queue; started from the queue,
            # so its PUB follows every SUB made before this call.
            task = asyncio.get_running_loop().create_task(ask())
            self._asking.add(task)
            task.add_done_callback(self._asking.discard)

        if not self._enqueue(start):
            raise NoResponders(subject)
        try:
            async with asyncio.timeout(timeout + 0.5):
                reply = await asyncio.wrap_future(result)
        except nats.errors.NoRespondersError:
            raise NoResponders(subject) from None
        except nats.errors.MaxPayloadError:
            raise MessageTooLarge(f"{subject}: larger than the NATS server's max_payload") from None
        except nats.errors.TimeoutError:
            raise TimeoutError(f"no reply on {subject} within {timeout} s") from None
        except nats.errors.Error:  # closed, draining, its buffer full while reconnecting
            raise BusUnavailable(subject) from None
        try:
            answer = json.loads(reply.data)
        except ValueError:
            raise NoResponders(f"{subject}: the holder's reply is not JSON") from None
        if not isinstance(answer, dict):
            raise NoResponders(f"{subject}: the holder's reply is not an object")
        return answer

    def serve(self, subject: str, responder: Responder) -> StopServing:
        server = _Server(responder, _running_loop())
        self._local[subject] = server
        self._enqueue(functools.partial(self._start_serving, subject, server))
        return functools.partial(self._stop, subject, server)

    async def _handle(self, served: _Served, msg: Msg) -> None:
        """Answer one request on a served subject (bus loop)."""
        subject, current = served.subject, served.server
        try:
            message = json.loads(msg.data)
            timeout = float((msg.headers or {}).get(TIMEOUT_HEADER, "30"))
        except ValueError:
            log.warning("bus: a request on {} is not JSON; dropped", subject)
            return
        if current.loop is not None and current.loop.is_closed():
            await self._unserve(subject, current)  # its loop has ended: not a server
            return
        try:
            answer = await _run_on(current.loop, current.responder(message), timeout)
        except TimeoutError:
            return  # the requester has given up too
        except Exception:
            log.exception("bus: the server of {} failed", subject)
            return
        if answer is None or not msg.reply:  # None: another server holds it, and answers
            return
        try:
            try:
                await msg.respond(json.dumps(answer, separators=(",", ":")).encode("utf-8"))
            except nats.errors.MaxPayloadError:
                log.warning("bus: an answer on {} exceeds NATS's max_payload", subject)
                await msg.respond(json.dumps({"error": TOO_LARGE}).encode("utf-8"))
        except nats.errors.Error as exc:  # the connection closed meanwhile
            log.debug("bus: the answer on {} could not be sent: {!r}", subject, exc)

    async def _start_serving(self, subject: str, server: _Server) -> None:
        assert self._nc is not None
        served = self._served.get(subject)
        if served is not None:
            served.server = server
            return
        served = _Served(self, subject, server)
        self._served[subject] = served
        served.sub = await self._nc.subscribe(nats_subject(subject), cb=served.on_request)

    def _stop(self, subject: str, server: _Server, *, quiet: bool = False) -> None:
        """What :meth:`serve` returns: stop this server of ``subject`` (any thread)."""
        if quiet:
            server.quiet = True
        if self._local.get(subject) is server:
            del self._local[subject]
        self._enqueue(functools.partial(self._unserve, subject, server))

    async def _unserve(self, subject: str, server: _Server) -> None:
        """Stop serving ``subject`` on NATS, unless a newer server took over (bus loop)."""
        served = self._served.get(subject)
        if served is None or served.server is not server:
            return
        del self._served[subject]
        served.stopped = True
        if served.sub is None:
            return
        nc = self._nc
        if nc is None or not nc.is_connected:
            # Nothing is routed here while disconnected, and a reconnect must not
            # subscribe it again.
            with contextlib.suppress(nats.errors.Error):
                await served.sub.unsubscribe()
            return
        # A plain unsubscribe forgets the subscription at once, so a request the server
        # routed here before it read the UNSUB would be dropped unanswered. Draining
        # answers those until a PING's PONG shows the server read it; in a task, so one
        # round trip per sled leaving does not hold up the queue.
        served.draining = True
        task = asyncio.get_running_loop().create_task(self._drain_served(served, served.sub))
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)
        # One turn of the loop: the drain writes its UNSUB before its first wait, so the
        # UNSUB still goes out before the next queued operation's command.
        await asyncio.sleep(0)

    @staticmethod
    async def _drain_served(served: _Served, sub: Subscription) -> None:
        try:
            async with asyncio.timeout(_DRAIN_S):
                await drain_subscription(sub)
        except (nats.errors.Error, TimeoutError) as exc:
            # The connection went away meanwhile. If nats-py still holds the subscription
            # it answers nothing from now on: were the sled held elsewhere by then, a
            # "not sent" from here could win over the holder's real answer.
            log.debug("bus: draining the subscription of {}: {!r}", served.subject, exc)
        finally:
            served.draining = False


def _call_on(loop: asyncio.AbstractEventLoop | None, call: Callable[[], None]) -> None:
    """``call()`` on ``loop`` (FIFO with earlier calls), or here when there is none."""
    if loop is None or loop is _running_loop():
        call()
        return
    try:
        loop.call_soon_threadsafe(call)
    except RuntimeError:
        log.debug("bus: the loop of a handler has closed; message dropped")


async def _run_on(
    loop: asyncio.AbstractEventLoop | None, work: Awaitable[Message | None], timeout: float
) -> Message | None:
    """Await ``work`` on ``loop`` (the server's), cancelled there after ``timeout`` seconds."""

    async def bounded() -> Message | None:
        async with asyncio.timeout(timeout):
            return await work

    if loop is None or loop is _running_loop():
        return await bounded()
    future = asyncio.run_coroutine_threadsafe(bounded(), loop)
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        future.cancel()
        raise


__all__ = ["NatsBus", "nats_subject"]


async def _finish_tasks_left() -> None:
    """Cancel and await what is left on the bus's loop. nats-py cancels its
    subscriptions' reader tasks without awaiting them (and leaves its reconnect
    task while the server is away): unfinished, they are torn down when the closed
    loop is collected, an error from the garbage collector for each."""
    current = asyncio.current_task()
    left = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    for task in left:
        task.cancel()
    if left:
        await asyncio.wait(left, timeout=1.0)
