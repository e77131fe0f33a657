"""The MCP relay: ``POST /sleds/{project}/mcp`` to the sled holding ``project``, over the bus.

The body (JSON-RPC, unparsed: the sled judges it) goes out as a request on
``sled.<project>.mcp``; whoever holds that sled (:mod:`sled_gateway.hub`)
sends it as an ``mcp_request`` and replies with the sled's ``mcp_response``.

With ``--bus local`` a sled not connected here is a 404 at once; on NATS
the sled may be held by another replica, so the request goes out and
nobody serving it is the 404.

Answers: 404 no such sled connected, 503 too many relays in flight to it
(``--max-relays-per-sled``), the gateway stopping or the bus down, 413/408/400 a body too
large, too slow or not UTF-8, 502 the sled went away, 504 it did not answer
within ``--mcp-timeout``, 202 a notification's empty answer, 413 also a body
larger than the bus carries.
"""

from __future__ import annotations

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
from sled_gateway.http.errors import error
from sled_gateway.http.params import BodyTooLarge, BodyTooSlow, read_body
from sled_gateway.state import GatewayState

log = logger.bind(actor="gateway")


class Relay:
    """The ``/sleds/{project}/mcp`` endpoint."""

    def __init__(self, config: GatewayConfig, state: GatewayState, bus: Bus) -> None:
        self.config = config
        self.state = state
        self.bus = bus
        self._in_flight: dict[str, int] = {}  # project → relays in flight

    async def handle(self, request: Request) -> Response:
        project = request.path_params["project"]
        if not self.state.is_connected(project) and self.config.bus == "local":
            return _no_such_sled(project)
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
                headers={"Retry-After": "1"},
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
            return error(503, "the bus to the other replicas is down", headers={"Retry-After": "1"})
        except NoResponders:
            if self.config.bus != "local" and not self.state.is_connected(project):
                return _no_such_sled(project)  # not here, and no other replica holds it
            return error(502, f"sled {project!r} went away before the request was sent")
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
            if failure == STOPPING:
                return error(503, "gateway is shutting down")
            if failure == TOO_LARGE:
                return error(502, f"the answer of sled {project!r} is larger than the bus carries")
            if failure == NOT_SENT:
                return error(502, f"sled {project!r} went away before the request was sent")
            return error(502, f"sled {project!r} disconnected before answering")
        payload = reply.get("payload")
        if payload is None:  # the sled's local server answered 202/204 (a notification)
            return Response(status_code=202)
        return Response(dumps(payload), status_code=200, media_type="application/json")


def _no_such_sled(project: str) -> Response:
    return error(404, f"no connected sled named {printable(project, 120)!r}")
