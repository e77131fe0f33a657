"""The MCP relay: ``POST /sleds/{project}/mcp`` to the sled holding ``project``, over the bus.

The body (JSON-RPC, unparsed: the sled judges it) goes out as a request on
``sled.<project>.mcp``; whoever holds that sled (:mod:`sled_gateway.hub`)
sends it as an ``mcp_request`` and replies with the sled's ``mcp_response``.

With ``--bus local`` a sled not connected here is a 404 at once; on NATS
the sled may be held by another replica, so the request goes out and
nobody serving it is the 404.

A sled that left a moment ago without saying goodbye (a drain moves it to another
replica, a lost connection makes it reconnect) is not unknown: within :data:`RECONNECT_GRACE` of its
leaving, a relay to it answers 503 with ``Retry-After``, which a client retries,
rather than 404, which it gives up on. Replicas learn when a sled left from the
shared store (a replica started after it left knows it too); one process from
its own sessions. Only a caller the endpoint already admitted (an admin of that
sled) learns it.

Answers: 404 no such sled connected (nor recently), 503 too many relays in flight to it
(``--max-relays-per-sled``), the gateway stopping or the bus down, the sled gone before the
request was sent to it (with ``Retry-After``: nothing ran, it is likely reconnecting),
413/408/400 a body too large, too slow or not UTF-8, 502 the sled went away after the
request was sent (it may have run: no hint to retry), 504 it did not answer
within ``--mcp-timeout``, 202 a notification's empty answer, 413 also a body
larger than the bus carries.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from loguru import logger
from starlette.requests import Request
from starlette.responses import Response

from protocol import dumps, printable
from sled_gateway.bus import (
    NOT_SENT,
    STOPPING,
    TOO_LARGE,
    Bus,
    BusUnavailable,
    MessageTooLarge,
    NoResponders,
    sled_subject,
)
from sled_gateway.config import GatewayConfig
from sled_gateway.events import Events, SledDown, SledUp
from sled_gateway.http.errors import error
from sled_gateway.http.params import BodyTooLarge, BodyTooSlow, read_body
from sled_gateway.state import GatewayState

log = logger.bind(actor="gateway")

#: How long after a sled left a relay to it is "retry" (503) rather than "no such
#: sled" (404): above the uplink's reconnect back-off after a drain or a lost replica.
RECONNECT_GRACE = 60.0
#: Seconds a client is told to wait before it retries a relay answered 503.
RETRY_AFTER = "1"
#: Departures one process remembers (the oldest forgotten first).
_MAX_DEPARTURES = 100_000

LeftAt = Callable[[str], Awaitable[float | None]]


class Departures:
    """When each sled that is not back yet left this process (wall-clock time)."""

    def __init__(self, events: Events) -> None:
        self._left: OrderedDict[str, float] = OrderedDict()
        events.subscribe(SledUp, self._up)
        events.subscribe(SledDown, self._down)

    def _up(self, event: SledUp) -> None:
        self._left.pop(event.project, None)

    def _down(self, event: SledDown) -> None:
        if event.project is None:
            return
        self._left.pop(event.project, None)
        if event.said_goodbye:
            return  # it stopped: not coming back soon, so unknown again
        self._left[event.project] = time.time()
        while len(self._left) > _MAX_DEPARTURES:
            self._left.popitem(last=False)

    async def left_at(self, project: str) -> float | None:
        return self._left.get(project)


class Relay:
    """The ``/sleds/{project}/mcp`` endpoint."""

    def __init__(
        self, config: GatewayConfig, state: GatewayState, bus: Bus, left_at: LeftAt
    ) -> None:
        self.config = config
        self.state = state
        self.bus = bus
        self.left_at = left_at
        self._in_flight: dict[str, int] = {}  # project → relays in flight

    async def handle(self, request: Request) -> Response:
        project = request.path_params["project"]
        if not self.state.is_connected(project) and self.config.bus == "local":
            return await self._not_here(project)
        in_flight = self._in_flight.get(project, 0)
        if in_flight >= self.config.max_relays_per_sled:
            log.warning(
                "sled {}: {} MCP relays in flight (--max-relays-per-sled); answered 503",
                printable(project, 120),
                in_flight,
            )
            return error(
                503,
                f"too many MCP requests in flight to sled {printable(project, 120)!r}",
                headers={"Retry-After": RETRY_AFTER},
            )
        self._in_flight[project] = in_flight + 1
        try:
            return await self._relay(request, project)
        finally:
            left = self._in_flight[project] - 1
            if left:
                self._in_flight[project] = left
            else:
                del self._in_flight[project]

    async def _relay(self, request: Request, project: str) -> Response:
        try:
            raw = await read_body(request, self.config.max_mcp_body, self.config.body_timeout)
        except BodyTooLarge:
            return error(413, f"body larger than {self.config.max_mcp_body} bytes")
        except BodyTooSlow:
            return error(408, f"body not received within {self.config.body_timeout} s")
        try:
            body = raw.decode("utf-8")
        except UnicodeDecodeError:
            return error(400, "body is not UTF-8 text")
        try:
            reply = await self.bus.request(
                sled_subject(project, "mcp"), {"body": body}, self.config.mcp_timeout
            )
        except BusUnavailable:
            return error(
                503, "the bus to the other replicas is down", headers={"Retry-After": RETRY_AFTER}
            )
        except NoResponders:
            if self.config.bus != "local" and not self.state.is_connected(project):
                return await self._not_here(project)  # no replica holds it
            # Listed, but nobody serves it: it left a moment ago (this replica has not
            # heard yet) and is likely reconnecting. Nothing was sent: a retry is safe.
            return _moving(project)
        except MessageTooLarge:
            return error(413, "body larger than the bus carries")
        except TimeoutError:
            log.warning(
                "MCP request to sled {}: no answer in {} s",
                printable(project, 120),
                self.config.mcp_timeout,
            )
            return error(504, f"sled {project!r} did not answer within {self.config.mcp_timeout} s")
        failure = reply.get("error")
        if failure is not None:
            if failure == STOPPING:  # its sled moves to another replica: worth a retry
                return error(503, "gateway is shutting down", headers={"Retry-After": RETRY_AFTER})
            if failure == TOO_LARGE:
                return error(502, f"the answer of sled {project!r} is larger than the bus carries")
            if failure == NOT_SENT:
                return _moving(project)
            return error(502, f"sled {project!r} disconnected before answering")
        payload = reply.get("payload")
        if payload is None:  # the sled's local server answered 202/204 (a notification)
            return Response(status_code=202)
        return Response(dumps(payload), status_code=200, media_type="application/json")

    async def _not_here(self, project: str) -> Response:
        """404, or 503 with a hint for a sled that left a moment ago (it is reconnecting)."""
        try:
            left = await self.left_at(project)
        except Exception as exc:  # the store is away: say nothing rather than guess
            log.warning(
                "relay to sled {}: its last departure unknown: {}", printable(project, 120), exc
            )
            return error(
                503, "the gateway's store is unavailable", headers={"Retry-After": RETRY_AFTER}
            )
        ago = time.time() - left if left is not None else None
        if ago is None or not 0 <= ago <= RECONNECT_GRACE:
            return _no_such_sled(project)
        return error(
            503,
            f"sled {printable(project, 120)!r} left {ago:.1f} s ago and is reconnecting; retry",
            headers={"Retry-After": RETRY_AFTER},
        )


def _moving(project: str) -> Response:
    return error(
        503,
        f"sled {printable(project, 120)!r} went away before the request was sent; retry",
        headers={"Retry-After": RETRY_AFTER},
    )


def _no_such_sled(project: str) -> Response:
    return error(404, f"no connected sled named {printable(project, 120)!r}")
